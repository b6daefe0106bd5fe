"""Atomic training checkpoints and the functions that find and load them.

Layout (CONTRACTS.md)::

    runs/<run_name>/checkpoints/step_0000200/
        model.safetensors  config.yaml     # model.save_pretrained: trainable weights only + the config
        accelerate_state/                  # accelerator.save_state: optimizer, scheduler, RNG, trainer position
        COMPLETE                           # written last

A checkpoint is first written as ``.tmp-step_XXXXXXX`` and renamed when every process has finished writing, so a
process killed half-way leaves either a complete checkpoint or a temporary folder that the next save removes.
Frozen backbone weights are never written: under DeepSpeed ``save_state`` gets ``exclude_frozen_parameters=True``;
otherwise a save hook replaces the full state dict with the trainable one (and a load hook loads it back strictly).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Iterable, List, Tuple

import torch

CHECKPOINTS = "checkpoints"
STATE = "accelerate_state"
COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def list_checkpoints(run_or_ckpts: str | os.PathLike) -> List[Path]:
    """Complete checkpoints under a run folder (or its ``checkpoints/`` folder), oldest first."""
    root = Path(run_or_ckpts)
    if (root / CHECKPOINTS).is_dir():
        root = root / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and d.is_dir() and _is_complete(d):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_or_ckpt_dir: str | os.PathLike) -> Path:
    """The newest complete checkpoint of a run folder; a checkpoint folder (or a ``save_pretrained`` model folder)
    resolves to itself.

    Raises ``FileNotFoundError`` naming the folder when there is none (or the checkpoint is incomplete).
    """
    p = Path(run_or_ckpt_dir).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run or checkpoint folder")
    if _STEP_RE.match(p.name):
        if not _is_complete(p):
            raise FileNotFoundError(f"{p}: checkpoint is incomplete (no {COMPLETE} marker); the run was interrupted "
                                    f"while saving it, use an older checkpoint")
        return p
    if (p / "model.safetensors").is_file() and not (p / CHECKPOINTS).is_dir():
        return p  # a model folder written by save_pretrained (an export)
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise FileNotFoundError(f"{p}: no complete checkpoint (looked for {CHECKPOINTS}/step_*/{COMPLETE})")
    return ckpts[-1]


def load_model(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Tuple["object", "torch.nn.Module"]:
    """``(cfg, model)`` from a run folder (its newest checkpoint) or a checkpoint folder, in eval mode.

    ``overrides`` are ``key=value`` strings applied over the checkpoint's config (e.g. ``eval.num_beams=1``).
    """
    from mome.config import load_config
    from mome.models import AVSRModel

    ckpt = latest_checkpoint(path)
    overrides = list(overrides)
    model = AVSRModel.from_pretrained(ckpt, overrides=overrides)
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        cfg = load_config(ckpt / "config.yaml", overrides)
    model.eval()
    return cfg, model


# ------------------------------------------------------------------------------------------------------------
# saving and restoring (inside a training run)


def _is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if (plugin is not None and _is_deepspeed(accelerator)) else 0


def install_state_hooks(accelerator, model) -> None:
    """Make ``save_state``/``load_state`` store only trainable weights outside DeepSpeed.

    Accelerate would otherwise write the whole state dict (frozen LLM and encoders included) into every checkpoint.
    """
    if _is_deepspeed(accelerator):
        return

    def save_hook(models, weights, output_dir):
        for i, m in enumerate(models):
            weights[i] = accelerator.unwrap_model(m).trainable_state_dict()

    def load_hook(models, input_dir):
        from safetensors.torch import load_file

        for i, m in enumerate(models):
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            f = Path(input_dir) / name
            if not f.is_file():
                raise FileNotFoundError(f"{f}: trainable weights missing from the checkpoint")
            accelerator.unwrap_model(m).load_trainable_state_dict(load_file(str(f)))
        models.clear()  # loaded here; accelerate must not load them again (non-strictly)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _save_pretrained(accelerator, model, folder: Path) -> None:
    unwrapped = accelerator.unwrap_model(model)
    if _zero_stage(accelerator) == 3:  # parameters are partitioned: gather the trainable ones on every rank
        import deepspeed

        params = [p for p in unwrapped.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if accelerator.is_main_process:
                unwrapped.save_pretrained(folder)
    elif accelerator.is_main_process:
        unwrapped.save_pretrained(folder)


def save_checkpoint(accelerator, model, run_dir: str | os.PathLike, step: int, keep_last: int = 2) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXXX`` atomically on all processes; keep the newest ``keep_last``.

    Every process must call it (DeepSpeed writes one optimizer shard per rank).
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    _save_pretrained(accelerator, model, tmp)
    kwargs = {"exclude_frozen_parameters": True} if _is_deepspeed(accelerator) else {}
    accelerator.save_state(str(tmp / STATE), **kwargs)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE).write_text(f"{step}\n")
        _fsync_dir(tmp)
        if final.exists():  # same step saved again (e.g. SIGTERM right after a periodic save): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune_checkpoints(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` complete checkpoints, and stale temporary folders."""
    ckpts = list_checkpoints(ckpt_root)
    if keep_last > 0:
        for old in ckpts[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    for d in Path(ckpt_root).iterdir():
        if d.name.startswith(".tmp-") and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def restore_checkpoint(accelerator, ckpt: Path) -> None:
    """Load optimizer, scheduler, RNG, trainer position and trainable weights from a checkpoint (all processes)."""
    state = Path(ckpt) / STATE
    if not state.is_dir():
        raise FileNotFoundError(f"{state}: no accelerate state in this checkpoint; it cannot be resumed "
                                f"(it may be a weights-only export)")
    kwargs = {"load_module_strict": False} if _is_deepspeed(accelerator) else {}
    accelerator.load_state(str(state), **kwargs)
