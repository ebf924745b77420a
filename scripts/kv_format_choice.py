"""Which 4-bit KV cache format, and whether to rotate (issue 14), decided by simulation before the kernels exist.

Every layer of SmolLM2-135M (``examples/smollm_chat.py``) gets a ``FakeQuantCache``: a float32
``KVCache`` whose ``append`` quantises the new keys and/or values and dequantises them at once
(quantise → dequantise, in numpy, float32 arithmetic), so attention runs on exactly the values a
quantised cache would hold. Optionally the keys (and values) are multiplied by the normalised
64 × 64 Walsh–Hadamard matrix H along the head dim before quantising and by H again after (H is
symmetric and orthogonal, H·H = I): in exact arithmetic that is a cache of rotated keys read by a
rotated query, q·k = (Hq)·(Hk).

Formats, per block of 32 along the head dim:

- ``q8``:   int8 symmetric, scale = max|x| / 127 (float32), q = rint(x · (1 / scale)) in [-127, 127]:
  the library's int8 cache (checked here bit for bit against ``numba_attn.quantize``).
- ``q4_0``: ggml's q4_0: d = (the signed value of max |x|) / -8, rounded to float16 first;
  q = clamp(rint(x / d) + 8, 0, 15), x̂ = (q - 8)·d. 16 bytes + 2 per block.
- ``q4_1``: ggml's q4_1: s = (max - min) / 15 and min, both rounded to float16 first;
  q = clamp(rint((x - min) / s), 0, 15), x̂ = q·s + min. 16 bytes + 4 per block.

Teacher-forced over all of ``QUALITY_TEXT`` (prefill 32 tokens, then one per step), against a float32
cache: mean and max KL divergence of the next-token distributions (nats) and top-1 agreement.

    PYTHONPATH=. python scripts/kv_format_choice.py            # a few minutes; prints a markdown table
    PYTHONPATH=. python scripts/kv_format_choice.py --max-tokens 100

Measured (409 positions, on the library of commit 6b579f1, before 4-bit and rotation existed there):

| K / V (block 32) | rotation | bytes per token per layer | mean KLD (nats) | max KLD | top-1 |
|---|---|---|---|---|---|
| int8 / int8, the library's cache | none | 432 | 2.92e-04 | 2.42e-03 | 99.3% |
| float32 / float32 (simulated) | both | 1536 | 3.81e-12 | 3.35e-11 | 100.0% |
| q8 / q8 (simulated) | none | 432 | 2.81e-04 | 2.36e-03 | 99.0% |
| q8 / q8 (simulated) | keys | 432 | 2.08e-04 | 3.16e-03 | 99.3% |
| q8 / q4_0 (simulated) | none | 324 | 9.44e-03 | 1.24e-01 | 94.4% |
| q8 / q4_0 (simulated) | keys | 324 | 1.00e-02 | 1.07e-01 | 95.4% |
| q8 / q4_0 (simulated) | both | 324 | 6.82e-03 | 1.01e-01 | 95.4% |
| q8 / q4_1 (simulated) | none | 336 | 9.70e-03 | 2.66e-01 | 96.1% |
| q8 / q4_1 (simulated) | keys | 336 | 9.32e-03 | 2.62e-01 | 96.6% |
| q8 / q4_1 (simulated) | both | 336 | 4.82e-03 | 7.72e-02 | 97.1% |
| q4_0 / q4_0 (simulated) | none | 216 | 1.82e-01 | 5.75e+00 | 80.4% |
| q4_0 / q4_0 (simulated) | both | 216 | 5.55e-02 | 1.21e+00 | 87.8% |
| q4_1 / q4_1 (simulated) | none | 240 | 4.99e-02 | 1.24e+00 | 84.4% |
| q4_1 / q4_1 (simulated) | both | 240 | 3.86e-02 | 3.33e-01 | 90.0% |

The simulated q8 stores exactly what the library's int8 cache stores (same bits, and each layer's
attention agrees to ~1e-6), yet the two runs differ from each other by a mean KLD of 1.3e-4 (top-1
99.8 %): the kernels' different rounding order moves a few entries of later layers' keys across an
int8 rounding boundary, and that is amplified. Differences in mean KLD of less than ~10 % between
two formats are within that noise.
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

import numba_attn

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 32


def load_example():
    """examples/smollm_chat.py as the module ``smollm_chat`` (the tests load it the same way)."""
    if "smollm_chat" not in sys.modules:
        spec = importlib.util.spec_from_file_location("smollm_chat", ROOT / "examples" / "smollm_chat.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["smollm_chat"] = module
        spec.loader.exec_module(module)
    return sys.modules["smollm_chat"]


def hadamard(n):
    """The normalised Walsh–Hadamard matrix (n × n, n a power of two): symmetric, orthogonal, float32."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    if h.shape[0] != n:
        raise ValueError(f"head dim {n} is not a power of two")
    return (h / np.sqrt(n)).astype(np.float32)


def _blocks(x):
    return x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def fake_q8(x):
    b = _blocks(x)
    s = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), s, out=np.zeros_like(s), where=s > 0)
    return (np.clip(np.rint(b * inv), -127, 127) * s).reshape(x.shape)


def fake_q4_0(x):
    b = _blocks(x)
    i = np.abs(b).argmax(axis=-1)[..., None]
    d = (np.take_along_axis(b, i, axis=-1) / np.float32(-8)).astype(np.float16).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(b * inv) + 8, 0, 15)
    return ((q - 8) * d).reshape(x.shape)


def fake_q4_1(x):
    b = _blocks(x)
    lo = b.min(axis=-1, keepdims=True).astype(np.float16).astype(np.float32)
    s = ((b.max(axis=-1, keepdims=True) - b.min(axis=-1, keepdims=True)) / np.float32(15)).astype(np.float16)
    s = s.astype(np.float32)
    inv = np.divide(np.float32(1), s, out=np.zeros_like(s), where=s > 0)
    q = np.clip(np.rint((b - lo) * inv), 0, 15)
    return (q * s + lo).reshape(x.shape)


FAKE = {"f32": None, "q8": fake_q8, "q4_0": fake_q4_0, "q4_1": fake_q4_1}
#: bytes of one head's row of 64 entries in each format (data + scales per block of 32)
ROW_BYTES = {"f32": 4 * 64, "q8": 64 + 2 * 4, "q4_0": 32 + 2 * 2, "q4_1": 32 + 2 * 4}


class FakeQuantCache(numba_attn.KVCache):
    """A float32 KVCache holding quantised-then-dequantised keys/values (``key``/``value``: a name of
    ``FAKE``), optionally Hadamard-rotated around the quantisation (``rotate``: None, "keys", "both")."""

    def __init__(self, *args, key="q8", value="q8", rotate=None, **kwargs):
        super().__init__(*args, dtype=np.float32, **kwargs)
        self.fake = {"key": FAKE[key], "value": FAKE[value]}
        self.rotated = {"key": rotate in ("keys", "both"), "value": rotate == "both"}
        self.h = hadamard(self.head_dim)

    def _fake(self, x, name):
        x = np.asarray(x, np.float32)
        fake, rotated = self.fake[name], self.rotated[name]
        if rotated:
            x = x @ self.h
        if fake is not None:
            x = fake(x)
        return (x @ self.h).astype(np.float32) if rotated else x

    def append(self, key, value, check_finite=True):
        super().append(self._fake(key, "key"), self._fake(value, "value"), check_finite)


def factory(key, value, rotate=None):
    """A ``cache_quality`` format: (model, capacity) -> one FakeQuantCache per layer."""

    def make(model, capacity):
        return [
            FakeQuantCache(1, model.n_kv_heads, model.head_dim, capacity, key=key, value=value, rotate=rotate)
            for _ in model.layers
        ]

    make.spec = (key, value, rotate)
    return make


def check_q8_matches_library():
    """fake_q8 = numba_attn.quantize's int8 block-32 round trip, bit for bit (keys with outlier channels)."""
    x = np.random.default_rng(0).standard_normal((3, 200, 64)).astype(np.float32)
    x[..., 5] *= 20
    x[0, 0, :32] = 0  # an all-zero block
    np.testing.assert_array_equal(fake_q8(x), numba_attn.dequantize(numba_attn.quantize(x, BLOCK)))


#: (key format, value format, rotation) of each simulated row
CANDIDATES = [
    ("f32", "f32", "both"),  # rotation alone: must be float32's result up to rounding
    ("q8", "q8", None),
    ("q8", "q8", "keys"),
    ("q8", "q4_0", None),
    ("q8", "q4_0", "keys"),
    ("q8", "q4_0", "both"),
    ("q8", "q4_1", None),
    ("q8", "q4_1", "keys"),
    ("q8", "q4_1", "both"),
    ("q4_0", "q4_0", None),
    ("q4_0", "q4_0", "both"),
    ("q4_1", "q4_1", None),
    ("q4_1", "q4_1", "both"),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=None, help="first N tokens of the text (default: all)")
    ap.add_argument(
        "--threads", type=int, default=1, help="numba_attn and BLAS threads (default 1: fastest on a busy machine)"
    )
    args = ap.parse_args(argv)
    check_q8_matches_library()
    chat = load_example()
    chat.set_threads(args.threads)
    model = chat.SmolLM()
    formats = {"int8 block 32 (the library's cache)": {"dtype": np.int8}}
    for key, value, rotate in CANDIDATES:
        formats[f"{key} / {value}, rotated: {rotate or 'no'}"] = factory(key, value, rotate)
    t0 = time.perf_counter()
    results = chat.cache_quality(model, formats, max_tokens=args.max_tokens)
    n_kv = model.n_kv_heads
    print(
        f"\nSmolLM2-135M, teacher-forced on {results['float32']['tokens']} positions of QUALITY_TEXT (prefill 32, "
        f"then one token per step), against a float32 cache; {time.perf_counter() - t0:.0f} s; "
        f"simulated rows: float32 storage of quantised-dequantised keys/values"
    )
    print("| K / V (block 32) | rotation (Hadamard) | bytes per token per layer | mean KLD (nats) | max KLD | top-1 |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        options = formats.get(name)
        if callable(options):
            key, value, rotate = options.spec
            nbytes = n_kv * (ROW_BYTES[key] + ROW_BYTES[value])
            label, rot = f"{key} / {value} (simulated)", rotate or "none"
        else:
            nbytes, label, rot = r["kv_bytes"], name, "none"
        print(
            f"| {label} | {rot} | {nbytes:g} | {r['mean_kld']:.2e} | {r['max_kld']:.2e} | {r['top1']:.1%} |",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
