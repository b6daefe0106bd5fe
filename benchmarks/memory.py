"""Peak memory of one benchmark configuration, measured in a fresh process (one process per configuration).

    python benchmarks/memory.py --section llm_overhead --case mome --params '{"llm": {...}, ...}'

prints one JSON line. The section module (``benchmarks/<section>.py``) builds the configuration with
``memory_case(case, params) -> op`` (models loaded, inputs ready); then:

* CPU: ``tracemalloc`` does not see torch's allocations, so the process's resident set is read from
  ``/proc/self/status``. The op runs once as a warm-up (weights loaded lazily through mmap become resident, a
  training step's optimizer makes its state), then ``rss_before_mib`` is read, the kernel's peak-RSS mark (VmHWM)
  is reset to the current RSS (``/proc/self/clear_refs`` = 5) and the op runs again: ``peak_rss_mib`` is VmHWM
  afterwards (the whole process: model, state and the op's working memory) and ``delta_mib`` = peak - before, the
  memory the op itself needs on top of what stays resident. A fresh process keeps freed memory of earlier
  configurations from being reused and hiding growth.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, same warm-up.

Section ``moe_layer`` (one MoMELayer forward+backward with a given backend) is defined here, since
``benchmarks/moe_layer.py`` belongs to the MoE-layer benchmark.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTIONS = ("moe_layer", "llm_overhead", "matryoshka_step", "elastic", "whisper_crop")


def _status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    if not m:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(m.group(1))


def _trim() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def moe_layer_case(case: str, params: Dict) -> Callable[[], None]:
    """``case`` = expert backend; ``params`` = a shape of ``benchmarks/moe_layer.shapes`` (dim, num_experts, top_k,
    num_shared, bottleneck, tokens). One forward+backward (input and MoME parameter gradients)."""
    import torch

    from mome.layers.layer import MoMELayer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layer = MoMELayer(params["dim"], params["num_experts"], params["top_k"], params["num_shared"],
                      params["bottleneck"]).to(dev)
    x = torch.randn(1, params["tokens"], params["dim"], device=dev)
    grad = torch.randn_like(x)

    def op():
        layer.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        y, _ = layer(xx, backend=case)
        y.backward(grad)

    return op


def measure(section: str, case: str, params: Dict) -> Dict:
    import torch

    if section == "moe_layer":
        op = moe_layer_case(case, params)
    else:
        op = importlib.import_module(f"benchmarks.{section}").memory_case(case, params)
    op()  # warm-up: lazily loaded (mmap-ed) weights become resident, the optimizer makes its state
    _trim()
    out = {"section": section, "case": case}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        op()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out.update(device="cuda", allocated_before_mib=base / 2**20, peak_allocated_mib=peak / 2**20,
                   delta_mib=(peak - base) / 2**20)
        return out
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark to the current RSS
        f.write("5")
    op()
    peak = _status_kib("VmHWM")
    out.update(device="cpu", rss_before_mib=before / 1024, peak_rss_mib=peak / 1024,
               delta_mib=max(peak - before, 0) / 1024)
    return out


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--section", required=True, choices=SECTIONS)
    p.add_argument("--case", required=True)
    p.add_argument("--params", default="{}", help="JSON object handed to the section's memory_case")
    a = p.parse_args(argv)
    try:
        params = json.loads(a.params)
    except json.JSONDecodeError as exc:
        p.error(f"--params is not valid JSON: {exc}")
    res = measure(a.section, a.case, params)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
