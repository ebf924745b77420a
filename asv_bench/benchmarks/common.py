"""Helpers shared by the benchmark modules (nothing here is a benchmark).

The implementations and the case description are ``numba_attn.bench``'s, so the asv suite and
``python -m numba_attn bench`` time exactly the same calls.
"""

import numba
import numpy as np

import numba_attn
from numba_attn import bench
from numba_attn.bench import Unavailable

#: Implementation names, in the order they appear as parameter values.
IMPLS = ["numba_attn", "numpy", "torch", "onnxruntime"]
#: Thread counts; those above numba's pool here (NUMBA_NUM_THREADS, by default the core count) are skipped.
THREADS = [1, 2, 4]
#: Storage dtypes of the float32-vs-baselines grids; float16 and int8 have their own module (quantised.py).
DTYPES = ["float32"]

_IMPLEMENTATIONS = {impl.name: impl for impl in bench.IMPLEMENTATIONS}
_memo = {}


def skip(reason):
    """Skip this parameter combination: asv records it as n/a and prints the reason."""
    raise NotImplementedError(reason)


def by_shape(use):
    """{``Case.shape``: case} for the cases of ``numba_attn.bench.CASES`` that the asv group ``use`` times
    (one list for the asv suite and ``python -m numba_attn bench``); the shape strings are asv parameter values."""
    order = sorted(bench.tracked(use), key=lambda c: (c.L > 8, c.B, c.H, c.kv_heads, c.L, c.S, c.D, c.causal))
    cases = {case.shape: case for case in order}
    if not cases:
        raise LookupError(f"numba_attn.bench.CASES has no case for {use!r}")
    return cases


def check_threads(threads):
    pool = numba.config.NUMBA_NUM_THREADS
    if threads > pool:
        skip(f"{threads} threads asked, numba's pool here has {pool} (NUMBA_NUM_THREADS)")


def cached(key, make):
    """``make()`` once per process for ``key``, kept until a different key is asked for.

    asv runs every parameter combination in a process of its own, and recent asv_runner versions
    re-run ``setup`` before every timed call; this keeps the inputs, the prepared callable and
    the warm-up (compilation) to the first ``setup`` of the process. A failure (skip) is kept too.
    """
    if key not in _memo:
        _memo.clear()
        try:
            _memo[key] = (True, make())
        except NotImplementedError as why:
            _memo[key] = (False, why)
    ok, value = _memo[key]
    if not ok:
        raise value
    return value


def prepare(impl, case, threads, warm=True):
    """``bench``'s zero-argument callable for ``impl`` on ``case``, after one warm-up call.

    The warm-up compiles numba_attn's kernels (or loads them from numba's on-disk cache), builds
    the onnxruntime session's plan, and so on, so that only steady-state calls are timed.
    Raises NotImplementedError (asv: skipped) where ``bench`` says ``Unavailable``.
    """
    check_threads(threads)

    def make():
        try:
            fn = _IMPLEMENTATIONS[impl].prepare(case, threads)
        except Unavailable as why:
            skip(f"{impl}: {why}")
        if warm:
            fn()
        return fn

    fn = cached((impl, case, threads, warm), make)
    if impl == "numba_attn":
        numba_attn.set_num_threads(threads)  # thread-local in numba; cheap, keeps it right on reuse
    return fn


def measure(fn):
    """Median seconds of ``fn()`` for a track_* benchmark (bench's own timer, short budget)."""
    return bench.median_seconds(fn, min_repeat=3, max_repeat=20, budget=0.3)


def max_abs_error(case):
    """Largest |numba_attn − float64 reference| over the output of ``case``, all threads."""
    q, k, v = case.inputs()
    gqa = case.kv_heads != case.H
    ours = numba_attn.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)
    ref = numba_attn.reference.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)
    return float(np.max(np.abs(ours.astype(np.float64) - ref)))


def warm_kernel_cache(cases):
    """Call numba_attn once on each case, in this process, to fill numba's on-disk cache.

    For ``setup_cache``: later benchmark processes then load the kernels instead of compiling
    them, which keeps LLVM's compile-time memory out of ``peakmem_*`` results.
    """
    for case in cases:
        bench.NumbaAttn().prepare(case, numba.config.NUMBA_NUM_THREADS)()
    return [case.shape for case in cases]
