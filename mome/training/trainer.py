"""The training loop: one Accelerate loop for single process, DDP (GPU or CPU/gloo) and DeepSpeed ZeRO.

``train(cfg)`` builds the model (``mome.models.build_model``) and the loaders (``mome.data.build_dataloader``), then
runs optimizer steps with gradient accumulation, clipping, the cosine schedule, periodic validation (loss on the
validation split, greedy WER on ``train.val_wer_samples`` utterances per scale), checkpoints and logging.

Exact resume. A checkpoint is taken only at an optimizer-step boundary and records (through ``accelerator.save_state``)
the optimizer, the schedule, every process's RNG states and the trainer position (epoch, micro-batches consumed in
the epoch, step). Resuming reloads them, sets the epoch on the loader, skips the consumed batches
(``accelerator.skip_first_batches``) and continues, so the per-step losses equal those of an uninterrupted run.
Two details make that hold: each epoch's data iterator is created under an RNG pinned to (seed, epoch), so creating
it mid-epoch on resume draws the same worker seeds and does not shift the training RNG stream; and the data pipeline
itself derives its randomness from (seed, epoch, utterance) rather than from a global RNG.

Cross-process agreement. After every micro-batch forward, one ``all_reduce`` carries the loss, the non-finite flag,
the stop-signal flag, the batch size, the per-scale CE, the aux losses and the expert load, so every process makes the
same skip/stop decision and the logs hold global means.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from mome.config import run_dir as config_run_dir
from mome.config import save_config
from mome.training import checkpoint as ckpt_lib
from mome.training.faults import EXIT_TERMINATED, BadStepCounter, StopRequest, TooManyBadSteps, corrupt_batch
from mome.training.logging import Progress, RunLogger
from mome.training.optim import build_optimizer, build_scheduler


# ------------------------------------------------------------------------------------------------------------
# set-up


def resolve_precision(precision: str) -> str:
    """Accelerate's ``mixed_precision`` for ``train.precision``: auto = bf16 on a bf16-capable GPU, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) else "no"
    if precision == "bf16" and not torch.cuda.is_available():
        print("[train] warning: train.precision=bf16 on CPU is far slower than fp32 here (ENVIRONMENT.md)",
              file=sys.stderr)
    return {"fp32": "no", "bf16": "bf16"}[precision]


def make_accelerator(cfg):
    """The Accelerator for this run (gloo on CPU with several processes, DeepSpeed json values filled from cfg)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs
    from accelerate.utils import parse_flag_from_env

    handlers = []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_multi = world > 1 and not torch.cuda.is_available()
    deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if cpu_multi:
        # Without gloo, DeepSpeed on CPU degrades to one process (ENVIRONMENT.md); in one process it must not be
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
        if ds.get("gradient_clipping", "auto") == "auto":  # accelerate's own default would be 1.0
            ds["gradient_clipping"] = float(cfg.train.grad_clip)
        elif float(ds["gradient_clipping"]) != float(cfg.train.grad_clip) and acc.is_main_process:
            print(f"[train] note: DeepSpeed json gradient_clipping={ds['gradient_clipping']} overrides "
                  f"train.grad_clip={cfg.train.grad_clip}", file=sys.stderr)
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # bucketed batches have no fixed size
            ds["train_micro_batch_size_per_gpu"] = 1
    return acc


@dataclass
class TrainerState:
    """Where training stands; saved with every checkpoint (``register_for_checkpointing``)."""

    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches this process has consumed in the current epoch
    samples: int = 0  # training utterances seen, all processes
    bad_consecutive: int = 0
    bad_total: int = 0

    def state_dict(self) -> Dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


@contextmanager
def pinned_rng(seed: int):
    """Run the block under python/numpy/torch RNGs seeded with ``seed``; restore the outer states afterwards."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


def _set_epoch(loader, epoch: int) -> None:
    """``set_epoch`` on the loader and every wrapped batch sampler / sampler / dataset that has one."""
    seen, todo = set(), [loader]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
        for attr in ("batch_sampler", "sampler", "dataset"):
            todo.append(getattr(obj, attr, None))


def epoch_batches(accelerator, loader, epoch: int, skip: int, seed: int) -> Iterator[Dict]:
    """Batches of ``epoch`` after the first ``skip`` (resume); the iterator is created under an RNG pinned to
    (seed, epoch) so that it is identical whether created at the start of the epoch or in its middle."""
    dl = accelerator.skip_first_batches(loader, skip) if skip else loader
    _set_epoch(dl, epoch)
    it = iter(dl)
    with pinned_rng(seed * 1_000_003 + epoch):
        try:
            first = next(it)
        except StopIteration:
            return
    yield first
    yield from it


def _check_resume_config(path: Path, cfg) -> None:
    """Warn about config keys that changed since the run started (except train.resume)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        return
    old = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    new = OmegaConf.to_container(cfg, resolve=True)

    def diff(a, b, prefix=""):
        keys = set(a) | set(b) if isinstance(a, dict) and isinstance(b, dict) else set()
        if not keys:
            return [] if a == b else [prefix]
        out = []
        for k in sorted(keys):
            out += diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out

    changed = [k for k in diff(old, new) if k != "train.resume"]
    if changed:
        print(f"[train] warning: resuming with config keys changed since {path}: {', '.join(changed)}",
              file=sys.stderr)


def resolve_resume(cfg, rdir: Path) -> Optional[Path]:
    """The checkpoint to resume from, or None for a fresh run (``train.resume``)."""
    mode = cfg.train.resume
    existing = ckpt_lib.list_checkpoints(rdir)
    if mode == "":
        if existing:
            raise SystemExit(f"config error: {rdir} already holds checkpoints ({existing[-1].name}); pass "
                             f"train.resume=auto to continue that run, or choose another run_name / output_dir")
        return None
    if mode == "auto":
        return existing[-1] if existing else None
    return ckpt_lib.latest_checkpoint(mode)


# ------------------------------------------------------------------------------------------------------------
# per-step statistics


class StepStats:
    """Packs one micro-batch's numbers into a vector so that one all_reduce gives every process the global view."""

    def __init__(self, scale_names: List[str], load_shape: Optional[torch.Size]):
        self.names = scale_names
        self.index = {n: i for i, n in enumerate(scale_names)}
        self.load_shape = load_shape
        self.n_load = int(np.prod(load_shape)) if load_shape is not None else 0
        self.size = 6 + 2 * len(scale_names) + self.n_load

    def pack(self, out, loss: torch.Tensor, bad: bool, stop: bool, n: int) -> torch.Tensor:
        S = len(self.names)
        v = torch.zeros(self.size, dtype=torch.float64)
        v[0] = 0.0 if bad else float(loss.detach()) * n  # sample-weighted, so the global mean is exact
        v[1], v[2], v[3] = float(bad), float(stop), float(n)
        if not bad:
            aux = getattr(out, "aux", None) or {}
            v[4] = float(aux["lb"].detach()) * n if "lb" in aux else 0.0
            v[5] = float(aux["z"].detach()) * n if "z" in aux else 0.0
            for name, ce in (getattr(out, "ce", None) or {}).items():
                i = self.index[name]
                v[6 + i] = float(ce.detach()) * n
                v[6 + S + i] = n
            load = getattr(out, "expert_load", None)
            if self.n_load and load is not None:
                v[6 + 2 * S:] = load.detach().double().reshape(-1).cpu() * n
        return v


class Accumulator:
    """Global sums over the micro-batches of a logging interval."""

    def __init__(self, stats: StepStats):
        self.stats = stats
        self.reset()

    def reset(self):
        self.sum = torch.zeros(self.stats.size, dtype=torch.float64)
        self.t0 = time.perf_counter()
        self.steps = 0
        self.bad_steps = 0

    def add(self, reduced: torch.Tensor):
        if reduced[1] == 0:  # bad micro-batches carry no numbers
            self.sum += reduced

    def samples_per_s(self) -> float:
        return float(self.sum[3]) / max(time.perf_counter() - self.t0, 1e-9)

    def summary(self) -> Dict:
        s, S = self.sum, len(self.stats.names)
        n = float(s[3])
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rec: Dict = {"samples_per_s": n / elapsed}
        if n > 0:
            rec["loss"] = float(s[0]) / n
            rec["lb"] = float(s[4]) / n
            if float(s[5]):
                rec["z"] = float(s[5]) / n
            rec["ce"] = {name: float(s[6 + i]) / float(s[6 + S + i])
                         for i, name in enumerate(self.stats.names) if float(s[6 + S + i]) > 0}
            if self.stats.n_load:
                load = (s[6 + 2 * S:] / n).reshape(self.stats.load_shape)  # [layers, experts] mean fractions
                mean = load.mean(dim=1).clamp_min(1e-12)
                cv = load.std(dim=1, unbiased=False) / mean
                rec["expert_cv"] = [round(float(x), 5) for x in cv]
                rec["expert_cv_mean"] = float(cv.mean())
                rec["dead_expert_frac"] = float((load < 1e-6).double().mean())
        return rec


# ------------------------------------------------------------------------------------------------------------
# validation


def _unwrap(accelerator, model):
    return accelerator.unwrap_model(model)


@torch.no_grad()
def validate(accelerator, model, cfg, val_loader, scales) -> Dict:
    """Validation loss per scale (utterance-weighted mean over the split, sharded over processes) and greedy WER on
    the first ``train.val_wer_samples`` validation utterances per scale (main process)."""
    from mome.evaluation.wer import score_utterance

    model.eval()
    names = [s.name for s in scales]
    S = len(names)
    world, rank = accelerator.num_processes, accelerator.process_index
    zero3 = ckpt_lib._zero_stage(accelerator) == 3
    sums = torch.zeros(2 + 2 * S, dtype=torch.float64)
    n_batches = len(val_loader) if val_loader is not None else 0
    mine = set(range(rank, n_batches, world))  # batch i goes to process i % world
    # ZeRO-3 gathers parameters collectively in every forward: all processes must run as many forwards, so a
    # process with one batch fewer runs batch 0 again with weight 0
    pad = math.ceil(n_batches / world) - len(mine) if zero3 else 0
    if n_batches:
        for i, batch in enumerate(val_loader):
            if i in mine:
                weight = float(len(batch["ids"]))
            elif pad and i == 0:
                weight, pad = 0.0, pad - 1
            else:
                continue
            batch = _to_device(batch, accelerator.device)
            out = model(batch, scales=scales)
            sums[0] += float(out.loss) * weight
            sums[1] += weight
            for name, ce in out.ce.items():
                j = names.index(name)
                sums[2 + j] += float(ce) * weight
                sums[2 + S + j] += weight
    sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    rec: Dict = {}
    if sums[1] > 0:
        rec["loss"] = float(sums[0] / sums[1])
        rec["ce"] = {n: float(sums[2 + j] / sums[2 + S + j]) for j, n in enumerate(names) if sums[2 + S + j] > 0}
    n_wer = int(cfg.train.val_wer_samples)
    if n_wer > 0 and val_loader is not None and zero3:
        if accelerator.is_main_process:
            print("[train] note: validation WER is skipped under ZeRO-3 (generate would need synced processes)",
                  file=sys.stderr)
    elif n_wer > 0 and val_loader is not None and accelerator.is_main_process:
        unwrapped = _unwrap(accelerator, model)
        errors = {n: 0 for n in names}
        words = {n: 0 for n in names}
        examples = {}
        done = 0
        for batch in val_loader:
            batch = _to_device(batch, accelerator.device)
            take = min(len(batch["ids"]), n_wer - done)
            if take < len(batch["ids"]):
                batch = _slice_batch(batch, take)
            for scale in scales:
                hyps = unwrapped.generate(batch, scale, num_beams=1, max_new_tokens=int(cfg.eval.max_new_tokens))
                for uid, ref, hyp in zip(batch["ids"], batch["text"], hyps):
                    sc = score_utterance(uid, ref, hyp, strip_punctuation=cfg.eval.strip_punctuation)
                    errors[scale.name] += sc.word_errors
                    words[scale.name] += sc.ref_words
                    examples.setdefault(scale.name, f"{ref!r} -> {hyp!r}")
            done += take
            if done >= n_wer:
                break
        rec["wer"] = {n: errors[n] / max(words[n], 1) for n in names}
        rec["wer_samples"] = done
        rec["example"] = examples
    accelerator.wait_for_everyone()
    model.train()
    return rec


def _to_device(batch: Dict, device) -> Dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _slice_batch(batch: Dict, n: int) -> Dict:
    out = {}
    for k, v in batch.items():
        out[k] = v[:n]
    # trim padding to the new longest item so that greedy decoding sees the same tensors as a smaller batch would
    if "audio_lengths" in out and torch.is_tensor(out.get("audio")):
        out["audio"] = out["audio"][:, : int(out["audio_lengths"].max())]
    if "video_lengths" in out and torch.is_tensor(out.get("video")):
        out["video"] = out["video"][:, : int(out["video_lengths"].max())]
    return out


# ------------------------------------------------------------------------------------------------------------
# the loop


def _build(cfg):
    from mome.data import build_dataloader
    from mome.models import build_model

    model = build_model(cfg)
    train_loader = build_dataloader(cfg, "train", train=True)
    try:
        val_loader = build_dataloader(cfg, "val", train=False)
        if len(val_loader) == 0:
            val_loader = None
    except FileNotFoundError as exc:
        print(f"[train] no validation split ({exc}); validation is skipped", file=sys.stderr)
        val_loader = None
    return model, train_loader, val_loader


def train(cfg) -> Path:
    """Train (or resume) the run described by ``cfg``; returns the run folder. Exits 143 after SIGTERM/SIGINT."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg)
    is_main = accelerator.is_main_process
    rdir = config_run_dir(cfg)
    resume_from = resolve_resume(cfg, rdir)
    if is_main:
        rdir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            _check_resume_config(rdir / "config.yaml", cfg)
        save_config(cfg, rdir / "config.yaml")

    set_seed(int(cfg.train.seed))  # identical initial trainable weights on every process
    model, train_loader, val_loader = _build(cfg)
    scales = list(model.scales)
    raw_optimizer = build_optimizer(model, cfg.train)
    model, optimizer, train_loader = accelerator.prepare(model, raw_optimizer, train_loader)
    ckpt_lib.install_state_hooks(accelerator, model)
    # per-process streams from here on (augmentation, dropout, sampled scales); resumed exactly from checkpoints
    set_seed(int(cfg.train.seed) + accelerator.process_index)

    ga = accelerator.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_loader) / ga)
    if steps_per_epoch == 0:
        raise SystemExit(f"data error: the training split has no batches for process {accelerator.process_index} "
                         f"(check data.max_frames and the corpus size)")
    total_steps = int(cfg.train.max_steps) if cfg.train.max_steps > 0 else int(cfg.train.epochs) * steps_per_epoch
    # The scheduler is stepped by hand once per optimizer step (not prepared: Accelerate would step it once per
    # process) and checkpointed as a registered object, as is the trainer position.
    # It drives the raw AdamW's param groups, which DeepSpeed's ZeRO wrapper keeps using.
    scheduler = build_scheduler(raw_optimizer, cfg.train, total_steps)
    state = TrainerState()
    bad = BadStepCounter(int(cfg.train.max_bad_steps))
    accelerator.register_for_checkpointing(scheduler, state)

    if resume_from is not None:
        ckpt_lib.restore_checkpoint(accelerator, resume_from)
        bad.load_state_dict({"consecutive": state.bad_consecutive, "total": state.bad_total})
        if is_main:
            print(f"[train] resumed from {resume_from} (step {state.step}, epoch {state.epoch}, "
                  f"batch {state.batch_in_epoch})", file=sys.stderr)

    logger = RunLogger(cfg, rdir, enabled=is_main, resume_step=state.step if resume_from is not None else None)
    is_ds = ckpt_lib._is_deepspeed(accelerator)
    trainable = [p for p in model.parameters() if p.requires_grad]
    clip = float(cfg.train.grad_clip) if cfg.train.grad_clip > 0 else float("inf")
    inject = {int(s) for s in cfg.train.inject_nan_steps}
    stop = StopRequest()
    probe_load = None
    stats: Optional[StepStats] = None
    acc: Optional[Accumulator] = None
    progress = Progress(total_steps, state.step, enabled=is_main and cfg.logging.progress)
    if is_main:
        progress.write(f"[train] {rdir}: {accelerator.num_processes} process(es), {accelerator.distributed_type}, "
                       f"precision={accelerator.mixed_precision}, {steps_per_epoch} steps/epoch, "
                       f"{total_steps} steps, grad_accum={ga}, scales={','.join(s.name for s in scales)}")

    def save(step):
        state.bad_consecutive, state.bad_total = bad.consecutive, bad.total
        path = ckpt_lib.save_checkpoint(accelerator, model, rdir, step, int(cfg.train.keep_last))
        if is_main:
            progress.write(f"[train] checkpoint {path}")
        return path

    def run_validation(step):
        if val_loader is None:
            return
        with pinned_rng(int(cfg.train.seed)):  # deterministic, and leaves the training RNG stream untouched
            rec = validate(accelerator, model, cfg, val_loader, scales)
        if is_main and rec:
            logger.log({"step": step, "split": "val", **rec})
            wer = " ".join(f"{k}={100 * v:.1f}%" for k, v in rec.get("wer", {}).items())
            progress.write(f"[val] step {step}: loss {rec.get('loss', float('nan')):.4f} {wer}")

    last_saved = last_val = state.step if resume_from is not None else -1
    val_every, save_every, log_every = int(cfg.train.val_every), int(cfg.train.save_every), max(1, cfg.train.log_every)
    exit_code = 0
    model.train()
    try:
        while state.step < total_steps:
            window_bad = False
            step_loss = step_n = 0.0
            for batch in epoch_batches(accelerator, train_loader, state.epoch, state.batch_in_epoch,
                                       int(cfg.train.seed)):
                if state.step + 1 in inject:
                    batch = corrupt_batch(batch)
                with accelerator.accumulate(model):
                    out = model(batch)
                    loss = out.loss
                    if stats is None:
                        load = getattr(out, "expert_load", None)
                        stats = StepStats([s.name for s in scales], load.shape if load is not None else None)
                        acc = Accumulator(stats)
                    local_bad = not bool(torch.isfinite(loss.detach()).all())
                    vec = stats.pack(out, loss, local_bad, stop.requested, len(batch["ids"]))
                    reduced = accelerator.reduce(vec.to(accelerator.device), reduction="sum").cpu()
                    micro_bad = bool(reduced[1] > 0)
                    if not micro_bad:
                        accelerator.backward(loss)
                    window_bad |= micro_bad
                    acc.add(reduced)
                    if not micro_bad:
                        step_loss += float(reduced[0])
                        step_n += float(reduced[3])
                    del out, loss
                    state.batch_in_epoch += 1
                    state.samples += int(reduced[3])
                    if not accelerator.sync_gradients:
                        continue
                    # ---- optimizer-step boundary
                    grad_norm = None
                    lr = scheduler.get_last_lr()[0]  # the lr this step uses
                    if is_ds:  # DeepSpeed clipped and stepped inside backward unless this micro-batch was skipped
                        stepped = not micro_bad
                        if stepped:
                            grad_norm = accelerator.clip_grad_norm_(trainable, clip)
                    else:
                        if not window_bad:
                            grad_norm = accelerator.clip_grad_norm_(trainable, clip)
                            if not math.isfinite(float(grad_norm)):
                                window_bad = True
                        stepped = not window_bad
                        if stepped:
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    if stepped:
                        scheduler.step()
                    state.step += 1
                    step = state.step
                    acc.steps += 1
                    acc.bad_steps += int(window_bad)
                    if window_bad and is_main:
                        progress.write(f"[train] step {step}: non-finite loss or gradient; step skipped "
                                       f"({bad.consecutive + 1} in a row, {bad.total + 1} in total)")
                    bad.update(window_bad, step)  # raises TooManyBadSteps
                    state.bad_consecutive, state.bad_total = bad.consecutive, bad.total
                    window_bad = False
                    stop_now = bool(reduced[2] > 0)

                    progress.update(1, loss=step_loss / step_n if step_n else float("nan"), lr=lr,
                                    sps=acc.samples_per_s())
                    step_loss = step_n = 0.0
                    if step % log_every == 0 or step == total_steps or stop_now:
                        rec = acc.summary()
                        rec.update(lr=lr, epoch=state.epoch, samples=state.samples, bad_steps=acc.bad_steps,
                                   bad_total=bad.total)
                        if grad_norm is not None:
                            rec["grad_norm"] = float(grad_norm)
                        if is_main:
                            logger.log({"step": step, "split": "train", **rec})
                        acc.reset()
                    if stop_now:
                        save(step)
                        last_saved = step
                        exit_code = EXIT_TERMINATED
                        break
                    if val_every > 0 and step % val_every == 0:
                        run_validation(step)
                        last_val = step
                    if save_every > 0 and step % save_every == 0:
                        save(step)
                        last_saved = step
                    if step >= total_steps:
                        break
            else:  # the epoch is exhausted
                state.epoch += 1
                state.batch_in_epoch = 0
                if val_every == 0 and state.step != last_val:
                    run_validation(state.step)
                    last_val = state.step
                if save_every == 0 and state.step < total_steps:
                    save(state.step)
                    last_saved = state.step
                continue
            if exit_code:
                break
        if exit_code == 0:
            if state.step != last_val:
                run_validation(state.step)
            if state.step != last_saved:
                save(state.step)
    except TooManyBadSteps as exc:
        # the weights were never updated by the bad steps: checkpoint the last good state, then stop
        save(state.step)
        if is_main:
            progress.write(f"[train] error: {exc}")
        exit_code = 1
    finally:
        progress.close()
        stop.restore()

    if is_main:
        logger.close()
        if (rdir / "metrics.jsonl").is_file():
            try:
                from mome.training.curves import plot_loss_curve

                png = plot_loss_curve(rdir)
                print(f"[train] loss curve: {png}", file=sys.stderr)
            except ValueError as exc:
                print(f"[train] no loss curve: {exc}", file=sys.stderr)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if exit_code:
        raise SystemExit(exit_code)
    return rdir
