"""The encoder feature probe (analysis/feature_probe.py): slot labels from the grammar, and a run on the tiny corpus."""
import json

import pytest
import torch

from analysis.feature_probe import ABSENT, SlotProbe, fit_probe, main, slot_classes, slot_labels
from mome.data.grammar import slot_words
from tests.training_fixtures import tiny_train_config


def test_slot_words_parse_every_template():
    assert slot_words("move the green kettle soon") == {
        "command": "move", "article": "the", "colour": "green", "object": "kettle", "adverb": "soon"}
    assert slot_words("take blue cup at f two".replace("cup", "spoon"))["letter"] == "f"
    with pytest.raises(ValueError, match="fits no template"):
        slot_words("move the green kettle yesterday")


def test_labels_mark_a_missing_slot_absent():
    texts = ["move the green kettle soon", "place the candle at c two"]
    slots, classes = slot_classes(texts)
    assert "article" not in slots  # one word: nothing to tell apart
    y = slot_labels(texts, slots, classes)
    colour = slots.index("colour")
    assert classes[colour][int(y[0, colour])] == "green" and classes[colour][int(y[1, colour])] == ABSENT
    assert classes[slots.index("letter")][int(y[1, slots.index("letter")])] == "c"


def test_the_probe_learns_a_slot_carried_by_one_frame():
    """A word written into one frame of noise is found by the attention pooling (and a random label is not)."""
    g = torch.Generator().manual_seed(0)
    n, t, d = 512, 12, 16
    x = torch.randn(n, t, d, generator=g)
    y = torch.randint(4, (n, 2), generator=g)
    where = torch.randint(t, (n,), generator=g)
    x[torch.arange(n), where, : 4] += 6.0 * torch.nn.functional.one_hot(y[:, 0], 4)
    mask = torch.ones(n, t, dtype=torch.bool)
    probe = fit_probe((x[:448], mask[:448], y[:448]), [["a"] * 4, ["b"] * 4], steps=300)
    assert isinstance(probe, SlotProbe)
    with torch.no_grad():
        out = probe(x[448:], mask[448:])
    acc = [float((o.argmax(-1) == y[448:, k]).float().mean()) for k, o in enumerate(out)]
    assert acc[0] > 0.9 and acc[1] < 0.5, acc


def test_cli_on_the_tiny_corpus(base, tmp_path, monkeypatch):
    from mome.config import save_config

    cfg = tiny_train_config(base, "probe")
    path = save_config(cfg, tmp_path / "probe.yaml")
    out = tmp_path / "probe.json"
    result = main(["--config", str(path), "--steps", "5", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == result and saved["rate"] == 4 and saved["test_clips"] >= 1
    assert set(saved["slots"]) == {"command", "colour", "object", "adverb"}  # five-word sentences
    for r in saved["slots"].values():
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 < r["majority"] <= 1.0
