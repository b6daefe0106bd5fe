"""Files a user is handed: nothing they contain runs, damage is named, mismatches are refused.

Proof-of-concept payloads (pickles whose load would create a marker file, tests/untrusted_fixtures.py) on every
loading path: the training config's AV-HuBERT checkpoint, a run folder handed to evaluate.py whose saved config
points at such a file, and resume state (old-style accelerate pickles, a pickle in place of our safetensors, DeepSpeed
state written elsewhere). Damaged checkpoints (truncated, modified) are named; resume=auto falls back past them.
Resuming a 2-process checkpoint on 1 process continues at the same global sample. One run per run folder. Evaluation
refuses model overrides. Silent or cancelling audio is warned about.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mome.training import checkpoint as ckpt
from tests.training_fixtures import REPO, losses, tiny_train_config, train_in_process
from tests.untrusted_fixtures import evil_fairseq_checkpoint, evil_pickle, evil_torch_file


pytestmark = pytest.mark.usefixtures("fresh_accelerate")
train = train_in_process


RUN = ("train.max_steps=4", "train.save_every=2", "train.keep_last=5", "train.val_every=100",
       "train.val_wer_samples=0", "data.max_frames=100")


@pytest.fixture(scope="module")
def finished(base):
    """A finished 4-step run with checkpoints at steps 2 and 4, and its per-step losses."""
    rdir = train(base, "finished", *RUN)
    return rdir, losses(rdir)


def copy_run(src: Path, dst: Path, steps) -> Path:
    (dst / "checkpoints").mkdir(parents=True)
    for s in steps:
        shutil.copytree(src / "checkpoints" / ckpt.checkpoint_name(s), dst / "checkpoints" / ckpt.checkpoint_name(s))
    return dst


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------------------------
# damaged checkpoints


def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(base, finished, capsys):
    full, ref = finished
    rdir = copy_run(full, full.parent / "damaged", [2, 4])
    truncate(rdir / "checkpoints" / "step_0000004" / "training_state" / "optimizer.safetensors")
    capsys.readouterr()
    train(base, "damaged", *RUN, "train.resume=auto")
    err = capsys.readouterr().err
    assert "cannot resume from step_0000004" in err and "optimizer.safetensors" in err and "bytes" in err
    assert f"resuming from {rdir / 'checkpoints' / 'step_0000002'} instead" in err
    assert losses(rdir) == {s: ref[s] for s in (3, 4)}  # from step 2, bit-identical to the uninterrupted run
    assert ckpt.verify_checkpoint(rdir / "checkpoints" / "step_0000004")  # rewritten whole


def test_damaged_weights_are_named_on_load_and_by_evaluate(finished, tmp_path):
    from mome.evaluation.run import main

    full, _ = finished
    last = tmp_path / "run" / "checkpoints" / "step_0000004"
    shutil.copytree(full / "checkpoints" / "step_0000004", last)
    weights = last / "model.safetensors"
    good = weights.read_bytes()
    truncate(weights)
    name = re.escape(str(weights))
    with pytest.raises(ckpt.CheckpointError, match=f"{name}: .* bytes, but {len(good)} were written"):
        ckpt.load_model(tmp_path / "run")
    with pytest.raises(SystemExit, match=f"evaluate: {name}: .* bytes"):
        main(["--checkpoint", str(tmp_path / "run"), "eval.judge=false"])
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match=f"{name}: content differs from the sha256"):
        ckpt.load_model(last)
    weights.unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"{name}: missing"):
        ckpt.load_model(last)


# ---------------------------------------------------------------------------------------------------------------
# payloads on every loading path


def avhubert_overrides(evil: Path):
    return ("model.video_encoder.type=avhubert", f"model.video_encoder.checkpoint={evil}",
            "model.video_encoder.size=base")


@pytest.fixture
def evil_avhubert(tmp_path):
    from tests.test_avhubert import TINY, synthetic_state_dict

    marker = tmp_path / "pwned"
    path = evil_fairseq_checkpoint(tmp_path / "evil.pt", marker, synthetic_state_dict(TINY), 12, 768, 3072, 12)
    return path, marker


def test_training_config_pointing_at_a_malicious_avhubert_file(base, evil_avhubert):
    from mome.models.avhubert import UnsafeCheckpointError

    evil, marker = evil_avhubert
    with pytest.raises(UnsafeCheckpointError) as err:
        train(base, "evil_encoder", *RUN, *avhubert_overrides(evil))
    assert str(evil) in str(err.value) and "'builtins.exec'" in str(err.value)
    assert not marker.exists()


def test_evaluate_a_run_folder_whose_config_points_at_a_malicious_file(base, evil_avhubert, tmp_path):
    """A colleague's run folder: intact safetensors weights, but its config.yaml names a malicious AV-HuBERT file."""
    from safetensors.torch import save_file

    from mome.config import save_config
    from mome.evaluation.run import main

    evil, marker = evil_avhubert
    folder = tmp_path / "shared_run" / "checkpoints" / "step_0000001"
    folder.mkdir(parents=True)
    save_config(tiny_train_config(base, "shared_run", *avhubert_overrides(evil)), folder / "config.yaml")
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    ckpt.write_manifest(folder, 1)
    with pytest.raises(SystemExit) as err:
        main(["--checkpoint", str(tmp_path / "shared_run"), "eval.judge=false", "eval.snrs=[clean]"])
    assert str(evil) in str(err.value) and "'builtins.exec'" in str(err.value)
    assert not marker.exists()


def test_old_style_pickled_resume_state_is_never_loaded(base, tmp_path):
    """A checkpoint in the accelerate layout (pickled scheduler, trainer position, RNG, optimizer): refused unread."""
    marker = tmp_path / "pwned"
    run = Path(tiny_train_config(base, "old_style").output_dir) / "old_style"
    old = run / "checkpoints" / "step_0000002"
    (old / "accelerate_state").mkdir(parents=True)
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl"):
        evil_pickle(old / "accelerate_state" / name, marker)
    evil_torch_file(old / "accelerate_state" / "optimizer.bin", marker)
    (old / "COMPLETE").write_text("2\n")
    with pytest.raises(SystemExit, match=r"COMPLETE: written by an older version .*cannot be verified or resumed"):
        train(base, "old_style", *RUN, "train.resume=auto")
    assert not marker.exists()


def test_a_pickle_in_place_of_our_state_is_read_as_safetensors_only(base, finished, tmp_path):
    """Someone swaps optimizer.safetensors for a pickle and rewrites the manifest: it is never unpickled."""
    full, _ = finished
    marker = tmp_path / "pwned"
    rdir = copy_run(full, full.parent / "swapped", [2])
    folder = rdir / "checkpoints" / "step_0000002"
    target = folder / "training_state" / "optimizer.safetensors"
    evil_torch_file(target, marker)
    manifest = json.loads((folder / "COMPLETE").read_text())
    ckpt.write_manifest(folder, 2, {k: manifest[k] for k in ("num_processes", "deepspeed")})
    with pytest.raises(SystemExit, match=f"resume error: {re.escape(str(target))}: cannot read"):
        train(base, "swapped", *RUN, "train.resume=auto")
    assert not marker.exists()


def test_deepspeed_state_only_from_checkpoints_written_here(base, tmp_path):
    """DeepSpeed's engine state is a pickle: resumed only when the manifest is signed with the local key, or with
    train.trust_checkpoint=true; otherwise refused before DeepSpeed could read it."""
    from mome.training.trainer import resolve_resume

    marker = tmp_path / "pwned"
    cfg = tiny_train_config(base, "ds_shared", "train.resume=auto")
    rdir = Path(cfg.output_dir) / "ds_shared"
    folder = rdir / "checkpoints" / "step_0000002"
    ds = folder / "training_state" / "deepspeed" / "state"
    ds.mkdir(parents=True)
    evil_torch_file(ds / "mp_rank_00_model_states.pt", marker)
    evil_torch_file(ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    (folder / "training_state" / "trainer.json").write_text('{"trainer": {"step": 2}}')
    (folder / "model.safetensors").write_bytes(b"")
    extra = {"num_processes": 1, "deepspeed": True}
    ckpt.write_manifest(folder, 2, extra, key=b"a colleague's key")
    with pytest.raises(ckpt.CheckpointError, match=r"deepspeed: DeepSpeed state is a pickle .*train.trust_checkpoint"):
        ckpt.check_resumable(folder, cfg.cache_dir, deepspeed=True)
    with pytest.raises(SystemExit, match="train.trust_checkpoint=true"):
        resolve_resume(cfg, rdir, deepspeed=True)
    with pytest.raises(ckpt.CheckpointError, match="written with DeepSpeed; resume it with DeepSpeed"):
        ckpt.check_resumable(folder, cfg.cache_dir, deepspeed=False)
    assert ckpt.check_resumable(folder, cfg.cache_dir, deepspeed=True, trust=True)["trusted"] is False
    ckpt.write_manifest(folder, 2, extra, key=ckpt.signing_key(cfg.cache_dir, create=True))  # written here
    assert ckpt.check_resumable(folder, cfg.cache_dir, deepspeed=True)["trusted"] is True
    added = evil_torch_file(ds / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)  # slipped in afterwards
    with pytest.raises(ckpt.CheckpointError, match=f"{re.escape(str(added))}: not part of the checkpoint"):
        ckpt.check_resumable(folder, cfg.cache_dir, deepspeed=True)
    assert not marker.exists()
    assert oct((Path(cfg.cache_dir) / ckpt.KEY_FILE).stat().st_mode & 0o777) == "0o600"


# ---------------------------------------------------------------------------------------------------------------
# resume on another process count


def test_two_process_position_continues_at_the_same_global_sample_on_one_process(base):
    """The real batch plan, sharded by Accelerate's own code for 2 processes: after k batches each, a 1-process resume
    (reproducible.resume_skip) continues with exactly the batches an uninterrupted 1-process epoch has next."""
    from accelerate import Accelerator
    from accelerate.data_loader import prepare_data_loader

    from mome.data import build_dataloader
    from mome.training.reproducible import epoch_batches, resume_skip, seeded_loader

    cfg = tiny_train_config(base, "plan", "data.max_frames=100")
    seed, epoch, k = int(cfg.train.seed), 1, 2
    acc = Accelerator(cpu=True)

    def loader():
        return seeded_loader(build_dataloader(cfg, "train", train=True), seed)

    def ids(batches):
        return [list(b["ids"]) for b in batches]

    uninterrupted = ids(epoch_batches(acc, acc.prepare(loader()), epoch, 0, seed))
    assert len(uninterrupted) >= 2 * k + 2
    consumed = []
    for p in range(2):  # what each process of a 2-process run consumed before the checkpoint
        shard = prepare_data_loader(loader(), num_processes=2, process_index=p, put_on_device=False)
        it = epoch_batches(acc, shard, epoch, 0, seed)
        consumed.append(ids(next(it) for _ in range(k)))
    assert sorted(sum(consumed, [])) == sorted(uninterrupted[: 2 * k])  # global batches 0 .. 2k-1
    skip = resume_skip(2 * k, 2, 1)
    resumed = ids(epoch_batches(acc, acc.prepare(loader()), epoch, skip, seed))
    assert resumed == uninterrupted[2 * k:]
    with pytest.raises(ValueError, match="global batch 3 .* 2 processes cannot continue exactly"):
        resume_skip(3, 3, 2)
    assert resume_skip(6, 3, 2) == 3 and resume_skip(0, 4, 3) == 0


def test_trainer_resumes_a_two_process_checkpoint_on_one_process(base, capsys):
    """A 2-process checkpoint (x grad_accum 1) resumed on 1 process with grad_accum 2: the same global batch per
    step, so steps 3-4 repeat an uninterrupted 1-process grad_accum-2 run exactly. The checkpoint is the
    1-process run's own step 2, rewritten as 2 processes x 2 batches would have saved it (same weights and
    optimizer state: their gradients average the same 2 micro-batches per step)."""
    opts = (*RUN, "train.grad_accum=2")
    ref_dir = train(base, "accum2", *opts)
    ref = losses(ref_dir)
    rdir = copy_run(ref_dir, ref_dir.parent / "from_two", [2])
    folder = rdir / "checkpoints" / "step_0000002"
    doc = json.loads((folder / "training_state" / "trainer.json").read_text())
    assert doc["trainer"]["num_processes"] == 1 and doc["trainer"]["global_batch_in_epoch"] == 4
    doc["trainer"].update(num_processes=2, grad_accum=1, batch_in_epoch=2)
    (folder / "training_state" / "trainer.json").write_text(json.dumps(doc))
    cache = tiny_train_config(base, "x").cache_dir
    ckpt.write_manifest(folder, 2, {"num_processes": 2, "deepspeed": False}, key=ckpt.signing_key(cache))
    capsys.readouterr()
    train(base, "from_two", *opts, "train.resume=auto")
    err = capsys.readouterr().err
    assert "written by 2 process(es), resuming on 1" in err and "batch 4 of epoch 0" in err
    assert "an optimizer step now averages" not in err  # 2 x 1 == 1 x 2
    assert losses(rdir) == {s: ref[s] for s in (3, 4)}


# ---------------------------------------------------------------------------------------------------------------
# one run per run folder


def test_second_run_in_a_busy_folder_is_refused_and_a_killed_holder_leaves_no_lock(base, tmp_path, capsys):
    from mome.training.run_lock import RunFolderBusyError, RunLock

    cfg = tiny_train_config(base, "busy", *RUN)
    rdir = Path(cfg.output_dir) / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mome.training.run_lock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(300)", str(rdir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusyError, match=rf"pid {holder.pid} on .*, started 20\d\d-"):
            RunLock(rdir).acquire()
        with pytest.raises(SystemExit, match=rf"another training run is using this run folder \(pid {holder.pid}"):
            train(base, "busy", *RUN)
        assert not (rdir / "config.yaml").exists() and not (rdir / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    capsys.readouterr()
    with RunLock(rdir) as lock:  # the kernel dropped the killed holder's lock; its record is reported as stale
        assert lock.held
    err = capsys.readouterr().err
    assert f"stale lock of pid {holder.pid}" in err and "no longer running; taking it over" in err
    assert (rdir / ".lock").read_text() == ""  # released cleanly: no record left
    with RunLock(rdir):  # and the folder is free again
        pass


def test_without_flock_the_holder_record_still_refuses_a_live_holder(tmp_path, monkeypatch, capsys):
    """On a file system without flock (some network mounts) the pid record decides: a live holder on this host is
    refused, a dead one taken over, with a warning that the lock is advisory."""
    import errno
    import socket

    from mome.training import run_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    lock_file = tmp_path / "run" / run_lock.LOCK_FILE
    lock_file.parent.mkdir()
    live = {"pid": os.getppid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    lock_file.write_text(json.dumps(live))
    with pytest.raises(run_lock.RunFolderBusyError, match=f"pid {os.getppid()} on .*, started 2026-01-01"):
        run_lock.RunLock(tmp_path / "run").acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file.write_text(json.dumps(dict(live, pid=dead.pid)))
    with run_lock.RunLock(tmp_path / "run"):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert "file locking unavailable" in err and f"stale lock of pid {dead.pid}" in err


def test_lock_is_released_when_training_fails(base, finished):
    from mome.training.run_lock import RunLock

    rdir, _ = finished
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        train(base, "finished", *RUN)  # a fresh run into a folder with checkpoints: refused after locking
    with RunLock(rdir):  # an flock is per open file: a lock still held by this process would refuse this
        pass


# ---------------------------------------------------------------------------------------------------------------
# evaluation overrides


def test_evaluation_refuses_model_overrides_that_change_the_trained_model(finished):
    from mome.evaluation.run import main

    full, _ = finished
    for override, old, new in (("model.mome.placement=ffn", "'mhsa'", "'ffn'"),
                               ("model.mome.top_k=3", "2", "3"),
                               ("model.lora.rank=4", "0", "4")):
        with pytest.raises(SystemExit) as err:
            main(["--checkpoint", str(full), "eval.judge=false", override])
        key = override.split("=")[0]
        assert f"{key}: trained with {old}, override {new}" in str(err.value), str(err.value)
    from mome.config import load_config
    from mome.evaluation.run import Checkpoint, check_model_overrides

    last = ckpt.latest_checkpoint(full)
    c = Checkpoint(last, load_config(last / "config.yaml"), "x")
    check_model_overrides(c, ["model.mome.backend=loop", "model.llm.attn_implementation=eager"])  # runtime keys


# ---------------------------------------------------------------------------------------------------------------
# audio that is silent or whose channels cancel


def test_silent_and_cancelling_audio_warn_naming_the_file(tmp_path):
    import soundfile as sf

    from mome.data.media import AudioWarning, read_audio

    t = np.arange(16000) / 16000.0
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    cases = {"cancel.wav": np.stack([tone, -tone], 1), "silent.wav": np.zeros(16000, np.float32),
             "fine.wav": np.stack([tone, tone], 1)}
    for name, audio in cases.items():
        sf.write(str(tmp_path / name), audio, 16000, subtype="PCM_16")
    with pytest.warns(AudioWarning, match=r"cancel\.wav: the 2 channels cancel when averaged to mono"):
        assert np.abs(read_audio(tmp_path / "cancel.wav")).max() < 1e-4  # half a PCM step of rounding left
    with pytest.warns(AudioWarning, match=r"silent\.wav: audio is silent"):
        read_audio(tmp_path / "silent.wav")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AudioWarning)
        assert np.abs(read_audio(tmp_path / "fine.wav")).max() > 0.2
