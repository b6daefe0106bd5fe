"""MoE-layer benchmark: the MoME layer (router + routed + shared experts) with each expert backend.

Times ``MoMELayer`` forward (under ``no_grad``) and forward+backward (gradients for the input and every MoME
parameter, as in training with a frozen LLM) for the backends ``loop`` (per-expert reference), ``grouped_mm`` and
``dense`` (our hot path), at the paper shape (d=3072, 23 routed, top-4, 1 shared, b=12, 4096 tokens) and the demo
shape (SmolLM2-135M's d=576 with the ``MoMEConfig`` defaults). Backends are interleaved within every repeat so that
load from other processes hits them alike; the result is the median over repeats after warm-up. Every backend's
output is checked against the loop's.

    python benchmarks/moe_layer.py [--quick] [--repeats N] [--tokens N] [--threads N] [--json out.json]

``benchmark_moe_layer(...)`` returns the same numbers as a dict (for ``benchmarks/run.py``).

Measured on the project's 2-core CPU (Xeon, AVX-512; torch 2.13 fp32) while other jobs kept the load at 7-10, so
absolute times are noisy; ``--threads 1`` suffers least from the oversubscription. Speed-up over the loop,
forward / forward+backward, 4096 tokens, median of 5:

    --threads 1   paper: dense 2.34x / 4.33x, grouped_mm 0.61x / 1.25x   demo: dense 2.04x / 2.44x, grouped_mm 1.17x / 1.20x
    2 threads     paper: dense 11.4x / 8.0x,  grouped_mm 3.2x / 1.9x     demo: dense 7.3x / 12.0x,  grouped_mm 2.5x / 3.5x

(with 2 threads the many small ops of the loop suffer most from the load, hence the larger ratios). ``dense`` was
also fastest with 8 tokens (one decoding step of a beam): paper 5.5x / 6.7x, demo 2.8x / 21x over the loop. Every
backend's output matched the loop's within 6e-8. Hence ``AUTO_BACKEND["cpu"] = "dense"``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mome.config import MoMEConfig  # noqa: E402
from mome.layers.experts import AUTO_BACKEND, BACKENDS  # noqa: E402
from mome.layers.layer import MoMELayer  # noqa: E402

DEMO_HIDDEN = 576  # SmolLM2-135M (the embedded default LLM)


def shapes(tokens: int = 4096) -> List[Dict]:
    c = MoMEConfig()
    return [
        dict(name="paper", dim=3072, num_experts=23, top_k=4, num_shared=1, bottleneck=12, tokens=tokens),
        dict(name="demo", dim=DEMO_HIDDEN, num_experts=c.num_experts, top_k=c.top_k, num_shared=c.num_shared,
             bottleneck=c.bottleneck, tokens=tokens),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def benchmark_moe_layer(shape_list: Optional[Sequence[Dict]] = None, backends: Sequence[str] = ("loop", "grouped_mm", "dense"),
                        repeats: int = 5, warmup: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        seed: int = 0, verbose: bool = True) -> Dict:
    """Median milliseconds per backend and shape; ``speedup_vs_loop`` = loop time / backend time."""
    dev = torch.device(device)
    results: Dict = {"device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "shapes": {},
                     "auto": AUTO_BACKEND.get(dev.type)}
    for shape in shape_list or shapes():
        torch.manual_seed(seed)
        layer = MoMELayer(shape["dim"], shape["num_experts"], shape["top_k"], shape["num_shared"],
                          shape["bottleneck"]).to(dev, dtype)
        with torch.no_grad():  # trained-looking up-projections (fresh ones are zero)
            layer.experts.up.normal_(0, 0.02)
            layer.experts.up_b.normal_(0, 0.02)
        x = torch.randn(1, shape["tokens"], shape["dim"], device=dev, dtype=dtype)
        grad_out = torch.randn_like(x)
        usable = [b for b in backends if b in BACKENDS]

        def fwd(name):
            with torch.no_grad():
                layer(x, backend=name)

        def fwd_bwd(name):
            layer.zero_grad(set_to_none=True)
            xx = x.detach().requires_grad_()
            y, _ = layer(xx, backend=name)
            y.backward(grad_out)

        with torch.no_grad():
            ref = layer(x, backend="loop")[0]
            max_diff = {b: float((layer(x, backend=b)[0] - ref).abs().max()) for b in usable}
        times = {b: {"fwd": [], "fwd_bwd": []} for b in usable}
        for r in range(warmup + repeats):
            for b in usable:
                tf, tb = _time(lambda: fwd(b), dev), _time(lambda: fwd_bwd(b), dev)
                if r >= warmup:
                    times[b]["fwd"].append(tf)
                    times[b]["fwd_bwd"].append(tb)
        rows = {}
        for b in usable:
            rows[b] = {k: statistics.median(v) for k, v in times[b].items()}
            rows[b]["max_abs_diff_vs_loop"] = max_diff[b]
        if "loop" in rows:
            for b in usable:
                rows[b]["speedup_vs_loop"] = {k: rows["loop"][k] / rows[b][k] for k in ("fwd", "fwd_bwd")}
        results["shapes"][shape["name"]] = {"shape": dict(shape), "backends": rows,
                                            "fastest": {k: min(rows, key=lambda b: rows[b][k]) for k in ("fwd", "fwd_bwd")}}
    if verbose:
        print(format_table(results))
    return results


def format_table(results: Dict) -> str:
    lines = [f"MoE layer ({results['device']}, {results['threads']} threads, torch {results['torch']}, "
             f"{results['dtype']}, median of {results['repeats']})",
             f"{'shape':<7} {'backend':<11} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x loop fwd':>10} {'x loop f+b':>10} "
             f"{'max|diff|':>10}"]
    for name, res in results["shapes"].items():
        for b, row in res["backends"].items():
            sp = row.get("speedup_vs_loop", {"fwd": float("nan"), "fwd_bwd": float("nan")})
            lines.append(f"{name:<7} {b:<11} {row['fwd']:9.1f} {row['fwd_bwd']:11.1f} {sp['fwd']:10.2f} "
                         f"{sp['fwd_bwd']:10.2f} {row['max_abs_diff_vs_loop']:10.1e}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="512 tokens, 3 repeats")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="", help="also write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tokens = a.tokens or (512 if a.quick else 4096)
    repeats = a.repeats or (3 if a.quick else 5)
    res = benchmark_moe_layer(shapes(tokens), repeats=repeats, device=a.device)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
