"""Metrics every part of the project scores with: word/character error rates (``wer``) and expert-load statistics
(``load``). Training (validation), evaluation and analysis import them from here; this package imports none of them."""
