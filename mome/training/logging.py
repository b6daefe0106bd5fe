"""Run logging: a JSONL metrics file (what our tools read), Weights & Biases, and a tqdm progress bar.

``metrics.jsonl`` in the run folder has one JSON object per line, ``{"step": .., "split": "train"|"val", ...}``.
On resume, records after the resumed step (written by the interrupted process after its last checkpoint) are dropped,
so the file always describes one training trajectory.

wandb modes (``logging.wandb``):

- ``auto``: ``$WANDB_MODE`` when set; else ``online`` when an API key (``$WANDB_API_KEY`` or ~/.netrc) is present
  *and* the wandb host answers within 2 s; else ``offline`` (a local run under ``<run>/wandb``, syncable later).
- ``online``: as asked, but an init that fails or times out falls back to ``offline`` with a warning.
- ``offline`` / ``disabled``: as asked. Nothing here ever blocks on the network for more than the init timeout.

Only the main process logs.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlparse

METRICS_FILE = "metrics.jsonl"
_WANDB_ID_FILE = "wandb_run_id"


def _wandb_host() -> Tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (443 if url.scheme != "http" else 80)


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(requested: str) -> Tuple[str, str]:
    """``(mode, reason)`` for ``logging.wandb``; mode is one of online, offline, disabled."""
    if requested in ("online", "offline", "disabled"):
        return requested, "logging.wandb"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env in ("dryrun",):
            env = "offline"
        if env not in ("online", "offline", "disabled", "run"):
            return "offline", f"unknown WANDB_MODE={env!r}"
        return ("online" if env == "run" else env), "$WANDB_MODE"
    host, port = _wandb_host()
    if not _has_api_key(host):
        return "offline", "no wandb API key"
    if not _reachable(host, port):
        return "offline", f"{host}:{port} not reachable"
    return "online", "API key and network"


def _flatten(prefix: str, value: Any, out: Dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten(f"{prefix}/{i}", v, out)
    else:
        out[prefix] = value


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _finite(value):
    """JSON has no NaN: non-finite floats are written as strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def truncate_metrics(path: Path, after_step: int) -> int:
    """Drop records with ``step > after_step`` (atomic rewrite); returns how many were dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            dropped += 1
            continue
        if int(rec.get("step", 0)) > after_step:
            dropped += 1
        else:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)
    return dropped


def read_metrics(path: str | os.PathLike) -> list:
    """All records of a ``metrics.jsonl`` file (or of a run folder's)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]


class RunLogger:
    """JSONL + wandb logging for the main process; a no-op object elsewhere."""

    def __init__(self, cfg, run_dir: Path, enabled: bool, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self._wandb = None
        self.wandb_mode = "disabled"
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an existing folder starts a fresh file
        self._file = open(self.path, "a", buffering=1)
        self._init_wandb(cfg, resume=resume_step is not None)

    def _init_wandb(self, cfg, resume: bool) -> None:
        mode, reason = resolve_wandb_mode(cfg.logging.wandb)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            print("[train] wandb is not installed: logging to metrics.jsonl only", file=sys.stderr)
            return
        from omegaconf import OmegaConf

        id_file = self.run_dir / _WANDB_ID_FILE
        run_id = id_file.read_text().strip() if (resume and id_file.is_file()) else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
        kwargs = dict(project=cfg.logging.project, name=cfg.run_name, id=run_id, resume="allow",
                      dir=str(self.run_dir), config=OmegaConf.to_container(cfg, resolve=True))
        t0 = time.time()
        for attempt in ((mode,) if mode == "offline" else (mode, "offline")):
            try:
                self._wandb = wandb.init(mode=attempt, settings=wandb.Settings(init_timeout=30, silent=True), **kwargs)
                self.wandb_mode = attempt
                break
            except Exception as exc:  # network errors, timeouts, auth errors: never stop training for logging
                print(f"[train] wandb {attempt} init failed ({type(exc).__name__}: {exc}); "
                      f"{'trying offline' if attempt != 'offline' else 'logging to metrics.jsonl only'}",
                      file=sys.stderr)
        if self._wandb is not None:
            print(f"[train] wandb: {self.wandb_mode} ({reason}; {time.time() - t0:.1f} s)", file=sys.stderr)

    def log(self, record: Dict[str, Any]) -> None:
        """Write one record (must contain ``step`` and ``split``)."""
        if not self.enabled:
            return
        self._file.write(json.dumps(_finite(record), default=_json_default) + "\n")
        if self._wandb is not None:
            flat: Dict[str, Any] = {}
            split = record.get("split", "train")
            _flatten(split, {k: v for k, v in record.items() if k not in ("step", "split")}, flat)
            try:
                self._wandb.log(flat, step=int(record["step"]))
            except Exception as exc:
                print(f"[train] wandb log failed ({exc}); continuing with metrics.jsonl", file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as exc:
                print(f"[train] wandb finish failed ({exc})", file=sys.stderr)
            self._wandb = None


class Progress:
    """tqdm over optimizer steps with loss, lr and samples/s in the postfix (main process, ``logging.progress``)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
