"""Experiments that train and evaluate several methods with the same code, data and budget.

``python -m mome.experiments.compare --config configs/compare_demo.yaml [--quick] [--out DIR] [--report-only]``
reproduces the shape of the MoME paper's comparisons on the embedded corpus (issue 16). Modules:

* ``spec``: the comparison's plan, read from a compare YAML: methods, seeds, the config of every run;
* ``compare``: the command line and the orchestration (train, evaluate, judge, greedy vs beam, routing), resumable;
* ``collect``: everything the stages wrote, gathered into ``<out>/results.json``;
* ``routing``: expert-usage analysis of the trained MoME, its step-0 weights and the per-scale-router ablation;
* ``report``: seed aggregation, the tables, the verdict per claim and the results page, from ``results.json`` alone;
* ``plots``: WER against tokens per second, WER against SNR, routing divergence;
* ``estimate``: the time a comparison should take on 2 CPU cores, from measured per-step and per-utterance costs.
"""
