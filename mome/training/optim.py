"""AdamW over the trainable parameters and the cosine learning-rate schedule.

Weight decay applies to weight matrices only: biases, normalisation weights and embeddings (the trainable boundary
embeddings among them) are excluded, the usual convention for transformers and adapters. The schedule is the
Hugging Face cosine with linear warm-up and a floor (``min_lr_ratio`` x peak lr).

Learning rate per parameter group: ``train.lr_scale`` maps a group of ``mome.training.diagnostics.PARAM_GROUPS``
(``audio_projectors``, ``video_projectors``, ``boundary``, ``mome``, ``video_frontend``) to a multiplier of
``train.lr``; the schedule scales every group alike.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _is_no_decay(module: nn.Module, param_name: str, param: torch.Tensor) -> bool:
    if param.ndim < 2:  # biases, norm scales, per-channel vectors
        return True
    kind = type(module).__name__.lower()  # e.g. RMSNorm, BoundaryEmbeddings
    if isinstance(module, _NO_DECAY_MODULES) or "norm" in kind or "embed" in kind:
        return True
    name = param_name.lower()
    # stacked expert biases are 2-D ([experts, width]) but are biases; embedding tables may be bare Parameters
    return "bias" in name or name.endswith("_b") or "embed" in name


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two AdamW groups over the parameters that require grad: with and without weight decay.

    Each group also carries the parameter names (``names``) so that tests and logs can say what decays.
    """
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    seen = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if _is_no_decay(module, p_name, p):
                no_decay.append(p)
                no_decay_names.append(full)
            else:
                decay.append(p)
                decay_names.append(full)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    return groups


def scale_lr(groups: List[Dict], lr: float, lr_scale: Dict[str, float]) -> List[Dict]:
    """The groups split by parameter group (``PARAM_GROUPS``) where ``lr_scale`` names one, each with its ``lr``."""
    from mome.training.diagnostics import PARAM_GROUPS, param_group

    known = {g for _, g in PARAM_GROUPS}
    unknown = sorted(set(lr_scale) - known)
    if unknown:
        raise ValueError(f"train.lr_scale names unknown parameter groups {unknown}; choose from {sorted(known)}")
    out = []
    for g in groups:
        split: Dict[float, Dict] = {}
        for p, n in zip(g["params"], g["names"]):
            mult = float(lr_scale.get(param_group(n), 1.0))
            sub = split.setdefault(mult, {"params": [], "names": [], "weight_decay": g["weight_decay"],
                                          "lr": lr * mult})
            sub["params"].append(p)
            sub["names"].append(n)
        out += list(split.values())
    return out


def build_optimizer(model: nn.Module, train_cfg) -> torch.optim.AdamW:
    """AdamW with ``train.lr``, ``train.betas`` and ``train.weight_decay`` (no decay on biases/norms/embeddings);
    ``train.lr_scale`` multiplies the lr of named parameter groups."""
    groups = param_groups(model, train_cfg.weight_decay)
    lr_scale = dict(train_cfg.get("lr_scale") or {})
    if lr_scale:
        groups = scale_lr(groups, float(train_cfg.lr), lr_scale)
    for g in groups:  # torch optimizers keep unknown keys, but DeepSpeed's ZeRO wrappers copy groups: keep them plain
        g.pop("names")
    b1, b2 = (float(b) for b in train_cfg.betas)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(b1, b2), weight_decay=train_cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg, total_steps: int):
    """Linear warm-up for ``train.warmup_steps``, then cosine decay to ``train.min_lr_ratio`` x lr at ``total_steps``."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    if total_steps < 1:
        raise ValueError(f"total training steps must be >= 1, got {total_steps}")
    if not 0.0 <= train_cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {train_cfg.min_lr_ratio}")
    warmup = min(int(train_cfg.warmup_steps), total_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, min_lr_rate=float(train_cfg.min_lr_ratio)
    )
