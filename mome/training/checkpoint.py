"""Atomic, self-verifying training checkpoints, written and restored without pickle.

The layout, the manifest and its verification, and finding / loading checkpoints are in ``mome.models.checkpoints``
(names imported here for the training code). Written as ``.tmp-step_XXXXXXX`` and renamed once every process has
finished, so a process killed half-way leaves either a complete checkpoint or a temporary folder that the next save
removes. Under DeepSpeed the engine's own (pickled) state is loaded only from a checkpoint signed here, or with
``train.trust_checkpoint=true``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from mome.models.checkpoints import (CHECKPOINTS, COMPLETE, DEEPSPEED_DIR, DEEPSPEED_TAG, KEY_FILE, MODEL_FILE,
                                     OPTIMIZER_FILE, STATE, TRAINER_FILE, CheckpointError, checkpoint_name,
                                     latest_checkpoint, list_checkpoints, load_model, signing_key, verify_checkpoint,
                                     write_manifest)

__all__ = ["CHECKPOINTS", "COMPLETE", "KEY_FILE", "CheckpointError", "checkpoint_name", "check_resumable",
           "latest_checkpoint", "list_checkpoints", "load_model", "prune_checkpoints", "restore_checkpoint",
           "save_checkpoint", "signing_key", "verify_checkpoint", "write_manifest"]

# ------------------------------------------------------------------------------------------------------------
# state without pickle: tensors in safetensors, the rest in JSON (tuples tagged so that they come back as tuples)


def _to_json(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v) for v in obj]}
    if isinstance(obj, list):
        return [_to_json(v) for v in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            return {"__intkeys__": [[int(k), _to_json(v)] for k, v in obj.items()]}
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's JSON state")


def _from_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_from_json(v) for v in obj["__tuple__"])
        if set(obj) == {"__intkeys__"}:
            return {int(k): _from_json(v) for k, v in obj["__intkeys__"]}
        return {k: _from_json(v) for k, v in obj.items()}
    return obj


def _save_tensors(path: Path, tensors: Dict[str, torch.Tensor], meta: Any) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp),
              metadata={"mome_state": json.dumps(_to_json(meta))})
    os.replace(tmp, path)


def _load_tensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Any]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("mome_state", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read (damaged?): {exc}") from None
    return tensors, _from_json(meta)


def optimizer_state(optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """An optimizer's ``state_dict`` as (tensors, JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}/{name}"] = v
            else:
                scalars[f"{idx}/{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_dict(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """This process's python, numpy and torch (CPU, CUDA) RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    meta = {"python": random.getstate(), "numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    return tensors, meta


def set_rng_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    v = meta["python"]
    random.setstate((v[0], tuple(v[1]), v[2]))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda_{i}"] for i in range(int(meta.get("cuda_devices", 0)))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ------------------------------------------------------------------------------------------------------------
# saving and restoring (inside a training run)


def _is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if (plugin is not None and _is_deepspeed(accelerator)) else 0


def _save_pretrained(accelerator, model, folder: Path, run_config=None) -> None:
    unwrapped = accelerator.unwrap_model(model)
    if _zero_stage(accelerator) == 3:  # parameters are partitioned: gather the trainable ones on every rank
        import deepspeed

        params = [p for p in unwrapped.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if accelerator.is_main_process:
                unwrapped.save_pretrained(folder, run_config=run_config)
    elif accelerator.is_main_process:
        unwrapped.save_pretrained(folder, run_config=run_config)


def save_checkpoint(accelerator, model, run_dir: str | os.PathLike, step: int, keep_last: int = 2, *,
                    optimizer=None, scheduler=None, trainer_state: Optional[Dict[str, Any]] = None,
                    key_dir: Optional[str | os.PathLike] = None, run_config=None) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXXX`` atomically on all processes; keep the newest ``keep_last``.

    Every process must call it (each writes its RNG state; DeepSpeed writes one optimizer shard per rank).
    ``trainer_state`` (JSON-able: position, schedule, process count) goes to ``trainer.json``; the manifest is
    signed with the key under ``key_dir`` (created if missing). ``run_config``, the run's config, is the
    checkpoint's ``config.yaml`` (``AVSRModel.save_pretrained``), read back by evaluation and analysis.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    is_ds = _is_deepspeed(accelerator)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / STATE).mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_pretrained(accelerator, model, tmp, run_config)
    state = tmp / STATE
    _save_tensors(state / f"rng_{accelerator.process_index}.safetensors", *rng_state())
    if is_ds:  # the engine holds the (partitioned) optimizer: its own format, one shard per rank
        model.save_checkpoint(str(state / DEEPSPEED_DIR), DEEPSPEED_TAG, exclude_frozen_parameters=True)
    elif accelerator.is_main_process and optimizer is not None:
        _save_tensors(state / OPTIMIZER_FILE, *optimizer_state(optimizer))
    if accelerator.is_main_process:
        doc = {"trainer": trainer_state or {}, "scheduler": scheduler.state_dict() if scheduler is not None else None}
        (state / TRAINER_FILE).write_text(json.dumps(_to_json(doc), indent=1) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        extra = {"num_processes": accelerator.num_processes, "deepspeed": is_ds}
        write_manifest(tmp, step, extra, key=signing_key(key_dir, create=True))
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
    """Remove all but the newest ``keep_last`` (>= 1) complete checkpoints, and stale temporary folders."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    ckpts = list_checkpoints(ckpt_root)
    for old in ckpts[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for d in Path(ckpt_root).iterdir():
        if d.name.startswith(".tmp-") and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def check_resumable(ckpt: Path, key_dir: Optional[str | os.PathLike] = None, deepspeed: bool = False,
                    trust: bool = False) -> Dict[str, Any]:
    """Verify a checkpoint for resuming: files intact, training state present, same kind of run (DeepSpeed or
    not) and, for DeepSpeed's pickled state, written here (signature) or trusted. Returns the manifest."""
    manifest = verify_checkpoint(ckpt, signing_key(key_dir))
    if f"{STATE}/{TRAINER_FILE}" not in manifest["files"]:
        raise CheckpointError(f"{ckpt / STATE / TRAINER_FILE}: missing; this checkpoint holds no training state "
                              f"(a weights-only export?) and cannot be resumed")
    if bool(manifest.get("deepspeed")) != deepspeed:
        raise CheckpointError(f"{ckpt}: written {'with' if manifest.get('deepspeed') else 'without'} DeepSpeed; "
                              f"resume it {'with' if manifest.get('deepspeed') else 'without'} DeepSpeed "
                              f"(the optimizer state formats differ)")
    if deepspeed and not manifest["trusted"] and not trust:
        raise CheckpointError(
            f"{ckpt / STATE / DEEPSPEED_DIR}: DeepSpeed state is a pickle (loading it can run code), and this "
            f"checkpoint was not written here (its manifest signature does not match {Path(key_dir or '?') / KEY_FILE}"
            f"). Resume it only if you trust its source: train.trust_checkpoint=true")
    return manifest


def restore_checkpoint(accelerator, model, ckpt: Path, *, optimizer=None, scheduler=None,
                       key_dir: Optional[str | os.PathLike] = None, trust: bool = False,
                       manifest: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load trainable weights, optimizer, schedule and this process's RNG from a checkpoint (all processes call
    it); returns ``{"trainer": ..., "num_processes": ..., "rng_restored": bool}`` for the trainer to place itself.
    ``manifest``: the result of :func:`check_resumable` when the caller has just run it (else it is run here)."""
    ckpt = Path(ckpt)
    is_ds = _is_deepspeed(accelerator)
    if manifest is None:
        manifest = check_resumable(ckpt, key_dir, deepspeed=is_ds, trust=trust)
    state = ckpt / STATE
    saved_procs = int(manifest.get("num_processes", 1))
    try:
        doc = _from_json(json.loads((state / TRAINER_FILE).read_text()))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state / TRAINER_FILE}: cannot read: {exc}") from None
    if is_ds:
        if saved_procs != accelerator.num_processes:
            raise CheckpointError(f"{state / DEEPSPEED_DIR}: DeepSpeed optimizer shards were written by {saved_procs} "
                                  f"processes; resume with {saved_procs} (now {accelerator.num_processes})")
        model.load_checkpoint(str(state / DEEPSPEED_DIR), DEEPSPEED_TAG, load_module_strict=False)
    else:
        tensors, _ = _load_tensors(ckpt / MODEL_FILE)
        accelerator.unwrap_model(model).load_trainable_state_dict(tensors, source=str(ckpt / MODEL_FILE))
        if optimizer is not None:
            tensors, meta = _load_tensors(state / OPTIMIZER_FILE)
            try:
                optimizer.load_state_dict(optimizer_state_dict(tensors, meta))
            except (KeyError, ValueError, TypeError) as exc:
                raise CheckpointError(f"{state / OPTIMIZER_FILE}: does not fit this model's optimizer: {exc}") from None
    if scheduler is not None and doc.get("scheduler") is not None:
        scheduler.load_state_dict(doc["scheduler"])
    rng = state / f"rng_{accelerator.process_index}.safetensors"
    restored = rng.is_file()
    if restored:
        set_rng_state(*_load_tensors(rng))
    return {"trainer": doc.get("trainer", {}), "num_processes": saved_procs, "rng_restored": restored}
