"""Routing traces: which experts each token picked, stored on disk in shards and read back lazily.

A *record* is one utterance run at one Matryoshka scale: one LLM input sequence. For each of its tokens a record
holds the token's role, its position in the sequence and, for every recorded MoME layer, the top-k expert ids,
their gates and (optionally) the router's full probability vector.

On-disk layout (a folder)::

    index.json                 schema, scales, layers, one entry per shard (see ``TraceWriter``)
    shard-00000.safetensors    records of the first ``utterances_per_shard`` utterances
    shard-00001.safetensors    ...

Arrays in a shard (``R`` records, ``T`` tokens over all its records, ``L`` recorded layers, ``K`` = top-k,
``E`` routed experts); the tokens of record ``r`` are rows ``record_offsets[r]:record_offsets[r+1]``:

    record_offsets  int64   [R+1]
    record_scale    int32   [R]        index into index.json "scales"
    roles           uint8   [T]        index into ROLES
    positions       int32   [T]        position of the token in its LLM sequence (strictly increasing per record)
    topk_ids        int16   [T, L, K]  routed expert ids, best first; -1 where a rank is unused
    topk_gates      float16 [T, L, K]  the gates the module applied (0 where the id is -1)
    probs           float16 [T, L, E]  full router probabilities (only when the trace has probabilities)

The shard's safetensors metadata holds ``utterance_ids``: a JSON list with the utterance id of every record.
Every record of an utterance is in one shard, so cross-scale comparisons read one shard at a time.

Token time spans: the i-th audio token of a scale with audio rate ``r`` pools encoder frames ``[i*r, (i+1)*r)``
(audio frames last ``audio_frame_s``, 20 ms for Whisper); the same for video with ``video_frame_s`` (40 ms at
25 fps). ``pooling_map`` turns two rates into "which fine tokens does a coarse token pool".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mome.scales import Scale

FORMAT = "mome-routing-trace"
VERSION = 1
ROLES: Tuple[str, ...] = ("audio", "video", "boundary", "instruction", "transcript", "pad")
ROLE_CODE: Dict[str, int] = {r: i for i, r in enumerate(ROLES)}
# Groups of roles that statistics are split by. "all" is every token except padding.
MODALITY_GROUPS: Dict[str, Tuple[str, ...]] = {
    "audio": ("audio",),
    "video": ("video",),
    "text": ("boundary", "instruction", "transcript"),
    "all": ("audio", "video", "boundary", "instruction", "transcript"),
}
AUDIO_FRAME_S = 0.02  # Whisper encoder: 50 frames per second
VIDEO_FRAME_S = 0.04  # 25 fps

_ARRAYS = ("record_offsets", "record_scale", "roles", "positions", "topk_ids", "topk_gates", "probs")


class TraceError(ValueError):
    """A routing trace is malformed or used wrongly; the message names the file or record."""


@dataclass
class RoutingRecord:
    """The routing of one utterance at one scale. Arrays are token-major: ``topk_ids[t, l, k]``."""

    utterance_id: str
    scale: Scale
    roles: np.ndarray  # uint8 [T]
    positions: np.ndarray  # int32 [T]
    topk_ids: np.ndarray  # int16 [T, L, K]
    topk_gates: np.ndarray  # float [T, L, K]
    probs: Optional[np.ndarray] = None  # float [T, L, E]

    @property
    def num_tokens(self) -> int:
        return int(self.roles.shape[0])

    def mask(self, group: str) -> np.ndarray:
        """Boolean [T] mask of the tokens in a modality group (``MODALITY_GROUPS``) or a single role."""
        names = MODALITY_GROUPS.get(group) or ((group,) if group in ROLE_CODE else None)
        if names is None:
            raise TraceError(f"unknown token group '{group}'; choose from {', '.join([*MODALITY_GROUPS, *ROLES])}")
        return np.isin(self.roles, [ROLE_CODE[n] for n in names])

    def rate(self, modality: str) -> Optional[int]:
        """The compression rate of ``audio`` or ``video`` tokens in this record (None if the scale has none)."""
        if modality == "audio":
            return self.scale.audio_rate
        if modality == "video":
            return self.scale.video_rate
        raise TraceError(f"rate(): modality must be audio or video, got '{modality}'")


def pooling_map(coarse_rate: int, fine_rate: int, n_coarse: int, n_fine: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which fine tokens each coarse token pools, by overlap of their time spans.

    Token ``i`` at rate ``r`` covers encoder frames ``[i*r, (i+1)*r)``. Returns COO arrays ``(coarse, fine,
    weight)``: one entry per overlapping (coarse, fine) pair with ``fine < n_fine``, ``weight`` = overlap in
    frames divided by the coarse token's total overlap with existing fine tokens (so each coarse token's weights
    sum to 1). When the rates divide (e.g. 16 and 4) coarse token ``i`` pools exactly fine tokens
    ``[i*rc/rf, (i+1)*rc/rf)`` with equal weights; otherwise (e.g. 5 and 2) boundary tokens count by overlap.
    Coarse tokens with no fine token in range get no entry.
    """
    if coarse_rate < 1 or fine_rate < 1:
        raise TraceError(f"pooling_map: rates must be positive, got {coarse_rate} and {fine_rate}")
    if n_coarse <= 0 or n_fine <= 0:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), np.zeros(0, np.float64)
    ci = np.arange(n_coarse, dtype=np.int64)
    start, end = ci * coarse_rate, (ci + 1) * coarse_rate
    first = start // fine_rate
    span = -(-coarse_rate // fine_rate) + 1  # enough candidates to cover any alignment
    cand_c = np.repeat(ci, span)
    cand_f = (first[:, None] + np.arange(span)[None, :]).reshape(-1)
    f_start, f_end = cand_f * fine_rate, (cand_f + 1) * fine_rate
    overlap = np.minimum(np.repeat(end, span), f_end) - np.maximum(np.repeat(start, span), f_start)
    keep = (overlap > 0) & (cand_f < n_fine)
    c, f, w = cand_c[keep], cand_f[keep], overlap[keep].astype(np.float64)
    totals = np.bincount(c, weights=w, minlength=n_coarse)
    return c, f, w / totals[c]


def time_spans(n_tokens: int, rate: int, frame_s: float) -> np.ndarray:
    """[n, 2] start/end seconds of tokens pooled at ``rate`` from frames of ``frame_s`` seconds."""
    i = np.arange(n_tokens, dtype=np.float64)
    return np.stack([i * rate * frame_s, (i + 1) * rate * frame_s], axis=1)


def _scale_to_json(s: Scale) -> dict:
    return {"name": s.name, "task": s.task, "audio_rate": s.audio_rate, "video_rate": s.video_rate}


def _scale_from_json(d: dict) -> Scale:
    return Scale(d["task"], d.get("audio_rate"), d.get("video_rate"))


# ----------------------------------------------------------------------------------------------------------------
# writing


class TraceWriter:
    """Streams routing records into shards of about ``utterances_per_shard`` utterances plus ``index.json``.

    ``add`` buffers records in any order; ``end_batch()`` says "every scale of the utterances added so far is in"
    and closes the shard once it holds ``utterances_per_shard`` utterances or more (call it after each batch; a
    shard never splits an utterance's records). An utterance seen again after its shard closed is an error.
    ``index.json`` is rewritten after each shard (with ``"complete": false``) and finally by ``close()``, so an
    interrupted run leaves a readable partial trace.

    ``scales`` is the model's scale list (``mome.scales.all_scales``): record scale ids index it. ``layers`` are
    the LLM layer indices the arrays' L axis holds. ``meta`` is free JSON (checkpoint, split, SNR, ...).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        scales: Sequence[Scale],
        layers: Sequence[int],
        num_experts: int,
        top_k: int,
        with_probs: bool = True,
        utterances_per_shard: int = 64,
        float_dtype: str = "float16",
        audio_frame_s: float = AUDIO_FRAME_S,
        video_frame_s: float = VIDEO_FRAME_S,
        meta: Optional[dict] = None,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        if (self.path / "index.json").exists() and not overwrite:
            raise TraceError(f"{self.path}: a trace already exists here (pass overwrite=True to replace it)")
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for old in self.path.glob("shard-*.safetensors"):
                old.unlink()
        if utterances_per_shard < 1:
            raise TraceError(f"utterances_per_shard must be >= 1, got {utterances_per_shard}")
        if float_dtype not in ("float16", "float32"):
            raise TraceError(f"float_dtype must be float16 or float32, got '{float_dtype}'")
        self.scales = list(scales)
        self.layers = [int(x) for x in layers]
        self.num_experts, self.top_k = int(num_experts), int(top_k)
        self.with_probs = with_probs
        self.utterances_per_shard = utterances_per_shard
        self.float_dtype = np.dtype(float_dtype)
        self.header = {
            "format": FORMAT,
            "version": VERSION,
            "roles": list(ROLES),
            "scales": [_scale_to_json(s) for s in self.scales],
            "layers": self.layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "has_probs": bool(with_probs),
            "float_dtype": float_dtype,
            "audio_frame_s": audio_frame_s,
            "video_frame_s": video_frame_s,
            "meta": meta or {},
        }
        self.shards: List[dict] = []
        self._written_utts: set = set()
        self._buf: List[Tuple[str, int, dict]] = []
        self._buf_utts: Dict[str, None] = {}
        self._closed = False

    # -- adding ---------------------------------------------------------------------------------------------------
    def add(
        self,
        utterance_id: str,
        scale: Scale | int | str,
        roles: np.ndarray,
        positions: np.ndarray,
        topk_ids: np.ndarray,
        topk_gates: np.ndarray,
        probs: Optional[np.ndarray] = None,
    ) -> None:
        """Add one record. ``roles`` are codes (``ROLE_CODE``) or role names; arrays as in the module docstring."""
        if self._closed:
            raise TraceError(f"{self.path}: add() after close()")
        sid = self._scale_id(scale)
        utt = str(utterance_id)
        if utt in self._written_utts:
            raise TraceError(
                f"{self.path}: utterance '{utt}' is already in a closed shard; add every scale of an utterance "
                "before calling end_batch()"
            )
        arrays = self._check(utt, roles, positions, topk_ids, topk_gates, probs)
        self._buf.append((utt, sid, arrays))
        self._buf_utts[utt] = None

    def end_batch(self) -> None:
        """Close the current shard if it holds ``utterances_per_shard`` utterances or more."""
        if len(self._buf_utts) >= self.utterances_per_shard:
            self._flush()

    def add_record(self, rec: RoutingRecord) -> None:
        self.add(rec.utterance_id, rec.scale, rec.roles, rec.positions, rec.topk_ids, rec.topk_gates, rec.probs)

    def _scale_id(self, scale) -> int:
        if isinstance(scale, (int, np.integer)):
            if not 0 <= int(scale) < len(self.scales):
                raise TraceError(f"{self.path}: scale id {scale} out of range (the trace has {len(self.scales)} scales)")
            return int(scale)
        s = Scale.parse(scale) if isinstance(scale, str) else scale
        if s not in self.scales:
            raise TraceError(f"{self.path}: scale '{s}' is not one of {', '.join(map(str, self.scales))}")
        return self.scales.index(s)

    def _check(self, utt, roles, positions, topk_ids, topk_gates, probs) -> dict:
        where = f"{self.path}: record '{utt}'"
        roles = np.asarray(roles)
        if roles.dtype.kind in "US":
            bad = sorted({str(r) for r in roles.tolist() if r not in ROLE_CODE})
            if bad:
                raise TraceError(f"{where}: unknown roles {bad}; roles are {', '.join(ROLES)}")
            roles = np.array([ROLE_CODE[r] for r in roles.tolist()], dtype=np.uint8)
        elif roles.size and (roles.min() < 0 or roles.max() >= len(ROLES)):
            raise TraceError(f"{where}: role codes must be in [0, {len(ROLES)})")
        T, L, K = roles.shape[0], len(self.layers), self.top_k
        positions = np.asarray(positions)
        topk_ids, topk_gates = np.asarray(topk_ids), np.asarray(topk_gates)
        if positions.shape != (T,):
            raise TraceError(f"{where}: positions has shape {positions.shape}, expected ({T},)")
        if T > 1 and np.any(np.diff(positions) <= 0):
            raise TraceError(f"{where}: positions must be strictly increasing")
        if topk_ids.shape != (T, L, K) or topk_gates.shape != (T, L, K):
            raise TraceError(
                f"{where}: topk_ids {topk_ids.shape} / topk_gates {topk_gates.shape}, expected ({T}, {L}, {K}) "
                "as [tokens, layers, top_k]"
            )
        if topk_ids.size and (topk_ids.min() < -1 or topk_ids.max() >= self.num_experts):
            raise TraceError(f"{where}: expert ids must be in [-1, {self.num_experts})")
        out = {
            "roles": roles.astype(np.uint8),
            "positions": positions.astype(np.int32),
            "topk_ids": topk_ids.astype(np.int16),
            "topk_gates": topk_gates.astype(self.float_dtype),
        }
        if self.with_probs:
            if probs is None:
                raise TraceError(f"{where}: this trace stores router probabilities but none were given")
            probs = np.asarray(probs)
            if probs.shape != (T, L, self.num_experts):
                raise TraceError(f"{where}: probs has shape {probs.shape}, expected ({T}, {L}, {self.num_experts})")
            out["probs"] = probs.astype(self.float_dtype)
        return out

    # -- shards ---------------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._buf:
            return
        from safetensors.numpy import save_file

        name = f"shard-{len(self.shards):05d}.safetensors"
        lengths = [a["roles"].shape[0] for _, _, a in self._buf]
        tensors = {
            "record_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "record_scale": np.array([sid for _, sid, _ in self._buf], dtype=np.int32),
        }
        for key in ("roles", "positions", "topk_ids", "topk_gates") + (("probs",) if self.with_probs else ()):
            tensors[key] = np.ascontiguousarray(np.concatenate([a[key] for _, _, a in self._buf], axis=0))
        utt_ids = [u for u, _, _ in self._buf]
        tmp = self.path / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"utterance_ids": json.dumps(utt_ids)})
        os.replace(tmp, self.path / name)
        self.shards.append(
            {"file": name, "records": len(utt_ids), "tokens": int(sum(lengths)), "utterances": list(self._buf_utts)}
        )
        self._written_utts.update(self._buf_utts)
        self._buf, self._buf_utts = [], {}
        self._write_index(complete=False)

    def _write_index(self, complete: bool) -> None:
        index = dict(self.header)
        index.update(
            complete=complete,
            num_records=sum(s["records"] for s in self.shards),
            num_tokens=sum(s["tokens"] for s in self.shards),
            num_utterances=sum(len(s["utterances"]) for s in self.shards),
            shards=self.shards,
        )
        tmp = self.path / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.path / "index.json")

    def close(self) -> Path:
        """Write the last shard and the final index. Returns the trace folder."""
        if not self._closed:
            self._flush()
            self._write_index(complete=True)
            self._closed = True
        return self.path

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was written, marked incomplete
            self._flush()


# ----------------------------------------------------------------------------------------------------------------
# reading


class TraceShard:
    """One shard, opened lazily: arrays are read from disk on first use."""

    def __init__(self, reader: "TraceReader", entry: dict):
        self.reader, self.entry = reader, entry
        self.file = reader.path / entry["file"]
        if not self.file.is_file():
            raise TraceError(f"{self.file}: shard listed in index.json is missing")
        self._cache: Dict[str, np.ndarray] = {}
        self._utts: Optional[List[str]] = None

    def _open(self):
        from safetensors import safe_open

        try:
            return safe_open(str(self.file), framework="np")
        except Exception as exc:
            raise TraceError(f"{self.file}: cannot read shard: {exc}") from None

    def array(self, name: str) -> np.ndarray:
        if name not in _ARRAYS:
            raise TraceError(f"unknown trace array '{name}'; arrays are {', '.join(_ARRAYS)}")
        if name not in self._cache:
            with self._open() as f:
                if name not in f.keys():
                    raise TraceError(f"{self.file}: shard has no array '{name}'")
                self._cache[name] = f.get_tensor(name)
        return self._cache[name]

    @property
    def utterance_ids(self) -> List[str]:
        """Utterance id of each record, in record order."""
        if self._utts is None:
            with self._open() as f:
                meta = f.metadata() or {}
            if "utterance_ids" not in meta:
                raise TraceError(f"{self.file}: shard metadata lacks 'utterance_ids'")
            self._utts = json.loads(meta["utterance_ids"])
        return self._utts

    def __len__(self) -> int:
        return int(self.entry["records"])

    def record(self, r: int, with_probs: bool = True) -> RoutingRecord:
        off = self.array("record_offsets")
        a, b = int(off[r]), int(off[r + 1])
        probs = self.array("probs")[a:b] if (with_probs and self.reader.has_probs) else None
        return RoutingRecord(
            utterance_id=self.utterance_ids[r],
            scale=self.reader.scales[int(self.array("record_scale")[r])],
            roles=self.array("roles")[a:b],
            positions=self.array("positions")[a:b],
            topk_ids=self.array("topk_ids")[a:b],
            topk_gates=self.array("topk_gates")[a:b],
            probs=probs,
        )

    def records(self, with_probs: bool = True) -> Iterator[RoutingRecord]:
        for r in range(len(self)):
            yield self.record(r, with_probs)

    def by_utterance(self, with_probs: bool = True) -> Dict[str, Dict[str, RoutingRecord]]:
        """``{utterance_id: {scale_name: record}}`` for this shard."""
        out: Dict[str, Dict[str, RoutingRecord]] = {}
        for rec in self.records(with_probs):
            out.setdefault(rec.utterance_id, {})[rec.scale.name] = rec
        return out


class TraceReader:
    """Reads a trace folder written by ``TraceWriter``; shards load only when iterated."""

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False):
        self.path = Path(path)
        idx = self.path / "index.json"
        if not idx.is_file():
            raise TraceError(f"{idx}: not found; is {self.path} a routing trace folder?")
        try:
            self.index = json.loads(idx.read_text())
        except json.JSONDecodeError as exc:
            raise TraceError(f"{idx}: not valid JSON: {exc}") from None
        if self.index.get("format") != FORMAT:
            raise TraceError(f"{idx}: format is '{self.index.get('format')}', expected '{FORMAT}'")
        if self.index.get("version") != VERSION:
            raise TraceError(f"{idx}: version {self.index.get('version')} is not supported (expected {VERSION})")
        if self.index.get("roles") != list(ROLES):
            raise TraceError(f"{idx}: role list {self.index.get('roles')} differs from {list(ROLES)}")
        if not self.index.get("complete") and not allow_incomplete:
            raise TraceError(f"{idx}: the trace is incomplete (the writer did not close); pass allow_incomplete=True")
        self.scales: List[Scale] = [_scale_from_json(s) for s in self.index["scales"]]
        self.layers: List[int] = list(self.index["layers"])
        self.num_experts: int = int(self.index["num_experts"])
        self.top_k: int = int(self.index["top_k"])
        self.has_probs: bool = bool(self.index["has_probs"])
        self.meta: dict = self.index.get("meta", {})
        self.audio_frame_s: float = float(self.index.get("audio_frame_s", AUDIO_FRAME_S))
        self.video_frame_s: float = float(self.index.get("video_frame_s", VIDEO_FRAME_S))
        self._utt_shard = {u: i for i, s in enumerate(self.index["shards"]) for u in s["utterances"]}

    @property
    def scale_names(self) -> List[str]:
        return [s.name for s in self.scales]

    @property
    def recorded_scales(self) -> List[Scale]:
        """Scales that have at least one record (in model order)."""
        used = set()
        for sh in self.shards():
            used.update(int(i) for i in np.unique(sh.array("record_scale")))
        return [s for i, s in enumerate(self.scales) if i in used]

    @property
    def num_records(self) -> int:
        return int(self.index.get("num_records", 0))

    @property
    def num_tokens(self) -> int:
        return int(self.index.get("num_tokens", 0))

    @property
    def utterance_ids(self) -> List[str]:
        return list(self._utt_shard)

    def shards(self) -> Iterator[TraceShard]:
        for entry in self.index["shards"]:
            yield TraceShard(self, entry)

    def records(self, with_probs: bool = True) -> Iterator[RoutingRecord]:
        for sh in self.shards():
            yield from sh.records(with_probs)

    __iter__ = records

    def utterances(self, with_probs: bool = True) -> Iterator[Tuple[str, Dict[str, RoutingRecord]]]:
        """``(utterance_id, {scale_name: record})`` for each utterance, shard by shard."""
        for sh in self.shards():
            yield from sh.by_utterance(with_probs).items()

    def utterance(self, utterance_id: str, with_probs: bool = True) -> Dict[str, RoutingRecord]:
        if utterance_id not in self._utt_shard:
            raise TraceError(f"{self.path}: no utterance '{utterance_id}' in the trace")
        sh = TraceShard(self, self.index["shards"][self._utt_shard[utterance_id]])
        return sh.by_utterance(with_probs)[utterance_id]
