"""Per-GPU memory plan for a real-size MoME training step, from shapes only (nothing is downloaded or allocated).

Default setup: Llama-3.2-3B (frozen, bf16) + Whisper-medium encoder (frozen, bf16) + AV-HuBERT-Large (frozen, bf16),
AVSR with every audio x video rate pair of the config ({4,16} x {2,5}: 4 sequences per utterance, all kept until one
backward), MoME-23/4 adapters (or the config's method), one projector per rate. Memory is given for a batch of
``max_frames`` video frames (25 fps) made of utterances of ``utt_seconds`` each, with gradient checkpointing of the
LLM decoder layers off and on.

Model (per GPU):

* static: frozen weights in bf16; trainable parameters in fp32 with fp32 gradients and AdamW m, v (16 bytes per
  parameter; ZeRO-2 shards the gradients and optimizer states: 4 + 12/G bytes); a fixed runtime overhead (CUDA
  context, cuBLAS workspaces; assumed, see ``--overhead-gib``);
* encoder phase (frozen encoders under no_grad, transient): AV-HuBERT's 3D stem (two [64, 44, 44] bf16 maps per
  frame alive at once) or a transformer layer's working set, Whisper's conv stem or a layer's working set; with LoRA
  on AV-HuBERT its transformer activations are saved for backward instead;
* LLM phase: the saved activations of every decoder layer (bytes per token per layer measured with
  ``torch.autograd.graph.saved_tensors_hooks`` on an HF ``LlamaDecoderLayer`` with frozen weights and a padding mask:
  two fp32 RMSNorm inputs and their rstd (8d + 8), SDPA q, k, v, out with K/V repeated to all heads because a mask
  is passed (8d), SwiGLU gate, up and SiLU output (6f), the fp32 log-sum-exp (4 x heads);
  ``tests/test_memory_plan.py`` re-measures it), the adapters' saved tensors (MoME dense hot path: its input, router probabilities, expert hidden states), the
  projectors', the 4D attention mask, and the logits: HF computes ``lm_head`` on every position, casts to fp32 and
  keeps the log-softmax, about 10 x vocab bytes per position at the peak (``--logits text`` counts transcript
  positions only, what slicing hidden states before ``lm_head`` would give). With checkpointing, only each layer's
  input (2d bytes per token per layer) is kept, plus one layer recomputed at a time.
* Scale sequences are concatenated along the batch and padded to the longest (docs/decisions.md#one-call) unless
  ``--layout separate``.

Peak = static + inputs + max(encoder phase, LLM phase) (the encoders finish before the LLM starts).
The figures are estimates (no allocator fragmentation, no cuDNN workspaces); measure on a GPU before trusting the
last GiB.

Usage::

    python benchmarks/memory_plan.py                          # table for max_frames 1000/1500/2000 x 3/6/16 s
    python benchmarks/memory_plan.py --max-frames 1500 --utt-seconds 6 --json runs/memory_plan.json
    python benchmarks/memory_plan.py --config configs/X.yaml model.mome.top_k=2
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mome.config import MOME_METHODS, ConfigError, load_config  # noqa: E402
from mome.models.avhubert import AVHubertEncoder, with_arch  # noqa: E402
from mome.scales import all_scales  # noqa: E402

GiB = 1024**3
BF16, FP32 = 2, 4


# ----------------------------------------------------------------------------------------------------------------
# architectures (docs/method.md#backbones for Llama; Whisper from its published configs)


@dataclass(frozen=True)
class LlamaArch:
    name: str
    dim: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int = 128256
    tied: bool = True

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def params(self) -> int:
        d, q, kv = self.dim, self.heads * self.head_dim, self.kv_dim
        layer = d * q + 2 * d * kv + q * d + 3 * d * self.ffn + 2 * d
        emb = self.vocab * d * (1 if self.tied else 2)
        return self.layers * layer + emb + d

    def saved_bytes_per_token_layer(self, masked: bool = True) -> int:
        """Saved activations of one decoder layer (frozen weights, bf16, SDPA)."""
        d, f = self.dim, self.ffn
        q = self.heads * self.head_dim
        kv = q if masked else self.kv_dim  # HF repeats K/V to every head when an attention mask is passed
        return 2 * (d + 1) * FP32 + BF16 * (2 * q + 2 * kv) + 3 * f * BF16 + self.heads * FP32


LLAMAS = {
    "llama-3.2-1b": LlamaArch("Llama-3.2-1B", 2048, 16, 32, 8, 64, 8192),
    "llama-3.2-3b": LlamaArch("Llama-3.2-3B", 3072, 28, 24, 8, 128, 8192),
    "llama-3.1-8b": LlamaArch("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, tied=False),
}


@dataclass(frozen=True)
class WhisperEncoderArch:
    name: str
    dim: int
    layers: int
    heads: int
    ffn: int
    n_mels: int = 80
    max_frames: int = 1500  # 30 s at 50 Hz

    def params(self) -> int:
        d = self.dim
        conv = self.n_mels * d * 3 + d + d * d * 3 + d
        layer = 4 * d * d + 3 * d + 2 * d * self.ffn + self.ffn + d + 4 * d  # k_proj has no bias
        return conv + self.max_frames * d + self.layers * layer + 2 * d


WHISPERS = {
    "whisper-small": WhisperEncoderArch("Whisper-small encoder", 768, 12, 12, 3072),
    "whisper-medium": WhisperEncoderArch("Whisper-medium encoder", 1024, 24, 16, 4096),
}


def avhubert_counts(size: str, lora_rank: int) -> Dict[str, int]:
    with torch.device("meta"):
        enc = AVHubertEncoder(size=size, lora_rank=lora_rank, arch=with_arch(size))
    frozen = sum(p.numel() for p in enc.parameters() if not p.requires_grad)
    frozen += sum(b.numel() for b in enc.buffers() if b.is_floating_point())
    return {"frozen": frozen, "trainable": sum(p.numel() for p in enc.parameters() if p.requires_grad)}


# ----------------------------------------------------------------------------------------------------------------
# trainable parameters of our model (projectors, adapters, boundary embeddings)


def projector_params(d_in: int, hidden: int, d_llm: int, layernorm: bool) -> int:
    return d_in * hidden + hidden + hidden * d_llm + d_llm + (2 * d_llm if layernorm else 0)


def adapter_params(cfg, llm: LlamaArch, n_scales: int) -> Dict[str, int]:
    m = cfg.model
    d = llm.dim
    if m.method in MOME_METHODS:
        mo = m.mome
        expert = 2 * d * mo.bottleneck + mo.bottleneck + d
        routers = (n_scales if mo.router == "per_scale" else 1) * mo.num_experts * d
        per_layer_total = (mo.num_experts + mo.num_shared) * expert + routers
        per_layer_active = (mo.top_k + mo.num_shared) * expert + mo.num_experts * d
        return {"total": llm.layers * per_layer_total, "active": llm.layers * per_layer_active}
    r = m.lora.rank or round(d / m.lora.reduction)
    one = llm.layers * (d * r + r * d + d * r + r * llm.kv_dim)  # Q and V
    copies = {"llama_avsr": 1, "mtsk_ms": 1, "mtsk_ss": n_scales, "mtsk_mss": n_scales + 1}[m.method]
    active = 2 * one if m.method == "mtsk_mss" else one
    return {"total": copies * one, "active": active}


def adapter_saved_bytes_per_token_layer(cfg, llm: LlamaArch) -> int:
    m = cfg.model
    d = llm.dim
    if m.method in MOME_METHODS:
        mo = m.mome
        hidden = (mo.num_experts + mo.num_shared) * mo.bottleneck
        # input (2d), router logits/probs fp32, top-k ids/gates, expert pre-GELU, post-GELU and gated hidden
        return BF16 * d + 2 * FP32 * mo.num_experts + 12 * mo.top_k + 3 * BF16 * hidden
    r = m.lora.rank or round(d / m.lora.reduction)
    return BF16 * d + 2 * BF16 * r  # the shared lora_A input + both bottleneck outputs


# ----------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Workload:
    max_frames: int
    utt_seconds: float
    text_tokens_per_s: float
    prompt_tokens: int
    special_tokens: int = 6  # BOS, <audio>, </audio>, <video>, </video>, EOS

    @property
    def batch(self) -> int:
        return max(1, int(self.max_frames // round(25 * self.utt_seconds)))

    @property
    def video_frames(self) -> int:
        return round(25 * self.utt_seconds)

    @property
    def audio_frames(self) -> int:  # Whisper output frames kept (50 Hz)
        return max(int(50 * self.utt_seconds), 25)

    @property
    def text_tokens(self) -> int:
        return math.ceil(self.text_tokens_per_s * self.utt_seconds)


def plan(cfg, llm: LlamaArch, whisper: WhisperEncoderArch, w: Workload, *, layout: str = "concat",
         logits: str = "all", gpus: int = 8, zero_stage: int = 2, overhead_gib: float = 1.0) -> Dict:
    m = cfg.model
    scales = all_scales(m)
    B, Tv, Ta = w.batch, w.video_frames, w.audio_frames
    av_size = m.video_encoder.size
    av = avhubert_counts(av_size, m.video_encoder.lora_rank)
    av_arch = with_arch(av_size)

    # sequence lengths per scale
    seq = {}
    for s in scales:
        n = w.special_tokens + w.prompt_tokens + w.text_tokens
        if s.audio_rate:
            n += Ta // s.audio_rate
        if s.video_rate:
            n += Tv // s.video_rate
        if s.task != "avsr":
            n -= 2  # one modality: two boundary markers fewer
        seq[s.name] = n
    s_max = max(seq.values())
    rows = B * len(scales)
    tokens = rows * s_max if layout == "concat" else B * sum(seq.values())
    logit_positions = tokens if logits == "all" else rows * (w.text_tokens + 1)

    # parameters
    hidden, ln = m.projector.hidden, m.projector.layernorm
    d_a, d_v = whisper.dim, av_arch.dim
    stack = m.compression.method == "stack"
    proj = sum(projector_params(d_a * (r if stack else 1), hidden, llm.dim, ln) for r in m.compression.audio_rates)
    proj += sum(projector_params(d_v * (r if stack else 1), hidden, llm.dim, ln) for r in m.compression.video_rates)
    adapters = adapter_params(cfg, llm, len(scales))
    trainable = proj + adapters["total"] + 4 * llm.dim + av["trainable"]
    frozen = {"llm": llm.params(), "whisper_encoder": whisper.params(), "avhubert": av["frozen"]}

    static = {
        "frozen_weights_bf16": BF16 * sum(frozen.values()),
        "trainable_fp32_ddp": 16 * trainable,
        "trainable_fp32_zero2": int(FP32 * trainable + 12 * trainable / gpus),
        "runtime_overhead": int(overhead_gib * GiB),
    }
    trainable_bytes = static["trainable_fp32_zero2"] if zero_stage == 2 else static["trainable_fp32_ddp"]

    frames = B * Tv
    inputs = frames * 88 * 88 * FP32 + frames * 640 * FP32  # video + waveform
    whisper_frames = B * (whisper.max_frames if m.audio_encoder.pad_to_30s else Ta)
    inputs += whisper_frames * 2 * whisper.n_mels * FP32  # log-Mel

    # encoder phase (transient, under no_grad): the largest working set
    stem = frames * 2 * 64 * 44 * 44 * BF16
    av_layer = frames * (4 * av_arch.dim + 4 * av_arch.ffn_dim) * BF16 // 2
    wh_conv = whisper_frames * 2 * 2 * whisper.dim * BF16
    wh_layer = whisper_frames * (4 * whisper.dim + 4 * whisper.ffn) * BF16 // 2
    enc_transient = max(stem, av_layer, wh_conv, wh_layer)
    av_lora_saved = 0
    if m.video_encoder.lora_rank > 0:  # AV-HuBERT transformer activations kept for backward
        r = m.video_encoder.lora_rank
        av_lora_saved = frames * av_arch.layers * (14 * av_arch.dim + 2 * av_arch.ffn_dim + 4 * r)
    enc_out = (frames * d_v + B * Ta * d_a) * BF16

    # LLM phase
    per_layer = llm.saved_bytes_per_token_layer(masked=True)
    adapter_layer = adapter_saved_bytes_per_token_layer(cfg, llm)
    proj_tokens = sum(B * (Ta // r) for r in m.compression.audio_rates) + sum(B * (Tv // r) for r in m.compression.video_rates)
    proj_saved = proj_tokens * BF16 * (max(d_a, d_v) + hidden + llm.dim)
    mask = rows * s_max * s_max * BF16
    final_norm = tokens * llm.dim * FP32
    # bf16 logits + fp32 log-softmax kept for backward + fp32 upcast (forward) or fp32 gradient (backward)
    logits_peak = logit_positions * llm.vocab * (BF16 + 2 * FP32)
    hidden_grads = 2 * tokens * llm.dim * BF16
    common = enc_out + proj_saved + mask + final_norm + logits_peak + hidden_grads + av_lora_saved
    llm_no_ckpt = tokens * llm.layers * (per_layer + adapter_layer)
    llm_ckpt = tokens * llm.layers * llm.dim * BF16 + tokens * (per_layer + adapter_layer)

    def total(llm_act: int) -> int:
        return sum(v for k, v in static.items() if not k.startswith("trainable")) + trainable_bytes + inputs + max(
            enc_transient + enc_out, common + llm_act)

    return {
        "workload": asdict(w) | {"batch": B, "video_frames_per_utt": Tv, "whisper_frames_per_utt": Ta},
        "llm": llm.name, "audio_encoder": whisper.name, "video_encoder": f"AV-HuBERT-{av_size}",
        "method": m.method, "scales": [s.name for s in scales], "seq_len": seq, "layout": layout,
        "llm_tokens": tokens, "logit_positions": logit_positions, "logits": logits,
        "params": frozen | {"trainable": trainable, "projectors": proj, "adapters_total": adapters["total"],
                            "adapters_active": adapters["active"], "avhubert_lora": av["trainable"]},
        "bytes_per_token_per_layer": {"llama_layer": per_layer, "adapter": adapter_layer},
        "zero_stage": zero_stage, "gpus": gpus,
        "bytes": static | {
            "trainable_used": trainable_bytes, "inputs": inputs, "encoder_transient": enc_transient,
            "encoder_outputs": enc_out, "avhubert_lora_saved": av_lora_saved, "projector_saved": proj_saved,
            "attention_mask": mask, "logits_peak": logits_peak, "hidden_grads": hidden_grads,
            "llm_saved_no_ckpt": llm_no_ckpt, "llm_saved_ckpt": llm_ckpt,
            "total_no_ckpt": total(llm_no_ckpt), "total_ckpt": total(llm_ckpt),
        },
    }


def format_table(results: Sequence[Dict]) -> str:
    head = ("max_frames", "utt_s", "B", "tokens", "weights", "train+opt", "enc peak", "logits", "LLM act",
            "LLM act ckpt", "TOTAL", "TOTAL ckpt")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        b = r["bytes"]
        g = lambda k: f"{b[k] / GiB:.2f}"  # noqa: E731
        lines.append(" | ".join([
            str(r["workload"]["max_frames"]), f"{r['workload']['utt_seconds']:g}", str(r["workload"]["batch"]),
            str(r["llm_tokens"]), g("frozen_weights_bf16"), g("trainable_used"), g("encoder_transient"),
            g("logits_peak"), g("llm_saved_no_ckpt"), g("llm_saved_ckpt"), g("total_no_ckpt"), g("total_ckpt"),
        ]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML over the schema defaults (rates, method, MoME sizes)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--llm", default="llama-3.2-3b", choices=sorted(LLAMAS))
    p.add_argument("--whisper", default="whisper-medium", choices=sorted(WHISPERS))
    p.add_argument("--avhubert", default="large", choices=("base", "large"))
    p.add_argument("--max-frames", type=int, nargs="+", default=[1000, 1500, 2000], help="video frames per GPU batch")
    p.add_argument("--utt-seconds", type=float, nargs="+", default=[3.0, 6.0, 16.0], help="utterance duration")
    p.add_argument("--text-tokens-per-s", type=float, default=3.5, help="transcript tokens per second of speech")
    p.add_argument("--prompt-tokens", type=int, default=8, help="instruction length in tokens")
    p.add_argument("--layout", choices=("concat", "separate"), default="concat",
                   help="concat: scale sequences stacked along the batch, padded to the longest; separate: no padding")
    p.add_argument("--logits", choices=("all", "text"), default="all", help="positions that get lm_head logits")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--zero-stage", type=int, choices=(0, 2), default=2)
    p.add_argument("--overhead-gib", type=float, default=1.0, help="CUDA context + workspaces (assumed)")
    p.add_argument("--json", default="runs/memory_plan.json", help="where to write the full breakdown")
    a = p.parse_args(argv)
    overrides = ["model.tasks=[avsr]", "model.method=mome", "model.video_encoder.type=avhubert",
                 f"model.video_encoder.size={a.avhubert}"] + list(a.overrides)
    try:
        cfg = load_config(a.config, overrides)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    llm, whisper = LLAMAS[a.llm], WHISPERS[a.whisper]
    results = [
        plan(cfg, llm, whisper, Workload(mf, us, a.text_tokens_per_s, a.prompt_tokens), layout=a.layout,
             logits=a.logits, gpus=a.gpus, zero_stage=a.zero_stage, overhead_gib=a.overhead_gib)
        for mf in a.max_frames for us in a.utt_seconds
    ]
    r0 = results[0]
    pr = r0["params"]
    print(f"{r0['llm']} + {r0['audio_encoder']} + {r0['video_encoder']}; method {r0['method']}; "
          f"scales {', '.join(r0['scales'])}; layout {a.layout}; logits on {a.logits} positions")
    print(f"frozen params: LLM {pr['llm'] / 1e6:.1f} M, Whisper enc {pr['whisper_encoder'] / 1e6:.1f} M, "
          f"AV-HuBERT {pr['avhubert'] / 1e6:.1f} M; trainable {pr['trainable'] / 1e6:.2f} M "
          f"(projectors {pr['projectors'] / 1e6:.2f} M, adapters {pr['adapters_total'] / 1e6:.2f} M, "
          f"active {pr['adapters_active'] / 1e6:.2f} M)")
    print(f"saved bytes per token per layer: Llama {r0['bytes_per_token_per_layer']['llama_layer']}, "
          f"adapter {r0['bytes_per_token_per_layer']['adapter']}; "
          f"optimizer: {'ZeRO-2 over %d GPUs' % a.gpus if a.zero_stage == 2 else 'DDP (unsharded)'}")
    print("GiB per GPU:\n")
    print(format_table(results))
    if a.json:
        out = Path(a.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
        print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
