"""The public API: numpy arrays in, numpy arrays out, PyTorch's names and meanings.

Data flows one way: validate and normalise (``_validate``) → pick a kernel → run it → reshape.
"""

import math
from threading import get_ident

import numpy as np
from numba.core.typing.typeof import Purpose, typeof

from . import config
from ._threads import get_num_threads, launch
from ._validate import (
    _NO_MASK,
    _NO_SLOPES,
    FLOAT16_MAX,
    _dtypes,
    check_finite_array,
    check_float_operand,
    check_scale,
    check_sinks,
    check_slopes,
    prepare_attention,
    prepare_per_head,
)
from .cache import _ROTATED_QUERIES, is_kv_cache_view, is_rotated_query, is_rotated_view
from .kernels import decode, prefill
from .kernels._load import to_float16
from .kernels._prefill_tiles import W as ROW_TILE
from .kernels._scores import MASK_NONE
from .kernels.hadamard import hadamard_rows

__all__ = ["scaled_dot_product_attention", "attention_weights"]


#: the decode kernel goes parallel at SERIAL_BELOW_FLOPS / this: a 1-token SmolLM2 step (9 query heads over
#: 3 K/V heads, D64; 2 threads, Zen 3 VM, best of 30 alternating runs) at 1024 cached tokens (1.2 M
#: multiply-adds) took 133 us serial against 105 parallel (int8 cache: 104 against 82), at 512 about the
#: same either way, at 128-256 serial was faster
DECODE_PARALLEL_SOONER = 2

#: a zero soft-cap (none) in each arithmetic dtype, as the kernels take it
_ZERO = {np.dtype(dt): dt(0) for dt in (np.float32, np.float64)}


def _use_decode(L, S):
    """Few query rows (L) against many keys (S) (float or quantised keys/values: both kernels read either)."""
    return L <= config.DECODE_MAX_QUERY_ROWS and S >= config.DECODE_MIN_KEYS


def _run(plan, out=None):
    """Run the kernel the plan calls for; (out (N, L, Ev), lse (N, L)) in the arithmetic's dtype.
    ``out``: a C-contiguous (N, L, Ev) array of that dtype to write into (else one is allocated)."""
    N, L, Ev = plan.n_batch, plan.L, plan.Ev
    if out is None:
        out = np.empty((N, L, Ev), plan.dtype)
    if N == 0 or L == 0:
        return out, np.empty((N, L), plan.dtype)
    dt = plan.dtype.type
    common = (
        plan.S,
        plan.mask,
        plan.m_idx,
        plan.mask_kind,
        plan.mask_row_step,
        plan.mask_col_step,
        plan.is_causal,
        plan.pos_offset,
        plan.window,
        plan.slopes,
        plan.sinks,
        dt(plan.softcap),
        dt(plan.scale),
    )
    operands = (plan.query, plan.key, plan.k_scales, plan.k_block, plan.value, plan.v_scales, plan.v_block)
    operands += (plan.q_idx, plan.k_idx, plan.v_idx)
    if not _use_decode(L, plan.S):
        return out, _prefill_call(operands, common, plan.E, plan.check_finite, out)
    groups = plan.groups
    if groups is None:  # uneven (see _validate.kv_groups)
        groups = np.arange(N, dtype=np.int64).reshape(N, 1)
    return out, _decode_call(operands + (groups,), common, plan.E, plan.check_finite, out)


def _score_features(common):
    """The kernels' ``score_features``: None when ``common`` has no mask, ALiBi, soft-cap or window (a build
    compiled without their code: the first plain call compiles seconds faster), else True."""
    # common: S, mask, m_idx, mask_kind, mask_li, mask_sj, is_causal, pos_offset, window, slopes, sinks, softcap, scale
    plain = common[3] == MASK_NONE and common[9].shape[0] == 0 and common[11] == 0 and common[8] == 0
    return None if plain else True


def _decode_split(N, L, S, E, Ev, n_work):
    """(serial, n_split) of a decode call: N·L query rows over S keys in ``n_work`` (KV group, row chunk)
    pairs. Serial below ``config.SERIAL_BELOW_FLOPS`` / ``DECODE_PARALLEL_SOONER``, else split over the
    key range for every thread."""
    if N * L * S * (E + Ev) < config.SERIAL_BELOW_FLOPS // DECODE_PARALLEL_SOONER:
        return True, 1
    return False, decode_splits(n_work, S)


def _decode_work(groups, L):
    """(KV group, row chunk) pairs of a decode call with ``groups`` (G, g) and L query rows per head."""
    return groups.shape[0] * -(-(groups.shape[1] * L) // config.DECODE_MAX_ROWS)


def _decode_call(operands, common, E, check_finite, out, q_rotation=None, features=False):
    """The decode kernel on ``operands`` (query, key, key scales, key block, value, value scales,
    value block, q_idx, k_idx, v_idx, groups) and ``common`` (S … scale, as ``_run`` passes them to
    every kernel), into ``out`` (N, L, Ev); returns lse (N, L). Serial or split (``_decode_split``).
    Raises on a non-finite query, score or result when ``check_finite``. ``features``: the
    kernels' ``score_features`` when the caller knows it (None: no mask, ALiBi, soft-cap or window), else
    worked out from ``common``."""
    groups = operands[10]
    N, L, Ev = out.shape
    lse = np.empty((N, L), out.dtype)
    n_work = _decode_work(groups, L)
    serial, n_split = _decode_split(N, L, common[0], E, Ev, n_work)
    check = np.empty(n_work * n_split, np.int64)
    features = _score_features(common) if features is False else features
    args = _decode_args(operands, common, serial, n_split, features, q_rotation, out, lse, check)
    kernel = decode.decode_serial if serial else decode.decode_parallel
    _launch_checked(kernel, serial, args, check, check_finite, common[0])
    return lse


def _decode_args(operands, common, serial, n_split, features, q_rotation, out, lse, check):
    """The decode kernel's arguments, in its order: ``operands`` and ``common`` (see ``_decode_call``), its
    block sizes, ``features`` and ``q_rotation``, the work items per call of its body (all of them
    serial, else one), then ``out``, ``lse`` and ``check``."""
    items = check.shape[0] if serial else 1
    blocks = (config.DECODE_MAX_ROWS, n_split, config.DECODE_BLOCK_K, features, q_rotation, items, out, lse, check)
    return operands + common + blocks


def _prefill_call(operands, common, E, check_finite, out):
    """The prefill kernel on ``operands`` (query, key, key scales, key block, value, value scales,
    value block, q_idx, k_idx, v_idx) and ``common`` (as ``_decode_call``), into ``out`` (N, L, Ev);
    returns lse (N, L). Serial below ``config.SERIAL_BELOW_FLOPS``."""
    N, L, Ev = out.shape
    lse = np.empty((N, L), out.dtype)
    serial = N * L * common[0] * (E + Ev) < config.SERIAL_BELOW_FLOPS
    block_q = prefill_block_q(N, L)
    check = np.empty(N * -(-L // block_q), np.int64)
    features = _score_features(common)
    args = operands + common + (block_q, config.PREFILL_BLOCK_K, bool(check_finite), features, out, lse, check)
    kernel = prefill.prefill_serial if serial else prefill.prefill_parallel
    _launch_checked(kernel, serial, args, check, check_finite, common[0])
    return lse


def _launch_checked(kernel, serial, args, check, check_finite, S):
    """Run an attention kernel on ``args`` (query, key, key scales, key block, value, …, out, lse,
    check) and name the culprit if it counted a non-finite value (``S`` keys). Every kernel counts
    non-finite query values, raw scores, accumulators and result rows into ``check`` in loops that
    read them anyway, and returns how many work items flagged one: one parallel region per call, no
    scan afterwards (np.count_nonzero(check) took ~1.5 µs of a ~35 µs decode call)."""
    flagged = kernel(*args) if serial else launch(kernel, *args)
    if check_finite and flagged:
        out = args[-3]
        _raise_nonfinite(args[0], args[1], args[4], out.shape[1], S, out.dtype)


def check_attend_out(out, shape, result):
    """``KVCache.attend``'s ``out``: None, or a writeable C-contiguous array of ``shape`` and dtype ``result``."""
    if out is not None and (
        not isinstance(out, np.ndarray)
        or out.shape != shape
        or out.dtype != result
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise ValueError(
            f"out must be a writeable C-contiguous {result.name} array of shape (batch, H, L, value_dim) "
            f"= {shape}, got "
            + (f"{out.dtype.name} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__)
        )


def into_out(res, out):
    """``res``, or ``res`` copied into the caller's ``out`` (returned)."""
    if out is None:
        return res
    out[...] = res
    return out


def _cache_fixed(cache, query_dtype, B, H):
    """What every ``attend`` call of one query dtype and head count on ``cache`` shares, worked out
    once and kept on the cache: (compute dtype, result dtype, whether the kernels read the storage in
    place, the kernels' storage operands and batch indices (q_idx, k_idx, v_idx, groups) and m_idx)."""
    Hkv = cache.num_kv_heads
    q_proxy = np.empty(0, query_dtype)
    dtype, result = _dtypes(q_proxy, cache._keys, cache._values, None)  # the rule of every call
    # the kernels read quantised stores, and float ones whose width fits the arithmetic (float16 as
    # bits in float32 arithmetic), in place; a float64 query over a float32 cache converts (a copy)
    native = all(
        x.dtype.kind != "f" or (x.dtype == np.float64) == (dtype == np.float64) for x in (cache._keys, cache._values)
    )
    q_idx = np.arange(B * H, dtype=np.int64)
    k_idx = np.repeat(np.arange(B * Hkv, dtype=np.int64), H // Hkv)
    index = (q_idx, k_idx, k_idx, q_idx.reshape(B * Hkv, H // Hkv))
    default_scale = 1.0 / math.sqrt(cache.head_dim)  # check_scale(None, E)
    operands = cache._kernel_operands() + index
    return dtype, result, native, operands, np.zeros(B * H, np.int64), default_scale, dtype.type(default_scale)


def _cache_common(fixed, n_valid, L, in_order, window, slopes, sinks, softcap, scale):
    """The kernels' ``common`` arguments (as ``_run`` passes them) for L queries, the newest L positions,
    over a cache's n_valid keys in storage (``fixed``: ``_cache_fixed``): no mask, causal bottom-right
    when the keys are in position order (a wrapped ring's one query sees every key held)."""
    # S, mask, m_idx, mask kind and steps; is_causal, pos_offset, window; the per-head features
    no_mask = _NO_MASK[fixed[0]]
    return (n_valid, no_mask, fixed[4], MASK_NONE, 0, 0, in_order, n_valid - L, window, slopes, sinks, softcap, scale)


def lean_plan(cache, q, fixed):
    """What ``attend_lean`` needs for later calls with a query of ``q``'s dtype and shape and no other
    argument (``KVCache.attend`` asks after such a call went through the general path), or None where
    such calls need the general path: a query that is not in the arithmetic's dtype, storage the kernels
    cannot read in place, sink tokens (``KVCache.attend`` asks only for queries of at most
    ``config.DECODE_MAX_QUERY_ROWS`` tokens).
    A tuple: (fixed, q_rotation, v_rotation, the query and result shapes for the kernel, value_dim,
    n_work, the unused arguments in the arithmetic's dtype, scratch, entries); v_rotation: the Hadamard
    block of a cache storing its values rotated (the result is rotated back in place), else 0; scratch:
    the kernel's lse and check arrays per (thread, n_split), reused; entries: per kernel, its compiled
    entry point for these calls' argument types (``compiled_entry``)."""
    dtype, result, native = fixed[:3]
    B, H, L, E = q.shape
    if q.dtype != dtype or result != dtype or not native or cache.sink_tokens:
        return None
    q_rotation = cache._key_rotation if cache._rotating and cache.rotate_keys else None
    v_rotation = cache._value_rotation if cache.rotate_values else 0
    Ev = cache.value_dim
    n_work = _decode_work(fixed[3][9], L)  # (key … v_block, q_idx, k_idx, v_idx, groups)
    shapes = ((B * H, L, E), (B * H, L, Ev), (B, H, L, Ev))
    no_features = (_NO_SLOPES[dtype], _NO_SLOPES[dtype], _ZERO[dtype], fixed[6])  # slopes, sinks, softcap, scale
    return fixed, q_rotation, v_rotation, shapes, Ev, n_work, no_features, {}, {}


def compiled_entry(kernel, args):
    """``kernel``'s compiled entry point for the numba types of ``args``: what a call of the dispatcher
    ends in, without the dispatcher's typing of every argument on every call (~2 µs of the decode
    kernel's 33 on Zen 1). Valid only for arguments of exactly those types. ``kernel`` itself where it
    has none for them (or is not a numba dispatcher: a test's spy)."""
    overloads = getattr(kernel, "overloads", None)
    if overloads is None:
        return kernel
    cres = overloads.get(tuple(typeof(a, Purpose.argument) for a in args))
    return kernel if cres is None else cres.entry_point


def attend_lean(cache, q, plan, check_finite):
    """``KVCache.attend(q)`` with no other argument, for a query of a dtype and shape the general path
    has validated on this cache (``plan``: ``lean_plan``): one decode kernel call and little else: the
    kernel's arguments from the plan, its lse and check arrays reused (they are the kernel's scratch:
    every call writes all of them; one pair per thread, as two threads may run a parallel kernel at
    once). None where the general path must answer: a query that is not C-contiguous, more queries
    than keys held, a wrapped ring with more than one query (its keys are then out of position
    order), or too few keys for the decode kernel."""
    fixed, q_rotation, v_rotation, shapes, Ev, n_work, no_features, scratch, entries = plan
    L = shapes[0][1]
    slots = cache._keys.shape[2]
    wrapped = cache._length > slots
    n_valid = slots if wrapped else cache._length
    if (wrapped and L > 1) or L > n_valid or not _use_decode(L, n_valid):
        return None
    flags = q.flags
    if not (flags.c_contiguous and flags.aligned):  # (numba types an unaligned array apart)
        return None
    q3 = q.reshape(shapes[0])  # a new view of the caller's array: its flags are ours to set
    q3.setflags(write=False)  # one numba type whatever the caller passed
    res = np.empty(shapes[1], fixed[0])
    N, _, E = shapes[0]
    serial, n_split = _decode_split(N, L, n_valid, E, Ev, n_work)
    key = (get_ident(), n_split)
    buffers = scratch.get(key)
    if buffers is None:
        if len(scratch) > 64:  # threads come and go
            scratch.clear()
        buffers = scratch[key] = (np.empty((N, L), fixed[0]), np.empty(n_work * n_split, np.int64))
    lse, check = buffers
    # no window: a cache's window hides none of the n_valid keys it holds from its newest queries
    common = _cache_common(fixed, n_valid, L, not wrapped, 0, *no_features)
    args = _decode_args((q3,) + fixed[3], common, serial, n_split, None, q_rotation, res, lse, check)
    kernel = decode.decode_serial if serial else decode.decode_parallel
    entry = entries.get(kernel)
    # every argument's numba type is fixed by the plan (the query: its dtype, a C-contiguous aligned
    # read-only view; ints, bools and the plan's arrays otherwise), so the compiled entry point of the
    # first call serves the next ones
    _launch_checked(kernel if entry is None else entry, serial, args, check, check_finite, n_valid)
    if entry is None:
        entries[kernel] = compiled_entry(kernel, args)
    if v_rotation:  # values stored rotated: the result back in their own basis (H·out, in place)
        rows = res.reshape(-1, Ev)
        hadamard_rows(rows, v_rotation, rows)
    return res.reshape(shapes[2])


def attend_cache(cache, q, scale, window, slopes, sinks, softcap, out, check_finite, q_rotation=None):
    """``KVCache.attend`` after its checks: one kernel on the cache's storage (see there).

    What depends only on the cache and the query's dtype and heads (dtypes, storage views, batch
    indices) is worked out on the first call and kept (``_cache_fixed``); a call then checks ``out``,
    views the query and runs the decode kernel (or, for more than ``DECODE_MAX_QUERY_ROWS`` rows or
    few keys, the prefill kernel)."""
    B, H, L, E = q.shape
    Ev = cache.value_dim
    fixed = cache._attend_fixed.get((q.dtype, H))
    if fixed is None:
        fixed = cache._attend_fixed[(q.dtype, H)] = _cache_fixed(cache, q.dtype, B, H)
    dtype, result, native, operands, _, default_scale, default_scale_dt = fixed
    scale = default_scale if scale is None else check_scale(scale, E)
    if out is not None:
        check_attend_out(out, (B, H, L, Ev), result)
    slots = cache._keys.shape[2]
    wrapped = cache._length > slots
    n_valid = slots if wrapped else cache._length
    # a window whose ring has wrapped keeps storage order != position order: fine for one query
    # that sees every held key, otherwise the keys go in position order (a copy)
    reorder = wrapped and (L > 1 or slopes is not None or (window is not None and window < n_valid))
    if q_rotation and (reorder or not native or not _use_decode(L, n_valid)):
        # (only the decode kernel rotates the query as it loads it: the other paths take H·q)
        q = cache._rotated_query(q)
        q_rotation = None
    if reorder or not native:
        keys, values = cache.ordered()
        if cache.rotate_keys:  # a rotated query (KVCache.attend's lean path registers it only here): sdpa's guard asks
            _ROTATED_QUERIES[id(q)] = q
        res = scaled_dot_product_attention(
            q,
            keys,
            values,
            is_causal="lower_right",
            scale=scale,
            enable_gqa=True,
            window=window,
            alibi_slopes=slopes,
            softcap=softcap or None,
            sinks=sinks,
            check_finite=check_finite,
        )
        return into_out(res, out)
    # (B·H, L, E) C-contiguous read-only, float16 as its bits: _validate._storage's result, without its
    # KV-cache-view widening (a query never needs it) which costs ~2.5 µs of a ~25 µs decode call
    if q.dtype == dtype and q.flags.c_contiguous:
        q3 = q.reshape(B * H, L, E)  # a new view of the caller's array: its flags are ours to set
    else:
        q3 = q.view(np.uint16) if q.dtype == np.float16 and dtype == np.float32 else q.astype(dtype, copy=False)
        q3 = np.ascontiguousarray(q3.reshape(B * H, L, E)).view()
    q3.setflags(write=False)  # one numba type whatever the caller passed
    in_order = not wrapped
    dt = dtype.type
    if slopes is None and sinks is None:
        slopes = sinks = _NO_SLOPES[dtype]
    else:
        slopes = prepare_per_head(slopes, check_slopes, "alibi_slopes", (B, H), dtype)
        sinks = prepare_per_head(sinks, check_sinks, "sinks", (B, H), dtype)
    direct = out is not None and result == dtype
    res = out.reshape(B * H, L, Ev) if direct else np.empty((B * H, L, Ev), dtype)
    # a window of n_valid keys or more hides none of them from these queries (the last n_valid
    # positions): no window, so the call takes the build without the score features
    window = window if in_order and window is not None and window < n_valid else 0
    softcap = _ZERO[dtype] if softcap == 0 else dt(softcap)
    scale = default_scale_dt if scale is default_scale else dt(scale)
    common = _cache_common(fixed, n_valid, L, in_order, window, slopes, sinks, softcap, scale)
    if _use_decode(L, n_valid):
        _decode_call((q3,) + operands, common, E, check_finite, res, q_rotation)
    else:  # (operands end with the decode kernel's groups)
        _prefill_call((q3,) + operands[:-1], common, E, check_finite, res)
    if direct:
        return out
    if result != dtype:
        res = _to_out_dtype(res, result, cache.value_dtype == np.float16)
    res = res.reshape(B, H, L, Ev)
    return res if out is None else into_out(res, out)


def _raise_nonfinite(query, key, value, L, S, dtype):
    """A kernel saw a NaN/inf query value or score, or produced a non-finite result: name the culprit."""
    dtype = np.dtype(dtype)
    for name, x, rows in (("query", query, L), ("key", key, S), ("value", value, S)):
        if x.dtype.kind == "f" or x.dtype == np.uint16:  # quantised codes cannot hold NaN/inf
            check_finite_array(x, name, rows)
    raise ValueError(
        f"the attention overflowed {dtype.name} although query, key and value are finite: "
        f"|scale·query·key|, or the weighted sum of value rows, exceeds {np.finfo(dtype).max:.3g}; "
        "scale the inputs down"
    )


def _to_out_dtype(out, dtype, value_is_half):
    if out.dtype == dtype:
        return out
    # a float16 value bounds the result (each output row is a weighted average of value rows)
    if dtype == np.float16 and not value_is_half and out.size and np.abs(out).max() > FLOAT16_MAX:
        raise ValueError("the result exceeds float16's range (65504); ask for out_dtype=np.float32")
    if dtype == np.float16 and out.dtype == np.float32:
        return to_float16(out)  # numpy's astype to float16 cost ~10 % of a float16 prefill
    return out.astype(dtype)


def prefill_block_q(N, L):
    """Query rows per prefill work item: the larger block when it still leaves every thread
    PREFILL_ITEMS_PER_THREAD items (N batch entries × ceil(L / block) items), rounded down to whole
    register tiles of W rows."""
    big = config.PREFILL_BLOCK_Q_LARGE
    block = big if N * -(-L // big) >= config.PREFILL_ITEMS_PER_THREAD * get_num_threads() else config.PREFILL_BLOCK_Q
    return max(ROW_TILE, block // ROW_TILE * ROW_TILE)  # whole register tiles (W = 24 would pad 128 to 144)


def decode_splits(n_items, S):
    """Parts of the key range per (KV group, row chunk): enough work items for every thread, each part
    at least DECODE_MIN_SPLIT keys."""
    threads = get_num_threads()
    want = -(-config.DECODE_ITEMS_PER_THREAD * threads // n_items)
    return int(max(1, min(want, S // config.DECODE_MIN_SPLIT)))


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    window=None,
    alibi_slopes=None,
    softcap=None,
    sinks=None,
    return_lse=False,
    check_finite=True,
    out_dtype=None,
):
    """softmax(query·keyᵀ·scale + attn_mask)·value, fused: no (L, S) score matrix is ever allocated.

    A short query (L ≤ 8 rows) against many keys (S ≥ 256) takes the split-K decode kernel, which
    spreads the keys of even one head over all threads; everything else the prefill kernel.

    Parameters
    ----------
    query : ndarray (..., L, E), float16, float32 or float64
    key : ndarray (..., S, E), or a :class:`~numba_attn.QuantizedTensor` (int8 or 4-bit, ``numba_attn.quantize``)
    value : ndarray (..., S, Ev), or a ``QuantizedTensor``
        Leading (batch) dims broadcast against each other, as in numpy; any number of them, including
        none. With ``enable_gqa`` dim -3 is the heads dim and key/value may have fewer heads.
    attn_mask : ndarray, optional
        Broadcastable to (..., L, S). Boolean: True = the key takes part (PyTorch's convention).
        Floating: added to the scores; -inf hides a key.
    dropout_p : float
        Must be 0.0 (inference only); present so PyTorch call sites port unchanged.
    is_causal : bool or str
        ``False``; ``True`` or ``"upper_left"``: query i sees keys j ≤ i (PyTorch's ``is_causal``);
        ``"lower_right"``: query i sees keys j ≤ i + S − L, the alignment of a KV cache where the
        last query is the newest token. Combined with ``attn_mask``, a key must pass both.
    scale : float, optional
        Multiplies the scores; default 1/√E. Must be finite and > 0.
    enable_gqa : bool
        Grouped-query attention: key/value carry H_kv heads on dim -3, query carries H = g·H_kv;
        query head h uses key/value head h // g (PyTorch's layout).
    window : int, optional
        Sliding-window attention (needs ``is_causal``): the query at key position p sees the keys
        p - window < j <= p, at most ``window`` of them (Mistral/Gemma style).
    alibi_slopes : array (H,), optional
        ALiBi: the score of query position p and key j gets ``- slope[h]·|p - j|`` (h = dim -3).
        Query i sits at key position i + S - L, except with ``is_causal=True/"upper_left"``: i.
    softcap : float, optional
        Logit soft-capping (Gemma-2): scores become ``softcap·tanh(scores / softcap)`` before
        ALiBi and masks.
    sinks : array (H,), optional
        Learned attention sinks (gpt-oss; ggml's ``sinks``, ONNX Runtime's ``head_sink``): one logit per
        query head (dim -3) that joins every row's softmax as one more score, taken as it is (no scale,
        soft-cap, ALiBi or mask), and takes no value: out_i = Σ_j exp(z_ij)·v_j / (exp(sink_h) + Σ_j exp(z_ij)).
        A row can then give the sink most of its weight and little to the keys; a fully masked row
        gets zeros and lse = sink_h.
    return_lse : bool
        Also return the log-sum-exp of each row's scores (with ``sinks``: the sink's term included),
        shape (..., L): what two partial results
        over disjoint key sets need to be merged exactly.
    check_finite : bool
        Raise ``ValueError`` naming the operand when query, key or value hold NaN/inf, or when the
        arithmetic overflows (default). The kernels check the values they read, in loops that read
        them anyway, and the error comes after the kernel has run (no result is returned). False
        ignores what they find.
    out_dtype : dtype, optional
        The result's dtype (e.g. ``np.float32`` for float16 inputs).

    Returns
    -------
    out : ndarray (..., L, Ev). Its dtype is ``np.result_type`` of the float inputs (quantised ones do
        not count), or ``out_dtype``. The arithmetic runs in float64 if any input is float64, otherwise in
        float32: float16, int8 and 4-bit storage is converted inside the kernels, element by element,
        never copied up front.
    lse : ndarray (..., L) in the arithmetic's dtype, only with ``return_lse``.

    A query row whose keys are all masked gets zeros (PyTorch returns NaN there) and lse = -inf.

    Examples
    --------
    >>> import numpy as np
    >>> import numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 5, 8), dtype=np.float32)    # batch 2, 4 heads, L = 5, E = 8
    >>> k = rng.standard_normal((2, 4, 7, 8), dtype=np.float32)    # S = 7
    >>> v = rng.standard_normal((2, 4, 7, 3), dtype=np.float32)    # Ev = 3
    >>> out = numba_attn.scaled_dot_product_attention(q, k, v, is_causal="lower_right")
    >>> out.shape, out.dtype
    ((2, 4, 5, 3), dtype('float32'))
    >>> ref = numba_attn.reference.scaled_dot_product_attention(q, k, v, is_causal="lower_right")
    >>> bool(np.allclose(out, ref, rtol=1e-5, atol=1e-5))
    True
    >>> sees = np.ones((5, 7), bool)
    >>> sees[0] = False                                            # query 0 may attend to no key
    >>> numba_attn.scaled_dot_product_attention(q, k, v, attn_mask=sees)[0, 0, 0]
    array([0., 0., 0.], dtype=float32)
    """
    plan = prepare_attention(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        check_finite,
        window,
        alibi_slopes,
        softcap,
        out_dtype,
        sinks,
    )
    if plan.is_causal and plan.pos_offset == 0 and plan.L < plan.S and is_kv_cache_view(key):
        raise ValueError(
            f"is_causal={is_causal!r} aligns the causal diagonal top-left (query i sees keys j <= i), so "
            f"these {plan.L} new queries would see only the first {plan.L} of the {plan.S} cached keys; "
            "with a KVCache pass is_causal='lower_right', or call cache.attend(query)"
        )
    if (is_rotated_view(key) or is_rotated_view(value)) and not is_rotated_query(query):
        raise ValueError(
            "key/value are views of a KVCache that stores them Hadamard-rotated (rotate=...): this query "
            "would score against rotated keys, or average rotated values; pass cache.rotate_query(query) and "
            "cache.unrotate_output(out), or call cache.attend(query)"
        )
    out, lse = _run(plan)
    out = _to_out_dtype(out, plan.out_dtype, plan.value.dtype == np.uint16)
    out = out.reshape(plan.batch_shape + (plan.L, plan.Ev))
    if return_lse:
        return out, lse.reshape(plan.batch_shape + (plan.L,))
    return out


def attention_weights(
    query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *, sinks=None, check_finite=True
):
    """softmax(query·keyᵀ·scale + attn_mask) as a (..., L, S) array: which keys each query attends to.

    For inspecting small inputs (it materialises the L×S matrix the fused kernel avoids): more than
    ``config.MAX_WEIGHTS_ELEMENTS`` weights are refused. Same arguments and conventions as
    :func:`scaled_dot_product_attention` (``key`` may be a ``QuantizedTensor``); fully-masked
    rows are zeros; with ``sinks`` (H,) each row sums to 1 minus the sink's share. The weights come
    from the same fused kernel, applied to columns of an identity
    "value" matrix, so they are exactly the weights ``scaled_dot_product_attention`` uses; the
    identity is taken a block of columns at a time, so no temporary exceeds the result's size
    bound either (each block re-runs the kernel: S keys cost ⌈S² / MAX_WEIGHTS_ELEMENTS⌉ passes).

    Examples
    --------
    >>> import numpy as np
    >>> import numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((3, 4)), rng.standard_normal((6, 4))     # L = 3, S = 6, E = 4
    >>> w = numba_attn.attention_weights(q, k, is_causal=True)
    >>> w.shape, w.dtype
    ((3, 6), dtype('float64'))
    >>> bool(np.allclose(w.sum(axis=-1), 1.0)), bool((w[0, 1:] == 0).all())  # query 0 sees key 0 only
    (True, True)
    >>> bool(np.allclose(w, numba_attn.reference.attention_weights(q, k, is_causal=True)))
    True
    """
    q = check_float_operand(query, "query")
    k = check_float_operand(key, "key", allow_quantized=True)
    L, S = q.shape[-2], k.shape[-2]
    k_batch = k.shape[:-2]
    if enable_gqa and len(k_batch) and len(q.shape[:-2]):
        k_batch = k_batch[:-1] + (q.shape[-3],)
    try:
        batch = np.broadcast_shapes(q.shape[:-2], k_batch)
    except ValueError:
        raise ValueError(f"batch dims of query {q.shape[:-2]} and key {k.shape[:-2]} do not broadcast") from None
    elements = math.prod(batch) * L * S
    if elements > config.MAX_WEIGHTS_ELEMENTS:
        raise ValueError(
            f"attention_weights would materialise {elements} weights "
            f"(> {config.MAX_WEIGHTS_ELEMENTS}); use scaled_dot_product_attention, which never builds the L×S matrix"
        )
    dtype = q.dtype
    # identity columns [j0, j0 + width): one "value" per key head, so that grouped-query attention sees
    # matching heads; at most config.MAX_WEIGHTS_ELEMENTS of them at a time (S × width)
    width = max(1, min(S, config.MAX_WEIGHTS_ELEMENTS // max(S, 1)))
    parts = []
    for j0 in range(0, max(S, 1), width):
        cols = min(width, S - j0) if S else 1
        identity = np.zeros((S, cols), dtype)
        identity[j0 + np.arange(min(cols, max(S - j0, 0))), np.arange(min(cols, max(S - j0, 0)))] = 1
        value = np.broadcast_to(identity, k.shape[:-2] + identity.shape)
        parts.append(
            scaled_dot_product_attention(
                q,
                k,
                value,
                attn_mask=attn_mask,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
                sinks=sinks,
                check_finite=check_finite,
            )
        )
        if S == 0:
            return parts[0][..., :0]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
