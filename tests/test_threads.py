"""numba_attn._threads: the thread count API, and concurrent callers under every threading layer
(each layer in its own process: numba picks its layer once per process)."""

import concurrent.futures
import os
import subprocess
import sys
import textwrap
import threading

import numba
import numpy as np
import pytest

import numba_attn
from conftest import randn
from numba_attn import get_num_threads, num_threads, scaled_dot_product_attention, set_num_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "scripts", "threads_smoke.py")
LIMIT = numba.config.NUMBA_NUM_THREADS


# ----------------------------------------------------------------------------------------------
# the thread count
# ----------------------------------------------------------------------------------------------


def test_get_num_threads():
    n = get_num_threads()
    assert isinstance(n, int) and 1 <= n <= LIMIT
    assert n == numba.get_num_threads()


def test_set_num_threads():
    old = get_num_threads()
    try:
        set_num_threads(1)
        assert get_num_threads() == 1 == numba.get_num_threads()
        set_num_threads(LIMIT)
        assert get_num_threads() == LIMIT
        set_num_threads(np.int64(1).item())
        assert get_num_threads() == 1
    finally:
        numba.set_num_threads(old)


@pytest.mark.parametrize("bad", [0, -1, LIMIT + 1, 10**6, True, False, 1.0, 2.5, "2", None, [1]])
def test_bad_thread_counts(bad):
    old = get_num_threads()
    with pytest.raises(ValueError, match="n must be an int from 1 to NUMBA_NUM_THREADS"):
        set_num_threads(bad)
    with pytest.raises(ValueError, match="NUMBA_NUM_THREADS"), num_threads(bad):
        pass
    assert get_num_threads() == old


def test_num_threads_context_manager():
    old = get_num_threads()
    with num_threads(1):
        assert get_num_threads() == 1
        with num_threads(LIMIT):
            assert get_num_threads() == LIMIT
        assert get_num_threads() == 1
    assert get_num_threads() == old
    with pytest.raises(RuntimeError, match="inside"), num_threads(1):
        assert get_num_threads() == 1
        raise RuntimeError("inside")
    assert get_num_threads() == old


def test_thread_count_is_per_python_thread():
    old = get_num_threads()
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def worker():
        with num_threads(1):
            seen["worker"] = get_num_threads()
            inside.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main"] = get_num_threads()
    release.set()
    t.join()
    assert seen == {"worker": 1, "main": old}


@pytest.mark.parametrize("L,S", [(300, 300), (1, 2048), (3, 700)])
def test_results_do_not_depend_on_the_thread_count(monkeypatch, L, S):
    """Prefill splits by query block (bit for bit the same); decode splits the keys by thread count
    (the same up to rounding)."""
    monkeypatch.setattr(numba_attn.config, "SERIAL_BELOW_FLOPS", 0)
    rng = np.random.default_rng(0)
    q, k, v = (randn(rng, (1, 4, n, 32), np.float32) for n in (L, S, S))
    with num_threads(1):
        one = scaled_dot_product_attention(q, k, v, is_causal="lower_right")
    with num_threads(LIMIT):
        many = scaled_dot_product_attention(q, k, v, is_causal="lower_right")
    if L > numba_attn.config.DECODE_MAX_QUERY_ROWS:
        np.testing.assert_array_equal(one, many)
    else:
        np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# concurrent callers, one process per threading layer
# ----------------------------------------------------------------------------------------------


def layer_env(layer):
    """Environment for a child process that asks numba for ``layer``. A tbb installed from PyPI puts
    libtbb.so.12 into <prefix>/lib, which the dynamic loader does not search: add it."""
    env = dict(os.environ)
    env["NUMBA_THREADING_LAYER"] = layer
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    libdir = os.path.join(sys.prefix, "lib")
    if layer == "tbb" and os.path.exists(os.path.join(libdir, "libtbb.so.12")):
        env["LD_LIBRARY_PATH"] = libdir + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


def _layer_loads(layer):
    module = {"tbb": "tbbpool", "omp": "omppool", "workqueue": "workqueue"}[layer]
    code = f"import numba.np.ufunc.{module}"
    return (
        subprocess.run([sys.executable, "-c", code], env=layer_env(layer), capture_output=True, timeout=120).returncode
        == 0
    )


#: threading layers that load here (workqueue always does; omp needs libgomp, tbb the tbb package)
LAYERS = [layer for layer in ("workqueue", "omp", "tbb") if layer == "workqueue" or _layer_loads(layer)]


def run_child(args, layer, timeout=300):
    proc = subprocess.run(
        [sys.executable] + args, env=layer_env(layer), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("layer", LAYERS)
def test_threads_smoke_script(layer):
    """scripts/threads_smoke.py: 8 Python threads calling at once get the serial results."""
    rc, out, err = run_child([SMOKE], layer)
    assert rc == 0, f"rc {rc}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
    assert "threads smoke test ok" in out
    assert out.strip().endswith(f"threading layer {layer}"), out


QUANT_CHILD = textwrap.dedent("""
    import concurrent.futures
    import numba
    import numpy as np
    from numba_attn import dequantize, quantize

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 256)).astype(dt) for n, dt in
          ((4000, np.float32), (3000, np.float64), (5000, np.float16), (2500, np.float32))]
    blocks = [32, None, 64, 16]
    serial = [quantize(x, b) for x, b in zip(xs, blocks)]
    back = [dequantize(s) for s in serial]

    def job(i):
        x, b = xs[i % 4], blocks[i % 4]
        qt = quantize(x, b)
        return i % 4, qt, dequantize(qt)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(4):
            for i, qt, d in pool.map(job, range(16)):
                assert np.array_equal(qt.data, serial[i].data), "concurrent quantize: data differs"
                assert np.array_equal(qt.scales, serial[i].scales), "concurrent quantize: scales differ"
                assert np.array_equal(d, back[i]), "concurrent dequantize differs"
    print(f"quantize ok: 8 Python threads, threading layer {numba.threading_layer()}")
""")


@pytest.mark.parametrize("layer", ["workqueue"])
def test_concurrent_quantize(layer):
    """quantize/dequantize run parallel kernels too: under workqueue they must be serialised (else
    numba aborts the process with "Concurrent access has been detected")."""
    rc, out, err = run_child(["-c", QUANT_CHILD], layer)
    assert rc == 0, f"rc {rc}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
    assert out.strip().endswith(f"threading layer {layer}"), out


def test_concurrent_layer_decoding():
    """Several Python threads, each decoding its own sequence with its own cache through one shared
    layer, get the results of decoding one after the other (in this process's layer)."""
    rng = np.random.default_rng(1)
    layer = numba_attn.MultiHeadAttention(64, 4, 2, seed=0)
    xs = [randn(rng, (1, 40, 64), np.float32) for _ in range(6)]

    def run(x):
        cache = layer.new_cache(1, 40, dtype=np.float16)
        outs = [layer(x[:, :8], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(8, 40)]
        return np.concatenate(outs, axis=1)

    serial = [run(x) for x in xs]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for got, want in zip(pool.map(run, xs), serial):
            np.testing.assert_array_equal(got, want)


def test_import_starts_no_threads_and_fork_stays_safe():
    """numba_attn starts numba's OpenMP pool at its first parallel kernel, not at import: with libgomp's
    threads running, fork() (multiprocessing's default on Linux, asv) terminates the child. The wait
    policy it sets for libgomp is restored in the environment once the pool has started."""
    import os
    import subprocess
    import sys

    child = (
        "import os, sys, numpy as np\n"
        "import numba_attn\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(7)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "assert os.WEXITSTATUS(status) == 7, status\n"
        "q = np.ones((1, 8, 512, 64), np.float32)\n"
        "numba_attn.scaled_dot_product_attention(q, q, q)\n"
        "assert 'OMP_WAIT_POLICY' not in os.environ\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@pytest.mark.parametrize(
    "env, seen",
    [
        ({}, ("config", None)),
        ({"NUMBA_ATTN_OMP_WAIT_POLICY": "passive"}, (None, "PASSIVE")),
        ({"NUMBA_ATTN_GOMP_SPINCOUNT": "1234"}, ("1234", None)),
        ({"GOMP_SPINCOUNT": "77"}, ("77", None)),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, (None, "ACTIVE")),
    ],
)
def test_pool_starts_with_a_short_spin_set_only_while_libgomp_loads(env, seen):
    """numba's pool starts with GOMP_SPINCOUNT = config.GOMP_SPINCOUNT (or the policy asked for), set
    in the environment only while the threading layer loads; a user's own variables win and stay."""
    child = (
        "import os, numba\n"
        "import numba_attn\n"
        "from numba_attn import _threads, config\n"
        "seen = []\n"
        "real = numba.get_num_threads\n"
        "def spy():\n"
        "    seen.append((os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY')))\n"
        "    return real()\n"
        "numba.get_num_threads = spy\n"
        "before = {k: os.environ.get(k) for k in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')}\n"
        "_threads.start_pool()\n"
        "after = {k: os.environ.get(k) for k in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')}\n"
        "assert before == after, (before, after)\n"
        "print(repr((seen[0], config.GOMP_SPINCOUNT)))\n"
    )
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_ATTN_OMP_WAIT_POLICY", "NUMBA_ATTN_GOMP_SPINCOUNT")
    }
    proc = subprocess.run(
        [sys.executable, "-c", child], env={**base, **env}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (spin, policy), configured = eval(proc.stdout.strip().splitlines()[-1])
    assert (spin, policy) == ((configured if seen[0] == "config" else seen[0]), seen[1])
