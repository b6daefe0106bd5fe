"""Parameter accounting: total, trainable and active parameters per component of a model.

``python -m mome.models describe --config configs/mome_23_4_mhsa_llama3b.yaml`` builds the model on the meta device
(no weights, nothing downloaded: architectures come from ``configs/backbones``) and prints a table and JSON.

Columns, per component:

* ``params``: every parameter of the component;
* ``trainable``: parameters that receive gradients;
* ``active``: parameters used to decode ONE scale. Frozen backbones run whole; of the per-rate projectors only
  one per modality runs (the largest is counted, they differ only with stacking); a MoME layer uses its router plus
  ``top_k`` routed and all shared experts; scale-specific LoRA uses one scale's adapter (plus the global one).

``adapter_active`` is the paper's "active parameters" number (MoME or LoRA inside the LLM; projectors excluded): on
Llama-3.2-3B, 12,732,048 for MoME-23/4 (1 shared, b=12) and 27,525,120 for Q+V LoRA at reduction 32.
"""
from __future__ import annotations

import json
from typing import Dict, List

from torch import nn


def _count(params) -> int:
    return sum(p.numel() for p in params)


def mome_active_parameters(mome_modules: nn.ModuleList) -> int:
    """Router + (top_k routed + shared) experts of every layer."""
    total = 0
    for layer in mome_modules:
        ex, router = layer.experts, layer.router
        per_expert = 2 * ex.dim * ex.bottleneck + ex.bottleneck + ex.dim  # down W+b, up W+b
        total += (router.top_k + ex.num_shared) * per_expert + router.weight.numel() // router.num_routers
    return total


def parameter_report(model) -> Dict:
    """``{"components": [{name, params, trainable, active}], "totals": {...}, "adapter_active": int, ...}``."""
    from mome.adapters.lora import lora_parameter_counts

    rows: List[dict] = []

    def add(name, module_or_params, active=None):
        params = list(module_or_params.parameters()) if isinstance(module_or_params, nn.Module) else list(module_or_params)
        total = _count(params)
        rows.append({
            "component": name,
            "params": total,
            "trainable": _count(p for p in params if p.requires_grad),
            "active": total if active is None else active,
        })

    llm_params = [p for n, p in model.llm.named_parameters() if "lora_" not in n]
    add("llm (frozen)", llm_params)
    if model.audio_encoder is not None:
        add("audio_encoder", model.audio_encoder)
    if model.video_encoder is not None:
        add(f"video_encoder ({model.config.video_encoder.type})", model.video_encoder)
    for name in ("audio_projectors", "video_projectors"):
        proj = getattr(model, name)
        if proj is not None:
            add(name, proj, active=max(_count(p.parameters()) for p in proj.by_rate.values()))
    add("boundary_embeddings", model.sequences.boundary)
    adapter_active = 0
    if model.mome is not None:
        adapter_active = mome_active_parameters(model.mome)
        add(f"mome ({model.config.mome.placement})", model.mome, active=adapter_active)
    else:
        counts = lora_parameter_counts(model.llm)
        adapter_active = counts["active"]
        add("lora", [p for n, p in model.llm.named_parameters() if "lora_" in n], active=adapter_active)

    totals = {k: sum(r[k] for r in rows) for k in ("params", "trainable", "active")}
    trainable_active = sum(r["active"] for r in rows if r["trainable"])
    m = model.config
    return {
        "method": m.method,
        "llm": m.llm.name,
        "scales": [s.name for s in model.scales],
        "components": rows,
        "totals": totals,
        "trainable_active": trainable_active,
        "adapter_trainable": rows[-1]["trainable"],
        "adapter_active": adapter_active,
    }


def format_table(report: Dict) -> str:
    header = f"{'component':<28}{'params':>16}{'trainable':>16}{'active':>16}"
    lines = [
        f"method {report['method']}  llm {report['llm']}  scales {', '.join(report['scales'])}",
        header,
        "-" * len(header),
    ]
    for r in report["components"]:
        lines.append(f"{r['component']:<28}{r['params']:>16,}{r['trainable']:>16,}{r['active']:>16,}")
    t = report["totals"]
    lines += [
        "-" * len(header),
        f"{'total':<28}{t['params']:>16,}{t['trainable']:>16,}{t['active']:>16,}",
        f"adapter (MoME/LoRA in the LLM): trainable {report['adapter_trainable']:,}, "
        f"active per scale {report['adapter_active']:,}",
        f"trainable parameters active per scale (adapter + one projector per modality + markers + trainable "
        f"encoders): {report['trainable_active']:,}",
    ]
    return "\n".join(lines)


def describe(cfg) -> Dict:
    """Build ``cfg``'s model on the meta device and return its parameter report."""
    from mome.models import build_model

    return parameter_report(build_model(cfg, device="meta"))


def to_json(report: Dict) -> str:
    return json.dumps(report, indent=2)
