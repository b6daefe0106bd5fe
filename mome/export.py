"""Export a trained model as one self-contained folder that others can load and share.

    python -m mome.export --checkpoint runs/demo --out models/mome-demo
    python -m mome.export --checkpoint runs/lrs3/checkpoints/step_0040000 --out models/mome-lrs3 \\
        model.llm.name=meta-llama/Llama-3.2-3B model.audio_encoder.name=openai/whisper-medium.en

The folder::

    model.safetensors   the trainable weights, once (no optimizer state, no second copy), with the frozen
                        backbones' fingerprints in its metadata (checked when it loads)
    config.yaml         the run's config without machine-specific paths (data root, noise file, output and
                        cache folders, local backbone folders and the AV-HuBERT file become names; ``key=value``
                        arguments set them, e.g. a Hub id for a local LLM folder)
    COMPLETE            the manifest of the two files above (size, sha256; ``mome.training.checkpoint``), which
                        every load verifies
    README.md           the model card: method, scales, backbones, trainable parameters, training data and
                        schedule, the WER table of the run's evaluation (``<run>/eval/results.json``, or --eval);
                        not in the manifest, so it can be edited

It loads like a checkpoint: ``AVSRModel.from_pretrained(folder)``, ``mome.training.checkpoint.load_model(folder)``,
``evaluate.py --checkpoint folder`` and ``python -m mome.transcribe clip.mp4 --checkpoint folder``. The frozen
backbones are not in it: they come from their own names (registry names, Hub ids, or folders given as overrides).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
CARD = "README.md"
COMPLETE = "COMPLETE"


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message names the file."""


def _is_path(value: str) -> bool:
    """A local folder rather than a registry name or Hub id (``org/name``)."""
    return bool(value) and (os.path.isabs(value) or value.startswith((".", "~")) or Path(value).expanduser().is_dir())


def portable_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without machine-specific paths (see the module docstring)."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    c.data.root = ""
    for key in ("train_csv", "val_csv", "test_csv"):
        if os.path.isabs(str(c.data[key])):
            c.data[key] = Path(str(c.data[key])).name
    c.data.noise.file = Path(str(c.data.noise.file)).name if c.data.noise.file else ""
    c.output_dir, c.cache_dir, c.train.resume = "runs", "", ""
    for section in (c.model.llm, c.model.audio_encoder):
        if _is_path(str(section.name)):
            section.name = Path(str(section.name).rstrip("/")).name
    if c.model.video_encoder.checkpoint:
        c.model.video_encoder.checkpoint = Path(str(c.model.video_encoder.checkpoint)).name
    return c


def _results(run: Path, eval_dir: Optional[Path]) -> Optional[Dict]:
    path = (eval_dir or run / "eval") / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def wer_section(results: Optional[Dict], label: Optional[str] = None) -> str:
    """The card's results: the noise table (rows = scale, columns = SNR) and what it was measured on."""
    from mome.evaluation.tables import metric_table, to_markdown

    if not results:
        return "No evaluation was found for this run (`python evaluate.py --checkpoint <run>` writes one).\n"
    recs = [r for r in results["results"] if not r.get("judge") and (label is None or r["method"] == label)]
    recs += [r for r in results["results"] if r.get("judge")]
    header, rows = metric_table(recs, "wer")
    meta = results.get("meta", {})
    counts = sorted({r["num_utterances"] for r in recs})
    norm = meta.get("normalisation", {})
    lines = [f"WER (%) on the `{meta.get('split', '?')}` split ({' / '.join(map(str, counts))} utterances), "
             f"noise: {meta.get('noise') or meta.get('noise_type', '?')}, WER normalisation: "
             f"{norm.get('name') or ('punctuation stripped' if norm.get('strip_punctuation') else 'lowercase')}, "
             f"decoding: {json.dumps(meta.get('decoding', {}))}.\n", to_markdown(header, rows)]
    return "\n".join(lines)


def training_data(cfg: DictConfig) -> str:
    d = cfg.data
    if d.dataset == "synth":
        s = d.synth
        return (f"the synthetic audio-visual corpus of `mome.data.synth` ({s.num} utterances of {s.min_words}-"
                f"{s.max_words} words, {s.num_speakers} speakers, seed {s.seed}; val {s.val_fraction:g}, test "
                f"{s.test_fraction:g})")
    return (f"an auto_avsr-layout corpus (`data.dataset=lrs`; label CSVs `{d.train_csv}` / `{d.val_csv}` / "
            f"`{d.test_csv}`), training utterances up to {d.max_duration_s:g} s")


def model_card(cfg: DictConfig, name: str, step: Optional[int], tensors: Dict[str, int], backbones: Dict,
               sha256: str, results: Optional[Dict]) -> str:
    from mome.scales import all_scales

    m, t = cfg.model, cfg.train
    scales = ", ".join(f"`{s}`" for s in all_scales(m))
    method = {"mome": f"MoME-{m.mome.num_experts}/{m.mome.top_k} ({m.mome.placement}, router {m.mome.router}, "
                      f"{m.mome.num_shared} shared, bottleneck {m.mome.bottleneck})",
              "mome_i": f"MoME-{m.mome.num_experts}/{m.mome.top_k} trained per rate ({m.mome.placement})"}.get(
        m.method, f"{m.method} (LoRA, reduction {m.lora.reduction}, targets {', '.join(m.lora.target_modules)})")
    names = {"llm": m.llm.name, "audio_encoder": m.audio_encoder.name, "video_encoder": m.video_encoder.type}
    bb = "\n".join(f"| {role} | `{names.get(role, role)}` | `{info.get('fingerprint', '')}` |"
                   for role, info in backbones.items())  # names from the portable config, not this machine's paths
    video = (f"AV-HuBERT {m.video_encoder.size} (`{m.video_encoder.checkpoint or 'no checkpoint'}`)"
             if m.video_encoder.type == "avhubert" else
             f"the small trainable front end ({m.video_encoder.channels} channels, {m.video_encoder.dim} dims)")
    schedule = (f"{step} optimizer steps" if step else "?") + (
        f" (max_steps {t.max_steps})" if t.max_steps else f" ({t.epochs} epochs)")
    return f"""# {name}

An audio-visual speech recognition model of the MoME codebase: a frozen LLM reads compressed audio (Whisper encoder)
and lip-video tokens, adapted by **{method}**. Method key: `model.method={m.method}`.

## Scales

Tasks {', '.join(m.tasks)}; scales (`task:audio_rate x video_rate`, LLM tokens per second fall with the rate):
{scales}. Pick one when decoding.

## Backbones (frozen, not included; fingerprints checked on load)

| role | name | fingerprint |
|---|---|---|
{bb}

Video encoder: {video}. Trainable parameters: {sum(tensors.values()):,} in {len(tensors)} tensors
(`model.safetensors`, sha256 `{sha256}`).

## Training

Data: {training_data(cfg)}. Schedule: {schedule}, lr {t.lr:g}, AdamW betas {list(t.betas)}, weight decay
{t.weight_decay:g}, precision {t.precision}. Training noise SNRs: {', '.join(cfg.data.transforms.train_snrs)}
(noise `{cfg.data.noise.type}`{f", recording `{cfg.data.noise.file}`" if cfg.data.noise.file else ""}).

## Results

{wer_section(results)}
## Use

```bash
python -m mome.transcribe clip.mp4 --checkpoint path/to/this/folder --scale {all_scales(m)[0]}
python evaluate.py --checkpoint path/to/this/folder data.root=/path/to/data
```

```python
from mome.models import AVSRModel
model = AVSRModel.from_pretrained("path/to/this/folder")   # key=value overrides: overrides=[...]
```

Backbones named by a bare folder name were local folders when this model was trained: pass their location, e.g.
`model.llm.name=/path/to/{m.llm.name}`.
"""


def export(checkpoint, out, overrides: Sequence[str] = (), eval_dir=None, name: Optional[str] = None) -> Path:
    """Write the model folder ``out`` from a run folder or checkpoint (see the module docstring)."""
    from safetensors import safe_open

    from mome.config import ConfigError, load_config, load_saved_config, save_config
    from mome.models.checkpoints import CheckpointError, checked_model_folder, file_sha256, write_manifest

    try:  # the source is verified against its own manifest first
        ckpt = checked_model_folder(checkpoint)
    except (FileNotFoundError, CheckpointError) as exc:
        raise ExportError(str(exc)) from None
    weights = ckpt / WEIGHTS
    if not weights.is_file():
        raise ExportError(f"{ckpt}: no {WEIGHTS} in this checkpoint")
    out = Path(out).expanduser()
    if out.resolve() == ckpt.resolve():
        raise ExportError(f"{out}: the export folder must differ from the checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    try:  # the portable config, then the overrides, checked by the schema like any config
        save_config(portable_config(load_saved_config(ckpt / CONFIG)), out / CONFIG)
        cfg = load_config(out / CONFIG, overrides)
    except ConfigError as exc:
        raise ExportError(f"{ckpt / CONFIG}: {exc}") from None
    save_config(cfg, out / CONFIG)
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: _numel(f.get_slice(k).get_shape()) for k in f.keys()}
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    step = int(ckpt.name.split("_")[-1]) if ckpt.name.startswith("step_") else None
    tmp = out / f".{WEIGHTS}.{os.getpid()}.tmp"
    shutil.copyfile(weights, tmp)
    os.replace(tmp, out / WEIGHTS)
    for stale in (out / CARD, out / COMPLETE):  # a folder exported before: only what is written now is listed
        stale.unlink(missing_ok=True)
    write_manifest(out, step or 0, extra={"export_of": ckpt.name})
    card = model_card(cfg, name or out.name, step, tensors, json.loads(meta.get("mome_backbones", "{}")),
                      file_sha256(out / WEIGHTS), _results(run, Path(eval_dir) if eval_dir else None))
    (out / CARD).write_text(card)
    return out


def _numel(shape: List[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(description="Export a trained model as a self-contained folder (weights, config, "
                                            "model card).")
    p.add_argument("--checkpoint", required=True, help="run folder (its newest checkpoint) or checkpoint folder")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--eval", default=None, help="evaluation folder with results.json (default <run>/eval)")
    p.add_argument("--name", default=None, help="model name in the card (default: the folder's name)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="set exported config values, e.g. "
                                                                      "model.llm.name=meta-llama/Llama-3.2-3B")
    args = p.parse_intermixed_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.overrides, args.eval, args.name)
    except ExportError as exc:
        raise SystemExit(f"export: {exc}") from None
    print(f"[export] wrote {out} ({', '.join(sorted(f.name for f in out.iterdir()))})", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
