"""Per-call costs of a decode step (issue 13): a small grouped-query ``cache.attend`` call and one-token
``KVCache.append``, measured by ``numba_attn.bench`` (``call_overhead``, ``append_seconds``) as
``python -m numba_attn bench --layer`` does. Back to back (``bench.per_call_seconds``: mean of 200
calls, median of 7 such batches), numba's default threads (the calls here take the serial kernels)."""

from .common import bench


class CallOverhead:
    """A 1-token decode call, SmolLM2's 9 query heads over 3 K/V heads (D64), 64 cached tokens, float32:
    ``attend`` = ``cache.attend(q)`` in all (issue 13's target: ≤ 25 µs); ``kernel`` = the numba decode
    kernel alone, called with the arguments ``cache.attend`` gives it (captured from one call) through
    its compiled entry point, as ``cache.attend`` calls it (their unboxing included); ``dispatch`` = the
    same through numba's dispatcher (which types every argument first); ``beyond_kernel`` = attend −
    kernel, what the Python side costs (target: ≤ 15 µs)."""

    params = [["attend", "beyond_kernel", "kernel", "dispatch"]]
    param_names = ["part"]
    unit = "µs"

    def setup_cache(self):
        return bench.call_overhead(tokens=64)

    def track_call(self, seconds, part):
        return seconds[part] * 1e6


class CacheAppend:
    """One-token ``KVCache.append`` (3 K/V heads × 64, float32 key and value) into a float32, float16 or
    int8 cache (a ring, so it never fills); issue 13's target: ≤ 10 µs in every format."""

    params = [list(bench.FORMATS)]
    param_names = ["dtype"]
    unit = "µs"

    def track_append(self, dtype):
        return bench.append_seconds(dtype) * 1e6
