"""Shared helpers for the numba_attn tests: random data, masks, tolerances, kernel spies."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from numba_attn.check import TOLERANCE
from numba_attn.kernels import decode, prefill, varlen

DTYPES = (np.float32, np.float64)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name):
    """Import examples/<name>.py as the module ``name`` (once; the examples are not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


#: relative tolerance of a result in ``dtype`` against the float64 reference: the package's one table,
#: ``numba_attn.check.TOLERANCE`` (also what ``python -m numba_attn check`` applies), float dtypes only
RTOL = {np.dtype(precision): tol.rtol for precision, tol in TOLERANCE.items() if precision not in ("int8", "int4")}


def rtol_for(dtype):
    return RTOL[np.dtype(dtype)]


def randn(rng, shape, dtype=np.float64):
    """Standard-normal data of ``shape`` in ``dtype``."""
    return rng.standard_normal(shape).astype(dtype)


def random_bool_mask(rng, shape, density=0.5, masked_rows=0):
    """Boolean mask, True (= attends) with probability ``density``; ``masked_rows`` random rows
    (along dim -2, when there is one) are all False."""
    mask = rng.random(shape) < density
    if masked_rows and mask.ndim >= 2 and mask.shape[-2] > 0:
        rows = rng.choice(mask.shape[-2], size=min(masked_rows, mask.shape[-2]), replace=False)
        mask[..., rows, :] = False
    return mask


def random_float_mask(rng, shape, dtype=np.float64, p_neg_inf=0.2, bias=1.0, masked_rows=0):
    """Additive mask: bias·N(0, 1), with -inf at probability ``p_neg_inf``; ``masked_rows`` rows all -inf."""
    mask = (bias * rng.standard_normal(shape)).astype(dtype)
    mask[rng.random(shape) < p_neg_inf] = -np.inf
    if masked_rows and mask.ndim >= 2 and mask.shape[-2] > 0:
        rows = rng.choice(mask.shape[-2], size=min(masked_rows, mask.shape[-2]), replace=False)
        mask[..., rows, :] = -np.inf
    return mask


def assert_close(actual, expected, dtype=None, rtol=None):
    """``actual`` (computed in ``dtype``, default its own dtype) equals the float64 ``expected``.

    Shapes must match; -inf entries (the lse of fully-masked rows) must be in the same places;
    ``actual`` must hold no NaN; finite entries agree to ``rtol`` relative to the largest magnitude
    of ``expected`` (at least 1), i.e. ``rtol=rtol, atol=rtol·max(1, |expected|.max())``.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not np.isnan(actual).any(), "result holds NaN"
    assert not np.isnan(expected).any(), "reference holds NaN"
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg="-inf positions differ")
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected), err_msg="+inf positions differ")
    finite = np.isfinite(expected)
    a = actual[finite].astype(np.float64)
    e = expected[finite]
    if rtol is None:
        rtol = rtol_for(dtype if dtype is not None else actual.dtype)
    mag = max(1.0, float(np.abs(e).max())) if e.size else 1.0
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * mag)


def copies(*arrays):
    """Deep copies (for checking later that a call left its inputs alone)."""
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def assert_unchanged(arrays, originals):
    for a, o in zip(arrays, originals):
        if a is None:
            continue
        np.testing.assert_array_equal(np.asarray(a), o)
        assert np.asarray(a).dtype == o.dtype


KERNELS = {
    "prefill_serial": prefill,
    "prefill_parallel": prefill,
    "decode_serial": decode,
    "decode_parallel": decode,
    "varlen_serial": varlen,
    "varlen_parallel": varlen,
}


class KernelSpy:
    """Counts calls of each attention kernel (installed with monkeypatch; the API looks the kernels
    up on their modules at call time)."""

    def __init__(self, monkeypatch, forbid=False):
        self.calls = dict.fromkeys(KERNELS, 0)
        for name, module in KERNELS.items():
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name), forbid))

    def _wrap(self, name, original, forbid):
        def spy(*args):
            self.calls[name] += 1
            if forbid:
                raise AssertionError(f"the {name} kernel ran although the input was rejected")
            return original(*args)

        return spy

    def ran(self):
        """The kernels that ran, with their counts."""
        return {name: n for name, n in self.calls.items() if n}


@pytest.fixture
def kernel_spy(monkeypatch):
    return KernelSpy(monkeypatch)


@pytest.fixture
def no_kernel(monkeypatch):
    """Fails the test if any kernel runs."""
    return KernelSpy(monkeypatch, forbid=True)


def int8_effective_inputs(query, key, value, scale=None):
    """(query, key, value, scale) for the float64 reference that reproduce what the quantised
    kernels compute: ``QuantizedTensor`` keys/values (int8 or 4-bit) dequantised; the query as it
    is (the kernels never round it). Float operands pass through."""
    from numba_attn import QuantizedTensor, dequantize

    E = query.shape[-1]
    scale = 1.0 / np.sqrt(E) if scale is None else scale
    k = dequantize(key) if isinstance(key, QuantizedTensor) else key
    v = dequantize(value) if isinstance(value, QuantizedTensor) else value
    return query, k, v, scale


def exact_values(x):
    """float64 values of a key/value operand as the kernels read them: a ``QuantizedTensor``'s int8
    data·scale or 4-bit code·step + min (ggml's nibble order) computed exactly in numpy; float arrays as
    they are."""
    from numba_attn import QuantizedTensor

    if not isinstance(x, QuantizedTensor):
        return np.asarray(x).astype(np.float64)
    if x.bits == 8:
        per_entry = np.repeat(x.scales.astype(np.float64), x.block, axis=-1)[..., : x.shape[-1]]
        return x.data.astype(np.float64) * per_entry
    blocks = x.data.reshape(x.data.shape[:-1] + (-1, x.block // 2))
    codes = np.concatenate([blocks & 15, blocks >> 4], axis=-1).reshape(x.shape).astype(np.float64)
    step, low = (np.repeat(x.scales[..., i].astype(np.float64), x.block, axis=-1) for i in (0, 1))
    return codes * step + low


def rotated_for(cache, query):
    """float64 ``query`` in the basis the cache stores its keys in: H·q (``numba_attn.rotation.
    hadamard_transform``, in float64) for a cache that rotates its keys (``cache.rotate_keys``), else q."""
    from numba_attn.rotation import hadamard_transform

    q = np.asarray(query, np.float64)
    return hadamard_transform(q) if cache.rotate_keys else q


def unrotated_for(cache, out):
    """An attention output over the cache's stored values back in the values' own basis (float64):
    H·out for a cache that rotates its values (H is its own inverse), else out."""
    from numba_attn.rotation import hadamard_transform

    out = np.asarray(out, np.float64)
    return hadamard_transform(out) if cache.rotate_values else out


def cache_reference(cache, query, keys, values, **kw):
    """The float64 reference of an attention over a cache's content ``keys``/``values`` (as stored:
    rotated where the cache rotates, dequantised), for the caller's unrotated ``query``: the query
    rotated like the keys, the output rotated back like the values (``numba_attn.reference``)."""
    from numba_attn import reference

    out = reference.scaled_dot_product_attention(rotated_for(cache, query), keys, values, **kw)
    return unrotated_for(cache, out)


def cache_sdpa(cache, query, keys, values, **kw):
    """``scaled_dot_product_attention`` on a cache's views, the documented way for any cache:
    ``cache.unrotate_output(sdpa(cache.rotate_query(query), keys, values, ...))`` (both are no-ops for
    a cache that rotates nothing)."""
    from numba_attn import scaled_dot_product_attention

    return cache.unrotate_output(scaled_dot_product_attention(cache.rotate_query(query), keys, values, **kw))


def pytest_addoption(parser):
    """``--fuzz=N``: cases of the differential fuzzer (tests/test_fuzz.py; default 1000, or the env var
    NUMBA_ATTN_FUZZ); ``--fuzz-seed``: its base seed (default 0, or NUMBA_ATTN_FUZZ_SEED)."""
    group = parser.getgroup("numba_attn fuzzer")
    group.addoption(
        "--fuzz",
        type=int,
        default=None,
        metavar="N",
        help="number of differential fuzz cases (default: $NUMBA_ATTN_FUZZ or 1000)",
    )
    group.addoption(
        "--fuzz-seed",
        type=int,
        default=None,
        metavar="SEED",
        help="base seed of the fuzz cases; case i uses SEED + i (default: $NUMBA_ATTN_FUZZ_SEED or 0)",
    )
