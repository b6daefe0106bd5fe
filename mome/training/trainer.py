"""The training loop: one Accelerate loop for single process, DDP (GPU, or CPU over gloo) and DeepSpeed ZeRO.

``train(cfg)`` builds the model (``mome.models.build_model``) and the loaders (``mome.data.build_dataloader``), then
runs optimizer steps with gradient accumulation, clipping and the cosine schedule, validates periodically (loss per
scale, greedy WER on ``train.val_wer_samples`` utterances per scale), checkpoints and logs.

Exact resume. A checkpoint is taken only at an optimizer-step boundary (``mome.training.checkpoint``: safetensors
and JSON, no pickle). It holds the trainable weights, the optimizer, the schedule, every process's RNG states and
the trainer position (epoch, step, bad-step counters, the process count and the GLOBAL batch position in the
epoch). Resuming reloads them, skips the consumed batches of the epoch (``accelerator.skip_first_batches``) and
continues; ``mome.training.reproducible`` makes the data order and the augmentation independent of where the
iterator started, so the per-step losses equal an uninterrupted run's. On another process count the run continues
at the same global sample (``reproducible.resume_skip``; refused when the count cannot split the position
evenly), with a warning that per-process random streams (dropout, sampled scales) then differ.

One run per run folder: the main process holds ``mome.training.run_lock.RunLock`` for the whole run.

The loop, as ``Trainer.fit`` reads it::

    _start_run()                 logger, progress bar, signal handlers, the training clock
    _train()                     until the last step or train.max_minutes; returns the exit status
        _epoch()                 the rest of the epoch, from the (resume) position
            _micro_batch()       forward, ONE all_reduce of its named sums, backward unless skipped
            _step_boundary()     at the end of each gradient-accumulation window:
                _take_step()     clip and step, or drop the window; the bad-step counter
                _log_step()      progress bar; the interval's record every train.log_every steps
                                 (a stop signal: checkpoint, exit 143; too many bad steps: checkpoint, exit 1)
                _after_step()    validation / checkpoint every val_every / save_every steps; the end test
            _end_of_epoch()      validation / checkpoint here when their period is 0
        _final_checkpoint()      validation and checkpoint of the last step
    finish()                     the logger closed, the loss curve

Validation and checkpoints run inside ``_paused``: their time counts neither in samples/s nor in the training time
(``train_wall_s``, ``train.max_minutes``).

Agreement between processes. After each micro-batch forward ONE ``all_reduce`` (``mome.training.stats``: named
sums, ``Sums.reduce``) carries the loss, the non-finite / empty-batch / stop-signal flags, the batch size, per-scale
CE, aux losses and expert load, so every process takes the same skip/stop decision and the logs hold global means.
Validation reduces its sums with the same helper.

Skipping. A micro-batch with a non-finite loss on any process (or, with ``data.skip_bad``, a batch whose every sample
was bad) gets no backward on any process. Outside DeepSpeed, a window (``grad_accum`` micro-batches) with a
non-finite loss or gradient norm is dropped whole: no optimizer or scheduler step. DeepSpeed steps inside its
backward, so there the step is taken from the remaining micro-batches unless the window's last one was skipped.
``train.max_bad_steps`` consecutive non-finite steps stop training (a checkpoint of the last good weights is
written, exit status 1).
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Dict, Optional

import torch

from mome.config import cache_dir, save_config
from mome.config import run_dir as config_run_dir
from mome.training import checkpoint as ckpt_lib
from mome.training.diagnostics import grad_group_norms
from mome.training.faults import EXIT_TERMINATED, BadStepCounter, StopRequest, TooManyBadSteps, corrupt_batch
from mome.training.logging import Progress, RunLogger
from mome.training.optim import build_optimizer, build_scheduler
from mome.training.precision import apply_precision
from mome.training.reproducible import epoch_batches, mix_seed, pinned_rng, resume_skip, seeded_loader
from mome.training.run_lock import RunFolderBusyError, RunLock
from mome.training.stats import Accumulator, StepStats, Sums, skipped
from mome.training.validation import validate

# ------------------------------------------------------------------------------------------------------------
# set-up


def resolve_precision(precision: str) -> str:
    """Accelerate's ``mixed_precision`` for ``train.precision``: auto = bf16 on a bf16-capable GPU. On a CPU no
    autocast: there bf16 means bf16 frozen backbones with fp32 trainable parameters (``mome.training.precision``)."""
    if not torch.cuda.is_available():
        return "no"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16"}[precision]


def make_accelerator(cfg):
    """The Accelerator of a run: gloo (and cpu=True outside DeepSpeed) on CPU with several processes; DeepSpeed json
    ``auto`` values for clipping and micro-batch size filled from the config."""
    from accelerate import Accelerator
    from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs,
                                  parse_flag_from_env)

    handlers = []
    cpu_multi = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if cpu_multi:
        # Without gloo, DeepSpeed on CPU degrades to one process (docs/environment.md#deepspeed); in one process it must not be
        # passed. Without cpu=True, DDP on CPU reports 2 processes but never wraps the model (no gradient sync);
        # under DeepSpeed cpu=True would silently replace DeepSpeed by plain DDP, so it is not passed there.
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
    if cfg.model.matryoshka == "sample":  # projectors of the rates not drawn this step get no gradient
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    acc = Accelerator(mixed_precision=resolve_precision(cfg.train.precision), cpu=cpu_multi and not deepspeed,
                      gradient_accumulation_steps=int(cfg.train.grad_accum), kwargs_handlers=handlers)
    if acc.num_processes > 1 and acc.distributed_type == DistributedType.NO:
        raise RuntimeError(f"{acc.num_processes} processes but no distributed backend: gradients would not be "
                           f"synchronised (launch with one of configs/accelerate/*.yaml)")
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None:
        ds = plugin.deepspeed_config
        if ds.get("gradient_clipping", "auto") == "auto":  # accelerate's own fill would be 1.0
            ds["gradient_clipping"] = float(cfg.train.grad_clip)
        elif float(ds["gradient_clipping"]) != float(cfg.train.grad_clip) and acc.is_main_process:
            print(f"[train] note: the DeepSpeed json's gradient_clipping={ds['gradient_clipping']} is used, not "
                  f"train.grad_clip={cfg.train.grad_clip}", file=sys.stderr)
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # bucketed batches have no fixed size
            ds["train_micro_batch_size_per_gpu"] = 1
    return acc


@dataclass
class TrainerState:
    """Where training stands; saved with every checkpoint (``register_for_checkpointing``)."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches this process has consumed in the current epoch (checkpoints also
    # store the global position, batch_in_epoch x processes, and the process count: see Trainer.place)
    samples: int = 0  # training utterances seen, all processes
    bad_consecutive: int = 0
    bad_total: int = 0
    time_up: int = 0  # 1: training stopped at train.max_minutes (a resume with the same budget is then finished)

    def state_dict(self) -> Dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


def config_changes(old_path: Path, cfg) -> list:
    """Keys whose values differ between a saved config file and ``cfg`` (``train.resume`` and
    ``train.trust_checkpoint`` ignored)."""
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(OmegaConf.load(old_path), resolve=True)
    new = OmegaConf.to_container(cfg, resolve=True)

    def diff(a, b, prefix=""):
        if isinstance(a, dict) and isinstance(b, dict):
            out = []
            for k in sorted(set(a) | set(b)):
                out += diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
            return out
        return [] if a == b else [prefix]

    return [k for k in diff(old, new) if k not in ("train.resume", "train.trust_checkpoint")]


def resolve_resume(cfg, rdir: Path, deepspeed: bool = False, say=None) -> tuple:
    """``(checkpoint, manifest)`` to resume from (``train.resume``), or ``(None, None)`` for a fresh run.

    Every candidate is verified (``checkpoint.check_resumable``): ``auto`` falls back to the newest checkpoint that
    verifies and says (``say``) which newer ones it skipped and why; an explicit path that fails is an error."""
    mode = cfg.train.resume
    existing = ckpt_lib.list_checkpoints(rdir)
    key_dir, trust = cache_dir(cfg), bool(cfg.train.trust_checkpoint)
    if mode == "":
        if existing:
            raise SystemExit(f"config error: {rdir} already holds checkpoints ({existing[-1].name}); pass "
                             f"train.resume=auto to continue that run, or choose another run_name / output_dir")
        return None, None
    candidates = existing[::-1] if mode == "auto" else [ckpt_lib.latest_checkpoint(mode)]
    failures = []
    for ckpt in candidates:
        try:
            manifest = ckpt_lib.check_resumable(ckpt, key_dir, deepspeed=deepspeed, trust=trust)
        except ckpt_lib.CheckpointError as exc:
            failures.append(str(exc))
            if say is not None and mode == "auto":
                say(f"[train] warning: cannot resume from {ckpt.name}: {exc}")
            continue
        if failures and say is not None:
            say(f"[train] warning: resuming from {ckpt} instead, the newest checkpoint that verifies")
        return ckpt, manifest
    if not candidates:
        return None, None
    raise SystemExit(f"resume error: no checkpoint of {rdir if mode == 'auto' else mode} can be resumed: "
                     + " | ".join(failures))


def build_parts(cfg):
    """(model, train loader, validation loader or None) of a config."""
    from mome.data import build_dataloader
    from mome.models import build_model

    model = build_model(cfg)
    train_loader = seeded_loader(build_dataloader(cfg, "train", train=True), int(cfg.train.seed))
    val_loader = build_dataloader(cfg, "val", train=False, max_utterances=int(cfg.train.val_utterances))
    if len(val_loader.dataset) == 0:
        val_loader = None
    return model, train_loader, val_loader


def weights_digest(model) -> str:
    """SHA-256 over the trainable parameters (names, shapes, exact bytes), for cross-process comparison."""
    import hashlib

    h = hashlib.sha256()
    params = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda item: item[0])
    for name, p in params:
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------
# the loop


class After(Enum):
    """What the loop does after an optimizer step."""

    NEXT = "next"  # the next micro-batch
    END = "end"  # training is over (last step or time budget): final validation and checkpoint
    STOP = "stop"  # a stop signal: the checkpoint is written, exit 143


@dataclass
class Window:
    """The micro-batches of the optimizer step being accumulated, as all processes agreed on them."""

    bad: bool = False  # a non-finite loss on some process
    empty: bool = False  # a batch of unreadable samples only (data.skip_bad) on some process
    last_skipped: bool = False  # the latest micro-batch got no backward
    stop: bool = False  # a stop signal on some process, as of the latest micro-batch
    loss: float = 0.0  # sample-weighted loss sum of the micro-batches not skipped
    n: float = 0.0  # and their samples

    def add(self, reduced: Sums) -> None:
        self.bad |= reduced.total("bad") > 0
        self.empty |= reduced.total("empty") > 0
        self.stop = reduced.total("stop") > 0
        self.last_skipped = skipped(reduced)
        if not self.last_skipped:
            self.loss += reduced.total("loss")
            self.n += reduced.total("n")

    def mean_loss(self) -> float:
        return self.loss / self.n if self.n else float("nan")


@dataclass
class StepReport:
    """An optimizer step as logged."""

    step: int
    lr: float
    grad_norm: Optional[float]  # None when the step was dropped before clipping
    group_norms: Optional[Dict]  # gradient norms per parameter group, on the main process at logging steps
    too_many_bad: bool  # this step makes train.max_bad_steps non-finite ones in a row: stop once it is logged


class Trainer:
    def __init__(self, cfg):
        cfg, self.precision_note = apply_precision(cfg)  # backbone dtypes resolved before the config is saved
        self.cfg = cfg
        self.accelerator = acc = make_accelerator(cfg)
        self.is_main = acc.is_main_process
        self.rdir = config_run_dir(cfg)
        self.lock = RunLock(self.rdir)
        if self.is_main:  # before anything in the run folder is read or written
            try:
                self.lock.acquire()
            except RunFolderBusyError as exc:
                raise SystemExit(f"train: {exc}") from None
        try:
            self._setup(cfg, acc)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, cfg, acc) -> None:
        from accelerate.utils import set_seed

        say = (lambda msg: print(msg, file=sys.stderr)) if self.is_main else None
        self.resume_from, manifest = resolve_resume(cfg, self.rdir, deepspeed=ckpt_lib._is_deepspeed(acc), say=say)
        if self.is_main:
            self._save_run_config(cfg)

        set_seed(int(cfg.train.seed))  # identical initial trainable weights on every process
        model, train_loader, self.val_loader = build_parts(cfg)
        self.scales = list(model.scales)
        self.stats = StepStats([s.name for s in self.scales], model.expert_load_shape)
        raw_optimizer = build_optimizer(model, cfg.train)
        self.model, self.optimizer, self.train_loader = acc.prepare(model, raw_optimizer, train_loader)
        # per-process streams from here on (dropout, sampled scales); checkpointed and restored exactly
        set_seed(int(cfg.train.seed) + acc.process_index)

        self.grad_accum = acc.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(len(self.train_loader) / self.grad_accum)
        if self.steps_per_epoch == 0:
            raise SystemExit(f"data error: the training split gives no batch to process {acc.process_index} "
                             f"(corpus too small for {acc.num_processes} processes?)")
        t = cfg.train
        self.total_steps = int(t.max_steps) if t.max_steps > 0 else int(t.epochs) * self.steps_per_epoch
        # Stepped by hand once per optimizer step, on the raw AdamW's param groups (which DeepSpeed's ZeRO wrapper
        # keeps using); not prepared, since Accelerate would step it once per process. Checkpointed in trainer.json,
        # with the trainer position.
        self.scheduler = build_scheduler(raw_optimizer, t, self.total_steps)
        self.state = TrainerState()
        self.bad = BadStepCounter(int(t.max_bad_steps))
        if self.resume_from is not None:
            self._resume(manifest)

        self.is_ds = ckpt_lib._is_deepspeed(acc)
        self.zero3 = ckpt_lib._zero_stage(acc) == 3
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = float(t.grad_clip) if t.grad_clip > 0 else float("inf")
        self.inject = {int(s) for s in t.inject_nan_steps}
        self.last_saved = self.last_val = self.state.step if self.resume_from is not None else -1

    def _save_run_config(self, cfg) -> None:
        """``config.yaml`` of the run folder (main process), with a warning for keys a resume changes."""
        self.rdir.mkdir(parents=True, exist_ok=True)
        old = self.rdir / "config.yaml"
        if self.resume_from is not None and old.is_file():
            changed = config_changes(old, cfg)
            if changed:
                print(f"[train] warning: resuming with changed config keys: {', '.join(changed)}", file=sys.stderr)
        save_config(cfg, old)

    def _resume(self, manifest) -> None:
        """Weights, optimizer, schedule, RNG states and the position of the verified checkpoint ``resume_from``."""
        t, st = self.cfg.train, self.state
        try:
            saved = ckpt_lib.restore_checkpoint(self.accelerator, self.model, self.resume_from,
                                                optimizer=self.optimizer, scheduler=self.scheduler,
                                                key_dir=cache_dir(self.cfg), trust=bool(t.trust_checkpoint),
                                                manifest=manifest)
        except ckpt_lib.CheckpointError as exc:
            raise SystemExit(f"resume error: {exc}") from None
        self.place(saved)
        self.bad.load_state_dict({"consecutive": st.bad_consecutive, "total": st.bad_total})
        if st.time_up and float(t.max_minutes) > 0:
            self.total_steps = st.step  # that run ended at its time budget: it is finished
        if self.is_main:
            print(f"[train] resumed from {self.resume_from} (step {st.step}, epoch {st.epoch}, "
                  f"batch {st.batch_in_epoch})", file=sys.stderr)

    # ---- pieces

    def position(self) -> dict:
        """The trainer position as saved: ``TrainerState`` plus the process count, gradient accumulation and the
        global batch position in the epoch (micro-batches consumed by all processes together)."""
        n = self.accelerator.num_processes
        return {**self.state.state_dict(), "num_processes": n, "grad_accum": self.grad_accum,
                "global_batch_in_epoch": self.state.batch_in_epoch * n}

    def place(self, saved: dict) -> None:
        """Continue from a restored position, at the same global sample on any process count (or refuse)."""
        pos = dict(saved["trainer"])
        then = int(pos.pop("num_processes", saved["num_processes"]))
        accum_then = int(pos.pop("grad_accum", self.grad_accum))
        global_batch = int(pos.pop("global_batch_in_epoch", int(pos.get("batch_in_epoch", 0)) * then))
        self.state.load_state_dict({k: v for k, v in pos.items() if k in TrainerState.__dataclass_fields__})
        now = self.accelerator.num_processes
        try:
            self.state.batch_in_epoch = resume_skip(global_batch, then, now)
        except ValueError as exc:
            raise SystemExit(f"resume error: {self.resume_from}: {exc}") from None
        if self.is_main and then != now:
            print(f"[train] warning: the checkpoint was written by {then} process(es), resuming on {now}: the data "
                  f"continues at the same global sample (batch {global_batch} of epoch {self.state.epoch}), but the "
                  f"per-process random streams (dropout, sampled scales) differ from an uninterrupted run",
                  file=sys.stderr)
        if self.is_main and then * accum_then != now * self.grad_accum:
            print(f"[train] warning: {then} process(es) x grad_accum {accum_then} before, {now} x {self.grad_accum} "
                  f"now: an optimizer step now averages {now * self.grad_accum} micro-batches instead of "
                  f"{then * accum_then} (set train.grad_accum={then * accum_then // now} to keep the global batch)"
                  if (then * accum_then) % now == 0 else
                  f"[train] warning: the global batch per optimizer step changes from {then * accum_then} to "
                  f"{now * self.grad_accum} micro-batches", file=sys.stderr)

    def check_sync(self, step: int) -> None:
        """With several processes: every process must hold bit-identical trainable weights. Their digests are
        logged (``split: "sync"``) and a mismatch stops training. Skipped under ZeRO-3 (parameters partitioned)."""
        acc = self.accelerator
        if acc.num_processes == 1 or self.zero3:
            return
        from accelerate.utils import gather_object

        digests = gather_object([weights_digest(acc.unwrap_model(self.model))])
        if self.is_main:
            self.logger.log({"step": step, "split": "sync", "num_processes": acc.num_processes,
                             "distributed_type": acc.distributed_type.value, "weight_digests": digests})
        if len(set(digests)) != 1:
            raise RuntimeError(f"step {step}: processes hold different trainable weights (digests {digests}); "
                               f"gradient synchronisation is broken")

    def save(self, step: int) -> Path:
        self.check_sync(step)
        self.state.bad_consecutive, self.state.bad_total = self.bad.consecutive, self.bad.total
        path = ckpt_lib.save_checkpoint(self.accelerator, self.model, self.rdir, step, int(self.cfg.train.keep_last),
                                        optimizer=self.optimizer, scheduler=self.scheduler,
                                        trainer_state=self.position(), key_dir=cache_dir(self.cfg), run_config=self.cfg)
        self.last_saved = step
        if self.is_main:
            self.progress.write(f"[train] checkpoint {path}")
        return path

    def validate(self, step: int) -> None:
        self.last_val = step
        trained_s = self.train_seconds()
        if self.val_loader is None:
            return
        with pinned_rng(mix_seed(self.cfg.train.seed, step)):  # leaves the training RNG stream untouched
            rec = validate(self.accelerator, self.model, self.cfg, self.val_loader, self.scales, zero3=self.zero3)
        if self.is_main and rec:
            rec["train_wall_s"] = trained_s
            self.logger.log({"step": step, "split": "val", **rec})
            wer = " ".join(f"{k}={100 * v:.1f}%" for k, v in rec.get("wer", {}).items())
            gap = " ".join(f"{k}={v:+.2f}" for k, v in rec.get("reading_gap", {}).items())
            self.progress.write(f"[val] step {step}: val loss {rec.get('loss', float('nan')):.4f}"
                                + (f" | val WER {wer}" if wer else "")
                                + (f" | reading gap (nats/token, rolled - own media) {gap}" if gap else "")
                                + f" | {rec['train_wall_s']:.0f} s of training")

    def out_of_time(self, step: int) -> bool:
        """``train.max_minutes`` (> 0) of training wall time spent (validation excluded): stop after this step."""
        budget = float(self.cfg.train.max_minutes)
        if budget > 0 and not self.time_up and self.train_seconds() >= 60 * budget:
            self.time_up = True
            self.state.time_up = 1
            if self.is_main:
                self.progress.write(f"[train] train.max_minutes={budget:g} reached at step {step} of "
                                    f"{self.total_steps}: stopping here")
        return self.time_up

    def train_seconds(self) -> float:
        """Wall seconds of this process's training so far (this session), validation and checkpoints excluded."""
        now = time.perf_counter()
        return now - getattr(self, "_t_start", now) - getattr(self, "_t_paused", 0.0)

    # ---- the loop, top to bottom

    def fit(self) -> Path:
        """Train to ``total_steps`` (or resume there). Exits 143 after SIGTERM/SIGINT, 1 after too many bad steps."""
        self._start_run()
        try:
            exit_code = self._train()
        finally:
            self.progress.close()
            self.stop.restore()
        self.finish()
        if exit_code:
            raise SystemExit(exit_code)
        return self.rdir

    def _start_run(self) -> None:
        """Logger, progress bar, signal handlers, the logging interval and the training clock."""
        cfg, acc, t = self.cfg, self.accelerator, self.cfg.train
        self.val_every, self.save_every, self.log_every = int(t.val_every), int(t.save_every), max(1, int(t.log_every))
        self.logger = RunLogger(cfg, self.rdir, enabled=self.is_main,
                                resume_step=self.state.step if self.resume_from is not None else None)
        self.progress = Progress(self.total_steps, self.state.step, enabled=self.is_main and cfg.logging.progress)
        self.stop = StopRequest()
        self.interval = Accumulator()
        self._t_start, self._t_paused, self.time_up = time.perf_counter(), 0.0, False
        if self.is_main:
            self.progress.write(
                f"[train] {self.rdir}: {acc.num_processes} process(es), {acc.distributed_type.value}, "
                f"precision: {self.precision_note}, {self.steps_per_epoch} steps/epoch, {self.total_steps} steps, "
                f"grad_accum={self.grad_accum}, scales={','.join(s.name for s in self.scales)}")
        self.model.train()

    def _train(self) -> int:
        """Epochs until the last step or the time budget, then the final validation and checkpoint. Returns the exit
        status: 143 after a stop signal, 1 after too many bad steps (each with a checkpoint), else 0."""
        try:
            while self.state.step < self.total_steps and not self.time_up:
                if self._epoch() is After.STOP:
                    return EXIT_TERMINATED
        except TooManyBadSteps as exc:
            # the weights were never updated by the bad steps: checkpoint the last good state, then stop
            self.save(self.state.step)
            if self.is_main:
                self.progress.write(f"[train] error: {exc}")
            return 1
        self._final_checkpoint()
        return 0

    def _epoch(self) -> After:
        """The rest of the current epoch (from the resume position): micro-batches, an optimizer step at the end of
        each window. An epoch run to its end is closed by ``_end_of_epoch``; one left at a stop or at the last step
        is not."""
        st, window = self.state, Window()
        for batch in epoch_batches(self.accelerator, self.train_loader, st.epoch, st.batch_in_epoch,
                                   int(self.cfg.train.seed)):
            self._micro_batch(batch, window)
            if not self.accelerator.sync_gradients:
                continue
            after = self._step_boundary(window)
            if after is not After.NEXT:
                return after
            window = Window()
        self._end_of_epoch()
        return After.NEXT

    def _micro_batch(self, batch, window: Window) -> None:
        """One micro-batch: forward/backward, the data position, the interval's and the window's sums."""
        with self.accelerator.accumulate(self.model):
            reduced = self.micro_step(batch)
        self.state.batch_in_epoch += 1
        self.state.samples += int(reduced.total("n"))
        self.interval.add(reduced)
        window.add(reduced)

    def micro_step(self, batch) -> Sums:
        """Forward (and backward unless some process must skip) one micro-batch; returns its sums, reduced."""
        out, bad = None, False
        if batch is not None:
            if self.state.step + 1 in self.inject:
                batch = corrupt_batch(batch)
            out = self.model(batch)
            bad = not bool(torch.isfinite(out.loss.detach()).all())
        n = len(batch["ids"]) if batch is not None else 0
        sums = self.stats.record(out, bad=bad, empty=batch is None, stop=self.stop.requested, n=n)
        reduced = sums.reduce(self.accelerator)
        if not skipped(reduced):
            self.accelerator.backward(out.loss)
        return reduced

    def _step_boundary(self, window: Window) -> After:
        """The optimizer step that closes ``window``, its log line, then what follows it."""
        report = self._take_step(window)
        self._log_step(report, window)
        if report.too_many_bad:
            raise self.bad.error(report.step)
        if window.stop:
            self.save(report.step)
            return After.STOP
        return self._after_step(report.step)

    def _take_step(self, window: Window) -> StepReport:
        """Clip and step (or drop the window), advance the step count and the bad-step counter."""
        st = self.state
        lr = self.scheduler.get_last_lr()[0]  # the lr of this step
        group_norms = (grad_group_norms(self.accelerator.unwrap_model(self.model))
                       if (st.step + 1) % self.log_every == 0 and self.is_main else None)
        stepped, bad, grad_norm = self.optimizer_step(window.bad, last_skipped=window.last_skipped)
        st.step += 1
        self.interval.count_step(stepped)
        too_many_bad = self.bad.record(bad)
        if self.is_main and bad:
            self.progress.write(f"[train] step {st.step}: non-finite loss or gradient, step skipped "
                                f"({self.bad.consecutive} in a row)")
        elif self.is_main and window.empty and not stepped:
            self.progress.write(f"[train] step {st.step}: only unreadable samples (data.skip_bad), step skipped")
        return StepReport(st.step, lr, grad_norm, group_norms, too_many_bad)

    def optimizer_step(self, window_bad: bool, last_skipped: bool) -> tuple:
        """At a window boundary: clip, step (or drop the window). Returns (stepped, bad, grad_norm)."""
        acc = self.accelerator
        grad_norm = None
        if self.is_ds:  # DeepSpeed clipped and stepped inside backward, unless the last micro-batch was skipped
            stepped = not last_skipped
            if stepped:
                grad_norm = acc.clip_grad_norm_(self.trainable, self.clip)
        else:
            if not (window_bad or last_skipped):
                grad_norm = acc.clip_grad_norm_(self.trainable, self.clip)
                if not math.isfinite(float(grad_norm)):
                    window_bad = True
            stepped = not (window_bad or last_skipped)
            if stepped:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if stepped:
            self.scheduler.step()
        return stepped, window_bad, (float(grad_norm) if grad_norm is not None else None)

    def _log_step(self, report: StepReport, window: Window) -> None:
        """The progress bar every step; the interval's record every ``log_every`` steps, at the last step, at a stop
        signal and before a stop for bad steps."""
        step, interval = report.step, self.interval
        self.progress.update(1, loss=window.mean_loss(), lr=report.lr, **{"samples/s": interval.samples_per_s()})
        if not (step % self.log_every == 0 or step == self.total_steps or window.stop or report.too_many_bad):
            return
        rec = interval.summary()
        rec.update(lr=report.lr, epoch=self.state.epoch, samples=self.state.samples,
                   skipped_steps=interval.skipped_steps, bad_steps_total=self.bad.total)
        if report.grad_norm is not None:
            rec["grad_norm"] = report.grad_norm
        if report.group_norms:
            rec["grad_norm_group"] = report.group_norms
        rec["train_wall_s"] = self.train_seconds()
        if self.is_main:
            self.logger.log({"step": step, "split": "train", **rec})
        interval.reset()

    def _after_step(self, step: int) -> After:
        """Validation and checkpoint at ``val_every`` / ``save_every``; the end at the last step or the time
        budget."""
        out_of_time = self.out_of_time(step)  # before the checkpoint, which then records it
        with self._paused():
            if self.val_every > 0 and step % self.val_every == 0:
                self.validate(step)
            if self.save_every > 0 and step % self.save_every == 0:
                self.save(step)
        return After.END if step >= self.total_steps or out_of_time else After.NEXT

    def _end_of_epoch(self) -> None:
        """The next epoch starts at its first batch; validation and checkpoint here when their period is 0."""
        st = self.state
        st.epoch += 1
        st.batch_in_epoch = 0
        with self._paused():
            if self.val_every == 0 and st.step != self.last_val:
                self.validate(st.step)
            if self.save_every == 0 and st.step < self.total_steps:
                self.save(st.step)

    def _final_checkpoint(self) -> None:
        """Validation and checkpoint of the last step, unless they were just taken."""
        if self.state.step != self.last_val:
            self.validate(self.state.step)
        if self.state.step != self.last_saved:
            self.save(self.state.step)

    @contextmanager
    def _paused(self):
        """Time inside does not count as training: not in samples/s, ``train_wall_s`` or ``train.max_minutes``."""
        t0 = time.perf_counter()
        yield
        paused = time.perf_counter() - t0
        self.interval.t0 += paused
        self._t_paused += paused

    def finish(self) -> None:
        if self.is_main:
            self.logger.close()
            try:
                from mome.training.curves import plot_loss_curve

                print(f"[train] loss curve: {plot_loss_curve(self.rdir)}", file=sys.stderr)
            except (ValueError, FileNotFoundError) as exc:
                print(f"[train] no loss curve: {exc}", file=sys.stderr)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def train(cfg) -> Path:
    """Train (or resume) the run of ``cfg``; returns the run folder (see ``Trainer.fit`` for exit statuses)."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.lock.release()
