"""MoME: Mixture of Matryoshka Experts for audio-visual speech recognition with a frozen LLM."""

__version__ = "0.1.0"
