"""``bench --busy`` (neighbour processes, idle and busy tables), ``bench --layer`` (the SmolLM2 layer decode
step, its baselines, the call overhead and appends) and ``scripts/issue13_figures.py``: structure,
wiring, that the baselines compute the same step, and that no neighbour outlives the bench. No
assertion is on a timing: these run on loaded machines."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import numba
import numpy as np
import pytest

from numba_attn import __main__ as cli
from numba_attn import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _importable(name):
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _alive(pid):
    """True while ``pid`` is a neighbour (its command line holds the watchdog) that is not a zombie:
    a pid reused by another process once the neighbour is gone does not count."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"_watch" not in f.read():
                return False
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_gone(pids, seconds=20):
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


# ----------------------------------------------------------------------------------------------
# neighbours
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["busy loop", "BLAS"])
def test_neighbours_run_inside_the_block_and_are_gone_after(kind):
    with bench.neighbours(kind, cores=2, settle=0.1) as pids:
        assert len(pids) == (2 if kind == "busy loop" else 1)
        assert all(_alive(p) for p in pids)
    assert not [p for p in pids if _alive(p)]  # killed and reaped before the block returns


def test_neighbours_are_killed_on_keyboard_interrupt():
    seen = []
    with pytest.raises(KeyboardInterrupt), bench.neighbours("busy loop", cores=2, settle=0) as pids:
        seen.extend(pids)
        raise KeyboardInterrupt
    assert len(seen) == 2 and not [p for p in seen if _alive(p)]


def test_neighbour_that_fails_is_reported(monkeypatch):
    monkeypatch.setitem(bench._NEIGHBOUR_WORK, "BLAS", "raise SystemExit('no BLAS here')\n")
    message = r"(?s)BLAS neighbour exited with status 1 .*no BLAS here"
    with pytest.raises(RuntimeError, match=message), bench.neighbours("BLAS", cores=2, settle=0):
        pass


def test_unknown_neighbour():
    with pytest.raises(ValueError, match="busy loop, BLAS, numba"), bench.neighbours("compiler"):
        pass


_ORPHAN = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from numba_attn import bench
with bench.neighbours("busy loop", cores=2, settle=0) as pids:
    print(" ".join(map(str, pids)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)   # no finally runs: the neighbours must notice by themselves
"""


def test_neighbours_exit_when_the_bench_process_is_killed():
    proc = subprocess.run([sys.executable, "-c", _ORPHAN, ROOT], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    left = _wait_gone(pids, seconds=60)
    assert not left, f"neighbours outlived a killed bench process: {_describe(left)}"


def _describe(pids):
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                out.append(f"{pid}: " + " ".join(line.strip() for line in f if line.startswith(("State", "PPid"))))
        except FileNotFoundError:
            out.append(f"{pid}: gone")
    return "; ".join(out)


# ----------------------------------------------------------------------------------------------
# bench --busy on tiny cases, beside every kind of neighbour
# ----------------------------------------------------------------------------------------------


def _tiny_busy_cases(threads):
    q = np.random.default_rng(0).standard_normal((1, 2, 1, 32), dtype=np.float32)
    kv = np.random.default_rng(1).standard_normal((1, 2, 300, 32), dtype=np.float32)
    from numba_attn import scaled_dot_product_attention

    fns = {"numba_attn": lambda: scaled_dot_product_attention(q, kv, kv)}
    try:
        fns["torch"] = bench.Torch().prepare(bench.Case("tiny decode", 1, 2, 1, 300, 32), threads)
    except bench.Unavailable as why:
        fns["torch"] = str(why)
    return [("tiny decode", fns), ("SmolLM2 cache.attend S64", bench.attend_step(64, threads))]


@pytest.fixture(scope="module")
def busy_run(tmp_path_factory):
    """run_busy (quick) with two tiny cases beside each neighbour kind; (rc, table, json path, neighbour pids)."""
    json_path = tmp_path_factory.mktemp("busy") / "busy.json"
    started = []
    real_neighbours = bench.neighbours

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        with real_neighbours(*args, **kwargs) as pids:
            started.append(pids)
            yield pids

    out = io.StringIO()
    old_threads = numba.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "busy_cases", _tiny_busy_cases)
        mp.setattr(bench, "neighbours", recording)
        try:
            rc = bench.run_busy(quick=True, json_path=str(json_path), out=out, cores=2, settle=0.1)
        finally:
            numba.set_num_threads(old_threads)
    return rc, out.getvalue(), json_path, started


def test_busy_table(busy_run):
    rc, text, _, started = busy_run
    assert rc == 0, text
    lines = text.strip().splitlines()
    header = lines[0]
    for column in ("case", "neighbour", "ours idle ms", "ours busy ms", "ours busy/idle"):
        assert column in header, header
    with_torch = _importable("torch")
    for column in ("torch idle ms", "torch busy ms", "torch busy/idle", "ours/torch (target ≤ 1.1)"):
        assert (column in header) == with_torch, header
    rows = lines[2 : 2 + 2 * len(bench.NEIGHBOURS)]
    number = r"\d+\.\d\d"
    for i, row in enumerate(rows):
        kind = bench.NEIGHBOURS[i // 2]
        case = ("tiny decode", "SmolLM2 cache.attend S64")[i % 2]
        assert row.startswith(case) and f"  {kind}  " in row, row
        cells = re.findall(number, row)
        assert len(cells) == (7 if with_torch else 3), row
        if with_torch:
            assert re.search(rf"{number} (ok|over)\s*$", row), row
    assert "Target (issue 13): ours busy/idle ≤ 1.1 × torch busy/idle" in text
    assert len(started) == len(bench.NEIGHBOURS) and [len(p) for p in started] == [2, 1, 1]


def test_busy_leaves_no_neighbour(busy_run):
    _, _, _, started = busy_run
    pids = [p for group in started for p in group]
    assert pids and not [p for p in pids if _alive(p)]


def test_busy_json(busy_run):
    rc, text, json_path, _ = busy_run
    assert rc == 0 and f"wrote {json_path}" in text
    data = json.loads(json_path.read_text())
    assert data["cores"] == 2 and data["threads"] == numba.config.NUMBA_NUM_THREADS
    records = data["busy"]
    assert [(r["neighbour"], r["case"]) for r in records] == [
        (kind, case) for kind in bench.NEIGHBOURS for case in ("tiny decode", "SmolLM2 cache.attend S64")
    ]
    for r in records:
        assert r["ours_idle_s"] > 0 and r["ours_busy_s"] > 0
        assert (r["torch_idle_s"] is None) == (r["torch_skipped"] is not None) == (not _importable("torch"))


_BUSY_WITHOUT_TORCH = r"""
import io, sys
sys.path.insert(0, sys.argv[1])
sys.modules["torch"] = None          # import torch -> ImportError, as on a machine without it
import numpy as np
from numba_attn import bench
q = np.ones((1, 2, 1, 32), np.float32)
from numba_attn import scaled_dot_product_attention as sdpa
bench.busy_cases = lambda threads: [("tiny", {"numba_attn": lambda: sdpa(q, q, q), "torch": "no torch"})]
out = io.StringIO()
rc = bench.run_busy(quick=True, out=out, kinds=("busy loop",), cores=1, settle=0)
print(out.getvalue())
sys.exit(rc)
"""


def test_busy_without_torch_leaves_its_columns_out():
    proc = subprocess.run(
        [sys.executable, "-c", _BUSY_WITHOUT_TORCH, ROOT], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = proc.stdout.strip().splitlines()[0]
    assert "ours busy/idle" in header and "torch" not in header
    assert "- torch: no torch" in proc.stdout


def test_real_busy_cases_are_the_issues():
    """The three cases of the issue, each with ours and torch (or the reason torch is missing)."""
    cases = bench.busy_cases(1)
    assert [label for label, _ in cases] == [
        "decode B1 H32 L1 S4096 D64",
        "prefill causal B1 H8 L1024 S1024 D64 causal",
        "SmolLM2 cache.attend B1 H9/3 L1 S512 D64",
    ]
    for _, fns in cases:
        assert callable(fns["numba_attn"])
        assert callable(fns["torch"]) == _importable("torch")


def test_attend_step_matches_torch():
    fns = bench.attend_step(64, numba.config.NUMBA_NUM_THREADS)
    ours = fns["numba_attn"]()
    assert ours.shape == (1, 9, 1, 64)
    if callable(fns["torch"]):
        np.testing.assert_allclose(ours, fns["torch"]().numpy(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# bench --layer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_dtype, weights", [("float32", "float32"), ("int8", "int8"), ("float16", "int8")])
def test_layer_step_parts_and_baselines_compute_the_same_step(cache_dtype, weights):
    threads = numba.config.NUMBA_NUM_THREADS
    fns = bench.layer_step(64, cache_dtype, weights, threads)
    assert set(fns) == {"step", "projections", "attention"}
    ours = fns["step"]()
    assert ours.shape == (1, 1, 576) and fns["attention"]().shape == (1, 9, 1, 64)
    old = bench.old_layer_step(64, threads)()
    tol = 1e-5 if (cache_dtype, weights) == ("float32", "float32") else 0.05
    np.testing.assert_allclose(ours.reshape(1, 576), old, rtol=tol, atol=tol)
    if _importable("torch"):
        theirs = bench.torch_layer_step(64, threads)()
        np.testing.assert_allclose(theirs.numpy().reshape(1, 576), old, rtol=1e-4, atol=1e-5)


def test_captured_kernel_call_is_the_kernel_and_restores_the_modules():
    from numba_attn.kernels import decode

    real = (decode.decode_serial, decode.decode_parallel)
    cache = bench.smollm2_cache(64)
    q = bench.smollm2_query()
    expected = cache.attend(q)
    kernel, args = bench._captured_kernel_call(lambda: cache.attend(q))
    assert (decode.decode_serial, decode.decode_parallel) == real
    assert kernel is decode.decode_serial  # 64 tokens: the serial decode kernel
    assert args[11] == 64  # S: every cached key
    out = next(a for a in args if isinstance(a, np.ndarray) and a.shape == (9, 1, 64) and a.flags.writeable)
    out[...] = 0
    kernel(*args)
    np.testing.assert_array_equal(out.reshape(1, 9, 1, 64), expected)


def test_call_overhead_and_appends_are_positive_times():
    overhead = bench.call_overhead(64, inner=5, repeats=2)
    assert set(overhead) == {"attend", "kernel", "dispatch", "beyond_kernel"}
    assert overhead["attend"] > 0 and overhead["kernel"] > 0
    assert overhead["beyond_kernel"] == pytest.approx(overhead["attend"] - overhead["kernel"])
    for dtype in bench.FORMATS:
        assert bench.append_seconds(dtype, inner=5, repeats=2) > 0


def test_mask_cost_times_the_masked_case_against_the_same_case_without_its_mask(monkeypatch):
    """On a fake clock: the masked call "takes" 3 units, the unmasked 2: the ratio is 1.5, and the plain
    twin is the same case with the mask removed."""
    clock = [0.0]
    prepared = []

    def prepare(self, case, threads):
        prepared.append(case)

        def call():
            clock[0] += 3.0 if case.mask else 2.0

        return call

    monkeypatch.setattr(bench.NumbaAttn, "prepare", prepare)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    case = next(c for c in bench.CASES if c.mask == "bool")
    assert bench.mask_cost(case, 2, rounds=3) == pytest.approx(1.5)
    assert prepared == [case, bench.dataclasses.replace(case, mask="")]


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    json_path = tmp_path_factory.mktemp("layer") / "layer.json"
    out = io.StringIO()
    old_threads = numba.get_num_threads()
    real_overhead, real_append = bench.call_overhead, bench.append_seconds
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "call_overhead", lambda tokens, threads: real_overhead(tokens, threads, inner=5, repeats=2))
        mp.setattr(bench, "append_seconds", lambda dtype: real_append(dtype, inner=5, repeats=2))
        mp.setattr(bench, "EVICT_BYTES", 1 << 20)
        mp.setattr(bench, "_evict_buffer", None)
        try:
            rc = bench.run_layer(
                quick=True,
                json_path=str(json_path),
                out=out,
                tokens=(64,),
                formats=("float32", "int8"),
                weight_formats=("float32", "int4"),
            )
        finally:
            numba.set_num_threads(old_threads)
            bench._evict_buffer = None
    return rc, out.getvalue(), json_path


def test_layer_table(layer_run):
    rc, text, _ = layer_run
    assert rc == 0, text
    lines = text.strip().splitlines()
    header = lines[0]
    for column in ("tokens", "cache", "weights", "step ms", "projections", "attention", "rest", "× old fp32 path"):
        assert column in header, header
    assert ("× torch fp32" in header) == _importable("torch")
    rows = lines[2:6]
    combos = [(c, w) for c in ("float32", "int8") for w in ("float32", "int4")]
    for (c, w), row in zip(combos, rows):
        assert re.match(rf"64\s+{c}\s+{w}\s+(-?\d+\.\d{{3}}\s+){{4}}\d+\.\d\d×", row), row
    assert "old float32 path at 64 tokens" in text
    assert re.search(r"cache\.attend \d+\.\d µs \(target ≤ 25\).*beyond the kernel -?\d+\.\d µs \(target ≤ 15\)", text)
    assert re.search(r"float32 \d+\.\d µs, float16 \d+\.\d µs, int8 \d+\.\d µs \(target ≤ 10 µs each\)", text)


def test_layer_json(layer_run):
    rc, text, json_path = layer_run
    assert rc == 0 and f"wrote {json_path}" in text
    data = json.loads(json_path.read_text())
    assert [(r["cache"], r["weights"]) for r in data["layer"]] == [
        (c, w) for c in ("float32", "int8") for w in ("float32", "int4")
    ]
    for r in data["layer"]:
        assert r["tokens"] == 64 and r["step_s"] > 0 and r["old_s"] > 0
        assert r["rest_s"] == pytest.approx(r["step_s"] - r["projections_s"] - r["attention_s"])
        assert (r["torch_s"] is None) == (not _importable("torch"))
    assert set(data["append_s"]) == set(bench.FORMATS)
    assert data["call_overhead_s"]["tokens"] == 64


# ----------------------------------------------------------------------------------------------
# the command line and the figures script
# ----------------------------------------------------------------------------------------------


def test_busy_and_layer_are_wired(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "run_busy", lambda *a, **k: calls.append(("busy", a, k)) or 0)
    monkeypatch.setattr(bench, "run_layer", lambda *a, **k: calls.append(("layer", a, k)) or 0)
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: calls.append(("bench", a, k)) or 0)
    assert cli.main(["bench", "--busy", "--quick", "--threads", "1", "--json", "b.json"]) == 0
    assert cli.main(["bench", "--layer"]) == 0
    assert calls == [("busy", (True, 1, "b.json"), {}), ("layer", (False, None, None), {})]
    for argv in (["bench", "--busy", "--layer"], ["bench", "--busy", "--full"], ["bench", "--layer", "--plot", "p"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert len(calls) == 2
    capsys.readouterr()


@pytest.mark.parametrize("run", [bench.run_busy, bench.run_layer])
def test_refuses_more_threads_than_the_pool(run, capsys):
    assert run(threads=numba.config.NUMBA_NUM_THREADS + 1, out=io.StringIO()) == 2
    assert "NUMBA_NUM_THREADS" in capsys.readouterr().err


_FIGURES = r"""
import runpy, sys
from numba_attn import bench
sys.argv[1:] = ["--quick", "--no-example"]
real_layer, real_overhead, real_append, real_busy = (
    bench.layer_results, bench.call_overhead, bench.append_seconds, bench.busy_results)
# shrunk: 64 tokens timed and labelled 512 (the summary reads the 512-token rows), short per-call loops,
# a small eviction buffer, one neighbour kind on one core
bench.layer_results = lambda threads, quick, tokens, progress: [
    dict(r, tokens=512) for r in real_layer(threads, quick=True, tokens=(64,), progress=progress)]
bench.call_overhead = lambda tokens, threads: real_overhead(tokens, threads, inner=5, repeats=2)
bench.append_seconds = lambda dtype: real_append(dtype, inner=5, repeats=2)
bench.EVICT_BYTES = 1 << 20
bench.busy_results = lambda threads, quick, cores, progress: real_busy(
    threads, quick=True, kinds=("busy loop",), cores=1, settle=0, progress=progress)
runpy.run_path(SCRIPT, run_name="__main__")
"""


def test_figures_script_prints_every_figure():
    """scripts/issue13_figures.py end to end, shrunk (see _FIGURES): every figure of the summary is there."""
    script = os.path.join(ROOT, "scripts", "issue13_figures.py")
    proc = subprocess.run(
        [sys.executable, "-c", _FIGURES.replace("SCRIPT", repr(script))],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "== SmolLM2-shaped attention layer, one decode step ==" in text
    assert "== beside other work (bench --busy) ==" in text
    summary = text.split("== issue 13: figure, measured, target ==")[1]
    for figure in (
        "layer step at 512 tokens, int8 cache + int8 weights, × old float32 path",
        "layer step at 512 tokens, float32 cache + float32 weights, × old float32 path",
        "1-token GQA decode call at 64 tokens (cache.attend), in all",
        "the same call beyond the numba kernel",
        "one-token append, float32 cache",
        "one-token append, float16 cache",
        "one-token append, int8 cache",
        "busy: decode B1 H32 L1 S4096 D64, beside busy loop",
        "busy: SmolLM2 cache.attend B1 H9/3 L1 S512 D64, beside busy loop",
    ):
        assert figure in summary, figure
    rows = summary.strip().splitlines()[2:]
    assert rows and all(re.search(r"(met|NOT met|-)\s*$", row) for row in rows), summary


def test_plot_draws_the_prefill_sweep(monkeypatch, tmp_path):
    """``--plot`` with a stand-in matplotlib (the real one is optional): one line per implementation over
    the prefill sweep, a file written. (Its sweep was once unreachable code, a NameError at run time.)"""
    drawn = []

    class Axes:
        def plot(self, xs, ys, **kwargs):
            drawn.append((list(xs), kwargs["label"]))

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    class Figure:
        def tight_layout(self):
            pass

        def savefig(self, path, dpi):
            with open(path, "wb") as f:
                f.write(b"png")

    pyplot = types.ModuleType("matplotlib.pyplot")
    pyplot.subplots = lambda figsize: (Figure(), Axes())
    matplotlib = types.ModuleType("matplotlib")
    matplotlib.use = lambda backend: None
    matplotlib.pyplot = pyplot
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    cases = [bench.Case("prefill sweep", 1, 8, n, n, 64) for n in (128, 64)] + [bench.Case("decode", 1, 8, 1, 512, 64)]
    results = {(c, impl.name): 1e-3 for c in cases for impl in bench.IMPLEMENTATIONS}
    results[cases[0], "onnxruntime"] = results[cases[1], "onnxruntime"] = "not installed"
    path = tmp_path / "p.png"
    out = io.StringIO()
    assert bench._plot(cases, results, str(path), out) == 0
    assert drawn == [([64, 128], name) for name in ("numba_attn", "torch", "numpy")]
    assert path.read_bytes() == b"png" and f"wrote {path}" in out.getvalue()
