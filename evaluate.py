"""Evaluate checkpoints: WER/CER per scale and SNR, the pretrained-Whisper judge, elastic-inference cost.

    python evaluate.py --checkpoint runs/demo [--checkpoint OTHER ...] [--label NAME ...] [--config FILE] [--out DIR]
                       [key=value ...]                     # e.g. eval.snrs=[clean,0] eval.scales=[avsr:4x2]

See mome/evaluation/run.py for the protocol and the files written.
"""
from mome.evaluation.run import main

if __name__ == "__main__":
    main()
