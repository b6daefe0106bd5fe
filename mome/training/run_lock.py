"""One training run per run folder: an exclusive lock on ``<run folder>/.lock``.

The lock is an ``flock`` on the file, held for the whole run by the main process. The kernel drops it when the
process exits in any way (return, exception, ``kill -9``), so a crashed run never blocks the next one. The file
also records the holder (pid, host, start time): a second launch into a busy folder is refused with them, and a
record left by a process that died is reported as stale and taken over.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Optional

LOCK_FILE = ".lock"


class RunFolderBusyError(RuntimeError):
    """Another live process holds the run folder's lock; the message names its pid and start time."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _describe(h: dict) -> str:
    if not h:
        return "an unknown process"
    return f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(run_dir): ...`` or ``acquire()`` / ``release()``."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        old = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy(_holder(self.path)) from None
        except OSError as exc:  # no flock on this file system (some network mounts): trust the record alone
            old = _holder(self.path)
            if old and old.get("host") == socket.gethostname() and isinstance(old.get("pid"), int) \
                    and old["pid"] != os.getpid() and _pid_alive(old["pid"]):
                os.close(fd)
                raise self._busy(old) from None
            print(f"[train] warning: {self.path}: file locking unavailable ({exc}); the lock is advisory only",
                  file=sys.stderr)
        old = _holder(self.path) if old is None else old
        if old and old.get("host") == socket.gethostname() and isinstance(old.get("pid"), int) \
                and old["pid"] != os.getpid():
            state = "no longer running" if not _pid_alive(old["pid"]) else "gone (its pid was reused)"
            print(f"[train] note: {self.path}: stale lock of {_describe(old)}, {state}; taking it over",
                  file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _busy(self, holder: dict) -> RunFolderBusyError:
        return RunFolderBusyError(
            f"{self.run_dir}: another training run is using this run folder ({_describe(holder)}); wait for it to "
            f"finish or stop it, or choose another run_name / output_dir")

    def release(self) -> None:
        """Drop the lock (the record stays; the next holder overwrites it)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # a clean exit leaves no stale record
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
