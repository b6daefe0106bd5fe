"""Dataset, length-bucketed batching, collation and transforms."""
import numpy as np
import pytest
import torch

from mome.data import build_dataloader, build_dataset
from mome.data.dataset import LengthBucketBatchSampler, collate_batch
from mome.data.manifest import ManifestError, read_manifest
from mome.data.transforms import time_mask
from tests.data_fixtures import data_config, tiny_corpus


def _clean(*extra):
    return data_config(tiny_corpus(), 'data.transforms.train_snrs=["clean"]', *extra)


def test_batch_layout_masks_and_lengths():
    cfg = _clean("data.max_frames_eval=200")
    loader = build_dataloader(cfg, "train", train=False)
    rows = {r.utt_id: r for r in read_manifest(tiny_corpus() / "train.csv")}
    seen = []
    for batch in loader:
        assert set(batch) == {"ids", "text", "audio", "audio_lengths", "video", "video_lengths"}
        B = len(batch["ids"])
        a, v = batch["audio"], batch["video"]
        al, vl = batch["audio_lengths"], batch["video_lengths"]
        assert a.dtype == torch.float32 and v.dtype == torch.float32 and al.dtype == torch.long and vl.dtype == torch.long
        assert a.shape == (B, int(al.max())) and v.shape == (B, int(vl.max()), 1, 88, 88)
        assert torch.equal(al, 640 * vl)
        for k, uid in enumerate(batch["ids"]):
            assert vl[k] == rows[uid].frames and batch["text"][k] == rows[uid].text
            assert torch.all(a[k, al[k]:] == 0) and torch.all(v[k, vl[k]:] == 0)  # padding is zero
            assert a[k, : al[k]].std() > 0.5  # layer-normed waveform
            assert v[k, : vl[k]].abs().sum() > 0
        assert B * int(vl.max()) <= 200 or B == 1  # the padded-frame budget
        seen += batch["ids"]
    assert sorted(seen) == sorted(rows)  # each utterance once


def test_eval_transform_is_deterministic_and_normalised():
    cfg = _clean()
    ds = build_dataset(cfg, "test", train=False)
    a, b = ds[0], ds[0]
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    frames, audio = ds.load(0)
    crop = frames[:, 4:92, 4:92].astype(np.float32) / 255.0
    expect = (crop - 0.421) / 0.165
    assert np.allclose(a["video"][:, 0].numpy(), expect, atol=1e-5)  # centre crop, normalised
    x = torch.from_numpy(audio)
    assert torch.allclose(a["audio"], (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-8), atol=1e-4)


def test_train_transform_crops_and_masks_randomly():
    cfg = _clean("data.transforms.video_mask_window=10", "data.transforms.audio_mask_window=6400")
    ds = build_dataset(cfg, "train", train=True)
    torch.manual_seed(0)
    x = [ds[0] for _ in range(6)]
    assert x[0]["video"].shape[1:] == (1, 88, 88)
    assert any(not torch.equal(x[0]["video"], y["video"]) for y in x[1:])
    masked = -0.421 / 0.165  # a masked frame is zero before normalisation
    assert any(torch.isclose(y["video"].flatten(1), torch.tensor(masked)).all(1).any() for y in x)
    torch.manual_seed(0)
    again = [ds[0] for _ in range(6)]
    assert all(torch.equal(p["video"], q["video"]) and torch.equal(p["audio"], q["audio"]) for p, q in zip(x, again))


def test_time_mask_budget():
    rng = np.random.default_rng(0)
    for n in (10, 100, 1000):
        x = np.ones((n, 2), np.float32)
        time_mask(x, 10, 25, rng)
        assert (x[:, 0] == 0).sum() <= 9 * -(-n // 25)
    x = np.ones(16000 * 3, np.float32)
    time_mask(x, 6400, 16000, rng)
    assert 0 < (x == 0).sum() <= 3 * 6399


def test_bucket_sampler_budget_cover_and_epochs():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 200, size=300).tolist()
    s = LengthBucketBatchSampler(lengths, max_frames=800, shuffle=True, num_buckets=10, seed=1)
    e0, e1 = list(s), list(s)  # the epoch advances by itself
    for plan in (e0, e1):
        assert sorted(i for b in plan for i in b) == list(range(300))
        assert all(len(b) * max(lengths[i] for i in b) <= 800 for b in plan)
    assert e0 != e1
    s.set_epoch(0)
    assert list(s) == e0  # (seed, epoch) decide the plan
    t = LengthBucketBatchSampler(lengths, max_frames=800, shuffle=True, num_buckets=10, seed=1)
    assert list(t) == e0
    # padding stays small: most batches span a narrow range of lengths
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in e0]
    assert np.median(spans) < 40
    capped = LengthBucketBatchSampler(lengths, max_frames=10**6, max_batch_size=7, shuffle=False)
    assert max(len(b) for b in capped) == 7
    ev = list(LengthBucketBatchSampler(lengths, max_frames=800, shuffle=False))
    flat = [i for b in ev for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths)  # eval: sorted, in order
    lone = list(LengthBucketBatchSampler([10, 500, 20], max_frames=100))
    assert [1] in lone  # longer than the budget: alone
    excl = LengthBucketBatchSampler(lengths, max_frames=800, shuffle=True, exclude=lambda: [0, 5])
    assert {0, 5}.isdisjoint(i for b in excl for i in b)


def test_collate_pads_and_drops_skipped():
    samples = [{"id": "a", "text": "x", "audio": torch.ones(1280), "video": torch.ones(2, 1, 4, 4)}, None,
               {"id": "b", "text": "y", "audio": torch.ones(640), "video": torch.ones(1, 1, 4, 4)}]
    b = collate_batch(samples)
    assert b["ids"] == ["a", "b"] and b["audio"].shape == (2, 1280) and b["video"].shape == (2, 2, 1, 4, 4)
    assert b["audio"][1, 640:].abs().sum() == 0 and b["video"][1, 1:].abs().sum() == 0
    assert b["audio_lengths"].tolist() == [1280, 640] and b["video_lengths"].tolist() == [2, 1]
    assert collate_batch([None, None]) is None


def test_loader_with_workers_and_max_utterances():
    cfg = _clean("data.num_workers=2", "data.max_frames=400")
    loader = build_dataloader(cfg, "train", max_utterances=6)
    ids = [i for b in loader for i in b["ids"]]
    assert len(ids) == 6 == len(set(ids))


def test_manifest_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("synth,a.mp4,10,5,hello world\nsynth,b.mp4,ten,5,oops\n")
    with pytest.raises(ManifestError, match=r"bad.csv:2: input_length 'ten'"):
        read_manifest(p)
    p.write_text("synth,a.mp4,10\n")
    with pytest.raises(ManifestError, match=r"bad.csv:1: expected 5"):
        read_manifest(p)
    p.write_text("lrs3,test/x/00001.mp4,52,17 33 8,hello, world\n")
    (row,) = read_manifest(p)
    assert row.text == "hello, world" and row.utt_id == "lrs3/test/x/00001" and row.frames == 52
