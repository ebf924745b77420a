"""Layer: ``numba_attn.MultiHeadAttention`` end to end (Q/K/V/O projections + attention + cache).

``LayerDecodeStep`` and ``LayerEncoder``: float32 projections are numpy matrix products on numpy's
BLAS threads, which ``threads`` does not set (it sets numba's, used by the attention kernels). The
SmolLM2 classes (issue 13) limit BLAS to ``threads`` too, through threadpoolctl when installed, and
take their layer, cache and baselines from ``numba_attn.bench`` (``layer_step``, ``old_layer_step``,
``torch_layer_step``), the ones ``python -m numba_attn bench --layer`` times.
"""

import numpy as np

import numba_attn
from numba_attn import KVCache, MultiHeadAttention

from .common import DTYPES, THREADS, bench, cached, check_threads, skip

#: the attention shapes of the layer calls, from numba_attn.bench.CASES: decode steps (one token over
#: the cache) by number of K/V heads, and the encoder batch
DECODE_STEPS = {case.kv_heads: case for case in bench.tracked("asv layer") if case.L == 1}
(ENCODER,) = [case for case in bench.tracked("asv layer") if case.L > 1]
(_HEADS,) = {case.H for case in DECODE_STEPS.values()}
(_HEAD_DIM,) = {case.D for case in DECODE_STEPS.values()}
(CACHE_TOKENS,) = {case.S for case in DECODE_STEPS.values()}


class LayerDecodeStep:
    """One decode step (B1, one new token) of an E2048, 32-head (D64) layer over a 4096-token cache.

    The cache is a full sliding-window ring of 4096 slots, so every step appends one token and
    attends over exactly 4096: the work stays the same however many times asv calls it.
    ``kv_heads`` 32 is multi-head attention, 8 grouped-query (4 query heads per K/V head).
    """

    params = [list(DECODE_STEPS), DTYPES, THREADS]
    param_names = ["kv_heads", "dtype", "threads"]
    embed_dim, heads = _HEADS * _HEAD_DIM, _HEADS

    def setup(self, kv_heads, dtype, threads):
        check_threads(threads)
        numba_attn.set_num_threads(threads)
        self.layer, self.cache, self.x = cached(("decode step", kv_heads, dtype), lambda: self._make(kv_heads, dtype))

    def _make(self, kv_heads, dtype):
        rng = np.random.default_rng(0)
        layer = MultiHeadAttention(self.embed_dim, self.heads, kv_heads, dtype=dtype, seed=0)
        head_dim = self.embed_dim // self.heads
        cache = KVCache(1, kv_heads, head_dim, capacity=1 << 40, dtype=dtype, window=CACHE_TOKENS)
        kv_shape = (1, kv_heads, CACHE_TOKENS, head_dim)
        cache.append(
            rng.standard_normal(kv_shape, dtype=np.float32),
            rng.standard_normal(kv_shape, dtype=np.float32),
            check_finite=False,
        )
        x = rng.standard_normal((1, 1, self.embed_dim), dtype=np.float32).astype(dtype)
        layer(x, cache=cache)  # warm-up: compile or load the decode kernel
        return layer, cache, x

    def time_decode_step(self, *params):
        self.layer(self.x, cache=self.cache)


class LayerEncoder:
    """A MiniLM-sized self-attention layer call: B8 L128 E384, 12 heads (D32), optionally with a
    key padding mask (sequence lengths 32…128, as a padded batch of sentences has)."""

    params = [[False, True], DTYPES, THREADS]
    param_names = ["padding", "dtype", "threads"]

    def setup(self, padding, dtype, threads):
        check_threads(threads)
        numba_attn.set_num_threads(threads)
        self.layer, self.x, self.mask = cached(("encoder", padding, dtype), lambda: self._make(padding, dtype))

    @staticmethod
    def _make(padding, dtype):
        rng = np.random.default_rng(0)
        batch, tokens, heads = ENCODER.B, ENCODER.L, ENCODER.H
        layer = MultiHeadAttention(heads * ENCODER.D, heads, dtype=dtype, seed=0)
        x = rng.standard_normal((batch, tokens, heads * ENCODER.D), dtype=np.float32).astype(dtype)
        mask = None
        if padding:
            lengths = rng.integers(tokens // 4, tokens + 1, batch)
            lengths[0] = tokens
            mask = np.arange(tokens)[None, :] >= lengths[:, None]  # True = padding (torch's convention)
        layer(x, key_padding_mask=mask)  # warm-up
        return layer, x, mask

    def time_encoder_layer(self, *params):
        self.layer(self.x, key_padding_mask=self.mask)


def _blas_threads(threads):
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl.threadpool_limits(threads, user_api="blas")


def _warm(fns):
    for fn in fns.values():
        fn()  # compile, or load from numba's cache
    return fns


class SmolLM2DecodeStep:
    """One decode step of a SmolLM2-135M-shaped attention layer (576 → 9×64 query / 3×64 K/V heads, no
    biases, no RoPE, batch 1) over a full ring of ``tokens`` cached tokens, with the cache and the four
    projection weights stored as float32, float16 or int8: ``layer(x, cache=cache)``, its projections
    (fused Q/K/V product + O) and its ``cache.attend`` alone (``bench.layer_step``). Timed back to back,
    so weights and cache stay in the CPU caches; ``SmolLM2DecodeParts`` reads them from DRAM."""

    params = [list(bench.LAYER_TOKENS), list(bench.FORMATS), list(bench.FORMATS), THREADS]
    param_names = ["tokens", "cache", "weights", "threads"]

    def setup(self, tokens, cache, weights, threads):
        check_threads(threads)
        self._limits = _blas_threads(threads)
        self.fns = cached(
            ("smollm2 step", tokens, cache, weights, threads),
            lambda: _warm(bench.layer_step(tokens, cache, weights, threads)),
        )
        numba_attn.set_num_threads(threads)

    def teardown(self, *params):
        if getattr(self, "_limits", None) is not None:  # setup skipped (threads) before setting it
            self._limits.unregister()

    def time_decode_step(self, *params):
        self.fns["step"]()

    def time_projections(self, *params):
        self.fns["projections"]()

    def time_attention(self, *params):
        self.fns["attention"]()


class SmolLM2DecodeBaselines:
    """The same step in the old float32 path (numpy float32 projections + ``scaled_dot_product_attention``
    on the cache's views, ``bench.old_layer_step``) and in torch (``F.linear`` + 4-D SDPA with
    ``enable_gqa``, ``bench.torch_layer_step``), float32 weights and cache."""

    params = [list(bench.LAYER_TOKENS), ["old float32 path", "torch"], THREADS]
    param_names = ["tokens", "impl", "threads"]

    def setup(self, tokens, impl, threads):
        check_threads(threads)
        self._limits = _blas_threads(threads)

        def make():
            try:
                fn = (bench.old_layer_step if impl == "old float32 path" else bench.torch_layer_step)(tokens, threads)
            except bench.Unavailable as why:
                skip(f"{impl}: {why}")
            fn()
            return fn

        self.fn = cached(("smollm2 baseline", tokens, impl, threads), make)
        numba_attn.set_num_threads(threads)

    def teardown(self, *params):
        if getattr(self, "_limits", None) is not None:
            self._limits.unregister()

    def time_decode_step(self, *params):
        self.fn()


class SmolLM2DecodeParts:
    """Where a SmolLM2 decode step's time goes, in µs, with cache and weights in the same format and
    read from DRAM (each timed call first reads 96 MiB of other memory, as layer after layer of a model
    does): ``projections`` (Q/K/V + O), ``attention`` (``cache.attend``), ``rest`` (step − both: append,
    reshapes, Python), ``step`` (all); the parts of one step timed in turns (``bench.alternate``), all
    of numba's threads, every combination measured once in ``setup_cache``."""

    params = [list(bench.LAYER_TOKENS), list(bench.FORMATS), ["step", "projections", "attention", "rest"]]
    param_names = ["tokens", "storage", "part"]
    unit = "µs"
    timeout = 600

    def setup_cache(self):
        threads = numba_attn.get_num_threads()
        parts = {}
        for tokens in bench.LAYER_TOKENS:
            for storage in bench.FORMATS:
                fns = bench.layer_step(tokens, storage, storage, threads)
                t = bench.alternate({name: ("numba_attn", fn) for name, fn in fns.items()}, rounds=2, evict=True)
                t["rest"] = t["step"] - t["projections"] - t["attention"]
                parts[tokens, storage] = t
        return parts

    def track_part(self, parts, tokens, storage, part):
        return parts[tokens, storage][part] * 1e6


class SmolLM2DecodeSpeedup:
    """A SmolLM2 decode step with cache and weights in the same format, × the old float32 path (numpy
    float32 projections + ``scaled_dot_product_attention`` on the cache views) on the same shapes, timed
    in turns, both reading weights and cache from DRAM (``bench.layer_results``' rule), all threads.
    Issue 13's targets at 512 tokens: int8 ≥ 3×, float32 ≥ 1.5×."""

    params = [list(bench.LAYER_TOKENS), list(bench.FORMATS)]
    param_names = ["tokens", "storage"]
    unit = "× old float32 path"

    def track_speedup(self, tokens, storage):
        threads = numba_attn.get_num_threads()
        limits = _blas_threads(threads)
        try:
            fns = {
                "step": ("numba_attn", bench.layer_step(tokens, storage, storage, threads)["step"]),
                "old": ("numba_attn", bench.old_layer_step(tokens, threads)),
            }
            t = bench.alternate(fns, rounds=4, evict=True)
        finally:
            if limits is not None:
                limits.unregister()
        return t["old"] / t["step"]
