"""MoME benchmarks, side by side in one run: one table, one JSON file, every ratio against its target.

    python benchmarks/run.py --out results.json            # full: < 10 min on the 2-core CPU
    python benchmarks/run.py --out results.json --quick    # smaller shapes: < 2 min
    python benchmarks/run.py --out r.json --only llm,step  # some sections (moe, llm, step, elastic, whisper, memory)

Sections (each in its own module beside this file; medians over interleaved repeats after warm-up):

1. ``moe``: the MoE layer, our hot path vs the per-expert loop vs the other backends (``benchmarks/moe_layer.py``).
2. ``llm``: prefill (and decoding) latency of the frozen LLM alone, LLM + MoME-23/4, LLM + LoRA (MTSK-MS) on the same
   inputs, for SmolLM2-135M and a Llama-3.2-1B-shaped random model (``llm_overhead.py``).
3. ``step``: one Matryoshka training step over the 4 rate pairs vs 4 single-pair steps (``matryoshka_step.py``).
4. ``elastic``: prefill / generation latency per rate pair vs its token count (``elastic.py``).
5. ``whisper``: Whisper encoder on cropped short clips vs the 30 s padded encoder: speed, features, judge WER
   (``whisper_crop.py``).
6. ``memory``: peak memory of every configuration above, one fresh process each (``memory.py``).

Sizes per mode are in ``PLANS`` (``full``, ``quick``) and ``tiny_plan`` (the test's tiny backbones). Before torch is
imported, ``OMP_WAIT_POLICY`` is set to ``PASSIVE`` unless already set (see ``benchmarks/common.py``: on a shared
CPU the default spinning makes torch up to 10x slower). Results and the machine: ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (libgomp reads it once)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional, Sequence  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import load_average, machine_info, run_json_subprocess  # noqa: E402

SECTIONS = ("moe", "llm", "step", "elastic", "whisper", "memory")
SMOLLM = {"name": "smollm2-135m", "label": "SmolLM2-135M"}
LLAMA_1B = {"name": "meta-llama/Llama-3.2-1B", "label": "Llama-3.2-1B-shaped", "random_init": True}

PLANS: Dict[str, Dict] = {
    "full": {
        "moe": {"tokens": 4096, "repeats": 5},
        "llm": {"llms": [SMOLLM, dict(LLAMA_1B, layers=4)], "clip_seconds": 6.0, "repeats": 5, "new_tokens": 8},
        "step": {"spec": {"llm": SMOLLM}, "lengths": [60, 50], "repeats": 3, "diagnostics": ["packed"]},
        "elastic": {"spec": {"llm": SMOLLM}, "clip_seconds": 10.0, "repeats": 3, "new_tokens": 8},
        "whisper": {"synth_num": 240, "max_utterances": 16, "short_variant_utterances": 4, "speed_clips": 3,
                    "repeats": 3},
        "memory": {"jobs": 3, "moe_shapes": ["paper"], "moe_backends": ["loop", "dense"], "llm_count": 1,
                   "elastic_scales": ["avsr:4x2", "avsr:16x5"]},
    },
    "quick": {
        "moe": {"tokens": 512, "repeats": 2},
        "llm": {"llms": [dict(SMOLLM, layers=4, random_init=True), dict(LLAMA_1B, layers=1)], "clip_seconds": 4.0,
                "repeats": 3, "new_tokens": 2},
        "step": {"spec": {"llm": dict(SMOLLM, layers=4, random_init=True)}, "lengths": [40, 30], "repeats": 2,
                 "diagnostics": ["packed"]},
        "elastic": {"spec": {"llm": dict(SMOLLM, layers=4, random_init=True)}, "clip_seconds": 4.0, "repeats": 2,
                    "new_tokens": 2},
        "whisper": {"synth_num": 40, "max_utterances": 2, "short_variant_utterances": 0, "speed_clips": 1,
                    "repeats": 2},
        "memory": {"jobs": 3, "cases": [("llm_overhead", "frozen"), ("llm_overhead", "mome"),
                                        ("matryoshka_step", "matryoshka")],
                   "moe_shapes": ["demo"], "llm_count": 1, "elastic_scales": []},
    },
}

TINY_OVERRIDES = ["model.video_encoder.channels=4", "model.video_encoder.dim=16",
                  "model.video_encoder.temporal_layers=1", "model.projector.hidden=32", "model.mome.num_experts=4", "model.mome.top_k=2",
                  "model.mome.bottleneck=4", "model.lora.reduction=8"]


def tiny_plan(folder: Path, corpus_root: Optional[str] = None, synth_num: int = 16, data_overrides=()) -> Dict:
    """Every section on the tiny random backbones of ``mome.models.tiny`` (for the test): seconds, not minutes.
    The Whisper section still needs the real judge (``whisper-tiny.en`` from the cache) and a corpus
    (``corpus_root`` with ``data_overrides`` naming its synth settings)."""
    from mome.models.tiny import write_tiny_backbones

    llm_dir, whisper_dir = write_tiny_backbones(folder)
    llm = {"name": str(llm_dir), "label": "tiny-llama", "random_init": True}
    spec = {"llm": llm, "audio_encoder": str(whisper_dir), "audio_random_init": True, "overrides": TINY_OVERRIDES}
    return {
        "moe": {"shapes": [dict(name="tiny", dim=64, num_experts=8, top_k=2, num_shared=1, bottleneck=4, tokens=64)],
                "repeats": 1},
        "llm": {"llms": [llm], "clip_seconds": 1.0, "repeats": 1, "new_tokens": 2},
        "step": {"spec": spec, "lengths": [8, 6], "repeats": 1, "diagnostics": ["packed"]},
        "elastic": {"spec": spec, "clip_seconds": 1.0, "repeats": 1, "new_tokens": 2},
        "whisper": {"synth_num": synth_num, "data_root": corpus_root, "data_overrides": list(data_overrides),
                    "max_utterances": 1,
                    "short_variant_utterances": 0, "speed_clips": 1, "repeats": 1, "max_new_tokens": 12},
        "memory": {"cases": [("moe_layer", "dense")]},
    }


# ----------------------------------------------------------------------------------------------------------------
# sections


def section_moe(p: Dict, workdir: Path) -> Dict:
    from benchmarks.moe_layer import benchmark_moe_layer, shapes

    res = benchmark_moe_layer(p.get("shapes") or shapes(p["tokens"]), repeats=p["repeats"], verbose=False)
    auto = res.get("auto") or "dense"
    dev = res["device"].split(":")[0]
    need = 4.0 if dev == "cuda" else 1.5
    targets = []
    for name, sh in res["shapes"].items():
        row = sh["backends"].get(auto)
        if row is None or "speedup_vs_loop" not in row:
            continue
        for k in ("fwd", "fwd_bwd"):
            v = row["speedup_vs_loop"][k]
            targets.append({"what": f"MoE layer {name} {k}: loop / {auto} ({dev})", "min": need, "value": v,
                            "met": v >= need})
        diff = row["max_abs_diff_vs_loop"]
        targets.append({"what": f"MoE layer {name}: max |{auto} - loop|", "max": 1e-3, "value": diff,
                         "met": diff <= 1e-3})
    res["targets"] = targets
    return res


def section_llm(p: Dict, workdir: Path) -> Dict:
    from benchmarks import llm_overhead

    runs = [llm_overhead.run(spec, p["clip_seconds"], p["repeats"], new_tokens=p["new_tokens"], workdir=workdir,
                             verbose=False) for spec in p["llms"]]
    targets = [dict(r["target"], what=f"{r['target']['what']} [{r['llm']}, {r['tokens']} tokens]") for r in runs]
    return {"runs": runs, "targets": targets}


def section_step(p: Dict, workdir: Path) -> Dict:
    from benchmarks import matryoshka_step

    r = matryoshka_step.run(p["spec"], p["lengths"], p["repeats"], workdir=workdir,
                            diagnostics=p.get("diagnostics", matryoshka_step.DIAGNOSTICS), verbose=False)
    r["targets"] = [dict(r["target"], what=f"{r['target']['what']} [{r['model']}]")]
    return r


def section_elastic(p: Dict, workdir: Path) -> Dict:
    from benchmarks import elastic

    r = elastic.run(p["spec"], p["clip_seconds"], p["repeats"], new_tokens=p["new_tokens"], workdir=workdir,
                    verbose=False)
    r["targets"] = [dict(r["target"], what=f"{r['target']['what']} [{r['model']}]")]
    return r


def section_whisper(p: Dict, workdir: Path) -> Dict:
    from benchmarks import whisper_crop

    r = whisper_crop.run(p["synth_num"], p["max_utterances"], p["repeats"], speed_clips=p["speed_clips"],
                         data_root=p.get("data_root"), max_new_tokens=p.get("max_new_tokens", 40),
                         short_variant_utterances=p["short_variant_utterances"],
                         data_overrides=p.get("data_overrides", ()), verbose=False)
    w = r["wer"]
    r["targets"] = [{"what": "judge WER: crop+tail - 30s (is the crop free?)", "max": 0.02,
                     "value": w["crop+tail"]["wer"] - w["30s"]["wer"],
                     "met": w["crop+tail"]["wer"] - w["30s"]["wer"] <= 0.02}]
    return r


def memory_cases(plan: Dict, workdir: Path) -> List[Dict]:
    """(section, case, params, label) of every configuration measured above (or the plan's explicit list)."""
    from benchmarks.moe_layer import shapes

    from benchmarks.common import llm_label

    mem = plan["memory"]
    out = []
    explicit = mem.get("cases")
    want = (lambda s, c: (s, c) in explicit) if explicit else (lambda s, c: True)
    moe_shapes = plan["moe"].get("shapes") or [s for s in shapes(plan["moe"]["tokens"])
                                                if s["name"] in mem.get("moe_shapes", ())]
    for sh in moe_shapes:
        for b in mem.get("moe_backends", ("loop", "grouped_mm", "dense")):
            if want("moe_layer", b):
                out.append({"section": "moe_layer", "case": b, "params": sh,
                            "label": f"MoE layer {sh['name']} fwd+bwd"})
    for spec in plan["llm"]["llms"][: mem.get("llm_count")]:
        for v in ("frozen", "mome", "lora"):
            if want("llm_overhead", v):
                out.append({"section": "llm_overhead", "case": v,
                            "params": {"llm": spec, "clip_seconds": plan["llm"]["clip_seconds"],
                                       "workdir": str(workdir)},
                            "label": f"prefill {llm_label(spec)}"})
    for c in ("matryoshka", "singles"):
        if want("matryoshka_step", c):
            out.append({"section": "matryoshka_step", "case": c,
                        "params": {"spec": plan["step"]["spec"], "lengths": plan["step"]["lengths"],
                                   "workdir": str(workdir)}, "label": "training step"})
    scales = mem.get("elastic_scales", "all")
    if scales == "all":
        scales = ["avsr:4x2", "avsr:4x5", "avsr:16x2", "avsr:16x5"]
    for s in scales or ():
        if want("elastic", s):
            out.append({"section": "elastic", "case": s,
                        "params": {"spec": plan["elastic"]["spec"], "clip_seconds": plan["elastic"]["clip_seconds"],
                                   "new_tokens": plan["elastic"]["new_tokens"], "workdir": str(workdir)},
                        "label": f"inference {plan['elastic']['clip_seconds']:g} s clip"})
    for c in ("crop", "30s"):
        if want("whisper_crop", c):
            out.append({"section": "whisper_crop", "case": c,
                        "params": {"synth_num": plan["whisper"]["synth_num"],
                                   "data_root": plan["whisper"].get("data_root"),
                                   "data_overrides": plan["whisper"].get("data_overrides", [])},
                        "label": "Whisper encoder, 1 test clip"})
    return out


def section_memory(plan: Dict, workdir: Path, timeout: float = 300) -> Dict:
    """Every configuration in its own fresh process; ``jobs`` processes at a time (a process's peak RSS does not
    depend on what runs beside it; only the wall time does)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(c):
        t0 = time.perf_counter()
        try:
            r = run_json_subprocess(["benchmarks/memory.py", "--section", c["section"], "--case", c["case"],
                                     "--params", json.dumps(c["params"])], timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - one failed configuration is reported, the others still run
            r = {"section": c["section"], "case": c["case"], "error": str(exc)}
        r["label"] = c["label"]
        r["seconds"] = time.perf_counter() - t0
        return r

    with ThreadPoolExecutor(max_workers=max(1, int(plan["memory"].get("jobs", 2)))) as pool:
        rows = list(pool.map(one, memory_cases(plan, workdir)))
    return {"rows": rows, "jobs": plan["memory"].get("jobs", 2), "targets": []}


RUNNERS = {"moe": section_moe, "llm": section_llm, "step": section_step, "elastic": section_elastic,
           "whisper": section_whisper, "memory": section_memory}


# ----------------------------------------------------------------------------------------------------------------
# report


def format_report(results: Dict) -> str:
    from benchmarks import elastic, llm_overhead, matryoshka_step, whisper_crop
    from benchmarks.moe_layer import format_table as moe_table

    m = results["machine"]
    s = results["sections"]
    out = [f"== MoME benchmarks ({results['plan']}) on {m['cpu']} ({m['usable_cpus']} cpus, {m['torch_threads']} "
           f"threads, OMP_WAIT_POLICY={m['omp_wait_policy']}), torch {m['torch']}"
           + (f", GPU {m['cuda']['device']}" if m.get("cuda") else ", no GPU")]
    for name, sec in s.items():
        load = sec.get("load_average")
        head = f"-- [{name}] {sec.get('seconds', 0):.0f} s, load average {load[0] if load else '?'} -> " \
               f"{load[1] if load else '?'}"
        out.append(head)
        if "error" in sec:
            out.append(f"   FAILED: {sec['error']}")
            continue
        if name == "moe":
            out.append(moe_table(sec))
        elif name == "llm":
            out.append(llm_overhead.format_table(sec["runs"]))
        elif name == "step":
            out.append(matryoshka_step.format_table(sec))
        elif name == "elastic":
            out.append(elastic.format_table(sec))
        elif name == "whisper":
            out.append(whisper_crop.format_table(sec))
        elif name == "memory":
            out.append(format_memory(sec["rows"]))
    out.append("-- targets")
    for t in results["targets"]:
        bound = f"<= {t['max']:g}" if "max" in t else f">= {t['min']:g}"
        out.append(f"   {'MET ' if t['met'] else 'MISS'} {t['what']}: {t['value']:.3g} (target {bound})")
    return "\n".join(out)


def format_memory(rows: List[Dict]) -> str:
    lines = [f"{'configuration':<44} {'case':<12} {'peak MiB':>9} {'delta MiB':>9}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['label']:<44} {r['case']:<12} FAILED: {r['error'][:80]}")
            continue
        peak = r.get("peak_rss_mib", r.get("peak_allocated_mib"))
        lines.append(f"{r['label']:<44} {r['case']:<12} {peak:>9.0f} {r['delta_mib']:>9.1f}")
    return "\n".join(lines)


def run_all(plan_name: str, plan: Dict, only: Sequence[str] = SECTIONS, out: Optional[Path] = None,
            verbose: bool = True, workdir: Optional[Path] = None) -> Dict:
    """Run the sections in ``only`` with the sizes of ``plan``; print the report and write ``out`` (JSON)."""
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    t_start = time.perf_counter()
    results = {"plan": plan_name, "sizes": plan, "machine": machine_info(), "sections": {}, "targets": []}
    with tempfile.TemporaryDirectory(prefix="mome-bench-") as tmp:
        wd = Path(workdir or tmp)
        for name in SECTIONS:
            if name not in only:
                continue
            if verbose:
                print(f"[bench] {name} ...", flush=True)
            load0, t0 = load_average(), time.perf_counter()
            try:
                sec = RUNNERS[name](plan if name == "memory" else plan[name], wd)
            except Exception as exc:  # noqa: BLE001 - a failed section is reported; the others still run
                sec = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(), "targets": []}
            sec["seconds"] = time.perf_counter() - t0
            load1 = load_average()
            sec["load_average"] = [load0[0] if load0 else None, load1[0] if load1 else None]
            results["sections"][name] = sec
            results["targets"] += [dict(t, section=name) for t in sec.get("targets", [])]
            if verbose:
                print(f"[bench] {name}: {sec['seconds']:.0f} s", flush=True)
    results["seconds"] = time.perf_counter() - t_start
    results["machine"]["load_average_end"] = load_average()
    report = format_report(results)
    results["report"] = report
    if verbose:
        print(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))
        if verbose:
            print(f"[bench] wrote {out} ({results['seconds']:.0f} s in all)")
    return results


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--quick", action="store_true", help="smaller shapes (< 2 min on the 2-core CPU)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    name = "quick" if a.quick else "full"
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    res = run_all(name, copy.deepcopy(PLANS[name]), only, Path(a.out))
    failed = [n for n, s in res["sections"].items() if "error" in s]
    if failed:
        print(f"[bench] sections failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
