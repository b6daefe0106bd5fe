"""LLM + MoME vs the frozen LLM alone vs LLM + LoRA (Llama-MTSK MS): prefill and decoding latency on the same inputs.

The three variants share one set of frozen weights (copies of the module tree whose parameters are the same tensors)
and get their adapters exactly as ``AVSRModel`` attaches them: ``mome.adapters.attach_mome_from_config`` (MoME-23/4-MHSA,
``model.mome`` defaults: 23 routed experts, top-4, 1 shared, bottleneck 12, one shared router; expert backend
``auto``) run inside an adapter call that gives them the per-row scale ids, as ``generate`` does, and
``mome.adapters.add_method_lora(..., "mtsk_ms")`` (one PEFT LoRA on q and v, rank d/32). The MoME
up-projections are drawn from N(0, 0.02) (fresh ones are zero) so the module computes what a trained one does.

Inputs: one prompt of ``tokens`` random embeddings (batch 1, no padding), the length of a ``clip_seconds`` clip at
``avsr:4x2`` (media tokens + BOS, 4 markers and the instruction). Prefill = one forward with the KV cache and logits
at the last position only (as ``generate`` does, and as ``mome.evaluation.cost.measure_latency`` times it);
decoding = ``new_tokens`` greedy steps on that cache (cropped back after each run), reported per token.

Target: prefill of LLM + MoME-23/4 <= 1.05 x the frozen LLM.
"""
from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Callable, ContextManager, Dict, Optional, Tuple

import torch
from torch import nn

from mome.adapters import add_method_lora, attach_mome_from_config
from mome.adapters.hf_compat import cache_kwarg, output_cache

from benchmarks.common import (device, llm_label, llm_overrides, paired_ratio, profile_categories, profile_delta,
                               profile_ops, time_interleaved)

VARIANTS = ("frozen", "mome", "lora")
TARGET = 1.05


def load_backbone(spec: Dict, workdir: Path) -> Tuple[nn.Module, object, object]:
    """(frozen LLM on the benchmark device, tokenizer or None, config) for a spec (see ``common.llm_overrides``)."""
    from mome.config import cache_dir, load_config
    from mome.models.backbones import load_llm_backbone

    dev = device()
    dtype = "bfloat16" if dev == "cuda" else "float32"  # bf16 matmul is very slow on CPU
    cfg = load_config(None, llm_overrides(spec, workdir) + [f"model.llm.dtype={dtype}"])
    llm, tok = load_llm_backbone(cfg.model.llm, cache_dir(cfg))
    return llm.to(dev), tok, cfg


def prompt_tokens(clip_seconds: float, tokenizer, audio_rate: int = 4, video_rate: int = 2) -> int:
    """LLM prompt length of an ``avsr`` clip: pooled Whisper (50 Hz) and video (25 fps) tokens, BOS, the four
    modality markers and the instruction (8 tokens when there is no tokenizer)."""
    from mome.config import PromptConfig

    media = int(clip_seconds * 50) // audio_rate + int(clip_seconds * 25) // video_rate
    instr = len(tokenizer(PromptConfig().avsr, add_special_tokens=False).input_ids) if tokenizer is not None else 8
    return media + 1 + 4 + instr


def shared_copy(llm: nn.Module) -> nn.Module:
    """A copy of ``llm``'s module tree that shares every parameter tensor (adapters go on the copy)."""
    return copy.deepcopy(llm, memo={id(p): p for p in llm.parameters()})


Context = Callable[[], ContextManager]


def make_variant(llm: nn.Module, name: str, cfg, num_scales: int, batch: int, tokens: int
                 ) -> Tuple[nn.Module, Context]:
    """(model, the context its LLM calls run in) of one variant; ``llm`` itself stays untouched."""
    dev = next(llm.parameters()).device
    if name == "frozen":
        return llm, contextlib.nullcontext
    model = shared_copy(llm)
    if name == "mome":
        adapters = attach_mome_from_config(model, cfg.model.mome, num_scales=num_scales)
        torch.manual_seed(0)
        with torch.no_grad():
            for m in adapters.modules:
                m.experts.up.normal_(0, 0.02)
                m.experts.up_b.normal_(0, 0.02)
        adapters.modules.eval()
        model._bench_mome = adapters.modules  # keep the modules alive with the model
        return model, lambda: adapters.call(torch.zeros(batch, dtype=torch.long, device=dev))
    if name == "lora":
        add_method_lora(model, "mtsk_ms", cfg.model.lora, num_scales)
        torch.manual_seed(0)
        with torch.no_grad():  # a trained-looking B (PEFT starts it at zero)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        return model.to(dev).eval(), contextlib.nullcontext
    raise ValueError(f"unknown variant '{name}'; choose one of {', '.join(VARIANTS)}")


def prefill_op(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, context: Context) -> Callable[[], object]:
    def op():
        with torch.inference_mode(), context():
            return model(inputs_embeds=x, attention_mask=mask, use_cache=True, logits_to_keep=1)

    return op


def decode_op(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, context: Context, new_tokens: int
              ) -> Callable[[], float]:
    """Greedy steps on a cache prefilled once; returns ms per step (the cache is cropped back after each run)."""
    import time

    with torch.inference_mode(), context():
        out = model(inputs_embeds=x, attention_mask=mask, use_cache=True, logits_to_keep=1)
    cache, first = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    prompt_len = x.shape[1]

    def op() -> float:
        token, m = first, mask
        with torch.inference_mode(), context():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                m = torch.cat([m, m.new_ones(m.shape[0], 1)], dim=1)
                o = model(input_ids=token, attention_mask=m, **{cache_kwarg(model): cache}, use_cache=True,
                          logits_to_keep=1)
                token = o.logits[:, -1].argmax(-1, keepdim=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) * 1e3 / new_tokens
        cache.crop(-(cache.get_seq_length() - prompt_len))  # transformers 5: crop(-n) removes n tokens
        return dt

    return op


def _inputs(llm: nn.Module, batch: int, tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    emb = llm.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, emb.shape[1], generator=g) * float(emb.float().std())
    return x.to(emb.device, emb.dtype), torch.ones(batch, tokens, dtype=torch.long, device=emb.device)


def run(llm_spec: Dict, clip_seconds: float, repeats: int, warmup: int = 1, new_tokens: int = 8, batch: int = 1,
        workdir: Optional[Path] = None, tokens: Optional[int] = None, profile: bool = True,
        verbose: bool = True) -> Dict:
    """Median prefill ms and decode ms/token of the three variants, and their ratios to the frozen LLM (medians of
    per-round ratios).

    With ``profile``: ``torch.profiler`` of one frozen and one MoME prefill; ``profile["mome_added"]`` lists the ops
    whose self time MoME adds (by op and input shapes), ``profile["categories"]`` matmul / attention / other."""
    from mome.scales import all_scales

    workdir = Path(workdir or tempfile.mkdtemp(prefix="mome-bench-"))
    llm, tok, cfg = load_backbone(llm_spec, workdir)
    n_scales = len(all_scales(cfg.model))
    tokens = tokens or prompt_tokens(clip_seconds, tok)
    x, mask = _inputs(llm, batch, tokens)
    variants = {v: make_variant(llm, v, cfg, n_scales, batch, tokens) for v in VARIANTS}
    # outputs of MoME and LoRA differ from the frozen LLM's (non-zero adapters), and LoRA at init equals it
    pre = time_interleaved({v: prefill_op(m, x, mask, ctx) for v, (m, ctx) in variants.items()}, repeats, warmup)
    dec = {}
    if new_tokens > 0:
        dec = time_interleaved({v: decode_op(m, x, mask, ctx, new_tokens) for v, (m, ctx) in variants.items()},
                               repeats, warmup)
    prof = {}
    if profile:
        ops = {v: profile_ops(prefill_op(m, x, mask, kw)) for v, (m, kw) in variants.items() if v != "lora"}
        prof = {"mome_added": profile_delta(ops["frozen"], ops["mome"]),
                "categories": {v: profile_categories(o) for v, o in ops.items()},
                "total_ms": {v: sum(r["self_ms"] for r in o.values()) for v, o in ops.items()}}
    c = llm.config
    res = {
        "llm": llm_label(llm_spec),
        "spec": dict(llm_spec),
        "shape": {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
                  "kv_heads": c.num_key_value_heads, "intermediate": c.intermediate_size, "vocab": c.vocab_size},
        "dtype": str(next(llm.parameters()).dtype).replace("torch.", ""),
        "batch": batch,
        "tokens": tokens,
        "clip_seconds": clip_seconds,
        "new_tokens": new_tokens,
        "prefill": pre,
        "decode_per_token": dec,
        "prefill_ratio": {v: paired_ratio(pre[v]["samples_ms"], pre["frozen"]["samples_ms"]) for v in VARIANTS},
        "decode_ratio": ({v: paired_ratio(dec[v]["samples_ms"], dec["frozen"]["samples_ms"]) for v in VARIANTS}
                         if dec else {}),
        "target": {"what": "prefill(LLM+MoME) / prefill(frozen LLM)", "max": TARGET},
        "profile": prof,
        "mome_flops_fraction": mome_flops_fraction(c, cfg.model.mome),
    }
    res["target"]["value"] = res["prefill_ratio"]["mome"]
    res["target"]["met"] = res["prefill_ratio"]["mome"] <= TARGET
    if verbose:
        print(format_table([res]))
    return res


def mome_flops_fraction(config, mome_cfg) -> Dict[str, float]:
    """MoME FLOPs per token as a fraction of the frozen decoder layer's linear FLOPs: ``dense`` (what the dense
    backend computes: router + every expert's down and up projection) and ``active`` (router + top-k + shared)."""
    from mome.evaluation.cost import LLMShape

    shape = LLMShape.from_hf_config(config)
    layer = shape.linear_flops_per_token() / shape.layers
    d, e, s, b, k = shape.hidden, mome_cfg.num_experts, mome_cfg.num_shared, mome_cfg.bottleneck, mome_cfg.top_k
    dense = 2 * d * (e + (e + s) * b) + 2 * ((e + s) * (b + 1)) * d
    active = 2 * d * e + (k + s) * 4 * d * b
    return {"dense": dense / layer, "active": active / layer}


def format_profile(r: Dict) -> str:
    p = r.get("profile") or {}
    if not p:
        return ""
    t = p["total_ms"]
    lines = [f"  profile [{r['llm']}]: one prefill, self time frozen {t['frozen']:.1f} ms, mome {t['mome']:.1f} ms; "
             f"MoME FLOPs / layer linear FLOPs: dense backend {100 * r['mome_flops_fraction']['dense']:.1f}%, "
             f"active experts only {100 * r['mome_flops_fraction']['active']:.1f}%; ops MoME adds:"]
    for row in p["mome_added"]:
        lines.append(f"    {row['op']:<26} {row['shapes'][:58]:<58} {row['calls']:>5.0f} calls "
                     f"{row['delta_ms']:>+8.2f} ms")
    return "\n".join(lines)


def format_table(results) -> str:
    lines = [f"{'LLM':<32} {'tok':>4} {'variant':<7} {'prefill ms':>10} {'x frozen':>8} {'decode ms/tok':>13} "
             f"{'x frozen':>8}"]
    for r in results:
        for v in VARIANTS:
            d = r["decode_per_token"].get(v)
            lines.append(f"{r['llm']:<32} {r['tokens']:>4} {v:<7} {r['prefill'][v]['median_ms']:>10.1f} "
                         f"{r['prefill_ratio'][v]:>8.3f} {d['median_ms'] if d else float('nan'):>13.1f} "
                         f"{r['decode_ratio'].get(v, float('nan')):>8.3f}")
    lines += [format_profile(r) for r in results if r.get("profile")]
    return "\n".join(lines)


def memory_case(case: str, params: Dict) -> Callable[[], object]:
    """One variant's prefill (``params``: ``llm`` spec, ``clip_seconds`` or ``tokens``, ``workdir``)."""
    from mome.scales import all_scales

    workdir = Path(params.get("workdir") or tempfile.mkdtemp(prefix="mome-bench-"))
    llm, tok, cfg = load_backbone(params["llm"], workdir)
    tokens = int(params.get("tokens") or prompt_tokens(float(params["clip_seconds"]), tok))
    x, mask = _inputs(llm, 1, tokens)
    model, ctx = make_variant(llm, case, cfg, len(all_scales(cfg.model)), 1, tokens)
    return prefill_op(model, x, mask, ctx)
