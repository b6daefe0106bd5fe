"""Can each word of a synthetic sentence be read from the frozen audio encoder's features?

    python -m analysis.feature_probe --config configs/demo.yaml --out runs/probe.json
    python -m analysis.feature_probe --config configs/demo.yaml --rate 16 model.audio_encoder.pad_to_30s=true

A check on the encoder, apart from the LLM: the training clips of the synthetic corpus (``data.dataset=synth``) go
through the frozen audio encoder (``model.audio_encoder``, the raw waveform, no training transforms), are average-
pooled at ``--rate`` as the model's compression does, and a small probe learns to name the word in every slot of
the grammar (``mome.data.grammar.SLOTS``; a slot a sentence lacks is the class "absent"). Per slot it attends over
the pooled frames (a learned query over features plus a learned position table), then a linear layer picks the word.
Printed and written (``--out``, JSON): per slot the test accuracy, the train accuracy and the majority-class rate.
A slot the probe reads but the trained model does not shows where the model, not the encoder, is short.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ABSENT = "<absent>"


class SlotProbe(nn.Module):
    """One attention-pooled readout per slot over ``[B, T, D]`` frames."""

    def __init__(self, dim: int, max_len: int, classes: Sequence[int], hidden: int = 128, pos_dim: int = 32):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(max_len, pos_dim))
        self.proj = nn.Linear(dim + pos_dim, hidden)
        self.queries = nn.Parameter(torch.randn(len(classes), hidden) * 0.1)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> List[torch.Tensor]:
        pos = self.pos[: x.shape[1]].expand(x.shape[0], -1, -1)
        h = torch.tanh(self.proj(torch.cat([x, pos], dim=-1)))
        att = torch.einsum("btd,kd->bkt", h, self.queries).masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        pooled = torch.einsum("bkt,btd->bkd", att, h)
        return [head(pooled[:, k]) for k, head in enumerate(self.heads)]


def slot_classes(texts: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    """(the slots with a choice that ``texts`` use, per slot its classes) for sentences of the synthetic grammar."""
    from mome.data.grammar import SLOTS, slot_words

    parsed = [slot_words(t) for t in texts]
    slots = [s for s in SLOTS if len(SLOTS[s]) > 1 and any(s in p for p in parsed)]
    classes = [list(SLOTS[s]) + ([ABSENT] if any(s not in p for p in parsed) else []) for s in slots]
    return slots, classes


def slot_labels(texts: Sequence[str], slots: Sequence[str], classes: Sequence[Sequence[str]]) -> torch.Tensor:
    """[N, slots] class indices (``ABSENT`` where a sentence lacks the slot)."""
    from mome.data.grammar import slot_words

    parsed = [slot_words(t) for t in texts]
    return torch.tensor([[list(c).index(p.get(s, ABSENT)) for s, c in zip(slots, classes)] for p in parsed])


def pooled_features(encoder, paths: Sequence[Path], rate: int, batch: int = 8) -> List[torch.Tensor]:
    """Each clip's encoder output, average-pooled at ``rate`` ([T // rate, D], float32)."""
    from mome.data.media import read_audio
    from mome.models.compression import compress

    out: List[torch.Tensor] = []
    for i in range(0, len(paths), batch):
        waves = [torch.from_numpy(read_audio(p)) for p in paths[i: i + batch]]
        lengths = torch.tensor([len(w) for w in waves])
        audio = torch.zeros(len(waves), int(lengths.max()))
        for j, w in enumerate(waves):
            audio[j, : len(w)] = w
        feats, n = encoder(audio, lengths)
        tokens, m = compress(feats.float(), n, rate, "avgpool")
        out += [tokens[j, : int(m[j])] for j in range(len(waves))]
    return out


def _pad(seqs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(len(seqs), max(len(s) for s in seqs), seqs[0].shape[-1])
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, : len(s)], mask[i, : len(s)] = s, True
    return x, mask


def fit_probe(train: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], classes: Sequence[Sequence[str]],
              steps: int = 600, batch: int = 64, lr: float = 3e-3, seed: int = 0) -> SlotProbe:
    x, mask, y = train
    torch.manual_seed(seed)
    probe = SlotProbe(x.shape[-1], x.shape[1], [len(c) for c in classes])
    opt = torch.optim.AdamW(probe.parameters(), lr, weight_decay=0.01)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,))
        loss = sum(F.cross_entropy(o, y[idx, k]) for k, o in enumerate(probe(x[idx], mask[idx])))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe


@torch.no_grad()
def accuracy(probe: SlotProbe, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> List[float]:
    t = probe.pos.shape[0]  # a test clip longer than every training clip: cropped to the position table
    if x.shape[1] > t:
        x, mask = x[:, :t], mask[:, :t]
    return [float((o.argmax(-1) == y[:, k]).float().mean()) for k, o in enumerate(probe(x, mask))]


def run_probe(cfg, rate: int, steps: int = 600) -> Dict:
    from mome.config import cache_dir
    from mome.data.manifest import read_manifest
    from mome.data.synth import resolve_data_root
    from mome.models.encoders import WhisperAudioEncoder

    if cfg.data.dataset != "synth":
        raise ValueError(f"the feature probe needs the synthetic corpus (data.dataset=synth), got {cfg.data.dataset!r}")
    root = resolve_data_root(cfg)
    rows = {split: read_manifest(root / f"{split}.csv") for split in ("train", "test")}
    encoder = WhisperAudioEncoder.from_config(cfg.model.audio_encoder, cache_dir(cfg))
    t0 = time.time()
    feats = {s: pooled_features(encoder, [r.audio_path(root) for r in rs], rate) for s, rs in rows.items()}
    encode_s = time.time() - t0
    slots, classes = slot_classes([r.text for r in rows["train"] + rows["test"]])
    data = {split: (*_pad(feats[split]), slot_labels([r.text for r in rs], slots, classes))
            for split, rs in rows.items()}
    x, mask, _ = data["train"]
    mu = x[mask].mean(0)
    sd = x[mask].std(0) + 1e-5
    for split, (x, mask, y) in data.items():
        data[split] = (((x - mu) / sd) * mask[..., None], mask, y)
    probe = fit_probe(data["train"], classes, steps=steps)
    test, train = accuracy(probe, *data["test"]), accuracy(probe, *data["train"])
    majority = [float(torch.bincount(data["test"][2][:, k]).max() / len(data["test"][2])) for k in range(len(slots))]
    return {"rate": rate, "encoder": cfg.model.audio_encoder.name, "pad_to_30s": bool(cfg.model.audio_encoder.pad_to_30s),
            "train_clips": len(rows["train"]), "test_clips": len(rows["test"]), "probe_steps": steps,
            "encode_s": round(encode_s, 1),
            "slots": {s: {"test_acc": round(a, 4), "train_acc": round(b, 4), "majority": round(m, 4)}
                      for s, a, b, m in zip(slots, test, train, majority)}}


def main(argv=None) -> Dict:
    from mome.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--rate", type=int, default=4, help="average-pooling rate over the encoder's 50 Hz frames")
    ap.add_argument("--steps", type=int, default=600, help="probe training steps (batches of 64 clips)")
    ap.add_argument("--out", default="", help="JSON file for the result")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    result = run_probe(load_config(args.config, args.overrides), args.rate, args.steps)
    print(f"{'slot':<12}{'test acc':>10}{'train acc':>11}{'majority':>10}")
    for s, r in result["slots"].items():
        print(f"{s:<12}{r['test_acc']:>10.3f}{r['train_acc']:>11.3f}{r['majority']:>10.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
