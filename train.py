"""Train a model described by a config (single process, DDP or DeepSpeed through Accelerate).

    python train.py --config configs/demo.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml train.py --config configs/demo.yaml
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml train.py --config configs/demo.yaml

The run folder is ``<output_dir>/<run_name>`` (config.yaml, metrics.jsonl, checkpoints/, loss_curve.png).
``train.resume=auto`` continues from the newest complete checkpoint. Exit status 143 after SIGTERM (a checkpoint was
saved), 1 after too many consecutive non-finite steps.
"""
from mome.config import config_argparser, config_from_args


def main(argv=None):
    parser = config_argparser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    from mome.data.noise import NoiseFileError, check_noise_file

    try:  # a missing noise recording is a one-line error now, not a traceback after the model has loaded
        check_noise_file(cfg)
    except NoiseFileError as exc:
        raise SystemExit(f"config error: {exc}") from None
    from mome.training.trainer import train

    train(cfg)


if __name__ == "__main__":
    main()
