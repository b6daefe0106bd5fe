"""``python -m mome.experiments.compare``: train and evaluate every method of a compare YAML, then write the report.

    python -m mome.experiments.compare --config configs/compare_demo.yaml [--out DIR]   # train, evaluate, report
    python -m mome.experiments.compare --config configs/compare_demo.yaml --quick       # tiny models, a few minutes
    python -m mome.experiments.compare --config configs/compare_demo.yaml --plan        # runs + time estimate only
    python -m mome.experiments.compare --out DIR --report-only                          # redraw from DIR/results.json

Stages, each skipped when its output is already there (so a second call retrains and re-decodes nothing, and an
interrupted call continues where it stopped):

1. **train** every run (``mome.training.trainer.train``, in this process, ``train.resume=auto``): first every
   method's first seed, then the further seeds. A run whose newest checkpoint is at ``train.max_steps`` (or stopped
   at ``train.max_minutes``) is finished and not trained again; ``work/state/<run>/train.json`` records the wall
   time of the call that finished it.
2. **params**: ``mome.models.describe`` on the meta device (adapter-active, trainable and total counts).
3. **evaluate** (``mome.evaluation.run.evaluate``, batched greedy decoding): the table's rate pairs clean, and the
   noise scales at every SNR (babble), each run at the scales it has; utterances per second recorded.
4. **extra seeds** for the best method of ``extra_seeds.among`` (lowest mean clean WER of its first seed), trained
   and evaluated as above.
5. **beam**: one method's first seed decoded with beam search at the pairs (greedy against beam).
6. **judge**: the pretrained Whisper (``mome.evaluation.run.evaluate_judge``) on the same clips, clean and noisy.
7. **routing** (``mome.experiments.routing``): the trained MoME (every seed), its step-0 weights and the
   per-scale-router ablation, through ``analysis.expert_activation``.
8. **report** (``mome.experiments.report``): ``results.json`` gathers everything above; tables, plots and
   ``RESULTS.md`` are made from it alone, which is what ``--report-only`` redoes.

Layout of ``--out``: ``RESULTS.md``, ``results.json``, ``table_*.md|csv``, ``*.png``, ``routing/`` (the routing
statistics and figures) and ``work/`` (run folders, evaluation folders with hypotheses, traces, state; a
``.gitignore`` keeps it out of git).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..config import save_config
from . import estimate as E
from .spec import Run, Spec, SpecError, load_spec

REPO = Path(__file__).resolve().parents[2]


def say(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_json(path: Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state, so that consecutive trainings in this process do not share it."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def model_scales(cfg) -> List[str]:
    from ..scales import all_scales

    return [s.name for s in all_scales(cfg.model)]


class Comparison:
    """The stages of one comparison over a ``Spec``; every stage writes its result under ``spec.work``."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.work = spec.work
        self._cfgs: Dict[str, object] = {}

    # ---- paths and configs

    def state(self, run: Run, name: str) -> Path:
        return self.work / "state" / run.run_id / f"{name}.json"

    def eval_dir(self, run: Run, kind: str) -> Path:
        return self.work / "eval" / run.run_id / kind

    def cfg(self, run: Run):
        if run.run_id not in self._cfgs:
            self._cfgs[run.run_id] = self.spec.run_config(run)
        return self._cfgs[run.run_id]

    def eval_plan(self, run: Run) -> Dict[str, List[str]]:
        """``{"clean": scales, "noise": scales}`` this run is decoded at (the ones it has, in the spec's order)."""
        have = set(model_scales(self.cfg(run)))
        ev = self.spec.evaluation
        return {"clean": [s for s in ev["pairs"] + ev["clean_extra"] if s in have],
                "noise": [s for s in ev["noise_scales"] if s in have] if ev["snrs"] else []}

    # ---- 1. training

    @staticmethod
    def checkpoint_position(run_dir: Path) -> Optional[dict]:
        """The trainer position of the newest complete checkpoint (``None`` when there is none)."""
        from ..models.checkpoints import list_checkpoints

        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            return None
        f = ckpts[-1] / "training_state" / "trainer.json"
        return read_json(f).get("trainer", {}) if f.is_file() else None

    def finished(self, run: Run) -> Optional[dict]:
        """The newest checkpoint's position when the run is finished (its step budget or its time budget)."""
        pos = self.checkpoint_position(self.spec.run_dir(run))
        if pos is None:
            return None
        t = self.cfg(run).train
        if int(pos.get("time_up", 0)) or (int(t.max_steps) > 0 and int(pos.get("step", 0)) >= int(t.max_steps)):
            return pos
        return None

    def config_changes(self, run: Run) -> List[str]:
        """Keys whose values differ between the config this run was trained with and the one the spec gives now,
        except ``eval.*``: decoding takes the spec's evaluation keys anyway (``eval_overrides``)."""
        from omegaconf import OmegaConf

        saved = self.work / "configs" / f"{run.run_id}.yaml"
        if not saved.is_file():
            return []
        old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        new = OmegaConf.to_container(self.cfg(run), resolve=True)

        def diff(a, b, prefix=""):
            if isinstance(a, dict) and isinstance(b, dict):
                return [k for key in sorted(set(a) | set(b))
                        for k in diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)]
            return [] if a == b else [prefix]

        return [k for k in diff(old, new) if not k.startswith("eval.")]

    def train(self, run: Run) -> dict:
        marker = self.state(run, "train")
        if marker.is_file():
            changed = self.config_changes(run)
            if changed:
                say(f"{run.run_id}: warning: the config differs from the one it was trained with "
                    f"({', '.join(changed)}); the finished run is kept: remove {self.spec.run_dir(run)}, "
                    f"{marker.parent} and {self.work / 'eval' / run.run_id} to train it again")
            say(f"{run.run_id}: trained ({read_json(marker).get('steps')} steps), not retrained")
            return read_json(marker)
        cfg = self.cfg(run)
        save_config(cfg, self.work / "configs" / f"{run.run_id}.yaml")  # what it is trained with
        run_dir = self.spec.run_dir(run)
        pos = self.finished(run)
        seconds, note = None, ""
        if pos is None:
            before = self.checkpoint_position(run_dir)
            note = f"resumed from step {before.get('step')}" if before else ""
            say(f"{run.run_id}: training ({cfg.model.method}, {', '.join(model_scales(cfg))}, seed {run.seed}"
                + (f", {note}" if note else "") + ")")
            from ..training.trainer import train

            t0 = time.perf_counter()
            reset_accelerate()
            try:
                train(cfg)
            except SystemExit as exc:
                if exc.code != 1:  # 143 (SIGTERM: a checkpoint was saved) and the rest stop the comparison
                    raise
                note = "stopped after too many non-finite steps (the last good weights are its checkpoint)"
                say(f"{run.run_id}: {note}")
            finally:
                reset_accelerate()
                gc.collect()
            seconds = round(time.perf_counter() - t0, 1)
            pos = self.checkpoint_position(run_dir) or {}
        else:
            note = "found finished"
        rec = {"run_id": run.run_id, "seconds": seconds, "steps": pos.get("step"), "samples": pos.get("samples"),
               "time_up": bool(pos.get("time_up", 0)), "note": note,
               "finished": datetime.datetime.now().isoformat(timespec="seconds")}
        write_json(marker, rec)
        say(f"{run.run_id}: {rec['steps']} steps" + (f" in {seconds:.0f} s" if seconds is not None else ""))
        return rec

    # ---- 2. parameter counts

    def params(self, run: Run) -> dict:
        marker = self.state(run, "params")
        if marker.is_file():
            return read_json(marker)
        from ..models.describe import describe

        rep = describe(self.cfg(run))
        rec = {k: rep[k] for k in ("method", "scales", "totals", "trainable_active", "adapter_trainable",
                                   "adapter_active")}
        return read_json(write_json(marker, rec))

    # ---- 3. evaluation

    def eval_overrides(self, run: Run, **fixed) -> List[str]:
        """``eval.*`` of the comparison's current config for ``run`` as overrides, ``fixed`` keys replaced.

        A trained run's saved config keeps the ``eval`` section of the call that trained it; decoding takes the
        comparison's (``eval.max_utterances``, ``eval.batch_size``, ...) so that editing the YAML changes the
        evaluation without retraining. The list is also the fingerprint a finished evaluation is reused under."""
        from omegaconf import OmegaConf

        ev = OmegaConf.to_container(self.cfg(run).eval, resolve=True)
        ev.update(fixed)
        return [f"eval.{k}={json.dumps(v)}" for k, v in sorted(ev.items())]

    def decoded(self, timing: Path, settings: List[str]) -> Optional[dict]:
        """The timing record of a finished evaluation made with ``settings``, else None (decode again)."""
        if not timing.is_file():
            return None
        rec = read_json(timing)
        if rec.get("settings") == settings:
            return rec
        if "settings" not in rec:
            say(f"{timing.parent}: decoded before settings were recorded: decoding again")
            return None
        changed = sorted(k.split("=", 1)[0] for k in set(rec["settings"]).symmetric_difference(settings))
        say(f"{timing.parent}: decoded with other settings ({', '.join(dict.fromkeys(changed))}): decoding again")
        return None

    def evaluate(self, run: Run, kind: str, scales: Sequence[str], snrs: Sequence[str],
                 num_beams: Optional[int] = None) -> Optional[dict]:
        """Decode ``run`` at ``scales`` x ``snrs`` into ``work/eval/<run>/<kind>`` (skipped when done with the same
        settings)."""
        if not scales:
            return None
        d = self.eval_dir(run, kind)
        timing = d / "timing.json"
        fixed = {"scales": list(scales), "snrs": list(snrs), "judge": False}
        if num_beams is not None:
            fixed["num_beams"] = int(num_beams)
        ov = self.eval_overrides(run, **fixed)
        done = self.decoded(timing, ov)
        if done is not None:
            return done
        from ..evaluation.run import evaluate

        timing.unlink(missing_ok=True)  # an interrupted decode is not taken for the earlier one
        say(f"{run.run_id}: decoding {kind} ({', '.join(scales)} x {', '.join(snrs)})")
        t0 = time.perf_counter()
        evaluate([str(self.spec.run_dir(run))], None, ov, out=str(d), labels=[run.run_id])
        seconds = time.perf_counter() - t0
        records = read_json(d / "results.json")["results"]
        decodes = sum(int(r["num_utterances"]) for r in records)
        rec = {"run_id": run.run_id, "kind": kind, "seconds": round(seconds, 1), "decodes": decodes,
               "utterances_per_second": round(decodes / seconds, 3) if seconds > 0 else None,
               "num_beams": int(num_beams) if num_beams is not None else int(self.cfg(run).eval.num_beams),
               "settings": ov}
        say(f"{run.run_id}: {kind}: {decodes} utterance decodes in {seconds:.0f} s "
            f"({rec['utterances_per_second']} utt/s)")
        return read_json(write_json(timing, rec))

    def do_run(self, run: Run) -> None:
        self.train(run)
        self.params(run)
        plan = self.eval_plan(run)
        self.evaluate(run, "clean", plan["clean"], ["clean"])
        self.evaluate(run, "noise", plan["noise"], self.spec.evaluation["snrs"])

    # ---- 4. extra seeds for the best of a group

    def best_of_group(self) -> Optional[str]:
        among = self.spec.extra_seeds.get("among") or []
        if not among or not self.spec.extra_seeds.get("seeds"):
            return None
        marker = self.work / "state" / "extra_seeds.json"
        if marker.is_file():
            return read_json(marker)["best"]
        pairs = self.spec.evaluation["pairs"]
        scores = {}
        for key in among:
            run = Run(self.spec.method(key), self.spec.method(key).seeds[0])
            recs = read_json(self.eval_dir(run, "clean") / "results.json")["results"]
            wers = [r["wer"] for r in recs if r["scale"] in pairs]
            scores[key] = sum(wers) / len(wers) if wers else float("inf")
        best = min(scores, key=scores.get)
        write_json(marker, {"best": best, "mean_clean_wer_first_seed": scores, "pairs": pairs})
        say(f"best of {', '.join(among)} (mean clean WER of the first seed): {best}")
        return best

    # ---- 5.-7.

    def beam(self) -> None:
        b = self.spec.evaluation.get("beam")
        if not b:
            return
        m = self.spec.method(b["method"])
        run = Run(m, m.seeds[0])
        self.evaluate(run, "beam", [s for s in self.eval_plan(run)["clean"] if s in self.spec.evaluation["pairs"]],
                      ["clean"], num_beams=b["num_beams"])

    def judge(self, ref: Run) -> None:
        if not self.spec.evaluation["judge"]:
            return
        d = self.work / "eval" / "judge"
        snrs = ["clean"] + list(self.spec.evaluation["snrs"])
        ov = self.eval_overrides(ref, snrs=snrs, judge=True)
        if self.decoded(d / "timing.json", ov) is not None:
            return
        from ..config import load_saved_config
        from ..evaluation.run import check_split, evaluate_judge

        cfg = load_saved_config(self.spec.run_dir(ref) / "config.yaml", ov)
        (d / "timing.json").unlink(missing_ok=True)
        check_split(cfg)
        say(f"judge {cfg.eval.judge_model}: {', '.join(snrs)}")
        t0 = time.perf_counter()
        records = evaluate_judge(cfg, d)
        seconds = time.perf_counter() - t0
        write_json(d / "records.json", records)
        decodes = sum(int(r["num_utterances"]) for r in records)
        write_json(d / "timing.json", {"run_id": "judge", "kind": "judge", "seconds": round(seconds, 1),
                                       "decodes": decodes, "num_beams": int(cfg.eval.num_beams),
                                       "utterances_per_second": round(decodes / seconds, 3) if seconds else None,
                                       "settings": ov})

    def routing(self) -> List[dict]:
        from .routing import routing_stage

        return routing_stage(self)

    def reference_params(self) -> List[dict]:
        marker = self.work / "state" / "reference_params.json"
        if marker.is_file():
            return read_json(marker)
        from ..config import load_config
        from ..models.describe import describe

        out = []
        for p in self.spec.reference_params:
            rep = describe(load_config(p))
            out.append({"config": p.name, "method": rep["method"], "llm": rep["llm"],
                        "adapter_active": rep["adapter_active"], "adapter_trainable": rep["adapter_trainable"]})
        write_json(marker, out)
        return out

    # ---- the whole comparison

    def all_runs(self) -> List[Run]:
        """Every run of the comparison so far: first seeds, further seeds, and the chosen extra seeds."""
        runs = self.ordered_primary_runs()
        best = self.best_marker()
        return runs + (self.spec.extra_runs(best) if best else [])

    def ordered_primary_runs(self) -> List[Run]:
        """Every method's first seed (in YAML order), then every method's second seed, and so on."""
        runs = self.spec.primary_runs()
        index = {m.key: m.seeds for m in self.spec.methods}
        return sorted(runs, key=lambda r: index[r.method.key].index(r.seed))  # stable: YAML order within a rank

    def best_marker(self) -> Optional[str]:
        marker = self.work / "state" / "extra_seeds.json"
        return read_json(marker)["best"] if marker.is_file() else None

    def run(self, command: str) -> Dict[str, Path]:
        started = time.perf_counter()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / ".gitignore").write_text("# run folders, checkpoints, hypotheses, traces: not for git\n*\n")
        for run in self.ordered_primary_runs():
            self.do_run(run)
        best = self.best_of_group()
        for run in self.spec.extra_runs(best) if best else []:
            self.do_run(run)
        self.beam()
        first = self.ordered_primary_runs()[0]
        self.judge(first)
        self.routing()
        self.reference_params()
        from .collect import collect
        from .report import write_report

        results = collect(self, command=command, seconds=time.perf_counter() - started)
        paths = write_report(self.spec.out)
        say(f"wrote {paths['page']} ({time.perf_counter() - started:.0f} s in this call)")
        return {"results": results, **paths}

    # ---- --plan

    def plan(self) -> List[dict]:
        """Estimated stages (``mome.experiments.estimate``), with the extra seeds of the first ``among`` method."""
        spec, ev = self.spec, self.spec.evaluation
        runs = self.ordered_primary_runs()
        among = spec.extra_seeds.get("among") or []
        if among:
            runs += spec.extra_runs(among[0])
        items = []
        for run in runs:
            cfg = self.cfg(run)
            t = cfg.train
            scales = model_scales(cfg)
            items.append({"stage": "train", "what": f"{run.run_id} ({len(scales)} scales, {t.max_steps} steps)",
                          "seconds": E.train_seconds(scales, int(t.max_steps), float(t.max_minutes),
                                                     int(t.val_utterances), int(t.val_wer_samples),
                                                     str(cfg.model.matryoshka))})
            plan = self.eval_plan(run)
            cells = len(plan["clean"]) + len(plan["noise"]) * len(ev["snrs"])
            calls = int(bool(plan["clean"])) + int(bool(plan["noise"]))
            items.append({"stage": "eval", "what": f"{run.run_id} ({cells} cells x {cfg.eval.max_utterances} utts)",
                          "seconds": E.eval_seconds(cells, int(cfg.eval.max_utterances), calls=calls)})
        cfg0 = self.cfg(runs[0])
        utts = int(cfg0.eval.max_utterances)
        if ev.get("beam"):
            m = spec.method(ev["beam"]["method"])
            n = len([s for s in self.eval_plan(Run(m, m.seeds[0]))["clean"] if s in ev["pairs"]])
            items.append({"stage": "beam", "what": f"{m.key} ({n} pairs, {ev['beam']['num_beams']} beams)",
                          "seconds": E.eval_seconds(n, utts, num_beams=ev["beam"]["num_beams"])})
        if ev["judge"]:
            items.append({"stage": "judge", "what": f"{cfg0.eval.judge_model} ({1 + len(ev['snrs'])} SNRs)",
                          "seconds": E.EVAL_LOAD_S + E.JUDGE_S * utts * (1 + len(ev["snrs"]))})
        if spec.routing.get("method"):
            m = spec.method(spec.routing["method"])
            n_runs = len(m.seeds) + 1 + int(bool(spec.routing.get("ablation")))
            n_sc = len(model_scales(self.cfg(Run(m, m.seeds[0]))))
            a_utts = int(cfg0.analysis.max_utterances)
            items.append({"stage": "routing", "what": f"{n_runs} traces x {n_sc} scales x {a_utts} utts",
                          "seconds": n_runs * (E.ANALYSIS_LOAD_S + E.TRACE_S * n_sc * a_utts)})
        return E.plan_rows(items)


# ----------------------------------------------------------------------------------------------------------------
# machine and provenance (the page's header)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": mem, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()

    try:
        return {"commit": git("rev-parse", "--short", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


# ----------------------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    parser = argparse.ArgumentParser(prog="python -m mome.experiments.compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "compare_demo.yaml"),
                        help="compare YAML (default configs/compare_demo.yaml)")
    parser.add_argument("--out", default=None, help="results folder (default: the YAML's out, or quick.out)")
    parser.add_argument("--quick", action="store_true", help="the YAML's quick section: tiny models, a few minutes")
    parser.add_argument("--report-only", action="store_true",
                        help="only redraw tables, plots and RESULTS.md from OUT/results.json (no training)")
    parser.add_argument("--plan", action="store_true", help="print the runs and the estimated time, run nothing")
    args = parser.parse_args(argv)
    command = "python -m mome.experiments.compare " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                            else sys.argv[1:]))
    try:
        if args.report_only:
            from .report import write_report

            out = Path(args.out) if args.out else load_spec(args.config, quick=args.quick).out
            paths = write_report(out, command=command)
        else:
            comp = Comparison(load_spec(args.config, quick=args.quick, out=args.out))
            if args.plan:
                rows = comp.plan()
                print(E.format_plan(rows))
                return {}
            paths = comp.run(command)
    except (SpecError, FileNotFoundError) as exc:
        raise SystemExit(f"compare: {exc}") from None
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return paths


if __name__ == "__main__":
    main()
