"""Projections: ``numba_attn.linear.LinearWeight`` (float32 / float16 / int8 / int4 weights read at their width)
against numpy's float32 matmul, on SmolLM2-135M's shapes.

A decode step (one row) is bound by the bytes of weight read, so float16 should approach 2× and int8
(1.25 bytes per weight: a scale and an offset per 32) up to ~3.2× numpy's float32 GEMV, int4 (0.625
bytes per weight) up to ~6.4×, where memory, not arithmetic, is the limit.
``threads`` sets numba's threads and, through threadpoolctl when installed, numpy's BLAS threads.
"""

import numpy as np

import numba_attn
from numba_attn.linear import LinearWeight

from .common import THREADS, cached, check_threads

#: (in_features, out_features) of SmolLM2-135M's projections
SHAPES = {
    "qkv 576x960": (576, 960),
    "o 576x576": (576, 576),
    "gate_up 576x3072": (576, 3072),
    "down 1536x576": (1536, 576),
    "lm_head 576x49152": (576, 49152),
}
STORAGE = ["numpy float32", "float32", "float16", "int8", "int4"]


def _blas_threads(threads):
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl.threadpool_limits(threads)


def _make(shape, storage, rows):
    rng = np.random.default_rng(0)
    K, N = SHAPES[shape]
    W = rng.standard_normal((K, N), dtype=np.float32) * 0.05
    x = rng.standard_normal((rows, K), dtype=np.float32)
    if storage == "numpy float32":
        return lambda: x @ W
    w = LinearWeight(W, dtype=storage.split()[-1])

    def fn():
        return w.apply(x)

    fn()  # compile, or load from numba's cache
    return fn


class ProjectionDecode:
    """One activation row times the weight (a decode step's GEMV)."""

    params = [list(SHAPES), STORAGE, THREADS]
    param_names = ["shape", "storage", "threads"]

    def setup(self, shape, storage, threads):
        check_threads(threads)
        numba_attn.set_num_threads(threads)
        self._limits = _blas_threads(threads)
        self.fn = cached(("decode", shape, storage), lambda: _make(shape, storage, 1))

    def teardown(self, *params):
        if getattr(self, "_limits", None) is not None:  # setup skipped (threads) before setting it
            self._limits.unregister()

    def time_projection(self, *params):
        self.fn()


class ProjectionPrefill:
    """64 activation rows times the weight (a prompt's GEMM); lm_head is left out (prefill needs only
    the last row's logits)."""

    params = [[s for s in SHAPES if not s.startswith("lm_head")], STORAGE, THREADS]
    param_names = ["shape", "storage", "threads"]
    rows = 64

    def setup(self, shape, storage, threads):
        check_threads(threads)
        numba_attn.set_num_threads(threads)
        self._limits = _blas_threads(threads)
        self.fn = cached(("prefill", shape, storage), lambda: _make(shape, storage, self.rows))

    def teardown(self, *params):
        if getattr(self, "_limits", None) is not None:  # setup skipped (threads) before setting it
            self._limits.unregister()

    def time_projection(self, *params):
        self.fn()


class WeightBytes:
    """Storage of a SmolLM2 projection weight against float32 (bias included, none here)."""

    params = [list(SHAPES), ["float16", "int8", "int4"]]
    param_names = ["shape", "storage"]
    unit = "× float32"

    def track_nbytes_ratio(self, shape, storage):
        K, N = SHAPES[shape]
        W = np.ones((K, N), np.float32)
        return LinearWeight(W, dtype=storage).nbytes / LinearWeight(W).nbytes
