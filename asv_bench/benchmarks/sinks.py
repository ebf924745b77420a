"""Learned attention sinks (``sinks=``): what one logit per head costs a decode step and a prefill.

The kernels fold each head's sink into a finished row's running max and sum (``kernels._scores.add_sink``),
so the cost should be the per-call argument handling (check, conversion) and one exp per row. Compared
side by side in one process: the same call with and without ``sinks``.
"""

import numpy as np

import numba_attn

from .common import THREADS, bench, cached, check_threads

#: (B, H, H_kv, L, S, D): a split-K decode step, a SmolLM2-sized cached step (9 query heads over 3 KV heads,
#: 64 tokens), and a causal prefill
SHAPES = {
    "decode B1 H32 L1 S4096 D64": (1, 32, 32, 1, 4096, 64),
    "cache.attend B1 H9/3 L1 S64 D64": (1, 9, 3, 1, 64, 64),
    "prefill B1 H8 L512 S512 D64 causal": (1, 8, 8, 512, 512, 64),
}


def _make(shape):
    B, H, Hkv, L, S, D = SHAPES[shape]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, H, L, D), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, S, D), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, S, D), dtype=np.float32)
    sinks = rng.uniform(-1, 1, H).astype(np.float32)
    if shape.startswith("cache.attend"):
        cache = numba_attn.KVCache(B, Hkv, D, S)
        cache.append(k, v)

        def run(with_sinks):
            return cache.attend(q, sinks=sinks if with_sinks else None)

    else:
        kw = dict(enable_gqa=H != Hkv, is_causal="lower_right" if L > 1 else False)

        def run(with_sinks):
            return numba_attn.scaled_dot_product_attention(q, k, v, sinks=sinks if with_sinks else None, **kw)

    run(True), run(False)  # compile or load the kernels
    return run


class Sinks:
    """The same call with and without ``sinks`` (float32)."""

    params = [list(SHAPES), [False, True], THREADS]
    param_names = ["shape", "sinks", "threads"]

    def setup(self, shape, sinks, threads):
        check_threads(threads)
        self.run = cached(("sinks", shape), lambda: _make(shape))
        numba_attn.set_num_threads(threads)

    def time_call(self, shape, sinks, threads):
        self.run(sinks)


class SinksOverhead:
    """Time with sinks / time without, measured alternately in one process (1.0 = free)."""

    params = [list(SHAPES), THREADS]
    param_names = ["shape", "threads"]
    unit = "ratio"

    def setup(self, shape, threads):
        check_threads(threads)
        self.run = cached(("sinks", shape), lambda: _make(shape))
        numba_attn.set_num_threads(threads)

    def track_ratio(self, shape, threads):
        with_sinks, without = [], []
        for _ in range(5):
            with_sinks.append(bench.median_seconds(lambda: self.run(True), min_repeat=5, max_repeat=50, budget=0.1))
            without.append(bench.median_seconds(lambda: self.run(False), min_repeat=5, max_repeat=50, budget=0.1))
        return float(np.median(with_sinks) / np.median(without))
