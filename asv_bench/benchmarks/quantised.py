"""float16 and int8 key/value storage: speed against torch's float32 on the same tokens, accuracy
against the float64 reference, and the memory of a KVCache.

Decode is memory-bound, so a cache of half (float16) or about a quarter (int8, q8_0-style blocks of
32 with a float32 scale each) of the bytes should decode proportionally faster.
"""

import dataclasses

import numpy as np

import numba_attn

from .common import THREADS, by_shape, measure, prepare

#: the shapes, from numba_attn.bench.CASES (parameter value: ``Case.shape``), stored as float32
SHAPES = by_shape("asv quantised")


def _with_dtype(case, dtype):
    return dataclasses.replace(case, dtype=dtype)


class QuantisedAttention:
    """Time of one call with K/V stored as ``dtype``; torch runs the same dtype (float16: its own
    float16 SDPA; int8: skipped, it has none)."""

    params = [["numba_attn", "torch"], list(SHAPES), ["float32", "float16", "int8"], THREADS]
    param_names = ["impl", "shape", "dtype", "threads"]

    def setup(self, impl, shape, dtype, threads):
        self.fn = prepare(impl, _with_dtype(SHAPES[shape], dtype), threads)

    def time_attention(self, *params):
        self.fn()


class SpeedupOverTorchFloat32:
    """numba_attn with K/V as ``dtype`` against torch's float32 SDPA on the same tokens, same threads."""

    params = [list(SHAPES), ["float32", "float16", "int8"], THREADS]
    param_names = ["shape", "dtype", "threads"]
    unit = "× torch float32"

    def setup(self, shape, dtype, threads):
        # torch first: imported after numba's OpenMP pool has run, it slows down 2-5× (bench.preload_baselines)
        self.torch32 = prepare("torch", _with_dtype(SHAPES[shape], "float32"), threads)
        self.ours = prepare("numba_attn", _with_dtype(SHAPES[shape], dtype), threads)

    def track_speedup(self, *params):
        return measure(self.torch32) / measure(self.ours)


def _accuracy(dtype, block, outliers):
    """(relative error, min per-row cosine) on N(0,1) inputs, D64, S1024 (keys with 4 channels ×20)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 8, 16, 64))
    k = rng.standard_normal((1, 8, 1024, 64))
    v = rng.standard_normal((1, 8, 1024, 64))
    if outliers:
        k[..., :4] *= 20
    ref = numba_attn.reference.scaled_dot_product_attention(q, k, v)
    if dtype == "float16":
        out = numba_attn.scaled_dot_product_attention(*(x.astype(np.float16) for x in (q, k, v)), out_dtype=np.float32)
    else:
        out = numba_attn.scaled_dot_product_attention(
            q.astype(np.float32), numba_attn.quantize(k, block), numba_attn.quantize(v, block)
        )
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    cos = float(np.min((out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)))
    return rel, cos


class QuantisedAccuracy:
    """The README's accuracy contract: float16, int8 per block of 32 and int8 per row, with and
    without outlier key channels."""

    params = [["float16", "int8 block 32", "int8 per row"], [False, True]]
    param_names = ["storage", "outlier keys"]

    def _scheme(self, storage):
        return ("float16", None) if storage == "float16" else ("int8", 32 if "32" in storage else None)

    def track_relative_error(self, storage, outliers):
        return _accuracy(*self._scheme(storage), outliers)[0]

    track_relative_error.unit = "‖out − ref‖ / ‖ref‖"

    def track_min_cosine(self, storage, outliers):
        return _accuracy(*self._scheme(storage), outliers)[1]

    track_min_cosine.unit = "cosine"


class CacheMemory:
    """KVCache.nbytes against a float32 cache of the same tokens (B1, 8 KV heads, D64, 4096 slots)."""

    params = [["float16", "int8"]]
    param_names = ["dtype"]
    unit = "× float32"

    def track_nbytes_ratio(self, dtype):
        size = lambda dt: numba_attn.KVCache(1, 8, 64, 4096, dtype=dt).nbytes  # noqa: E731
        return size(dtype) / size(np.float32)
