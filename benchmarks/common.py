"""Shared pieces of the benchmarks: interleaved timing with medians, the machine and its load, backbones, sizes.

Timing (``time_interleaved``): every case of a comparison runs once per round, in an order rotated each round, so
that load from other processes hits all cases alike; the first ``warmup`` rounds are dropped and the median of the
rest is reported (with min, max and every sample). Ratios between cases are medians of per-round ratios
(``paired_ratio``). On CUDA each call is bracketed by ``torch.cuda.synchronize``.

Contention. On a shared CPU, libgomp's default ``OMP_WAIT_POLICY`` (active spinning) makes torch's 2 threads spin
against other processes' threads: measured here with ~8 runnable processes on 2 cores, a SmolLM2-135M prefill took
10 s with the default policy and 0.8 s with ``OMP_WAIT_POLICY=PASSIVE`` (1 thread: 0.9 s). ``benchmarks/run.py``
therefore sets ``PASSIVE`` before torch is imported unless the variable is already set; the value is recorded in
the machine info.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# timing


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def summarize(samples_ms: Sequence[float]) -> Dict:
    xs = list(samples_ms)
    return {
        "median_ms": statistics.median(xs),
        "min_ms": min(xs),
        "max_ms": max(xs),
        "n": len(xs),
        "samples_ms": [round(x, 3) for x in xs],
    }


def time_interleaved(cases: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, Dict]:
    """Milliseconds per case (``summarize``), cases interleaved within each round (see the module docstring).

    A case that returns a float reports its own time in ms (e.g. per decoding step, without its set-up); otherwise
    the wall time of the call is used."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(cases)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync()
            t0 = time.perf_counter()
            result = cases[name]()
            _sync()
            dt = result if isinstance(result, float) else (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                samples[name].append(dt)
    return {n: summarize(v) for n, v in samples.items()}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``: cases timed in the same round saw the same load, so the per-round
    ratio is steadier than a ratio of medians when the load of other processes changes between rounds."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio needs two equally long, non-empty sample lists ({len(num)}, {len(den)})")
    return statistics.median(a / b for a, b in zip(num, den))


# ----------------------------------------------------------------------------------------------------------------
# the machine


def load_average() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> List[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    flags = set(m.group(1).split()) if m else set()
    return sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                            "amx_int8", "amx_tile", "avx_vnni"))


def _git() -> Dict:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": run("rev-parse", "HEAD"), "dirty_files": len(run("status", "--porcelain").splitlines())}


def machine_info() -> Dict:
    import psutil
    import torch
    import transformers

    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp default, active)"),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "cuda": None,
        "load_average_start": load_average(),
        "git": _git(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["cuda"] = {"device": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                        "cuda": torch.version.cuda, "count": torch.cuda.device_count()}
    return info


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------------------------
# backbones of a given shape


def shaped_llm_folder(name: str, out_dir: Path, layers: Optional[int] = None, cache_dir=None) -> Path:
    """A folder with the architecture of backbone ``name`` (``config.json``, with ``num_hidden_layers`` replaced by
    ``layers`` when given) and its tokenizer files when it has any; build it with ``model.llm.random_init=true``."""
    from mome.models.backbones import architecture_folder

    src = architecture_folder(name, cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        config["num_hidden_layers"] = int(layers)
        for key in ("layer_types",):  # per-layer lists must match the new depth
            if isinstance(config.get(key), list):
                config[key] = config[key][:layers]
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    tok_src = src
    if not (src / "tokenizer_config.json").is_file():
        from mome.pretrained import REGISTRY, resolve

        if name in REGISTRY:  # a shipped architecture without tokenizer: take it from the converted model
            tok_src = Path(resolve(name, cache_dir=cache_dir))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "chat_template.jinja", "generation_config.json"):
        if (tok_src / f).is_file():
            shutil.copy(tok_src / f, out_dir / f)
    return out_dir


def llm_overrides(spec: Dict, workdir: Path, cache_dir=None) -> List[str]:
    """Config overrides that load the LLM of a benchmark spec ``{"name", "layers" (None = as shipped),
    "random_init"}`` (a truncated or random model goes through a shaped folder in ``workdir``)."""
    name, layers = spec["name"], spec.get("layers")
    if layers is None and not spec.get("random_init"):
        return [f"model.llm.name={name}", "model.llm.random_init=false"]
    folder = shaped_llm_folder(name, workdir / f"{Path(name).name}-{layers or 'all'}L", layers, cache_dir)
    return [f"model.llm.name={folder}", "model.llm.random_init=true"]


def llm_label(spec: Dict) -> str:
    label = spec.get("label") or Path(spec["name"]).name
    if spec.get("layers") is not None:
        label += f" ({spec['layers']} layers)"
    if spec.get("random_init"):
        label += " random"
    return label


def run_json_subprocess(args: Sequence[str], timeout: float) -> Dict:
    """Run ``python <args>`` from the repository root; parse the last stdout line as JSON."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"python {' '.join(args)} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------------------
# profiles


def profile_ops(fn: Callable[[], object], runs: int = 2) -> Dict[str, Dict]:
    """``torch.profiler`` self CPU (and CUDA) time per (op, input shapes), in ms per run of ``fn`` (after one
    unprofiled warm-up call)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(runs):
            fn()
        _sync()
    out: Dict[str, Dict] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        key = f"{e.key} {e.input_shapes}" if e.input_shapes else e.key
        dev_us = getattr(e, "self_device_time_total", 0) or 0
        out[key] = {"op": e.key, "shapes": str(e.input_shapes), "calls": e.count / runs,
                    "self_ms": (e.self_cpu_time_total + dev_us) / 1e3 / runs}
    return out


def profile_delta(base: Dict[str, Dict], other: Dict[str, Dict], top: int = 8) -> List[Dict]:
    """The ops whose self time grows most from ``base`` to ``other`` (both from ``profile_ops``)."""
    rows = []
    for key in set(base) | set(other):
        b, o = base.get(key, {}), other.get(key, {})
        ref = o or b
        rows.append({"op": ref["op"], "shapes": ref["shapes"], "base_ms": b.get("self_ms", 0.0),
                     "other_ms": o.get("self_ms", 0.0), "delta_ms": o.get("self_ms", 0.0) - b.get("self_ms", 0.0),
                     "calls": o.get("calls", b.get("calls", 0))})
    rows.sort(key=lambda r: -r["delta_ms"])
    return rows[:top]


def profile_categories(ops: Dict[str, Dict]) -> Dict[str, float]:
    """Self time per category: ``matmul`` (mm/addmm/bmm/linear), ``attention`` (SDPA kernels), ``other``."""
    cats = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for row in ops.values():
        op = row["op"]
        if op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul"):
            cats["matmul"] += row["self_ms"]
        elif "scaled_dot_product" in op or "attention" in op:
            cats["attention"] += row["self_ms"]
        else:
            cats["other"] += row["self_ms"]
    return cats


def copy_bandwidth_gbs(mib: int = 128, repeats: int = 3) -> float:
    """Memory bandwidth seen by one copy (read + write bytes per second, best of ``repeats``), in GB/s."""
    import torch

    a = torch.empty(mib * 2**20 // 4, device=device()).fill_(1.0)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync()
        t0 = time.perf_counter()
        b.copy_(a)
        _sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9
