"""Evaluation: WER/CER per scale and SNR, the pretrained-Whisper judge, elastic-inference cost, tables and plots.

Entry point: ``python evaluate.py --checkpoint RUN_OR_CKPT`` (see ``mome.evaluation.run``).
Modules: ``decode`` (batched decoding of a split at a scale and SNR; scored with ``mome.metrics.wer``),
``judge`` (pretrained Whisper transcribing the same audio), ``cost`` (tokens, FLOPs, latency per scale),
``tables`` (results.json, Markdown, CSV) and ``plots`` (PNG).
"""
