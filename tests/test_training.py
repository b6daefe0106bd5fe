"""Training in one process: optimizer groups, schedule, checkpoints, logging, a real tiny run, exact resume, NaN steps.

The runs train a tiny random-backbone MoME on a tiny synthetic corpus (tests/training_fixtures.py), in this process.
"""
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from mome.training import checkpoint as ckpt
from mome.training.logging import RunLogger, read_metrics, resolve_wandb_mode, truncate_metrics
from mome.training.optim import build_optimizer, build_scheduler, param_groups
from tests.training_fixtures import losses, records, reset_accelerate, tiny_train_config


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def run(base, name, *overrides):
    from mome.training.trainer import train

    cfg = tiny_train_config(base, name, *overrides)
    return train(cfg), cfg


def trainable(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# optimizer and schedule


def test_no_weight_decay_on_biases_norms_embeddings(base):
    from mome.models import build_model

    model = build_model(tiny_train_config(base, "groups"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = set(decay["names"]) | set(no_decay["names"])
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}  # every trainable one, once
    assert not set(decay["names"]) & set(no_decay["names"])
    for n in no_decay["names"]:
        assert n.endswith(("bias", "_b")) or "norm" in n or "boundary" in n or model.get_parameter(n).ndim == 1, n
    assert "sequences.boundary.weight" in no_decay["names"]  # trainable boundary embeddings
    assert "mome.0.experts.up_b" in no_decay["names"]  # stacked expert biases (2-D)
    assert "mome.0.experts.down" in decay["names"] and "mome.0.router.weight" in decay["names"]
    assert any(n.endswith("stem_norm.weight") for n in no_decay["names"])
    opt = build_optimizer(model, tiny_train_config(base, "groups", "train.betas=[0.8,0.95]").train)
    assert opt.defaults["betas"] == (0.8, 0.95)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)


def test_cosine_schedule_with_warmup_and_floor():
    from omegaconf import OmegaConf

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, OmegaConf.create({"warmup_steps": 4, "min_lr_ratio": 0.1}), total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0.1
    assert sched.get_last_lr()[0] == pytest.approx(0.1)  # floor at min_lr_ratio


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and logging


def test_latest_checkpoint_skips_incomplete_and_prunes(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False), (10, True)):
        d = root / ckpt.checkpoint_name(step)
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE").write_text(f"{step}\n")
    (root / ".tmp-step_0000012").mkdir()  # a save killed half-way
    assert ckpt.latest_checkpoint(tmp_path / "run") == root / "step_0000010"
    assert ckpt.latest_checkpoint(root / "step_0000004") == root / "step_0000004"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.latest_checkpoint(root / "step_0000006")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.latest_checkpoint(tmp_path)
    ckpt.prune_checkpoints(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000004", "step_0000006", "step_0000010"]


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_wandb_mode_resolution_never_waits_for_the_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("disabled")[0] == "disabled"
    assert resolve_wandb_mode("online")[0] == "online"
    assert resolve_wandb_mode("auto") == ("offline", "no wandb API key")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.time()
    mode, reason = resolve_wandb_mode("auto")
    assert mode == "offline" and "not reachable" in reason and time.time() - t0 < 3
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto")[0] == "disabled"


def test_run_logger_offline_wandb_and_jsonl(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_train_config(tmp_path, "log", "logging.wandb=offline")
    t0 = time.time()
    log = RunLogger(cfg, tmp_path / "run", enabled=True)
    assert log.wandb_mode == "offline" and time.time() - t0 < 60
    for step in (1, 2, 3):
        log.log({"step": step, "split": "train", "loss": float(step), "ce": {"avsr:4x2": 1.0}, "lr": float("nan")})
    log.close()
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[0]["lr"] == "nan" and recs[1]["ce"]["avsr:4x2"] == 1.0
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "no local wandb run written"
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "spl')  # a record cut by a kill
    assert truncate_metrics(tmp_path / "run" / "metrics.jsonl", after_step=2) == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# real tiny runs


def test_single_process_run_writes_the_run_folder(base):
    from mome.config import load_config
    from mome.models import build_model

    rdir, cfg = run(base, "single", "train.max_steps=4", "train.val_every=2", "train.save_every=2")
    assert load_config(rdir / "config.yaml") == cfg  # the resolved config, saved
    train = records(rdir)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    scale_names = {"avsr:4x2", "avsr:4x5", "avsr:16x2", "avsr:16x5"}
    for r in train:
        assert set(r["ce"]) == scale_names and r["loss"] > 0 and r["lb"] > 0 and r["samples_per_s"] > 0
        assert len(r["expert_cv"]) == 2 and r["lr"] >= 0 and r["grad_norm"] > 0
    assert train[0]["lr"] == 0.0 and train[1]["lr"] == pytest.approx(3e-3)  # one warm-up step
    val = records(rdir, "val")
    assert [r["step"] for r in val] == [2, 4]
    assert set(val[-1]["wer"]) == scale_names and val[-1]["wer_samples"] == 2 and set(val[-1]["ce"]) == scale_names
    assert (rdir / "loss_curve.png").stat().st_size > 10_000
    last = ckpt.latest_checkpoint(rdir)
    assert last.name == "step_0000004" and sorted(p.name for p in (rdir / "checkpoints").iterdir()) == [
        "step_0000002", "step_0000004"]
    assert (last / "training_state" / "optimizer.safetensors").is_file()
    # checkpoints hold trainable weights only, once (plus Adam's two moments), no pickle; they load back into an
    # evaluation model
    files = {f.relative_to(last).as_posix(): f.stat().st_size for f in last.rglob("*") if f.is_file()}
    assert set(files) == {"model.safetensors", "config.yaml", "COMPLETE", "training_state/optimizer.safetensors",
                          "training_state/rng_0.safetensors", "training_state/trainer.json"}
    assert sum(files.values()) < 3 * files["model.safetensors"] + 60_000
    manifest = ckpt.verify_checkpoint(last, ckpt.signing_key(cfg.cache_dir))
    assert manifest["trusted"] and set(manifest["files"]) == set(files) - {"COMPLETE"}
    _, model = ckpt.load_model(rdir)
    fresh = build_model(cfg)
    saved = trainable(last)
    assert set(saved) == set(fresh.trainable_state_dict())
    changed = [n for n, t in fresh.trainable_state_dict().items() if not torch.equal(t, saved[n])]
    assert changed, "training did not change any trainable weight"
    for n, t in model.trainable_state_dict().items():
        assert torch.equal(t, saved[n])


def test_resume_gives_the_losses_of_an_uninterrupted_run(base):
    """Resume from the step-3 checkpoint of a finished 7-step run, in a new run folder: steps 4-7 repeat exactly
    (data order, augmentation, optimizer and schedule state), across an epoch boundary (data.max_frames=300 gives fewer than 7 batches per epoch)."""
    opts = ("train.max_steps=7", "train.save_every=3", "train.keep_last=5", "data.max_frames=300",
            "train.val_every=100", "train.val_wer_samples=0")
    full, _ = run(base, "full", *opts)
    resumed = full.parent / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000003", resumed / "checkpoints" / "step_0000003")
    reset_accelerate()
    run(base, "resumed", *opts, "train.resume=auto")
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [4, 5, 6, 7] and [r["epoch"] for r in records(full)][-1] == 1
    assert {s: b[s] for s in b} == {s: a[s] for s in b}  # bit-identical
    for name in ("step_0000006", "step_0000007"):
        wa, wb = trainable(full / "checkpoints" / name), trainable(resumed / "checkpoints" / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        reset_accelerate()
        run(base, "resumed", "train.max_steps=7")  # a fresh run never overwrites an existing one


def test_nan_steps_are_skipped_and_too_many_stop_with_a_good_checkpoint(base):
    rdir, _ = run(base, "nan_once", "train.max_steps=3", "train.inject_nan_steps=[2]", "train.val_wer_samples=0",
                  "data.max_frames=100")
    train = {r["step"]: r for r in records(rdir)}
    assert "loss" not in train[2] and train[2]["skipped_steps"] == 1 and train[2]["bad_steps_total"] == 1
    assert all(train[s]["skipped_steps"] == 0 and torch.isfinite(torch.tensor(train[s]["loss"])) for s in (1, 3))
    assert train[2]["lr"] == train[3]["lr"]  # the schedule did not advance on the skipped step

    reset_accelerate()
    with pytest.raises(SystemExit) as exc:
        run(base, "nan_stop", "train.max_steps=8", "train.inject_nan_steps=[2,3,4,5]", "train.max_bad_steps=3",
            "train.save_every=1", "train.keep_last=10", "train.val_wer_samples=0", "data.max_frames=100")
    assert exc.value.code == 1
    rdir = rdir.parent / "nan_stop"
    assert [r["step"] for r in records(rdir)] == [1, 2, 3, 4]  # stopped after 3 bad steps in a row
    last = ckpt.latest_checkpoint(rdir)
    assert last.name == "step_0000004"
    good, final = trainable(rdir / "checkpoints" / "step_0000001"), trainable(last)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert all(torch.equal(good[k], final[k]) for k in good)  # bad steps never touched the weights
