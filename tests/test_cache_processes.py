"""numba's on-disk kernel cache under several processes at once (it is on by default).

numba writes a cache entry as an index file (``*.nbi``) plus the machine code (``*.nbc``); several
processes compiling the same kernel into an empty cache race on those files, and caching combined
with multiprocessing has crashed before (numba issue #4807; numbagg keeps its cache off for that
reason and tests it the same way). Here four spawned processes compile and call the same kernels
at once into a fresh ``NUMBA_CACHE_DIR``, then four more start and must load every kernel from it
(no compilation) and get the same, correct results.

Cost: every process of the first round compiles one kernel cold (the serial prefill build, float32,
no mask): 29 s for the whole test on a 2-core machine shared with other jobs (round 1 dominates,
round 2 only loads). With the decode kernel as well it took 95 s, so that one is left out.
"""

import multiprocessing
import os

import numpy as np
import pytest

PROCESSES = 4
#: the kernel each worker calls (a prefill small enough for the serial build)
KERNELS = ("prefill_serial",)


def _attend_and_report(seed):
    """Runs in a spawned process: two small prefills against the float64 reference;
    returns (worst error, {kernel: (cache hits, cache misses)}, cache directory numba_attn uses)."""
    import numba_attn
    from numba_attn import config, reference
    from numba_attn.kernels import prefill

    rng = np.random.default_rng(seed)
    worst = 0.0
    for L, S in ((20, 24), (7, 40)):  # the serial prefill build (both below SERIAL_BELOW_FLOPS)
        q, k, v = (rng.standard_normal((2, n, 16)).astype(np.float32) for n in (L, S, S))
        out = numba_attn.scaled_dot_product_attention(q, k, v, is_causal="lower_right")
        ref = reference.scaled_dot_product_attention(
            *(x.astype(np.float64) for x in (q, k, v)), is_causal="lower_right"
        )
        assert out.shape == ref.shape and out.dtype == np.float32
        worst = max(worst, float(np.abs(out - ref).max()))
    stats = {}
    for name in KERNELS:
        kernel_stats = getattr(prefill, name).stats
        stats[name] = (sum(kernel_stats.cache_hits.values()), sum(kernel_stats.cache_misses.values()))
    return worst, stats, config.CACHE_DIR


def _round(cache_dir):
    """PROCESSES spawned workers at once, all with NUMBA_CACHE_DIR=cache_dir; their reports."""
    context = multiprocessing.get_context("spawn")
    old = os.environ.get("NUMBA_CACHE_DIR")
    os.environ["NUMBA_CACHE_DIR"] = str(cache_dir)  # spawned children read it when numba starts
    try:
        with context.Pool(PROCESSES) as pool:
            return pool.map(_attend_and_report, range(PROCESSES), chunksize=1)
    finally:
        if old is None:
            del os.environ["NUMBA_CACHE_DIR"]
        else:
            os.environ["NUMBA_CACHE_DIR"] = old


@pytest.mark.skipif(
    os.environ.get("NUMBA_ATTN_CACHE", "1") in ("0", "false", "False", ""),
    reason="the on-disk cache is switched off in this environment (NUMBA_ATTN_CACHE=0)",
)
def test_cache_survives_concurrent_compiles_and_loads(tmp_path):
    cache_dir = tmp_path / "numba-cache"  # not created: numba makes it when it saves
    first = _round(cache_dir)
    for worst, stats, used in first:
        assert used == str(cache_dir)
        assert worst < 1e-5, worst
        for name in KERNELS:
            hits, misses = stats[name]
            assert hits + misses >= 1, (name, stats)  # compiled here, or loaded what another process saved
    written = [f for _, _, files in os.walk(cache_dir) for f in files]
    assert any(f.endswith(".nbi") for f in written) and any(f.endswith(".nbc") for f in written), written

    second = _round(cache_dir)
    for worst, stats, _ in second:
        assert worst < 1e-5, worst
        for name in KERNELS:
            hits, misses = stats[name]
            assert misses == 0 and hits >= 1, (name, stats)  # loaded, not compiled again
    assert [w for w, _, _ in second] == [w for w, _, _ in first]  # same seeds, same machine code: same results
