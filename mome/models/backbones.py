"""The frozen backbones (LLM, Whisper encoder): loading, building from an architecture alone, fingerprints.

Three ways to get a backbone, chosen by the config:

* **pretrained** (default): ``mome.pretrained.load_llm`` / ``load_whisper`` (registry name, local HF folder or hub id);
* **random** (``model.llm.random_init=true`` / ``model.audio_encoder.random_init=true``): the architecture from a
  ``config.json`` with seeded random weights, for tests (a tiny Llama with a small vocabulary and a tokenizer saved
  next to it);
* **meta** (``device="meta"``): the architecture only, no memory, for parameter accounting (``describe``).

Architectures are looked up offline: a local folder's ``config.json``, else the facts shipped in
``configs/backbones/<name or hub id>/config.json`` (Llama-3.2-1B/3B, Whisper small/medium, the embedded default),
else the converted registry folder from ``mome.pretrained.resolve``.

A *fingerprint* (architecture + a bf16-rounded sample of every weight) identifies a loaded backbone so that a
checkpoint of trainable parts is never silently loaded on top of a different frozen model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
BACKBONE_CONFIGS = REPO_ROOT / "configs" / "backbones"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
RANDOM_INIT_SEED = 0

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}") from None


def has_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


def architecture_folder(name: str, cache_dir: Optional[Path] = None) -> Path:
    """A folder holding ``config.json`` for backbone ``name``, without downloading anything."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local}: no config.json in this backbone folder")
        return local
    shipped = BACKBONE_CONFIGS / name
    if (shipped / "config.json").is_file():
        return shipped
    from mome import pretrained  # the converted registry models live in the cache

    try:
        folder = Path(pretrained.resolve(name, cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - re-raised with the offline alternatives named
        raise FileNotFoundError(
            f"no architecture for backbone '{name}': not a local folder, not shipped in {BACKBONE_CONFIGS} "
            f"and mome.pretrained.resolve failed ({exc})"
        ) from None
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: resolved backbone '{name}' has no config.json")
    return folder


def _random_init(build, seed: int = RANDOM_INIT_SEED) -> nn.Module:
    """Build a module with a fixed seed (same weights on every call) without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _needs_random_init_flag(folder: Path, key: str) -> None:
    if not has_weights(folder):
        raise FileNotFoundError(
            f"{folder}: backbone folder has no weights (*.safetensors/*.bin); set {key}=true to build it with "
            f"random weights from its config.json (tests only)"
        )


# ----------------------------------------------------------------------------------------------------------------
# LLM


def load_llm_backbone(llm_cfg, cache_dir: Optional[Path] = None, device: Optional[str] = None) -> Tuple[nn.Module, object]:
    """(frozen causal LM in eval mode, tokenizer or None). ``device="meta"`` builds the architecture only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = torch_dtype(llm_cfg.dtype)
    if device == "meta" or llm_cfg.random_init:
        folder = architecture_folder(llm_cfg.name, cache_dir)
        config = AutoConfig.from_pretrained(folder)

        def build():
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=llm_cfg.attn_implementation)

        if device == "meta":
            with torch.device("meta"):
                model = build()
            tokenizer = None
        else:
            model = _random_init(build)
            tokenizer = AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
    else:
        local = Path(llm_cfg.name).expanduser()
        if local.is_dir():
            _needs_random_init_flag(local, "model.llm.random_init")
        from mome import pretrained

        model, tokenizer = pretrained.load_llm(llm_cfg.name, dtype=dtype, cache_dir=cache_dir)
        if getattr(model.config, "_attn_implementation", None) != llm_cfg.attn_implementation:
            model.set_attn_implementation(llm_cfg.attn_implementation)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


# ----------------------------------------------------------------------------------------------------------------
# Whisper encoder


def load_whisper_encoder(audio_cfg, cache_dir: Optional[Path] = None, device: Optional[str] = None) -> nn.Module:
    """The frozen HF ``WhisperEncoder`` (decoder dropped). ``device="meta"`` builds the architecture only."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    dtype = torch_dtype(audio_cfg.dtype)
    if device == "meta" or audio_cfg.random_init:
        config = WhisperConfig.from_pretrained(architecture_folder(audio_cfg.name, cache_dir))

        def build():
            return WhisperEncoder(config).to(dtype)

        if device == "meta":
            with torch.device("meta"):
                encoder = build()
        else:
            encoder = _random_init(build)
    else:
        local = Path(audio_cfg.name).expanduser()
        if local.is_dir():
            _needs_random_init_flag(local, "model.audio_encoder.random_init")
        from mome import pretrained

        whisper, _ = pretrained.load_whisper(audio_cfg.name, dtype=dtype, cache_dir=cache_dir)
        encoder = whisper.get_encoder()
        del whisper  # the decoder is never used
    encoder.requires_grad_(False)
    encoder.eval()
    return encoder


# ----------------------------------------------------------------------------------------------------------------
# fingerprints


def fingerprint(module: nn.Module, samples: int = 64) -> Optional[str]:
    """A short hash of a frozen backbone: every frozen parameter's name and shape plus ``samples`` evenly spaced
    values, rounded to bf16 (so fp32 and bf16 loads of the same checkpoint agree). Trainable parameters (e.g. a LoRA
    inside a frozen encoder) are left out. None for a meta-device module."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if p.is_meta:
            return None
        if p.requires_grad:
            continue
        h.update(f"{name}:{tuple(p.shape)};".encode())
        flat = p.detach().reshape(-1)
        k = min(samples, flat.numel())
        idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)  # exact integer spacing
        vals = flat[idx].float().to(torch.bfloat16).view(torch.int16).cpu().numpy()
        h.update(vals.tobytes())
    return h.hexdigest()[:16]


def describe_backbone(name: str, module: nn.Module) -> dict:
    config = getattr(module, "config", None)
    return {
        "name": name,
        "class": type(module).__name__,
        "model_type": getattr(config, "model_type", None),
        "fingerprint": fingerprint(module),
    }


def backbones_json(info: dict) -> str:
    return json.dumps(info, sort_keys=True)
