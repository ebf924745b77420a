"""numba_attn.info: the compile log and table behind ``python -m numba_attn warmup --report``."""

import io
import types as pytypes

import numpy as np
from numba import njit, types

from numba_attn import info


def _as_ours(fn):
    """``fn`` compiled under a numba_attn module's name, so that the compile log counts it as one of ours."""
    fn.__module__ = "numba_attn.info"
    fn.__qualname__ = fn.__name__  # a module-level function's name: not an overload's local implementation
    return njit(fn)


def test_the_log_attributes_helpers_to_our_functions():
    def _inner(x):
        return np.zeros(3)[0] + x  # np.zeros: a numba helper compiled for it

    inner = _as_ours(_inner)

    def _outer(x):
        return inner(x) + 1

    outer = _as_ours(_outer)
    with info.CompileLog() as log:
        assert outer(1.0) == 2.0
    rows = log.kernels()
    names = [name.rsplit(".", 1)[-1] for name, *_ in rows]
    assert names == ["_outer", "_inner"]  # in the order they started
    assert all(name.startswith("numba_attn.info.") for name, *_ in rows)
    total = sum(seconds for _, _, seconds, _ in rows)
    started = [c for c in log.compiles if c[4] < 0]  # the compiles nobody else set off: here only _outer
    assert len(started) == 1 and abs(total - started[0][2]) < 1e-6  # the rows add up to the whole compile
    for _, arrays, seconds, helpers in rows:
        assert arrays == "" and 0 <= helpers <= seconds
    assert rows[1][3] > 0  # _inner's helpers: np.zeros's compile
    assert len(log.compiles) > len(rows)


def test_the_log_stops_listening_at_the_end_of_the_block():
    with info.CompileLog() as log:
        pass

    @njit
    def later(x):
        return x

    later(1)
    assert log.compiles == []


def test_other_peoples_compiles_get_no_row():
    @njit
    def theirs(x):
        return x * 2

    with info.CompileLog() as log:
        theirs(3)
    assert len(log.compiles) == 1 and log.kernels() == []


def test_describe_arrays():
    def kernel(q, k, v, q_idx, mask, scale, out):  # pragma: no cover - its signature is what matters
        pass

    f32, f16 = types.float32[:, :, ::1], types.uint16[:, :, ::1]
    args = (f32, f16, f16, types.int64[::1], types.bool_[:, :, ::1], types.float32, f32)
    assert info.describe_arrays(kernel, args) == "q=f32 k=f16 v=f16 mask=bool out=f32"

    def helper(rows, n, scales, index):  # pragma: no cover
        pass

    args = (types.int8[:, ::1], types.int64, types.float32[::1], types.int64[::1])
    assert info.describe_arrays(helper, args) == "rows=i8 scales=f32"  # no key names: the non-index arrays


def test_kernel_dispatchers_lists_the_kernels_and_their_bodies():
    found = info.kernel_dispatchers()
    for name in (
        "prefill.prefill_parallel",
        "prefill.prefill_serial",
        "prefill._prefill_items",
        "decode.decode_parallel",
        "decode._decode_items",
        "decode._decode_merge",
        "varlen._varlen_items",
    ):
        assert name in found, sorted(found)
    assert isinstance(info.cache_hits(), int)


def test_the_report_table():
    log = info.CompileLog()
    fake = [
        (pytypes.SimpleNamespace(py_func=_fn("numba_attn.kernels.prefill", "_prefill_body")), 3.0, 1.0, -1),
        (pytypes.SimpleNamespace(py_func=_fn("numba_attn.kernels._load", "_ol.<locals>.impl")), 1.0, 0.5, 0),
        (pytypes.SimpleNamespace(py_func=_fn("numba.np.arrayobj", "ol_np_empty.<locals>.impl")), 0.5, 0.0, 1),
        (pytypes.SimpleNamespace(py_func=_fn("numba_attn.kernels.decode", "_decode_body")), 2.0, 0.0, -1),
    ]
    log.compiles = [[d, (types.float32[:, :, ::1],), s, nested, parent] for d, s, nested, parent in fake]
    # our overload's implementation (1) and the numba helper it set off (2) count for the kernel (0)
    assert log.kernels() == [("prefill._prefill_body", "q=f32", 3.0, 1.0), ("decode._decode_body", "q=f32", 2.0, 0.0)]
    out = io.StringIO()
    info.print_compile_report(log, 4, out)
    lines = out.getvalue().strip().splitlines()
    assert "2 numba_attn functions compiled in 5.0 s; 4 kernel variants loaded from the on-disk cache" in lines[0]
    assert lines[1].split() == ["kernel", "arrays", "seconds", "of", "which", "helpers"]
    assert lines[2].split() == ["prefill._prefill_body", "q=f32", "3.00", "1.00"]  # slowest first
    assert lines[3].split() == ["decode._decode_body", "q=f32", "2.00", "0.00"]


def _fn(module, name):
    def f(q):  # pragma: no cover - stands in for a compiled function
        pass

    f.__module__, f.__qualname__ = module, name
    return f


def test_warmup_report(monkeypatch):
    """``run_warmup(report=True)``: the warm-up's output, then the table of what it compiled."""

    def warm(out):
        print("  warming", file=out)
        fresh = _as_ours(lambda x: x + 1)  # a new function each call: always compiled
        fresh(1.0)
        return 0

    monkeypatch.setattr(info, "_warm", warm)
    out = io.StringIO()
    assert info.run_warmup(out, report=True) == 0
    text = out.getvalue()
    assert text.startswith("  warming\n")
    assert "1 numba_attn functions compiled in" in text
    assert "numba_attn.info.<lambda>" in text
