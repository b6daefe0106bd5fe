"""``train.precision``: which parts of the model compute in bf16.

* ``fp32``: everything in float32.
* ``bf16``: on a GPU, Accelerate's bf16 autocast (``mixed_precision="bf16"``); on a CPU, the *frozen* backbones (the
  LLM and the Whisper encoder) are held in bfloat16 while every trainable parameter (projectors, boundary markers,
  MoME experts and routers, the video front end) and the optimizer state stay float32 (MoME computes in its own
  parameters' dtype, ``mome.layers.layer``; projector outputs are cast to the LLM's dtype when the rows are built).
* ``auto``: bf16 on a bf16-capable GPU; on a CPU, a short GEMM timing at start (the LLM's projection shapes)
  decides: bf16 frozen backbones when bf16 runs at least ``MIN_SPEEDUP`` x faster than fp32 (CPUs with AMX or
  avx512_bf16), fp32 otherwise (CPUs that emulate bf16, where it is many times slower).

``apply_precision(cfg)`` returns the config with ``model.llm.dtype`` / ``model.audio_encoder.dtype`` set accordingly
(saved with the run, so evaluation of the checkpoint uses the same backbones) and a line for the run header.
A backbone dtype the user set explicitly to something other than float32 is never changed.
"""
from __future__ import annotations

import time
from typing import Tuple

import torch
from omegaconf import DictConfig, OmegaConf

MIN_SPEEDUP = 1.3
# SmolLM2-135M's MLP up-projection on a training batch's rows: [tokens, d] x [d, ffn]
GEMM_SHAPES = ((512, 576), (576, 1536))


def gemm_speedup(repeats: int = 5) -> float:
    """fp32 time / bf16 time of ``GEMM_SHAPES`` on the CPU (median of ``repeats``, after a warm-up)."""
    (m, k), (_, n) = GEMM_SHAPES
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def timed(a, b):
        a @ b  # warm-up (oneDNN kernel selection)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    fp32, bf16 = [], []
    for _ in range(2):  # interleaved, so load from other processes hits both alike
        fp32.append(timed(a32, b32))
        bf16.append(timed(a16, b16))
    return min(fp32) / max(min(bf16), 1e-9)


def decide_cpu_bf16(precision: str) -> Tuple[bool, str]:
    """(frozen backbones in bf16?, reason) for ``train.precision`` on a CPU."""
    if precision == "fp32":
        return False, "train.precision=fp32"
    if precision == "bf16":
        return True, "train.precision=bf16"
    speedup = gemm_speedup()
    if speedup >= MIN_SPEEDUP:
        return True, f"auto: bf16 GEMM {speedup:.1f}x faster than fp32 on this CPU"
    return False, f"auto: bf16 GEMM {speedup:.2f}x the speed of fp32 on this CPU (< {MIN_SPEEDUP}x), kept fp32"


def apply_precision(cfg: DictConfig, cuda: bool | None = None) -> Tuple[DictConfig, str]:
    """The config with the backbone dtypes ``train.precision`` gives, and a one-line description of it."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    precision = cfg.train.precision
    if cuda:
        bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())
        return cfg, ("bf16 autocast (GPU)" if bf16 else "fp32") + f" [train.precision={precision}]"
    use_bf16, reason = decide_cpu_bf16(precision)
    if not use_bf16:
        return cfg, f"fp32 everywhere ({reason})"
    # a merge, not a rebuilt container: the result keeps the schema (typed sections such as data.synth)
    bf16 = [f"{key}=bfloat16" for key in ("model.llm.dtype", "model.audio_encoder.dtype")
            if OmegaConf.select(cfg, key) == "float32"]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(bf16))
    OmegaConf.set_readonly(cfg, True)
    frozen = f"{cfg.model.llm.dtype} LLM, {cfg.model.audio_encoder.dtype} Whisper"
    return cfg, f"frozen backbones {frozen}, trainable parameters and optimizer state fp32 ({reason})"
