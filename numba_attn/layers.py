"""MultiHeadAttention: hidden states in, hidden states out, with Q/K/V/O projections and a KV cache.

Weight layout (ours): ``y = x @ W + b``, i.e. W has shape (in_features, out_features). PyTorch and
Hugging Face store linears as (out_features, in_features); the ``from_*`` constructors transpose
once at load. Heads are contiguous column blocks: head h of Q is columns h·head_dim … (h+1)·head_dim
of ``w_q`` (PyTorch's and Hugging Face's convention); with grouped-query attention query head h
uses key/value head h // (num_heads / num_kv_heads).
"""

import math
import numbers

import numpy as np

from ._validate import check_causal, check_finite_array, check_sinks, check_slopes, check_softcap, per_head_in
from .api import scaled_dot_product_attention
from .cache import KVCache, alibi_bias, streaming_mask
from .varlen import check_cu_seqlens, scaled_dot_product_attention_varlen

__all__ = ["MultiHeadAttention"]


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class MultiHeadAttention:
    """Multi-head (or grouped-query, or multi-query) attention layer on numpy arrays.

    Parameters
    ----------
    embed_dim : int
        Size of the hidden states x (and of the output).
    num_heads : int
        Query heads H.
    num_kv_heads : int, optional
        Key/value heads H_kv (default H). H_kv < H is grouped-query attention; 1 is multi-query.
    head_dim : int, optional
        Size of each head (default embed_dim // num_heads).
    bias : bool
        Biases on the four projections.
    kdim, vdim : int, optional
        Feature sizes of the key/value source in cross-attention (default embed_dim).
    dtype : float32 or float64
    seed : int, optional
        Weights start Xavier-uniform (as PyTorch's), biases zero; load real ones with ``from_*``.

    Call: ``layer(x, context=None, *, key_padding_mask=None, attn_mask=None, is_causal=False,
    cache=None, window=None, alibi_slopes=None, sinks=None, softcap=None, rotary=None, cu_seqlens=None,
    cu_seqlens_k=None)``, see ``__call__``; with ``cu_seqlens`` x is a packed batch (tokens, embed_dim).

    Examples
    --------
    A grouped-query layer (4 query heads, 2 K/V heads): a causal pass over five tokens equals five
    decode steps over a KV cache.

    >>> import numpy as np
    >>> import numba_attn
    >>> layer = numba_attn.MultiHeadAttention(embed_dim=16, num_heads=4, num_kv_heads=2, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((1, 5, 16)).astype(np.float32)
    >>> full = layer(x, is_causal=True)
    >>> full.shape, full.dtype
    ((1, 5, 16), dtype('float32'))
    >>> cache = layer.new_cache(batch=1, capacity=8)
    >>> steps = [layer(x[:, t:t + 1], cache=cache) for t in range(5)]
    >>> bool(np.allclose(np.concatenate(steps, axis=1), full, atol=1e-5)), cache.length
    (True, 5)
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        num_kv_heads=None,
        head_dim=None,
        bias=True,
        kdim=None,
        vdim=None,
        dtype=np.float32,
        seed=None,
    ):
        self.embed_dim = _positive_int("embed_dim", embed_dim)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.num_kv_heads = _positive_int("num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if head_dim is None:
            if self.embed_dim % self.num_heads:
                raise ValueError(
                    f"embed_dim ({self.embed_dim}) is not divisible by num_heads ({self.num_heads}); pass head_dim"
                )
            head_dim = self.embed_dim // self.num_heads
        self.head_dim = _positive_int("head_dim", head_dim)
        self.kdim = _positive_int("kdim", self.embed_dim if kdim is None else kdim)
        self.vdim = _positive_int("vdim", self.embed_dim if vdim is None else vdim)
        if self.kdim != self.vdim:
            raise ValueError(
                f"kdim ({self.kdim}) and vdim ({self.vdim}) must be equal: one context sequence feeds "
                "both the key and the value projection"
            )
        try:
            self.dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self._fused = self.kdim == self.embed_dim == self.vdim
        rng = np.random.default_rng(seed)

        def xavier(n_in, n_out):
            bound = math.sqrt(6.0 / (n_in + n_out))
            return rng.uniform(-bound, bound, (n_in, n_out)).astype(self.dtype)

        if self._fused:
            # one (embed_dim, hq + 2·hkv) matrix: self-attention projects Q, K, V in one product
            self._w_in = np.concatenate(
                [xavier(self.embed_dim, hq), xavier(self.embed_dim, hkv), xavier(self.embed_dim, hkv)], axis=1
            )
            self.w_q, self.w_k, self.w_v = (self._w_in[:, :hq], self._w_in[:, hq : hq + hkv], self._w_in[:, hq + hkv :])
        else:
            self._w_in = None
            self.w_q, self.w_k, self.w_v = xavier(self.embed_dim, hq), xavier(self.kdim, hkv), xavier(self.vdim, hkv)
        self.w_o = xavier(hq, self.embed_dim)
        if bias:
            self._b_in = np.zeros(hq + 2 * hkv, self.dtype)
            self.b_q, self.b_k, self.b_v = self._b_in[:hq], self._b_in[hq : hq + hkv], self._b_in[hq + hkv :]
            self.b_o = np.zeros(self.embed_dim, self.dtype)
        else:
            self._b_in = self.b_q = self.b_k = self.b_v = self.b_o = None
        #: storage of the projections in the products (``quantize_weights``); float32: numpy on the weights
        self.weight_dtype = np.dtype(np.float32)
        self._packed = None

    # -- loading ----------------------------------------------------------------------------------
    def load(self, w_q, w_k, w_v, w_o, b_q=None, b_k=None, b_v=None, b_o=None):
        """Copy weights in OUR layout (in_features, out_features) into the layer (shapes checked)."""
        for name, src, dst in (
            ("w_q", w_q, self.w_q),
            ("w_k", w_k, self.w_k),
            ("w_v", w_v, self.w_v),
            ("w_o", w_o, self.w_o),
            ("b_q", b_q, self.b_q),
            ("b_k", b_k, self.b_k),
            ("b_v", b_v, self.b_v),
            ("b_o", b_o, self.b_o),
        ):
            if src is None:
                continue
            if dst is None:
                raise ValueError(f"{name} given but the layer was built with bias=False")
            src = np.asarray(src)
            if src.dtype.kind not in "fiu":
                raise TypeError(f"{name} must be a real (floating) array, got dtype {src.dtype}")
            if src.shape != dst.shape:
                raise ValueError(f"{name} must have shape {dst.shape} (in_features, out_features), got {src.shape}")
            check_finite_array(src, name)
            dst[...] = src
        if self._packed is not None:
            self.quantize_weights(self.weight_dtype)  # keep the packed copies in step
        return self

    def quantize_weights(self, dtype):
        """Store the four projections as ``dtype`` for the products: "float16", "int8" (affine blocks:
        int8 with a float32 scale and offset per 32 inputs and output), "int4" (16 levels with a float16
        scale and offset per 32 inputs and output, like GGUF's Q4_1) or "float32" (numpy's BLAS on the
        float weights, the default). float16/int8/int4 go through :class:`~numba_attn.linear.LinearWeight`,
        whose kernels read the weights at their width (a decode step reads every weight once:
        int8 reads ~0.31× the bytes of float32, int4 ~0.16×). The float weights ``w_q`` … stay as they
        are (the layer's source of truth: ``load`` repacks); products compute in float32. Returns self.
        """
        from .linear import _DTYPES, LinearWeight, _storage_dtype

        dtype = _DTYPES[_storage_dtype(dtype)]
        if dtype == np.float32:
            self._packed = None
        else:
            packed = {"o": LinearWeight(self.w_o, self.b_o, dtype=dtype)}
            if self._fused:
                packed["in"] = LinearWeight(self._w_in, self._b_in, dtype=dtype)
            else:
                packed.update(
                    (n, LinearWeight(w, b, dtype=dtype))
                    for n, w, b in (("q", self.w_q, self.b_q), ("k", self.w_k, self.b_k), ("v", self.w_v, self.b_v))
                )
            self._packed = packed
        self.weight_dtype = dtype
        return self

    @classmethod
    def from_linear_weights(
        cls,
        q_proj,
        k_proj,
        v_proj,
        o_proj,
        num_heads,
        num_kv_heads=None,
        q_bias=None,
        k_bias=None,
        v_bias=None,
        o_bias=None,
        head_dim=None,
        dtype=np.float32,
    ):
        """From four ``nn.Linear``-layout weights (out_features, in_features), as Hugging Face stores
        ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (Llama, Mistral, BERT's query/key/value/dense)."""
        q_proj, k_proj, v_proj, o_proj = (np.asarray(w) for w in (q_proj, k_proj, v_proj, o_proj))
        for name, w in (("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj), ("o_proj", o_proj)):
            if w.ndim != 2:
                raise ValueError(f"{name} must be a 2-D (out_features, in_features) weight, got shape {w.shape}")
        num_heads = _positive_int("num_heads", num_heads)
        embed_dim = q_proj.shape[1]
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = q_proj.shape[0] // num_heads if head_dim is None else head_dim
        has_bias = any(b is not None for b in (q_bias, k_bias, v_bias, o_bias))
        layer = cls(
            embed_dim,
            num_heads,
            num_kv_heads,
            head_dim,
            bias=has_bias,
            kdim=k_proj.shape[1],
            vdim=v_proj.shape[1],
            dtype=dtype,
        )
        # a bias left out (None) stays zero
        return layer.load(q_proj.T, k_proj.T, v_proj.T, o_proj.T, q_bias, k_bias, v_bias, o_bias)

    @classmethod
    def from_torch_weights(
        cls, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, dtype=np.float32
    ):
        """From ``torch.nn.MultiheadAttention``'s packed layout as numpy arrays: ``in_proj_weight``
        (3·E, E) = [W_q; W_k; W_v] in (out, in) layout, ``out_proj.weight`` (E, E), biases or None."""
        w = np.asarray(in_proj_weight)
        E = w.shape[1]
        if w.shape != (3 * E, E):
            raise ValueError(f"in_proj_weight must have shape (3·E, E) = ({3 * E}, {E}), got {w.shape}")
        b = None if in_proj_bias is None else np.asarray(in_proj_bias)
        return cls.from_linear_weights(
            w[:E],
            w[E : 2 * E],
            w[2 * E :],
            out_proj_weight,
            num_heads,
            q_bias=None if b is None else b[:E],
            k_bias=None if b is None else b[E : 2 * E],
            v_bias=None if b is None else b[2 * E :],
            o_bias=out_proj_bias,
            dtype=dtype,
        )

    @classmethod
    def from_torch(cls, module, dtype=np.float32):
        """From a ``torch.nn.MultiheadAttention`` instance (needs torch only for reading it)."""

        def arr(t):
            return None if t is None else t.detach().cpu().numpy()

        if getattr(module, "_qkv_same_embed_dim", True):
            return cls.from_torch_weights(
                arr(module.in_proj_weight),
                arr(module.in_proj_bias),
                arr(module.out_proj.weight),
                arr(module.out_proj.bias),
                module.num_heads,
                dtype=dtype,
            )
        b = arr(module.in_proj_bias)
        E = module.embed_dim
        return cls.from_linear_weights(
            arr(module.q_proj_weight),
            arr(module.k_proj_weight),
            arr(module.v_proj_weight),
            arr(module.out_proj.weight),
            module.num_heads,
            q_bias=None if b is None else b[:E],
            k_bias=None if b is None else b[E : 2 * E],
            v_bias=None if b is None else b[2 * E :],
            o_bias=arr(module.out_proj.bias),
            dtype=dtype,
        )

    # -- forward ----------------------------------------------------------------------------------
    def new_cache(
        self,
        batch,
        capacity,
        window=None,
        dtype=None,
        block=32,
        sink_tokens=0,
        key_dtype=None,
        value_dtype=None,
        rotate=None,
    ):
        """A KVCache shaped for this layer (storage ``dtype``: the layer's by default, or float16, int8
        or "int4"; ``key_dtype``/``value_dtype`` to store keys and values differently, e.g. int8 keys
        and "int4" values; ``rotate``: Hadamard rotation of keys and/or values (default: int8/int4
        keys, int4 values); ``window`` and ``sink_tokens``: a ring of the last ``window`` tokens plus
        the first ``sink_tokens``; see :class:`KVCache`)."""
        return KVCache(
            batch,
            self.num_kv_heads,
            self.head_dim,
            capacity,
            dtype=self.dtype if dtype is None else dtype,
            window=window,
            block=block,
            sink_tokens=sink_tokens,
            key_dtype=key_dtype,
            value_dtype=value_dtype,
            rotate=rotate,
        )

    def _heads(self, y, n_heads):
        B, T, _ = y.shape
        return y.reshape(B, T, n_heads, self.head_dim).transpose(0, 2, 1, 3)

    def project_qkv(self, x, context=None):
        """Q (B, H, L, head_dim), K and V (B, H_kv, S, head_dim) from x (and context)."""
        B, L, _ = x.shape
        hq = self.num_heads * self.head_dim
        hkv = self.num_kv_heads * self.head_dim
        packed = self._packed
        if context is None and self._fused:
            if packed is not None:
                qkv = packed["in"](x.reshape(B * L, -1))
            else:
                qkv = x.reshape(B * L, -1) @ self._w_in
                if self._b_in is not None:
                    qkv += self._b_in
            qkv = qkv.reshape(B, L, -1)
            q, k, v = qkv[..., :hq], qkv[..., hq : hq + hkv], qkv[..., hq + hkv :]
        else:
            src = x if context is None else context
            S = src.shape[1]
            if packed is not None:
                q = packed["q"](x.reshape(B * L, -1)).reshape(B, L, hq)
                k = packed["k"](src.reshape(B * S, -1)).reshape(B, S, hkv)
                v = packed["v"](src.reshape(B * S, -1)).reshape(B, S, hkv)
            else:
                q = (x.reshape(B * L, -1) @ self.w_q).reshape(B, L, hq)
                k = (src.reshape(B * S, -1) @ self.w_k).reshape(B, S, hkv)
                v = (src.reshape(B * S, -1) @ self.w_v).reshape(B, S, hkv)
                if self.b_q is not None:
                    q, k, v = q + self.b_q, k + self.b_k, v + self.b_v
        return self._heads(q, self.num_heads), self._heads(k, self.num_kv_heads), self._heads(v, self.num_kv_heads)

    def __call__(
        self,
        x,
        context=None,
        *,
        key_padding_mask=None,
        attn_mask=None,
        is_causal=False,
        cache=None,
        window=None,
        alibi_slopes=None,
        sinks=None,
        softcap=None,
        rotary=None,
        cu_seqlens=None,
        cu_seqlens_k=None,
    ):
        """Attention of x (B, L, embed_dim) over itself, or over ``context`` (B, S, kdim); → (B, L, embed_dim).

        Masks follow ``torch.nn.MultiheadAttention``: ``key_padding_mask`` (B, S), boolean True =
        padding, ignored (or float, added); ``attn_mask`` (L, S), (B, H, L, S) or (B·H, L, S),
        boolean True = NOT allowed (or float, added). (Note: the opposite of the boolean convention
        of ``scaled_dot_product_attention``, as in PyTorch.) ``is_causal``: as in
        ``scaled_dot_product_attention`` (True = upper_left).

        ``cache`` (a :class:`KVCache`, e.g. from ``new_cache``): the new tokens' keys and values are
        appended and the queries attend over everything cached, causally with bottom-right
        alignment (query i is token ``cache.length + i``). ``key_padding_mask`` then covers all
        positions so far, (B, cache.length after the call). A cache with a window keeps the last W
        tokens and the attention is windowed to match; with ``sink_tokens=n`` too each query also
        sees the first n tokens (StreamingLLM), a chunk of several tokens exactly as one at a time.

        ``rotary``: optional callable ``(q, k, positions) -> (q, k)`` applied to the new tokens'
        queries and keys (B, heads, T, head_dim) before caching, e.g. RoPE; ``positions`` are
        absolute token positions (T,), also with a window and sink tokens (the cached keys keep the
        rotation of their own positions; see :class:`KVCache`).

        ``alibi_slopes``, ``sinks`` (learned sink logits, one per query head) and ``softcap``: as in
        :func:`~numba_attn.scaled_dot_product_attention`, on every path (cached or not).

        ``cu_seqlens`` (B + 1,): x is a packed batch (total tokens, embed_dim), sequence b being rows
        ``cu_seqlens[b]:cu_seqlens[b+1]`` (flash-attention's layout), and the result is packed the same
        way: each sequence attends to itself only, with no padding computed
        (``scaled_dot_product_attention_varlen``). Cross-attention: ``context`` packed too
        (total context tokens, kdim) with its own offsets ``cu_seqlens_k``. ``is_causal``, ``window``,
        ``alibi_slopes``, ``sinks``, ``softcap`` apply per sequence; ``rotary`` gets q and k as (1, heads,
        tokens, head_dim) and each token's position inside its own sequence. No masks (there is no padding to
        mask) and no cache.
        """
        if cu_seqlens is not None or cu_seqlens_k is not None:
            return self._call_packed(
                x,
                context,
                cu_seqlens,
                cu_seqlens_k,
                key_padding_mask,
                attn_mask,
                is_causal,
                cache,
                window,
                alibi_slopes,
                sinks,
                softcap,
                rotary,
            )
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a numba_attn.KVCache, got {type(cache).__name__}")
        check_causal(is_causal)  # with a cache it is not used (bottom-right by construction), but still checked
        if rotary is not None and not callable(rotary):
            raise TypeError(f"rotary must be a callable (q, k, positions) -> (q, k), got {type(rotary).__name__}")
        x = self._check_input(x, "x", self.embed_dim)
        B, L, _ = x.shape
        if context is not None:
            if cache is not None:
                raise ValueError("context (cross-attention) and cache cannot be combined")
            context = self._check_input(context, "context", self.kdim)
            if context.shape[0] != B:
                raise ValueError(f"context must have batch {B} like x, got shape {context.shape}")
        elif not self._fused and (self.kdim != self.embed_dim or self.vdim != self.embed_dim):
            raise ValueError("this layer has kdim/vdim != embed_dim: pass the key/value source as context")
        q, k, v = self.project_qkv(x, context)
        start = 0 if cache is None else cache.length
        if rotary is not None:
            q, k = rotary(q, k, np.arange(start, start + L))
        kw = dict(
            enable_gqa=self.num_kv_heads != self.num_heads,
            alibi_slopes=alibi_slopes,
            sinks=sinks,
            softcap=softcap,
            check_finite=False,
            out_dtype=self.dtype,
        )
        if cache is None:
            S = k.shape[2]
            mask = self._combined_mask(key_padding_mask, attn_mask, B, L, S, np.arange(S))
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, window=window, **kw)
        else:
            out = self._attend_cached(q, k, v, cache, key_padding_mask, attn_mask, window, kw)
        merged = out.transpose(0, 2, 1, 3).reshape(B * L, self.num_heads * self.head_dim)
        return self._project_out(merged).reshape(B, L, self.embed_dim)

    def _project_out(self, merged):
        """The output projection of the heads' results, (tokens, H·head_dim) → (tokens, embed_dim)."""
        if self._packed is not None:
            return self._packed["o"](merged)
        y = merged @ self.w_o
        if self.b_o is not None:
            y += self.b_o
        return y

    def _call_packed(
        self,
        x,
        context,
        cu_seqlens,
        cu_seqlens_k,
        key_padding_mask,
        attn_mask,
        is_causal,
        cache,
        window,
        alibi_slopes,
        sinks,
        softcap,
        rotary,
    ):
        """``__call__`` on a packed batch (``cu_seqlens`` given): see there."""
        for name, given in (("cache", cache), ("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if given is not None:
                raise ValueError(
                    f"{name} cannot be combined with a packed batch (cu_seqlens): a packed batch has no padding "
                    "to mask and no cache; pass a padded (B, L, embed_dim) batch for that"
                )
        if rotary is not None and not callable(rotary):
            raise TypeError(f"rotary must be a callable (q, k, positions) -> (q, k), got {type(rotary).__name__}")
        if cu_seqlens is None:
            raise ValueError("cu_seqlens_k is the packed context's offsets: pass cu_seqlens (x's offsets) too")
        x = self._check_packed_input(x, "x", self.embed_dim)
        cu = check_cu_seqlens(cu_seqlens, "cu_seqlens", x.shape[0], "x")
        if context is not None:
            context = self._check_packed_input(context, "context", self.kdim)
            if cu_seqlens_k is None:
                raise ValueError("cross-attention on a packed batch needs cu_seqlens_k (the offsets of context)")
            cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", context.shape[0], "context")
            if cu_k.shape != cu.shape:
                raise ValueError(
                    f"cu_seqlens_k must describe as many sequences as cu_seqlens ({cu.shape[0] - 1}), "
                    f"got shape {cu_k.shape}"
                )
        else:
            if cu_seqlens_k is not None:
                raise ValueError(
                    "cu_seqlens_k is for a packed context (cross-attention); self-attention uses cu_seqlens"
                )
            if not self._fused and (self.kdim != self.embed_dim or self.vdim != self.embed_dim):
                raise ValueError("this layer has kdim/vdim != embed_dim: pass the key/value source as context")
            cu_k = cu
        q, k, v = self.project_qkv(x[None], None if context is None else context[None])  # (1, heads, tokens, D)
        if rotary is not None:
            lengths = np.diff(cu)
            positions = np.arange(x.shape[0]) - np.repeat(cu[:-1], lengths)  # inside each sequence
            q, k = rotary(q, k, positions)
        out = scaled_dot_product_attention_varlen(
            q[0].transpose(1, 0, 2),
            k[0].transpose(1, 0, 2),
            v[0].transpose(1, 0, 2),
            cu,
            cu_k,
            is_causal=is_causal,
            window=window,
            alibi_slopes=alibi_slopes,
            sinks=sinks,
            softcap=softcap,
            check_finite=False,
            out_dtype=self.dtype,
        )
        return self._project_out(out.reshape(x.shape[0], self.num_heads * self.head_dim))

    def _attend_cached(self, q, k, v, cache, key_padding_mask, attn_mask, window, kw):
        B, L = q.shape[0], q.shape[2]
        if (cache.batch, cache.num_kv_heads, cache.head_dim, cache.value_dim) != (
            B,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim,
        ):
            raise ValueError(
                f"cache holds (batch={cache.batch}, num_kv_heads={cache.num_kv_heads}, "
                f"head_dim={cache.head_dim}); this call needs ({B}, {self.num_kv_heads}, {self.head_dim})"
            )
        if (q.dtype, cache.key_dtype, cache.value_dtype) not in _FITTING_CACHES:
            _check_cache_formats(q.dtype, cache)
        if window is not None and window != cache.window:
            raise ValueError(f"window={window} differs from the cache's window ({cache.window})")
        if cache.length + L > cache.capacity:
            raise ValueError(f"KVCache is full: {cache.length} tokens held + {L} new > capacity {cache.capacity}")
        window = cache.window
        # everything that can be refused is checked before the cache changes
        check_softcap(kw["softcap"])
        # (H,) arrays in the arithmetic's dtype now: a value beyond it (1e39 in float32) is refused here, not
        # by the kernel call after the append (the kernels convert them again: the same values, no copy kept)
        for name, check in (("alibi_slopes", check_slopes), ("sinks", check_sinks)):
            if kw[name] is not None:
                per_head_in(check(kw[name], self.num_heads), name, q.dtype)
        direct = window is None or (L == 1 and kw["alibi_slopes"] is None)
        if direct and key_padding_mask is None and attn_mask is None:
            # the decode fast path (below) needs no positions and no mask
            positions = mask = None
        elif direct:
            # every cached token (after appending) is visible to the new ones: attend in storage order
            positions = cache.positions(appended=L)
        else:
            positions = np.r_[cache.ordered_positions(), cache.length + np.arange(L)]
        if positions is not None:
            mask = self._combined_mask(key_padding_mask, attn_mask, B, L, positions.size, positions)
        if cache.sink_tokens and not direct:
            # a sink cache's chunk (or ALiBi): the window rule cannot see the sinks, a mask on positions can
            keys, values = cache.ordered_with(k, v)
            cache.append(k, v, check_finite=False)
            q_pos = positions[-L:]
            mask = _with_streaming_mask(mask, q_pos, positions, cache.sink_tokens, window, kw, q.dtype)
            kw = dict(kw, alibi_slopes=None)
            res = scaled_dot_product_attention(cache.rotate_query(q), keys, values, attn_mask=mask, **kw)
            return cache.unrotate_output(res)
        if direct and mask is None:
            # the decode fast path: the cache's own storage, bottom-right causal, GQA from its heads
            cache.append(k, v, check_finite=False)
            return cache.attend(
                q, alibi_slopes=kw["alibi_slopes"], sinks=kw["sinks"], softcap=kw["softcap"], check_finite=False
            )
        if direct:
            cache.append(k, v, check_finite=False)
            keys, values = cache.keys, cache.values
            causal, window_arg = ("lower_right" if window is None else False), None
        else:
            # windowed chunk (or ALiBi): keys in position order, cached ones then the new ones
            keys, values = cache.ordered_with(k, v)
            cache.append(k, v, check_finite=False)
            causal, window_arg = "lower_right", window
        # (a cache that rotates its keys holds them rotated: the query goes the same way, the output back)
        res = scaled_dot_product_attention(
            cache.rotate_query(q), keys, values, attn_mask=mask, is_causal=causal, window=window_arg, **kw
        )
        return cache.unrotate_output(res)

    def _combined_mask(self, key_padding_mask, attn_mask, B, L, S, positions):
        """torch.nn.MultiheadAttention's masks → one mask for scaled_dot_product_attention (True = attend)."""
        parts = []
        if key_padding_mask is not None:
            kpm = np.asarray(key_padding_mask)
            need = int(positions.max()) + 1 if positions.size else 0
            if kpm.ndim != 2 or kpm.shape[0] != B or kpm.shape[1] != need:
                raise ValueError(f"key_padding_mask must have shape (batch, S) = ({B}, {need}), got {kpm.shape}")
            parts.append(self._as_additive_or_bool(kpm[:, positions], "key_padding_mask")[:, None, None, :])
        if attn_mask is not None:
            am = np.asarray(attn_mask)
            if am.ndim == 3 and am.shape[0] == B * self.num_heads:
                am = am.reshape(B, self.num_heads, L, -1)
            if (
                am.shape[-2:] != (L, S)
                or am.ndim not in (2, 4)
                or (am.ndim == 4 and any(a not in (1, b) for a, b in zip(am.shape[:2], (B, self.num_heads))))
            ):
                raise ValueError(
                    f"attn_mask must have shape (L, S) = ({L}, {S}), (B, H, L, S) = "
                    f"({B}, {self.num_heads}, {L}, {S}) or (B·H, L, S), got {np.shape(attn_mask)}"
                )
            parts.append(self._as_additive_or_bool(am, "attn_mask"))
        if not parts:
            return None
        if all(p.dtype == np.bool_ for p in parts):
            allowed = parts[0]
            for p in parts[1:]:
                allowed = allowed & p
            return allowed
        total = None
        for p in parts:
            add = np.where(p, 0.0, -np.inf).astype(self.dtype) if p.dtype == np.bool_ else p.astype(self.dtype)
            with np.errstate(over="ignore"):  # an overflow is refused just below
                total = add if total is None else total + add
        if np.isposinf(total).any():  # two large finite masks can add up to +inf in the layer's dtype
            raise ValueError(f"key_padding_mask + attn_mask overflows {self.dtype.name} (+inf); use smaller values")
        return total

    @staticmethod
    def _as_additive_or_bool(mask, name):
        """torch MHA's boolean convention (True = masked out) → ours (True = attend); floats as they are."""
        if mask.dtype == np.bool_:
            return ~mask
        if mask.dtype.kind == "f":
            # refused here, at the door, so that a cached call changes nothing before it raises
            if np.isnan(mask).any() or np.isposinf(mask).any():
                raise ValueError(f"{name} contains NaN or +inf; a float {name} may hold finite values and -inf")
            return mask
        raise TypeError(
            f"{name} must be boolean (True = masked out, as in torch.nn.MultiheadAttention) or floating "
            f"(added to the scores), got dtype {mask.dtype}"
        )

    def _check_packed_input(self, x, name, dim):
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"{name} must be a packed batch of shape (tokens, {dim}) with cu_seqlens, got {x.shape}")
        check_finite_array(x, name)
        return x.astype(self.dtype, copy=False)

    def _check_input(self, x, name, dim):
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
        if x.ndim != 3 or x.shape[2] != dim:
            raise ValueError(f"{name} must have shape (batch, length, {dim}), got {x.shape}")
        check_finite_array(x, name)
        return x.astype(self.dtype, copy=False)

    def __repr__(self):
        return (
            f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype.name})"
        )


#: (layer dtype, key format, value format) seen to fit (``_check_cache_formats``): a decode step checks
#: them once per layer dtype and cache format, not on every call
_FITTING_CACHES = set()


def _check_cache_formats(dtype, cache):
    """Raise ``TypeError`` unless the cache's key and value formats fit a layer of ``dtype`` (float64: float64
    only; otherwise float32, float16, int8 or "int4"); remember the combination when they do."""
    allowed = (dtype,) if dtype == np.float64 else (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int8))
    for name, fmt in (("key_dtype", cache.key_dtype), ("value_dtype", cache.value_dtype)):
        is_int4 = isinstance(fmt, str) and fmt == "int4"
        if not (is_int4 and dtype != np.float64) and (is_int4 or fmt not in allowed):
            raise TypeError(
                f"cache {name} {fmt if is_int4 else fmt.name} does not fit the layer's dtype {dtype}: use "
                + " or ".join(d.name for d in allowed)
                + ("" if dtype == np.float64 else ' or "int4"')
            )
    _FITTING_CACHES.add((dtype, cache.key_dtype, cache.value_dtype))


def _with_streaming_mask(mask, q_pos, k_pos, sink_tokens, window, kw, dtype):
    """The layer's own mask (None, boolean True = attend, or additive) and a sink cache's visibility
    (``streaming_mask``: sinks + window, causal; ALiBi on absolute positions as an additive part)
    as one mask for keys at positions ``k_pos``."""
    allowed = streaming_mask(q_pos, k_pos, sink_tokens, window)
    slopes = kw["alibi_slopes"]
    if slopes is None and (mask is None or mask.dtype == np.bool_):
        return allowed if mask is None else allowed & mask
    bias = 0.0 if slopes is None else alibi_bias(q_pos, k_pos, np.asarray(slopes), dtype)
    add = np.where(allowed, bias, -np.inf).astype(dtype)
    if mask is None:
        return add
    if mask.dtype == np.bool_:
        return np.where(mask, add, -np.inf).astype(dtype)
    return add + mask
