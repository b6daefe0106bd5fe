"""Tiny random backbones for tests and smoke runs: a 2-layer Llama with a character tokenizer and a 2-layer Whisper.

``write_tiny_backbones(folder)`` writes ``folder/llm`` (config.json + tokenizer files, no weights) and
``folder/whisper`` (config.json); ``tiny_config(folder, method=..., overrides=...)`` gives a full config that builds
them with ``random_init`` (seeded, so every build has the same frozen weights), a small video front end, small
projectors and a small MoME / LoRA; ``tiny_overrides`` gives the same as ``key=value`` overrides, to put over any
other config (``mome.experiments.compare --quick``). Nothing is downloaded.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Sequence

import torch

from mome.config import SINGLE_SCALE_METHODS, load_config

CHARS = string.ascii_lowercase + string.digits + " .,'?!-"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (one token per character, BOS ``<s>``, EOS ``</s>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def write_tiny_backbones(folder: str | Path, hidden: int = 64, layers: int = 2) -> tuple[Path, Path]:
    """Write the tiny LLM and Whisper folders under ``folder``; returns (llm_dir, whisper_dir)."""
    from transformers import LlamaConfig, WhisperConfig

    folder = Path(folder)
    llm_dir, whisper_dir = folder / "llm", folder / "whisper"
    tok = char_tokenizer()
    tok.save_pretrained(llm_dir)
    LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ).save_pretrained(llm_dir)
    WhisperConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=1500,
    ).save_pretrained(whisper_dir)
    return llm_dir, whisper_dir


def tiny_overrides(folder: str | Path, method: str = "mome") -> list:
    """The ``key=value`` overrides that turn any config into one over the tiny backbones in ``folder`` (written if
    missing): random-init backbones, a small video front end, small projectors and a small MoME / LoRA."""
    folder = Path(folder)
    if not (folder / "llm" / "config.json").is_file():
        write_tiny_backbones(folder)
    base = [
        f"cache_dir={folder / 'cache'}",
        f"model.method={method}",
        f"model.llm.name={folder / 'llm'}",
        "model.llm.random_init=true",
        f"model.audio_encoder.name={folder / 'whisper'}",
        "model.audio_encoder.random_init=true",
        "model.video_encoder.channels=4",
        "model.video_encoder.dim=16",
        "model.video_encoder.temporal_layers=1",
        "model.projector.hidden=32",
        "model.mome.num_experts=4",
        "model.mome.top_k=2",
        "model.mome.bottleneck=4",
        "model.lora.reduction=8",
    ]
    if method in SINGLE_SCALE_METHODS:
        base += ["model.compression.audio_rates=[4]", "model.compression.video_rates=[2]"]
    return base


def tiny_config(folder: str | Path, method: str = "mome", overrides: Sequence[str] = ()):
    """A full config over the tiny backbones in ``folder`` (written if missing)."""
    return load_config(None, [*tiny_overrides(folder, method), *overrides])


def random_batch(lengths: Sequence[int], texts: Sequence[str] | None = None, seed: int = 0) -> dict:
    """A batch in the ``mome.data`` layout with random media: ``lengths`` in video frames (audio = 640 x frames)."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    audio = torch.zeros(b, 640 * t)
    video = torch.zeros(b, t, 1, 88, 88)
    for i, n in enumerate(lengths):
        audio[i, : 640 * n] = torch.randn(640 * n, generator=g) * 0.1
        video[i, :n] = torch.randn(n, 1, 88, 88, generator=g)
    texts = list(texts) if texts is not None else [f"utterance number {i}" for i in range(b)]
    return {
        "ids": [f"utt{i}" for i in range(b)],
        "text": texts,
        "audio": audio,
        "audio_lengths": torch.tensor([640 * n for n in lengths]),
        "video": video,
        "video_lengths": torch.tensor(list(lengths)),
    }
