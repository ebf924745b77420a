"""Packed batch vs padded batch: numba_attn's varlen kernel, numba_attn on the padded batch with a key
padding mask, and torch's 4-D SDPA on the padded batch with the same mask, side by side.

    python scripts/varlen_bench.py [--threads N] [--budget SECONDS]

The cases are ``numba_attn.bench.VARLEN_CASES`` (32 sentences, lengths uniform in 8-128 from a fixed
seed, H12 D32 as MiniLM), timed with ``bench.run_cases`` (each library in two passes, median). Prints
the load average before and after: numbers from a busy machine are not worth comparing.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from numba_attn import bench  # after the path: the checkout's numba_attn, not an installed one


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="threads for every implementation (default: all)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per implementation and case")
    args = ap.parse_args(argv)
    bench.preload_baselines()  # torch before numba's thread pool starts
    import numba

    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    load_before = os.getloadavg()[0]
    results = bench.run_cases(bench.VARLEN_CASES, threads, bench.VARLEN_IMPLEMENTATIONS, budget=args.budget)
    load_after = os.getloadavg()[0]
    names = [impl.name for impl in bench.VARLEN_IMPLEMENTATIONS]
    print(f"threads {threads}; load average (1 min) {load_before:.2f} before, {load_after:.2f} after")
    print(f"{'case':<44}" + "".join(f"{n:>20}" for n in names) + f"{'× padded':>10}{'× torch':>9}")
    for case in bench.VARLEN_CASES:
        row = f"{case.name + ' [' + case.shape + ']':<44}"
        for n in names:
            t = results[case, n]
            row += f"{t * 1e3:>17.2f} ms" if isinstance(t, float) else f"{'n/a':>20}"
        ours = results[case, names[0]]
        for other in names[1:]:
            t = results[case, other]
            row += f"{t / ours:>9.2f}×" if isinstance(t, float) else f"{'n/a':>10}"
        print(row)
        lengths = case.lengths
        useful = case.flops / ours / 1e9
        print(f"    lengths {lengths.min()}-{lengths.max()}, mean {lengths.mean():.1f}; varlen: {useful:.0f} GFLOP/s")
    return results


if __name__ == "__main__":
    main()
