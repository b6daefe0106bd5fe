"""Faults during training: non-finite losses and termination signals.

- ``BadStepCounter``: a step whose loss (on any process) or gradient norm is NaN/inf is skipped; after
  ``train.max_bad_steps`` consecutive ones the trainer logs the step and stops training with ``TooManyBadSteps``.
  The weights were never updated by a bad step, so the checkpoint the trainer then writes holds the last good
  weights (and the data position).
- ``StopRequest``: SIGTERM (and SIGINT) set a flag; the trainer checks it at the next step boundary (agreed across
  processes), saves a checkpoint and exits with status 143 (128 + SIGTERM). A second signal exits at once,
  even from inside a blocked collective.
- ``corrupt_batch``: the honest fault injection used by tests and by ``train.inject_nan_steps``: it writes NaN into the
  batch's float tensors (audio, video) so that the NaN flows through the real model and its loss.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Dict, Optional

import torch

EXIT_TERMINATED = 143


class TooManyBadSteps(RuntimeError):
    pass


class BadStepCounter:
    """Counts consecutive and total skipped (non-finite) optimizer steps."""

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"train.max_bad_steps must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def record(self, bad: bool) -> bool:
        """Record the outcome of a step; True when it makes ``max_consecutive`` bad steps in a row."""
        if not bad:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        return self.consecutive >= self.max_consecutive

    def error(self, step: int) -> TooManyBadSteps:
        """The error that stops training at ``step`` once ``record`` said so."""
        return TooManyBadSteps(
            f"stopping at step {step}: {self.consecutive} consecutive steps had a NaN/inf loss or gradient "
            f"(train.max_bad_steps={self.max_consecutive}); the weights were not updated by them and the newest "
            f"checkpoint is the last good state. Lower train.lr, check the data, or raise train.max_bad_steps."
        )

    def state_dict(self) -> Dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag that the training loop polls at step boundaries.

    A second signal ends the process at once, even when the main thread is blocked inside a collective or a long
    C call (where Python-level handlers cannot run): the C-level handler writes every signal number to a wakeup fd,
    which a daemon thread watches.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signum: Optional[int] = None
        self.signals = tuple(int(s) for s in signals)
        self._previous = {}
        self._wakeup = None
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread (e.g. inside some test runners): no handler
                pass
        if self._previous:
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            try:
                old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            except ValueError:
                reader.close()
                writer.close()
            else:
                self._wakeup = (reader, writer, old_fd)
                threading.Thread(target=self._watch, args=(reader,), daemon=True, name="stop-watch").start()

    def _watch(self, reader) -> None:
        seen = 0
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self.signals:
                    seen += 1
                    if seen >= 2:
                        os.write(2, f"[train] second signal {signum}: exiting now, without checkpoint\n".encode())
                        os._exit(128 + signum)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            sys.stderr.write(f"[train] received signal {signum}: saving a checkpoint at the end of this step "
                             f"(send it again to exit at once)\n")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
        if self._wakeup is not None:
            reader, writer, old_fd = self._wakeup
            signal.set_wakeup_fd(old_fd)
            writer.close()
            reader.close()
            self._wakeup = None


def corrupt_batch(batch: Dict) -> Dict:
    """Fill every floating-point tensor of the batch (audio, video, cached features) with NaN.

    Fault injection for tests and drills (``train.inject_nan_steps``): the NaN goes through the real model.
    """
    return {k: torch.full_like(v, float("nan")) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in batch.items()}
