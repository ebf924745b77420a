"""numba_attn.kernels._link: a compiled body called from other kernels through a symbol, not linked in."""

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from numba import njit, prange, types

from numba_attn import config
from numba_attn.kernels import _link

ROOT = Path(__file__).resolve().parents[1]


def _scaled_sum(x, scale, out):
    total = 0.0
    for i in range(x.shape[0]):
        total += x[i]
    out[0] = total * scale
    if not np.isfinite(total):
        raise ValueError("not finite")
    return x.shape[0]


_body = _link.callee(_scaled_sum)
_call_body = _link.shared(_body, "_body")


@njit
def _caller(x, scale, out):
    return _call_body((x, scale, out), ()) + 1


def _items_body(x, out, w_begin, w_end):
    for w in range(w_begin, w_end):
        out[w] = 2 * x[w]


_items = _link.callee(_items_body)
_call_items = _link.shared(_items, "_items")


@njit(parallel=True)
def _parallel_caller(x, out):
    fixed = (x, out)  # built once: the loop passes it and the item's range
    for w in prange(x.shape[0]):
        i = np.int64(w)
        _call_items(fixed, (i, i + 1))


def test_the_call_returns_what_the_body_returns():
    out = np.zeros(1)
    assert _caller(np.arange(4.0), 0.5, out) == 5
    assert out[0] == 3.0


def test_an_exception_in_the_body_reaches_the_caller():
    with pytest.raises(ValueError, match="not finite"):
        _caller(np.array([1.0, np.inf]), 1.0, np.zeros(1))


def test_the_body_is_declared_not_linked_into_the_caller():
    _caller(np.arange(3.0), 1.0, np.zeros(1))
    (sig,) = _caller.signatures
    llvm = _caller.inspect_llvm(sig)
    symbol = _link.symbol_name(_body, _body.signatures[0])
    declared = [line for line in llvm.splitlines() if line.startswith("declare") and symbol in line]
    assert len(declared) == 1, declared
    body_name = _body.overloads[_body.signatures[0]].fndesc.llvm_func_name
    assert body_name not in llvm  # no copy of the body's code


def test_a_parallel_loop_calls_the_body_once_per_step():
    x = np.arange(1000.0)
    out = np.zeros_like(x)
    _parallel_caller(x, out)
    np.testing.assert_array_equal(out, 2 * x)
    # prange's unsigned index was cast: the body compiled for int64 bounds only
    assert all(sig[-2:] == (types.int64, types.int64) for sig in _items.signatures)


def test_symbol_names_depend_on_the_function_and_argument_types_only():
    sig32 = (types.float32[:], types.float64, types.float64[:])
    sig64 = (types.float64[:], types.float64, types.float64[:])
    name = _link.symbol_name(_body, sig32)
    assert name == _link.symbol_name(_body, sig32)
    assert name != _link.symbol_name(_body, sig64) and name != _link.symbol_name(_items, sig32)
    assert name.startswith(f"numba_attn.shared.{_scaled_sum.__module__}._scaled_sum.")


def test_the_body_has_no_python_entry():
    assert _body.targetoptions["no_cpython_wrapper"] and _body.targetoptions["no_cfunc_wrapper"]


def test_the_body_skips_numbas_per_function_pre_optimisation(monkeypatch):
    """Its LLVM module is optimised once, by the module pipeline (``_link._single_pass_library``)."""
    from numba.core import codegen

    seen = []
    real = codegen.CPUCodeLibrary._optimize_functions
    monkeypatch.setattr(
        codegen.CPUCodeLibrary, "_optimize_functions", lambda self, mod: seen.append(self.name) or real(self, mod)
    )

    def _fresh(x):
        return x + 1.5

    # compiled, not loaded: a function loaded from numba's on-disk cache (a second run of this test in
    # the same checkout) comes back in numba's own library class, whatever the pipeline
    monkeypatch.setattr(config, "CACHE", False)
    fresh = _link.callee(_fresh)
    fresh.compile((types.float64,))
    (sig,) = fresh.signatures
    library = fresh.overloads[sig].library
    assert type(library).__name__ == "SinglePassLibrary"
    assert library.name not in seen  # numba's pre-pass never ran on it (the override does not call it)
    plain = njit(lambda x: x + 2.5)
    plain.compile((types.float64,))
    assert seen  # while an ordinary function's library still gets it


MODULE = """
import numpy as np
from numba import njit
from numba_attn.kernels import _link

def _twice_body(x, out):
    for i in range(x.shape[0]):
        out[i] = 2 * x[i]

twice = _link.callee(_twice_body)
_call_twice = _link.shared(twice, "twice")

@njit(cache=True)
def caller(x, out):
    _call_twice((x,), (out,))
"""

RUN = """
import sys, numpy as np, linked_module as m
out = np.zeros(3)
m.caller(np.arange(3.0), out)
hits = lambda d: sum(d.stats.cache_hits.values())
misses = lambda d: sum(d.stats.cache_misses.values())
print(out.tolist(), hits(m.caller), misses(m.caller), len(m.twice.signatures))
"""


def test_a_cached_caller_finds_its_body_in_a_new_process(tmp_path):
    """The caller's machine code comes from the on-disk cache with a reference to the body's symbol: the
    library's reload hook loads the body (from its own cache entry) and registers the symbol before that code links."""
    (tmp_path / "linked_module.py").write_text(textwrap.dedent(MODULE))
    env = dict(
        os.environ,
        NUMBA_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )

    def run():
        proc = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.split("]")[0] + "]", proc.stdout.split("]")[1].split()

    first, (hits, misses, bodies) = run()
    assert first == "[0.0, 2.0, 4.0]" and (hits, misses, bodies) == ("0", "1", "1")
    second, (hits, misses, bodies) = run()  # the caller from the cache, the body loaded by its reload hook
    assert second == "[0.0, 2.0, 4.0]" and (hits, misses, bodies) == ("1", "0", "1")


def test_the_parallel_and_serial_kernels_share_one_body():
    """A float32 prefill and decode through the API, each with its serial (small) and parallel (large) build:
    one compiled body each."""
    import numba_attn
    from numba_attn.kernels import decode, prefill

    rng = np.random.default_rng(0)
    for L, S in ((4, 8), (300, 300), (1, 300), (1, 4096)):  # prefill serial, parallel; decode serial, parallel
        q = rng.standard_normal((1, 8, L, 64), dtype=np.float32)
        k = rng.standard_normal((1, 8, S, 64), dtype=np.float32)
        numba_attn.scaled_dot_product_attention(q, k, k)
    for serial, parallel, body in (
        (prefill.prefill_serial, prefill.prefill_parallel, prefill._prefill_items),
        (decode.decode_serial, decode.decode_parallel, decode._decode_items),
    ):
        kernels = set(serial.signatures) | set(parallel.signatures)
        assert set(serial.signatures) & set(parallel.signatures)  # the same argument types reached both builds
        # one body per argument types, not per build: the body takes the kernel's arguments (but the decode
        # kernel's items_per_call, how it calls the body) in their order, then its own
        names = list(inspect.signature(serial.py_func).parameters)
        keep = [i for i, name in enumerate(names) if name != "items_per_call"]
        passed = {tuple(sig[i] for i in keep) for sig in kernels}
        assert len(body.signatures) == len(kernels) and {tuple(sig[: len(keep)]) for sig in body.signatures} == passed
