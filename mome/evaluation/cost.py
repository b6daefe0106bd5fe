"""Elastic-inference cost per scale: LLM input tokens, estimated forward FLOPs, measured latency.

**Tokens.** The LLM input length for a clip of ``clip_seconds`` (10 s by default, the clip length of Llama-MTSK's
compute table) at each scale, counted by building the model's real prompt for a synthetic clip of that length
(``AVSRModel`` embeds it exactly as in decoding), so the count includes BOS, the boundary markers and the instruction.
``tokens_per_second`` is the media part only: 50 / audio rate (Whisper features are 50 Hz) + fps / video rate.

**FLOPs** (``llm_flops``) are estimated from the LLM's Hugging Face config, counting one multiply-add as 2 FLOPs:

* linear layers: 2 x (q, k, v, o and the three SwiGLU matrices) per token per layer;
* attention: 2 x 2 x heads x head_dim per (query, key) pair, causal (a prefill of S tokens has S(S+1)/2 pairs; one new
  token at context c has c + 1);
* adapters per token per layer: MoME = router (2 x d x N_r) + (top_k + shared) experts x 4 x d x bottleneck;
  LoRA = 4 x rank x (d_in + d_out) / 2 per target module and active adapter (MTSK-MSS has two active adapters);
* the LM head (2 x d x vocab) on the positions whose logits are computed: the last one in a ``generate`` prefill.

Encoders and projectors are the same for every LLM scale and are not counted. With ``include_attention=False`` and
logits on every position, the formula gives Llama-MTSK's Table 4 (Llama 3.1-8B, 757 tokens -> 11.4 TFLOPs) within 1 %
(a test checks this).

**Latency** is measured on this machine (``measure_latency``): the LLM prefill of the scale's 10 s prompt (batch 1,
the adapters active, median of ``repeats`` runs after a warm-up) and the mean time of one greedy decoding step with
the KV cache at that context. Timings on a shared CPU are noisy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from ..adapters.hf_compat import cache_kwarg, output_cache
from ..config import MOME_METHODS
from ..scales import Scale

AUDIO_FEATURES_PER_SECOND = 50  # Whisper encoder output rate (100 Hz mel, stride-2 convolution)


@dataclass(frozen=True)
class LLMShape:
    """The sizes of a Llama-family decoder that FLOPs depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_hf_config(cls, c) -> "LLMShape":
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return cls(
            hidden=c.hidden_size,
            intermediate=c.intermediate_size,
            layers=c.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=c.vocab_size,
        )

    def module_dims(self) -> Dict[str, tuple]:
        """(in, out) features of each linear module of one decoder layer."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d),
        }

    def linear_flops_per_token(self) -> int:
        return self.layers * sum(2 * a * b for a, b in self.module_dims().values())

    def non_embedding_params(self) -> int:
        """Linear weights of all layers plus the LM head (norms omitted), i.e. FLOPs per token / 2."""
        return self.linear_flops_per_token() // 2 + self.hidden * self.vocab


def lora_rank(model_cfg, hidden: int) -> int:
    lc = model_cfg.lora
    return int(lc.rank) if lc.rank > 0 else max(1, round(hidden / lc.reduction))


def adapter_flops_per_token(model_cfg, shape: LLMShape) -> int:
    """FLOPs the method's adapters add per token over all layers (active experts / active LoRA adapters only)."""
    method = model_cfg.method
    d = shape.hidden
    if method in MOME_METHODS:
        m = model_cfg.mome
        per_layer = 2 * d * m.num_experts + (m.top_k + m.num_shared) * 4 * d * m.bottleneck
        return shape.layers * per_layer
    r = lora_rank(model_cfg, d)
    dims = shape.module_dims()
    unknown = [t for t in model_cfg.lora.target_modules if t not in dims]
    if unknown:
        raise ValueError(f"model.lora.target_modules {unknown} are not Llama linear modules {sorted(dims)}")
    per_adapter = sum(2 * r * (dims[t][0] + dims[t][1]) for t in model_cfg.lora.target_modules)
    active = 2 if method == "mtsk_mss" else 1
    return shape.layers * per_adapter * active


def llm_flops(
    shape: LLMShape,
    tokens: int,
    adapter_per_token: int = 0,
    include_attention: bool = True,
    logits_positions: Optional[int] = 1,
) -> Dict[str, int]:
    """Estimated FLOPs of a prefill of ``tokens`` positions and of one new token at that context.

    ``logits_positions``: positions the LM head runs on in the prefill (1 = generate's prefill; None = all).
    """
    lin = shape.linear_flops_per_token()
    attn_pair = 4 * shape.heads * shape.head_dim * shape.layers  # FLOPs per (query, key) pair over all layers
    head = 2 * shape.hidden * shape.vocab
    pairs = tokens * (tokens + 1) // 2
    n_logits = tokens if logits_positions is None else min(logits_positions, tokens)
    prefill = tokens * (lin + adapter_per_token) + n_logits * head + (attn_pair * pairs if include_attention else 0)
    decode = lin + adapter_per_token + head + (attn_pair * (tokens + 1) if include_attention else 0)
    return {"prefill_flops": int(prefill), "decode_flops_per_token": int(decode)}


def media_tokens_per_second(scale: Scale, fps: int = 25) -> float:
    """LLM tokens per second of media at this scale (audio 50 Hz features / rate + video fps / rate)."""
    t = 0.0
    if scale.uses_audio:
        t += AUDIO_FEATURES_PER_SECOND / scale.audio_rate
    if scale.uses_video:
        t += fps / scale.video_rate
    return t


# ----------------------------------------------------------------------------------------------------------------
# measured on a model


def synthetic_clip(seconds: float, sample_rate: int = 16000, fps: int = 25, crop: int = 88, seed: int = 0) -> Dict:
    """One clip of ``seconds`` in the ``mome.data`` batch layout (seeded random audio and video)."""
    import torch

    frames = max(1, round(seconds * fps))
    samples = frames * (sample_rate // fps)
    g = torch.Generator().manual_seed(seed)
    return {
        "ids": ["synthetic"],
        "text": [""],
        "audio": torch.randn(1, samples, generator=g) * 0.1,
        "audio_lengths": torch.tensor([samples]),
        "video": torch.randn(1, frames, 1, crop, crop, generator=g),
        "video_lengths": torch.tensor([frames]),
    }


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def measure_latency(model, batch: Dict, scale: Scale, repeats: int = 3, new_tokens: int = 8) -> Dict[str, float]:
    """Milliseconds on this machine, batch of one, median over ``repeats`` after one warm-up run:

    ``encode_ms`` (encoders + compression + projection + prompt assembly), ``prefill_ms`` (one LLM forward over the
    prompt with the KV cache on and logits at the last position, as ``generate`` does), ``decode_ms_per_token``
    (mean of ``new_tokens`` greedy steps on that cache, adapters active).
    """
    import time

    import torch

    llm = model.llm
    cache_name = cache_kwarg(llm)
    cuda = model.device.type == "cuda"

    def now() -> float:  # GPU work is asynchronous: wait for it before reading the clock
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    enc, pre, dec = [], [], []
    with torch.inference_mode():
        for r in range(repeats + 1):
            t0 = now()
            inputs = model.build_inputs(batch, [scale], with_transcripts=False)
            t1 = now()
            mask = inputs.attention_mask
            with model.adapter_call(inputs):
                out = llm(inputs_embeds=inputs.inputs_embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
                t2 = now()
                cache = output_cache(out)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(new_tokens):
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                    out = llm(input_ids=token, attention_mask=mask, **{cache_name: cache}, use_cache=True,
                              logits_to_keep=1)
                    cache = output_cache(out)
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
            t3 = now()
            if r > 0:  # the first run warms up kernels and caches
                enc.append(t1 - t0)
                pre.append(t2 - t1)
                dec.append((t3 - t2) / max(new_tokens, 1))
    return {
        "encode_ms": 1e3 * _median(enc),
        "prefill_ms": 1e3 * _median(pre),
        "decode_ms_per_token": 1e3 * _median(dec) if new_tokens > 0 else None,
    }


def llm_input_tokens(model, batch: Dict, scale: Scale) -> int:
    """Length of the LLM prompt the model builds for the (single-clip) ``batch`` at ``scale``."""
    import torch

    with torch.inference_mode():
        inputs = model.build_inputs(batch, [scale], with_transcripts=False)
    return int(inputs.attention_mask[0].sum())


def scale_costs(model, scales, clip_seconds: float = 10.0, latency: bool = True, repeats: int = 3,
                new_tokens: int = 8, sample_rate: int = 16000, fps: int = 25, crop: int = 88,
                method_label: str = "") -> list:
    """One cost row per scale: ``method``, ``scale``, ``task``, ``clip_seconds``, ``llm_tokens``,
    ``tokens_per_second``, ``prefill_flops``, ``decode_flops_per_token``, and (with ``latency``) ``encode_ms``,
    ``prefill_ms``, ``decode_ms_per_token``."""
    shape = LLMShape.from_hf_config(model.llm.config)
    adapters = adapter_flops_per_token(model.config, shape)
    batch = synthetic_clip(clip_seconds, sample_rate, fps, crop)
    rows = []
    for s in scales:
        tokens = llm_input_tokens(model, batch, s)
        row = {
            "method": method_label or model.method,
            "scale": s.name,
            "task": s.task,
            "clip_seconds": clip_seconds,
            "llm_tokens": tokens,
            "tokens_per_second": media_tokens_per_second(s, fps),
            **llm_flops(shape, tokens, adapter_per_token=adapters),
            "encode_ms": None,
            "prefill_ms": None,
            "decode_ms_per_token": None,
        }
        if latency:
            row.update(measure_latency(model, batch, s, repeats=repeats, new_tokens=new_tokens))
        rows.append(row)
    return rows
