"""The attention formula in plain float64 numpy: the oracle for tests and the baseline for benchmarks.

Written as close to the textbook as possible, with no attempt at speed or memory economy: the full
``(..., L, S)`` score matrix is materialised. Same contract as
:func:`numba_attn.scaled_dot_product_attention` (masks, both causal alignments, grouped-query
attention, sliding window, ALiBi, soft-capping, zeros for fully-masked rows), minus input
validation: give it well-formed arrays.
"""

import numpy as np

__all__ = ["scaled_dot_product_attention", "attention_weights", "causal_mask", "scaled_dot_product_attention_varlen"]


def causal_mask(L, S, alignment="upper_left"):
    """Boolean ``(L, S)`` mask, True where query ``i`` may attend to key ``j``.

    ``upper_left`` (PyTorch's ``is_causal=True``): ``j <= i``.
    ``lower_right`` (a KV cache: the last query is the newest token): ``j <= i + S - L``.
    """
    offset = 0 if alignment == "upper_left" else S - L
    return np.tril(np.ones((L, S), dtype=bool), k=offset)


def _scores(query, key, attn_mask, is_causal, scale, enable_gqa, window=None, alibi_slopes=None, softcap=None):
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(key, dtype=np.float64)
    if enable_gqa and q.ndim >= 3 and k.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        k = np.repeat(k, q.shape[-3] // k.shape[-3], axis=-3)
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    s = (q @ np.swapaxes(k, -1, -2)) * scale  # scores: Q·Kᵀ / √d_k
    L, S = s.shape[-2:]
    if softcap:
        s = softcap * np.tanh(s / softcap)
    alignment = None
    if is_causal:
        alignment = "upper_left" if is_causal is True else is_causal
    query_pos = np.arange(L)[:, None] + (0 if alignment == "upper_left" else S - L)
    key_pos = np.arange(S)[None, :]
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes, dtype=np.float64)[:, None, None]  # (H, 1, 1) on dim -3
        s = s - slopes * np.abs(query_pos - key_pos)
    allowed = np.ones((L, S), dtype=bool)
    if alignment is not None:
        allowed = causal_mask(L, S, alignment)
    if window:
        allowed = allowed & (key_pos > query_pos - window)
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        if m.dtype == np.bool_:
            allowed = allowed & m
        else:
            s = s + m.astype(np.float64)
    s = np.where(allowed, s, -np.inf)
    return s


def _with_sinks(s, sinks):
    """The scores with each head's sink logit appended as one more column (dim -1)."""
    if sinks is None:
        return s
    col = np.broadcast_to(np.asarray(sinks, dtype=np.float64)[:, None, None], s.shape[:-1] + (1,))  # dim -3 heads
    return np.concatenate([s, col], axis=-1)


def attention_weights(
    query,
    key,
    attn_mask=None,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    window=None,
    alibi_slopes=None,
    softcap=None,
    sinks=None,
):
    """softmax(Q·Kᵀ·scale + mask) as a float64 ``(..., L, S)`` array; fully-masked rows are zeros.

    ``sinks`` (H,): one logit per head joins every row's softmax as an extra column that is then
    dropped (its weight goes to no key), so with sinks a row sums to less than 1.
    """
    s = _scores(query, key, attn_mask, is_causal, scale, enable_gqa, window, alibi_slopes, softcap)
    S = s.shape[-1]
    s = _with_sinks(s, sinks)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)  # a row with no visible key: avoid -inf - -inf
    p = np.exp(s - m)
    total = p.sum(axis=-1, keepdims=True)
    return np.divide(p, total, out=np.zeros_like(p), where=total > 0)[..., :S]


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    window=None,
    alibi_slopes=None,
    softcap=None,
    sinks=None,
):
    """softmax(Q·Kᵀ·scale + mask)·V in float64; with ``return_lse`` also log Σ_j exp(score_ij).

    The log-sum-exp of a fully-masked row is ``-inf`` and its output row is zeros. ``sinks`` (H,):
    learned sink logits, one per head, in every row's softmax denominator (and its lse) with no value.
    """
    v = np.asarray(value, dtype=np.float64)
    q = np.asarray(query)
    if enable_gqa and q.ndim >= 3 and v.ndim >= 3 and q.shape[-3] != v.shape[-3]:
        v = np.repeat(v, q.shape[-3] // v.shape[-3], axis=-3)
    extras = dict(window=window, alibi_slopes=alibi_slopes, softcap=softcap)
    out = attention_weights(query, key, attn_mask, is_causal, scale, enable_gqa, sinks=sinks, **extras) @ v
    if not return_lse:
        return out
    s = _with_sinks(_scores(query, key, attn_mask, is_causal, scale, enable_gqa, **extras), sinks)
    s = np.broadcast_to(s, out.shape[:-1] + s.shape[-1:])  # batch dims that only value has
    m = s.max(axis=-1, initial=-np.inf)
    finite = np.isfinite(m)
    m0 = np.where(finite, m, 0.0)
    with np.errstate(divide="ignore"):
        lse = np.where(finite, m0 + np.log(np.exp(s - m0[..., None]).sum(axis=-1)), -np.inf)
    return out, lse


def scaled_dot_product_attention_varlen(
    query,
    key,
    value,
    cu_seqlens_q,
    cu_seqlens_k,
    is_causal=False,
    scale=None,
    return_lse=False,
    window=None,
    alibi_slopes=None,
    softcap=None,
    sinks=None,
):
    """Packed batches (flash-attention's ``cu_seqlens`` layout) in float64: a loop over the sequences,
    each through :func:`scaled_dot_product_attention` on its own (H, L_b, E) slice.

    query (total_q, H, E), key (total_k, H_kv, E), value (total_k, H_kv, Ev); H_kv may divide H.
    Returns out (total_q, H, Ev) and, with ``return_lse``, lse (total_q, H).
    """
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(key, dtype=np.float64)
    v = np.asarray(value, dtype=np.float64)
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    out = np.zeros(q.shape[:2] + v.shape[2:])
    lse = np.full(q.shape[:2], -np.inf)
    for b in range(len(cu_seqlens_q) - 1):
        qs = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
        ks = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
        o, l = scaled_dot_product_attention(
            q[qs].transpose(1, 0, 2),
            k[ks].transpose(1, 0, 2),
            v[ks].transpose(1, 0, 2),
            is_causal=is_causal,
            scale=scale,
            enable_gqa=True,
            return_lse=True,
            window=window,
            alibi_slopes=alibi_slopes,
            softcap=softcap,
            sinks=sinks,
        )
        out[qs] = o.transpose(1, 0, 2)
        lse[qs] = l.transpose(1, 0)
    return (out, lse) if return_lse else out
