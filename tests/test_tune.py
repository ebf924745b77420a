"""numba_attn/tune.py and the tile shapes it chooses from: the candidates fit the register file, the
timed work item computes the prefill products (checked against numpy), ``run_tune`` stores its winner
where ``config.tile_shape`` finds it (keyed by this CPU, other CPUs' entries kept, a broken file
ignored, NUMBA_ATTN_TILE still first), and the prefill kernel is right with shapes other than the
default (groups of W rows that are not powers of two, rows of A that leave remainders). No timing is
asserted."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numba_attn import __main__ as cli
from numba_attn import config, tune


@pytest.mark.parametrize("width", [4, 8, 16])
def test_candidates_fit_the_register_file(width):
    regs = tune.registers(width)
    shapes = tune.candidates(width)
    assert shapes and len(shapes) <= 20  # about a second each: the run stays well within a minute
    for ki, nv in shapes:
        assert ki * nv + nv + 1 <= regs and ki * nv >= (6 if regs == 16 else 12)
        assert ki in config.TILE_ROWS and nv in config.TILE_VECTORS
    assert (4, 2) in shapes if regs == 16 else (4, 4) in shapes


@pytest.mark.parametrize("ki, nv", [(4, 2), (6, 1), (3, 3)])
def test_work_item_computes_the_prefill_products(ki, nv):
    """One repetition of the timed item: st = K·qᵀ per group (the last key block's scores stay in st),
    acc += Σ_blocks V_blockᵀ·st, every key and column covered whatever the remainders."""
    vw = 4
    w = vw * nv
    groups = -(-tune.ROWS // w)
    run, flops = tune.work_item(ki, vw, nv)
    rng = np.random.default_rng(ki * 10 + nv)
    qt = rng.standard_normal((groups, tune.E, w)).astype(np.float32)
    kv = rng.standard_normal((tune.KEYS, tune.E)).astype(np.float32)
    st = np.zeros((tune.BLOCK_K, w), np.float32)
    acc = np.zeros((groups, tune.E, w), np.float32)
    run(qt, kv, st, kv, acc, 1)
    k64, q64 = kv.astype(np.float64), qt.astype(np.float64)
    expected = np.zeros((groups, tune.E, w))
    for g in range(groups):
        for j0 in range(0, tune.KEYS, tune.BLOCK_K):
            block = k64[j0 : j0 + tune.BLOCK_K]
            scores = (block @ q64[g]).astype(np.float32).astype(np.float64)  # st holds float32
            expected[g] += block.T @ scores
    np.testing.assert_allclose(acc, expected, rtol=2e-4, atol=2e-3)
    np.testing.assert_allclose(st, (k64[-tune.BLOCK_K :] @ q64[-1]), rtol=1e-4, atol=1e-4)
    assert flops == 4.0 * tune.ROWS * tune.KEYS * tune.E


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NUMBA_ATTN_TILE", raising=False)
    return tmp_path / "cache" / config.TUNED_TILES_FILE


def test_run_tune_stores_the_fastest_shape_for_this_cpu(tuned_dir):
    width = tune.default_width()
    tuned_dir.parent.mkdir()
    tuned_dir.write_text(json.dumps({"other cpu|+x": {"VW": 4, "NV": 1, "KI": 2}}))
    out = io.StringIO()
    assert tune.run_tune(out=out, shapes=[(4, 2), (2, 1)], rounds=1, seconds=0.01) == 0
    table = json.loads(tuned_dir.read_text())
    assert table["other cpu|+x"] == {"VW": 4, "NV": 1, "KI": 2}
    entry = table[config.tune_key()]
    timed = entry["useful_gflops"]
    assert set(timed) == {f"4x{width}x2", f"2x{width}x1"} and all(g > 0 for g in timed.values())
    best = max(timed, key=timed.get)
    assert f"{entry['KI']}x{entry['VW']}x{entry['NV']}" == best
    assert "<- best" in out.getvalue() and str(tuned_dir) in out.getvalue()
    shape = config.tile_shape(str(tuned_dir))
    assert shape[:3] == (entry["VW"], entry["NV"], entry["KI"]) and shape[3].startswith("tuned")


def test_tile_shape_ignores_a_broken_or_foreign_file_and_yields_to_the_variable(tuned_dir, monkeypatch):
    tuned_dir.parent.mkdir()
    default = config.tile_shape(None)
    for text in ("not json", "[1, 2]", json.dumps({config.tune_key(): {"VW": 3, "NV": 1, "KI": 1}}), "{}"):
        tuned_dir.write_text(text)
        assert config.tile_shape(str(tuned_dir)) == default
    tuned_dir.write_text(json.dumps({config.tune_key(): {"VW": 4, "NV": 3, "KI": 5}}))
    assert config.tile_shape(str(tuned_dir))[:3] == (4, 3, 5)
    monkeypatch.setenv("NUMBA_ATTN_TILE", "4x1x2")
    assert config.tile_shape(str(tuned_dir)) == (4, 1, 2, "NUMBA_ATTN_TILE")
    assert config.tile_shape(str(tuned_dir), forced=False)[:3] == (4, 3, 5)


def test_tune_dry_run_and_nowhere_to_store(tuned_dir, monkeypatch, capsys):
    monkeypatch.setattr(tune, "candidates", lambda width: [(2, 1)])
    monkeypatch.setattr(tune, "measure", lambda shapes, width, *a, **k: {(2, 1): 1.0})
    assert cli.main(["tune", "--dry-run"]) == 0
    assert not tuned_dir.exists()
    monkeypatch.setattr(config, "CACHE_DIR", None)
    assert tune.run_tune() == 1
    assert "NUMBA_ATTN_TILE=" in capsys.readouterr().out


SHAPE_CHILD = r"""
import numpy as np
import numba_attn as na
from numba_attn import reference
from numba_attn.kernels import _prefill_tiles as t
rng = np.random.default_rng(0)
worst = 0.0
cases = ((100, 130, 64, False, None), (77, 77, 40, True, None), (200, 260, 72, False, "bool"), (30, 50, 64, False, "f"))
for L, S, D, causal, mask in cases:
    q, k, v = (rng.standard_normal((1, 2, n, D)).astype(np.float32) for n in (L, S, S))
    m = None if mask is None else rng.random((L, S)) > 0.2
    m = rng.standard_normal((L, S)).astype(np.float32) if mask == "f" else m
    out = na.scaled_dot_product_attention(q, k, v, is_causal=causal, attn_mask=m)
    exact = (x.astype(np.float64) for x in (q, k, v))
    ref = reference.scaled_dot_product_attention(*exact, is_causal=causal, attn_mask=m)
    worst = max(worst, float(np.abs(out - ref).max()))
print("TILE", t.KI, t.VW, t.NV, "WORST", worst)
"""


@pytest.mark.parametrize("tile", ["8x3x3", "4x1x7"])
def test_prefill_is_right_with_other_tile_shapes(tile, tmp_path):
    """W = 24 (not a power of two) with 3 rows of A, and W = 4 with 7: the key and column remainders
    go through the smaller tiles, the padded row groups through the softmax tile."""
    env = dict(
        os.environ,
        NUMBA_ATTN_TILE=tile,
        NUMBA_CACHE_DIR=str(tmp_path),
        PYTHONPATH=str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", SHAPE_CHILD], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    vw, nv, ki = (int(x) for x in tile.split("x"))
    assert line.startswith(f"TILE {ki} {vw} {nv} WORST"), line
    assert float(line.split("WORST", 1)[1]) < 1e-5
