"""``LinearWeight``: the weight of y = x @ W + b stored as float32, float16, int8 or int4, read at its width.

A decode step multiplies one activation row by every weight matrix of the model, so it is bound by
the bytes of weight it reads: float16 halves them, int8 (affine blocks: a float32 scale and offset
per block of 32 inputs and per output, 1.25 bytes per weight) reads 31 % of float32's bytes, int4
(16 levels, a float16 scale and offset per block: 0.625 bytes per weight, like GGUF's Q4_1) 16 %.
The numba kernels (``numba_attn.kernels.linear``) never build a float32 copy of the weight.

    w = LinearWeight(W, b, dtype="int8")        # W (in_features, out_features): y = x @ W + b
    w = LinearWeight.from_linear(W_out_in, b, dtype=np.float16)    # torch / HF nn.Linear layout
    y = w(x)            # == w.apply(x) == x @ w;  x (..., in_features) → y (..., out_features)

Quantisation (int8): for block j of 32 inputs and output n, lo = min_{k∈j} W[k, n], hi = max, s = (hi − lo)
/ 255, q[k, n] = clamp(rint((W[k, n] − lo) / s), 0, 255) − 128 (s = 0 → q = −128) and m = lo + 128·s;
W[k, n] ≈ s · q[k, n] + m, |error| ≤ s / 2 (+ float32 rounding). Against a symmetric scale (max |W| / 127,
q8_0) the step s is never larger and is half as large for a block of one sign; a block that holds at most
256 evenly spaced values (a 4-bit block dequantised from GGUF's Q4_0/Q4_1, say) is kept exactly up to
float32 rounding.

Quantisation (int4): per block and output, s = float16((hi − lo) / 15) and m = float16(lo) (rounded to
nearest), q = clamp(rint((W − m) / s), 0, 15) (s = 0 → q = 0), W ≈ s·q + m with |error| ≤ s / 2 +
2⁻⁹·max(|lo|, |hi|) + 2⁻²¹ (the float16 rounding of s and m, and the clipping at 0 and 15 it can
cause; 2⁻²¹ = 16 · 2⁻²⁵ covers steps in float16's subnormal range; weights must lie within float16's range).
A block that is already 4-bit affine with float16 step and minimum, its lowest and highest levels
used (every block of a GGUF Q4_1 tensor), is kept exactly up to float32 rounding.

``dequantize()`` returns that effective weight (float32), the exact operand of the product.

Results: float32 computed (activations rounded to float32, float32 accumulation), except that int8
and int4 weights multiply each row of x rounded to int16 per block of 32 inputs, x ≈ σ·c with σ = max |x_block|
/ 32767, |x − σ·c| ≤ σ / 2 (~100× below the weights' own rounding), summing c·q exactly in int32
(``vpmaddwd``; see ``numba_attn.kernels.linear``). A float64 ``x``
gives a float64 result (the float32 values widened: numpy's ``float64 @ float32`` promotion), a
float16 or float32 ``x`` a float32 result. NaN/inf in ``x`` propagate as in numpy (no check); NaN/inf
weights or biases are refused at construction.
"""

import math

import numpy as np

from ._threads import launch
from .kernels import linear as _k
from .kernels._load import to_float16
from .kernels.finite import max_abs

__all__ = ["LinearWeight"]

#: storage name → the ``dtype`` attribute ("int4": numpy has no 4-bit type, the string names the format)
_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "int8": np.dtype(np.int8), "int4": "int4"}
_FLOAT32 = np.dtype(np.float32)
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _storage_dtype(dtype):
    """'float32' / 'float16' / 'int8' for any spelling of those three (str, numpy type, np.dtype), or
    'int4' for the string "int4" (``np.dtype("int4")`` would be int32)."""
    if isinstance(dtype, str) and dtype.lower() == "int4":
        return "int4"
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES or name == "int4":
        raise ValueError(f'dtype must be one of float32, float16, int8 (a name or numpy type) or "int4", got {dtype!r}')
    return name


def _float_array(a, name, shape_text):
    a = np.asarray(a)
    if a.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{name} must be a float16/float32/float64 array of shape {shape_text}, got dtype {a.dtype}")
    return a


def _check_values(a, name, limit, limit_text):
    top = max_abs(a)
    if not math.isfinite(top):
        raise ValueError(f"{name} contains {'NaN' if math.isnan(top) else 'inf'}: weights must be finite")
    if top > limit:
        raise ValueError(f"{name} holds values up to {top:g}, beyond {limit_text} ({limit:g})")


def _panels(w, K_pad, P):
    """(K, N) → zero-padded (P, K_pad, PANEL) copy, same dtype: panel p holds outputs 64p … 64p+63."""
    K, N = w.shape
    padded = np.zeros((K_pad, P * _k.PANEL), w.dtype)
    padded[:K, :N] = w
    return np.ascontiguousarray(padded.reshape(K_pad, P, _k.PANEL).transpose(1, 0, 2))


def _quantize_panels(w32, K_pad, P):
    """float32 (K, N) → int8 panels of input pairs (P, K_pad/2, 64, 2) (q[2j, n], q[2j+1, n] side by side:
    the operand order of ``vpmaddwd``) and float32 (scale, offset) pairs (P, K_pad/32, 2, 64): per block,
    s = (max − min) / 255, q = clip(rint((W − min) / s), 0, 255) − 128, m = min + 128·s."""
    blocks = _panels(w32, K_pad, P).reshape(P, K_pad // _k.BLOCK, _k.BLOCK, _k.PANEL)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)  # (P, nb, 64)
    scales = ((hi - lo) / np.float32(255)).astype(np.float32)
    s4 = scales[:, :, None, :]
    ratio = np.divide(blocks - lo[:, :, None, :], s4, out=np.zeros_like(blocks), where=s4 > 0)
    q = (np.clip(np.rint(ratio), 0, 255) - 128).astype(np.int8)
    pairs = np.stack([scales, lo + np.float32(128) * scales], axis=2).astype(np.float32)
    paired = q.reshape(P, K_pad // 2, 2, _k.PANEL).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(paired), np.ascontiguousarray(pairs)


def _quantize_panels_int4(w32, K_pad, P):
    """float32 (K, N) → int4 panels (P, K_pad/4, 64, 2) uint8, byte [g, t, h] = q[4g + h, t] | q[4g + 2 + h, t] << 4
    (the low nibbles of an output's two bytes are the pair of inputs 4g, 4g+1, the high ones 4g+2, 4g+3:
    the operand order of ``madd_nibble_quads_into``), and float16-bit (scale, offset) pairs
    (P, K_pad/32, 2, 64): per block, s = float16((max − min) / 15), m = float16(min),
    q = clip(rint((W − m) / s), 0, 15)."""
    blocks = _panels(w32, K_pad, P).reshape(P, K_pad // _k.BLOCK, _k.BLOCK, _k.PANEL)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)  # (P, nb, 64)
    step = to_float16(((hi - lo) / np.float32(15)).astype(np.float32))
    low = to_float16(lo)
    s4 = step.astype(np.float32)[:, :, None, :]
    m4 = low.astype(np.float32)[:, :, None, :]
    ratio = np.divide(blocks - m4, s4, out=np.zeros_like(blocks), where=s4 > 0)
    q = np.clip(np.rint(ratio), 0, 15).astype(np.uint8).reshape(P, K_pad // 4, 4, _k.PANEL)
    packed = (q[:, :, 0:2, :] | (q[:, :, 2:4, :] << np.uint8(4))).transpose(0, 1, 3, 2)
    pairs = np.stack([step, low], axis=2).view(np.uint16)
    return np.ascontiguousarray(packed), np.ascontiguousarray(pairs)


class LinearWeight:
    """y = x @ W (+ b) with W (in_features, out_features) stored as float32, float16, int8 or int4.

    ``LinearWeight(weight, bias=None, dtype="float32")``: ``weight`` (in_features, out_features)
    float16/32/64 (the repo's ``x @ W`` layout), ``bias`` (out_features,) or None, ``dtype`` one of
    ``"float32"``, ``"float16"``, ``"int8"`` (or the numpy types) or ``"int4"``. Neither input is
    modified or kept: the weight is copied into the kernels' panel layout (see
    ``numba_attn.kernels.linear``).

    Attributes: ``shape`` (in_features, out_features), ``in_features``, ``out_features``, ``dtype``
    (the storage dtype: a numpy dtype, or the string "int4"), ``nbytes`` (weight storage incl.
    padding and scales, plus the bias).
    """

    __slots__ = (
        "_bias",
        "_has_bias",
        "_k_pad",
        "_kernels",
        "_operands",
        "_row",
        "_scales",
        "_weights",
        "dtype",
        "in_features",
        "out_features",
    )
    #: numpy operators return NotImplemented for this type, so ``x @ w`` reaches ``__rmatmul__``
    __array_ufunc__ = None

    def __init__(self, weight, bias=None, dtype="float32"):
        name = _storage_dtype(dtype)
        weight = _float_array(weight, "weight", "(in_features, out_features)")
        if weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
            raise ValueError(f"weight must have shape (in_features, out_features) with both ≥ 1, got {weight.shape}")
        K, N = weight.shape
        if name == "float16":
            _check_values(weight, "weight", _FLOAT16_MAX, "float16's range")
        elif name == "int4":
            _check_values(weight, "weight", _FLOAT16_MAX, "float16's range (int4 scales and offsets are float16)")
        else:
            _check_values(weight, "weight", _FLOAT32_MAX, "float32's range")
        if bias is None:
            b = np.zeros(N, np.float32)
        else:
            bias = _float_array(bias, "bias", f"({N},)")
            if bias.shape != (N,):
                raise ValueError(f"bias must have shape (out_features,) = ({N},), got {bias.shape}")
            _check_values(bias, "bias", _FLOAT32_MAX, "float32's range")
            b = np.array(bias, np.float32)
        K_pad = -(-K // _k.BLOCK) * _k.BLOCK
        P = -(-N // _k.PANEL)
        w32 = np.asarray(weight, np.float32)
        if name == "int8":
            data, scales = _quantize_panels(w32, K_pad, P)
        elif name == "int4":
            data, scales = _quantize_panels_int4(w32, K_pad, P)
        elif name == "float16":
            data, scales = to_float16(_panels(w32, K_pad, P)).view(np.uint16), None
        else:
            data, scales = _panels(w32, K_pad, P), None
        self.in_features, self.out_features, self.dtype = K, N, _DTYPES[name]
        self._weights, self._scales, self._bias, self._has_bias = data, scales, b, bias is not None
        self._k_pad = K_pad
        self._kernels = _k.KERNELS[name]
        self._operands = (data,) if scales is None else (data, scales)
        # the one-row fast path of ``apply`` (K needs no padding): (the GEMV kernel, its operands + bias)
        gemv = self._kernels[0 if K * N >= _k.SERIAL_BELOW_MACS else 1]
        self._row = (gemv, (*self._operands, b)) if K_pad == K else None

    @classmethod
    def from_linear(cls, weight, bias=None, dtype="float32"):
        """From an ``nn.Linear``-layout weight (out_features, in_features) (torch, Hugging Face, GGUF)."""
        weight = _float_array(weight, "weight", "(out_features, in_features)")
        if weight.ndim != 2:
            raise ValueError(f"weight must have shape (out_features, in_features), got {weight.shape}")
        return cls(weight.T, bias, dtype)

    @property
    def shape(self):
        return (self.in_features, self.out_features)

    @property
    def bias(self):
        """The bias (out_features,) float32 (a copy), or None."""
        return self._bias.copy() if self._has_bias else None

    @property
    def nbytes(self):
        return self._weights.nbytes + (self._scales.nbytes if self._scales is not None else 0) + self._bias.nbytes

    def _codes(self):
        """int8 / int4 storage: the codes q as (P, K_pad, 64) panels (the pairs of inputs taken apart)."""
        if self.dtype == "int4":
            P, quarter, T, _ = self._weights.shape
            bytes_ = self._weights.transpose(0, 1, 3, 2)  # (P, K_pad/4, 2, 64): [g, h] holds inputs 4g+h, 4g+2+h
            return np.concatenate([bytes_ & np.uint8(15), bytes_ >> np.uint8(4)], axis=2).reshape(P, 4 * quarter, T)
        P, half, T, _ = self._weights.shape
        return self._weights.transpose(0, 1, 3, 2).reshape(P, 2 * half, T)

    def _block_scales(self):
        """int8 / int4 storage: the (scale, offset) pairs (P, K_pad/32, 2, 64) as float32."""
        return self._scales.view(np.float16).astype(np.float32) if self.dtype == "int4" else self._scales

    def dequantize(self):
        """The effective weight (in_features, out_features) float32 the kernels multiply by."""
        K, N = self.shape
        P, K_pad, T = self._weights.shape[0], self._k_pad, _k.PANEL
        if self._scales is not None:
            blocks = self._codes().reshape(P, K_pad // _k.BLOCK, _k.BLOCK, T).astype(np.float32)
            sm = self._block_scales()
            w = (blocks * sm[:, :, None, 0, :] + sm[:, :, None, 1, :]).reshape(P, K_pad, T)
        elif self.dtype == np.float16:
            w = self._weights.view(np.float16).astype(np.float32)
        else:
            w = self._weights
        return np.ascontiguousarray(w.transpose(1, 0, 2).reshape(K_pad, P * T)[:K, :N])

    def apply(self, x):
        """x (..., in_features) float16/32/64 → x @ W + b (..., out_features): float64 for a float64 x
        (computed in float32), else float32. A 1-row x (a decode step) runs the GEMV kernel, more rows
        the GEMM kernel; both serial below ``kernels.linear.SERIAL_BELOW_MACS`` multiply-adds."""
        x = x if isinstance(x, np.ndarray) else np.asarray(x)
        row = self._row
        K = self.in_features
        if row is not None and x.dtype is _FLOAT32 and x.size == K == x.shape[-1] and x.flags.c_contiguous:
            # one float32 row that needs no padding (a decode step): straight to the GEMV kernel
            y = np.empty(x.shape[:-1] + (self.out_features,), np.float32)
            launch(row[0], x.reshape(-1), *row[1], y.reshape(-1))
            return y
        if x.dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(
                f"x must be a float16/float32/float64 array of shape (..., {self.in_features}), got dtype {x.dtype}"
            )
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., in_features) = (..., {self.in_features}), got {x.shape}")
        K, N = self.shape
        lead = x.shape[:-1]
        M = math.prod(lead)
        out_dtype = np.float64 if x.dtype == np.float64 else np.float32
        if M == 0:
            return np.zeros(lead + (N,), out_dtype)
        K_pad = self._k_pad
        rows = x.reshape(M, K)
        if K_pad == K and rows.dtype == np.float32 and rows.flags.c_contiguous:
            xs = rows
        else:
            xs = np.zeros((M, K_pad), np.float32)
            xs[:, :K] = rows
        serial = M * K * N < _k.SERIAL_BELOW_MACS
        if M == 1:
            y = np.empty((1, N), np.float32)
            launch(self._kernels[int(serial)], xs[0], *self._operands, self._bias, y[0])
        else:
            y = np.empty((M, N), np.float32)
            launch(self._kernels[2 + int(serial)], xs, *self._operands, self._bias, y)
        y = y.reshape(lead + (N,))
        return y.astype(np.float64) if out_dtype == np.float64 else y

    __call__ = apply

    def __rmatmul__(self, x):
        """``x @ w``: the same as ``w.apply(x)`` (the bias included)."""
        return self.apply(x)

    def __repr__(self):
        return (
            f"LinearWeight(in_features={self.in_features}, out_features={self.out_features}, "
            f"dtype={getattr(self.dtype, 'name', self.dtype)}, bias={self._has_bias}, nbytes={self.nbytes})"
        )
