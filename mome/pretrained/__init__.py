"""Pretrained backbones, offline: registry names converted once from pip packages, local folders, or Hub ids.

    from mome.pretrained import load_llm, load_whisper, resolve
    llm, tokenizer = load_llm("smollm2-135m")            # frozen, eval, fp32
    whisper, processor = load_whisper("whisper-tiny.en")  # WhisperForConditionalGeneration + WhisperProcessor
    resolve("meta-llama/Llama-3.2-1B")                    # a Hub id: the only case that may use the network

``python -m mome.pretrained prepare [--cache-dir D]`` converts every registry model into ``<cache>/models/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from .registry import REGISTRY, PrepareResult, models_dir, prepare, prepare_all, resolve

__all__ = ["REGISTRY", "PrepareResult", "models_dir", "prepare", "prepare_all", "resolve", "load_llm",
           "load_whisper", "freeze"]

PathLike = Union[str, Path]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """No gradients, eval mode (dropout off)."""
    model.requires_grad_(False)
    return model.eval()


def load_llm(name: PathLike, dtype: torch.dtype = torch.float32, cache_dir: PathLike | None = None):
    """(causal LM, tokenizer) for a registry name, local folder or Hub id; the model is frozen and in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return freeze(model), tokenizer


def load_whisper(name: PathLike, dtype: torch.dtype = torch.float32, cache_dir: PathLike | None = None):
    """(WhisperForConditionalGeneration, WhisperProcessor) for a registry name, local folder or Hub id; frozen."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    path = resolve(name, cache_dir)
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype)
    processor = WhisperProcessor.from_pretrained(path)
    return freeze(model), processor
