"""Cost breakdown of one training step of the demo config: loader / encode / LLM forward / backward / optimizer.

    python benchmarks/step_cost.py --out benchmarks/step_cost_before.json                     # the demo config
    python benchmarks/step_cost.py --out r.json --case fp32 --case bf16="model.llm.dtype=bfloat16"
    python benchmarks/step_cost.py --out r.json --rounds 4 --batches 3 -- train.precision=auto

Each case is a set of config overrides on ``configs/demo.yaml``; every case builds its own model and optimizer and
runs the same training batches (the first ``--batches`` of the training loader, shuffled with the run's seed). The
cases are interleaved round by round (A/B/A...), so load from other processes hits every case alike; the first
round is a warm-up and is dropped, medians of the rest are reported (``benchmarks/common.py``). The loader time is
measured once, on the loader itself (a worker process reading and transforming media), and is per batch.

Phases: ``encode_audio`` / ``encode_video`` (the encoders), ``forward`` (projection, sequence assembly, LLM forward and the loss),
``backward``, ``optimizer`` (clipping + AdamW step + zero_grad).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import machine_info  # noqa: E402


def build_case(overrides: List[str]):
    from mome.config import load_config
    from mome.models import build_model
    from mome.training.optim import build_optimizer
    from mome.training.precision import apply_precision

    cfg = load_config("configs/demo.yaml", overrides)
    cfg, note = apply_precision(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = build_optimizer(model, cfg.train)
    return cfg, model, opt, note


def timed_step(model, opt, batch) -> Dict[str, float]:
    log: Dict[str, float] = {}
    original = model.encode

    def encode(b, audio, video):
        out = {}
        if audio:
            t0 = time.perf_counter()
            out.update(original(b, True, False))
            log["encode_audio"] = (time.perf_counter() - t0) * 1e3
        if video:
            t0 = time.perf_counter()
            out.update(original(b, False, True))
            log["encode_video"] = (time.perf_counter() - t0) * 1e3
        return out

    model.encode = encode
    try:
        t0 = time.perf_counter()
        loss = model(batch).loss
        t1 = time.perf_counter()
    finally:
        del model.encode
    loss.backward()
    t2 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    log["forward"] = (t1 - t0) * 1e3 - log.get("encode_audio", 0.0) - log.get("encode_video", 0.0)
    log["backward"] = (t2 - t1) * 1e3
    log["optimizer"] = (t3 - t2) * 1e3
    log["total"] = (t3 - t0) * 1e3
    log["loss"] = float(loss.detach())
    return log


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--case", action="append", default=[],
                    help='NAME or NAME="key=value key=value" (default: fp32 and bf16-llm)')
    ap.add_argument("--rounds", type=int, default=3, help="rounds over every case (the first is a warm-up)")
    ap.add_argument("--batches", type=int, default=2, help="training batches per round")
    ap.add_argument("overrides", nargs="*", help="overrides for every case")
    args = ap.parse_args(argv)
    cases = {}
    for spec in args.case or ["fp32=train.precision=fp32", "bf16=train.precision=bf16"]:
        name, _, ov = spec.partition("=")
        cases[name] = ov.split() if ov else []
    from mome.data import build_dataloader

    built = {n: build_case(ov + list(args.overrides)) for n, ov in cases.items()}
    case_batches, loader_ms = {}, []
    for n, (cfg, *_rest) in built.items():  # each case's own loader (data.* may differ; same seed, same order)
        loader = build_dataloader(cfg, "train", train=True)
        t0 = time.perf_counter()
        case_batches[n] = []
        for b in loader:
            loader_ms.append((time.perf_counter() - t0) * 1e3)
            case_batches[n].append(b)
            if len(case_batches[n]) == args.batches:
                break
            t0 = time.perf_counter()
    load = [os.getloadavg()[0]]
    samples: Dict[str, List[Dict[str, float]]] = {n: [] for n in cases}
    names = list(cases)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            _, model, opt, _ = built[n]
            for b in case_batches[n]:
                rec = timed_step(model, opt, b)
                if r > 0:
                    samples[n].append(rec)
        load.append(os.getloadavg()[0])
    result = {"machine": machine_info(), "load_average_1min": load, "batches": args.batches,
              "loader_ms_per_batch": loader_ms, "cases": {}}
    for n in names:
        keys = [k for k in samples[n][0] if k != "loss"]
        med = {k: float(torch.tensor([s[k] for s in samples[n]]).median()) for k in keys}
        result["cases"][n] = {"overrides": cases[n], "precision_note": built[n][3], "median_ms": med,
                              "utterances_per_batch": [len(b["ids"]) for b in case_batches[n]],
                              "samples": samples[n]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(format_table(result))
    return result


def format_table(r: Dict) -> str:
    phases = ["encode_audio", "encode_video", "forward", "backward", "optimizer", "total"]
    ms = r["loader_ms_per_batch"]
    lines = [f"loader {sum(ms) / len(ms):.0f} ms/batch (first batch included), "
             f"load average {', '.join(f'{x:.1f}' for x in r['load_average_1min'])}",
             "| case | utterances/batch | " + " | ".join(phases) + " | ms/utterance |", "|---" * (len(phases) + 3) + "|"]
    for name, c in r["cases"].items():
        m = c["median_ms"]
        n_utt = sum(c["utterances_per_batch"]) / len(c["utterances_per_batch"])
        lines.append(f"| {name} | {n_utt:.1f} | " + " | ".join(f"{m.get(p, 0.0):.0f}" for p in phases)
                     + f" | {m['total'] / n_utt:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
