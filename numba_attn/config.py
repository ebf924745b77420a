"""Every tunable of numba_attn in one place; kernels read these at compile time, the API at call time.

Environment variables (read at import, and again by ``_reset()``):

``NUMBA_ATTN_CACHE``   ``1`` (default) keeps compiled kernels in numba's on-disk cache, ``0`` turns it off.
``NUMBA_CACHE_DIR``    numba's own: where the cache goes (default: ``numba_attn/kernels/__pycache__``,
                       else ``~/.cache/numba``).
``NUMBA_ATTN_TILE``    ``VWxNV`` or ``VWxNVxKI``, e.g. ``8x2`` or ``8x2x4``: the vector width, vectors per row
                       and rows per tile of the register-tiled micro-kernels (``kernels/_prefill_tiles.py``);
                       overrides the shape ``python -m numba_attn tune`` stored for this CPU and the
                       instruction set's default (``tile_shape``).
``NUMBA_ATTN_GOMP_SPINCOUNT``  how long numba's OpenMP workers spin before sleeping (``GOMP_SPINCOUNT``).
``NUMBA_ATTN_OMP_WAIT_POLICY`` ``PASSIVE`` or ``ACTIVE`` for numba's OpenMP pool instead of the spin count.

If no cache location is writable (a read-only install with a read-only HOME), caching is turned
off instead of failing at import (numba raises "no locator available" there): every process then
compiles its kernels once. ``CACHE_UNAVAILABLE`` says why. Deciding this creates nothing on disk: a
location counts as writable if it is a directory we may write into, or does not exist yet and its
nearest existing ancestor is one (numba creates the directories itself when it sets up the cache).

The constants below are plain module attributes: the API reads the size thresholds at every call
(tests change them with ``monkeypatch.setattr``); values that kernels use inside ``@njit`` code (the
tile shape, the finite-scan chunk) are frozen into the machine code when the kernel compiles.
"""

import os
import platform

#: LLVM fast-math flags for every kernel. Not numba's full set (fastmath switched on wholesale):
#: that adds ``nnan``/``ninf``, which lets LLVM assume no -inf, and then masked scores (-inf) turn
#: into NaN. This subset keeps inf/NaN semantics but still lets reductions vectorise (``reassoc``)
#: and FMAs fuse (``contract``).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: numba's error model for the attention kernels' bodies: "numpy" (x / 0 gives inf or NaN as in numpy)
#: rather than the default "python", which puts a zero test and a ZeroDivisionError path in front of every
#: division and keeps a loop that divides scalar: the soft-cap's tanh (two divisions per score) ran at
#: 5.4 instead of 1.2 ns per score, and a soft-capped prefill took 3.3× the plain one. The kernels
#: divide by nothing that can be zero (block sizes, split counts and row sums are checked or guarded).
ERROR_MODEL = "numpy"


def _writable_dir(path):
    """True if numba could keep its cache in ``path``: an existing directory we may write into, or a
    path that does not exist yet whose nearest existing ancestor is such a directory. Creates nothing."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _cache_location():
    """The directory numba would cache our kernels in, or None if none is writable (numba's own order:
    ``NUMBA_CACHE_DIR`` alone if set, else next to the kernels' sources, else the user-wide cache)."""
    user_dir = os.environ.get("NUMBA_CACHE_DIR")
    if user_dir:
        return user_dir if _writable_dir(user_dir) else None
    in_tree = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "__pycache__")
    if _writable_dir(in_tree):
        return in_tree
    from numba.misc.appdirs import AppDirs

    user_wide = AppDirs(appname="numba", appauthor=False).user_cache_dir
    return user_wide if _writable_dir(user_wide) else None


#: tile shapes the vector-IR micro-kernels accept: vector width (lanes), vectors per tile row, rows of A
TILE_WIDTHS = (4, 8, 16)
TILE_VECTORS = (1, 2, 3, 4, 5, 6)
TILE_ROWS = (1, 2, 3, 4, 5, 6, 7, 8)
#: the file ``python -m numba_attn tune`` writes its winners to, beside the kernel cache
TUNED_TILES_FILE = "numba_attn_tiles.json"


def _parse_tile(text):
    """(VW, NV, KI) from ``VWxNV`` (KI = 4) or ``VWxNVxKI``; ValueError naming NUMBA_ATTN_TILE otherwise."""
    try:
        parts = [int(x) for x in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 2:
        parts.append(4)
    if len(parts) != 3 or parts[0] not in TILE_WIDTHS or parts[1] not in TILE_VECTORS or parts[2] not in TILE_ROWS:
        raise ValueError(
            "NUMBA_ATTN_TILE must be VWxNV or VWxNVxKI with VW in 4, 8, 16, NV in 1-6 and KI in 1-8 "
            f"(e.g. 8x2 or 8x2x4), got {text!r}"
        )
    return tuple(parts)


def target_cpu():
    """(CPU name, sorted '+feature' string) numba compiles for: the host's, or NUMBA_CPU_NAME/FEATURES."""
    import numba
    from llvmlite import binding as llvm_binding

    name = numba.config.CPU_NAME
    if not name or name == "host":
        try:
            features = llvm_binding.get_host_cpu_features().flatten()
        except RuntimeError:  # LLVM cannot read them (some emulators, exotic kernels)
            features = ""
        return llvm_binding.get_host_cpu_name(), ",".join(sorted(f for f in features.split(",") if f.startswith("+")))
    return name, ",".join(sorted(f for f in (numba.config.CPU_FEATURES or "").split(",") if f.startswith("+")))


def tune_key():
    """The key of this CPU in the tuned-tiles file: numba's CPU name and features, ``name|+f1,+f2,...``."""
    return "|".join(target_cpu())


def tuned_tiles_path():
    """Where ``tune`` keeps its results: beside the kernel cache (None when no cache directory is writable)."""
    return os.path.join(CACHE_DIR, TUNED_TILES_FILE) if CACHE_DIR else None


def _tuned_tile(path):
    """The tuned (VW, NV, KI) for this CPU from ``path``, or None (no file, no entry, unreadable)."""
    import json

    try:
        with open(path) as f:
            entry = json.load(f).get(tune_key())
        shape = (int(entry["VW"]), int(entry["NV"]), int(entry["KI"]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return shape if shape[0] in TILE_WIDTHS and shape[1] in TILE_VECTORS and shape[2] in TILE_ROWS else None


def tile_shape(tuned_path=None, forced=True):
    """(VW, NV, KI, where it came from) of the register tiles for the CPU numba compiles for (see
    ``kernels/_prefill_tiles.py``), in this order: ``NUMBA_ATTN_TILE=VWxNV[xKI]``; the shape
    ``python -m numba_attn tune`` measured best on this CPU (``tuned_path``, keyed by CPU name and
    features); else the instruction set's default, each chosen by measurement (``forced=False``
    ignores NUMBA_ATTN_TILE):

    - AVX-512 host: 16 lanes × 4 vectors × 4 rows (Zen 4 / Sapphire Rapids, earlier sessions);
    - AVX/AVX2: 8 × 2 × 4 (Zen 3: 93 GFLOP/s per core on the prefill tiles, 4 × 3 × 8 gave 85 and
      6 × 2 × 8 94 but with remainders; see ``numba_attn/tune.py``);
    - aarch64 host: 4 × 4 × 4 (NEON, 32 registers: 97-100 % of the modelled FMA peak, ``scripts/mca_model.py``);
    - anything else (SSE, a portable target): 4 × 2 × 4.
    """
    override = os.environ.get("NUMBA_ATTN_TILE") if forced else None
    if override:
        return (*_parse_tile(override), "NUMBA_ATTN_TILE")
    import numba

    name = numba.config.CPU_NAME
    host = not name or name == "host"
    tuned = _tuned_tile(tuned_path) if tuned_path else None
    if tuned:
        return (*tuned, f"tuned ({tuned_path})")
    flags = {f[1:] for f in target_cpu()[1].split(",") if f}
    if host and "avx512f" in flags:
        return 16, 4, 4, "default for AVX-512"
    if "avx2" in flags or "avx" in flags:
        return 8, 2, 4, "default for AVX/AVX2"
    if host and platform.machine().lower() in ("aarch64", "arm64"):
        return 4, 4, 4, "default for NEON"
    return 4, 2, 4, "default (SSE or a portable target)"


def _cache_wanted():
    return os.environ.get("NUMBA_ATTN_CACHE", "1") not in ("0", "false", "False", "")


def _reset():
    """Re-read the environment (``NUMBA_ATTN_CACHE``, ``NUMBA_CACHE_DIR``, ``NUMBA_ATTN_TILE``, numba's
    CPU target) into ``CACHE_DIR``, ``CACHE``, ``CACHE_UNAVAILABLE``, ``TILE_VW`` and ``TILE_NV``. For
    tests. Kernels already compiled (or already decorated, for ``cache``) keep what they were built with:
    the cache flag is read when a kernel module is imported, the tile shape when a kernel compiles."""
    global CACHE_DIR, CACHE, CACHE_UNAVAILABLE, TILE_VW, TILE_NV, TILE_KI, TILE_SOURCE
    global OMP_WAIT_POLICY, GOMP_SPINCOUNT
    OMP_WAIT_POLICY = os.environ.get("NUMBA_ATTN_OMP_WAIT_POLICY", "").upper() or None
    GOMP_SPINCOUNT = os.environ.get("NUMBA_ATTN_GOMP_SPINCOUNT", "").strip() or str(_DEFAULT_SPINCOUNT)
    wanted = _cache_wanted()
    CACHE_DIR = _cache_location() if wanted else None
    CACHE = CACHE_DIR is not None
    CACHE_UNAVAILABLE = (
        None
        if CACHE
        else "NUMBA_ATTN_CACHE=0"
        if not wanted
        else "no writable cache directory (package dir, NUMBA_CACHE_DIR, ~/.cache/numba)"
    )
    TILE_VW, TILE_NV, TILE_KI, TILE_SOURCE = tile_shape(tuned_tiles_path())


#: How long numba's OpenMP workers (omp layer) spin after a parallel region before they sleep, in
#: libgomp's GOMP_SPINCOUNT units (libgomp assumes ~100 000 per ms; 10 000 lasted 0.2-0.5 ms on a 2-core
#: Zen 3 VM; libgomp's own default is 300 000, ~3 ms, and
#: 0 with OMP_WAIT_POLICY=PASSIVE), unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT.
#: ``NUMBA_ATTN_GOMP_SPINCOUNT=N`` sets it; ``NUMBA_ATTN_OMP_WAIT_POLICY=PASSIVE|ACTIVE`` sets the
#: policy instead. Measured (README, "Threads"): never sleeping collapses beside other work (decode
#: B1 H32 S4096 32 ms against 4.5 ms), never spinning makes every parallel region pay the workers'
#: wake-up (~100-150 µs on a 2-core Zen 3 VM: a 576 × 576 int8 GEMV 154 µs against 31 µs, the SmolLM2
#: example 18 against 38-41 tokens/s). A short spin covers the gaps between a decode step's regions
#: and gives the cores back soon after. See ``_threads.start_pool``.
_DEFAULT_SPINCOUNT = 10_000
GOMP_SPINCOUNT = str(_DEFAULT_SPINCOUNT)
#: GNU OpenMP wait policy for numba's pool when ``NUMBA_ATTN_OMP_WAIT_POLICY`` is set (else None:
#: ``GOMP_SPINCOUNT`` above decides).
OMP_WAIT_POLICY = None
#: Where compiled kernels are cached (None: caching is off).
CACHE_DIR = None
#: On-disk compile cache (numba ``cache=True``).
CACHE = False
#: Why caching is off, when it is.
CACHE_UNAVAILABLE = None
#: Register tile of the float32 micro-kernels: VW lanes per vector, NV vectors per tile row, KI rows of A
#: per tile, and where the shape came from (``tile_shape``).
TILE_VW, TILE_NV, TILE_KI, TILE_SOURCE = 4, 2, 4, "default"
_reset()

#: Query rows per parallel work item of the prefill kernel (the length of every vector loop) ...
PREFILL_BLOCK_Q = 128
#: ... raised to this when there are at least PREFILL_ITEMS_PER_THREAD work items per thread: the
#: per-block work (softmax set-up, tile loop starts) is then spread over twice the rows (3-5 %
#: faster at L=S=1024-2048 here, measured with the plain-loop micro-kernels before the register
#: tiles; the per-item blocks, 256 KiB at D=64, still sit in L2)
PREFILL_BLOCK_Q_LARGE = 256
PREFILL_ITEMS_PER_THREAD = 4
#: Keys per streaming-softmax block of the prefill kernel.
PREFILL_BLOCK_K = 128
#: Below this many multiply-adds (L·S·(E+Ev) summed over the batch) a serial kernel is used:
#: starting a parallel region costs more than it saves.
SERIAL_BELOW_FLOPS = 2_000_000

#: The decode kernel takes over when the query has at most this many rows ...
DECODE_MAX_QUERY_ROWS = 8
#: ... and there are at least this many keys.
DECODE_MIN_KEYS = 32
#: Most query rows (grouped heads × query tokens) processed in one pass over a KV head.
DECODE_MAX_ROWS = 64
#: Keys per streaming-softmax block of the decode kernel.
DECODE_BLOCK_K = 128
#: Work items (KV group × key part) per thread that the key split aims for.
DECODE_ITEMS_PER_THREAD = 4
#: The fewest keys in one part of the split key range.
DECODE_MIN_SPLIT = 256

#: Rows per parallel work item of the finite/max-magnitude scan (``kernels/finite.py``).
FINITE_CHUNK_ROWS = 256
#: A flat (not 3-D) array is scanned as rows of this many values.
FINITE_ROW = 1024
#: Below this many values the scan runs on one thread (waking the pool costs more than it saves).
FINITE_SERIAL_BELOW = 1 << 17

#: The most elements ``attention_weights`` materialises (it builds the (..., L, S) matrix the fused
#: kernel avoids); above this it refuses and points to ``scaled_dot_product_attention``.
MAX_WEIGHTS_ELEMENTS = 1 << 26
