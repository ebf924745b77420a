"""``python -m numba_attn info | check | warmup | bench``."""

import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import numba
import numpy as np
import pytest

import numba_attn
from numba_attn import __main__ as cli
from numba_attn import bench, check, config, info, tune

try:
    import matplotlib
except ImportError:  # matplotlib is optional (the plot extra): the --plot test is only collected with it
    matplotlib = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ("float32", "float64", "float16", "int8", "int4")


def run_module(*args, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run(
        [sys.executable, "-m", "numba_attn", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def test_info():
    proc = run_module("info")
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    assert rows["numba_attn"] == numba_attn.__version__
    assert rows["threading layer"] in ("workqueue", "omp", "tbb"), proc.stdout
    assert rows["numba"] == numba.__version__
    assert int(rows["NUMBA_NUM_THREADS"]) >= 1
    assert "compile cache" in rows and "CPU name (JIT target)" in rows


def test_info_reports_the_requested_threading_layer():
    env_layer = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    proc = subprocess.run(
        [sys.executable, "-m", "numba_attn", "info"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(env_layer, PYTHONPATH=ROOT + os.pathsep + env_layer.get("PYTHONPATH", "")),
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^threading layer\s+workqueue$", proc.stdout, re.M), proc.stdout
    assert "warning: threading layer is 'workqueue'" in proc.stdout


def test_check_quick():
    proc = run_module("check", "--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["case", "precision"]
    table = [line for line in lines[2:] if line.strip() and not line.startswith(tuple("0123456789"))]
    specs = dict(check.check_cases())
    n = 0
    for precision in PRECISIONS:
        rows = [line for line in table if re.search(rf"\s{precision}\s", line)]
        expected = sum(check.applies(precision, specs[name]) for name in check.QUICK_CASES)
        assert len(rows) == expected > 0, (precision, rows)
        assert all(line.rstrip().endswith("ok") for line in rows), rows
        n += expected
    assert f"{n}/{n} cases within tolerance" in proc.stdout


@pytest.mark.parametrize("command", ["info", "check", "warmup", "bench", "tune"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m numba_attn {command}" in out


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "check", "warmup", "bench", "tune"):
        assert command in out


def test_bad_command_line(capsys):
    for argv in ([], ["frobnicate"], ["check", "--slow"], ["bench", "--threads", "many"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()


def test_info_and_check_are_wired(monkeypatch):
    called = []
    monkeypatch.setattr(info, "run_info", lambda out=None: called.append("info") or 0)
    monkeypatch.setattr(check, "run_check", lambda quick=False, out=None: called.append(("check", quick)) or 0)
    assert cli.main(["info"]) == 0 and cli.main(["check"]) == 0 and cli.main(["check", "--quick"]) == 0
    assert called == ["info", ("check", False), ("check", True)]


def test_main_is_only_argument_wiring():
    """__main__ holds the parser and the dispatch; the commands' bodies live in check, info and bench."""
    names = {name for name in vars(cli) if not name.startswith("__")}
    assert names == {"argparse", "sys", "bench", "check", "info", "tune", "main"}, names


def test_warmup_is_wired(monkeypatch):
    called = []
    monkeypatch.setattr(info, "run_warmup", lambda out=None, report=False: called.append(report) or 0)
    assert cli.main(["warmup"]) == 0 and cli.main(["warmup", "--report"]) == 0
    assert called == [False, True]


def test_tune_is_wired(monkeypatch):
    called = []
    monkeypatch.setattr(tune, "run_tune", lambda out=None, write=True: called.append(("tune", write)) or 0)
    monkeypatch.setattr(tune, "run_tune_then_warmup", lambda out=None: called.append("tune+warmup") or 0)
    assert cli.main(["tune"]) == 0 and cli.main(["tune", "--dry-run"]) == 0 and cli.main(["warmup", "--tune"]) == 0
    assert called == [("tune", True), ("tune", False), "tune+warmup"]


def test_info_names_the_tile_shape_and_its_source():
    out = io.StringIO()
    assert info.run_info(out=out) == 0
    line = next(x for x in out.getvalue().splitlines() if x.startswith("register tile"))
    assert f"{config.TILE_KI} x {config.TILE_VW} x {config.TILE_NV}: {config.TILE_SOURCE}" in line


def test_bench_refuses_more_threads_than_the_pool(capsys):
    assert bench.run_bench(threads=numba.config.NUMBA_NUM_THREADS + 1, out=io.StringIO()) == 2
    assert "NUMBA_NUM_THREADS" in capsys.readouterr().err


def test_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "plot.png"
    assert bench._plot([], {}, str(path), io.StringIO()) == 2
    assert "matplotlib" in capsys.readouterr().err
    assert not path.exists()


# ----------------------------------------------------------------------------------------------
# bench, for real, on a few tiny cases
# ----------------------------------------------------------------------------------------------

TINY_CASES = [
    bench.Case("prefill sweep", 1, 8, 64, 64, 64),
    bench.Case("prefill sweep", 1, 8, 96, 96, 64),
    bench.Case("decode", 1, 8, 1, 512, 64),
    bench.Case("decode, float16 cache", 1, 8, 1, 512, 64, dtype="float16"),
    bench.Case("decode, int8 cache", 1, 8, 1, 512, 64, dtype="int8"),
    bench.Case("decode, int8 keys + int4 values", 1, 8, 1, 512, 64, dtype="int8/int4"),
    bench.Case("decode GQA 8/2", 1, 8, 1, 512, 64, H_kv=2),
    bench.Case("prefill, boolean mask", 1, 8, 64, 64, 64, mask="bool"),
    bench.Case("prefill, float mask", 1, 8, 64, 64, 64, mask="float"),
]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """run_bench once (quick) with the tiny cases, a small bandwidth array, --json and (with
    matplotlib) --plot; returns (rc, printed table, json path, png path)."""
    tmp = tmp_path_factory.mktemp("bench")
    json_path = tmp / "bench.json"
    png_path = tmp / "bench.png" if matplotlib is not None else None
    real_bandwidth = bench.read_bandwidth
    old_threads = numba.get_num_threads()
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "default_cases", lambda *args, **kwargs: list(TINY_CASES))
        mp.setattr(bench, "read_bandwidth", lambda threads, nbytes=0: real_bandwidth(threads, nbytes=8 << 20))
        try:
            rc = bench.run_bench(
                quick=True, json_path=str(json_path), plot_path=None if png_path is None else str(png_path), out=out
            )
        finally:
            numba.set_num_threads(old_threads)
    return rc, out.getvalue(), json_path, png_path


def test_bench_table(bench_run):
    rc, text, _, _ = bench_run
    assert rc == 0, text
    lines = text.strip().splitlines()
    header = lines[0]
    for column in (
        "case",
        "shape",
        "numba_attn ms",
        "throughput",
        "torch ms (ours ×)",
        "onnxruntime ms (ours ×)",
        "numpy ms (ours ×)",
        "ours × torch fp32",
    ):
        assert column in header, header
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = lines[2 : 2 + len(TINY_CASES)]
    for case, row in zip(TINY_CASES, rows):
        assert row.startswith(case.name) and case.shape in row, row
        assert re.search(r"\d+\.\d+ (GB/s|GFLOP/s)", row), row
    ratio = re.compile(r"\d+\.\d\d \(\d+\.\d\d×\)")
    # numpy runs the float32 cases; its column holds "ms (ratio×)"
    assert ratio.search(rows[0]) and ratio.search(rows[2]), rows
    decode_rows = rows[2:7]
    assert all("% bw)" in row for row in decode_rows), decode_rows
    # masked prefills: every installed baseline ran them, and each is set against its unmasked twin (the first case)
    ran = 1 + _importable("torch") + (_importable("onnxruntime") and _importable("onnx"))  # numpy always
    for row in rows[7:9]:
        assert len(ratio.findall(row)) == ran, row
    for name in ("boolean", "float"):
        assert re.search(rf"prefill, {name} mask: \d+\.\d\d× the time of the same prefill without a mask", text), text
    assert "memory read bandwidth, measured in this run" in text
    assert re.search(
        r"import numba_attn \d+\.\d+ s; first prefill \+ decode call in a new process: cold compile "
        r"\d+\.\d s, from the on-disk cache \d+\.\d+ s",
        text,
    ), text
    assert "- numpy skipped on some cases: float32 only" in text
    if _importable("torch"):
        assert "- torch skipped on some cases: no quantised attention" in text
        # float16 / int8 / int4 rows are compared with torch's float32 run on the same tokens
        assert all(re.search(r"\d+\.\d\d×\s*$", rows[i]) for i in (3, 4, 5)), rows
    if _importable("onnxruntime") and _importable("onnx"):
        assert (
            "- onnxruntime skipped on some cases: the MultiHeadAttention contrib op has no grouped-query form" in text
        )


def _importable(name):
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def test_bench_json(bench_run):
    rc, text, json_path, _ = bench_run
    assert rc == 0
    assert f"wrote {json_path}" in text
    data = json.loads(json_path.read_text())
    assert data["threads"] == numba.config.NUMBA_NUM_THREADS
    for key in ("bandwidth_GBps", "import_s", "cold_first_call_s", "cached_first_call_s"):
        assert isinstance(data[key], float) and data[key] > 0, key
    records = data["results"]
    assert [r["case"] for r in records] == [c.name for c in TINY_CASES]
    for case, record in zip(TINY_CASES, records):
        assert (record["B"], record["H"], record["L"], record["S"], record["D"], record["dtype"]) == (
            case.B,
            case.H,
            case.L,
            case.S,
            case.D,
            case.dtype,
        )
        assert record["numba_attn_s"] > 0 and record["throughput"] > 0
        assert record["unit"] == ("GB/s" if case.L <= 8 else "GFLOP/s")
        for impl in ("torch", "onnxruntime", "numpy"):
            value = record[f"{impl}_s"]
            assert value is None or value > 0
            assert (value is None) == (f"{impl}_skipped" in record)
    assert records[0]["numpy_s"] > 0 and records[4]["numpy_s"] is None


if matplotlib is not None:

    def test_bench_plot(bench_run):
        rc, text, _, png_path = bench_run
        assert rc == 0
        assert f"wrote {png_path}" in text
        data = png_path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_bench_arguments_are_wired(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "run_bench", lambda *args, **kwargs: calls.append((args, kwargs)) or 0)
    assert cli.main(["bench", "--quick", "--threads", "1", "--json", "r.json", "--plot", "p.png", "--full"]) == 0
    assert cli.main(["bench"]) == 0
    bound = [dict(zip(("quick", "threads", "json_path", "plot_path", "full"), a), **k) for a, k in calls]
    assert bound[0] == dict(quick=True, threads=1, json_path="r.json", plot_path="p.png", full=True)
    assert bound[1] == dict(quick=False, threads=None, json_path=None, plot_path=None, full=False)


_WITHOUT_TORCH = r"""
import io, sys
sys.modules["torch"] = None          # import torch -> ImportError, as on a machine without it
sys.modules["onnxruntime"] = None
from numba_attn import bench
cases = [bench.Case("prefill", 1, 2, 64, 64, 32), bench.Case("decode", 1, 2, 1, 300, 32)]
bench.default_cases = lambda *args, **kwargs: list(cases)
real = bench.read_bandwidth
bench.read_bandwidth = lambda threads, nbytes=0: real(threads, nbytes=4 << 20)
out = io.StringIO()
rc = bench.run_bench(quick=True, out=out)
print(out.getvalue())
sys.exit(rc)
"""


def test_bench_without_torch_or_onnxruntime():
    """The README's main job also works where no baseline but numpy is installed: their columns show '-'
    and the reason is printed."""
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "- torch skipped on some cases: torch is not installed" in text, text
    assert "- onnxruntime skipped on some cases: onnxruntime and onnx are not installed" in text, text
    rows = [line for line in text.splitlines() if line.startswith(("prefill", "decode"))]
    assert len(rows) == 2, text
    for row in rows:
        assert "×" in row  # the numpy ratio is still there


# ----------------------------------------------------------------------------------------------
# one tolerance table (check and the tests), one case list (bench and asv)
# ----------------------------------------------------------------------------------------------


def test_tests_and_check_share_one_tolerance_table():
    from conftest import RTOL

    assert RTOL == {np.dtype(p): t.rtol for p, t in check.TOLERANCE.items() if p not in ("int8", "int4")}
    assert set(check.TOLERANCE) == set(check.PRECISIONS)
    # the values the tests used before the tables were merged: never looser than these
    assert RTOL[np.dtype(np.float16)] <= 1e-3 and RTOL[np.dtype(np.float32)] <= 1e-5
    assert RTOL[np.dtype(np.float64)] <= 1e-10


def test_within_tolerance_is_the_tests_rule():
    ref = np.array([0.5, -2.0, 4.0])
    rtol = check.TOLERANCE["float16"].rtol
    bound = rtol * (4.0 + np.abs(ref))  # rtol·(max(1, max|ref|) + |ref|)
    inside = ref + 0.99 * bound * np.array([0, 0, 1])
    ok, err, rel = check.within_tolerance(inside, ref, "float16")
    assert ok and err == pytest.approx(0.99 * bound[2]) and rel < check.TOLERANCE["float16"].norm
    assert not check.within_tolerance(ref + 1.01 * bound * np.array([0, 0, 1]), ref, "float16")[0]
    assert not check.within_tolerance(inside, ref, "float32")[0]
    assert check.within_tolerance(ref.astype(np.float32), ref, "float32")[0]
    assert not check.within_tolerance(np.array([np.nan, -2.0, 4.0]), ref, "float32")[0]
    assert not check.within_tolerance(ref * 1.1, ref, "int8")[0]  # 10 % in norm
    assert check.within_tolerance(ref * 1.01, ref, "int8")[0]


def test_bench_cases_are_listed_once():
    shapes = [dataclasses.replace(case, name="") for case in bench.CASES]
    assert len(shapes) == len(set(shapes))
    assert all(case.uses for case in bench.CASES)
    assert set(bench.default_cases()) <= set(bench.CASES)
    assert [c.shape for c in bench.default_cases(quick=True)] == [
        "B1 H8 L1024 S1024 D64",
        "B1 H8 L1024 S1024 D64 causal",
        "B8 H12 L128 S128 D32",
        "B1 H32 L1 S4096 D64",
        "B1 H32 L1 S4096 D64",
        "B1 H32 L1 S4096 D64",
        "B1 H32 L1 S4096 D64",
        "B1 H32 L1 S4096 D64",
        "B1 H8 L1024 S1024 D64 bool mask",
        "B1 H8 L1024 S1024 D64 float mask",
        "B1 H8 L256 S256 D64",
        "B1 H8 L512 S512 D64",
    ]
    full = bench.default_cases(full=True)
    assert [c.L for c in full if c.L == 4096] == [4096, 4096]
    assert not [c for c in bench.default_cases(full=True, small_memory=True) if c.kv_bytes > 64 << 20]


ASV_SHAPES = r"""
import json, sys
sys.path.insert(0, "asv_bench")
from benchmarks import decode, layer, prefill, quantised
from numba_attn import bench
groups = {"prefill": prefill.PREFILL, "throughput": prefill.THROUGHPUT, "memory": prefill.MEMORY,
          "masked": prefill.MASKED, "accuracy": prefill.ACCURACY, "grid": decode.GRID, "extra": decode.EXTRA,
          "bandwidth": decode.SHAPES, "quantised": quantised.SHAPES}
out = {name: [[bench.CASES.index(c), shape] for shape, c in g.items()] for name, g in groups.items()}
out["layer"] = [bench.CASES.index(c) for c in (*layer.DECODE_STEPS.values(), layer.ENCODER, prefill.ENCODER)]
out["params"] = [len(cls.params) for cls in (prefill.Prefill, decode.Decode, layer.LayerDecodeStep)]
print(json.dumps(out))
"""


def test_asv_takes_its_shapes_from_the_bench_cases():
    """The asv suite's parameter shapes are ``bench.CASES`` entries (the very objects), none is empty."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", ASV_SHAPES], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    groups = json.loads(proc.stdout)
    for name in ("prefill", "throughput", "memory", "masked", "accuracy", "grid", "extra", "bandwidth", "quantised"):
        assert groups[name], name
        for index, shape in groups[name]:
            assert bench.CASES[index].shape == shape
    assert len(groups["prefill"]) == 8 and len(groups["grid"]) == 6 and len(groups["bandwidth"]) == 6
    assert [bench.CASES[i].mask for i, _ in groups["masked"]] == ["", "bool", "float"]
    assert len(groups["layer"]) == 4
