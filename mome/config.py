"""The one configuration schema of the project.

Every default lives in the dataclasses below. A run's configuration is built in three layers, each overriding
the previous one:

1. this schema (``Config``),
2. a YAML file from ``configs/`` (``--config configs/demo.yaml``), after the files its ``base:`` key names,
3. ``key=value`` arguments on the command line (``train.lr=3e-4 model.mome.top_k=2``).

Unknown keys are rejected with the nearest valid key; values of the wrong type are rejected with the key's path.
The resolved configuration is frozen (read-only) and written next to every run (``save_config``).

Sections: ``data`` (corpus, batching, transforms, noise), ``model`` (method, encoders, compression, projectors,
MoME, LoRA), ``train``, ``eval``, ``analysis``, ``logging``. Paths left empty are filled from the cache folder
(``cache_dir``; ``$MOME_CACHE`` or ``~/.cache/mome``) by the code that uses them.
"""
from __future__ import annotations

import copy
import difflib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

# ----------------------------------------------------------------------------------------------------------------
# data


@dataclass
class SynthConfig:
    """The synthetic audio-visual corpus (``mome.data.synth``)."""

    num: int = 2000  # utterances in total (train + val + test)
    seed: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    holdout_speakers: int = 0  # >0: this many speakers appear only in the test split
    min_words: int = 5
    max_words: int = 8
    workers: int = 2  # generation processes
    num_speakers: int = 12  # eSpeak accent/variant/rate/pitch + mouth appearance combinations (mome.data.speakers)


@dataclass
class TransformConfig:
    """Train/eval transforms (docs/method.md#transforms). Eval uses centre crop and no masking or random noise."""

    crop_size: int = 88
    video_mean: float = 0.421
    video_std: float = 0.165
    video_mask_window: int = 10  # frames; 0 disables video time masking
    video_mask_stride: int = 25
    audio_mask_window: int = 6400  # samples; 0 disables audio time masking
    audio_mask_stride: int = 16000
    # training-time additive noise: an SNR drawn uniformly from this list per utterance; "clean" = no noise
    train_snrs: List[str] = field(default_factory=lambda: ["-5", "0", "5", "10", "15", "20", "clean"])
    clean_epochs: int = 0  # clean-first schedule: the first N training epochs use clean audio, train_snrs after
    normalize_waveform: bool = True  # layer-norm over the whole waveform


@dataclass
class NoiseConfig:
    """Noise source used both for training augmentation and for noisy evaluation."""

    type: str = "babble"  # babble | white | file
    # a noise recording: with type=babble the babble itself (the reference setting: auto_avsr's babble_noise.wav),
    # with type=file any other noise (MUSAN / NOISEX); empty = babble built from the corpus' training speech
    file: str = ""
    babble_speakers: int = 30  # utterances mixed into the babble track
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "synth"  # synth | lrs (auto_avsr layout)
    root: str = ""  # media root; empty = the synthetic corpus under cache_dir
    train_csv: str = "train.csv"  # label CSVs, relative to root unless absolute
    val_csv: str = "val.csv"
    test_csv: str = "test.csv"
    sample_rate: int = 16000
    fps: int = 25
    max_frames: int = 1500  # video frames per training batch (length-bucketed batching)
    max_frames_eval: int = 1500
    max_batch_size: int = 0  # 0 = no cap on utterances per batch
    num_buckets: int = 50
    max_duration_s: float = 16.0  # longer training utterances are dropped (and counted); val/test never filtered
    num_workers: int = 2
    skip_bad: bool = False  # True: bad media are skipped, counted and reported; False: clear error
    synth: SynthConfig = field(default_factory=SynthConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)


# ----------------------------------------------------------------------------------------------------------------
# model


@dataclass
class LLMConfig:
    name: str = "smollm2-135m"  # registry name (mome.pretrained), Hugging Face id or local folder
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # True: architecture from the folder's config.json with seeded random weights (tests; a folder without weights
    # is otherwise an error)
    random_init: bool = False


@dataclass
class AudioEncoderConfig:
    name: str = "whisper-tiny.en"  # registry name, Hugging Face Whisper id or local folder
    dtype: str = "float32"
    pad_to_30s: bool = False  # True: stock Whisper behaviour (every clip padded to 30 s, output truncated)
    random_init: bool = False  # as model.llm.random_init (tests)


@dataclass
class VideoEncoderConfig:
    type: str = "frontend"  # frontend (small trainable ResNet) | avhubert (frozen AV-HuBERT, fairseq .pt)
    checkpoint: str = ""  # AV-HuBERT fairseq checkpoint path
    size: str = "large"  # AV-HuBERT size: base | large
    frozen: bool = True  # AV-HuBERT only; the small front end always trains
    lora_rank: int = 0  # >0: LoRA on AV-HuBERT's Q and V projections
    lora_scaling: float = 2.0  # AV-HuBERT LoRA: q += lora_scaling * up(down(x)) (Omni-AVSR uses 2)
    strict_load: bool = True
    # small front end (embedded default)
    channels: int = 32
    dim: int = 256
    temporal_layers: int = 2


@dataclass
class CompressionConfig:
    method: str = "avgpool"  # avgpool | stack
    audio_rates: List[int] = field(default_factory=lambda: [4, 16])
    video_rates: List[int] = field(default_factory=lambda: [2, 5])


@dataclass
class ProjectorConfig:
    hidden: int = 2048
    layernorm: bool = True
    # True: the output LayerNorm's gain starts at the RMS of the LLM's text embeddings instead of 1, so A/V tokens
    # enter the LLM at the scale of text (mome.models.projector)
    match_embedding_rms: bool = False
    # True: one projector for every rate of a modality (Omni-AVSR's single Matryoshka projector; avgpool only, whose
    # tokens have the same width at every rate) instead of one per rate (Llama-MTSK; mome.models.projector)
    shared: bool = False


@dataclass
class MoMEConfig:
    num_experts: int = 23  # routed experts N_r
    top_k: int = 4
    num_shared: int = 1
    bottleneck: int = 12
    placement: str = "mhsa"  # mhsa | ffn | layer
    router: str = "shared"  # shared (one router for every scale) | per_scale (ablation)
    renormalize: bool = True  # top-k gates renormalised to sum 1
    lb_coef: float = 0.01  # Switch load-balancing loss coefficient
    z_coef: float = 0.0  # router z-loss coefficient (off by default)
    lb_topk_normalize: bool = False  # False: LB = N_r*sum f_e P_e with sum f_e = k (k at balance, SMoP); True: /k
    backend: str = "auto"  # auto | grouped_mm | dense | loop


@dataclass
class LoRAConfig:
    reduction: int = 32  # rank = round(hidden / reduction) unless rank > 0 (the Llama-AVSR convention)
    rank: int = 0
    alpha: float = 4.0  # scaling = alpha / reduction, as in Llama-AVSR / MTSK
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class PromptConfig:
    asr: str = "Transcribe speech to text."
    vsr: str = "Transcribe video to text."
    avsr: str = "Transcribe speech and video to text."


@dataclass
class ModelConfig:
    # mome | mome_i | llama_avsr | mtsk_ms | mtsk_ss | mtsk_mss
    method: str = "mome"
    tasks: List[str] = field(default_factory=lambda: ["avsr"])  # any of asr, vsr, avsr
    matryoshka: str = "all"  # all (every rate pair every step) | sample (one random pair per step)
    scale_weights: List[float] = field(default_factory=list)  # per-scale loss weights c_ij; empty = uniform
    llm: LLMConfig = field(default_factory=LLMConfig)
    audio_encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    video_encoder: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    mome: MoMEConfig = field(default_factory=MoMEConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    # training forward: pack each scale's rows end to end (fewer LLM rows, no padding inside; same loss)
    pack_rows: bool = False


# ----------------------------------------------------------------------------------------------------------------
# training, evaluation, analysis, logging


@dataclass
class TrainConfig:
    lr: float = 1e-3
    # lr multipliers per parameter group (mome.training.diagnostics.PARAM_GROUPS), e.g. {audio_projectors: 3.0}
    lr_scale: Dict[str, float] = field(default_factory=dict)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.1
    epochs: int = 10
    max_steps: int = 0  # >0 overrides epochs
    max_minutes: float = 0.0  # >0: stop after this many minutes of training wall time (validation excluded)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 10.0
    # auto: bf16 autocast on a bf16 GPU; on CPU bf16 frozen backbones where a GEMM timing at start finds bf16 faster
    # (mome.training.precision) | fp32 | bf16
    precision: str = "auto"
    seed: int = 0
    log_every: int = 10
    val_every: int = 0  # steps; 0 = once per epoch
    val_wer_samples: int = 8  # utterances decoded greedily at each validation
    val_utterances: int = 0  # validation loss / reading gap over the first N validation utterances; 0 = all
    save_every: int = 0  # steps; 0 = at the end of every epoch
    keep_last: int = 2
    resume: str = ""  # "" (fresh) | auto (newest checkpoint of the run folder that verifies) | a checkpoint path
    # True: resume DeepSpeed state (a pickle) from a checkpoint not written on this machine (mome.training.checkpoint)
    trust_checkpoint: bool = False
    max_bad_steps: int = 5  # consecutive NaN/inf losses before training stops
    # fault drill (tests): at these optimizer steps (1-based) the batch's float tensors are replaced by NaN, so the
    # non-finite path runs through the real model; empty in every real run
    inject_nan_steps: List[int] = field(default_factory=list)


@dataclass
class EvalConfig:
    split: str = "test"  # also the split the analysis traces
    # e.g. ["avsr:4x2", "asr:16"]; empty = every scale the model trains (also the scales the analysis traces)
    scales: List[str] = field(default_factory=list)
    snrs: List[str] = field(default_factory=lambda: ["clean", "5", "2.5", "0", "-2.5", "-5"])  # noise: data.noise
    num_beams: int = 5
    max_new_tokens: int = 32
    batch_size: int = 8
    do_sample: bool = False
    strip_punctuation: bool = True
    judge: bool = True  # also transcribe with the pretrained Whisper (external reference)
    max_utterances: int = 0  # 0 = the whole split
    latency: bool = True  # measure prefill / per-token latency per scale
    seed: int = 0  # torch seed set before each decoding pass (matters only with do_sample)
    judge_model: str = "whisper-tiny.en"  # registry name, HF Whisper id or local folder (mome.pretrained)
    judge_max_new_tokens: int = 96  # Whisper tokens per utterance for the judge
    judge_spell_numbers: bool = True  # judge output "C8" -> "c eight" before scoring (references spell numbers)
    clip_seconds: float = 10.0  # clip length for the cost table (tokens, FLOPs, latency)
    latency_repeats: int = 3  # timed runs per scale (median reported), after one warm-up
    latency_new_tokens: int = 8  # greedy decoding steps timed per run


@dataclass
class AnalysisConfig:
    """Expert-activation analysis (``python -m analysis.expert_activation``).

    The split and the scales are ``eval.split`` and ``eval.scales``, the noise is ``data.noise``; the keys below are
    the analysis' own: it traces ONE noise condition (``snr``; evaluation decodes the list ``eval.snrs``), and its
    utterance cap is separate from ``eval.max_utterances`` because a trace stores every token's routing at every scale
    (a recipe traces a few utterances of the split it decodes whole)."""

    max_utterances: int = 0  # utterances traced; 0 = the whole split
    snr: str = "clean"
    layers: List[int] = field(default_factory=list)  # empty = every layer
    store_probs: bool = True  # keep the full router probabilities in the trace (entropy, mean probabilities)
    utterances_per_shard: int = 64  # trace shard size
    similarity_utterances: int = 2  # utterances with token-similarity matrices across rates (0 = none)
    similarity_layers: List[int] = field(default_factory=lambda: [-1])  # -1 = projector outputs; l = LLM layer l output


@dataclass
class LoggingConfig:
    wandb: str = "auto"  # auto (online with an API key and network, else offline) | online | offline | disabled
    project: str = "mome"
    progress: bool = True


@dataclass
class Config:
    run_name: str = "mome"
    output_dir: str = "runs"  # the run folder is output_dir/run_name
    cache_dir: str = ""  # empty = $MOME_CACHE or ~/.cache/mome
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------------------------------------------
# loading


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key and, where known, the file."""


def _all_keys(node: Any, prefix: str = "") -> List[str]:
    keys: List[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            path = f"{prefix}.{k}" if prefix else str(k)
            keys.append(path)
            keys.extend(_all_keys(node._get_node(k), path))
    return keys


def _unknown_key_error(exc: OmegaConfBaseException, source: str, schema: DictConfig) -> ConfigError:
    full = getattr(exc, "full_key", None) or ""
    key = getattr(exc, "key", None) or full.rsplit(".", 1)[-1]
    valid = _all_keys(schema)
    parent = full.rsplit(".", 1)[0] if "." in full else ""
    siblings = [k for k in valid if k.rsplit(".", 1)[0] == parent] if parent else [k for k in valid if "." not in k]
    guess = difflib.get_close_matches(full, siblings, n=1, cutoff=0.5) or difflib.get_close_matches(
        full, valid, n=1, cutoff=0.6
    )
    if not guess:  # match on the last component only, anywhere in the tree
        leafs = {k.rsplit(".", 1)[-1]: k for k in valid}
        near = difflib.get_close_matches(str(key), list(leafs), n=1, cutoff=0.6)
        guess = [leafs[near[0]]] if near else []
    hint = f"; did you mean '{guess[0]}'?" if guess else ""
    return ConfigError(f"{source}: unknown config key '{full or key}'{hint}")


def _type_error(exc: OmegaConfBaseException, source: str) -> ConfigError:
    full = getattr(exc, "full_key", None) or getattr(exc, "key", "?")
    msg = str(exc).splitlines()[0]
    return ConfigError(f"{source}: wrong value for '{full}': {msg}")


# Keys that were removed, each with the one key that now holds its concept. Given on the command line or in a config
# file they are an error naming the replacement; in a SAVED config (a checkpoint's or an evaluation's config.yaml,
# written before the removal; ``load_saved_config``) they are dropped, with a warning when their value differed from
# the replacement's, which then applies.
REMOVED_KEYS = {
    "eval.noise_type": "data.noise.type",
    "analysis.noise_type": "data.noise.type",
    "analysis.split": "eval.split",
    "analysis.scales": "eval.scales",
}

_MISSING = object()


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _removed_keys(base: DictConfig, other: Any, source: str, saved: bool) -> Any:
    """``other`` without the ``REMOVED_KEYS`` it holds: an error naming the replacement, or (``saved``) dropped."""
    if not isinstance(other, DictConfig):
        return other
    found = [k for k in REMOVED_KEYS if OmegaConf.select(other, k, default=_MISSING) is not _MISSING]
    if not found:
        return other
    if not saved:
        k = found[0]
        raise ConfigError(f"{source}: config key '{k}' was removed; use '{REMOVED_KEYS[k]}' (one key per setting: "
                          f"{', '.join(f'{o} -> {n}' for o, n in REMOVED_KEYS.items())})")
    other = copy.deepcopy(other)
    OmegaConf.set_readonly(other, False)
    for k in found:
        old = OmegaConf.select(other, k)
        new_key = REMOVED_KEYS[k]
        new = OmegaConf.select(other, new_key, default=_MISSING)
        if new is _MISSING:
            new = OmegaConf.select(base, new_key)
        parent, leaf = k.rsplit(".", 1)
        OmegaConf.select(other, parent).pop(leaf)
        if _plain(old) != _plain(new):
            print(f"[config] warning: {source}: '{k}' ({_plain(old)!r}) is no longer a setting; '{new_key}' "
                  f"({_plain(new)!r}) is used instead (pass {new_key}=... to change it)", file=sys.stderr)
    return other


def _merge(base: DictConfig, other: Any, source: str, schema: DictConfig, saved: bool = False) -> DictConfig:
    other = _removed_keys(base, other, source, saved)
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise _unknown_key_error(exc, source, schema) from None
    except ValidationError as exc:
        raise _type_error(exc, source) from None


def parse_overrides(args: Sequence[str]) -> List[str]:
    """Check that each override looks like ``key=value``."""
    out = []
    for a in args:
        if "=" not in a or a.startswith("="):
            raise ConfigError(f"command line: '{a}' is not a key=value override")
        out.append(a)
    return out


BASE_KEY = "base"  # a YAML file may start from other YAML files: ``base: paper_llama3b.yaml`` (or a list)


def _read_yaml(p: Path) -> DictConfig:
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        loaded = OmegaConf.load(p)
    except Exception as exc:  # YAML syntax errors
        raise ConfigError(f"{p}: cannot parse YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, DictConfig):
        raise ConfigError(f"{p}: the top level must be a mapping of keys")
    return loaded if loaded is not None else OmegaConf.create({})


def _merge_file(cfg: DictConfig, p: Path, schema: DictConfig, chain: tuple, saved: bool = False) -> DictConfig:
    """Merge the YAML file ``p`` into ``cfg``: first the files its ``base`` names (paths relative to ``p``, in
    order, each with its own bases), then ``p`` itself (``saved``: see ``REMOVED_KEYS``)."""
    if p.resolve() in chain:
        raise ConfigError(f"{p}: 'base' makes a cycle: {' -> '.join(str(c) for c in chain + (p.resolve(),))}")
    loaded = _read_yaml(p)
    bases = loaded.pop(BASE_KEY, None) if BASE_KEY in loaded else None
    if bases is not None:
        bases = [bases] if isinstance(bases, str) else list(bases)
        for b in bases:
            if not isinstance(b, str) or not b:
                raise ConfigError(f"{p}: 'base' must be a file name or a list of file names, got {b!r}")
            cfg = _merge_file(cfg, p.parent / b, schema, chain + (p.resolve(),), saved)
    return _merge(cfg, loaded, str(p), schema, saved) if loaded else cfg


def load_config(path: Optional[str | os.PathLike] = None, overrides: Iterable[str] = (),
                saved: bool = False) -> DictConfig:
    """Schema defaults, then the YAML file at ``path`` (if any; with the files its ``base`` names first), then
    ``key=value`` overrides; read-only result.

    ``saved=True`` reads a config this code wrote (``save_config``) perhaps before a key was removed: removed keys in
    the file are dropped (``REMOVED_KEYS``); in overrides they stay an error. ``load_saved_config`` is the short form.
    """
    schema = OmegaConf.structured(Config)
    cfg = schema.copy()
    if path:
        cfg = _merge_file(cfg, Path(path), schema, chain=(), saved=saved)
    ov = parse_overrides(list(overrides))
    if ov:
        try:
            dot = OmegaConf.from_dotlist(ov)
        except Exception as exc:
            raise ConfigError(f"command line: cannot parse overrides {ov}: {exc}") from None
        cfg = _merge(cfg, dot, "command line", schema)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve config: {exc}") from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_saved_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> DictConfig:
    """A saved ``config.yaml`` (a checkpoint's, a model folder's, an evaluation's) plus ``overrides``; see
    ``load_config(saved=True)``."""
    return load_config(path, overrides, saved=True)


# The valid choices of every string setting, declared once; the code that acts on a choice imports its tuple.
MOME_METHODS = ("mome", "mome_i")
LORA_METHODS = ("llama_avsr", "mtsk_ms", "mtsk_ss", "mtsk_mss")
METHODS = MOME_METHODS + LORA_METHODS
SINGLE_SCALE_METHODS = ("llama_avsr", "mome_i")  # one scale per model
GLOBAL_LORA_METHODS = ("llama_avsr", "mtsk_ms", "mtsk_mss")  # one LoRA adapter shared by every scale
SCALE_LORA_METHODS = ("mtsk_ss", "mtsk_mss")  # one LoRA adapter per scale
PLACEMENTS = ("mhsa", "ffn", "layer")
ROUTERS = ("shared", "per_scale")
EXPERT_BACKENDS = ("auto", "grouped_mm", "dense", "loop")
NOISE_TYPES = ("babble", "white", "file")
DTYPES = ("float32", "bfloat16", "float16")
TASKS = ("asr", "vsr", "avsr")
COMPRESSION_METHODS = ("avgpool", "stack")
MATRYOSHKA_MODES = ("all", "sample")

_CHOICES = {
    "data.dataset": ("synth", "lrs"),
    "data.noise.type": NOISE_TYPES,
    "model.method": METHODS,
    "model.matryoshka": MATRYOSHKA_MODES,
    "model.llm.dtype": DTYPES,
    "model.audio_encoder.dtype": DTYPES,
    "model.video_encoder.type": ("frontend", "avhubert"),
    "model.video_encoder.size": ("base", "large"),
    "model.compression.method": COMPRESSION_METHODS,
    "model.mome.placement": PLACEMENTS,
    "model.mome.router": ROUTERS,
    "model.mome.backend": EXPERT_BACKENDS,
    "train.precision": ("auto", "fp32", "bf16"),
    "logging.wandb": ("auto", "online", "offline", "disabled"),
}


# numeric ranges: key -> (low, high, low inclusive, high inclusive); None = unbounded. Lists are checked per element.
_RANGES = {
    "data.sample_rate": (1, None, True, True),
    "data.fps": (1, None, True, True),
    "data.max_frames": (1, None, True, True),
    "data.transforms.clean_epochs": (0, None, True, True),
    "data.max_frames_eval": (1, None, True, True),
    "data.max_batch_size": (0, None, True, True),
    "data.num_buckets": (1, None, True, True),
    "data.max_duration_s": (0, None, False, True),
    "data.num_workers": (0, None, True, True),
    "data.synth.num": (1, None, True, True),
    "data.synth.seed": (0, None, True, True),
    "data.synth.val_fraction": (0, 1, True, False),
    "data.synth.test_fraction": (0, 1, True, False),
    "data.synth.holdout_speakers": (0, None, True, True),
    "data.synth.min_words": (1, None, True, True),
    "data.synth.max_words": (1, None, True, True),
    "data.synth.workers": (1, None, True, True),
    "data.synth.num_speakers": (1, None, True, True),
    "data.transforms.crop_size": (1, None, True, True),
    "data.transforms.video_std": (0, None, False, True),
    "data.transforms.video_mask_window": (0, None, True, True),
    "data.transforms.video_mask_stride": (1, None, True, True),
    "data.transforms.audio_mask_window": (0, None, True, True),
    "data.transforms.audio_mask_stride": (1, None, True, True),
    "data.noise.babble_speakers": (1, None, True, True),
    "data.noise.seed": (0, None, True, True),
    "model.scale_weights": (0, None, True, True),
    "model.video_encoder.lora_rank": (0, None, True, True),
    "model.video_encoder.lora_scaling": (0, None, True, True),
    "model.video_encoder.channels": (1, None, True, True),
    "model.video_encoder.dim": (1, None, True, True),
    "model.video_encoder.temporal_layers": (0, None, True, True),
    "model.projector.hidden": (1, None, True, True),
    "model.mome.num_experts": (1, None, True, True),
    "model.mome.num_shared": (0, None, True, True),
    "model.mome.bottleneck": (1, None, True, True),
    "model.mome.lb_coef": (0, None, True, True),
    "model.mome.z_coef": (0, None, True, True),
    "model.lora.reduction": (1, None, True, True),
    "model.lora.rank": (0, None, True, True),
    "model.lora.alpha": (0, None, False, True),
    "model.lora.dropout": (0, 1, True, False),
    "train.lr": (0, None, False, True),
    "train.betas": (0, 1, True, False),
    "train.weight_decay": (0, None, True, True),
    "train.epochs": (1, None, True, True),
    "train.max_steps": (0, None, True, True),
    "train.warmup_steps": (0, None, True, True),
    "train.max_minutes": (0, None, True, True),
    "train.val_utterances": (0, None, True, True),
    "train.min_lr_ratio": (0, 1, True, True),
    "train.grad_accum": (1, None, True, True),
    "train.grad_clip": (0, None, True, True),
    "train.seed": (0, None, True, True),
    "train.log_every": (1, None, True, True),
    "train.val_every": (0, None, True, True),
    "train.val_wer_samples": (0, None, True, True),
    "train.save_every": (0, None, True, True),
    "train.keep_last": (1, None, True, True),
    "train.max_bad_steps": (1, None, True, True),
    "train.inject_nan_steps": (1, None, True, True),
    "eval.num_beams": (1, None, True, True),
    "eval.max_new_tokens": (1, None, True, True),
    "eval.batch_size": (0, None, True, True),
    "eval.max_utterances": (0, None, True, True),
    "eval.seed": (0, None, True, True),
    "eval.judge_max_new_tokens": (1, None, True, True),
    "eval.clip_seconds": (0, None, False, True),
    "eval.latency_repeats": (1, None, True, True),
    "eval.latency_new_tokens": (1, None, True, True),
    "analysis.max_utterances": (0, None, True, True),
    "analysis.utterances_per_shard": (1, None, True, True),
    "analysis.similarity_utterances": (0, None, True, True),
}


def _range_text(low, high, low_in: bool, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def check_ranges(cfg: DictConfig) -> None:
    """Every numeric setting of ``_RANGES`` within its range (NaN never is); ``ConfigError`` naming the key."""
    for key, (low, high, low_in, high_in) in _RANGES.items():
        val = OmegaConf.select(cfg, key)
        if val is None:
            continue
        for v in (list(val) if isinstance(val, ListConfig) else [val]):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
            ok = ok and (v >= low if low_in else v > low)
            ok = ok and (high is None or (v <= high if high_in else v < high))
            if not ok:
                what = f"contains {v!r}" if isinstance(val, ListConfig) else f"is {v!r}"
                raise ConfigError(f"'{key}' {what}; it must be {_range_text(low, high, low_in, high_in)}")
    s = cfg.data.synth
    if s.max_words < s.min_words:
        raise ConfigError(f"'data.synth.max_words' ({s.max_words}) must be >= data.synth.min_words ({s.min_words})")
    if s.val_fraction + s.test_fraction >= 1:
        raise ConfigError(f"'data.synth.val_fraction' + 'data.synth.test_fraction' ({s.val_fraction} + "
                          f"{s.test_fraction}) must be < 1: nothing would be left to train on")


def validate(cfg: DictConfig) -> None:
    """Value checks the type system cannot express (choices, ranges)."""
    check_ranges(cfg)
    for key, choices in _CHOICES.items():
        val = OmegaConf.select(cfg, key)
        if val not in choices:
            raise ConfigError(f"'{key}' is '{val}'; choose one of {', '.join(choices)}")
    for task in cfg.model.tasks:
        if task not in TASKS:
            raise ConfigError(f"'model.tasks' contains '{task}'; choose from {', '.join(TASKS)}")
    if not cfg.model.tasks:
        raise ConfigError("'model.tasks' is empty; give at least one of asr, vsr, avsr")
    for key in ("model.compression.audio_rates", "model.compression.video_rates"):
        rates = OmegaConf.select(cfg, key)
        if not rates or any(r < 1 for r in rates):
            raise ConfigError(f"'{key}' must be a non-empty list of positive integers, got {list(rates)}")
    if cfg.model.projector.shared and cfg.model.compression.method != "avgpool":
        raise ConfigError(f"'model.projector.shared' needs model.compression.method=avgpool: "
                          f"{cfg.model.compression.method} tokens have a different width at every rate")
    m = cfg.model.mome
    # the one check of top_k (the router trusts it): here, before any backbone is loaded, naming the keys
    if not 1 <= m.top_k <= m.num_experts:
        raise ConfigError(f"'model.mome.top_k' ({m.top_k}) must be between 1 and model.mome.num_experts ({m.num_experts})")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"'train.betas' must have two values, got {list(cfg.train.betas)}")
    for key in ("data.transforms.train_snrs", "eval.snrs"):
        for s in OmegaConf.select(cfg, key):
            try:
                parse_snr(s)
            except ValueError:
                raise ConfigError(f"'{key}' contains '{s}'; use a number in dB or 'clean'") from None


def model_section(model_cfg: Any) -> DictConfig:
    """A detached, read-only, schema-typed copy of a model config (``cfg.model`` or a ``ModelConfig``), so whoever
    holds it sees the model's settings only, never the run config around it."""
    if isinstance(model_cfg, DictConfig) and "model" in model_cfg and "method" not in model_cfg:
        raise TypeError("a model takes the model config (cfg.model), not the run config")
    try:
        section = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_cfg)
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise _unknown_key_error(exc, "model config", OmegaConf.structured(ModelConfig)) from None
    except ValidationError as exc:
        raise _type_error(exc, "model config") from None
    OmegaConf.resolve(section)
    OmegaConf.set_readonly(section, True)
    return section


def parse_snr(value: Any) -> Optional[float]:
    """'clean' (or inf) -> None, otherwise the SNR in dB as a float."""
    s = str(value).strip().lower()
    if s in ("clean", "inf", "none", "999999"):
        return None
    return float(s)


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, p)
    return p


def cache_dir(cfg: Optional[DictConfig] = None) -> Path:
    """The cache folder: ``cfg.cache_dir``, else ``$MOME_CACHE``, else ``~/.cache/mome``."""
    d = (cfg.cache_dir if cfg is not None else "") or os.environ.get("MOME_CACHE") or "~/.cache/mome"
    return Path(d).expanduser()


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir).expanduser() / cfg.run_name


def config_argparser(description: str = ""):
    """An ``argparse`` parser with ``--config FILE`` and trailing ``key=value`` overrides.

    Entry points add their own flags to it and call ``config_from_args`` on the parsed namespace, so every
    command accepts the same override syntax.
    """
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML file (e.g. configs/demo.yaml) over the schema defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.lr=3e-4")
    return parser


def config_from_args(args) -> DictConfig:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
