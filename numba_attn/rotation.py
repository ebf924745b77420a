"""Hadamard rotation of head vectors: spread outliers before quantising, keep every dot product.

``hadamard_transform(x)`` multiplies the last axis of x by H, the normalised Walsh–Hadamard matrix
(block-diagonal: D/b copies of the b × b Sylvester–Hadamard matrix divided by √b, b =
``hadamard_block(D)``). H is symmetric and orthogonal, so

- rotating queries and keys leaves the scores unchanged: (H q)·(H k) = q·k;
- rotating twice gives x back: H (H x) = x (up to rounding);
- norms are unchanged, and one large entry is spread evenly over the b entries of its block, which is
  what makes int8 keys and values more accurate when a few channels hold outliers.

Rotated values give rotated outputs: softmax(q·Kᵀ)·(V Hᵀ) = (softmax(q·Kᵀ)·V) Hᵀ, so rotating the
output once more undoes it.

>>> import numpy as np
>>> from numba_attn.rotation import hadamard_block, hadamard_transform
>>> hadamard_block(64), hadamard_block(80), hadamard_block(96), hadamard_block(72)
(64, 16, 32, 8)
>>> rng = np.random.default_rng(0)
>>> q = rng.standard_normal((9, 64))
>>> k = rng.standard_normal((5, 64))
>>> hq, hk = hadamard_transform(q), hadamard_transform(k)
>>> np.allclose(hq @ hk.T, q @ k.T)
True
>>> np.allclose(hadamard_transform(hq), q)
True
>>> hadamard_transform(np.array([2.0, 0.0, 0.0, 0.0]))  # one outlier spread over its block
array([1., 1., 1., 1.])
>>> hadamard_transform(q.astype(np.float16)).dtype  # float16 in, float32 out
dtype('float32')

The kernels are ``numba_attn.kernels.hadamard``: ``hadamard_rows`` (serial) up to ``PARALLEL_ABOVE``
values, ``hadamard_rows_parallel`` (rows over threads) above. A KV cache calls ``hadamard_rows``
directly on preallocated arrays: this wrapper's checks and allocation cost more than the transform of
a decode step's few heads.
"""

import operator

import numpy as np

from .kernels.hadamard import hadamard_rows, hadamard_rows_parallel

__all__ = ["hadamard_block", "hadamard_transform"]

#: Above this many values (rows × D) ``hadamard_transform`` spreads the rows over threads.
PARALLEL_ABOVE = 1 << 17

_OUT_DTYPE = {2: np.float32, 4: np.float32, 8: np.float64}  # by the input's itemsize


def hadamard_block(D):
    """The block size the rotation uses for head dimension D: the largest power of two dividing D.

    64 → 64, 128 → 128, 80 → 16, 96 → 32, 72 → 8. A smaller block spreads an outlier over fewer
    entries (over 16 of 80, not all 80), so it helps quantisation less. An odd D has block 1, which
    would rotate nothing, so it is refused.

    >>> hadamard_block(7)
    Traceback (most recent call last):
    ...
    ValueError: head_dim must be a positive even int (an odd one has block 1: no rotation), got 7
    """
    if isinstance(D, bool):
        raise TypeError(f"head_dim must be an int, got {D!r}")
    try:
        D = operator.index(D)
    except TypeError:
        raise TypeError(f"head_dim must be an int, got {D!r}") from None
    if D < 2 or D % 2:
        raise ValueError(f"head_dim must be a positive even int (an odd one has block 1: no rotation), got {D}")
    return D & -D


def hadamard_transform(x, block=None):
    """H · x along the last axis: x (..., D) float16/32/64 → a new float32 array (float64 for float64 x).

    ``block`` (default ``hadamard_block(D)``) must be a power of two dividing D; 1 is allowed and gives a
    copy (no rotation). x is never modified. NaN and ±inf are not checked: they spread over their block
    (a NaN makes its block NaN, an inf makes it ±inf).

    >>> hadamard_transform(np.ones((2, 6), np.float32), block=4)
    Traceback (most recent call last):
    ...
    ValueError: block must be a power of two dividing x's last axis (D = 6), got 4
    """
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.dtype.itemsize not in _OUT_DTYPE:
        raise TypeError(f"x must be a float16, float32 or float64 array, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError("x must have at least one axis (..., D), got a 0-d array")
    D = x.shape[-1]
    if block is None:
        block = hadamard_block(D)
    else:
        if isinstance(block, bool):
            raise TypeError(f"block must be an int, got {block!r}")
        try:
            block = operator.index(block)
        except TypeError:
            raise TypeError(f"block must be an int, got {block!r}") from None
        if block < 1 or block & (block - 1) or D % block:
            raise ValueError(f"block must be a power of two dividing x's last axis (D = {D}), got {block}")
    out = np.empty(x.shape, _OUT_DTYPE[x.dtype.itemsize])
    if out.size == 0:
        return out
    rows = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("=")).reshape(-1, D)
    if rows.dtype == np.float16:
        rows = rows.view(np.uint16)
    flat = out.reshape(-1, D)
    if flat.size > PARALLEL_ABOVE:
        from ._threads import launch

        launch(hadamard_rows_parallel, rows, block, flat)
    else:
        hadamard_rows(rows, block, flat)
    return out
