"""The plan of a comparison, read from a compare YAML (``configs/compare_demo.yaml``).

A compare YAML is not a mome config. It names a training ``recipe`` (a mome config file, relative to the YAML),
``common`` overrides for every method, and ``methods``: each a ``key`` (run folder and results key), a ``label``
(display name), an optional ``row`` (methods sharing a row are one table row), ``seeds`` and ``set`` (its own
overrides). A run is one (method, seed); its config is

    recipe  <-  [tiny backbones, with --quick]  <-  common  <-  method.set  <-  [quick.set]  <-  run keys

where the run keys are ``output_dir=<out>/work/runs``, ``run_name=<key>_s<seed>``, ``train.seed=<seed>`` and
``train.resume=auto`` (a finished run is then a no-op, an interrupted one continues). Overrides are written as
mappings, dotted (``train.max_steps: 120``) or nested (``train: {max_steps: 120}``); they become ``key=value``
strings for ``mome.config.load_config``, so every key and value is checked by the schema.

Also here: ``extra_seeds`` (more seeds for the best of a group, chosen from the seed-0 results), ``evaluation``
(the scales and SNRs each run is decoded at), ``routing`` and ``claims`` (which methods play which part in the
analysis and the verdicts), ``reference_params`` and the ``quick`` section that ``--quick`` applies.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config import ConfigError, load_config, parse_snr
from ..scales import Scale

TOP_KEYS = {"recipe", "out", "seeds", "common", "methods", "extra_seeds", "evaluation", "routing", "claims",
            "reference_params", "quick"}
METHOD_KEYS = {"key", "label", "row", "seeds", "set"}
EVAL_DEFAULTS = {"pairs": ["avsr:4x2", "avsr:4x5", "avsr:16x2", "avsr:16x5"], "clean_extra": [],
                 "noise_scales": ["avsr:4x2", "avsr:16x5"], "snrs": ["5", "0", "-5"], "judge": True, "beam": None}
WORK = "work"  # <out>/work: run folders, evaluation folders, traces, state (never committed)
REPO = Path(__file__).resolve().parents[2]


def shown_path(p: str | Path) -> str:
    """A path as the page shows it: relative to the repository when inside it (no machine paths in the page)."""
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


class SpecError(ValueError):
    """The compare YAML is wrong; the message names the file and the key."""


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    row: str
    seeds: Tuple[int, ...]
    set: Tuple[str, ...]  # key=value overrides


@dataclass(frozen=True)
class Run:
    """One training run: a method at one seed."""

    method: Method
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.method.key}_s{self.seed}"


@dataclass
class Spec:
    path: Path
    recipe: Path
    out: Path
    quick: bool
    tiny: bool
    common: Tuple[str, ...]
    quick_set: Tuple[str, ...]
    methods: List[Method]
    extra_seeds: Dict[str, Any]
    evaluation: Dict[str, Any]
    routing: Dict[str, str]
    claims: Dict[str, Any]
    reference_params: List[Path] = field(default_factory=list)

    @property
    def work(self) -> Path:
        return self.out / WORK

    def method(self, key: str) -> Method:
        for m in self.methods:
            if m.key == key:
                return m
        raise KeyError(key)

    def primary_runs(self) -> List[Run]:
        """Every (method, seed) of the YAML, in its order (the extra seeds come later: ``extra_runs``)."""
        return [Run(m, s) for m in self.methods for s in m.seeds]

    def extra_runs(self, best: str) -> List[Run]:
        m = self.method(best)
        return [Run(m, int(s)) for s in self.extra_seeds.get("seeds", []) if int(s) not in m.seeds]

    def tiny_folder(self) -> Path:
        return self.work / "tiny_backbones"

    def run_overrides(self, run: Run) -> List[str]:
        """The ``key=value`` overrides of one run over the recipe, in order."""
        ov: List[str] = []
        if self.tiny:
            from ..models.tiny import tiny_overrides

            # the tiny backbones, but the usual cache (corpus, babble, the Whisper judge)
            ov += [o for o in tiny_overrides(self.tiny_folder()) if not o.startswith("cache_dir=")]
        ov += list(self.common) + list(run.method.set) + (list(self.quick_set) if self.quick else [])
        ov += [f"output_dir={self.work / 'runs'}", f"run_name={run.run_id}", f"train.seed={run.seed}",
               "train.resume=auto"]
        return ov

    def run_config(self, run: Run) -> DictConfig:
        try:
            return load_config(self.recipe, self.run_overrides(run))
        except ConfigError as exc:
            raise SpecError(f"{self.path}: method '{run.method.key}' (seed {run.seed}): {exc}") from None

    def run_dir(self, run: Run) -> Path:
        return self.work / "runs" / run.run_id

    def summary(self) -> Dict[str, Any]:
        """What the report needs of the plan (``results.json["spec"]``)."""
        return {
            "config": shown_path(self.path),
            "recipe": shown_path(self.recipe),
            "out": shown_path(self.out),
            "quick": self.quick,
            "tiny": self.tiny,
            "common": list(self.common),
            "quick_set": list(self.quick_set) if self.quick else [],
            "methods": [{"key": m.key, "label": m.label, "row": m.row, "seeds": list(m.seeds), "set": list(m.set)}
                        for m in self.methods],
            "extra_seeds": self.extra_seeds,
            "evaluation": self.evaluation,
            "routing": self.routing,
            "claims": self.claims,
        }


# ----------------------------------------------------------------------------------------------------------------
# reading


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def flatten(mapping: Any, where: str, prefix: str = "") -> List[str]:
    """``{a: {b: 1}, "c.d": [1, 2]}`` -> ``["a.b=1", "c.d=[1, 2]"]`` (values JSON-encoded, which YAML reads back)."""
    if mapping is None:
        return []
    if not isinstance(mapping, dict):
        raise SpecError(f"{where}: expected a mapping of config keys, got {mapping!r}")
    out: List[str] = []
    for k, v in mapping.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out += flatten(v, where, key)
        else:
            out.append(f"{key}={json.dumps(v)}")
    return out


def _check_keys(d: dict, allowed: set, where: str) -> None:
    bad = sorted(set(d) - allowed)
    if bad:
        raise SpecError(f"{where}: unknown key(s) {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}")


def _scales(names: Sequence[str], where: str) -> List[str]:
    out = []
    for n in names or []:
        try:
            out.append(Scale.parse(str(n)).name)
        except ValueError as exc:
            raise SpecError(f"{where}: {exc}") from None
    return out


def _snrs(values: Sequence[Any], where: str) -> List[str]:
    from ..evaluation.tables import snr_label

    out = []
    for v in values or []:
        try:
            db = parse_snr(v)
        except ValueError:
            raise SpecError(f"{where}: '{v}' is not an SNR in dB") from None
        if db is None:
            raise SpecError(f"{where}: '{v}': list the noisy SNRs only (clean is always decoded)")
        out.append(snr_label(v))
    return out


def load_spec(path: str | Path, quick: bool = False, out: Optional[str | Path] = None) -> Spec:
    """Read and check a compare YAML; ``quick`` applies its ``quick`` section; ``out`` replaces its ``out``."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: compare config not found")
    raw = _plain(OmegaConf.load(p)) or {}
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: the top level must be a mapping")
    _check_keys(raw, TOP_KEYS, str(p))
    if "recipe" not in raw or "methods" not in raw:
        raise SpecError(f"{p}: needs 'recipe' (a mome config) and 'methods'")
    recipe = (p.parent / raw["recipe"]).resolve()
    if not recipe.is_file():
        raise SpecError(f"{p}: recipe {recipe} not found")
    q = raw.get("quick") or {}
    _check_keys(q, {"tiny", "out", "set", "beam_num_beams"}, f"{p}: quick")
    default_seeds = tuple(int(s) for s in raw.get("seeds", [0]))
    methods, seen = [], set()
    for i, m in enumerate(raw["methods"] or []):
        where = f"{p}: methods[{i}]"
        if not isinstance(m, dict) or "key" not in m:
            raise SpecError(f"{where}: each method needs a 'key'")
        _check_keys(m, METHOD_KEYS, where)
        key = str(m["key"])
        if key in seen:
            raise SpecError(f"{where}: key '{key}' appears twice")
        seen.add(key)
        seeds = tuple(int(s) for s in m.get("seeds", default_seeds))
        if not seeds or len(set(seeds)) != len(seeds):
            raise SpecError(f"{where}: seeds {list(seeds)} must be a non-empty list of distinct integers")
        label = str(m.get("label", key))
        methods.append(Method(key, label, str(m.get("row", label)), seeds, tuple(flatten(m.get("set"), where))))
    if not methods:
        raise SpecError(f"{p}: 'methods' is empty")
    keys = {m.key for m in methods}

    ev = dict(EVAL_DEFAULTS, **(raw.get("evaluation") or {}))
    _check_keys(ev, set(EVAL_DEFAULTS), f"{p}: evaluation")
    ev["pairs"] = _scales(ev["pairs"], f"{p}: evaluation.pairs")
    ev["clean_extra"] = _scales(ev["clean_extra"], f"{p}: evaluation.clean_extra")
    ev["noise_scales"] = _scales(ev["noise_scales"], f"{p}: evaluation.noise_scales")
    ev["snrs"] = _snrs(ev["snrs"], f"{p}: evaluation.snrs")
    ev["judge"] = bool(ev["judge"])
    if ev.get("beam"):
        beam = dict(ev["beam"])
        _check_keys(beam, {"method", "num_beams"}, f"{p}: evaluation.beam")
        if beam.get("method") not in keys:
            raise SpecError(f"{p}: evaluation.beam.method '{beam.get('method')}' is not a method key")
        beam["num_beams"] = int(q.get("beam_num_beams", beam.get("num_beams", 4)) if quick else beam.get("num_beams", 4))
        ev["beam"] = beam

    extra = dict(raw.get("extra_seeds") or {})
    _check_keys(extra, {"among", "seeds"}, f"{p}: extra_seeds")
    for k in extra.get("among", []):
        if k not in keys:
            raise SpecError(f"{p}: extra_seeds.among names '{k}', which is not a method key")
    routing = dict(raw.get("routing") or {})
    _check_keys(routing, {"method", "ablation"}, f"{p}: routing")
    claims = dict(raw.get("claims") or {})
    _check_keys(claims, {"mome", "mtsk", "coarsest", "audio_only"}, f"{p}: claims")
    named = [routing.get("method"), routing.get("ablation"), claims.get("mome"), *(claims.get("mtsk") or []),
             (claims.get("audio_only") or {}).get("method")]
    for k in named:
        if k is not None and k not in keys:
            raise SpecError(f"{p}: routing/claims name '{k}', which is not a method key")
    if claims.get("coarsest"):
        claims["coarsest"] = _scales([claims["coarsest"]], f"{p}: claims.coarsest")[0]
    if claims.get("audio_only"):
        ao = dict(claims["audio_only"])
        ao["pairs"] = [_scales(pair, f"{p}: claims.audio_only.pairs") for pair in ao.get("pairs", [])]
        claims["audio_only"] = ao

    out_dir = Path(out) if out else Path(q.get("out") if quick and q.get("out") else raw.get("out", "runs/compare"))
    return Spec(
        path=p, recipe=recipe, out=out_dir.expanduser().resolve(), quick=quick, tiny=bool(quick and q.get("tiny")),
        common=tuple(flatten(raw.get("common"), f"{p}: common")),
        quick_set=tuple(flatten(q.get("set"), f"{p}: quick.set")),
        methods=methods, extra_seeds=extra, evaluation=ev, routing=routing, claims=claims,
        reference_params=[(p.parent / r).resolve() for r in raw.get("reference_params") or []],
    )
