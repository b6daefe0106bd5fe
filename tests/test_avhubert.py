"""AV-HuBERT without fairseq: checkpoint key mapping, strict loading, forward semantics, padding, sizes.

The synthetic checkpoints are written from the fairseq AV-HuBERT layout (``avhubert/hubert.py``, ``resnet.py`` and
fairseq's wav2vec 2.0 ``TransformerEncoder``), key by key, never from our module's own state dict, and the reference
forward below reads those fairseq keys directly, so a wrong mapping or a wrong op order fails these tests.
"""
import argparse
import math
import os
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

from mome.models.avhubert import (
    AVHUBERT_SIZES,
    AVHubertArch,
    AVHubertEncoder,
    AVHubertLoadError,
    UnsafeCheckpointError,
    count_parameters,
    load_avhubert,
    map_fairseq_keys,
    read_fairseq_checkpoint,
)
from tests.untrusted_fixtures import SystemMarker, WritesMarker, evil_fairseq_checkpoint, write_fairseq_checkpoint

TINY = AVHubertArch(layers=2, dim=64, ffn_dim=128, heads=4, conv_pos=16, conv_pos_groups=16)


# ----------------------------------------------------------------------------------------------------------------
# the fairseq checkpoint layout (AVHubertModel: resnet_relu_type=prelu, modality_fuse=concat, audio_feat_dim=104,
# final_dim=256, untie_final_proj, sub_encoder_layers=0)


def fairseq_shapes(layers, dim, ffn, conv_pos=128, conv_groups=16, audio_feat_dim=104, final_dim=256, clusters=2000):
    s = {}
    R = "feature_extractor_video.resnet."

    def bn(prefix, c):
        s.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                  f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    s[R + "frontend3D.0.weight"] = (64, 1, 5, 7, 7)
    bn(R + "frontend3D.1", 64)
    s[R + "frontend3D.2.weight"] = (64,)  # PReLU
    cin = 64
    for li, cout in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"{R}trunk.layer{li}.{b}."
            first_in = cin if b == 0 else cout
            s[p + "conv1.weight"] = (cout, first_in, 3, 3)
            bn(p + "bn1", cout)
            s[p + "relu1.weight"] = (cout,)
            s[p + "conv2.weight"] = (cout, cout, 3, 3)
            bn(p + "bn2", cout)
            s[p + "relu2.weight"] = (cout,)
            if b == 0 and li > 1:
                s[p + "downsample.0.weight"] = (cout, first_in, 1, 1)
                bn(p + "downsample.1", cout)
        cin = cout
    s["feature_extractor_video.proj.weight"] = (dim, 512)
    s["feature_extractor_video.proj.bias"] = (dim,)
    s["feature_extractor_audio.proj.weight"] = (dim, audio_feat_dim)
    s["feature_extractor_audio.proj.bias"] = (dim,)
    s["mask_emb"] = (audio_feat_dim,)
    s["layer_norm.weight"] = (2 * dim,)
    s["layer_norm.bias"] = (2 * dim,)
    s["post_extract_proj.weight"] = (dim, 2 * dim)
    s["post_extract_proj.bias"] = (dim,)
    s["encoder.pos_conv.0.bias"] = (dim,)
    s["encoder.pos_conv.0.weight_g"] = (1, 1, conv_pos)
    s["encoder.pos_conv.0.weight_v"] = (dim, dim // conv_groups, conv_pos)
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            s[p + f"self_attn.{proj}.weight"] = (dim, dim)
            s[p + f"self_attn.{proj}.bias"] = (dim,)
        s[p + "self_attn_layer_norm.weight"] = (dim,)
        s[p + "self_attn_layer_norm.bias"] = (dim,)
        s[p + "fc1.weight"] = (ffn, dim)
        s[p + "fc1.bias"] = (ffn,)
        s[p + "fc2.weight"] = (dim, ffn)
        s[p + "fc2.bias"] = (dim,)
        s[p + "final_layer_norm.weight"] = (dim,)
        s[p + "final_layer_norm.bias"] = (dim,)
    s["encoder.layer_norm.weight"] = (dim,)
    s["encoder.layer_norm.bias"] = (dim,)
    s["final_proj.weight"] = (final_dim, dim)
    s["final_proj.bias"] = (final_dim,)
    s["label_embs_concat"] = (clusters, final_dim)
    return s


FAIRSEQ_IGNORED_PREFIXES = ("feature_extractor_audio.", "mask_emb", "final_proj.", "label_embs_concat")


def synthetic_state_dict(arch, device="cpu", seed=0, **kw):
    shapes = fairseq_shapes(arch.layers, arch.dim, arch.ffn_dim, arch.conv_pos, arch.conv_pos_groups, **kw)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shp in shapes.items():
        if device == "meta":
            sd[k] = torch.empty(shp, device="meta", dtype=torch.long if k.endswith("num_batches_tracked") else None)
        elif k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shp, generator=g) + 0.5
        elif k.endswith("running_mean"):
            sd[k] = torch.randn(shp, generator=g) * 0.1
        elif k.endswith(".weight") and len(shp) == 1:  # norms, PReLU
            sd[k] = 1.0 + 0.1 * torch.randn(shp, generator=g) if "relu" not in k and "frontend3D.2" not in k else 0.25 + 0.05 * torch.rand(shp, generator=g)
        elif k.endswith("weight_g"):
            sd[k] = 0.5 + torch.rand(shp, generator=g)
        else:
            fan_in = math.prod(shp[1:]) if len(shp) > 1 else 16
            sd[k] = torch.randn(shp, generator=g) / math.sqrt(fan_in)
    return sd


# ----------------------------------------------------------------------------------------------------------------
# a reference forward written directly on the fairseq keys (extract_finetune, video only, eval mode)


def reference_forward(sd, arch, video, lengths):
    """video [B, T, 1, H, W]; padded frames are zero; returns [B, T, d] for each sample run alone (no batching)."""
    outs = []
    for b in range(video.shape[0]):
        n = int(lengths[b])
        x = video[b:b + 1, :n].transpose(1, 2)  # [1, 1, n, H, W]

        def bn(x, p):
            return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5)

        R = "feature_extractor_video.resnet."
        x = F.conv3d(x, sd[R + "frontend3D.0.weight"], stride=(1, 2, 2), padding=(2, 3, 3))
        x = F.prelu(bn(x, R + "frontend3D.1"), sd[R + "frontend3D.2.weight"])
        x = F.max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
        x = x.transpose(1, 2).reshape(n, 64, x.shape[-2], x.shape[-1])
        for li in range(1, 5):
            for blk in range(2):
                p = f"{R}trunk.layer{li}.{blk}."
                stride = 2 if (li > 1 and blk == 0) else 1
                h = F.prelu(bn(F.conv2d(x, sd[p + "conv1.weight"], stride=stride, padding=1), p + "bn1"), sd[p + "relu1.weight"])
                h = bn(F.conv2d(h, sd[p + "conv2.weight"], padding=1), p + "bn2")
                skip = x
                if p + "downsample.0.weight" in sd:
                    skip = bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride), p + "downsample.1")
                x = F.prelu(h + skip, sd[p + "relu2.weight"])
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # [n, 512]
        v = F.linear(x, sd["feature_extractor_video.proj.weight"], sd["feature_extractor_video.proj.bias"])[None]
        feats = torch.cat([torch.zeros_like(v), v], -1)  # audio (zeros) first
        feats = F.layer_norm(feats, feats.shape[-1:], sd["layer_norm.weight"], sd["layer_norm.bias"])
        x = F.linear(feats, sd["post_extract_proj.weight"], sd["post_extract_proj.bias"])
        w = torch._weight_norm(sd["encoder.pos_conv.0.weight_v"], sd["encoder.pos_conv.0.weight_g"], 2)
        c = F.conv1d(x.transpose(1, 2), w, sd["encoder.pos_conv.0.bias"], padding=arch.conv_pos // 2, groups=arch.conv_pos_groups)
        c = c[..., :-1] if arch.conv_pos % 2 == 0 else c
        x = x + F.gelu(c).transpose(1, 2)
        hd = arch.dim // arch.heads
        for i in range(arch.layers):
            p = f"encoder.layers.{i}."

            def lin(z, name):
                return F.linear(z, sd[p + name + ".weight"], sd[p + name + ".bias"])

            h = F.layer_norm(x, (arch.dim,), sd[p + "self_attn_layer_norm.weight"], sd[p + "self_attn_layer_norm.bias"])
            q = lin(h, "self_attn.q_proj") * hd ** -0.5
            k, vv = lin(h, "self_attn.k_proj"), lin(h, "self_attn.v_proj")
            q, k, vv = (z.view(1, n, arch.heads, hd).transpose(1, 2) for z in (q, k, vv))
            att = torch.softmax(q @ k.transpose(-1, -2), -1) @ vv
            x = x + lin(att.transpose(1, 2).reshape(1, n, arch.dim), "self_attn.out_proj")
            h = F.layer_norm(x, (arch.dim,), sd[p + "final_layer_norm.weight"], sd[p + "final_layer_norm.bias"])
            x = x + lin(F.gelu(lin(h, "fc1")), "fc2")
        x = F.layer_norm(x, (arch.dim,), sd["encoder.layer_norm.weight"], sd["encoder.layer_norm.bias"])
        outs.append(x[0])
    return outs


def tiny_encoder(sd=None, **cfg):
    enc = AVHubertEncoder(**cfg, arch=TINY)
    if sd is not None:
        enc.load_fairseq_state_dict(sd, strict=True)
    return enc


def random_video(b, t, seed=0, hw=32):  # any size works; 88 x 88 in real data
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 1, hw, hw, generator=g)


# ----------------------------------------------------------------------------------------------------------------
# loading


def test_real_large_layout_loads_strictly_on_meta():
    sd = synthetic_state_dict(AVHUBERT_SIZES["large"], device="meta")
    with torch.device("meta"):
        enc = AVHubertEncoder(size="large")
    rep = enc.load_fairseq_state_dict(sd, strict=True)
    assert rep.ok and not rep.missing and not rep.unexpected
    assert len(rep.loaded) == len(enc.state_dict())
    assert sorted(rep.ignored) == sorted(k for k in sd if k.startswith(FAIRSEQ_IGNORED_PREFIXES))
    assert not any(p.requires_grad for p in enc.parameters())  # frozen survives assign=True


def test_base_layout_maps_every_key():
    sd = synthetic_state_dict(AVHUBERT_SIZES["base"], device="meta")
    with torch.device("meta"):
        enc = AVHubertEncoder(size="base")
    assert enc.load_fairseq_state_dict(sd, strict=True).ok


def test_missing_unexpected_and_mismatched_keys_are_named():
    sd = synthetic_state_dict(TINY)
    del sd["encoder.layers.1.self_attn.k_proj.bias"]
    sd["encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    sd["encoder.layers.0.fc1.weight"] = torch.zeros(7, 64)
    enc = tiny_encoder()
    with pytest.raises(AVHubertLoadError) as err:
        enc.load_fairseq_state_dict(sd, strict=True, source="fake.pt")
    msg = str(err.value)
    assert "fake.pt" in msg
    assert "layers.1.attn.k_proj.bias" in msg and "missing" in msg
    assert "encoder.layers.0.self_attn.rotary.weight" in msg and "unexpected" in msg
    assert "encoder.layers.0.fc1.weight (7, 64)" in msg
    # non-strict: loads the rest and reports the same problems
    rep = enc.load_fairseq_state_dict(sd, strict=False)
    assert not rep.ok
    assert rep.missing == ["layers.1.attn.k_proj.bias"]
    assert [m[:2] for m in rep.mismatched] == [("encoder.layers.0.fc1.weight", "layers.0.fc1.weight")]
    assert rep.unexpected == ["encoder.layers.0.self_attn.rotary.weight"]
    torch.testing.assert_close(enc.fuse_proj.weight, sd["post_extract_proj.weight"])


def test_finetuned_prefix_and_new_torch_weight_norm_names():
    sd = synthetic_state_dict(TINY)
    sd["encoder.pos_conv.0.parametrizations.weight.original0"] = sd.pop("encoder.pos_conv.0.weight_g")
    sd["encoder.pos_conv.0.parametrizations.weight.original1"] = sd.pop("encoder.pos_conv.0.weight_v")
    ft = {"encoder.w2v_model." + k: v for k, v in sd.items()}
    ft["decoder.embed_tokens.weight"] = torch.zeros(10, 4)
    m = map_fairseq_keys(ft)
    assert not m.unmapped and "decoder.embed_tokens.weight" in m.ignored
    assert m.mapped["encoder.w2v_model.encoder.pos_conv.0.parametrizations.weight.original1"] == "pos_conv.weight_v"
    enc = tiny_encoder()
    assert enc.load_fairseq_state_dict(ft, strict=True).ok


def test_checkpoint_file_without_fairseq(tmp_path):
    """A checkpoint whose pickled cfg names fairseq / omegaconf / AV-HuBERT classes loads without them (inert stubs);
    the architecture in its cfg is checked."""
    sd = synthetic_state_dict(TINY)
    path = write_fairseq_checkpoint(tmp_path / "tiny_avhubert.pt", sd, layers=2, dim=64, ffn=128, heads=4)
    enc = load_avhubert(path, TINY)
    assert enc.load_report.ok
    torch.testing.assert_close(enc.layers[1].fc2.weight, sd["encoder.layers.1.fc2.weight"])
    assert not any(m.split(".")[0] in ("fairseq", "avhubert") for m in sys.modules)  # nothing of theirs imported

    with pytest.raises(AVHubertLoadError, match=r"encoder_layers=2 \(we build 24\)"):
        load_avhubert(path, "large")
    old_style = tmp_path / "old_style.pt"  # pre-hydra fairseq: an argparse.Namespace under "args"
    torch.save({"model": sd, "cfg": None, "args": argparse.Namespace(
        encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
        data=pathlib.PurePosixPath("/data/lrs3"))}, old_style)
    assert load_avhubert(old_style, TINY).load_report.ok
    with pytest.raises(AVHubertLoadError, match=r"encoder_layers=2 \(we build 24\)"):
        load_avhubert(old_style, "large")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_avhubert(tmp_path / "nope.pt", TINY)
    bad = tmp_path / "bad.pt"
    torch.save({"state": 1}, bad)
    with pytest.raises(AVHubertLoadError, match="not a fairseq checkpoint"):
        load_avhubert(bad, TINY)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AVHubertLoadError, match="cut.pt: cannot read as a PyTorch checkpoint"):
        load_avhubert(cut, TINY)


def test_large_vox_iter5_layout_and_config_objects_load(tmp_path):
    """The file structure of ``large_vox_iter5.pt`` (Large key layout, omegaconf cfg with a fairseq enum and the
    AV-HuBERT config dataclass, optimizer history, meters, numpy scalars) reads through the restricted unpickler;
    the tensors are meta here (a real-size file would be 1.3 GB)."""
    sd = synthetic_state_dict(AVHUBERT_SIZES["large"], device="meta")
    path = write_fairseq_checkpoint(tmp_path / "large_vox_iter5.pt", sd, layers=24, dim=1024, ffn=4096, heads=16)
    state, model_cfg = read_fairseq_checkpoint(path)
    assert set(state) == set(sd) and state["encoder.layers.23.fc1.weight"].shape == (4096, 1024)
    assert model_cfg["encoder_layers"] == 24 and model_cfg["encoder_embed_dim"] == 1024
    assert model_cfg["extractor_mode"] == "default" and model_cfg["layer_norm_first"] is True
    assert model_cfg["modality_fuse"] == "concat" and model_cfg["_name"] == "av_hubert"
    with torch.device("meta"):
        enc = AVHubertEncoder(size="large")
    enc.load_fairseq_checkpoint(path, strict=True)
    assert enc.load_report.ok and len(enc.load_report.loaded) == len(enc.state_dict())


@pytest.mark.parametrize("payload", [WritesMarker, SystemMarker], ids=["exec", "os.system"])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, payload):
    """A real-looking checkpoint with a payload in extra_state: refused naming the file and the global, nothing runs,
    whether read directly, through load_avhubert or through the config section (model.video_encoder.checkpoint)."""
    marker = tmp_path / "pwned"
    path = evil_fairseq_checkpoint(tmp_path / "evil.pt", marker, synthetic_state_dict(TINY), 2, 64, 128, 4, payload)
    glob = "builtins.exec" if payload is WritesMarker else f"{os.system.__module__}.system"
    for load in (lambda: read_fairseq_checkpoint(path), lambda: load_avhubert(path, TINY),
                 lambda: AVHubertEncoder(checkpoint=str(path), arch=TINY)):
        with pytest.raises(UnsafeCheckpointError) as err:
            load()
        assert str(path) in str(err.value) and f"'{glob}'" in str(err.value)
        assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# forward


@pytest.fixture(scope="module")
def loaded_tiny():
    sd = synthetic_state_dict(TINY, seed=1)
    return sd, tiny_encoder(sd)


def test_forward_matches_fairseq_reference(loaded_tiny):
    sd, enc = loaded_tiny
    video = random_video(1, 5, seed=2, hw=88)
    with torch.no_grad():
        out, lens = enc(video, torch.tensor([5]))
    ref = reference_forward(sd, TINY, video, [5])[0]
    assert out.shape == (1, 5, 64) and lens.tolist() == [5]
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)


def test_shapes_frame_rate_and_padding_invariance(loaded_tiny):
    sd, enc = loaded_tiny
    lengths = torch.tensor([6, 4, 2])
    video = random_video(3, 6, seed=3)
    for i, n in enumerate(lengths.tolist()):
        video[i, n:] = 123.0  # garbage in the padding must not leak into the valid frames
    out, lens = enc(video, lengths)
    assert out.shape == (3, 6, TINY.dim)  # one feature per input frame: 25 fps in, 25 Hz out
    assert torch.equal(lens, lengths) and enc.output_dim == TINY.dim
    for i, n in enumerate(lengths.tolist()):
        alone, _ = enc(video[i:i + 1, :n].clone(), torch.tensor([n]))
        torch.testing.assert_close(out[i, :n], alone[0], atol=1e-4, rtol=1e-4)
        assert torch.all(out[i, n:] == 0)
    ref = reference_forward(sd, TINY, video.masked_fill(torch.arange(6)[None, :, None, None, None] >= lengths[:, None, None, None, None], 0.0), lengths)
    torch.testing.assert_close(out[2, :2], ref[2], atol=1e-4, rtol=1e-4)


def test_bad_input_is_rejected(loaded_tiny):
    _, enc = loaded_tiny
    with pytest.raises(ValueError, match=r"\[B, T, 1, H, W\]"):
        enc(torch.zeros(1, 4, 88, 88), torch.tensor([4]))
    with pytest.raises(ValueError, match="lengths must lie"):
        enc(torch.zeros(1, 4, 1, 88, 88), torch.tensor([5]))


def test_frozen_by_default_and_lora_trains():
    enc = tiny_encoder()
    assert count_parameters(enc, trainable_only=True) == 0
    enc.train()
    assert not enc.training and not enc.frontend.stem.bn.training  # frozen: BN stats never update
    out, _ = enc(random_video(1, 4), torch.tensor([4]))
    assert not out.requires_grad

    sd = synthetic_state_dict(TINY, seed=4)
    lora = tiny_encoder(sd, lora_rank=8, lora_scaling=2.0)
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names == {f"layers.{i}.attn.lora_{w}.{d}.weight" for i in range(2) for w in "qv" for d in ("down", "up")}
    assert count_parameters(lora, trainable_only=True) == 2 * 2 * (64 * 8 + 8 * 64)
    assert all(torch.all(lora.layers[i].attn.lora_q.down.weight == 0) for i in range(2))  # down zero-init
    assert lora.layers[0].attn.lora_q.up.weight.abs().sum() > 0  # up kaiming
    video = random_video(2, 5, seed=5)
    base = tiny_encoder(sd)
    out0, _ = base(video, torch.tensor([5, 3]))
    out1, _ = lora(video, torch.tensor([5, 3]))
    torch.testing.assert_close(out0, out1)  # a fresh LoRA changes nothing
    out1.pow(2).sum().backward()
    assert all(lora.layers[i].attn.lora_q.down.weight.grad.abs().sum() > 0 for i in range(2))
    assert all(p.grad is None for n, p in lora.named_parameters() if "lora_" not in n)
    lora.gradient_checkpointing = True
    g0 = lora.layers[0].attn.lora_v.down.weight.grad.clone()
    lora.zero_grad()
    lora(video, torch.tensor([5, 3]))[0].pow(2).sum().backward()
    torch.testing.assert_close(lora.layers[0].attn.lora_v.down.weight.grad, g0)


def test_unfrozen_trains_everything_with_dropout():
    enc = AVHubertEncoder(frozen=False, arch=TINY)
    assert count_parameters(enc, trainable_only=True) == count_parameters(enc)
    enc.train()
    assert enc.training
    enc(random_video(1, 3), None)[0].sum().backward()
    assert enc.frontend.stem.conv.weight.grad is not None


def test_config_section_builds_the_encoder():
    from mome.config import load_config
    from mome.models.encoders import build_video_encoder

    cfg = load_config(None, ["model.video_encoder.type=avhubert", "model.video_encoder.size=base",
                             "model.video_encoder.lora_rank=4"])
    enc = build_video_encoder(cfg.model.video_encoder, device="meta")
    assert enc.output_dim == 768 and len(enc.layers) == 12 and enc.lora_rank == 4


# ----------------------------------------------------------------------------------------------------------------
# sizes


def test_large_parameter_count():
    """Ours: the video path only. The full fairseq model adds the audio front end, mask embedding and heads."""
    with torch.device("meta"):
        enc = AVHubertEncoder(size="large")
    ours = count_parameters(enc)
    shapes = fairseq_shapes(24, 1024, 4096)
    tensors = {k: math.prod(s) for k, s in shapes.items() if "running_" not in k and "num_batches" not in k}
    encoder_part = sum(n for k, n in tensors.items() if not k.startswith(FAIRSEQ_IGNORED_PREFIXES))
    full = sum(tensors.values())
    assert ours == encoder_part == 324_515_456
    assert 320e6 < full < 330e6  # published: ~325 M for AV-HuBERT Large
    assert count_parameters(enc.layers) == 24 * (4 * (1024 * 1024 + 1024) + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024)
    with torch.device("meta"):
        lora = AVHubertEncoder(size="large", lora_rank=64)
    assert count_parameters(lora, trainable_only=True) == 6_291_456  # 6.29 M (docs/method.md#av-hubert)
