"""``python -m mome.models describe --config configs/X.yaml [key=value ...] [--json FILE] [--format table|json|both]``"""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv=None) -> int:
    from mome.config import config_argparser, config_from_args
    from mome.models.describe import describe, format_table, to_json

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "describe":
        print(__doc__.strip(), file=sys.stderr)
        return 2
    parser = config_argparser("describe: total / trainable / active parameters per component (meta device)")
    parser.prog = "python -m mome.models describe"
    parser.add_argument("--format", choices=["table", "json", "both"], default="both")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv[1:])
    cfg = config_from_args(args)
    report = describe(cfg)
    if args.format in ("table", "both"):
        print(format_table(report))
    if args.format in ("json", "both"):
        print(to_json(report))
    if args.json_path:
        Path(args.json_path).write_text(to_json(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
