"""``python -m numba_attn info | check | bench | warmup | tune``: what the JIT targets here, a self-test of every
kernel against the float64 reference, a side-by-side benchmark against the baselines, and compiling
every kernel once into the on-disk cache (``warmup --report``: with each kernel variant's compile time).

Only the command line lives here; the commands are ``info.run_info``, ``check.run_check``,
``bench.run_bench``, ``info.run_warmup`` and ``tune.run_tune``.
"""

import argparse
import sys

from . import bench, check, info, tune


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m numba_attn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, threading layer, CPU target, compile cache")
    c = sub.add_parser("check", help="run every kernel on random data against the float64 reference")
    c.add_argument("--quick", action="store_true", help="one case per kernel and precision")
    w = sub.add_parser("warmup", help="compile every kernel variant once (e.g. at install time) into the cache")
    w.add_argument("--report", action="store_true", help="then print each kernel variant's compile time")
    w.add_argument("--tune", action="store_true", help="first choose the register tile by measurement (see tune)")
    t = sub.add_parser("tune", help="time the register-tile shapes on this CPU and keep the fastest (about 30 s)")
    t.add_argument("--dry-run", action="store_true", help="time and print, store nothing")
    b = sub.add_parser("bench", help="time numba_attn against numpy, torch and onnxruntime (those installed)")
    b.add_argument("--quick", action="store_true", help="fewer, smaller cases and shorter timing")
    b.add_argument("--full", action="store_true", help="also the L = S = 4096 prefills")
    b.add_argument("--threads", type=int, default=None, help="threads for every implementation (default: all)")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="plot throughput against sequence length (needs matplotlib)")
    what = b.add_mutually_exclusive_group()
    what.add_argument(
        "--busy",
        action="store_true",
        help="decode, prefill and a SmolLM2 cache.attend step idle and beside neighbours it starts (a busy loop, "
        "BLAS, numba), ours and torch side by side",
    )
    what.add_argument(
        "--layer",
        action="store_true",
        help="a SmolLM2-shaped attention layer decode step (float32/float16/int8 cache and weights), split into "
        "projections, attention and the rest, against the old float32 path and torch; call overhead; appends",
    )
    args = parser.parse_args(argv)
    if args.command == "bench" and (args.busy or args.layer) and (args.full or args.plot):
        parser.error("--full and --plot belong to the main table, not to --busy or --layer")
    if args.command == "info":
        return info.run_info()
    if args.command == "tune":
        return tune.run_tune(write=not args.dry_run)
    if args.command == "warmup" and args.tune:
        return tune.run_tune_then_warmup()
    if args.command == "warmup":
        return info.run_warmup(report=args.report)
    if args.command == "bench" and args.busy:
        return bench.run_busy(args.quick, args.threads, args.json)
    if args.command == "bench" and args.layer:
        return bench.run_layer(args.quick, args.threads, args.json)
    if args.command == "bench":
        return bench.run_bench(args.quick, args.threads, args.json, args.plot, args.full)
    return check.run_check(quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
