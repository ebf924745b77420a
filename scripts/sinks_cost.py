"""What learned attention sinks (``sinks=``) cost: the calls of asv's ``sinks`` module with and without
sinks, alternately in one process (9 rounds of each), median and minimum per call.

    python scripts/sinks_cost.py          # run it on a quiet machine; it prints one line per shape
"""

import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "asv_bench"))

from benchmarks.sinks import SHAPES, _make

from numba_attn import bench


def main():
    for shape in SHAPES:
        run = _make(shape)
        with_sinks, without = [], []
        timing = dict(min_repeat=20, max_repeat=400, budget=0.2)
        for _ in range(9):
            with_sinks.append(bench.median_seconds(functools.partial(run, True), **timing))
            without.append(bench.median_seconds(functools.partial(run, False), **timing))
        a, b = np.median(with_sinks) * 1e6, np.median(without) * 1e6
        print(
            f"{shape:40s} with sinks {a:9.1f} µs  without {b:9.1f} µs  ratio {a / b:.3f}  "
            f"(minima {min(with_sinks) * 1e6:.1f} / {min(without) * 1e6:.1f} µs)"
        )


if __name__ == "__main__":
    main()
