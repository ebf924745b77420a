"""Packed batches of different lengths: ``scaled_dot_product_attention_varlen`` (flash-attention's
``flash_attn_varlen_func`` convention), its checks at the door and the work table of its kernel.

Data flows as in ``api``: validate and normalise → work table → kernel (``kernels.varlen``) → result.
"""

import numbers

import numpy as np

from . import config
from ._threads import get_num_threads, launch
from ._validate import (
    _FLOAT_DTYPES,
    _NO_SLOPES,
    _as_array,
    _dtypes,
    _read_only,
    check_causal,
    check_finite_array,
    check_out_dtype,
    check_scale,
    check_sinks,
    check_slopes,
    check_softcap,
    check_window,
    per_head_in,
)
from .api import _to_out_dtype
from .kernels import varlen
from .kernels._prefill_tiles import W as ROW_TILE
from .quant import QuantizedTensor

__all__ = ["scaled_dot_product_attention_varlen"]

#: cost of a work item besides its multiply-adds (loading the block, writing the rows), in the same
#: units (multiply-adds per query row), for balancing the bins
_ITEM_ROW_OVERHEAD = 64


def _check_packed(x, name, shape_text):
    """A packed operand: a float16/32/64 array of shape (tokens, heads, features)."""
    if isinstance(x, QuantizedTensor):
        raise TypeError(
            f"{name} cannot be an int8 QuantizedTensor in scaled_dot_product_attention_varlen (its kernel "
            f"reads float16/32/64 only); pass numba_attn.dequantize({name}) or float16 {name}"
        )
    x = _as_array(x, name)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got dtype {x.dtype}")
    if x.ndim != 3:
        raise ValueError(f"{name} must be a packed 3-D array {shape_text}, got shape {x.shape}")
    return x


def check_cu_seqlens(cu_seqlens, name, total, operand):
    """Cumulative sequence lengths: an int array (B + 1,) starting at 0, nondecreasing, ending at ``total``
    (the tokens of ``operand``). Returns it as C-contiguous int64."""
    cu = _as_array(cu_seqlens, name)
    if cu.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array (B + 1,) of offsets, got dtype {cu.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be a 1-D array (B + 1,) of offsets starting at 0, got shape {cu.shape}")
    if cu.dtype == np.uint64 and cu.size and int(cu.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds offsets beyond int64")
    cu = np.ascontiguousarray(cu, dtype=np.int64)
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {int(cu[0])}")
    if (np.diff(cu) < 0).any():
        at = int(np.argmax(np.diff(cu) < 0))
        raise ValueError(
            f"{name} must be nondecreasing (sequence lengths ≥ 0), got {name}[{at}] = {int(cu[at])} > "
            f"{name}[{at + 1}] = {int(cu[at + 1])}"
        )
    if cu[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens of {operand} ({total}), got {int(cu[-1])}")
    return _read_only(cu)


def _packed_storage(x, dtype):
    """The kernel operand for x: C-contiguous, read-only (one numba type whatever the caller passed);
    float16 stays float16 as its uint16 bits when the arithmetic is float32."""
    if x.dtype == np.float16 and dtype == np.float32:
        x = x.view(np.uint16)
    else:
        x = x.astype(dtype, copy=False)
    return _read_only(np.ascontiguousarray(x))


def _block_q(L, heads, causal):
    """Query rows per work item: the larger block when it still leaves every thread
    PREFILL_ITEMS_PER_THREAD items (as ``api.prefill_block_q``). Causal: half the usual block, so that
    a short sequence's first rows skip the keys after them (a 128-row block of a 128-token sequence
    visits every key; two 64-row blocks visit 3/4 of them)."""
    if causal:
        return max(1, config.PREFILL_BLOCK_Q // 2)
    big = config.PREFILL_BLOCK_Q_LARGE
    if heads * int((-(-L // big)).sum()) >= config.PREFILL_ITEMS_PER_THREAD * get_num_threads():
        return big
    return config.PREFILL_BLOCK_Q


def work_table(cu_q, cu_k, heads, block_q, alignment, window, E, Ev, n_bins, row_tile=1):
    """(items (n, 3) int64 rows (b, h, i0), bin_start (n_bins + 1,), total cost) for ``kernels.varlen``.

    One item per (sequence b, head h, block of ``block_q`` query rows starting at local row i0); a
    sequence with no query rows has none. An item's cost is the rows it computes (its rows, rounded
    up to a multiple of ``row_tile`` as the kernel does) × the keys it visits × (E + Ev)
    (the causal rule and the window cut the keys as ``_scores.visible_key_range`` does) plus a fixed
    per-row part. Items are sorted by cost, largest first, and dealt to the bins in a snake order
    (0, 1, …, n−1, n−1, …, 0, 0, 1, …), so the bins' costs differ by at most about one item's.
    """
    L = np.diff(cu_q)
    S = np.diff(cu_k)
    blocks = -(-L // block_q)
    n_blocks = int(blocks.sum())
    b = np.repeat(np.arange(L.shape[0], dtype=np.int64), blocks)
    first = np.repeat(np.cumsum(blocks) - blocks, blocks)
    i0 = (np.arange(n_blocks, dtype=np.int64) - first) * block_q
    i1 = np.minimum(L[b], i0 + block_q)
    Sb = S[b]
    if alignment is None:
        keys = Sb
    else:
        offset = 0 if alignment == "upper_left" else Sb - L[b]
        end = np.clip(i1 + offset, 0, Sb)
        begin = np.clip(i0 + offset - window + 1, 0, end) if window else 0
        keys = end - begin
    rows = i1 - i0
    rem = rows % row_tile
    rows = np.where((rem > 0) & (8 * rem >= row_tile), rows + row_tile - rem, rows)
    cost = rows * (keys * (E + Ev) + E + _ITEM_ROW_OVERHEAD)
    items = np.empty((n_blocks * heads, 3), np.int64)
    items[:, 0] = np.repeat(b, heads)
    items[:, 1] = np.tile(np.arange(heads, dtype=np.int64), n_blocks)
    items[:, 2] = np.repeat(i0, heads)
    cost = np.repeat(cost, heads)
    n_bins = max(1, min(n_bins, items.shape[0]))
    order = np.argsort(-cost, kind="stable")
    p = np.arange(order.shape[0])
    lane = p % n_bins
    bins = np.where((p // n_bins) % 2 == 0, lane, n_bins - 1 - lane)
    by_bin = order[np.argsort(bins, kind="stable")]
    bin_start = np.zeros(n_bins + 1, np.int64)
    np.cumsum(np.bincount(bins, minlength=n_bins), out=bin_start[1:])
    return np.ascontiguousarray(items[by_bin]), bin_start, int(cost.sum())


def _raise_nonfinite(q, k, v, dtype):
    """The kernel saw a NaN/inf query value or score, or produced a non-finite result: name the culprit."""
    for name, x in (("query", q), ("key", k), ("value", v)):
        check_finite_array(x, name)
    raise ValueError(
        f"the attention overflowed {dtype.name} although query, key and value are finite: "
        f"|scale·query·key|, or the weighted sum of value rows, exceeds {np.finfo(dtype).max:.3g}; "
        "scale the inputs down"
    )


def scaled_dot_product_attention_varlen(
    query,
    key,
    value,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    is_causal=False,
    scale=None,
    enable_gqa=None,
    window=None,
    alibi_slopes=None,
    softcap=None,
    sinks=None,
    return_lse=False,
    check_finite=True,
    out_dtype=None,
):
    """Attention over a packed batch of sequences of different lengths, with no padding.

    flash-attention's ``flash_attn_varlen_func`` layout: the B sequences' query tokens are stacked
    into ``query`` (total_q, H, E), their key and value tokens into ``key`` (total_k, H_kv, E) and
    ``value`` (total_k, H_kv, Ev). Sequence b's queries are rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``
    and its keys and values rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; each sequence attends only to
    its own keys, exactly as ``scaled_dot_product_attention`` on that sequence alone. The work is
    Σ_b L_b·S_b per head (halved by a causal rule), not B·max L·max S as for a padded batch.

    Parameters
    ----------
    query : ndarray (total_q, H, E), float16, float32 or float64
    key : ndarray (total_k, H_kv, E)
    value : ndarray (total_k, H_kv, Ev)
        H must be a multiple of H_kv: query head h uses key/value head h // (H / H_kv). int8
        ``QuantizedTensor`` keys/values are refused (``TypeError``): this kernel reads floats only.
    cu_seqlens_q, cu_seqlens_k : int arrays (B + 1,)
        Offsets of each sequence's tokens: start at 0, nondecreasing, end at total_q (total_k).
        Sequences may be empty (L_b = 0 or S_b = 0); a query with no keys gets zeros and lse = -inf.
    is_causal : bool or str
        As in ``scaled_dot_product_attention``, per sequence: ``True``/``"upper_left"``: local query i
        sees local keys j ≤ i; ``"lower_right"``: j ≤ i + S_b − L_b.
    scale : float, optional
        Default 1/√E.
    enable_gqa : bool, optional
        None (default) or True: grouped-query attention follows from the head counts (flash-attention's
        convention); False: key and value must have H heads (PyTorch's check).
    window, alibi_slopes (H,), softcap, sinks (H,) :
        As in ``scaled_dot_product_attention``, with positions local to each sequence (``sinks``: learned
        sink logits, one per query head, in every row's softmax denominator).
    return_lse : bool
        Also return log Σ_j exp(score_ij), shape (total_q, H) (flash-attention returns it as (H, total_q)).
    check_finite : bool
        Raise ``ValueError`` naming the operand on NaN/inf in the values the kernel reads, or on overflow.
    out_dtype : dtype, optional
        The result's dtype; default ``np.result_type`` of the inputs. Arithmetic in float64 if any input
        is float64, else float32 (float16 converted inside the kernel).

    Returns
    -------
    out : ndarray (total_q, H, Ev)
    lse : ndarray (total_q, H) in the arithmetic's dtype, only with ``return_lse``.

    Examples
    --------
    >>> import numpy as np
    >>> import numba_attn
    >>> rng = np.random.default_rng(0)
    >>> lengths = [3, 0, 5]                                   # three sequences, one empty
    >>> cu = np.concatenate([[0], np.cumsum(lengths)])        # [0, 3, 3, 8]
    >>> q = rng.standard_normal((8, 4, 16), dtype=np.float32) # 8 tokens, 4 heads, E = 16
    >>> kv = rng.standard_normal((8, 2, 16), dtype=np.float32)  # 2 key/value heads (GQA)
    >>> out = numba_attn.scaled_dot_product_attention_varlen(q, kv, kv, cu, cu, is_causal=True)
    >>> out.shape
    (8, 4, 16)
    >>> one = numba_attn.scaled_dot_product_attention(     # the last sequence on its own, (H, L, E)
    ...     q[3:].transpose(1, 0, 2), kv[3:].transpose(1, 0, 2), kv[3:].transpose(1, 0, 2),
    ...     is_causal=True, enable_gqa=True)
    >>> bool(np.allclose(out[3:], one.transpose(1, 0, 2), atol=1e-6))
    True
    """
    q = _check_packed(query, "query", "(total_q, H, E)")
    k = _check_packed(key, "key", "(total_k, H_kv, E)")
    v = _check_packed(value, "value", "(total_k, H_kv, Ev)")
    Tq, H, E = q.shape
    Tk, Hkv, Ek = k.shape
    if Ek != E:
        raise ValueError(f"key's last dim must equal query's (E = {E}), got key shape {k.shape}")
    if v.shape[:2] != (Tk, Hkv):
        raise ValueError(
            f"value must have key's tokens and heads (total_k, H_kv, Ev) = ({Tk}, {Hkv}, Ev), got shape {v.shape}"
        )
    Ev = v.shape[2]
    if E == 0:
        raise ValueError(f"query's last dim (E) must be at least 1, got shape {q.shape}")
    if H == 0 or Hkv == 0:
        raise ValueError(f"query and key need at least one head (dim 1), got shapes {q.shape} and {k.shape}")
    if enable_gqa is not None and not isinstance(enable_gqa, (bool, np.bool_)):
        raise TypeError(f"enable_gqa must be None, True or False, got {type(enable_gqa).__name__}")
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv}) (grouped-query attention)")
    if enable_gqa is False and H != Hkv:
        raise ValueError(
            f"enable_gqa=False: key/value must have query's {H} heads, got {Hkv} (pass enable_gqa=None or True "
            "for grouped-query attention)"
        )
    cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", Tq, "query")
    cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", Tk, "key")
    if cu_q.shape != cu_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got shapes "
            f"{cu_q.shape} and {cu_k.shape}"
        )
    out_dtype = check_out_dtype(out_dtype)
    alignment = check_causal(is_causal)
    scale = check_scale(scale, E)
    window = check_window(window, alignment)
    softcap = check_softcap(softcap)
    slopes = check_slopes(alibi_slopes, H)
    sinks = check_sinks(sinks, H)
    if not isinstance(return_lse, (bool, np.bool_, numbers.Integral)):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    dtype, result = _dtypes(q, k, v, out_dtype)
    dt = dtype.type

    q3, k3, v3 = (_packed_storage(x, dtype) for x in (q, k, v))
    slopes = _NO_SLOPES[dtype] if slopes is None else per_head_in(slopes, "alibi_slopes", dtype)
    sinks = _NO_SLOPES[dtype] if sinks is None else per_head_in(sinks, "sinks", dtype)
    out = np.empty((Tq, H, Ev), dtype)
    lse = np.empty((Tq, H), dtype)
    threads = get_num_threads()
    block_q = _block_q(np.diff(cu_q), H, alignment is not None)
    row_tile = ROW_TILE if dtype == np.float32 else 1
    items, bin_start, work = work_table(cu_q, cu_k, H, block_q, alignment, window, E, Ev, threads, row_tile)
    if items.shape[0]:
        serial = work < config.SERIAL_BELOW_FLOPS
        if serial and bin_start.shape[0] > 2:
            bin_start = np.array([0, items.shape[0]], np.int64)
        check = np.empty(items.shape[0], np.int64)
        args = (
            q3,
            k3,
            v3,
            cu_q,
            cu_k,
            items,
            bin_start,
            H // Hkv,
            alignment is not None,
            alignment == "upper_left",
            window,
            slopes,
            sinks,
            dt(softcap),
            dt(scale),
            block_q,
            config.PREFILL_BLOCK_K,
            row_tile,
            bool(check_finite),
            out,
            lse,
            check,
        )
        if serial:
            varlen.varlen_serial(*args)
        else:
            launch(varlen.varlen_parallel, *args)
        if check_finite and check.any():
            _raise_nonfinite(q, k, v, dtype)
    out = _to_out_dtype(out, result, v.dtype == np.float16 and dtype == np.float32)
    if return_lse:
        return out, lse
    return out
