"""Files as a user is handed them: a fairseq AV-HuBERT checkpoint with the layout of ``large_vox_iter5.pt`` (pickled
omegaconf ``cfg`` with fairseq enums and config dataclasses, optimizer history, meters, numpy scalars) and harmless
proof-of-concept payloads: pickles whose load would create a marker file.

The fairseq / AV-HuBERT classes are defined in throw-away modules registered under their real names only while the
file is written, so the pickle names ``fairseq.*`` and ``avhubert.*`` globals exactly as a real checkpoint does; they
are removed again before anything is read back.
"""

import dataclasses
import enum
import os
import pickle
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

FAKE_MODULES = ("fairseq", "fairseq.dataclass", "fairseq.dataclass.constants", "fairseq.logging",
                "fairseq.logging.meters", "avhubert", "avhubert.hubert")


@contextmanager
def fairseq_classes():
    """Stand-ins for the fairseq / AV-HuBERT classes a checkpoint's pickle names; unregistered on exit."""
    mods = {name: types.ModuleType(name) for name in FAKE_MODULES}

    class StrEnum(str, enum.Enum):  # fairseq.dataclass.constants.StrEnum / ChoiceEnum
        pass

    class Choices(StrEnum):
        default = "default"
        layer_norm = "layer_norm"

    class AverageMeter:  # fairseq.logging.meters.AverageMeter, pickled through __getstate__
        def __init__(self):
            self.val, self.sum, self.count = 1.0, 10.0, 10

        def __getstate__(self):
            return {"val": self.val, "sum": self.sum, "count": self.count, "round": 3}

    @dataclasses.dataclass
    class AVHubertConfig:  # avhubert.hubert.AVHubertConfig (the fields read on load, and a few others)
        _name: str = "av_hubert"
        label_rate: int = 25
        input_modality: str = "image"
        extractor_mode: Choices = Choices.default
        encoder_layers: int = 24
        encoder_embed_dim: int = 1024
        encoder_ffn_embed_dim: int = 4096
        encoder_attention_heads: int = 16
        layer_norm_first: bool = True
        modality_fuse: str = "concat"
        resnet_relu_type: str = "prelu"
        sub_encoder_layers: int = 0
        audio_feat_dim: int = 104
        dropout: float = 0.1
        conv_pos: int = 128

    for cls, mod in ((StrEnum, "fairseq.dataclass.constants"), (Choices, "fairseq.dataclass.constants"),
                     (AverageMeter, "fairseq.logging.meters"), (AVHubertConfig, "avhubert.hubert")):
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    saved = {n: sys.modules.get(n) for n in FAKE_MODULES}
    sys.modules.update(mods)
    try:
        yield types.SimpleNamespace(Choices=Choices, AverageMeter=AverageMeter, AVHubertConfig=AVHubertConfig)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def write_fairseq_checkpoint(path: Path, state_dict: Mapping[str, torch.Tensor], layers: int, dim: int, ffn: int,
                             heads: int, extra: Mapping = ()) -> Path:
    """``torch.save`` a dict shaped like ``large_vox_iter5.pt``: ``model`` (OrderedDict of tensors), ``cfg`` (an
    omegaconf DictConfig holding the structured model config), ``args=None``, ``optimizer_history``,
    ``extra_state`` (meters, numpy scalars) and ``last_optimizer_state``."""
    from omegaconf import OmegaConf

    with fairseq_classes() as fs:
        model_cfg = OmegaConf.structured(fs.AVHubertConfig(encoder_layers=layers, encoder_embed_dim=dim,
                                                           encoder_ffn_embed_dim=ffn, encoder_attention_heads=heads))
        cfg = OmegaConf.create({"_name": None, "common": {"fp16": True, "log_interval": 200, "seed": 1337},
                                "task": {"_name": "av_hubert_pretraining", "labels": ["km"], "max_sample_size": 500},
                                "optimization": {"max_update": 800000, "lr": [0.002]}})
        cfg.model = model_cfg
        first = next(iter(state_dict.values()))
        ckpt = {
            "args": None,
            "cfg": cfg,
            "model": OrderedDict(state_dict),
            "criterion": None,
            "optimizer_history": [{"criterion_name": "AVHubertCriterion", "optimizer_name": "FairseqAdam",
                                   "lr_scheduler_state": {"best": None}, "num_updates": 800000}],
            "task_state": {},
            "extra_state": {"epoch": 120, "previous_training_time": 1.5e6, "val_loss": np.float64(3.25),
                            "train_iterator": {"epoch": 120, "iterations_in_epoch": 0, "shuffle": True},
                            "metrics": {"train": [("loss", fs.AverageMeter(), 0)]}},
            "last_optimizer_state": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros_like(first)}},
                                     "param_groups": [{"lr": 0.002, "betas": (0.9, 0.98), "params": [0]}]},
            **dict(extra),
        }
        torch.save(ckpt, path)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# proof-of-concept payloads


class WritesMarker:
    """Unpickling this object runs ``exec`` of code that creates ``marker``: a plain (unrestricted) load would."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class SystemMarker(WritesMarker):
    """The same through ``os.system`` (``posix.system`` in the pickle)."""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_fairseq_checkpoint(path: Path, marker: Path, state_dict: Mapping[str, torch.Tensor], layers: int, dim: int,
                            ffn: int, heads: int, payload=WritesMarker) -> Path:
    """A real-looking AV-HuBERT checkpoint with a payload hidden in ``extra_state``."""
    return write_fairseq_checkpoint(path, state_dict, layers, dim, ffn, heads,
                                    extra={"extra_state": {"epoch": 1, "hook": payload(marker)}})


def evil_pickle(path: Path, marker: Path, payload=WritesMarker) -> Path:
    """A bare pickle (any ``*.pkl`` / ``*.bin`` / ``*.pt`` state file) whose load would create ``marker``."""
    Path(path).write_bytes(pickle.dumps({"state": payload(marker)}))
    return Path(path)


def evil_torch_file(path: Path, marker: Path, payload=WritesMarker) -> Path:
    """A ``torch.save`` zip file (optimizer.bin, DeepSpeed ``*_states.pt``) whose load would create ``marker``."""
    torch.save({"state": {0: {"exp_avg": torch.zeros(2)}}, "hook": payload(marker)}, path)
    return Path(path)
