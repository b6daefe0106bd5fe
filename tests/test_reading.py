"""Steps that count: packed training rows (exact), the projector output scale, per-group learning rates, the
reading-gap diagnostics, the precision decision, and (slow) a short real run that opens the reading gap."""
import math
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mome.models import build_model
from mome.models.sequence import first_fit_decreasing
from mome.models.tiny import random_batch, tiny_config, write_tiny_backbones
from tests.model_fixtures import activate_adapters


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_reading")
    write_tiny_backbones(d)
    return d


def build(tiny_dir, *overrides, method="mome"):
    torch.manual_seed(0)
    return build_model(tiny_config(tiny_dir, method, overrides))


def test_first_fit_decreasing_respects_capacity():
    bins = first_fit_decreasing([10, 7, 3, 5, 9, 2], 12)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([10, 7, 3, 5, 9, 2][i] for i in b) <= 12 for b in bins)
    assert bins == [[0, 5], [4, 2], [1, 3]]
    assert first_fit_decreasing([20, 3], 12) == [[0], [1]]  # an item over capacity gets its own bin


@pytest.mark.parametrize("method", ["mome", "mtsk_mss"])
def test_packed_rows_give_the_padded_loss_and_gradients(tiny_dir, method):
    """model.pack_rows: the same per-utterance CE, loss (LB included) and gradients as the padded call."""
    batch = random_batch([12, 5, 9, 3], texts=["a b c", "one two three four five", "x", "hello there"])
    results = []
    for pack in ("false", "true"):
        model = build(tiny_dir, f"model.pack_rows={pack}", method=method)
        activate_adapters(model)
        out = model(batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (ref, g_ref), (packed, g_packed) = results
    assert torch.allclose(ref.sample_ce, packed.sample_ce, atol=1e-5)
    assert torch.allclose(ref.loss, packed.loss, atol=1e-5)
    assert ref.num_tokens == packed.num_tokens
    for k in ref.aux:
        assert torch.allclose(ref.aux[k], packed.aux[k], atol=1e-5), k
    assert g_ref.keys() == g_packed.keys()
    for n in g_ref:
        assert torch.allclose(g_ref[n], g_packed[n], atol=1e-4, rtol=1e-3), n


def test_packing_puts_several_utterances_in_a_row(tiny_dir):
    from mome.models.sequence import pack_rows

    model = build(tiny_dir)
    inputs = model.build_inputs(random_batch([12, 5, 9, 3]), model.scales, with_transcripts=True)
    packed = pack_rows(inputs)
    assert packed.inputs_embeds.shape[0] < inputs.inputs_embeds.shape[0]
    assert int(packed.token_mask.sum()) == int(inputs.attention_mask.sum())  # every real token, once
    for p in range(packed.origin.shape[0]):  # one scale per packed row
        rows = packed.origin[p][packed.origin[p] >= 0].unique()
        assert len(set(inputs.scale_ids[rows].tolist())) == 1


def test_projector_output_starts_at_the_embedding_scale(tiny_dir):
    from mome.models.avsr import embedding_rms
    from mome.training.diagnostics import token_norms

    plain, matched = build(tiny_dir), build(tiny_dir, "model.projector.match_embedding_rms=true")
    rms = embedding_rms(matched.llm.get_input_embeddings())
    batch = random_batch([12, 7])
    d = matched.llm.config.hidden_size
    n_plain, n_matched = token_norms(plain, batch, plain.scales), token_norms(matched, batch, matched.scales)
    assert abs(n_plain["audio"] - d ** 0.5) / d ** 0.5 < 0.05  # LayerNorm output: norm sqrt(d)
    assert abs(n_matched["audio"] - rms * d ** 0.5) / (rms * d ** 0.5) < 0.05
    assert abs(n_matched["video"] - rms * d ** 0.5) / (rms * d ** 0.5) < 0.05
    with pytest.raises(ValueError, match="layernorm"):
        build(tiny_dir, "model.projector.match_embedding_rms=true", "model.projector.layernorm=false")


def test_one_projector_shared_by_every_rate(tiny_dir, tmp_path):
    from mome.config import ConfigError
    from mome.models.avsr import AVSRModel
    from mome.models.compression import compress

    per_rate, shared = build(tiny_dir), build(tiny_dir, "model.projector.shared=true")
    assert set(shared.audio_projectors.by_rate) == {"shared"} and set(shared.video_projectors.by_rate) == {"shared"}
    assert shared.audio_projectors.rates == per_rate.audio_projectors.rates == sorted(per_rate.audio_projectors.rates)
    one = shared.audio_projectors.by_rate["shared"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(shared.audio_projectors) == count(one) == count(per_rate.audio_projectors) // 2
    feats = shared.encode(random_batch([12, 7]), audio=True, video=False)
    lo, hi = shared.audio_projectors.rates
    x, lengths = feats["audio"]
    for rate in (lo, hi):  # every rate goes through the one module
        tokens, _ = shared.project(feats, "audio", rate)
        assert torch.equal(tokens, one(compress(x, lengths, rate, "avgpool")[0]))
    with pytest.raises(ValueError, match="no projector for rate 3"):
        shared.audio_projectors(torch.zeros(1, 2, one[0].in_features), 3)
    # it trains (a gradient from every scale reaches the one projector) and round-trips through a checkpoint
    shared(random_batch([12, 7], texts=["a b", "c"])).loss.backward()
    assert one[0].weight.grad is not None and one[0].weight.grad.abs().sum() > 0
    shared.save_pretrained(tmp_path / "ckpt")
    again = AVSRModel.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(again.audio_projectors.by_rate["shared"][0].weight, one[0].weight)
    with pytest.raises(ConfigError, match="avgpool"):
        tiny_config(tiny_dir, "mome", ["model.projector.shared=true", "model.compression.method=stack"])


def test_lr_scale_per_parameter_group(tiny_dir):
    from mome.training.optim import build_optimizer

    model = build(tiny_dir)
    cfg = tiny_config(tiny_dir, "mome", ["train.lr=1e-3", "train.lr_scale={audio_projectors: 3.0, mome: 0.5}"])
    opt = build_optimizer(model, cfg.train)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["audio_projectors.by_rate.4.0.weight"])] == pytest.approx(3e-3)
    assert lr_of[id(named["mome.0.experts.down"])] == pytest.approx(5e-4)
    assert lr_of[id(named["sequences.boundary.weight"])] == pytest.approx(1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())
    bad = tiny_config(tiny_dir, "mome", ["train.lr_scale={projector: 2.0}"])
    with pytest.raises(ValueError, match="unknown parameter groups"):
        build_optimizer(model, bad.train)


def test_reading_diagnostics(tiny_dir):
    from mome.training.diagnostics import attention_av_share, grad_group_norms, roll_media

    model = build(tiny_dir)
    activate_adapters(model)
    batch = random_batch([12, 7, 9], texts=["a b", "c d e", "f"])
    rolled = roll_media(batch)
    assert torch.equal(rolled["video"][1], batch["video"][0]) and rolled["text"] == batch["text"]
    assert torch.equal(rolled["audio_lengths"], batch["audio_lengths"].roll(1))
    share = attention_av_share(model, batch, model.scales)
    assert set(share) == {s.name for s in model.scales} and all(0 < v < 1 for v in share.values())
    assert model.llm.config._attn_implementation != "eager"  # restored
    model(batch).loss.backward()
    norms = grad_group_norms(model)
    assert {"audio_projectors", "video_projectors", "boundary", "mome", "video_frontend"} <= set(norms)
    assert all(v > 0 for v in norms.values())


def test_precision_decision_on_cpu(tiny_dir, monkeypatch):
    from mome.training import precision

    cfg = tiny_config(tiny_dir, "mome", ["train.precision=fp32"])
    same, note = precision.apply_precision(cfg, cuda=False)
    assert same.model.llm.dtype == "float32" and "fp32" in note
    cfg = tiny_config(tiny_dir, "mome", ["train.precision=auto"])
    monkeypatch.setattr(precision, "gemm_speedup", lambda: 6.0)
    fast, note = precision.apply_precision(cfg, cuda=False)
    assert fast.model.llm.dtype == "bfloat16" and fast.model.audio_encoder.dtype == "bfloat16"
    assert "6.0x" in note and "trainable parameters and optimizer state fp32" in note
    # the same typed, read-only config as the one it came from (the corpus and model builders read typed sections)
    assert OmegaConf.get_type(fast.data.synth) is OmegaConf.get_type(cfg.data.synth) and OmegaConf.is_readonly(fast)
    assert OmegaConf.to_object(fast.data.synth).num == cfg.data.synth.num
    monkeypatch.setattr(precision, "gemm_speedup", lambda: 0.1)
    slow, note = precision.apply_precision(cfg, cuda=False)
    assert slow.model.llm.dtype == "float32" and "kept fp32" in note


@pytest.mark.slow  # 120 real steps of the demo model (one sampled rate pair each): ~7 min on 2 bf16-fast cores
def test_a_short_demo_run_opens_the_reading_gap(tmp_path):
    """120 steps of the demo recipe: the validation CE with another utterance's media exceeds the CE with the
    utterance's own media at every scale (the model reads its audio-visual tokens), where at step 0 it does not."""
    from mome.config import load_config
    from mome.training.logging import read_metrics
    from mome.training.trainer import train
    from tests.training_fixtures import reset_accelerate

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "demo.yaml", [
        f"output_dir={tmp_path}", "run_name=gap", "train.max_steps=120", "train.max_minutes=0",
        "train.val_every=0", "train.save_every=0", "train.val_wer_samples=0", "train.val_utterances=24",
        "logging.wandb=disabled", "logging.progress=false"])
    reset_accelerate()
    try:
        rdir = train(cfg)
    finally:
        reset_accelerate()
    val = [r for r in read_metrics(rdir) if r["split"] == "val"]
    gap = val[-1]["reading_gap"]
    print(json.dumps(val[-1], default=str)[:2000])
    assert set(gap) == {"avsr:4x2", "avsr:4x5", "avsr:16x2", "avsr:16x5"}
    assert all(v > 0.05 for v in gap.values()), gap


def test_a_perfect_validation_wer_is_plotted_as_zero():
    from mome.training.curves import _percent

    assert _percent(0.0) == 0.0 and _percent(0.425) == 42.5
    assert math.isnan(_percent(None)) and math.isnan(_percent(float("inf")))
