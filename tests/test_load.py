"""kernels/_load.py: float16 conversions inside the kernels and the float32 → float16 result conversion."""

import numpy as np
import pytest

from numba_attn.kernels._load import to_float16


@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (2, 3, 1000), (8, 1024, 64)])
def test_to_float16_is_bit_identical_to_numpy(shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * rng.choice([1e-6, 1.0, 1e3, 1e5], size=shape)).astype(np.float32)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    out = to_float16(x)
    assert out.dtype == np.float16 and out.shape == x.shape
    np.testing.assert_array_equal(out.view(np.uint16), expected.view(np.uint16))


def test_to_float16_special_values_and_rounding():
    """Ties round to even, overflow gives ±inf, subnormals and signed zeros survive, NaN stays NaN."""
    x = np.array(
        [
            65504,
            65519.99,
            65520,
            -65520,
            np.inf,
            -np.inf,
            6e-8,
            2.9e-8,
            3e-8,
            0.0,
            -0.0,
            1 + 2**-11,
            1 + 3 * 2**-11,
            np.nan,
        ],
        np.float32,
    )
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    out = to_float16(x)
    np.testing.assert_array_equal(out[:-1].view(np.uint16), expected[:-1].view(np.uint16))
    assert np.isnan(out[-1])


def test_to_float16_reads_strided_input_and_leaves_it_alone():
    x = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    before = x.copy()
    np.testing.assert_array_equal(to_float16(x), x.astype(np.float16))
    np.testing.assert_array_equal(x, before)
