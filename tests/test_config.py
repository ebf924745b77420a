"""numba_attn.config: where the compile cache goes, and importing from a read-only install.

The read-only install runs in child processes (the cache location is decided once, at import).
Running as root (or with CAP_DAC_OVERRIDE) ignores permission bits, so there a directory is made
unwritable by putting a regular file where it, or one of its parents, should be: ``mkdir`` fails
for root too.
"""

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import numba_attn
from numba_attn import config

PACKAGE = os.path.dirname(os.path.abspath(numba_attn.__file__))

CHILD = textwrap.dedent("""
    import numpy as np
    import numba_attn, numba_attn.config as c
    from numba_attn.kernels import prefill
    print("CACHE", c.CACHE)
    print("CACHE_UNAVAILABLE", c.CACHE_UNAVAILABLE)
    print("CACHE_DIR", c.CACHE_DIR)
    print("package", numba_attn.__file__)
    q = np.linspace(-1, 1, 3 * 5 * 8, dtype=np.float32).reshape(3, 5, 8)
    out = numba_attn.scaled_dot_product_attention(q, q, q, is_causal=True)
    ref = numba_attn.reference.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert np.abs(out - ref).max() < 1e-5, np.abs(out - ref).max()
    print("kernel_cache", type(prefill.prefill_serial._cache).__name__)
    print("call ok")
""")


def permissions_are_enforced(tmp_path):
    """False when this process may write into a read-only directory (root, CAP_DAC_OVERRIDE)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").write_text("x")
    except OSError:
        return True
    finally:
        probe.chmod(0o755)
    return False


def run_child(env_updates, unset=(), cwd=None):
    env = dict(os.environ)
    for key in unset:
        env.pop(key, None)
    env.update(env_updates)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, f"rc {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    fields = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert proc.stdout.strip().endswith("call ok"), proc.stdout
    return fields, proc


def make_read_only(path):
    for root, _, files in os.walk(path):
        for name in files:
            os.chmod(os.path.join(root, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.chmod(root, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def make_writable(path):
    for root, _, files in os.walk(path):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


@pytest.fixture
def read_only_install(tmp_path):
    """(site dir holding a read-only copy of numba_attn, a HOME nothing can be written under)."""
    enforced = permissions_are_enforced(tmp_path)
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "numba_attn", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    home = tmp_path / "home"
    home.mkdir()
    if enforced:
        for d in (site / "numba_attn", site / "numba_attn" / "kernels"):
            (d / "__pycache__").mkdir()
    else:
        # permission bits are ignored here: a regular file where the cache directories would go
        (site / "numba_attn" / "__pycache__").mkdir()
        (site / "numba_attn" / "kernels" / "__pycache__").write_text("not a directory")
        (home / ".cache").write_text("not a directory")
    make_read_only(site)
    make_read_only(home)
    yield site, home, enforced
    make_writable(tmp_path)


def test_read_only_install_imports_and_runs(read_only_install):
    site, home, _ = read_only_install
    fields, proc = run_child(
        {"PYTHONPATH": str(site), "HOME": str(home)},
        unset=("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "NUMBA_ATTN_CACHE"),
        cwd=str(home),
    )
    assert fields["package"].startswith(str(site)), fields
    assert fields["CACHE"] == "False", fields
    assert "no writable cache directory" in fields["CACHE_UNAVAILABLE"], fields
    assert fields["CACHE_DIR"] == "None"
    assert fields["kernel_cache"] == "NullCache", fields
    assert "no locator" not in proc.stderr
    # nothing was written into the install
    assert not [f for f in os.listdir(site / "numba_attn" / "kernels") if f.endswith((".nbi", ".nbc"))]


def test_read_only_install_with_a_writable_numba_cache_dir(read_only_install, tmp_path):
    site, home, _ = read_only_install
    cache_dir = tmp_path / "numba-cache"
    fields, _ = run_child(
        {"PYTHONPATH": str(site), "HOME": str(home), "NUMBA_CACHE_DIR": str(cache_dir)},
        unset=("XDG_CACHE_HOME", "NUMBA_ATTN_CACHE"),
        cwd=str(home),
    )
    assert fields["CACHE"] == "True" and fields["CACHE_DIR"] == str(cache_dir), fields
    assert fields["kernel_cache"] == "FunctionCache"
    written = [f for _, _, files in os.walk(cache_dir) for f in files]
    assert any(f.endswith(".nbi") for f in written) and any(f.endswith(".nbc") for f in written), written


def import_only(env_updates, unset=()):
    """(CACHE, CACHE_UNAVAILABLE, CACHE_DIR) as a child process sees them after ``import numba_attn``."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(env_updates)
    code = "import numba_attn, numba_attn.config as c; print(c.CACHE, c.CACHE_DIR, c.CACHE_UNAVAILABLE, sep='|')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cache, cache_dir, why = proc.stdout.strip().split("|")
    return cache, cache_dir, why


def test_unwritable_numba_cache_dir_turns_caching_off(tmp_path):
    """NUMBA_CACHE_DIR is the user's choice: if it cannot be written, caching is off (no fallback)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache, cache_dir, why = import_only({"NUMBA_CACHE_DIR": str(blocker / "cache")}, unset=("NUMBA_ATTN_CACHE",))
    assert (cache, cache_dir) == ("False", "None")
    assert "no writable cache directory" in why


def test_numba_attn_cache_0_turns_caching_off(tmp_path):
    fields, _ = run_child({"NUMBA_ATTN_CACHE": "0", "NUMBA_CACHE_DIR": str(tmp_path / "unused")})
    assert fields["CACHE"] == "False" and fields["CACHE_UNAVAILABLE"] == "NUMBA_ATTN_CACHE=0", fields
    assert fields["CACHE_DIR"] == "None"
    assert fields["kernel_cache"] == "NullCache"
    assert not (tmp_path / "unused").exists() or not os.listdir(tmp_path / "unused")


@pytest.mark.parametrize("value", ["false", "False", ""])
def test_other_spellings_of_off(value, tmp_path):
    assert import_only({"NUMBA_ATTN_CACHE": value, "NUMBA_CACHE_DIR": str(tmp_path)}) == (
        "False",
        "None",
        "NUMBA_ATTN_CACHE=0",
    )


@pytest.mark.parametrize("value", [None, "1", "yes"])
def test_caching_is_on_by_default(value, tmp_path):
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    if value is not None:
        env["NUMBA_ATTN_CACHE"] = value
    assert import_only(env, unset=("NUMBA_ATTN_CACHE",)) == ("True", str(tmp_path / "cache"), "None")


# ----------------------------------------------------------------------------------------------
# _writable_dir / _cache_location, in-process with monkeypatched paths
# ----------------------------------------------------------------------------------------------


def test_writable_dir(tmp_path):
    assert config._writable_dir(str(tmp_path))
    new = tmp_path / "a" / "b"
    assert config._writable_dir(str(new))  # its nearest existing ancestor is writable
    assert not (tmp_path / "a").exists()  # ... and nothing was created
    assert os.listdir(tmp_path) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert not config._writable_dir(str(blocker))  # a file, not a directory
    assert not config._writable_dir(str(blocker / "sub"))  # under a file
    assert not config._writable_dir(str(blocker / "sub" / "deeper"))
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert not config._writable_dir(str(dangling / "sub"))  # a dangling link: makedirs would fail
    if permissions_are_enforced(tmp_path):
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert not config._writable_dir(str(ro))
            assert not config._writable_dir(str(ro / "sub"))
        finally:
            ro.chmod(0o755)


@pytest.fixture
def fake_layout(tmp_path, monkeypatch):
    """config's view of the world moved under tmp_path: its package dir, HOME, no NUMBA_CACHE_DIR."""
    pkg = tmp_path / "pkg" / "numba_attn"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(config, "__file__", str(pkg / "config.py"))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return tmp_path, pkg, home


def test_cache_location_in_tree(fake_layout):
    _, pkg, _ = fake_layout
    assert config._cache_location() == str(pkg / "kernels" / "__pycache__")
    assert not (pkg / "kernels").exists()  # decided without creating anything


def test_cache_location_user_wide(fake_layout):
    _, pkg, home = fake_layout
    (pkg / "kernels").write_text("a file: the in-tree cache cannot be created")
    assert config._cache_location() == str(home / ".cache" / "numba")
    assert not (home / ".cache").exists()


def test_cache_location_xdg(fake_layout, monkeypatch):
    tmp, pkg, _ = fake_layout
    (pkg / "kernels").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))
    assert config._cache_location() == str(tmp / "xdg" / "numba")


def test_cache_location_none(fake_layout, monkeypatch):
    tmp, pkg, _ = fake_layout
    (pkg / "kernels").write_text("x")
    blocker = tmp / "blocker"
    blocker.write_text("x")
    monkeypatch.setenv("HOME", str(blocker / "home"))
    assert config._cache_location() is None


def test_cache_location_numba_cache_dir(fake_layout, monkeypatch):
    tmp, pkg, _ = fake_layout
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp / "mine"))
    assert config._cache_location() == str(tmp / "mine")
    assert not (pkg / "kernels").exists()  # the in-tree location was not touched
    blocker = tmp / "blocker"
    blocker.write_text("x")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocker / "cache"))
    assert config._cache_location() is None  # no fallback to the package dir


def test_cache_location_read_only_dirs(fake_layout, monkeypatch):
    """The chmod version (permission bits are honoured only for non-root users)."""
    tmp, pkg, home = fake_layout
    if not permissions_are_enforced(tmp):
        (pkg / "kernels").write_text("x")
        blocker = tmp / "blocker"
        blocker.write_text("x")
        monkeypatch.setenv("HOME", str(blocker))
        assert config._cache_location() is None
        return
    (pkg / "kernels" / "__pycache__").mkdir(parents=True)
    for d in (pkg / "kernels" / "__pycache__", pkg / "kernels", pkg, home):
        d.chmod(0o555)
    try:
        assert config._cache_location() is None
    finally:
        for d in (pkg / "kernels" / "__pycache__", pkg / "kernels", pkg, home):
            d.chmod(0o755)


def test_module_state_is_consistent():
    assert config.CACHE == (config.CACHE_DIR is not None)
    assert (config.CACHE_UNAVAILABLE is None) == config.CACHE
    assert isinstance(config.FASTMATH, set) and "nnan" not in config.FASTMATH and "ninf" not in config.FASTMATH
    for name in (
        "PREFILL_BLOCK_Q",
        "PREFILL_BLOCK_K",
        "SERIAL_BELOW_FLOPS",
        "DECODE_MAX_QUERY_ROWS",
        "DECODE_MIN_KEYS",
        "DECODE_MAX_ROWS",
        "DECODE_BLOCK_K",
        "DECODE_ITEMS_PER_THREAD",
        "DECODE_MIN_SPLIT",
    ):
        value = getattr(config, name)
        assert isinstance(value, int) and value > 0, name


PORTABLE_CHILD = r"""
import numpy as np
import numba_attn as na
from numba_attn import reference, quantize
from numba_attn.kernels import _prefill_tiles
rng = np.random.default_rng(0)
worst = {}
for dt in (np.float32, np.float16):
    for L, S in ((70, 90), (1, 300)):          # prefill, and the split-K decode kernel
        q, k, v = (rng.standard_normal((1, 3, n, 40)).astype(dt) for n in (L, S, S))
        out = na.scaled_dot_product_attention(q, k, v, is_causal="lower_right").astype(np.float64)
        exact = (x.astype(np.float64) for x in (q, k, v))
        ref = reference.scaled_dot_product_attention(*exact, is_causal="lower_right")
        worst[f"{np.dtype(dt).name} L{L}"] = float(np.abs(out - ref).max())
q = rng.standard_normal((1, 2, 1, 64)).astype(np.float32)
k, v = (rng.standard_normal((1, 2, 300, 64)).astype(np.float32) for _ in range(2))
out = na.scaled_dot_product_attention(q, quantize(k), quantize(v))
ref = reference.scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
worst["int8"] = float(np.abs(out - ref).max())
print("TILE", _prefill_tiles.VW, _prefill_tiles.NV, "WORST", worst)
"""


def test_portable_generic_cpu_target(tmp_path):
    """NUMBA_CPU_NAME=generic (the portable-cache setting: SSE2 only on x86): the vector-IR kernels
    take 4-lane tiles, float16 converts through libgcc's helpers (LLVM would otherwise abort
    with "Symbol not found: __extendhfsf2"), and results match the reference."""
    env = dict(
        os.environ,
        NUMBA_CPU_NAME="generic",
        NUMBA_CACHE_DIR=str(tmp_path),
        PYTHONPATH=str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("NUMBA_CPU_FEATURES", None)
    env.pop("NUMBA_ATTN_TILE", None)
    proc = subprocess.run(
        [sys.executable, "-c", PORTABLE_CHILD], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("TILE 4 2 WORST"), line
    worst = eval(line.split("WORST", 1)[1])
    for name, err in worst.items():
        limit = {"float32": 1e-5, "float16": 2e-3, "int8": 5e-2}[name.split()[0]]
        assert err < limit, (name, err)


def test_tile_shape_override(monkeypatch):
    monkeypatch.setenv("NUMBA_ATTN_TILE", "8x2")
    assert config.tile_shape() == (8, 2, 4, "NUMBA_ATTN_TILE")
    monkeypatch.setenv("NUMBA_ATTN_TILE", "16x3x6")
    assert config.tile_shape()[:3] == (16, 3, 6)
    for bad in ("3x2", "8x7", "8", "axb", "8x2x9", "8x2x0", "8x2x4x1"):
        monkeypatch.setenv("NUMBA_ATTN_TILE", bad)
        with pytest.raises(ValueError, match="NUMBA_ATTN_TILE"):
            config.tile_shape()
    monkeypatch.delenv("NUMBA_ATTN_TILE")
    vw, nv, ki, source = config.tile_shape()
    assert vw in config.TILE_WIDTHS and nv in config.TILE_VECTORS and ki in config.TILE_ROWS
    assert source.startswith("default")


def test_the_kernels_use_the_configured_tile_shape():
    from numba_attn.kernels import _decode_tiles as _dots
    from numba_attn.kernels import _prefill_tiles as _tile

    assert (_tile.VW, _tile.NV, _tile.KI) == (config.TILE_VW, config.TILE_NV, config.TILE_KI)
    assert _tile.W == _tile.VW * _tile.NV
    assert _dots.VW == config.TILE_VW


@pytest.fixture
def restore_config():
    """Put config's environment-derived values back after a test that calls ``_reset``."""
    names = ("CACHE_DIR", "CACHE", "CACHE_UNAVAILABLE", "TILE_VW", "TILE_NV", "TILE_KI", "TILE_SOURCE")
    saved = {name: getattr(config, name) for name in names}
    yield
    for name, value in saved.items():
        setattr(config, name, value)


def test_reset_rereads_the_environment(monkeypatch, tmp_path, restore_config):
    monkeypatch.setenv("NUMBA_ATTN_TILE", "4x1")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "not" / "yet"))
    monkeypatch.delenv("NUMBA_ATTN_CACHE", raising=False)
    config._reset()
    assert (config.TILE_VW, config.TILE_NV, config.TILE_KI) == (4, 1, 4)
    assert (config.CACHE, config.CACHE_DIR, config.CACHE_UNAVAILABLE) == (True, str(tmp_path / "not" / "yet"), None)
    assert not (tmp_path / "not").exists()
    monkeypatch.setenv("NUMBA_ATTN_CACHE", "0")
    config._reset()
    assert (config.CACHE, config.CACHE_DIR, config.CACHE_UNAVAILABLE) == (False, None, "NUMBA_ATTN_CACHE=0")
    monkeypatch.setenv("NUMBA_ATTN_TILE", "5x5")
    with pytest.raises(ValueError, match="NUMBA_ATTN_TILE"):
        config._reset()


IMPORT_AND_LIST = """
import os, sys
import numba_attn, numba_attn.config as c
print(c.CACHE, c.CACHE_DIR, sep="|")
root = sys.argv[1]
print(sorted(os.path.relpath(os.path.join(d, n), root) for d, names, _ in os.walk(root) for n in names))
"""


def test_import_with_caching_off_creates_no_directories(tmp_path):
    """NUMBA_CACHE_DIR pointing to a path that does not exist yet: importing the package (config's
    decision included) leaves it alone."""
    target = tmp_path / "not" / "yet" / "cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(target), NUMBA_ATTN_CACHE="0")
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_AND_LIST, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False|None", "[]"]
    assert os.listdir(tmp_path) == []


def test_import_with_caching_on_creates_only_numbas_cache_directory(tmp_path):
    """With caching on, config still creates nothing; numba itself makes the cache directory of each
    kernel source folder when the kernels' cached dispatchers are built (at import), and nothing else."""
    target = tmp_path / "not" / "yet" / "cache"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ATTN_CACHE"}
    env["NUMBA_CACHE_DIR"] = str(target)
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_AND_LIST, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, listing = proc.stdout.strip().splitlines()
    assert first == f"True|{target}"
    made = eval(listing)
    assert made[:3] == ["not", os.path.join("not", "yet"), os.path.join("not", "yet", "cache")], made
    assert [os.path.basename(p).startswith("kernels_") for p in made[3:]] == [True], made  # numba's, one folder
