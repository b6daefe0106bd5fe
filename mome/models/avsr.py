"""``AVSRModel``: frozen encoders + per-rate compression and projectors + a frozen LLM with the method's adapters.

Forward (training), for a batch (``mome.data`` layout) and a list of scales:

1. every encoder the scales need runs once (``encode``);
2. every (modality, rate) the scales use is compressed and projected once (``project``);
3. the rows of every scale are assembled (``mome.models.sequence``) and go through the LLM in ONE call, concatenated
   along the batch, inside one adapter call (``adapter_call``) that gives the adapters each row's scale id (and the
   real-token mask), so there is one backward per micro-batch;
4. per scale: token-mean cross-entropy over its transcript + EOS tokens (logits are computed only at those
   positions); ``loss = sum_s c_s * CE_s / n_scales + lb_coef * LB + z_coef * Z`` (``c_s`` = ``model.scale_weights``
   by scale id, 1 by default; LB and Z only for MoME).

With ``model.pack_rows`` the rows of each scale are packed end to end before the LLM call (fewer, fuller rows,
positions restarting per utterance; ``mome.models.sequence.pack_rows``): the same loss up to floating-point order.

``scales=None`` means every scale (``model.matryoshka=all``) or, with ``sample``, one random audio rate and one
random video rate per step, used by every task (Omni-AVSR style: ASR at the audio rate, VSR at the video rate, AVSR
at the pair).

``generate`` decodes one scale with beam search from ``inputs_embeds`` (batched, left padding, deterministic unless
``do_sample``). ``save_pretrained`` / ``from_pretrained`` store only the trainable parameters plus the config (the
run config of a training checkpoint, or the model config alone), and the frozen backbones' fingerprints, checked on
load.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from mome.adapters import add_method_lora, attach_mome_from_config
from mome.adapters.hf_compat import enable_checkpointing
from mome.config import (METHODS, MOME_METHODS, SINGLE_SCALE_METHODS, TASKS, load_saved_config, model_section,
                         save_config)
from mome.models.backbones import describe_backbone
from mome.models.compression import compress
from mome.models.projector import RateProjectors
from mome.models.sequence import IGNORE, LLMInputs, ScaleTokens, SequenceBuilder, pack_rows
from mome.scales import Scale, all_scales

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


class BackboneMismatchError(RuntimeError):
    """A checkpoint's frozen backbone differs from the one the model was built with."""


@dataclass
class AVSROutput:
    loss: torch.Tensor  # scalar
    ce: Dict[str, torch.Tensor]  # token-mean CE per scale name
    aux: Dict[str, torch.Tensor] = field(default_factory=dict)  # "lb", "z" (MoME)
    expert_load: Optional[torch.Tensor] = None  # [layers, experts] fraction of routed token-slots (detached)
    sample_ce: Optional[torch.Tensor] = None  # [scales in the call, B] per-utterance token-mean CE (detached)
    scales: List[Scale] = field(default_factory=list)  # the scales of this call, in row order
    num_tokens: Dict[str, int] = field(default_factory=dict)  # target tokens per scale


@dataclass
class RoutedCall:
    """Routing of one ``forward`` / ``generate`` call (see ``AVSRModel.record_routing``)."""

    kind: str  # "forward" | "generate"
    utterance_ids: List[str]  # [B]
    scales: List[Scale]  # the call's scales; row k * B + b is utterance b at scales[k]
    scale_ids: torch.Tensor  # [R] (index into model.scales)
    roles: torch.Tensor  # [R, S] int8 TokenRole of the input sequence (PAD on padding)
    attention_mask: torch.Tensor  # [R, S]
    layers: list  # layers[l][c]: mome.adapters.RoutingRecord of LLM call c (forward: c = 0 only; generate:
    #               c = 0 is the prefill over R * num_beams rows, c >= 1 one per generated token)
    num_beams: int = 1

    def records(self) -> Iterator[dict]:
        """One dict per (utterance, scale) over the real input tokens: ``utterance_id``, ``scale``, ``roles`` [T],
        ``positions`` [T], ``topk_ids`` [T, L, k], ``topk_gates`` [T, L, k], ``probs`` [T, L, E] (numpy)."""
        batch = len(self.utterance_ids)
        for r in range(self.roles.shape[0]):
            keep = self.attention_mask[r].bool()
            row = r * self.num_beams  # prefill rows are beam-expanded; every beam of a row is identical there
            first = [layer[0] for layer in self.layers]
            yield {
                "utterance_id": self.utterance_ids[r % batch],
                "scale": self.scales[r // batch],
                "roles": self.roles[r][keep].cpu().numpy(),
                "positions": (torch.cumsum(keep.long(), 0) - 1)[keep].cpu().numpy(),
                "topk_ids": torch.stack([rec.topk_idx[row][keep] for rec in first], 1).cpu().numpy(),
                "topk_gates": torch.stack([rec.gates[row][keep] for rec in first], 1).float().cpu().numpy(),
                "probs": torch.stack([rec.probs[row][keep] for rec in first], 1).float().cpu().numpy(),
            }


@dataclass
class RoutingLog:
    calls: List[RoutedCall] = field(default_factory=list)


class AVSRModel(nn.Module):
    """The model of a model config (``cfg.model``, a ``mome.config.ModelConfig`` section; not the run config).

    Every setting the model acts on is read here, once, into a plain attribute (``method``, ``tasks``, ``matryoshka``,
    ``compression_method``, ``pack_rows``, ``lb_coef``, ``z_coef``, ``scale_weights``); the modules below get
    scalars. ``config`` keeps a detached, read-only copy of the section for saving and describing the model.
    """

    def __init__(self, config, llm: nn.Module, tokenizer, audio_encoder: Optional[nn.Module],
                 video_encoder: Optional[nn.Module]):
        super().__init__()
        self.config = m = model_section(config)
        self.method: str = m.method
        self.tasks: List[str] = list(m.tasks)
        self.matryoshka: str = m.matryoshka
        self.compression_method: str = m.compression.method
        self.pack_rows: bool = bool(m.pack_rows)
        self.lb_coef: float = float(m.mome.lb_coef)
        self.z_coef: float = float(m.mome.z_coef)
        self.scales: List[Scale] = all_scales(m)
        _check_method(self.method, self.scales)
        self.scale_index = {s: i for i, s in enumerate(self.scales)}
        self.tokenizer = tokenizer
        self.llm = llm
        self.audio_encoder = audio_encoder
        self.video_encoder = video_encoder
        self.backbones = {"llm": describe_backbone(m.llm.name, llm)}
        if audio_encoder is not None:
            self.backbones["audio_encoder"] = describe_backbone(m.audio_encoder.name, audio_encoder.encoder)
        if video_encoder is not None and getattr(video_encoder, "frozen", False):
            self.backbones["video_encoder"] = describe_backbone(m.video_encoder.type, video_encoder)

        d_llm = llm.config.hidden_size
        proj = m.projector
        uses_audio = any(s.uses_audio for s in self.scales)
        uses_video = any(s.uses_video for s in self.scales)
        a_rates = sorted({s.audio_rate for s in self.scales if s.uses_audio})
        v_rates = sorted({s.video_rate for s in self.scales if s.uses_video})
        out_rms = embedding_rms(llm.get_input_embeddings()) if proj.match_embedding_rms else 0.0
        self.audio_projectors = (
            RateProjectors(a_rates, audio_encoder.output_dim, d_llm, self.compression_method, proj.hidden,
                           proj.layernorm, out_rms, shared=bool(proj.shared))
            if uses_audio else None
        )
        self.video_projectors = (
            RateProjectors(v_rates, video_encoder.output_dim, d_llm, self.compression_method, proj.hidden,
                           proj.layernorm, out_rms, shared=bool(proj.shared))
            if uses_video else None
        )
        prompts = {task: str(m.prompts[task]) for task in TASKS}
        self.sequences = SequenceBuilder(tokenizer, llm.get_input_embeddings(), prompts, d_llm)
        device = llm.get_input_embeddings().weight.device
        for part in (self.audio_projectors, self.video_projectors, self.sequences):
            if part is not None:
                part.to(device)

        self.mome = None
        if self.method in MOME_METHODS:
            self.adapters = attach_mome_from_config(llm, m.mome, num_scales=len(self.scales))
            self.mome = self.adapters.modules  # registered here: parameter names mome.<layer>.*
        else:
            self.adapters = add_method_lora(llm, self.method, m.lora, len(self.scales))
        if m.llm.gradient_checkpointing:  # a recomputed layer must see the adapter call it first ran in
            enable_checkpointing(llm, self.adapters.checkpoint_kwargs())
        if m.scale_weights and len(m.scale_weights) != len(self.scales):
            raise ValueError(
                f"model.scale_weights has {len(m.scale_weights)} values for {len(self.scales)} scales "
                f"({', '.join(map(str, self.scales))})"
            )
        self.register_buffer(
            "scale_weights",
            torch.tensor(list(m.scale_weights) or [1.0] * len(self.scales), dtype=torch.float32, device=device),
            persistent=False,
        )
        self._routing: Optional[RoutingLog] = None

    # ------------------------------------------------------------------------------------------------------------
    # pieces

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def expert_load_shape(self) -> Optional[Tuple[int, int]]:
        """(layers, routed experts) of the MoME modules, the shape of ``AVSROutput.expert_load``; None for LoRA."""
        return (len(self.mome), self.mome[0].num_experts) if self.mome else None

    def training_scales(self) -> List[Scale]:
        """The scales of one training step (``model.matryoshka``)."""
        if self.matryoshka == "all":
            return list(self.scales)
        a_rates = sorted({s.audio_rate for s in self.scales if s.uses_audio})
        v_rates = sorted({s.video_rate for s in self.scales if s.uses_video})
        a = a_rates[int(torch.randint(len(a_rates), ()))] if a_rates else None
        v = v_rates[int(torch.randint(len(v_rates), ()))] if v_rates else None
        picked = []
        for task in self.tasks:
            s = Scale(task, a if task != "vsr" else None, v if task != "asr" else None)
            picked.append(s)
        return picked

    def encode(self, batch: dict, audio: bool, video: bool) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Encoder features and lengths per modality: ``{"audio": (x [B, T, d], lengths [B]), "video": ...}``."""
        out = {}
        dev = self.device
        for key, needed in (("audio", audio), ("audio_lengths", audio), ("video", video), ("video_lengths", video)):
            if needed and key not in batch:
                raise KeyError(f"batch has no '{key}', which the requested scales need (batch keys: {sorted(batch)})")
        if audio:
            out["audio"] = self.audio_encoder(batch["audio"].to(dev), batch["audio_lengths"].to(dev))
        if video:
            out["video"] = self.video_encoder(batch["video"].to(dev), batch["video_lengths"].to(dev))
        return out

    def project(self, feats, modality: str, rate: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Compress one modality's features at ``rate`` and project them: (tokens [B, N, d_llm], lengths [B])."""
        x, lengths = feats[modality]
        tokens, tok_lengths = compress(x, lengths, rate, self.compression_method)
        projectors = self.audio_projectors if modality == "audio" else self.video_projectors
        return projectors(tokens, rate), tok_lengths

    def scale_tokens(self, feats, scales: Sequence[Scale]) -> List[ScaleTokens]:
        cache: Dict[Tuple[str, int], Tuple[torch.Tensor, torch.Tensor]] = {}

        def get(modality, rate):
            if (modality, rate) not in cache:
                cache[(modality, rate)] = self.project(feats, modality, rate)
            return cache[(modality, rate)]

        parts = []
        for s in scales:
            if s not in self.scale_index:
                raise ValueError(f"scale '{s}' is not trained by this model; it has {', '.join(map(str, self.scales))}")
            p = ScaleTokens(scale=s, scale_id=self.scale_index[s])
            if s.uses_audio:
                p.audio, p.audio_lengths = get("audio", s.audio_rate)
            if s.uses_video:
                p.video, p.video_lengths = get("video", s.video_rate)
            parts.append(p)
        return parts

    def build_inputs(self, batch: dict, scales: Sequence[Scale], with_transcripts: bool) -> LLMInputs:
        feats = self.encode(batch, any(s.uses_audio for s in scales), any(s.uses_video for s in scales))
        parts = self.scale_tokens(feats, scales)
        return self.sequences.build(parts, batch["text"] if with_transcripts else None, dtype=self.llm_dtype)

    def adapter_call(self, inputs: LLMInputs, token_mask: bool = False, trace: bool = False):
        """The context to run the LLM on ``inputs`` in: ``with model.adapter_call(inputs): model.llm(...)``.

        It gives the adapters each row's scale id; ``token_mask`` (the real-token mask, for the load-balancing
        statistics) and ``trace`` (routing of every token) only where they are wanted."""
        return self.adapters.call(inputs.scale_ids, token_mask=inputs.token_mask if token_mask else None, trace=trace)

    # ------------------------------------------------------------------------------------------------------------
    # training forward

    def forward(self, batch: dict, scales: Optional[Sequence[Scale]] = None) -> AVSROutput:
        scales = list(scales) if scales is not None else self.training_scales()
        if not scales:
            raise ValueError("forward needs at least one scale")
        inputs = self.build_inputs(batch, scales, with_transcripts=True)
        n_rows = inputs.labels.shape[0]
        tracing = self._routing is not None
        decoder = self.llm.get_decoder()
        if self.pack_rows and not tracing:
            # same tokens and targets in fewer rows (mome.models.sequence.pack_rows); origin maps back to the rows
            packed = pack_rows(inputs)
            with self.adapters.call(packed.scale_ids,
                                    token_mask=packed.token_mask if self.mome is not None else None) as call:
                hidden = decoder(inputs_embeds=packed.inputs_embeds, position_ids=packed.position_ids,
                                 attention_mask=None, use_cache=False).last_hidden_state
            labels, origin = packed.labels, packed.origin
        else:
            with self.adapter_call(inputs, token_mask=self.mome is not None, trace=tracing) as call:
                hidden = decoder(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                 use_cache=False).last_hidden_state
            self._log_routing("forward", batch, scales, inputs, call)
            labels = inputs.labels
            origin = torch.arange(n_rows, device=labels.device)[:, None].expand_as(labels)

        # CE at the target positions only: logits at t-1 predict labels[t]
        targets = labels[:, 1:]
        sel = targets != IGNORE
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][sel]).float()
        token_ce = F.cross_entropy(logits, targets[sel], reduction="none")
        rows = origin[:, 1:][sel]
        row_sum = torch.zeros(n_rows, device=token_ce.device).index_add(0, rows, token_ce)
        row_count = torch.zeros(n_rows, device=token_ce.device).index_add(0, rows, torch.ones_like(token_ce))
        b = n_rows // len(scales)
        scale_sum, scale_count = row_sum.view(len(scales), b).sum(1), row_count.view(len(scales), b).sum(1)
        ce_per_scale = scale_sum / scale_count.clamp_min(1)
        ids = torch.tensor([self.scale_index[s] for s in scales], device=ce_per_scale.device)
        loss = (self.scale_weights[ids] * ce_per_scale).sum() / len(scales)

        out = AVSROutput(
            loss=loss,
            ce={s.name: ce_per_scale[k] for k, s in enumerate(scales)},
            sample_ce=(row_sum / row_count.clamp_min(1)).view(len(scales), b).detach(),
            scales=scales,
            num_tokens={s.name: int(scale_count[k]) for k, s in enumerate(scales)},
        )
        if self.mome is not None:
            aux = self.adapters.aux_losses(call)
            out.aux = {"lb": aux["lb"], "z": aux["z"]}
            out.expert_load = aux["expert_load"]
            out.loss = loss + self.lb_coef * aux["lb"] + self.z_coef * aux["z"]
        return out

    # ------------------------------------------------------------------------------------------------------------
    # inference

    @torch.no_grad()
    def generate(self, batch: dict, scale: Scale | str, num_beams: int = 5, max_new_tokens: int = 32,
                 do_sample: bool = False, **generate_kwargs) -> List[str]:
        """Transcripts of every utterance in ``batch`` at one ``scale`` (a ``Scale`` or a name like ``avsr:4x2``)."""
        from transformers import GenerationConfig

        scale = Scale.parse(scale) if isinstance(scale, str) else scale
        inputs = self.build_inputs(batch, [scale], with_transcripts=False)
        tok = self.tokenizer
        gen_cfg = GenerationConfig(
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        )
        tracing = self._routing is not None
        with self.adapter_call(inputs, token_mask=tracing, trace=tracing) as call:
            out = self.llm.generate(
                inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                generation_config=gen_cfg, **generate_kwargs,
            )
        self._log_routing("generate", batch, [scale], inputs, call, num_beams=num_beams)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    # ------------------------------------------------------------------------------------------------------------
    # routing traces

    @contextlib.contextmanager
    def record_routing(self) -> Iterator[RoutingLog]:
        """Inside the block every ``forward`` / ``generate`` appends a ``RoutedCall`` to the yielded log::

            with model.record_routing() as log:
                model(batch, scales)
            for rec in log.calls[0].records():  # per (utterance, scale): roles, positions, topk_ids, gates, probs
                ...

        Only MoME methods route; LoRA methods raise.
        """
        if self.mome is None:
            raise RuntimeError(f"method '{self.method}' has no router; record_routing needs mome or mome_i")
        previous, self._routing = self._routing, RoutingLog()
        try:
            yield self._routing
        finally:
            self._routing = previous

    def _log_routing(self, kind, batch, scales, inputs: LLMInputs, call, num_beams: int = 1) -> None:
        if self._routing is None or call.trace is None:
            return
        trace = call.trace
        self._routing.calls.append(RoutedCall(
            kind=kind, utterance_ids=list(batch.get("ids") or [str(i) for i in range(len(batch["text"]))]),
            scales=list(scales), scale_ids=inputs.scale_ids.cpu(), roles=inputs.roles.cpu(),
            attention_mask=inputs.attention_mask.cpu(), layers=trace.layers, num_beams=num_beams,
        ))

    # ------------------------------------------------------------------------------------------------------------
    # trainable parameters, save / load

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state_dict: Dict[str, torch.Tensor], source: str = "state dict") -> None:
        own = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{source}: trainable parameters do not match this model (method '{self.method}'): "
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        with torch.no_grad():
            for n, p in own.items():
                t = state_dict[n]
                if t.shape != p.shape:
                    raise ValueError(f"{source}: '{n}' has shape {tuple(t.shape)}, the model has {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))

    def save_pretrained(self, directory: str | os.PathLike, run_config=None) -> Path:
        """``directory/model.safetensors`` (trainable weights; backbone fingerprints in its metadata) and
        ``directory/config.yaml``: the run config ``run_config`` when given (training checkpoints: evaluation and
        analysis read their data and evaluation settings from it; its ``model`` section must be this model's), else
        the model config alone (as ``model:``; every other section loads as the schema defaults)."""
        from safetensors.torch import save_file

        if run_config is not None:
            given = OmegaConf.to_container(model_section(run_config.model), resolve=True)
            if given != OmegaConf.to_container(self.config, resolve=True):
                raise ValueError("save_pretrained: run_config.model is not this model's config")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.contiguous().cpu() for n, t in self.trainable_state_dict().items()}
        tmp = d / (WEIGHTS_NAME + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "mome_backbones": json.dumps(self.backbones)})
        os.replace(tmp, d / WEIGHTS_NAME)
        save_config(run_config if run_config is not None else OmegaConf.create({"model": self.config}),
                    d / CONFIG_NAME)
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, overrides: Sequence[str] = (), device=None,
                        run_config=None) -> "AVSRModel":
        """Rebuild the model from ``directory/config.yaml`` (plus ``overrides``; or from ``run_config``, that file
        already loaded by the caller), load its trainable weights and check that the frozen backbones are the ones it
        was trained on."""
        from safetensors import safe_open

        from mome.models import build_model

        d = Path(directory)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d}: not a model folder (no {name})")
        if run_config is not None and list(overrides):
            raise ValueError("from_pretrained: give overrides or run_config, not both")
        cfg = run_config if run_config is not None else load_saved_config(d / CONFIG_NAME, overrides)
        model = build_model(cfg)
        with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        model.check_backbones(json.loads(meta.get("mome_backbones", "{}")), source=str(d / WEIGHTS_NAME))
        model.load_trainable_state_dict(state, source=str(d / WEIGHTS_NAME))
        if device is not None:
            model.to(device)
        return model

    def check_backbones(self, saved: dict, source: str) -> None:
        """Raise ``BackboneMismatchError`` when a saved backbone fingerprint differs from the loaded one."""
        for role, info in saved.items():
            now = self.backbones.get(role)
            if now is None:
                raise BackboneMismatchError(f"{source}: the checkpoint has a {role} ({info['name']}) this model lacks")
            if info.get("fingerprint") and now.get("fingerprint") and info["fingerprint"] != now["fingerprint"]:
                raise BackboneMismatchError(
                    f"{source}: frozen {role} differs from the checkpoint's: trained on '{info['name']}' "
                    f"(fingerprint {info['fingerprint']}), now '{now['name']}' (fingerprint {now['fingerprint']}). "
                    f"Load the same backbone (override model.{role}.name) or retrain."
                )


def embedding_rms(embed: nn.Embedding) -> float:
    """Root mean square of the LLM's input-embedding table (the scale of text tokens); 0 on the meta device."""
    w = embed.weight
    if w.device.type == "meta":
        return 0.0
    return float(w.detach().float().pow(2).mean().sqrt())


def _check_method(method: str, scales: List[Scale]) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown model.method '{method}'")
    if method in SINGLE_SCALE_METHODS and len(scales) != 1:
        raise ValueError(
            f"model.method={method} trains one scale per model, but the config gives {len(scales)} "
            f"({', '.join(map(str, scales))}); set one task and one rate per modality "
            f"(model.tasks, model.compression.audio_rates / video_rates)"
        )
