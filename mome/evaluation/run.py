"""``python evaluate.py``: decode a split at every scale and SNR for one or more checkpoints, plus the Whisper judge.

    python evaluate.py --checkpoint runs/demo                     # newest complete checkpoint of a run
    python evaluate.py --checkpoint runs/a --checkpoint runs/b/checkpoints/step_0000400 --label MoME --label MTSK
    python evaluate.py --checkpoint runs/demo eval.snrs=[clean,0] eval.scales=[avsr:4x2] eval.judge=false

Configuration. The evaluation settings (``eval.*``, ``data.*``, ``logging.*``, ``cache_dir``) come from ``--config``
when given, else from the first checkpoint's saved ``config.yaml``; ``key=value`` overrides go on top. Each model is
rebuilt from its own checkpoint's config; ``model.*`` overrides may change only runtime settings
(``RUNTIME_MODEL_KEYS``: expert backend, attention implementation, dtypes, where the backbones are found, whose
fingerprints are checked on load); one that would change the trained model is refused, naming the key and both
values. A checkpoint is refused, with the keys named, when its files fail verification (sizes and sha256 in its
``COMPLETE`` manifest), when the data settings its model depends on (sample rate, fps, crop, video normalisation,
waveform normalisation) differ from the evaluation's, or when a requested scale is not one it was trained on.

Protocol. For every SNR in ``eval.snrs`` (``clean`` = no noise), noise of type ``data.noise.type`` (babble, white, or
the wav ``data.noise.file``) is mixed into the audio only (video untouched) with a per-utterance seeded offset
(``mome.data.noise``), so every model, scale and rerun hears the same noise. Each batch is decoded at every scale
(``mome.evaluation.decode``); the judge transcribes the same noisy audio (``mome.evaluation.judge``).

Outputs in ``--out`` (default ``<run folder>/eval``, or ``<output_dir>/compare`` for several checkpoints):
``results.json``, ``results.md``, ``wer.csv``, ``cer.csv``, ``cost.csv``, ``wer_vs_snr.png``,
``wer_vs_tokens.png``, ``config.yaml`` (the evaluation config) and ``hypotheses/<label>/<scale>__snr_<snr>.jsonl``.
"""
from __future__ import annotations

import copy
import datetime
import gc
import json
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, cache_dir, load_config, load_saved_config, parse_snr, save_config
from ..scales import Scale
from .cost import media_tokens_per_second, scale_costs
from .decode import decode_loader, score_and_write, transcribe_loader
from .plots import plot_wer_vs_snr, plot_wer_vs_tokens
from .tables import snr_label, write_results_json, write_tables
from ..metrics.wer import normalisation_name, spell_numbers
from ..data.noise import noise_name

# data settings a trained model's inputs depend on: evaluation data must use the same values
MODEL_DATA_KEYS = (
    "data.sample_rate",
    "data.fps",
    "data.transforms.crop_size",
    "data.transforms.video_mean",
    "data.transforms.video_std",
    "data.transforms.normalize_waveform",
)
SPLITS = ("train", "val", "test")
# model.* keys an evaluation may override: how the trained model runs, not what it is
RUNTIME_MODEL_KEYS = (
    "model.mome.backend",
    "model.llm.attn_implementation",
    "model.llm.gradient_checkpointing",
    "model.llm.dtype",
    "model.audio_encoder.dtype",
    "model.llm.name",  # relocated backbones: their fingerprints are checked against the checkpoint's
    "model.audio_encoder.name",
    "model.video_encoder.checkpoint",
)


class EvaluationError(RuntimeError):
    """The checkpoint, config and data do not fit together; the message says which and how."""


@dataclass
class Checkpoint:
    path: Path  # the resolved checkpoint folder
    cfg: DictConfig  # its saved config
    label: str  # display name in tables and plots


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def scale_file_name(scale: str, snr: str) -> str:
    return f"{slug(scale.replace(':', '-'))}__snr_{slug(snr)}.jsonl"


# ----------------------------------------------------------------------------------------------------------------
# checkpoints and configuration


def resolve_checkpoints(paths: Sequence[str], labels: Sequence[str] = ()) -> List[Checkpoint]:
    from ..models.checkpoints import CheckpointError, checked_model_folder

    if not paths:
        raise EvaluationError("give at least one --checkpoint (a run folder or a checkpoint folder)")
    if labels and len(labels) != len(paths):
        raise EvaluationError(f"{len(labels)} --label values for {len(paths)} --checkpoint values; give one per checkpoint")
    out: List[Checkpoint] = []
    for p in paths:
        try:
            ckpt = checked_model_folder(p)  # sizes and sha256 of its files, when it has a manifest
        except (FileNotFoundError, CheckpointError) as exc:
            raise EvaluationError(str(exc)) from None
        try:
            cfg = load_saved_config(ckpt / "config.yaml")
        except ConfigError as exc:
            raise EvaluationError(f"{ckpt}: its config.yaml does not load: {exc}") from None
        out.append(Checkpoint(ckpt, cfg, ""))
    names = list(labels) or [c.cfg.run_name for c in out]
    if not labels and len(set(names)) < len(names):  # same run name twice: tell them apart by step
        names = [f"{c.cfg.run_name}/{c.path.name}" for c in out]
    if len(set(names)) < len(names):
        raise EvaluationError(f"checkpoint labels are not unique: {names}; pass distinct --label values")
    for c, n in zip(out, names):
        c.label = n
    return out


def evaluation_config(ckpts: Sequence[Checkpoint], config_path: Optional[str], overrides: Sequence[str]) -> DictConfig:
    """``--config`` (or the first checkpoint's config.yaml) plus the overrides."""
    try:
        if config_path:
            return load_config(config_path, overrides)
        return load_saved_config(ckpts[0].path / "config.yaml", overrides)
    except ConfigError as exc:
        raise EvaluationError(f"config error: {exc}") from None


def check_model_overrides(ckpt: Checkpoint, model_overrides: Sequence[str]) -> None:
    """Refuse ``model.*`` overrides that would change the trained model (anything outside ``RUNTIME_MODEL_KEYS``)."""
    if not model_overrides:
        return
    try:
        changed = load_saved_config(ckpt.path / "config.yaml", model_overrides)
    except ConfigError as exc:
        raise EvaluationError(f"{ckpt.path}: {exc}") from None
    diffs = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}.{k}")
        elif a != b and prefix not in RUNTIME_MODEL_KEYS:
            diffs.append(f"{prefix}: trained with {a!r}, override {b!r}")

    walk(OmegaConf.to_container(ckpt.cfg.model), OmegaConf.to_container(changed.model), "model")
    if diffs:
        raise EvaluationError(
            f"{ckpt.path}: model overrides would evaluate another model than the one trained: " + "; ".join(diffs)
            + f". Only runtime settings may be overridden ({', '.join(RUNTIME_MODEL_KEYS)})")


def check_data_compatible(cfg: DictConfig, ckpt: Checkpoint) -> None:
    diffs = []
    for key in MODEL_DATA_KEYS:
        a, b = OmegaConf.select(cfg, key), OmegaConf.select(ckpt.cfg, key)
        if a != b:
            diffs.append(f"{key}: evaluation {a!r}, checkpoint {b!r}")
    if diffs:
        raise EvaluationError(
            f"{ckpt.path}: the model was trained with different input settings than this evaluation uses: "
            + "; ".join(diffs)
            + ". Evaluate with the checkpoint's values (e.g. as key=value overrides)."
        )


def select_checkpoint_scales(cfg: DictConfig, ckpt: Checkpoint, model_scales: Sequence[Scale]) -> List[Scale]:
    if not cfg.eval.scales:
        return list(model_scales)
    chosen = []
    for name in cfg.eval.scales:
        try:
            s = Scale.parse(name)
        except ValueError as exc:
            raise EvaluationError(f"eval.scales: {exc}") from None
        if s not in model_scales:
            raise EvaluationError(
                f"{ckpt.path}: scale '{s}' (eval.scales) is not trained by this checkpoint "
                f"(method {ckpt.cfg.model.method}); it has {', '.join(map(str, model_scales))}"
            )
        chosen.append(s)
    return chosen


def check_split(cfg: DictConfig) -> Path:
    """The split's label CSV; a clear error when the split name or the file is wrong."""
    split = cfg.eval.split
    if split not in SPLITS:
        raise EvaluationError(f"eval.split is '{split}'; choose one of {', '.join(SPLITS)}")
    from ..data import ensure_corpus

    try:
        root = Path(ensure_corpus(cfg))  # the synthetic corpus is generated on first use (deterministic from cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise EvaluationError(f"data: {exc}") from None
    csv = Path(OmegaConf.select(cfg, f"data.{split}_csv"))
    csv = csv if csv.is_absolute() else root / csv
    if not csv.is_file():
        raise EvaluationError(
            f"split '{split}': label CSV {csv} not found (data.root='{cfg.data.root}', data.{split}_csv="
            f"'{OmegaConf.select(cfg, f'data.{split}_csv')}'); check data.root and data.{split}_csv"
        )
    return csv


def loader_config(cfg: DictConfig, normalize_waveform: Optional[bool] = None) -> DictConfig:
    """The evaluation config with ``data.max_batch_size = eval.batch_size`` (and the waveform norm switched)."""
    c = copy.deepcopy(cfg)
    OmegaConf.set_readonly(c, False)
    if cfg.eval.batch_size > 0:
        c.data.max_batch_size = int(cfg.eval.batch_size)
    if normalize_waveform is not None:
        c.data.transforms.normalize_waveform = normalize_waveform
    OmegaConf.set_readonly(c, True)
    return c


def build_loader(cfg: DictConfig, snr: str):
    from ..data import build_dataloader

    return build_dataloader(
        cfg,
        cfg.eval.split,
        train=False,
        snr=parse_snr(snr),  # noise of data.noise.type
        max_utterances=cfg.eval.max_utterances,
    )


# ----------------------------------------------------------------------------------------------------------------
# the evaluation


def _record(label, model_method, ckpt_path, judge, task, scale_name, audio_rate, video_rate, tps, snr, cfg,
            score, hyp_file) -> Dict:
    return {
        "method": label,
        "model_method": model_method,
        "checkpoint": str(ckpt_path) if ckpt_path else None,
        "judge": judge,
        "task": task,
        "scale": scale_name,
        "audio_rate": audio_rate,
        "video_rate": video_rate,
        "tokens_per_second": tps,
        "snr": snr,
        "snr_db": parse_snr(snr),
        "noise_type": None if parse_snr(snr) is None else cfg.data.noise.type,
        "split": cfg.eval.split,
        **score.to_dict(),
        "hypotheses": hyp_file,
    }


def _score(triples, path: Path, what: str, strip_punctuation: bool, extra: Dict, hyp_transform=None):
    try:
        return score_and_write(triples, path, strip_punctuation, extra=extra, hyp_transform=hyp_transform)
    except ValueError as exc:  # empty split, empty reference transcript
        raise EvaluationError(f"{what}: {exc}") from None


def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def evaluate_checkpoint(cfg: DictConfig, ckpt: Checkpoint, out: Path, model_overrides: Sequence[str]):
    """Decode every (scale, SNR) of one checkpoint; returns (records, cost rows)."""
    from ..models.checkpoints import load_model

    check_data_compatible(cfg, ckpt)
    t0 = time.perf_counter()
    try:
        _, model = load_model(ckpt.path, overrides=list(model_overrides))
    except (ValueError, RuntimeError, FileNotFoundError, ConfigError) as exc:
        raise EvaluationError(f"{ckpt.path}: cannot load the model: {exc}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    scales = select_checkpoint_scales(cfg, ckpt, model.scales)
    e = cfg.eval
    progress = bool(cfg.logging.progress)
    _say(f"[eval] {ckpt.label}: {ckpt.path} ({model.method}, loaded in {time.perf_counter() - t0:.1f} s), "
         f"scales {', '.join(map(str, scales))}")
    records = []
    lcfg = loader_config(cfg)
    for snr in [snr_label(s) for s in e.snrs]:
        loader = build_loader(lcfg, snr)
        hyps = decode_loader(model, loader, scales, num_beams=e.num_beams, max_new_tokens=e.max_new_tokens,
                             do_sample=e.do_sample, seed=e.seed, progress=progress,
                             desc=f"{ckpt.label} snr={snr}")
        for s in scales:
            rel = Path("hypotheses") / slug(ckpt.label) / scale_file_name(s.name, snr)
            score = _score(hyps[s.name], out / rel, f"{ckpt.label} {s.name} snr={snr} ({e.split} split)",
                           e.strip_punctuation, extra={"method": ckpt.label, "scale": s.name, "snr": snr})
            records.append(_record(ckpt.label, model.method, ckpt.path, False, s.task, s.name, s.audio_rate,
                                   s.video_rate, media_tokens_per_second(s, cfg.data.fps), snr, cfg, score, str(rel)))
            _say(f"[eval] {ckpt.label} {s.name:>10} snr={snr:>5}: WER {100 * score.wer:5.1f} %  "
                 f"CER {100 * score.cer:5.1f} %  ({score.num_utterances} utts)")
    cost = scale_costs(model, scales, clip_seconds=e.clip_seconds, latency=e.latency, repeats=e.latency_repeats,
                       new_tokens=e.latency_new_tokens, sample_rate=cfg.data.sample_rate, fps=cfg.data.fps,
                       crop=cfg.data.transforms.crop_size, method_label=ckpt.label)
    del model
    gc.collect()
    return records, cost


def evaluate_judge(cfg: DictConfig, out: Path) -> List[Dict]:
    """The pretrained Whisper on the same split, noise and SNRs (un-normalised waveforms, see ``judge``)."""
    from .judge import WhisperJudge

    e = cfg.eval
    try:
        judge = WhisperJudge(e.judge_model, cache_dir=str(cache_dir(cfg)), num_beams=e.num_beams,
                             max_new_tokens=e.judge_max_new_tokens, sample_rate=cfg.data.sample_rate)
    except (OSError, ValueError, RuntimeError) as exc:
        raise EvaluationError(
            f"the judge '{e.judge_model}' does not load: {exc}. Prepare it (python -m mome.pretrained prepare), "
            f"point eval.judge_model at a Whisper folder, or set eval.judge=false"
        ) from None
    lcfg = loader_config(cfg, normalize_waveform=False)
    records = []
    for snr in [snr_label(s) for s in e.snrs]:
        triples = transcribe_loader(judge.transcribe, build_loader(lcfg, snr), progress=bool(cfg.logging.progress),
                                    desc=f"judge snr={snr}")
        rel = Path("hypotheses") / slug(judge.label) / scale_file_name("full", snr)
        score = _score(triples, out / rel, f"{judge.label} snr={snr} ({e.split} split)", e.strip_punctuation,
                       extra={"method": judge.label, "scale": "full", "snr": snr},
                       hyp_transform=spell_numbers if e.judge_spell_numbers else None)
        records.append(_record(judge.label, "whisper", None, True, "asr", "full", None, None, None, snr, cfg, score,
                               str(rel)))
        _say(f"[eval] {judge.label} snr={snr:>5}: WER {100 * score.wer:5.1f} %  CER {100 * score.cer:5.1f} %")
    return records


def protocol_notes(records: Sequence[Dict], meta: Dict) -> List[str]:
    """The lines under the results title that say what the numbers are over: split and utterance count, WER
    normalisation, noise."""
    counts = sorted({r["num_utterances"] for r in records})
    count = " / ".join(str(n) for n in counts) or "0"
    cap = f" (the first {meta['max_utterances']}: eval.max_utterances)" if meta.get("max_utterances") else \
        " (every utterance of the split)"
    return [f"Split: {meta['split']}, {count} utterances{cap}.",
            f"WER normalisation: {meta['normalisation']['name']}.",
            f"Noise: {meta['noise']} (seed {meta['noise_seed']}), SNRs {', '.join(meta['snrs'])}."]


def default_out(cfg: DictConfig, ckpts: Sequence[Checkpoint]) -> Path:
    if len(ckpts) == 1:
        run = ckpts[0].path.parent.parent if ckpts[0].path.parent.name == "checkpoints" else ckpts[0].path
        return run / "eval"
    return Path(cfg.output_dir).expanduser() / ("compare_" + "_".join(slug(c.label) for c in ckpts))


def evaluate(checkpoints: Sequence[str], config_path: Optional[str] = None, overrides: Sequence[str] = (),
             out: Optional[str] = None, labels: Sequence[str] = ()) -> Dict[str, Path]:
    """Run the whole evaluation; returns the paths of the files written."""
    ckpts = resolve_checkpoints(checkpoints, labels)
    cfg = evaluation_config(ckpts, config_path, overrides)
    model_overrides = [o for o in overrides if o.startswith("model.")]
    for c in ckpts:  # before anything is built or decoded
        check_model_overrides(c, model_overrides)
    if any(parse_snr(s) is not None for s in cfg.eval.snrs):  # the noise recording is checked before any model loads
        from ..data.noise import NoiseFileError, check_noise_file

        try:
            check_noise_file(cfg)
        except NoiseFileError as exc:
            raise EvaluationError(f"config error: {exc}") from None
    torch.manual_seed(cfg.eval.seed)
    check_split(cfg)
    for c in ckpts:  # fail before any decoding when a later checkpoint does not fit
        check_data_compatible(cfg, c)
        if cfg.eval.scales:
            from ..scales import all_scales

            select_checkpoint_scales(cfg, c, all_scales(c.cfg.model))
    if cfg.eval.judge:  # fail before decoding when the judge is missing
        from ..pretrained import resolve

        try:
            resolve(cfg.eval.judge_model, cache_dir(cfg))
        except Exception as exc:
            raise EvaluationError(
                f"the judge '{cfg.eval.judge_model}' is not available: {exc}. Prepare it (python -m mome.pretrained "
                f"prepare), point eval.judge_model at a Whisper folder, or set eval.judge=false"
            ) from None
    out_dir = Path(out).expanduser() if out else default_out(cfg, ckpts)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")

    started = time.perf_counter()
    records, cost = [], []
    for c in ckpts:
        r, k = evaluate_checkpoint(cfg, c, out_dir, model_overrides)
        records += r
        cost += k
    if cfg.eval.judge:
        records += evaluate_judge(cfg, out_dir)

    e = cfg.eval
    meta = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "checkpoints": [{"label": c.label, "path": str(c.path), "method": c.cfg.model.method,
                         "run_name": c.cfg.run_name} for c in ckpts],
        "split": e.split,
        "snrs": [snr_label(s) for s in e.snrs],
        "noise_type": cfg.data.noise.type,
        "noise_file": cfg.data.noise.file if (cfg.data.noise.type == "file" or cfg.data.noise.file) else None,
        "noise": noise_name(cfg),
        "noise_seed": cfg.data.noise.seed,
        "decoding": {"num_beams": e.num_beams, "max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample,
                     "seed": e.seed},
        "normalisation": {"lowercase": True, "collapse_whitespace": True, "strip_punctuation": e.strip_punctuation,
                          "name": normalisation_name(e.strip_punctuation)},
        "judge": e.judge_model if e.judge else None,
        "judge_spell_numbers": e.judge_spell_numbers,
        "max_utterances": e.max_utterances,
        "cost": {"clip_seconds": e.clip_seconds, "latency_measured": e.latency, "repeats": e.latency_repeats,
                 "decode_tokens": e.latency_new_tokens, "device": "cuda" if torch.cuda.is_available() else "cpu",
                 "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                 "processor": platform.processor() or platform.machine()},
    }
    title = "Evaluation: " + ", ".join(f"{c.label} ({c.cfg.model.method})" for c in ckpts)
    paths = {"results_json": write_results_json(out_dir / "results.json", records, cost, meta)}
    paths.update(write_tables(out_dir, records, cost, title=title, notes=protocol_notes(records, meta)))
    paths["wer_vs_snr"] = plot_wer_vs_snr(records, out_dir / "wer_vs_snr.png", title=f"WER vs SNR ({meta['noise']})")
    paths["wer_vs_tokens"] = plot_wer_vs_tokens(records, out_dir / "wer_vs_tokens.png")
    paths["config"] = out_dir / "config.yaml"
    _say(f"[eval] wrote {out_dir} ({meta['seconds']} s)")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    from ..config import config_argparser

    parser = config_argparser("Evaluate checkpoints: WER per scale and SNR, the Whisper judge, elastic-inference cost.")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="RUN_OR_CKPT", required=True,
                        help="run folder (its newest complete checkpoint) or checkpoint folder; repeat to compare")
    parser.add_argument("--label", action="append", default=[], help="display name per --checkpoint (in order)")
    parser.add_argument("--out", default=None, help="output folder (default: <run folder>/eval)")
    args = parser.parse_intermixed_args(argv)
    try:
        from ..config import parse_overrides

        overrides = parse_overrides(args.overrides)
        paths = evaluate(args.checkpoint, args.config, overrides, args.out, args.label)
    except (EvaluationError, ConfigError) as exc:
        raise SystemExit(f"evaluate: {exc}") from None
    except Exception as exc:  # bad media from the data layer names the file: show it without a traceback
        from ..data import BadInputError

        if isinstance(exc, BadInputError):
            raise SystemExit(f"evaluate: bad input: {exc} (data.skip_bad=true skips such utterances)") from None
        raise
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return paths
