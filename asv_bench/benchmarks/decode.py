"""Decode: one (or a few) new query tokens against S cached keys, D64: memory-bound.

The split-K decode kernel is judged by how much of the machine's read bandwidth it reaches on the
K and V it must read (``Case.kv_bytes``); ``track_bandwidth_share`` divides by a parallel sum over
a large array measured in the same run (``bench.read_bandwidth``).
"""

import dataclasses

import numba

from .common import DTYPES, IMPLS, THREADS, bench, by_shape, check_threads, max_abs_error, measure, prepare

#: the shapes, from numba_attn.bench.CASES (parameter value: ``Case.shape``): the S × H grid of ``Decode``,
#: the extra shapes of ``DecodeShapes`` (4 query tokens, GQA 64/8), and those whose bandwidth is tracked
GRID = by_shape("asv decode")
EXTRA = by_shape("asv decode shapes")
SHAPES = by_shape("asv bandwidth")


class Decode:
    """B1 L1 D64: one new token over S ∈ {1024, 4096, 16384} keys in each of H ∈ {8, 32} heads."""

    params = [IMPLS, list(GRID), DTYPES, THREADS]
    param_names = ["impl", "shape", "dtype", "threads"]

    def setup(self, impl, shape, dtype, threads):
        self.fn = prepare(impl, dataclasses.replace(GRID[shape], dtype=dtype), threads)

    def time_decode(self, *params):
        self.fn()


class DecodeShapes:
    """Four query tokens (speculative decoding, a short chunk), and grouped-query attention 64/8."""

    params = [IMPLS, list(EXTRA), THREADS]
    param_names = ["impl", "shape", "threads"]

    def setup(self, impl, shape, threads):
        self.fn = prepare(impl, EXTRA[shape], threads)

    def time_decode(self, *params):
        self.fn()


class DecodeBandwidth:
    """numba_attn's decode throughput in GB/s of K and V read, alone and as a share of the
    machine's read bandwidth (parallel sum over 256 MiB, same thread count, measured once)."""

    params = [list(SHAPES), THREADS]
    param_names = ["shape", "threads"]

    def setup_cache(self):
        pool = numba.config.NUMBA_NUM_THREADS
        return {t: bench.read_bandwidth(t, nbytes=256 << 20) for t in THREADS if t <= pool}

    def setup(self, read_gbs, shape, threads):
        check_threads(threads)
        self.case = SHAPES[shape]
        self.fn = prepare("numba_attn", self.case, threads)

    def track_bandwidth(self, read_gbs, shape, threads):
        return self.case.kv_bytes / measure(self.fn) / 1e9

    track_bandwidth.unit = "GB/s"

    def track_bandwidth_share(self, read_gbs, shape, threads):
        return self.track_bandwidth(read_gbs, shape, threads) / read_gbs[threads]

    track_bandwidth_share.unit = "kernel GB/s / read GB/s"


class DecodeAccuracy:
    """Largest |numba_attn − float64 reference| of the output (inputs ~ N(0, 1))."""

    params = [list(SHAPES), ["float32", "float64"]]
    param_names = ["shape", "dtype"]
    unit = "max abs error"

    def setup(self, shape, dtype):
        self.case = dataclasses.replace(SHAPES[shape], dtype=dtype)

    def track_max_abs_error(self, *params):
        return max_abs_error(self.case)
