"""AV-HuBERT (Base / Large) as a video-only encoder, in plain PyTorch (no fairseq).

Architecture (AV-HuBERT pretraining configs, ``layer_norm_first: true``, ``modality_fuse: concat``):

1. **Visual front end** (ResNet-18 lip reader): a 3D stem ``Conv3d(1, 64, (5, 7, 7), stride (1, 2, 2))`` + BN + PReLU +
   ``MaxPool3d((1, 3, 3), stride (1, 2, 2))``, then a 2D ResNet-18 trunk (BasicBlocks [2, 2, 2, 2], 64..512 channels,
   PReLU, 1x1-conv + BN downsampling) applied to every frame, global average pool -> 512 per frame, ``Linear(512, d)``.
2. **Fusion** ``concat``: the audio half is zero-filled (video-only input), ``[zeros(d), video(d)]`` (audio first, as
   in the reference) -> ``LayerNorm(2d)`` -> ``Linear(2d, d)``.
3. **Transformer encoder** (wav2vec 2.0 style): padded frames zeroed, plus a convolutional positional embedding
   (``Conv1d(d, d, 128, groups=16)`` with weight normalisation over the kernel axis, the last output dropped, GELU),
   then pre-LN layers (``x + MHA(LN(x))``, ``x + FC2(GELU(FC1(LN(x))))``) and a final LayerNorm.

One output feature per input frame: ``[B, T, d]`` at the video rate (25 Hz for LRS2/LRS3).

Differences from the reference call ``extract_finetune(padding_mask=None)`` used by Llama-AVSR / Omni-AVSR:

* padded frames are masked (zeroed before the 3D stem and the positional convolution, excluded as attention keys,
  zeroed in the output), so a sample's features do not depend on what it is batched with;
* when frozen, the whole encoder runs in eval mode (no dropout / LayerDrop, BatchNorm uses its running statistics).
  The reference trains under Lightning, which puts the frozen encoder in train mode (docs/decisions.md#avhubert-mode); we do not
  replicate that: frozen weights with batch-statistics BatchNorm and random LayerDrop would make the features
  depend on the batch and on chance.

Optional LoRA on the Q and V projections of every layer (``q += s * up(down(x))``, same for V; down initialised to
zero, up Kaiming-uniform, no bias, as in the Omni-AVSR code; ``s = lora_scaling``, 2 there) is trainable when the
rest is frozen.

Loading: :func:`load_avhubert` / :meth:`AVHubertEncoder.load_fairseq_checkpoint` read a fairseq checkpoint (a
pickled dict with ``"model"`` (state dict) and ``"cfg"`` / ``"args"``) without fairseq installed, map its keys onto
ours with explicit rules (:func:`map_fairseq_keys`), list the keys we deliberately drop (audio front end, masking
and pretraining heads, a fine-tuned model's decoder) and report every key that matches nothing, every parameter the
checkpoint lacks and every shape mismatch. ``strict=True`` raises :class:`AVHubertLoadError` naming them.
The pickle is read by a restricted unpickler (:func:`read_fairseq_checkpoint`): a file that names anything but
tensor data, containers and (inert stubs of) fairseq / omegaconf config classes is refused with
:class:`UnsafeCheckpointError` naming the file and the global, before any of it runs.
"""
from __future__ import annotations

import _compat_pickle
import importlib
import logging
import math
import pickle
import re
import types
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "AVHubertArch",
    "AVHUBERT_SIZES",
    "AVHubertEncoder",
    "AVHubertLoadError",
    "UnsafeCheckpointError",
    "LoadReport",
    "load_avhubert",
    "read_fairseq_checkpoint",
    "map_fairseq_keys",
]


# ----------------------------------------------------------------------------------------------------------------
# architecture


@dataclass(frozen=True)
class AVHubertArch:
    """Shape and regularisation hyper-parameters (names follow the fairseq ``AVHubertConfig`` fields)."""

    layers: int  # encoder_layers
    dim: int  # encoder_embed_dim
    ffn_dim: int  # encoder_ffn_embed_dim
    heads: int  # encoder_attention_heads
    conv_pos: int = 128  # kernel of the convolutional positional embedding
    conv_pos_groups: int = 16
    resnet_channels: Tuple[int, int, int, int] = (64, 128, 256, 512)  # ResNet-18 (fixed in AV-HuBERT)
    resnet_blocks: Tuple[int, int, int, int] = (2, 2, 2, 2)
    # regularisation, used only when the encoder is not frozen (pretraining-config values)
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.1
    layerdrop: float = 0.05

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"AV-HuBERT: dim {self.dim} is not divisible by heads {self.heads}")
        if self.dim % self.conv_pos_groups:
            raise ValueError(f"AV-HuBERT: dim {self.dim} is not divisible by conv_pos_groups {self.conv_pos_groups}")


AVHUBERT_SIZES: Dict[str, AVHubertArch] = {
    "base": AVHubertArch(layers=12, dim=768, ffn_dim=3072, heads=12),
    "large": AVHubertArch(layers=24, dim=1024, ffn_dim=4096, heads=16),
}


def _arch(size: Union[str, AVHubertArch]) -> AVHubertArch:
    if isinstance(size, AVHubertArch):
        return size
    key = str(size).lower()
    if key not in AVHUBERT_SIZES:
        raise ValueError(f"AV-HuBERT size '{size}' is unknown; choose one of {', '.join(AVHUBERT_SIZES)}")
    return AVHUBERT_SIZES[key]


# ----------------------------------------------------------------------------------------------------------------
# visual front end


class _Stem3D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(1, channels, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False)
        self.bn = nn.BatchNorm3d(channels)
        self.act = nn.PReLU(channels)
        self.pool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # [B, 1, T, H, W] -> [B, C, T, H/4, W/4]
        return self.pool(self.act(self.bn(self.conv(x))))


class _Downsample(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.PReLU(cout)
        self.downsample = _Downsample(cin, cout, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.act2(out + skip)


class _ResNetTrunk(nn.Module):
    """2D ResNet-18 trunk applied frame by frame; ends in a global average pool."""

    def __init__(self, stem_channels: int, channels: Sequence[int], blocks: Sequence[int]):
        super().__init__()
        cin = stem_channels
        for i, (cout, n) in enumerate(zip(channels, blocks)):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(*[_BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)])
            self.add_module(f"layer{i + 1}", layer)
            cin = cout
        self.out_channels = cin

    def forward(self, x: Tensor) -> Tensor:  # [N, C, H, W] -> [N, C_out]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


class _VisualFrontend(nn.Module):
    def __init__(self, arch: AVHubertArch):
        super().__init__()
        self.stem = _Stem3D(arch.resnet_channels[0])
        self.trunk = _ResNetTrunk(arch.resnet_channels[0], arch.resnet_channels, arch.resnet_blocks)
        self.proj = nn.Linear(self.trunk.out_channels, arch.dim)

    def forward(self, video: Tensor) -> Tensor:  # [B, 1, T, H, W] -> [B, T, d]
        b, _, t = video.shape[:3]
        x = self.stem(video)  # [B, C, T, h, w]
        x = x.transpose(1, 2).flatten(0, 1)  # [B*T, C, h, w]
        x = self.trunk(x).view(b, t, -1)
        return self.proj(x)


# ----------------------------------------------------------------------------------------------------------------
# transformer


class _ConvPositionalEmbedding(nn.Module):
    """Grouped Conv1d with weight normalisation over the kernel axis (fairseq ``weight_norm(dim=2)``).

    Parameters ``weight_g`` [1, 1, k], ``weight_v`` [d, d/groups, k], ``bias`` [d]; the effective kernel is
    ``weight_g * weight_v / ||weight_v||`` with the norm taken over the first two axes for each kernel tap.
    An even kernel gives one extra output step, which is dropped (fairseq ``SamePad``).
    """

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight_v = nn.Parameter(torch.empty(dim, dim // groups, kernel))
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel))
        self.bias = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.weight_v, 0.0, math.sqrt(4.0 / (kernel * dim)))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))
        nn.init.zeros_(self.bias)

    def weight(self) -> Tensor:
        v = self.weight_v
        return v * (self.weight_g / v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x: Tensor) -> Tensor:  # [B, T, d] -> [B, T, d]
        y = F.conv1d(x.transpose(1, 2), self.weight(), self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:
            y = y[..., :-1]
        return F.gelu(y).transpose(1, 2)


class _LoRA(nn.Module):
    """``scaling * up(down(x))``; down starts at zero (so the delta starts at zero), up is Kaiming-uniform."""

    def __init__(self, dim_in: int, dim_out: int, rank: int, scaling: float):
        super().__init__()
        self.scaling = scaling
        self.down = nn.Linear(dim_in, rank, bias=False)
        self.up = nn.Linear(rank, dim_out, bias=False)
        nn.init.zeros_(self.down.weight)
        nn.init.kaiming_uniform_(self.up.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x)) * self.scaling


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, lora_rank: int = 0, lora_scaling: float = 2.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.lora_q = _LoRA(dim, dim, lora_rank, lora_scaling) if lora_rank > 0 else None
        self.lora_v = _LoRA(dim, dim, lora_rank, lora_scaling) if lora_rank > 0 else None

    def forward(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        """x [B, T, d]; key_mask [B, 1, 1, T] bool (True = attend) or None."""
        b, t, d = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.lora_q is not None:
            q = q + self.lora_q(x)
            v = v + self.lora_v(x)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, d))


class _EncoderLayer(nn.Module):
    """Pre-LN transformer layer (fairseq ``TransformerSentenceEncoderLayer`` with ``layer_norm_first``)."""

    def __init__(self, arch: AVHubertArch, lora_rank: int = 0, lora_scaling: float = 2.0):
        super().__init__()
        self.attn_norm = nn.LayerNorm(arch.dim)
        self.attn = _SelfAttention(arch.dim, arch.heads, arch.attention_dropout, lora_rank, lora_scaling)
        self.ffn_norm = nn.LayerNorm(arch.dim)
        self.fc1 = nn.Linear(arch.dim, arch.ffn_dim)
        self.fc2 = nn.Linear(arch.ffn_dim, arch.dim)
        self.dropout, self.activation_dropout = arch.dropout, arch.activation_dropout

    def forward(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        h = self.attn(self.attn_norm(x), key_mask)
        x = x + F.dropout(h, self.dropout, self.training)
        h = F.dropout(F.gelu(self.fc1(self.ffn_norm(x))), self.activation_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.dropout, self.training)


# ----------------------------------------------------------------------------------------------------------------
# the encoder


class AVHubertEncoder(nn.Module):
    """Video-only AV-HuBERT encoder: ``forward(video [B, T, 1, H, W], lengths [B]) -> (features [B, T, d], lengths)``.

    The arguments are the settings of ``model.video_encoder`` (``size``, ``checkpoint``, ``frozen``, ``lora_rank``,
    ``lora_scaling``, ``strict_load``), unpacked by the builder (``mome.models.encoders.build_avhubert``). ``arch``
    overrides the preset chosen by ``size`` (tests use tiny ones). With a ``checkpoint`` path the
    weights are loaded at construction (skipped on the meta device, where there is nothing to load into); without
    one the weights are random stand-ins of the right shapes (logged as a warning).

    Frozen (default): every pretrained weight has ``requires_grad=False``, the module stays in eval mode whatever
    ``.train()`` says, and the front end (plus the transformer when there is no LoRA) runs under ``no_grad``.
    LoRA parameters (``lora_rank > 0``) are trainable. ``gradient_checkpointing = True`` recomputes each transformer
    layer in backward (useful with LoRA or when fine-tuning).
    """

    frame_rate_ratio = 1  # output frames per input frame (25 Hz in, 25 Hz out)

    def __init__(self, size: str = "large", checkpoint: str = "", frozen: bool = True, lora_rank: int = 0,
                 lora_scaling: float = 2.0, strict_load: bool = True, arch: Optional[AVHubertArch] = None):
        super().__init__()
        self.arch = arch if arch is not None else _arch(size)
        ckpt = str(checkpoint or "")
        read = None
        if ckpt and not torch.empty(()).is_meta:  # read and check the file first: building Large takes seconds
            read = read_fairseq_checkpoint(ckpt)
            _check_checkpoint_arch(read[1], self.arch, ckpt)
        self.frozen = bool(frozen)
        self.lora_rank = int(lora_rank)
        self.lora_scaling = float(lora_scaling)
        self.gradient_checkpointing = False
        a = self.arch
        self.frontend = _VisualFrontend(a)
        self.fuse_norm = nn.LayerNorm(2 * a.dim)  # over [audio (zeros), video]
        self.fuse_proj = nn.Linear(2 * a.dim, a.dim)
        self.pos_conv = _ConvPositionalEmbedding(a.dim, a.conv_pos, a.conv_pos_groups)
        self.layers = nn.ModuleList(_EncoderLayer(a, self.lora_rank, self.lora_scaling) for _ in range(a.layers))
        self.final_norm = nn.LayerNorm(a.dim)
        self._init_transformer()
        if self.frozen:
            for name, p in self.named_parameters():
                p.requires_grad_(_is_lora_key(name))
            self.train(False)

        self.load_report: Optional[LoadReport] = None
        if ckpt:
            if any(p.is_meta for p in self.parameters()):
                logger.info("AV-HuBERT built on the meta device: checkpoint %s not read", ckpt)
            else:
                self.load_fairseq_state_dict(read[0], strict=bool(strict_load), source=ckpt)
        elif not any(p.is_meta for p in self.parameters()):
            logger.warning(
                "AV-HuBERT %s: no checkpoint given (model.video_encoder.checkpoint); weights are random stand-ins",
                "custom" if arch is not None else size,
            )

    @property
    def output_dim(self) -> int:
        return self.arch.dim

    def _init_transformer(self) -> None:
        """BERT-style init for the transformer (fairseq ``init_bert_params``); real use loads a checkpoint."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and ".lora_" not in name and not name.startswith("frontend"):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> "AVHubertEncoder":
        # a frozen encoder is a fixed feature extractor: no dropout, LayerDrop or BatchNorm updates
        return super().train(mode and not self.frozen)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ forward

    def forward(self, video: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if video.dim() != 5 or video.shape[2] != 1:
            raise ValueError(f"AV-HuBERT expects video [B, T, 1, H, W] (grayscale), got {tuple(video.shape)}")
        b, t = video.shape[:2]
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=video.device)
        lengths = lengths.to(video.device)
        if lengths.shape != (b,):
            raise ValueError(f"AV-HuBERT: lengths must have shape [{b}], got {tuple(lengths.shape)}")
        if bool((lengths < 1).any()) or bool((lengths > t).any()):
            raise ValueError(f"AV-HuBERT: lengths must lie in [1, {t}] (the padded length), got {lengths.tolist()}")
        valid = torch.arange(t, device=video.device)[None, :] < lengths[:, None]  # [B, T]
        all_valid = bool(valid.all())

        dtype = self.fuse_proj.weight.dtype
        x = video.to(dtype).transpose(1, 2)  # [B, 1, T, H, W]
        if not all_valid:  # padded frames read as zeros, exactly like the 3D conv's own zero padding
            x = x * valid[:, None, :, None, None].to(dtype)

        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = self.frontend(x)  # [B, T, d]
        with torch.set_grad_enabled(torch.is_grad_enabled() and (not self.frozen or self.lora_rank > 0)):
            out = self._encode(feats, None if all_valid else valid)
        if not all_valid:
            out = out * valid[..., None].to(out.dtype)
        return out, lengths

    def _encode(self, video_feats: Tensor, valid: Optional[Tensor]) -> Tensor:
        a = self.arch
        x = torch.cat([torch.zeros_like(video_feats), video_feats], dim=-1)  # audio half first, zero-filled
        x = self.fuse_proj(self.fuse_norm(x))
        x = F.dropout(x, a.dropout_input, self.training)
        if valid is not None:
            x = x * valid[..., None].to(x.dtype)
        x = x + self.pos_conv(x)
        x = F.dropout(x, a.dropout, self.training)
        key_mask = None if valid is None else valid[:, None, None, :]
        for layer in self.layers:
            if self.training and a.layerdrop > 0 and torch.rand(()).item() < a.layerdrop:
                continue
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_mask, use_reentrant=False)
            else:
                x = layer(x, key_mask)
        return self.final_norm(x)

    # ------------------------------------------------------------------ loading

    def load_fairseq_state_dict(
        self, state_dict: Mapping[str, Tensor], strict: bool = True, source: str = "state dict"
    ) -> "LoadReport":
        """Map a fairseq AV-HuBERT state dict onto this module; see :class:`LoadReport`.

        Raises :class:`AVHubertLoadError` under ``strict`` when a key matches nothing, a parameter or buffer is
        missing, or a shape differs. Otherwise loads what matches and logs the rest.
        """
        mapping = map_fairseq_keys(state_dict.keys())
        own = {k: v for k, v in self.state_dict().items() if not _is_lora_key(k)}
        unexpected = list(mapping.unmapped)
        mismatched: List[Tuple[str, str, Tuple[int, ...], Tuple[int, ...]]] = []
        to_load: Dict[str, Tensor] = {}
        for src, dst in mapping.mapped.items():
            if dst not in own:
                unexpected.append(src)
                continue
            t = state_dict[src]
            if tuple(t.shape) != tuple(own[dst].shape):
                mismatched.append((src, dst, tuple(t.shape), tuple(own[dst].shape)))
                continue
            to_load[dst] = t
        loaded_targets = set(mapping.mapped.values())
        missing = [k for k in own if k not in loaded_targets]
        report = LoadReport(
            source=source,
            loaded=sorted(to_load),
            ignored=sorted(mapping.ignored),
            unexpected=sorted(unexpected),
            missing=sorted(missing),
            mismatched=mismatched,
        )
        self.load_report = report
        if strict and not report.ok:
            raise AVHubertLoadError(report.describe())
        on_meta = any(v.is_meta for v in own.values())
        frozen_flags = {n: p.requires_grad for n, p in self.named_parameters()}
        incompatible = self.load_state_dict(to_load, strict=False, assign=on_meta)
        if on_meta:  # assign=True replaces the Parameter objects; keep our requires_grad choices
            for n, p in self.named_parameters():
                p.requires_grad_(frozen_flags[n])
        assert not incompatible.unexpected_keys, incompatible.unexpected_keys
        log = logger.info if report.ok else logger.warning
        log("%s", report.describe())
        return report

    def load_fairseq_checkpoint(self, path: Union[str, Path], strict: bool = True) -> "LoadReport":
        state_dict, model_cfg = read_fairseq_checkpoint(path)
        _check_checkpoint_arch(model_cfg, self.arch, path)
        return self.load_fairseq_state_dict(state_dict, strict=strict, source=str(path))


def _is_lora_key(name: str) -> bool:
    return ".lora_q." in name or ".lora_v." in name


# ----------------------------------------------------------------------------------------------------------------
# fairseq key mapping


# fairseq key (regex) -> our key; the first rule that matches wins
_KEY_RULES: List[Tuple[re.Pattern, str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^feature_extractor_video\.resnet\.frontend3D\.0\.(.+)$", r"frontend.stem.conv.\1"),
        (r"^feature_extractor_video\.resnet\.frontend3D\.1\.(.+)$", r"frontend.stem.bn.\1"),
        (r"^feature_extractor_video\.resnet\.frontend3D\.2\.(.+)$", r"frontend.stem.act.\1"),
        (r"^feature_extractor_video\.resnet\.trunk\.(layer[1-4]\.\d+)\.(conv[12]|bn[12])\.(.+)$", r"frontend.trunk.\1.\2.\3"),
        (r"^feature_extractor_video\.resnet\.trunk\.(layer[1-4]\.\d+)\.relu([12])\.(.+)$", r"frontend.trunk.\1.act\2.\3"),
        (r"^feature_extractor_video\.resnet\.trunk\.(layer[1-4]\.\d+)\.downsample\.0\.(.+)$", r"frontend.trunk.\1.downsample.conv.\2"),
        (r"^feature_extractor_video\.resnet\.trunk\.(layer[1-4]\.\d+)\.downsample\.1\.(.+)$", r"frontend.trunk.\1.downsample.bn.\2"),
        (r"^feature_extractor_video\.proj\.(weight|bias)$", r"frontend.proj.\1"),
        (r"^layer_norm\.(weight|bias)$", r"fuse_norm.\1"),
        (r"^post_extract_proj\.(weight|bias)$", r"fuse_proj.\1"),
        (r"^encoder\.pos_conv\.0\.(weight_g|weight_v|bias)$", r"pos_conv.\1"),
        # the same weights saved by a newer torch (parametrize.weight_norm)
        (r"^encoder\.pos_conv\.0\.parametrizations\.weight\.original0$", r"pos_conv.weight_g"),
        (r"^encoder\.pos_conv\.0\.parametrizations\.weight\.original1$", r"pos_conv.weight_v"),
        (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv]_proj|out_proj)\.(weight|bias)$", r"layers.\1.attn.\2.\3"),
        (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"layers.\1.attn_norm.\2"),
        (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"layers.\1.ffn_norm.\2"),
        (r"^encoder\.layers\.(\d+)\.(fc[12])\.(weight|bias)$", r"layers.\1.\2.\3"),
        (r"^encoder\.layer_norm\.(weight|bias)$", r"final_norm.\1"),
    ]
]

# keys we drop on purpose: the audio front end (input is video only), input masking, pretraining heads
_IGNORED_RULES = [
    re.compile(p)
    for p in (
        r"^feature_extractor_audio\.",
        r"^mask_emb$",
        r"^label_embs_concat$",
        r"^final_proj\.",
        r"^target_glu\.",
    )
]

# a fine-tuned AV-HuBERT (av_hubert_seq2seq / ctc) keeps the pretrained model under this prefix
_FINETUNED_PREFIX = "encoder.w2v_model."


@dataclass
class KeyMapping:
    mapped: Dict[str, str] = field(default_factory=dict)  # fairseq key -> our key
    ignored: List[str] = field(default_factory=list)  # fairseq keys dropped on purpose
    unmapped: List[str] = field(default_factory=list)  # fairseq keys that match no rule


def map_fairseq_keys(keys: Sequence[str]) -> KeyMapping:
    """Sort fairseq AV-HuBERT state-dict keys into mapped (with our name), deliberately ignored and unknown.

    A fine-tuned checkpoint (keys under ``encoder.w2v_model.``) is read through that prefix; its other keys
    (decoder, CTC projection) are ignored.
    """
    keys = list(keys)
    finetuned = any(k.startswith(_FINETUNED_PREFIX) for k in keys)
    out = KeyMapping()
    for key in keys:
        k = key
        if finetuned:
            if not key.startswith(_FINETUNED_PREFIX):
                out.ignored.append(key)
                continue
            k = key[len(_FINETUNED_PREFIX):]
        if any(r.search(k) for r in _IGNORED_RULES):
            out.ignored.append(key)
            continue
        for pattern, repl in _KEY_RULES:
            if pattern.match(k):
                out.mapped[key] = pattern.sub(repl, k)
                break
        else:
            out.unmapped.append(key)
    targets: Dict[str, str] = {}
    for src, dst in out.mapped.items():  # e.g. both weight_g and parametrizations.original0 present
        if dst in targets:
            raise AVHubertLoadError(f"AV-HuBERT checkpoint: keys '{targets[dst]}' and '{src}' both map to '{dst}'")
        targets[dst] = src
    return out


@dataclass
class LoadReport:
    """What a fairseq load did: every checkpoint key is loaded, ignored (on purpose) or unexpected."""

    source: str
    loaded: List[str]  # our keys that received a value
    ignored: List[str]  # checkpoint keys dropped on purpose (audio front end, pretraining heads, decoder)
    unexpected: List[str]  # checkpoint keys that match nothing of ours
    missing: List[str]  # our keys that the checkpoint does not provide
    mismatched: List[Tuple[str, str, Tuple[int, ...], Tuple[int, ...]]]  # (theirs, ours, their shape, our shape)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        def few(xs: Sequence[Any]) -> str:
            s = ", ".join(str(x) for x in xs[:limit])
            return s + (f", ... ({len(xs) - limit} more)" if len(xs) > limit else "")

        lines = [
            f"AV-HuBERT load from {self.source}: {len(self.loaded)} tensors loaded, "
            f"{len(self.ignored)} intentionally ignored"
            + (f" ({few(sorted({k.split('.')[0] for k in self.ignored}))})" if self.ignored else "")
        ]
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected checkpoint keys (match nothing): {few(self.unexpected)}")
        if self.missing:
            lines.append(f"  {len(self.missing)} parameters/buffers missing from the checkpoint: {few(self.missing)}")
        if self.mismatched:
            lines.append(
                f"  {len(self.mismatched)} shape mismatches: "
                + few([f"{a} {tuple(sa)} -> {b} {tuple(sb)}" for a, b, sa, sb in self.mismatched])
            )
        return "\n".join(lines)


class AVHubertLoadError(RuntimeError):
    """The checkpoint does not fit the encoder (message lists every offending key)."""


# ----------------------------------------------------------------------------------------------------------------
# reading fairseq checkpoints without fairseq, and without running code from the file
#
# A fairseq checkpoint is a pickle. A pickle names the callables that rebuild its objects, and a plain unpickler
# imports and calls whatever it names (``os.system``, ``builtins.exec``, ...). ``_RestrictedUnpickler`` resolves
# only the globals of ``_ALLOWED_GLOBALS`` (tensor rebuild functions, containers, ``argparse.Namespace``, numpy
# scalars); the classes of fairseq, omegaconf and hydra (the pickled ``cfg``, enums, meters) become inert stubs that
# only store their arguments and state, so none of their code runs; any other global is refused, naming it.


class UnsafeCheckpointError(AVHubertLoadError):
    """The checkpoint names a global that is not on the allow-list (it could run code when loaded)."""


class _Inert:
    """Stands in for a fairseq / omegaconf / hydra class a checkpoint names: stores what it is given, runs nothing."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self._qualname}{self.args if self.args else ''}>"


# modules whose classes appear in AV-HuBERT / fairseq checkpoints (config dataclasses, enums, meters) and are
# replaced by inert stubs; the real modules are never imported
_STUB_MODULES = ("fairseq", "omegaconf", "hydra", "avhubert", "hubert", "hubert_pretraining", "typing", "enum")

# (module, name) -> resolved normally (these construct data only)
_ALLOWED_GLOBALS = frozenset(
    [("collections", n) for n in ("OrderedDict", "defaultdict", "deque", "Counter")]
    + [("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool",
                                 "str", "bytes", "bytearray", "slice", "range", "object")]
    + [("argparse", "Namespace"), ("copyreg", "_reconstructor"), ("_codecs", "encode"), ("datetime", "datetime"),
       ("datetime", "date"), ("datetime", "timedelta"), ("datetime", "timezone")]
    + [("pathlib", n) for n in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")]
    + [("torch._utils", n) for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                     "_rebuild_parameter", "_rebuild_parameter_with_state", "_rebuild_qtensor",
                                     "_rebuild_device_tensor_from_numpy", "_rebuild_meta_tensor_no_storage")]
    + [("torch._tensor", "_rebuild_from_type_v2"), ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"),
       ("torch.nn.parameter", "Parameter"), ("torch", "per_tensor_affine"), ("torch", "per_channel_affine")]
    + [(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("scalar", "_reconstruct")]
    + [("numpy", "dtype"), ("numpy", "ndarray")]
    + [("numpy.dtypes", n) for n in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
                                     "Int16DType", "Int8DType", "UInt8DType", "BoolDType")]
)


def _resolve_global(module: str, name: str):
    """The object a checkpoint's global names, an inert stub, or ``UnsafeCheckpointError``."""
    if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names of protocol 0-2 pickles (__builtin__.dict)
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)  # torch.float32 ... (a dtype object, not a callable)
    if (module, name) in _ALLOWED_GLOBALS:
        return getattr(importlib.import_module(module), name)
    if module.split(".", 1)[0] in _STUB_MODULES:
        return type(name.split(".")[-1], (_Inert,), {"_qualname": f"{module}.{name}"})
    raise UnsafeCheckpointError(f"global '{module}.{name}' is not on the allow-list of an AV-HuBERT checkpoint "
                                f"(loading it could run code)")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return _resolve_global(module, name)


_restricted_pickle = types.ModuleType("mome_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
_restricted_pickle.__dict__["__name__"] = "mome_restricted_pickle"


def _to_plain(obj: Any) -> Any:
    """Pickled omegaconf nodes (as inert stubs), Namespaces, enums -> plain Python (for reading a few fields)."""
    if isinstance(obj, _Inert):
        state = getattr(obj, "state", None)
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], Mapping):
            state = state[0]  # (dict state, slot state)
        if isinstance(state, Mapping):
            if "_content" in state:  # omegaconf DictConfig / ListConfig
                return _to_plain(state["_content"])
            if "_val" in state:  # omegaconf value node
                return _to_plain(state["_val"])
            return {k: _to_plain(v) for k, v in state.items()}
        if len(obj.args) == 1:  # an enum member: Enum(value)
            return _to_plain(obj.args[0])
        return obj
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, Tensor)):  # argparse.Namespace
        return {k: _to_plain(v) for k, v in vars(obj).items()}
    return obj


def read_fairseq_checkpoint(path: Union[str, Path]) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """``(state_dict, model_cfg)`` of a fairseq checkpoint; needs neither fairseq nor its config classes and runs
    no code from the file (``_RestrictedUnpickler``).

    ``model_cfg`` is ``cfg["model"]`` (or ``vars(args)`` for old checkpoints); for a fine-tuned model, the
    pretrained model's config under ``w2v_args`` is returned. Empty when the checkpoint has none.
    Raises ``UnsafeCheckpointError`` (naming the file and the global) for a checkpoint that would run code.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"AV-HuBERT checkpoint not found: {p} (set model.video_encoder.checkpoint)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{p}: refused: {exc}. Only load AV-HuBERT checkpoints from a source you "
                                    f"trust; this one names code to run") from None
    except Exception as exc:
        raise AVHubertLoadError(f"{p}: cannot read as a PyTorch checkpoint (truncated or not a checkpoint?): "
                                f"{type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, Mapping) or "model" not in ckpt or not isinstance(ckpt["model"], Mapping):
        what = sorted(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise AVHubertLoadError(f"{p}: not a fairseq checkpoint (expected a dict with a 'model' state dict; got {what})")
    state = {k: v for k, v in ckpt["model"].items() if isinstance(v, Tensor)}
    cfg = _to_plain(ckpt.get("cfg")) or {}
    model_cfg = cfg.get("model") if isinstance(cfg, Mapping) else None
    if not model_cfg and ckpt.get("args") is not None:
        model_cfg = _to_plain(ckpt["args"])
    model_cfg = dict(model_cfg or {})
    w2v = model_cfg.get("w2v_args")
    if isinstance(w2v, Mapping) and isinstance(w2v.get("model"), Mapping):
        model_cfg = dict(w2v["model"])
    return state, model_cfg


def _check_checkpoint_arch(model_cfg: Mapping[str, Any], arch: AVHubertArch, path: Union[str, Path]) -> None:
    """Compare the checkpoint's own config with the requested architecture; clear error on a mismatch."""
    fields = {
        "encoder_layers": arch.layers,
        "encoder_embed_dim": arch.dim,
        "encoder_ffn_embed_dim": arch.ffn_dim,
        "encoder_attention_heads": arch.heads,
    }
    wrong = [f"{k}={model_cfg[k]} (we build {v})" for k, v in fields.items() if k in model_cfg and model_cfg[k] != v]
    if wrong:
        sizes = {n: a for n, a in AVHUBERT_SIZES.items() if (a.layers, a.dim) == (model_cfg.get("encoder_layers"), model_cfg.get("encoder_embed_dim"))}
        hint = f"; this looks like size '{next(iter(sizes))}'" if sizes else ""
        raise AVHubertLoadError(f"{path}: checkpoint architecture differs: {', '.join(wrong)}{hint}")
    checks = {"modality_fuse": "concat", "layer_norm_first": True, "resnet_relu_type": "prelu"}
    bad = [f"{k}={model_cfg[k]!r} (we support {v!r})" for k, v in checks.items() if k in model_cfg and model_cfg[k] != v]
    if "sub_encoder_layers" in model_cfg and model_cfg["sub_encoder_layers"]:
        bad.append(f"sub_encoder_layers={model_cfg['sub_encoder_layers']} (we support 0)")
    if bad:
        raise AVHubertLoadError(f"{path}: unsupported AV-HuBERT variant: {', '.join(bad)}")


def load_avhubert(
    path: Union[str, Path],
    size: Union[str, AVHubertArch] = "large",
    strict: bool = True,
    frozen: bool = True,
    lora_rank: int = 0,
    lora_scaling: float = 2.0,
) -> AVHubertEncoder:
    """Build an :class:`AVHubertEncoder` of ``size`` and load a fairseq checkpoint into it.

    The report of what was loaded, ignored, missing or unexpected is logged and kept in ``encoder.load_report``;
    ``strict=True`` raises :class:`AVHubertLoadError` unless every encoder weight is found with the right shape and
    every checkpoint key is either used or deliberately ignored.
    """
    arch = _arch(size)
    state_dict, model_cfg = read_fairseq_checkpoint(path)  # read and check first: building Large takes seconds
    _check_checkpoint_arch(model_cfg, arch, path)
    enc = _quiet_build(dict(frozen=frozen, lora_rank=lora_rank, lora_scaling=lora_scaling), arch)
    enc.load_fairseq_state_dict(state_dict, strict=strict, source=str(path))
    return enc


def _quiet_build(cfg: Mapping[str, Any], arch: AVHubertArch) -> AVHubertEncoder:
    level = logger.level
    logger.setLevel(logging.ERROR)  # no "random stand-in weights" warning: weights follow right away
    try:
        return AVHubertEncoder(**cfg, arch=arch)
    finally:
        logger.setLevel(level)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def with_arch(size: Union[str, AVHubertArch], **changes: Any) -> AVHubertArch:
    """A preset with some fields changed, e.g. ``with_arch("large", layerdrop=0.0)``."""
    return replace(_arch(size), **changes)
