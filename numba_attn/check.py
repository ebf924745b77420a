"""``python -m numba_attn check``: every kernel path in every precision against the float64 reference.

Also home of the accuracy contract itself, :data:`TOLERANCE`: the test suite (``tests/conftest.py``)
imports the same table, so ``check`` on a user's machine and the tests in CI hold the kernels to one
standard.
"""

import functools
import sys
import time
from typing import NamedTuple

import numpy as np

from . import reference
from .api import scaled_dot_product_attention


class Tolerance(NamedTuple):
    """How far a result computed in one precision may be from the float64 reference on the same inputs.

    ``rtol``: every element, ``|out − ref| ≤ rtol·(max(1, max|ref|) + |ref|)``; the rule of
    ``numpy.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol·max(1, max|ref|))`` that the tests'
    ``assert_close`` applies. ``norm``: ``‖out − ref‖ / ‖ref‖ ≤ norm`` over the whole result
    (``check`` applies both; the tests the first).
    """

    rtol: float
    norm: float


#: The accuracy contract per precision of the arithmetic/storage. float64: rounding only (the kernels
#: sum in another order than numpy). float32: a few ulps (1.2e-7) of accumulated rounding over S keys
#: and the polynomial exp (2.3e-7). float16: computed in float32, rounded to float16 at the end, whose
#: half-ulp is 4.9e-4 relative. int8 (``quantize``d keys and values, float32 query), judged against the
#: *unquantised* inputs: no element-wise bound, 1.5 % in norm (8-bit blocks of 32 values). int4 (4-bit keys
#: and values, ``quantize(bits=4)``), judged against the reference on the *dequantised* inputs, so at
#: float32's bound: the format's own error (~10 % in norm on N(0, 1) data; see the README's quality table,
#: measured on a model) is not the kernels'.
TOLERANCE = {
    "float64": Tolerance(rtol=1e-10, norm=1e-12),
    "float32": Tolerance(rtol=1e-5, norm=1e-5),
    "float16": Tolerance(rtol=1e-3, norm=2e-3),
    "int8": Tolerance(rtol=np.inf, norm=1.5e-2),
    "int4": Tolerance(rtol=1e-5, norm=1e-5),
}


def within_tolerance(out, ref, precision):
    """(ok, max |out − ref|, ‖out − ref‖ / ‖ref‖) of ``out`` against the float64 ``ref`` under
    ``TOLERANCE[precision]``; ``out`` must also be finite."""
    rtol, norm = TOLERANCE[precision]
    diff = np.asarray(out, np.float64) - ref
    err = float(np.abs(diff).max()) if diff.size else 0.0
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-300))
    mag = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    elementwise = np.isinf(rtol) or bool((np.abs(diff) <= rtol * (mag + np.abs(ref))).all())
    return bool(np.isfinite(out).all() and elementwise and rel <= norm), err, rel


def check_cases():
    """(name, spec) for every kernel path: masks, both causal alignments, GQA, broadcasting, decode, sinks."""
    alibi = 2.0 ** -np.arange(1, 9)
    sinks = np.linspace(-2.0, 3.0, 8)  # learned sink logits, one per query head
    return [
        ("prefill", dict(q=(1, 8, 256, 64), k=(1, 8, 256, 64))),
        ("prefill causal upper_left", dict(q=(1, 8, 256, 64), k=(1, 8, 256, 64), is_causal=True)),
        ("prefill causal lower_right", dict(q=(1, 8, 100, 64), k=(1, 8, 300, 64), is_causal="lower_right")),
        ("prefill bool mask", dict(q=(2, 4, 128, 32), k=(2, 4, 200, 32), mask="bool")),
        ("prefill float mask (-inf)", dict(q=(2, 4, 128, 32), k=(2, 4, 200, 32), mask="float")),
        ("prefill GQA 8/2 heads", dict(q=(1, 8, 128, 64), k=(1, 2, 256, 64), enable_gqa=True)),
        (
            "prefill window + ALiBi + softcap",
            dict(q=(1, 8, 200, 64), k=(1, 8, 200, 64), is_causal=True, window=64, alibi_slopes=alibi, softcap=30.0),
        ),
        ("encoder batch", dict(q=(8, 12, 128, 32), k=(8, 12, 128, 32))),
        ("odd sizes, 2-D", dict(q=(77, 33), k=(131, 33), v=(131, 7))),
        ("decode (split-K)", dict(q=(1, 32, 1, 64), k=(1, 32, 1024, 64))),
        (
            "decode GQA 4 tokens causal",
            dict(q=(1, 8, 4, 64), k=(1, 2, 2048, 64), enable_gqa=True, is_causal="lower_right"),
        ),
        (
            "decode window + mask",
            dict(q=(2, 8, 1, 64), k=(2, 8, 1500, 64), is_causal="lower_right", window=500, mask="bool"),
        ),
        ("prefill sinks", dict(q=(1, 8, 200, 64), k=(1, 8, 200, 64), is_causal=True, sinks=sinks)),
        ("decode sinks GQA", dict(q=(1, 8, 1, 64), k=(1, 2, 1024, 64), enable_gqa=True, sinks=sinks)),
    ]


#: one case per kernel (prefill parallel and serial, masks, decode), for ``check --quick``
QUICK_CASES = ("prefill causal lower_right", "decode GQA 4 tokens causal", "odd sizes, 2-D")
PRECISIONS = ("float32", "float64", "float16", "int8", "int4")


def applies(precision, spec):
    """Whether a case runs in ``precision``: 4-bit rows pack two entries per byte, so odd head dims
    have no 4-bit format."""
    return precision != "int4" or not (spec["k"][-1] % 2 or spec.get("v", spec["k"])[-1] % 2)


def median_ms(fn, repeat=3):
    """Median wall time of ``fn()`` over ``repeat`` calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def case_inputs(rng, spec, precision):
    """(query, key, value) as handed to numba_attn, and the float64 values the reference should see."""
    from .quant import quantize

    q = rng.standard_normal(spec["q"])
    k = rng.standard_normal(spec["k"])
    v = rng.standard_normal(spec.get("v", spec["k"]))
    if precision == "int8":
        kq, vq = quantize(k), quantize(v)
        return (q.astype(np.float32), kq, vq), (q, k, v)
    if precision == "int4":
        from .quant import dequantize

        kq, vq = quantize(k, bits=4), quantize(v, bits=4)
        return (q.astype(np.float32), kq, vq), (q.astype(np.float32).astype(np.float64),) + tuple(
            dequantize(x).astype(np.float64) for x in (kq, vq)
        )
    dt = np.dtype(precision)
    ours = tuple(x.astype(dt) for x in (q, k, v))
    return ours, tuple(x.astype(np.float64) for x in ours)


def run_check(quick=False, out=None):
    """Every kernel path in every precision against the reference, printed as a table; returns the exit
    status (0: all within ``TOLERANCE``). ``quick``: ``QUICK_CASES`` only, for slow machines and emulators."""
    out = sys.stdout if out is None else out
    rng = np.random.default_rng(0)
    rows = []
    failed = 0
    cases = [c for c in check_cases() if not quick or c[0] in QUICK_CASES]
    for precision in PRECISIONS:
        for name, spec in cases:
            if not applies(precision, spec):
                continue
            kwargs = {
                key: spec[key]
                for key in ("is_causal", "enable_gqa", "window", "alibi_slopes", "softcap", "sinks")
                if key in spec
            }
            (qd, kd, vd), exact = case_inputs(rng, spec, precision)
            L, S = spec["q"][-2], spec["k"][-2]
            if spec.get("mask") == "bool":
                kwargs["attn_mask"] = rng.random((L, S)) > 0.3
            elif spec.get("mask") == "float":
                m = rng.standard_normal((L, S))
                m[rng.random(m.shape) < 0.3] = -np.inf
                kwargs["attn_mask"] = m.astype(np.float32 if precision != "float64" else np.float64)
            t0 = time.perf_counter()
            got = scaled_dot_product_attention(qd, kd, vd, **kwargs)
            first_ms = 1e3 * (time.perf_counter() - t0)
            ms = median_ms(functools.partial(scaled_dot_product_attention, qd, kd, vd, **kwargs))
            want = reference.scaled_dot_product_attention(*exact, **kwargs)
            ok, err, rel = within_tolerance(got, want, precision)
            failed += not ok
            shape = f"q{spec['q']} k{spec['k']}"
            rows.append(
                (
                    name,
                    precision,
                    shape,
                    f"{err:.2e}",
                    f"{rel:.2e}",
                    f"{ms:.2f}",
                    f"{first_ms:.0f}",
                    "ok" if ok else "FAIL",
                )
            )
            print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    header = ("case", "precision", "shape", "max abs err", "rel err", "ms", "first call ms", "")
    print_table(header, rows, out)
    bounds = "; ".join(
        f"{p}: |err| ≤ {t.rtol:g}·(max(1, max|ref|) + |ref|), rel ≤ {t.norm:g}" for p, t in TOLERANCE.items()
    )
    print(
        f"\n{len(rows) - failed}/{len(rows)} cases within tolerance ({bounds}). Reference: numba_attn.reference in "
        "float64 on the same (rounded) inputs; int8 against the unquantised inputs; int4 against its dequantised "
        "inputs (odd head dims have no 4-bit format: not run). rel err = ‖out − ref‖ / ‖ref‖. "
        "'first call' includes compiling or loading the kernel.",
        file=out,
    )
    return 1 if failed else 0


def print_table(header, rows, out):
    """``rows`` (tuples of strings) under ``header`` in left-aligned columns, with a rule below the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header), file=out)
    print(fmt.format(*("-" * w for w in widths)), file=out)
    for r in rows:
        print(fmt.format(*r), file=out)
