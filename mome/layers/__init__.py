"""MoME building blocks: router (``router``), stacked experts with compute backends (``experts``), auxiliary losses
(``losses``) and the per-layer module combining them (``layer``). Placement in an LLM: ``mome.adapters``."""
from .experts import BACKENDS, MoMEExperts, experts_forward, resolve_backend
from .layer import MoMELayer
from .router import Router, RouterOutput

__all__ = ["BACKENDS", "MoMEExperts", "MoMELayer", "Router", "RouterOutput", "experts_forward", "resolve_backend"]
