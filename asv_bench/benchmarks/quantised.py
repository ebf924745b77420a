"""float16, int8 and 4-bit key/value storage: speed against torch's float32 on the same tokens,
accuracy against the float64 reference (with and without Hadamard rotation), and the memory of a KVCache.

Decode is memory-bound, so a cache of half (float16), about a quarter (int8, q8_0-style blocks of 32
with a float32 scale each) or about a sixth (int8 keys, 4-bit values) of the bytes should decode
proportionally faster. (The quality of the formats on a real model: ``kv_quality``.)
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

    params = [["numba_attn", "torch"], list(SHAPES), ["float32", "float16", "int8", "int8/int4", "int4"], THREADS]
    param_names = ["impl", "shape", "dtype", "threads"]

    def setup(self, impl, shape, dtype, threads):
        self.fn = prepare(impl, _with_dtype(SHAPES[shape], dtype), threads)

    def time_attention(self, *params):
        self.fn()


class SpeedupOverTorchFloat32:
    """numba_attn with K/V as ``dtype`` against torch's float32 SDPA on the same tokens, same threads."""

    params = [list(SHAPES), ["float32", "float16", "int8", "int8/int4", "int4"], THREADS]
    param_names = ["shape", "dtype", "threads"]
    unit = "× torch float32"

    def setup(self, shape, dtype, threads):
        # torch first: imported after numba's OpenMP pool has run, it slows down 2-5× (bench.preload_baselines)
        self.torch32 = prepare("torch", _with_dtype(SHAPES[shape], "float32"), threads)
        self.ours = prepare("numba_attn", _with_dtype(SHAPES[shape], dtype), threads)

    def track_speedup(self, *params):
        return measure(self.torch32) / measure(self.ours)


def _accuracy(storage, outliers):
    """(relative error, min per-row cosine) on N(0,1) inputs, B1 H8 L16 S1024 D64 (keys with 4 channels
    ×20), through a KVCache of ``STORAGES[storage]`` (its own rotation of the query and output)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 8, 16, 64))
    k = rng.standard_normal((1, 8, 1024, 64))
    v = rng.standard_normal((1, 8, 1024, 64))
    if outliers:
        k[..., :4] *= 20
    ref = numba_attn.reference.scaled_dot_product_attention(q, k, v)
    cache = numba_attn.KVCache(1, 8, 64, 1024, **STORAGES[storage])
    cache.append(k, v)
    query = cache.rotate_query(q.astype(np.float32))
    out = numba_attn.scaled_dot_product_attention(query, cache.keys, cache.values, out_dtype=np.float32)
    out = cache.unrotate_output(out)
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    cos = float(np.min((out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)))
    return rel, cos


#: the storages of the README's accuracy table, as KVCache options
STORAGES = {
    "float16": dict(dtype=np.float16),
    "int8 block 32": dict(dtype=np.int8, rotate=False),
    "int8 block 32, rotated keys": dict(dtype=np.int8, rotate=True),
    "int8 per row": dict(dtype=np.int8, block=None, rotate=False),
    "int8 keys, int4 values, both rotated (default)": dict(key_dtype=np.int8, value_dtype="int4"),
    "int4, both rotated (default)": dict(dtype="int4"),
}


class QuantisedAccuracy:
    """The README's accuracy table: float16, int8 per block of 32 (with and without rotation) and per
    row, int8 keys with 4-bit values, 4-bit both, with and without outlier key channels."""

    params = [list(STORAGES), [False, True]]
    param_names = ["storage", "outlier keys"]

    def track_relative_error(self, storage, outliers):
        return _accuracy(storage, outliers)[0]

    track_relative_error.unit = "‖out − ref‖ / ‖ref‖"

    def track_min_cosine(self, storage, outliers):
        return _accuracy(storage, outliers)[1]

    track_min_cosine.unit = "cosine"


class CacheMemory:
    """KVCache.nbytes against a float32 cache of the same tokens (B1, 8 KV heads, D64, 4096 slots)."""

    params = [["float16", "int8", "int8/int4", "int4"]]
    param_names = ["dtype"]
    unit = "× float32"

    def track_nbytes_ratio(self, dtype):
        def size(dt):
            key, value = dt.split("/")[0], dt.split("/")[-1]
            return numba_attn.KVCache(1, 8, 64, 4096, key_dtype=key, value_dtype=value).nbytes

        return size(dtype) / size("float32")
