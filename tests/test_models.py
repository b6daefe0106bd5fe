"""The AVSR model on tiny random backbones (2-layer Llama with a character vocabulary, 2-layer Whisper)."""
from __future__ import annotations

import re

import pytest
import torch

from mome.config import load_config
from mome.models import AVSRModel, BackboneMismatchError, build_model
from mome.models.backbones import load_llm_backbone
from mome.models.compression import compress, compressed_dim
from mome.models.encoders import WhisperAudioEncoder, log_mel, whisper_mel_filters
from mome.adapters import ScaleLoRALinear
from mome.models.sequence import TokenRole
from mome.models.tiny import random_batch, tiny_config, write_tiny_backbones
from mome.models.video_frontend import VideoFrontend
from mome.scales import Scale
from tests.model_fixtures import activate_adapters

METHODS = ("mome", "mome_i", "llama_avsr", "mtsk_ms", "mtsk_ss", "mtsk_mss")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_tiny_backbones(d)
    return d


def build(tiny_dir, method="mome", *overrides, seed=0):
    torch.manual_seed(seed)  # trainable parts (projectors, front end, adapters) are initialised from the global RNG
    return build_model(tiny_config(tiny_dir, method, overrides))


# ----------------------------------------------------------------------------------------------------------------
# compression


@pytest.mark.parametrize("method", ["avgpool", "stack"])
def test_compression_floor_and_masks(method):
    x = torch.randn(2, 11, 3)
    x[1, 6:] = 1e6  # padding of the second clip must never leak into its tokens
    out, lengths = compress(x, torch.tensor([11, 6]), 4, method)
    assert out.shape == (2, 2, compressed_dim(3, 4, method))
    assert lengths.tolist() == [2, 1]  # floor(11/4), floor(6/4)
    if method == "avgpool":
        assert torch.allclose(out[0, 1], x[0, 4:8].mean(0))
        assert torch.allclose(out[1, 0], x[1, :4].mean(0))
    else:
        assert torch.equal(out[0, 1], x[0, 4:8].reshape(-1))
        assert torch.equal(out[1, 0], x[1, :4].reshape(-1))
    assert torch.all(out[1, 1] == 0)  # beyond the pooled length: zero
    short, short_len = compress(x[:, :3], torch.tensor([3, 3]), 4, method)
    assert short.shape[1] == 0 and short_len.tolist() == [0, 0]
    with pytest.raises(ValueError, match="compression method"):
        compress(x, torch.tensor([11, 6]), 4, "maxpool")


# ----------------------------------------------------------------------------------------------------------------
# encoders


def test_log_mel_matches_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor

    wave = torch.randn(12000) * 0.1
    ref = WhisperFeatureExtractor(feature_size=80)(
        wave.numpy(), sampling_rate=16000, padding="longest", return_tensors="pt"
    ).input_features[0]
    mine = log_mel(wave, whisper_mel_filters(80))
    assert mine.shape == ref.shape == (80, 75)
    assert torch.allclose(mine, ref, atol=1e-5)


def test_whisper_short_clips_do_not_depend_on_batch_padding(tiny_dir):
    cfg = tiny_config(tiny_dir)
    enc = WhisperAudioEncoder.from_config(cfg.model.audio_encoder)
    a, b = torch.randn(8000) * 0.1, torch.randn(16000) * 0.1
    alone, la = enc(a[None], torch.tensor([8000]))
    batch = torch.zeros(2, 16000)
    batch[0, :8000], batch[1] = a, b
    both, lb = enc(batch, torch.tensor([8000, 16000]))
    assert la.tolist() == [25] and lb.tolist() == [25, 50]  # 50 frames per second
    assert alone.shape == (1, 25, 32) and both.shape == (2, 50, 32)
    assert torch.allclose(alone[0], both[0, :25], atol=1e-5)
    assert torch.all(both[0, 25:] == 0)
    # the stock behaviour (pad to 30 s) runs too and gives the same lengths
    enc30 = WhisperAudioEncoder(enc.encoder, pad_to_30s=True)
    out30, l30 = enc30(batch, torch.tensor([8000, 16000]))
    assert out30.shape == (2, 50, 32) and l30.tolist() == [25, 50]
    with pytest.raises(ValueError, match="longer than Whisper"):
        enc(torch.zeros(1, 31 * 16000), torch.tensor([31 * 16000]))


def test_video_frontend_shapes_and_padding_invariance():
    torch.manual_seed(0)
    fe = VideoFrontend(channels=4, dim=16, temporal_layers=2)
    v = torch.randn(2, 9, 1, 88, 88)
    alone, _ = fe(v[:1, :5], torch.tensor([5]))
    both, lengths = fe(v, torch.tensor([5, 9]))
    assert both.shape == (2, 9, 16) and lengths.tolist() == [5, 9]
    assert torch.allclose(alone[0], both[0, :5], atol=1e-5)
    assert torch.all(both[0, 5:] == 0)


# ----------------------------------------------------------------------------------------------------------------
# sequences and the forward


def test_sequence_layout_labels_and_roles(tiny_dir):
    model = build(tiny_dir, "mtsk_ms")
    batch = random_batch([20, 12], texts=["ab", "hello"])
    scales = [Scale("avsr", 4, 2), Scale("avsr", 16, 5)]
    inp = model.build_inputs(batch, scales, with_transcripts=True)
    assert inp.scale_ids.tolist() == [0, 0, 3, 3]  # scale-major rows, ids index model.scales
    # row of utterance 1 at avsr:16x5: 12 frames -> audio 24 Whisper frames // 16 = 1 token, video 12 // 5 = 2
    roles = inp.roles[3][inp.attention_mask[3].bool()].tolist()
    n_instr = len(model.sequences.instruction_ids["avsr"])
    B, A, V, I, T = (TokenRole.BOUNDARY, TokenRole.AUDIO, TokenRole.VIDEO, TokenRole.INSTRUCTION, TokenRole.TRANSCRIPT)
    assert roles == [B, B, A, B, B, V, V, B] + [I] * n_instr + [T] * 6  # BOS <a> A </a> <v> V V </v> ... hello EOS
    labels = inp.labels[3][inp.labels[3] != -100].tolist()
    tok = model.tokenizer
    assert labels == tok("hello", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert inp.attention_mask[3, len(roles):].sum() == 0  # right padding only
    prompt = model.build_inputs(batch, scales[:1], with_transcripts=False)
    assert prompt.labels is None and prompt.attention_mask[:, -1].all()  # left padding for generation


def test_zero_initialised_mome_equals_frozen_llm_exactly(tiny_dir):
    for placement in ("mhsa", "ffn", "layer"):
        model = build(tiny_dir, "mome", f"model.mome.placement={placement}")
        frozen, _ = load_llm_backbone(model.config.llm)  # a fresh, untouched copy (seeded random weights)
        inp = model.build_inputs(random_batch([12, 7]), model.scales, with_transcripts=True)
        with torch.no_grad(), model.adapter_call(inp, token_mask=True):
            ours = model.llm(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask).logits
            ref = frozen(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask).logits
        assert torch.equal(ours, ref), placement


@pytest.mark.parametrize("method", ["mome", "mtsk_mss"])
def test_loss_of_a_sample_does_not_depend_on_its_batch(tiny_dir, method):
    model = build(tiny_dir, method)
    activate_adapters(model)
    pair = random_batch([9, 21], texts=["short one", "a much longer transcript here"])
    alone = {k: (v[:1, : (640 * 9 if k == "audio" else 9)] if k in ("audio", "video") else v[:1]) for k, v in pair.items()}
    with torch.no_grad():
        out_alone = model(alone)
        out_pair = model(pair)
    assert out_pair.sample_ce.shape == (4, 2)
    assert torch.allclose(out_alone.sample_ce[:, 0], out_pair.sample_ce[:, 0], atol=1e-5)


def test_forward_loss_is_weighted_mean_of_scale_ce_plus_lb(tiny_dir):
    model = build(tiny_dir, "mome", "model.scale_weights=[1.0,2.0,1.0,0.5]")
    out = model(random_batch([12, 7]))
    ce = torch.stack([out.ce[s.name] for s in model.scales])
    expected = (ce * torch.tensor([1.0, 2.0, 1.0, 0.5])).sum() / 4 + 0.01 * out.aux["lb"]
    assert torch.allclose(out.loss, expected)
    assert out.aux["lb"] > 0 and out.expert_load.shape == (2, 4)
    assert torch.allclose(out.expert_load.sum(1), torch.ones(2))


def test_sample_mode_uses_one_rate_pair_for_every_task(tiny_dir):
    model = build(tiny_dir, "mome", "model.matryoshka=sample", "model.tasks=[asr,vsr,avsr]")
    picked = model.training_scales()
    assert [s.task for s in picked] == ["asr", "vsr", "avsr"]
    assert picked[0].audio_rate == picked[2].audio_rate and picked[1].video_rate == picked[2].video_rate
    out = model(random_batch([12, 7]))
    assert len(out.ce) == 3


# ----------------------------------------------------------------------------------------------------------------
# methods


EXPECTED_TRAINABLE = {
    "mome": [r"mome\.\d+\.(router\.weight|experts\.(down|down_b|up|up_b))"],
    "mome_i": [r"mome\.\d+\.(router\.weight|experts\.(down|down_b|up|up_b))"],
    "llama_avsr": [r"llm\..*\.(q_proj|v_proj)\.lora_[AB]\.global\.weight"],
    "mtsk_ms": [r"llm\..*\.(q_proj|v_proj)\.lora_[AB]\.global\.weight"],
    "mtsk_ss": [r"llm\..*\.(q_proj|v_proj)\.lora_[AB]"],
    "mtsk_mss": [r"llm\..*\.(q_proj|v_proj)\.lora_[AB]", r"llm\..*\.(q_proj|v_proj)\.base\.lora_[AB]\.global\.weight"],
}
SHARED_TRAINABLE = [r"video_encoder\..*", r"(audio|video)_projectors\.by_rate\.\d+\..*", r"sequences\.boundary\.weight"]


@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameters_of_each_method(tiny_dir, method):
    model = build(tiny_dir, method)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    patterns = [re.compile(p) for p in SHARED_TRAINABLE + EXPECTED_TRAINABLE[method]]
    assert all(any(p.fullmatch(n) for p in patterns) for n in trainable), trainable
    for p in EXPECTED_TRAINABLE[method]:  # every expected group is present
        assert any(re.fullmatch(p, n) for n in trainable), p
    assert not any(n.startswith("audio_encoder.") for n in trainable)
    layers = model.llm.config.num_hidden_layers
    adapters = [n for n in trainable if n.startswith(("llm.", "mome."))]
    per_layer = {"mome": 5, "mome_i": 5, "llama_avsr": 4, "mtsk_ms": 4, "mtsk_ss": 4, "mtsk_mss": 8}[method]
    assert len(adapters) == layers * per_layer

    model.train()
    model(random_batch([12, 7])).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} got no gradient"
    if method in ("mtsk_ss", "mtsk_mss"):  # B starts at zero, so B's gradient shows which adapters were used
        wrappers = [m for m in model.llm.modules() if isinstance(m, ScaleLoRALinear)]
        assert len(wrappers) == 2 * layers
        for w in wrappers:
            assert w.lora_B.shape[0] == len(model.scales) == 4
            assert all(w.lora_B.grad[s].abs().sum() > 0 for s in range(4)), "a scale adapter got no gradient"


def test_scale_lora_selects_the_rows_adapter(tiny_dir):
    model = build(tiny_dir, "mtsk_ss")
    activate_adapters(model)
    inp = model.build_inputs(random_batch([12, 7]), model.scales, with_transcripts=True)
    with torch.no_grad(), model.adapter_call(inp):
        full = model.llm(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask).logits
        # zero every adapter except scale 2's: rows of scale 2 must not change, the others must
        for w in (m for m in model.llm.modules() if isinstance(m, ScaleLoRALinear)):
            keep = w.lora_B[2].clone()
            w.lora_B.zero_()
            w.lora_B[2] = keep
        only2 = model.llm(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask).logits
    rows2 = inp.scale_ids == 2
    assert torch.allclose(full[rows2], only2[rows2], atol=1e-6)
    assert not torch.allclose(full[~rows2], only2[~rows2], atol=1e-4)
    with pytest.raises(RuntimeError, match="outside an adapter call"):
        model.llm(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask)


def test_scale_lora_gradients_with_gradient_checkpointing(tiny_dir):
    grads = []
    for ckpt in ("false", "true"):
        model = build(tiny_dir, "mtsk_mss", f"model.llm.gradient_checkpointing={ckpt}")
        activate_adapters(model)
        model.train()
        model(random_batch([12, 7])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_single_scale_methods_reject_several_scales(tiny_dir):
    with pytest.raises(ValueError, match="one scale per model"):
        build(tiny_dir, "llama_avsr", "model.compression.audio_rates=[4,16]")


# ----------------------------------------------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("method", ["mome", "mtsk_ss"])
def test_generate_every_scale_batched_equals_one_by_one(tiny_dir, method):
    model = build(tiny_dir, method, "model.tasks=[asr,vsr,avsr]", "model.compression.video_rates=[5]")
    activate_adapters(model)
    model.eval()
    pair = random_batch([6, 15], seed=3)
    first = {k: (v[:1, : (640 * 6 if k == "audio" else 6)] if k in ("audio", "video") else v[:1]) for k, v in pair.items()}
    assert [s.name for s in model.scales] == ["asr:4", "asr:16", "vsr:5", "avsr:4x5", "avsr:16x5"]
    outputs = set()
    for scale in model.scales:
        both = model.generate(pair, scale, num_beams=2, max_new_tokens=4)
        one = model.generate(first, scale.name, num_beams=2, max_new_tokens=4)
        assert len(both) == 2 and both[0] == one[0], scale
        outputs.update(both)
    assert both == model.generate(pair, scale, num_beams=2, max_new_tokens=4)  # deterministic
    assert any(outputs)  # something was decoded


# ----------------------------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("method", ["mome", "mtsk_mss"])
def test_save_load_gives_identical_outputs(tiny_dir, tmp_path, method):
    model = build(tiny_dir, method)
    activate_adapters(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    batch = random_batch([12, 7])
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AVSRModel.from_pretrained(tmp_path / "ckpt")
    loaded.eval()
    assert loaded.trainable_state_dict().keys() == model.trainable_state_dict().keys()
    with torch.no_grad():
        assert torch.equal(model(batch).loss, loaded(batch).loss)
    assert model.generate(batch, "avsr:16x5", num_beams=2, max_new_tokens=5) == loaded.generate(
        batch, "avsr:16x5", num_beams=2, max_new_tokens=5
    )


def test_the_model_holds_its_model_config_not_the_run_config(tiny_dir):
    from omegaconf import OmegaConf

    cfg = tiny_config(tiny_dir, "mome", ["train.lr=0.5", "model.mome.lb_coef=0.25", "model.pack_rows=true"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert not hasattr(model, "cfg")
    assert OmegaConf.to_container(model.config) == OmegaConf.to_container(cfg.model)  # the model section, a copy
    assert model.config._get_parent() is None and "train" not in model.config and OmegaConf.is_readonly(model.config)
    assert (model.method, model.tasks, model.matryoshka, model.compression_method, model.pack_rows, model.lb_coef,
            model.z_coef) == ("mome", ["avsr"], "all", "avgpool", True, 0.25, 0.0)  # read once, in __init__
    assert model.expert_load_shape == (2, 4)  # tiny LLM: 2 layers, 4 routed experts
    assert build(tiny_dir, "mtsk_ms").expert_load_shape is None
    with pytest.raises(TypeError, match=r"model config \(cfg.model\), not the run config"):
        AVSRModel(cfg, model.llm, model.tokenizer, model.audio_encoder, model.video_encoder)


def test_a_model_folder_carries_the_run_config_or_the_model_config(tiny_dir, tmp_path):
    from omegaconf import OmegaConf

    from mome.config import load_saved_config
    from mome.models.checkpoints import load_model

    cfg = tiny_config(tiny_dir, "mome", ["eval.num_beams=2", "data.noise.type=white"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.save_pretrained(tmp_path / "run", run_config=cfg)  # a training checkpoint: the whole run config
    assert OmegaConf.to_container(load_saved_config(tmp_path / "run" / "config.yaml")) == OmegaConf.to_container(cfg)
    model.save_pretrained(tmp_path / "alone")  # the model config alone; other sections load as the defaults
    saved = OmegaConf.load(tmp_path / "alone" / "config.yaml")
    assert list(saved) == ["model"] and OmegaConf.to_container(saved.model) == OmegaConf.to_container(cfg.model)
    (tmp_path / "alone" / "COMPLETE").write_text("1\n")
    run_cfg, loaded = load_model(tmp_path / "alone")
    assert (run_cfg.eval.num_beams, run_cfg.data.noise.type) == (5, "babble")
    assert OmegaConf.to_container(loaded.config) == OmegaConf.to_container(cfg.model)
    other = tiny_config(tiny_dir, "mome", ["model.mome.top_k=1"])
    with pytest.raises(ValueError, match="not this model's config"):
        model.save_pretrained(tmp_path / "wrong", run_config=other)


def test_a_checkpoint_saved_before_the_noise_keys_merged_still_loads(tiny_dir, tmp_path):
    """main's checkpoints: config.yaml with eval.noise_type, analysis.noise_type / split / scales."""
    import yaml

    from mome.models.checkpoints import load_model

    cfg = tiny_config(tiny_dir, "mome")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ckpt = tmp_path / "checkpoints" / "step_0000001"
    model.save_pretrained(ckpt, run_config=cfg)
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    saved["eval"]["noise_type"] = "babble"
    saved["analysis"].update(noise_type="babble", split="test", scales=[])
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved))
    (ckpt / "COMPLETE").write_text("1\n")
    loaded = AVSRModel.from_pretrained(ckpt).eval()
    run_cfg, again = load_model(ckpt, ["eval.num_beams=1"])
    assert "noise_type" not in run_cfg.eval and run_cfg.eval.num_beams == 1
    batch = random_batch([12, 7])
    with torch.no_grad():
        assert torch.equal(model(batch).loss, loaded(batch).loss) and torch.equal(model(batch).loss, again(batch).loss)


def test_loading_on_a_different_backbone_fails_clearly(tiny_dir, tmp_path):
    from transformers import LlamaConfig

    model = build(tiny_dir, "mome")
    model.save_pretrained(tmp_path / "ckpt")
    other = tmp_path / "other_llm"
    config = LlamaConfig.from_pretrained(tiny_dir / "llm")
    config.initializer_range = 0.05  # same architecture, different weights
    config.save_pretrained(other)
    model.tokenizer.save_pretrained(other)
    with pytest.raises(BackboneMismatchError, match="frozen llm differs"):
        AVSRModel.from_pretrained(tmp_path / "ckpt", overrides=[f"model.llm.name={other}"])
    with pytest.raises(ValueError, match="do not match"):  # a checkpoint of another method
        build(tiny_dir, "mtsk_ms").load_trainable_state_dict(model.trainable_state_dict())


def test_backbone_folder_without_weights_needs_random_init(tiny_dir):
    cfg = tiny_config(tiny_dir, "mome", ["model.llm.random_init=false"])
    with pytest.raises(FileNotFoundError, match="random_init"):
        build_model(cfg)


# ----------------------------------------------------------------------------------------------------------------
# routing traces and parameter accounting


def test_record_routing_gives_per_utterance_records(tiny_dir):
    model = build(tiny_dir, "mome")
    batch = random_batch([12, 7])
    with model.record_routing() as log:
        model(batch, [Scale("avsr", 4, 2), Scale("avsr", 16, 5)])
        model.generate(batch, "avsr:4x2", num_beams=2, max_new_tokens=3)
    assert [c.kind for c in log.calls] == ["forward", "generate"]
    recs = list(log.calls[0].records())
    assert [(r["utterance_id"], r["scale"].name) for r in recs] == [
        ("utt0", "avsr:4x2"), ("utt1", "avsr:4x2"), ("utt0", "avsr:16x5"), ("utt1", "avsr:16x5")]
    r = recs[3]
    T = len(r["roles"])
    assert r["topk_ids"].shape == (T, 2, 2) and r["probs"].shape == (T, 2, 4)
    assert r["positions"].tolist() == list(range(T))
    # utt1 has 7 frames: 14 Whisper frames // 16 = no audio token (only the markers), 7 // 5 = 1 video token
    assert (r["roles"] == int(TokenRole.AUDIO)).sum() == 0 and (r["roles"] == int(TokenRole.VIDEO)).sum() == 1
    gen = list(log.calls[1].records())
    assert len(gen) == 2 and gen[1]["positions"].tolist() == list(range(len(gen[1]["roles"])))
    with pytest.raises(RuntimeError, match="no router"):
        with build(tiny_dir, "mtsk_ms").record_routing():
            pass


@pytest.mark.parametrize(
    "config, adapter_active",
    [("configs/mome_23_4_mhsa_llama3b.yaml", 12_732_048), ("configs/mtsk_ms_llama3b.yaml", 27_525_120)],
)
def test_parameter_counts_of_the_paper_configs(config, adapter_active):
    from mome.models.describe import describe

    report = describe(load_config(config))
    assert report["adapter_active"] == adapter_active
    rows = {r["component"].split(" ")[0]: r for r in report["components"]}
    assert rows["llm"]["trainable"] == 0 and rows["audio_encoder"]["trainable"] == 0


def test_describe_command_prints_table_and_json(capsys, tmp_path):
    import json

    from mome.models.__main__ import main

    out_json = tmp_path / "report.json"
    assert main(["describe", "--config", "configs/mtsk_ss_llama3b.yaml", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "lora" in printed and "27,525,120" in printed  # SS: one scale's LoRA active at a time
    report = json.loads(out_json.read_text())
    assert report["adapter_active"] == 27_525_120 and report["adapter_trainable"] == 4 * 27_525_120


def test_bf16_llm_keeps_fp32_trainable_parameters(tiny_dir):
    for method in ("mome", "mtsk_mss"):
        model = build(tiny_dir, method, "model.llm.dtype=bfloat16", "model.audio_encoder.dtype=bfloat16")
        assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        out = model(random_batch([12, 7]))
        out.loss.backward()
        assert torch.isfinite(out.loss)
