"""Checks and shape normalisation at the door: every error names the argument and what was expected.

(NaN and inf in query, key and value are the exception: the kernels find them, see ``api._run``.)

``prepare_attention`` turns the user's (query, key, value, attn_mask, ...) into a ``Plan``: three
C-contiguous 3-D arrays ``(N_x, rows, cols)`` (no copy when the input already is one), an index array
per operand mapping each output batch entry to its operand's batch entry (this is how broadcasting
and grouped-query attention reach the kernel without copying K and V), and the mask as its own
read-only ``(N_m, L or 1, S or 1)`` array with index steps (broadcast by the kernels, never
materialised).
"""

import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np

from .kernels._scores import MASK_ADD, MASK_BOOL, MASK_NONE
from .kernels.finite import check_finite_array  # noqa: F401  (re-exported: the layers and the cache use it)
from .quant import QuantizedTensor

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
FLOAT16_MAX = 65504.0
CAUSAL_ALIGNMENTS = ("upper_left", "lower_right")


@dataclass
class Plan:
    query: np.ndarray  # (Nq, L, E) float32/float64, or uint16 (float16 bits)
    key: np.ndarray  # (Nk, ≥S, E) same, or int8, or uint8 (Nk, ≥S, E/2): 4-bit codes
    value: np.ndarray  # (Nv, ≥S, Ev)
    k_scales: np.ndarray  # (Nk, ≥S, blocks) float32 for int8 keys, (…, 2·blocks) uint16 for 4-bit, else (1, 1, 0)
    v_scales: np.ndarray
    k_block: int  # int8 block size, 0 for float keys
    v_block: int
    q_idx: np.ndarray  # (N,) int64
    k_idx: np.ndarray
    v_idx: np.ndarray
    mask: np.ndarray  # (Nm, L or 1, S or 1) C-contiguous, read-only; a (1, 1, 1) placeholder if none
    m_idx: np.ndarray
    mask_kind: int  # MASK_NONE, MASK_BOOL or MASK_ADD (kernels._scores)
    mask_row_step: int  # mask[m, i * row_step, j * col_step]: 0 where the mask broadcasts
    mask_col_step: int
    is_causal: bool
    pos_offset: int  # query i sits at key position i + pos_offset (causal: sees j <= that)
    window: int  # 0: none; else query at position p sees keys j > p - window
    slopes: np.ndarray  # (N,) ALiBi slope per output batch entry, or (0,) for none
    sinks: np.ndarray  # (N,) learned sink logit per output batch entry, or (0,) for none
    softcap: float  # 0: none
    scale: float
    dtype: np.dtype  # the arithmetic: float32 or float64
    out_dtype: np.dtype  # what the caller gets
    batch_shape: tuple
    L: int
    S: int
    E: int
    Ev: int
    check_finite: bool = False  # the kernels check query, scores and result for NaN/inf (see api._run)
    groups: np.ndarray = None  # (G, g) output entries sharing a K/V entry (None: uneven, one entry per group)

    @property
    def quantized(self):
        return self.k_block > 0 or self.v_block > 0

    @property
    def n_batch(self):
        return math.prod(self.batch_shape)


def _as_array(x, name):
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__array__") or isinstance(x, (list, tuple)):
        try:
            return np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be a numpy array or array-like, got {type(x).__name__}: {exc}") from None
    raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")


def check_float_operand(x, name, allow_quantized=False):
    """A query/key/value operand: a float16/32/64 array with at least 2 dims, or (key and value
    only) a ``QuantizedTensor`` (int8 or 4-bit)."""
    if isinstance(x, QuantizedTensor):
        if not allow_quantized:
            raise TypeError(
                f"{name} cannot be a QuantizedTensor: quantised storage is for key and value; pass float {name}"
            )
    else:
        x = _as_array(x, name)
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be float16, float32 or float64"
                + (" (or a QuantizedTensor from numba_attn.quantize)" if allow_quantized else "")
                + f", got dtype {x.dtype}"
            )
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., length, features), got shape {x.shape}")
    return x


def check_out_dtype(out_dtype):
    if out_dtype is None:
        return None
    try:
        dt = np.dtype(out_dtype)
    except TypeError:
        raise TypeError(f"out_dtype must be float16, float32 or float64, got {out_dtype!r}") from None
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float16, float32 or float64, got {dt}")
    return dt


def check_scale(scale, E):
    if scale is None:
        return 1.0 / math.sqrt(E)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return scale


def check_causal(is_causal):
    """False, True (= 'upper_left'), 'upper_left' or 'lower_right' -> None or the alignment name."""
    if is_causal is False or is_causal is None or (isinstance(is_causal, np.bool_) and not is_causal):
        return None
    if is_causal is True or (isinstance(is_causal, np.bool_) and is_causal):
        return "upper_left"
    if isinstance(is_causal, str) and is_causal in CAUSAL_ALIGNMENTS:
        return is_causal
    raise ValueError(f"is_causal must be False, True, 'upper_left' or 'lower_right', got {is_causal!r}")


def _batch_index(batch, target, name):
    """For each entry of the broadcast batch ``target``, the flat index into an operand's ``batch``."""
    n = math.prod(batch)
    if tuple(batch) == tuple(target):
        return np.arange(n, dtype=np.int64)
    own = np.arange(n, dtype=np.int64).reshape(batch)
    try:
        return np.array(np.broadcast_to(own, target).reshape(-1))  # writable, one numba type
    except ValueError:
        raise ValueError(f"{name}'s batch dims {batch} do not broadcast to {target}") from None


def _root_bounds(x):
    root = x
    while isinstance(root.base, np.ndarray):
        root = root.base
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:  # numpy < 2
        byte_bounds = np.byte_bounds
    return byte_bounds(root)


def _read_only(x):
    view = x.view()
    view.flags.writeable = False
    return view


def _as_3d(x, rows, cols):
    """(..., rows, cols) -> C-contiguous (N, slots ≥ rows, cols) read-only view; copies only when needed.

    A view of the first ``rows`` rows of a larger C-contiguous buffer (a KV cache's valid tokens)
    is widened back to the buffer (``slots`` rows per entry) instead of copied: the kernels read
    only the first ``rows`` rows of each entry.
    """
    x3 = x.reshape(math.prod(x.shape[:-2]), rows, cols)
    if x3.flags.c_contiguous:
        x3.flags.writeable = False  # x3 is a new view (reshape always makes one): its flags are ours
        return x3
    if x3.size:
        it = x3.itemsize
        n, st = x3.shape[0], x3.strides
        if st[2] == it and st[1] == cols * it and st[0] > 0 and st[0] % (cols * it) == 0 and st[0] >= rows * cols * it:
            slots = st[0] // (cols * it)
            low, high = _root_bounds(x3)
            start = x3.__array_interface__["data"][0]
            if low <= start and start + n * st[0] <= high:
                wide = np.lib.stride_tricks.as_strided(x3, shape=(n, slots, cols), strides=st, writeable=False)
                if wide.flags.c_contiguous:
                    return wide
    return _read_only(np.ascontiguousarray(x3))  # read-only: one numba type whatever the caller passed


def _storage(x, dtype, rows, cols):
    """Kernel operand(s) for x: (data, scales, block); float16 travels as its uint16 bits."""
    if isinstance(x, QuantizedTensor):
        if x.bits == 4:  # codes (N, S, cols / 2) uint8; (step, min) pairs as float16 bits (N, S, 2·blocks)
            pairs = x.scales.view(np.uint16)
            pairs = pairs.reshape(pairs.shape[:-2] + (2 * pairs.shape[-2],))
            return _as_3d(x.data, rows, cols // 2), _as_3d(pairs, rows, pairs.shape[-1]), x.block
        nb = x.scales.shape[-1]
        return _as_3d(x.data, rows, cols), _as_3d(x.scales, rows, nb), x.block
    if x.dtype == np.float16 and dtype == np.float32:
        return _as_3d(x.view(np.uint16), rows, cols), _NO_SCALES, 0
    return _as_3d(x.astype(dtype, copy=False), rows, cols), _NO_SCALES, 0


_NO_SCALES = np.broadcast_to(np.zeros((1, 1, 0), np.float32), (1, 1, 0))
_NO_MASK = {np.dtype(dt): np.broadcast_to(np.zeros((1, 1, 1), dt), (1, 1, 1)) for dt in (np.float32, np.float64)}
for _m in _NO_MASK.values():
    assert _m.flags.c_contiguous
_NO_SLOPES = {np.dtype(dt): np.zeros(0, dt) for dt in (np.float32, np.float64)}


def _dtypes(query, key, value, out_dtype):
    """(compute dtype, result dtype): float64 if any input is float64, else float32; the result has
    ``np.result_type`` of the float inputs (int8 ones do not count) unless ``out_dtype`` says."""
    return _dtype_rule(query.dtype, key.dtype, value.dtype, out_dtype)


@functools.lru_cache(maxsize=64)
def _dtype_rule(query_dtype, key_dtype, value_dtype, out_dtype):
    """``_dtypes`` on the dtypes themselves, kept per combination (``np.result_type`` is ~2 µs a call)."""
    floats = [dt for dt in (query_dtype, key_dtype, value_dtype) if dt.kind == "f"]
    compute = np.dtype(np.float64) if np.dtype(np.float64) in floats else np.dtype(np.float32)
    result = np.result_type(*floats) if out_dtype is None else out_dtype
    return compute, result


def prepare_attention(
    query,
    key,
    value,
    attn_mask,
    dropout_p,
    is_causal,
    scale,
    enable_gqa,
    check_finite,
    window=None,
    alibi_slopes=None,
    softcap=None,
    out_dtype=None,
    sinks=None,
):
    query = check_float_operand(query, "query")
    key = check_float_operand(key, "key", allow_quantized=True)
    value = check_float_operand(value, "value", allow_quantized=True)
    out_dtype = check_out_dtype(out_dtype)
    if not isinstance(dropout_p, numbers.Real) or dropout_p != 0:
        raise ValueError(f"dropout_p must be 0.0: numba_attn is for inference and has no dropout, got {dropout_p!r}")
    L, E = query.shape[-2:]
    S, Ek = key.shape[-2:]
    Sv, Ev = value.shape[-2:]
    if Ek != E:
        raise ValueError(f"key's last dim must equal query's (E = {E}), got key shape {key.shape}")
    if Sv != S:
        raise ValueError(f"value's second-to-last dim must equal key's (S = {S}), got value shape {value.shape}")
    if E == 0:
        raise ValueError(f"query's last dim (E) must be at least 1, got shape {query.shape}")
    alignment = check_causal(is_causal)
    scale = check_scale(scale, E)
    dtype, result_dtype = _dtypes(query, key, value, out_dtype)

    if enable_gqa and min(query.ndim, key.ndim, value.ndim) < 3:
        raise ValueError(
            "enable_gqa=True needs a heads dim (-3) on query, key and value, got shapes "
            f"{query.shape}, {key.shape}, {value.shape}"
        )
    batch, q_idx, k_idx, v_idx, groups = _batch_plan(
        query.shape[:-2], key.shape[:-2], value.shape[:-2], bool(enable_gqa)
    )
    mask, m_idx, mask_kind, mask_row_step, mask_col_step = _prepare_mask(attn_mask, batch, L, S, dtype, check_finite)
    window = check_window(window, alignment)
    softcap = check_softcap(softcap)
    slopes = prepare_per_head(alibi_slopes, check_slopes, "alibi_slopes", batch, dtype)
    sinks = prepare_per_head(sinks, check_sinks, "sinks", batch, dtype)
    q3, _, _ = _storage(query, dtype, L, E)
    k3, k_scales, k_block = _storage(key, dtype, S, E)
    v3, v_scales, v_block = _storage(value, dtype, S, Ev)
    return Plan(
        query=q3,
        key=k3,
        value=v3,
        k_scales=k_scales,
        v_scales=v_scales,
        k_block=k_block,
        v_block=v_block,
        q_idx=q_idx,
        k_idx=k_idx,
        v_idx=v_idx,
        mask=mask,
        m_idx=m_idx,
        mask_kind=mask_kind,
        mask_row_step=mask_row_step,
        mask_col_step=mask_col_step,
        is_causal=alignment is not None,
        pos_offset=0 if alignment == "upper_left" else S - L,
        window=window,
        slopes=slopes,
        sinks=sinks,
        softcap=softcap,
        scale=scale,
        dtype=dtype,
        out_dtype=result_dtype,
        batch_shape=tuple(batch),
        L=L,
        S=S,
        E=E,
        Ev=Ev,
        check_finite=bool(check_finite),
        groups=groups,
    )


@functools.lru_cache(maxsize=256)
def _batch_plan(bq, bk, bv, enable_gqa):
    """(batch shape, q_idx, k_idx, v_idx, groups) for operands of batch shapes ``bq``, ``bk``, ``bv``: the
    broadcast batch, each output entry's index into each operand's batch, and the (G, g) output entries
    that read the same key and value entry (None if uneven: ``kv_groups``).

    A function of the shapes alone, so it is worked out once per shape and kept (it was ~15 µs of a
    ~75 µs decode call): the arrays are shared by every call with these shapes and must never be
    written (the kernels only read them)."""
    group = 1
    if enable_gqa:
        hq, hk, hv = bq[-1], bk[-1], bv[-1]
        if hk != hv:
            raise ValueError(
                f"enable_gqa=True: key and value must have the same number of heads (dim -3), got {hk} and {hv}"
            )
        if hk == 0 or hq % hk != 0:
            raise ValueError(f"enable_gqa=True: query heads ({hq}) must be a multiple of key/value heads ({hk})")
        group = hq // hk
        bk_b = bk[:-1] + (hq,)
        bv_b = bv[:-1] + (hq,)
    else:
        bk_b, bv_b = bk, bv
    try:
        batch = np.broadcast_shapes(bq, bk_b, bv_b)
    except ValueError:
        hint = ""
        if len(bq) and len(bk) and bq[-1] != bk[-1]:
            hint = " (different head counts on dim -3: pass enable_gqa=True for grouped-query attention)"
        raise ValueError(f"batch dims of query {bq}, key {bk} and value {bv} do not broadcast{hint}") from None

    q_idx = _batch_index(bq, batch, "query")
    if group > 1:
        k_own = np.repeat(np.arange(math.prod(bk), dtype=np.int64).reshape(bk), group, axis=-1)
        v_own = np.repeat(np.arange(math.prod(bv), dtype=np.int64).reshape(bv), group, axis=-1)
        k_idx = np.array(np.broadcast_to(k_own, batch).reshape(-1))
        v_idx = np.array(np.broadcast_to(v_own, batch).reshape(-1))
    else:
        k_idx = _batch_index(bk, batch, "key")
        v_idx = _batch_index(bv, batch, "value")
    return tuple(batch), q_idx, k_idx, v_idx, kv_groups(k_idx, v_idx)


def kv_groups(k_idx, v_idx):
    """(G, g) output batch entries that read the same key and value entry, or None if uneven."""
    N = k_idx.shape[0]
    G = int(k_idx[-1]) + 1 if N else 0
    if G and N % G == 0 and np.array_equal(k_idx, v_idx):
        # the common layouts (MHA, GQA) group consecutive heads: k_idx = 0..0, 1..1, ...
        if np.array_equal(k_idx, np.repeat(np.arange(G), N // G)):
            return np.arange(N, dtype=np.int64).reshape(G, N // G)
    pair = k_idx * (v_idx.max(initial=0) + 1) + v_idx
    order = np.argsort(pair, kind="stable")
    _, counts = np.unique(pair, return_counts=True)
    if counts.size == 0 or (counts != counts[0]).any():
        return None
    return np.ascontiguousarray(order.reshape(counts.size, counts[0]))


@functools.lru_cache(maxsize=64)
def _zeros_index(n):
    """(n,) int64 zeros: the mask index of a call without a mask, shared by every such call (never written)."""
    return np.zeros(n, np.int64)


def _prepare_mask(attn_mask, batch, L, S, dtype, check_finite):
    n = math.prod(batch)
    if attn_mask is None:
        return _NO_MASK[np.dtype(dtype)], _zeros_index(n), MASK_NONE, 0, 0
    mask = _as_array(attn_mask, "attn_mask")
    if mask.dtype == np.bool_:
        kind = MASK_BOOL
    elif mask.dtype.kind == "f":
        kind = MASK_ADD
    else:
        raise TypeError(
            f"attn_mask must be boolean (True = takes part) or floating (added to the scores), got dtype {mask.dtype}"
        )
    target = tuple(batch) + (L, S)
    try:
        full = np.broadcast_shapes(mask.shape, target)
    except ValueError:
        full = None
    if full != target:
        raise ValueError(f"attn_mask of shape {mask.shape} does not broadcast to (..., L, S) = {target}")
    if kind == MASK_ADD:
        mask = mask.astype(dtype, copy=False)  # checked after: 1e300 in float32 arithmetic is +inf
        if np.isnan(mask).any() or np.isposinf(mask).any():
            raise ValueError(
                f"attn_mask contains NaN or +inf (or values beyond {np.dtype(dtype).name}'s range); "
                "an additive mask may hold finite values and -inf"
            )
    if mask.ndim < 2:
        mask = mask.reshape((1,) * (2 - mask.ndim) + mask.shape)
    own_batch = mask.shape[:-2]
    Lm, Sm = mask.shape[-2:]
    # the mask's own size, never L·S per batch entry: rows/columns of length 1 are broadcast by the
    # kernels (index step 0), so the array is always C-contiguous (one numba type per dtype)
    mask = _read_only(np.ascontiguousarray(mask).reshape(math.prod(own_batch), Lm, Sm))
    m_idx = _batch_index(own_batch, batch, "attn_mask")
    return mask, m_idx, kind, int(Lm != 1), int(Sm != 1)


def check_window(window, alignment):
    """Sliding window: a positive int, only with a causal alignment (it is a band below the diagonal)."""
    if window is None:
        return 0
    if isinstance(window, (bool, np.bool_)) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window must be a positive int or None, got {type(window).__name__}")
    if window <= 0:
        raise ValueError(f"window must be a positive number of keys, got {window}")
    if alignment is None:
        raise ValueError(
            "window needs is_causal (True, 'upper_left' or 'lower_right'): a query at position p "
            "sees keys p - window < j <= p"
        )
    return int(window)


def check_softcap(softcap):
    if softcap is None:
        return 0.0
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive number or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be finite and > 0, got {softcap}")
    return softcap


def _check_per_head(x, name, heads, what, finite=True):
    """None, or a real array of shape (heads,) (one ``what`` per query head) with no NaN or inf
    (``finite=False``: not checked here; ``per_head_in(..., finite=True)`` checks after converting)."""
    if x is None:
        return None
    arr = _as_array(x, name)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real array of one {what} per head, got dtype {arr.dtype}")
    if heads is None:
        raise ValueError(f"{name} needs a heads dim (-3) on query")
    if arr.ndim != 1 or arr.shape[0] != heads:
        raise ValueError(f"{name} must have shape (H,) = ({heads},), one {what} per query head, got shape {arr.shape}")
    if finite and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def check_slopes(alibi_slopes, heads, finite=True):
    """ALiBi slopes: None, or a finite real array of shape (heads,)."""
    return _check_per_head(alibi_slopes, "alibi_slopes", heads, "slope", finite)


def check_sinks(sinks, heads, finite=True):
    """Learned attention sinks: None, or a finite real array of shape (heads,), one logit per query head."""
    return _check_per_head(sinks, "sinks", heads, "sink logit", finite)


def per_head_in(values, name, dtype, finite=False):
    """A checked (H,) array in the arithmetic ``dtype``, refused if the conversion overflows it (1e300
    in float32 is inf; numpy also warns). ``finite``: the values were not checked for NaN/inf yet (one
    check after the conversion covers both; ~1.7 µs of a decode call's budget); otherwise only a
    narrowing conversion is checked."""
    out = values.astype(dtype)
    if (finite or values.dtype.itemsize > out.dtype.itemsize) and not np.isfinite(out).all():
        if not np.isfinite(values).all():
            raise ValueError(f"{name} contains NaN or inf")
        raise ValueError(f"{name} holds values beyond {np.dtype(dtype).name}'s range")
    return out


def prepare_per_head(x, check, name, batch, dtype):
    """(N,) per output batch entry (the heads dim -3 repeated over the batch), or (0,) for none: shape
    checked by ``check``, NaN/inf and the arithmetic's range checked once, after the conversion. No copy
    beyond the conversion's own when the batch is just the heads (a decode call's B = 1)."""
    if x is None:
        return _NO_SLOPES[np.dtype(dtype)]
    arr = check(x, batch[-1] if len(batch) else None, finite=False)
    conv = per_head_in(arr, name, dtype, finite=True)
    if math.prod(batch) == conv.shape[0]:
        return conv
    return np.array(np.broadcast_to(conv, batch).reshape(-1))
