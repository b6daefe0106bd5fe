"""``python -m mome.pretrained prepare [--cache-dir D] [--force] [NAME ...]`` and ``python -m mome.pretrained list``."""
from __future__ import annotations

import argparse
import sys
import time

from .registry import REGISTRY, models_dir, prepare


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mome.pretrained", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert the registry models into <cache>/models/ (skips finished ones)")
    p.add_argument("names", nargs="*", help=f"registry names (default: all of {', '.join(REGISTRY)})")
    p.add_argument("--cache-dir", default=None, help="default: $MOME_CACHE or ~/.cache/mome")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache is current")
    sub.add_parser("list", help="registry names and their sources")
    args = parser.parse_args(argv)

    if args.command == "list":
        for e in REGISTRY.values():
            print(f"{e.name:18s} {e.kind:8s} {e.description}")
        return 0
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; registry names: {sorted(REGISTRY)}")
    t0 = time.perf_counter()
    print(f"pretrained models in {models_dir(args.cache_dir)}", flush=True)
    for name in args.names or list(REGISTRY):
        r = prepare(name, args.cache_dir, force=args.force)
        what = "converted" if r.built else "already prepared"
        print(f"  {name:18s} {what:16s} {r.seconds:6.1f} s  {r.path}", flush=True)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
