"""numba_attn.kernels (the package): stale on-disk kernels are dropped when any kernel source changes."""

import os
import subprocess
import sys
from pathlib import Path

IMPORT = "import numba_attn, numba_attn.kernels as k, sys; sys.stdout.write(str(k._fingerprint()))"


def _import(cache_dir):
    env = dict(
        os.environ,
        NUMBA_CACHE_DIR=str(cache_dir),
        PYTHONPATH=str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("NUMBA_ATTN_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", IMPORT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_stale_kernels_are_dropped_when_a_kernel_source_changes(tmp_path):
    fingerprint = _import(tmp_path)
    (stamp,) = tmp_path.glob("*/numba_attn.fingerprint")
    assert stamp.read_text() == fingerprint
    cached = [stamp.parent / "decode._decode_body_parallel-1.py311.nbi", stamp.parent / "x.py311.1.nbc"]
    for f in cached:
        f.write_bytes(b"machine code")
    _import(tmp_path)  # same sources: the cache stays
    assert all(f.exists() for f in cached)
    stamp.write_text("written by other kernel sources")
    _import(tmp_path)  # other sources: our cached kernels go
    assert not any(f.exists() for f in cached)
    assert stamp.read_text() == fingerprint
    (stamp.parent / "unrelated.txt").write_text("kept")
    stamp.write_text("changed again")
    _import(tmp_path)
    assert (stamp.parent / "unrelated.txt").exists()
