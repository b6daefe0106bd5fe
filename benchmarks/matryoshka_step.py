"""Matryoshka training step: one step over every rate pair vs the sum of one single-pair step per pair.

A *step* is what the trainer does per micro-batch: ``zero_grad``, ``loss = model(batch, scales).loss``,
``loss.backward()``, AdamW ``step`` (``mome.training.optim.build_optimizer``). Variants, on the same batch:

* ``matryoshka``: ``model(batch, all 4 scales)``: the encoders run once, each (modality, rate) is pooled and
  projected once, and the rows of all scales go through the LLM in ONE call (concatenated along the batch, padded
  to the longest row), one backward, one optimizer step (``AVSRModel.forward``);
* ``single <scale>``: the same with one scale; the baseline is the sum of the four;
* ``shared-enc``: a diagnostic: encoders once, then one LLM call per scale (no cross-scale padding), one backward
  and one optimizer step; it separates the gain of sharing the encoders from the cost of padding;
* ``packed``: a prototype of what the model could do instead of padding (``packed_loss``, not in ``mome/models``):
  the rows of all scales are spread over one row per clip (longest first, each onto the emptiest packed row), the
  packed rows padded to the fullest one, positions restart at 0 in every segment, and the LLM gets
  ``position_ids`` with ``attention_mask=None`` so that transformers builds the block-diagonal causal mask itself
  (``masking_utils.find_packed_sequence_indices``). Same tokens, same targets; the loss is the token-mean CE
  (+ LB), every row with scale id 0 (exact for the shared router).

Each step's phases are timed too: ``encode`` (``model.encode``: frozen Whisper + trainable video front end),
``forward`` (the rest of the forward: pooling, projectors, sequence assembly, LLM, CE), ``backward``, ``optimizer``.
The LLM rows of the matryoshka call are reported with their padding (real tokens / rows x longest row).

Target: matryoshka step <= 0.8 x the sum of the four single-pair steps.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.common import device, llm_label, llm_overrides, paired_ratio, time_interleaved

TARGET = 0.8
TEXTS = ("place blue at f two now", "bin green by a seven again", "lay white in z three please",
         "set red with b one soon")


def model_overrides(spec: Dict, workdir: Path) -> List[str]:
    """Config overrides for the benchmark model: the demo config's parts with the spec's LLM and encoders.

    ``spec``: ``llm`` (see ``common.llm_overrides``), optional ``audio_encoder`` (a name / folder; ``random_init``
    for the tiny test backbones) and extra ``overrides``."""
    out = llm_overrides(spec["llm"], workdir)
    if "audio_encoder" in spec:
        out += [f"model.audio_encoder.name={spec['audio_encoder']}",
                f"model.audio_encoder.random_init={str(bool(spec.get('audio_random_init'))).lower()}"]
    return out + list(spec.get("overrides", ()))


def build(spec: Dict, workdir: Optional[Path] = None):
    """``(cfg, model)``: the demo config with ``spec``'s backbone, built on the benchmark device (a scratch
    ``workdir`` for converted weights unless one is given)."""
    from mome.config import load_config
    from mome.models import build_model

    workdir = Path(workdir or tempfile.mkdtemp(prefix="mome-bench-"))
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
                      model_overrides(spec, workdir))
    model = build_model(cfg).to(device())
    return cfg, model


def make_batch(lengths: Sequence[int], seed: int = 0) -> Dict:
    from mome.models.tiny import random_batch

    texts = [TEXTS[i % len(TEXTS)] for i in range(len(lengths))]
    return random_batch(list(lengths), texts, seed=seed)


def pack_rows(lengths: Sequence[int], bins: int) -> List[List[int]]:
    """Row indices spread over ``bins`` packed rows: longest first, each onto the currently shortest packed row."""
    out: List[List[int]] = [[] for _ in range(min(bins, len(lengths)))]
    load = [0] * len(out)
    for r in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        b = load.index(min(load))
        out[b].append(r)
        load[b] += lengths[r]
    return out


def packed_loss(model, batch: Dict, scales) -> torch.Tensor:
    """Token-mean CE (+ lb_coef x LB) of every scale's rows, packed (see the module docstring)."""
    import torch.nn.functional as F

    from mome.models.sequence import IGNORE

    inputs = model.build_inputs(batch, list(scales), with_transcripts=True)
    lengths = [int(n) for n in inputs.attention_mask.sum(1)]
    packs = pack_rows(lengths, len(batch["text"]))
    cap = max(sum(lengths[r] for r in rows) for rows in packs)
    embeds, labels, positions = [], [], []
    for rows in packs:
        e = torch.cat([inputs.inputs_embeds[r, :lengths[r]] for r in rows])
        lab = torch.cat([inputs.labels[r, :lengths[r]] for r in rows])
        pos = torch.cat([torch.arange(lengths[r]) for r in rows])
        pad = cap - e.shape[0]
        if pad:  # tail padding continues the last segment's positions (ignored by the loss)
            e = F.pad(e, (0, 0, 0, pad))
            lab = F.pad(lab, (0, pad), value=IGNORE)
            pos = torch.cat([pos, pos[-1] + 1 + torch.arange(pad)])
        embeds.append(e)
        labels.append(lab)
        positions.append(pos)
    x, lab = torch.stack(embeds), torch.stack(labels)
    pos = torch.stack(positions).to(x.device)
    with model.adapters.call(torch.zeros(x.shape[0], dtype=torch.long, device=x.device)) as call:
        hidden = model.llm.get_decoder()(inputs_embeds=x, position_ids=pos, attention_mask=None,
                                         use_cache=False).last_hidden_state
    targets = lab[:, 1:]
    sel = targets != IGNORE
    logits = model.llm.get_output_embeddings()(hidden[:, :-1][sel]).float()
    loss = F.cross_entropy(logits, targets[sel])
    if model.mome is not None:
        loss = loss + model.lb_coef * model.adapters.aux_losses(call)["lb"]
    return loss


class StepRunner:
    """Training steps of one model on one batch, with per-phase times."""

    def __init__(self, model, cfg, batch: Dict):
        from mome.training.optim import build_optimizer

        self.model, self.batch = model.train(), batch
        self.opt = build_optimizer(model, cfg.train)
        self.phases: Dict[str, List[Dict[str, float]]] = {}

    def _timed_encode(self, log: Dict[str, float]):
        original = self.model.encode

        def encode(batch, audio, video):
            t0 = time.perf_counter()
            out = original(batch, audio, video)
            log["encode"] = log.get("encode", 0.0) + (time.perf_counter() - t0) * 1e3
            return out

        return encode

    def step(self, name: str, scales, shared_encoders: bool = False, packed: bool = False) -> Callable[[], None]:
        model = self.model

        def run():
            log: Dict[str, float] = {}
            self.opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            model.encode = self._timed_encode(log)  # instance attribute: shadows the method for this step
            try:
                if shared_encoders:
                    feats = model.encode(self.batch, True, True)
                    model.encode = lambda batch, audio, video: feats
                    loss = sum(model(self.batch, [s]).loss for s in scales) / len(scales)
                elif packed:
                    loss = packed_loss(model, self.batch, scales)
                else:
                    loss = model(self.batch, list(scales)).loss
            finally:
                del model.encode
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            self.opt.step()
            t3 = time.perf_counter()
            log.update(forward=(t1 - t0) * 1e3 - log.get("encode", 0.0), backward=(t2 - t1) * 1e3,
                       optimizer=(t3 - t2) * 1e3)
            self.phases.setdefault(name, []).append(log)

        return run

    def phase_medians(self, name: str, warmup: int) -> Dict[str, float]:
        logs = self.phases.get(name, [])[warmup:]
        keys = sorted({k for log in logs for k in log})
        return {k: float(torch.tensor([log.get(k, 0.0) for log in logs]).median()) for k in keys}


def padding_stats(model, batch: Dict, scales) -> Dict:
    with torch.no_grad():
        inputs = model.build_inputs(batch, list(scales), with_transcripts=True)
    mask = inputs.attention_mask
    real = int(mask.sum())
    rows, longest = mask.shape
    per_scale = {s.name: [int(n) for n in mask[k * len(batch['text']):(k + 1) * len(batch['text'])].sum(1)]
                 for k, s in enumerate(scales)}
    lengths = [int(n) for n in mask.sum(1)]
    bins = pack_rows(lengths, len(batch["text"]))
    cap = max(sum(lengths[r] for r in rows) for rows in bins)
    return {"rows": rows, "longest_row": longest, "real_tokens": real, "padded_tokens": rows * longest,
            "real_fraction": real / (rows * longest), "row_tokens_per_scale": per_scale,
            "packed_rows": len(bins), "packed_row_length": cap, "packed_real_fraction": real / (len(bins) * cap)}


DIAGNOSTICS = ("shared-enc", "packed")


def run(spec: Dict, lengths: Sequence[int], repeats: int, warmup: int = 1, workdir: Optional[Path] = None,
        diagnostics: Sequence[str] = DIAGNOSTICS, verbose: bool = True) -> Dict:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mome-bench-"))
    cfg, model = build(spec, workdir)
    batch = make_batch(lengths)
    scales = list(model.scales)
    runner = StepRunner(model, cfg, batch)
    cases = {"matryoshka": runner.step("matryoshka", scales)}
    for s in scales:
        cases[f"single {s.name}"] = runner.step(f"single {s.name}", [s])
    if "shared-enc" in diagnostics:
        cases["shared-enc"] = runner.step("shared-enc", scales, shared_encoders=True)
    if "packed" in diagnostics:
        cases["packed"] = runner.step("packed", scales, packed=True)
    times = time_interleaved(cases, repeats, warmup)
    singles = [f"single {s.name}" for s in scales]
    sum_singles = sum(times[n]["median_ms"] for n in singles)
    per_round = [sum(xs) for xs in zip(*(times[n]["samples_ms"] for n in singles))]
    ratio = paired_ratio(times["matryoshka"]["samples_ms"], per_round)
    res = {
        "model": llm_label(spec["llm"]),
        "spec": spec,
        "scales": [s.name for s in scales],
        "batch_frames": list(lengths),
        "times": times,
        "phases_ms": {n: runner.phase_medians(n, warmup * 1) for n in cases},
        "sum_singles_ms": sum_singles,
        "ratio": ratio,
        "diagnostic_ratios": {d: paired_ratio(times[d]["samples_ms"], per_round) for d in diagnostics},
        "padding": padding_stats(model, batch, scales),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "target": {"what": "matryoshka step / sum of single-pair steps", "max": TARGET, "value": ratio,
                   "met": ratio <= TARGET},
    }
    if verbose:
        print(format_table(res))
    return res


def format_table(r: Dict) -> str:
    lines = [f"{'step (' + r['model'] + ')':<40} {'ms':>9} {'encode':>8} {'forward':>8} {'backward':>8} {'optim':>7}"]
    for name, t in r["times"].items():
        ph = r["phases_ms"].get(name, {})
        lines.append(f"{name:<40} {t['median_ms']:>9.1f} {ph.get('encode', 0):>8.1f} {ph.get('forward', 0):>8.1f} "
                     f"{ph.get('backward', 0):>8.1f} {ph.get('optimizer', 0):>7.1f}")
    lines.append(f"{'sum of single-pair steps':<40} {r['sum_singles_ms']:>9.1f}")
    p = r["padding"]
    diag = "".join(f"{d} / sum = {v:.3f}; " for d, v in r["diagnostic_ratios"].items())
    lines.append(f"matryoshka / sum = {r['ratio']:.3f} (target <= {TARGET}); {diag}LLM rows {p['rows']} x "
                 f"{p['longest_row']}, {100 * p['real_fraction']:.0f}% real tokens; packed {p['packed_rows']} x "
                 f"{p['packed_row_length']}, {100 * p['packed_real_fraction']:.0f}% real")
    return "\n".join(lines)


def memory_case(case: str, params: Dict) -> Callable[[], None]:
    """``matryoshka`` (one step over every pair) or ``singles`` (the four single-pair steps in a row)."""
    cfg, model = build(params["spec"], params.get("workdir"))
    runner = StepRunner(model, cfg, make_batch(params["lengths"]))
    scales = list(model.scales)
    if case == "matryoshka":
        return runner.step(case, scales)
    if case == "singles":
        steps = [runner.step(f"single {s.name}", [s]) for s in scales]
        return lambda: [f() for f in steps]
    raise ValueError(f"unknown matryoshka_step case '{case}'; choose matryoshka or singles")
