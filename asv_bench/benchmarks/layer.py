"""Layer: ``numba_attn.MultiHeadAttention`` end to end (Q/K/V/O projections + attention + cache).

The projections are numpy matrix products: they run on numpy's BLAS threads, which ``threads``
does not set (it sets numba's, used by the attention kernels).
"""

import numba
import numpy as np

from numba_attn import KVCache, MultiHeadAttention

from .common import DTYPES, THREADS, bench, cached, check_threads

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
        numba.set_num_threads(threads)
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
        numba.set_num_threads(threads)
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
