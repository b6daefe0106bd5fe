"""Checkpoints on disk: their layout, finding the newest complete one, verifying it, and loading the model in it.

Writing checkpoints (and restoring a training run from one) is ``mome.training.checkpoint``; everything that only
reads a trained model (evaluation, analysis, export, transcription) needs this module alone.

Layout::

    runs/<run_name>/checkpoints/step_0000200/
        model.safetensors  config.yaml     # model.save_pretrained: trainable weights only + the run config
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
import re
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple

if TYPE_CHECKING:
    from mome.models.avsr import AVSRModel

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


def load_model(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Tuple[Any, "AVSRModel"]:
    """``(cfg, model)`` from a run folder (its newest checkpoint) or a checkpoint folder, in eval mode; the
    checkpoint's files are verified first. ``cfg`` is the checkpoint's saved run config (``config.yaml``) with
    ``overrides`` (``key=value`` strings, e.g. ``eval.num_beams=1``) on top: the model is built from its ``model``
    section, and evaluation, analysis and transcription take their data and evaluation settings from it.
    """
    from safetensors import SafetensorError

    from mome.config import load_saved_config
    from mome.models import AVSRModel

    ckpt = checked_model_folder(path)
    cfg = load_saved_config(ckpt / "config.yaml", list(overrides))
    try:
        model = AVSRModel.from_pretrained(ckpt, run_config=cfg)
    except SafetensorError as exc:
        raise CheckpointError(f"{ckpt / MODEL_FILE}: cannot read the weights (damaged?): {exc}") from None
    model.eval()
    return cfg, model
