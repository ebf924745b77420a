"""Packed batches of different lengths: ``scaled_dot_product_attention_varlen`` against the same batch
padded to its longest sequence with a key padding mask (numba_attn and torch's 4-D SDPA).

The cases and implementations are ``numba_attn.bench.VARLEN_CASES`` / ``VARLEN_IMPLEMENTATIONS``:
32 sequences with lengths uniform in 8-128 from a fixed seed, H12 D32 (MiniLM's heads), self-attention,
with and without a causal rule; ``scripts/varlen_bench.py`` prints the same calls side by side.
"""

import numba

from .common import THREADS, bench, cached, check_threads, measure, skip

CASES = {case.shape: case for case in bench.VARLEN_CASES}
IMPLS = {impl.name: impl for impl in bench.VARLEN_IMPLEMENTATIONS}


def _prepare(impl, shape, threads):
    check_threads(threads)

    def make():
        try:
            fn = IMPLS[impl].prepare(CASES[shape], threads)
        except bench.Unavailable as why:
            skip(f"{impl}: {why}")
        fn()  # warm-up: compile or load the kernels
        return fn

    fn = cached(("varlen", impl, shape, threads), make)
    if impl.startswith("numba_attn"):
        numba.set_num_threads(threads)  # thread-local in numba; cheap, keeps it right on reuse
    return fn


class VarlenBatch:
    """One attention call over the batch: packed (varlen), or padded with a mask (ours, torch)."""

    params = [list(IMPLS), list(CASES), THREADS]
    param_names = ["impl", "shape", "threads"]

    def setup(self, impl, shape, threads):
        self.fn = _prepare(impl, shape, threads)

    def time_batch(self, *params):
        self.fn()


class VarlenThroughput:
    """Useful GFLOP/s (4·H·D·Σ L_b², halved when causal: the work a packed batch needs) of each
    implementation; the padded ones compute more than that, so this is their effective rate."""

    params = [list(IMPLS), list(CASES), THREADS]
    param_names = ["impl", "shape", "threads"]
    unit = "GFLOP/s"

    def setup(self, impl, shape, threads):
        self.case = CASES[shape]
        self.fn = _prepare(impl, shape, threads)

    def track_useful_gflops(self, *params):
        return self.case.flops / measure(self.fn) / 1e9
