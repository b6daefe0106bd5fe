"""Elastic inference: prefill and generation latency per rate pair against its LLM token count.

One model (the demo config's MoME model with the spec's LLM), one synthetic clip of ``clip_seconds``
(``mome.evaluation.cost.synthetic_clip``), batch 1. Per scale: the exact prompt length
(``cost.llm_input_tokens``) and ``cost.measure_latency`` (encode, prefill with logits at the last position, greedy
decoding ms per token with the KV cache), called once per scale per round with the scales interleaved (each call
warms up once and times one run). Generation latency = prefill + ``new_tokens`` x decode per token. Ratios between
two scales are medians of per-round ratios.

A least-squares line ``prefill_ms = fixed + per_token x tokens`` over the scales shows how much of the prefill does
not shrink with the token count.

Target: the prefill latency ratio between (4,2) and (16,5) within 1.2 x of their token ratio.
"""
from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from benchmarks.common import (copy_bandwidth_gbs, llm_label, load_average, paired_ratio, profile_categories,
                               profile_ops)
from benchmarks.matryoshka_step import build

TARGET = 1.2


def _fit(xs, ys) -> Dict[str, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return {"fixed_ms": my - slope * mx, "ms_per_token": slope}


def run(spec: Dict, clip_seconds: float, repeats: int, new_tokens: int = 8, workdir: Optional[Path] = None,
        verbose: bool = True) -> Dict:
    from mome.evaluation.cost import llm_input_tokens, measure_latency, synthetic_clip

    workdir = Path(workdir or tempfile.mkdtemp(prefix="mome-bench-"))
    cfg, model = build(spec, workdir)
    model.eval()
    batch = synthetic_clip(clip_seconds)
    scales = list(model.scales)
    tokens = {s.name: llm_input_tokens(model, batch, s) for s in scales}
    samples: Dict[str, Dict[str, list]] = {s.name: {} for s in scales}
    for r in range(repeats):
        k = r % len(scales)
        for s in scales[k:] + scales[:k]:
            m = measure_latency(model, batch, s, repeats=1, new_tokens=new_tokens)
            for key, v in m.items():
                if v is not None:
                    samples[s.name].setdefault(key, []).append(v)
    rows = {}
    for s in scales:
        med = {k: statistics.median(v) for k, v in samples[s.name].items()}
        med["generate_ms"] = med["prefill_ms"] + new_tokens * med.get("decode_ms_per_token", 0.0)
        rows[s.name] = {"tokens": tokens[s.name], **med, "samples": samples[s.name]}
    names = [s.name for s in scales]
    big, small = _pair(names)
    tok_ratio = tokens[big] / tokens[small]
    pre_ratio = paired_ratio(samples[big]["prefill_ms"], samples[small]["prefill_ms"])
    gen = {n: [p + new_tokens * d for p, d in zip(samples[n]["prefill_ms"], samples[n].get("decode_ms_per_token",
                                                                                       [0.0] * repeats))]
           for n in (big, small)}
    gen_ratio = paired_ratio(gen[big], gen[small])
    prof = {}
    for name in (big, small):
        with torch.inference_mode():
            inputs = model.build_inputs(batch, [next(s for s in scales if s.name == name)], with_transcripts=False)

        def prefill(inputs=inputs):
            with torch.inference_mode(), model.adapter_call(inputs):
                model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, use_cache=True,
                          logits_to_keep=1)

        prof[name] = profile_categories(profile_ops(prefill))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    weight_bytes += sum(p.numel() * p.element_size() for p in model.mome.parameters()) if model.mome else 0
    bw = copy_bandwidth_gbs()
    res = {
        "model": llm_label(spec["llm"]),
        "spec": spec,
        "clip_seconds": clip_seconds,
        "new_tokens": new_tokens,
        "rows": rows,
        "pair": [big, small],
        "token_ratio": tok_ratio,
        "prefill_ratio": pre_ratio,
        "generate_ratio": gen_ratio,
        "prefill_fit": _fit([tokens[n] for n in names], [rows[n]["prefill_ms"] for n in names]),
        "profile_ms": prof,
        "matmul_ratio": prof[big]["matmul"] / prof[small]["matmul"],
        "llm_weight_mb": weight_bytes / 1e6,
        "copy_bandwidth_gbs": bw,
        "weight_stream_ms": weight_bytes / (bw * 1e9) * 1e3,
        "load_average_end": load_average(),
        "target": {"what": f"prefill ratio {big} / {small} vs token ratio (within x{TARGET})", "max": TARGET,
                   "value": max(pre_ratio / tok_ratio, tok_ratio / pre_ratio),
                   "met": abs(math.log(pre_ratio / tok_ratio)) <= math.log(TARGET)},
    }
    if verbose:
        print(format_table(res))
    return res


def _pair(names):
    """(most tokens, fewest tokens) scale names: avsr:4x2 and avsr:16x5 in the demo config."""
    want = ("avsr:4x2", "avsr:16x5")
    if all(w in names for w in want):
        return want
    return names[0], names[-1]


def format_table(r: Dict) -> str:
    lines = [f"{'scale (' + r['model'] + ', ' + str(r['clip_seconds']) + ' s clip)':<40} {'tokens':>6} "
             f"{'encode ms':>9} {'prefill ms':>10} {'decode ms/tok':>13} {'generate ms':>11}"]
    for name, row in r["rows"].items():
        lines.append(f"{name:<40} {row['tokens']:>6} {row['encode_ms']:>9.1f} {row['prefill_ms']:>10.1f} "
                     f"{row.get('decode_ms_per_token', float('nan')):>13.1f} {row['generate_ms']:>11.1f}")
    big, small = r["pair"]
    f = r["prefill_fit"]
    lines.append(f"{big} / {small}: tokens x{r['token_ratio']:.2f}, prefill x{r['prefill_ratio']:.2f}, "
                 f"generate (+{r['new_tokens']} tokens) x{r['generate_ratio']:.2f}; prefill ~ "
                 f"{f['fixed_ms']:.0f} ms + {f['ms_per_token']:.2f} ms/token")
    pb, ps = r["profile_ms"][big], r["profile_ms"][small]
    lines.append(f"profile (self ms, one prefill): {big} matmul {pb['matmul']:.0f} / attention {pb['attention']:.0f} / "
                 f"other {pb['other']:.0f}; {small} {ps['matmul']:.0f} / {ps['attention']:.0f} / {ps['other']:.0f} "
                 f"(matmul x{r['matmul_ratio']:.2f}); LLM+MoME weights {r['llm_weight_mb']:.0f} MB, copy bandwidth "
                 f"{r['copy_bandwidth_gbs']:.1f} GB/s: streaming them once takes >= {r['weight_stream_ms']:.0f} ms")
    return "\n".join(lines)


def memory_case(case: str, params: Dict) -> Callable[[], None]:
    """``case`` = scale name: its prefill plus ``new_tokens`` greedy steps (``cost.measure_latency``, 1 run)."""
    from mome.evaluation.cost import measure_latency, synthetic_clip
    from mome.scales import Scale

    cfg, model = build(params["spec"], params.get("workdir"))
    model.eval()
    batch = synthetic_clip(float(params["clip_seconds"]))
    scale = Scale.parse(case)

    def op():
        with torch.inference_mode():
            measure_latency(model, batch, scale, repeats=1, new_tokens=int(params.get("new_tokens", 8)))

    return op
