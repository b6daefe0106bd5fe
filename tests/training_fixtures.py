"""Shared set-up of the training tests: a tiny synthetic corpus and tiny random backbones, made once per session.

``tiny_train_config(base, run, *overrides)`` is a full config over them: 2-layer Llama (char vocabulary), 2-layer
Whisper, a small video front end, MoME with 4 experts, AVSR at audio {4, 16} x video {2, 5}, short utterances, the real
train transforms (random crop, time masks, babble noise). ``launch`` runs ``train.py`` in a subprocess, optionally
through ``accelerate launch`` with one of ``configs/accelerate/*.yaml``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
CORPUS = ["data.synth.num=28", "data.synth.min_words=5", "data.synth.max_words=5", "data.synth.workers=2",
          "data.synth.val_fraction=0.1", "data.synth.test_fraction=0.05", "data.noise.babble_speakers=4"]


# a 12-utterance synthetic corpus of five-word sentences, for tests that evaluate or transcribe a tiny model
TINY_EVAL_CORPUS = ["data.synth.num=12", "data.synth.test_fraction=0.25", "data.synth.val_fraction=0.0834",
                    "data.synth.min_words=5", "data.synth.max_words=5", "data.synth.workers=1", "data.num_workers=0",
                    "logging.progress=false", "run_name=tiny", "eval.num_beams=2", "eval.max_new_tokens=6"]


def tiny_train_config(base: Path, run: str, *overrides: str):
    from mome.models.tiny import tiny_config

    base = Path(base)
    return tiny_config(base / "backbones", overrides=[
        f"data.root={base / 'corpus'}", *CORPUS, f"output_dir={base / 'runs'}", f"run_name={run}",
        f"cache_dir={base / 'cache'}", "data.num_workers=0", "data.max_frames=160", "train.log_every=1",
        "train.val_wer_samples=2", "eval.max_new_tokens=6", "train.lr=3e-3", "train.warmup_steps=1",
        "logging.wandb=disabled", "logging.progress=false", "train.precision=fp32", *overrides])


def prepare_base(base: Path) -> Path:
    """Backbones + corpus + babble cache under ``base`` (idempotent, cheap after the first call)."""
    from mome.data.noise import build_noise_source
    from mome.data.synth import ensure_corpus

    cfg = tiny_train_config(base, "prepare")
    ensure_corpus(cfg)
    build_noise_source(cfg)
    return Path(base)


def write_config(cfg, path: Path) -> Path:
    from mome.config import save_config

    return save_config(cfg, path)


def reset_accelerate() -> None:
    """Forget the process-wide Accelerate state, so that several in-process trainings do not share it."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


def launch_cmd(config: Path, overrides: Sequence[str] = (), accelerate_config: Optional[str] = None) -> List[str]:
    if accelerate_config is None:
        return [sys.executable, str(REPO / "train.py"), "--config", str(config), *overrides]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / accelerate_config), str(REPO / "train.py"), "--config",
            str(config), *overrides]


def start(config: Path, overrides: Sequence[str] = (), log: Optional[Path] = None) -> subprocess.Popen:
    """``python train.py`` in the background (output to ``log``)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(launch_cmd(config, overrides), cwd=REPO, env=subprocess_env(), stdout=out,
                            stderr=subprocess.STDOUT)


def launch(config: Path, overrides: Sequence[str] = (), accelerate_config: Optional[str] = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """Run to completion in a new process group; on timeout the whole group (launcher and workers) is killed."""
    cmd = launch_cmd(config, overrides, accelerate_config)
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s:\n{(out + err)[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def records(run_dir: Path, split: str = "train") -> List[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if rec.get("split") == split:
            out.append(rec)
    return out


def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def train_in_process(base: Path, name: str, *overrides: str):
    """One tiny training run in this process, with a fresh accelerate state before and after."""
    from mome.training.trainer import train

    reset_accelerate()
    try:
        return train(tiny_train_config(base, name, *overrides))
    finally:
        reset_accelerate()
