"""A model folder others can load: trainable weights once, a config without this machine's paths, a model card
with the WER table; it loads with from_pretrained, evaluate.py's loader and the transcribe command."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training_fixtures import TINY_EVAL_CORPUS


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    from mome.evaluation.run import main as evaluate_main
    from mome.models import build_model
    from mome.models.tiny import tiny_config

    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config(root / "backbones", "mome", [*TINY_EVAL_CORPUS, f"output_dir={root / 'runs'}"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    run = root / "runs" / "tiny"
    ckpt = run / "checkpoints" / "step_0000007"
    model.save_pretrained(ckpt, run_config=cfg)
    (ckpt / "COMPLETE").write_text("7\n")
    (ckpt / "training_state").mkdir()  # what a training checkpoint also holds: not exported
    (ckpt / "training_state" / "optimizer.safetensors").write_bytes(b"x" * 1000)
    evaluate_main(["--checkpoint", str(run), "eval.snrs=[clean]", "eval.judge=false", "eval.latency=false",
                   "eval.max_utterances=2", "eval.scales=[avsr:4x2,avsr:16x5]"])
    return root, run, ckpt, cfg


def test_export_folder_is_self_contained_and_loads(evaluated_run, capsys):
    from safetensors.torch import load_file

    from mome.export import main
    from mome.models import AVSRModel
    from mome.models.checkpoints import load_model

    root, run, ckpt, cfg = evaluated_run
    out = root / "shared" / "mome-tiny"
    main(["--checkpoint", str(run), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["COMPLETE", "README.md", "config.yaml", "model.safetensors"]
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(ckpt / "model.safetensors")).keys()
    assert (out / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()  # stored once

    text = (out / "config.yaml").read_text()
    assert str(root) not in text  # no path of this machine
    card = (out / "README.md").read_text()
    assert str(root) not in card
    for needle in ("model.method=mome", "MoME-4/2", "`avsr:4x2`", "`avsr:16x5`", "7 optimizer steps",
                   "synthetic audio-visual corpus", "WER (%) on the `test` split (2 utterances)",
                   "| tiny | avsr:4x2 |", "| tiny | avsr:16x5 |", "sha256"):
        assert needle in card, needle

    # the backbones were local folders: they load again once their location is given
    names = [f"model.llm.name={cfg.model.llm.name}", f"model.audio_encoder.name={cfg.model.audio_encoder.name}"]
    with pytest.raises((OSError, ValueError, FileNotFoundError)):
        AVSRModel.from_pretrained(out)
    model = AVSRModel.from_pretrained(out, overrides=names)
    saved = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.equal(t, saved[n]) for n, t in model.trainable_state_dict().items())
    _, loaded = load_model(out, overrides=names)  # what evaluate.py and transcribe use: verified first
    assert loaded.method == "mome"
    (out / "README.md").write_text(card + "\nnotes of the person who shares it\n")  # the card may be edited
    load_model(out, overrides=names)

    from mome.models.checkpoints import CheckpointError

    weights = bytearray((out / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: content differs from the sha256"):
        load_model(out, overrides=names)


def test_exported_folder_transcribes_like_the_run(evaluated_run, capsys):
    from mome.data.manifest import read_manifest
    from mome.data.synth import ensure_corpus
    from mome.export import main
    from mome.transcribe import main as transcribe

    root, run, ckpt, cfg = evaluated_run
    out = root / "shared" / "mome-tiny-named"
    # key=value arguments name the backbones in the exported config (a Hub id, or here the local folders)
    main(["--checkpoint", str(ckpt), "--out", str(out), f"model.llm.name={cfg.model.llm.name}",
          f"model.audio_encoder.name={cfg.model.audio_encoder.name}"])
    clip = read_manifest(Path(ensure_corpus(cfg)) / "test.csv")[0].video_path(ensure_corpus(cfg))
    a = transcribe([str(clip), "--checkpoint", str(run), "--scale", "avsr:16x5"])
    b = transcribe([str(clip), "--checkpoint", str(out), "--scale", "avsr:16x5"])
    assert [(r.scale, r.text) for r in a] == [(r.scale, r.text) for r in b]
    with pytest.raises(SystemExit, match=r"export: .*nowhere: no such run or checkpoint folder"):
        main(["--checkpoint", str(root / "nowhere"), "--out", str(root / "x")])
