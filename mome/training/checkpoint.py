"""Atomic, self-verifying training checkpoints, written and read without pickle, and the functions that find them.

Layout::

    runs/<run_name>/checkpoints/step_0000200/
        model.safetensors  config.yaml     # model.save_pretrained: trainable weights only + the config
        training_state/
            optimizer.safetensors          # AdamW state tensors; param groups and scalars as JSON in its metadata
            rng_<process>.safetensors      # every process's torch (CPU, CUDA) RNG; python / numpy RNG as JSON
            trainer.json                   # trainer position, schedule, process count, global batch position
            deepspeed/                     # under DeepSpeed only: the engine's own checkpoint (pickles, see below)
        COMPLETE                           # written last: JSON manifest (size and sha256 of every file, signature)

Written as ``.tmp-step_XXXXXXX`` and renamed once every process has finished, so a process killed half-way leaves
either a complete checkpoint or a temporary folder that the next save removes. The trainable weights are stored
once (``model.safetensors``, which resume loads back strictly); frozen backbone weights never.

Verification. ``COMPLETE`` lists each file's size and sha256; :func:`verify_checkpoint` checks them and raises
:class:`CheckpointError` naming the first file that fails (missing, truncated, modified). Resuming with
``train.resume=auto`` takes the newest checkpoint that verifies and says which newer ones it skipped and why.

Nothing is unpickled, except under DeepSpeed, whose engine checkpoint (``*_model_states.pt``, ``*_optim_states.pt``)
is a pickle that DeepSpeed loads with ``torch.load(weights_only=False)``. Those files are loaded only from a
checkpoint this code wrote on this machine (or under the same cache folder): the manifest carries an HMAC-SHA256
over the file list, sizes and hashes, keyed by a random secret kept outside every run folder
(``<cache_dir>/checkpoint-signing.key``, created on first save, mode 600). A checkpoint written elsewhere (a
colleague's run folder) has no valid signature here, and its DeepSpeed state is refused unless
``train.trust_checkpoint=true`` says the user trusts it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
STATE = "training_state"
COMPLETE = "COMPLETE"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.json"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
KEY_FILE = "checkpoint-signing.key"
FORMAT = 2
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is damaged, incomplete, of another kind, or not trusted; the message names the file."""


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
    if (p / MODEL_FILE).is_file() and not (p / CHECKPOINTS).is_dir():
        return p  # a model folder written by save_pretrained (an export)
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise FileNotFoundError(f"{p}: no complete checkpoint (looked for {CHECKPOINTS}/step_*/{COMPLETE})")
    return ckpts[-1]


# ------------------------------------------------------------------------------------------------------------
# the manifest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def signing_key(key_dir: Optional[str | os.PathLike], create: bool = False) -> Optional[bytes]:
    """The local secret that signs manifests (``<key_dir>/checkpoint-signing.key``); None when there is none."""
    if key_dir is None:
        return None
    path = Path(key_dir).expanduser() / KEY_FILE
    if create and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    try:
        key = path.read_text().strip()
    except OSError:
        return None
    return key.encode() if key else None


def _signature(key: bytes, body: Dict[str, Any]) -> str:
    msg = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return "hmac-sha256:" + hmac.new(key, msg, hashlib.sha256).hexdigest()


def write_manifest(folder: Path, step: int, extra: Optional[Dict[str, Any]] = None,
                   key: Optional[bytes] = None) -> Path:
    """``folder/COMPLETE``: the size and sha256 of every file under ``folder`` (+ ``extra``), signed with ``key``."""
    folder = Path(folder)
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != COMPLETE:
            files[f.relative_to(folder).as_posix()] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    body = {"format": FORMAT, "step": int(step), "files": files, **(extra or {})}
    manifest = dict(body, signature=_signature(key, body) if key else None)
    tmp = folder / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / COMPLETE)
    return folder / COMPLETE


def read_manifest(ckpt: Path) -> Optional[Dict[str, Any]]:
    """The manifest of a checkpoint; None for one written before manifests existed (``COMPLETE`` holds the step)."""
    marker = Path(ckpt) / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{marker}: missing; the checkpoint is incomplete (interrupted while saving)")
    text = marker.read_text(errors="replace")
    if text.strip().isdigit():
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{marker}: damaged manifest (not JSON: {exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{marker}: damaged manifest (no file list)")
    return manifest


def verify_checkpoint(ckpt: str | os.PathLike, key: Optional[bytes] = None) -> Dict[str, Any]:
    """Check every file of the manifest (size, sha256); return the manifest with ``trusted`` (signature valid for
    ``key``). ``CheckpointError`` names the first file that fails; an old marker without a manifest is an error."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    if manifest is None:
        raise CheckpointError(f"{ckpt / COMPLETE}: written by an older version of this code (no file sizes or "
                              f"hashes), so this checkpoint cannot be verified or resumed")
    for rel, want in sorted(manifest["files"].items()):
        if rel.startswith("/") or ".." in Path(rel).parts or not isinstance(want, dict):
            raise CheckpointError(f"{ckpt / COMPLETE}: damaged manifest (bad entry {rel!r})")
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {ckpt / COMPLETE})")
        size = f.stat().st_size
        if size != want.get("size"):
            raise CheckpointError(f"{f}: {size} bytes, but {want.get('size')} were written (truncated or replaced "
                                  f"after the checkpoint was completed)")
        if file_sha256(f) != want.get("sha256"):
            raise CheckpointError(f"{f}: content differs from the sha256 in {ckpt / COMPLETE} (damaged or modified)")
    state = ckpt / STATE
    extra = sorted(f.relative_to(ckpt).as_posix() for f in state.rglob("*") if f.is_file()) if state.is_dir() else []
    extra = [rel for rel in extra if rel not in manifest["files"]]
    if extra:  # resume reads training_state/ by name: nothing may have been added there
        raise CheckpointError(f"{ckpt / extra[0]}: not part of the checkpoint (not listed in {ckpt / COMPLETE}); "
                              f"it was added afterwards")
    body = {k: v for k, v in manifest.items() if k != "signature"}
    sig = manifest.get("signature")
    manifest["trusted"] = bool(key and sig and hmac.compare_digest(str(sig), _signature(key, body)))
    return manifest


def checked_model_folder(path: str | os.PathLike) -> Path:
    """The checkpoint (or export) folder of ``path``, verified when it has a manifest (``CheckpointError`` naming
    the failing file otherwise); a folder without one is used as is, with a warning for an old-style checkpoint."""
    ckpt = latest_checkpoint(path)
    if _is_complete(ckpt):
        if read_manifest(ckpt) is None:
            print(f"[checkpoint] warning: {ckpt / COMPLETE} lists no sizes or hashes (written by an older version): "
                  f"{ckpt} is used unverified", file=sys.stderr)
        else:
            verify_checkpoint(ckpt)
    return ckpt


def load_model(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Tuple["object", "torch.nn.Module"]:
    """``(cfg, model)`` from a run folder (its newest checkpoint) or a checkpoint folder, in eval mode; the
    checkpoint's files are verified first.

    ``overrides`` are ``key=value`` strings applied over the checkpoint's config (e.g. ``eval.num_beams=1``).
    """
    from safetensors import SafetensorError

    from mome.config import load_config
    from mome.models import AVSRModel

    ckpt = checked_model_folder(path)
    overrides = list(overrides)
    try:
        model = AVSRModel.from_pretrained(ckpt, overrides=overrides)
    except SafetensorError as exc:
        raise CheckpointError(f"{ckpt / MODEL_FILE}: cannot read the weights (damaged?): {exc}") from None
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        cfg = load_config(ckpt / "config.yaml", overrides)
    model.eval()
    return cfg, model


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


def save_checkpoint(accelerator, model, run_dir: str | os.PathLike, step: int, keep_last: int = 2, *,
                    optimizer=None, scheduler=None, trainer_state: Optional[Dict[str, Any]] = None,
                    key_dir: Optional[str | os.PathLike] = None) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXXX`` atomically on all processes; keep the newest ``keep_last``.

    Every process must call it (each writes its RNG state; DeepSpeed writes one optimizer shard per rank).
    ``trainer_state`` (JSON-able: position, schedule, process count) goes to ``trainer.json``; the manifest is
    signed with the key under ``key_dir`` (created if missing).
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
    _save_pretrained(accelerator, model, tmp)
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
