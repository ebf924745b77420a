"""Every tunable of numba_attn in one place; kernels read these at compile time.

Environment variables (read once, at import):

``NUMBA_ATTN_CACHE``   ``1`` (default) keeps compiled kernels in numba's on-disk cache, ``0`` turns it off.
``NUMBA_CACHE_DIR``    numba's own: where the cache goes (default: ``numba_attn/kernels/__pycache__``,
                       else ``~/.cache/numba``).
``NUMBA_ATTN_TILE``    ``VWxNV``, e.g. ``8x2``: the vector width and vectors per row of the register-tiled
                       micro-kernels (``kernels/_tile.py``); by default 16x4 with AVX-512 on the host,
                       8x2 with AVX/AVX2 (host, or ``+avx2`` in an explicit ``NUMBA_CPU_FEATURES``),
                       4x4 on an aarch64 host and 4x2 otherwise.

If no cache location is writable (a read-only install with a read-only HOME), caching is turned
off instead of failing at import (numba raises "no locator available" there): every process then
compiles its kernels once. ``CACHE_UNAVAILABLE`` says why.
"""
import os
import tempfile

#: LLVM fast-math flags for every kernel. Not numba's full set (fastmath switched on wholesale):
#: that adds ``nnan``/``ninf``, which lets LLVM assume no -inf, and then masked scores (-inf) turn
#: into NaN. This subset keeps inf/NaN semantics but still lets reductions vectorise (``reassoc``)
#: and FMAs fuse (``contract``).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


def _writable_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _cache_location():
    """The directory numba would cache our kernels in, or None if none is writable."""
    user_dir = os.environ.get("NUMBA_CACHE_DIR")
    if user_dir:
        return user_dir if _writable_dir(user_dir) else None
    in_tree = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "__pycache__")
    if _writable_dir(in_tree):
        return in_tree
    from numba.misc.appdirs import AppDirs
    user_wide = AppDirs(appname="numba", appauthor=False).user_cache_dir
    return user_wide if _writable_dir(user_wide) else None


_wanted = os.environ.get("NUMBA_ATTN_CACHE", "1") not in ("0", "false", "False", "")
#: Where compiled kernels are cached (None: caching is off).
CACHE_DIR = _cache_location() if _wanted else None
#: On-disk compile cache (numba ``cache=True``).
CACHE = CACHE_DIR is not None
#: Why caching is off, when it is.
CACHE_UNAVAILABLE = (None if CACHE else "NUMBA_ATTN_CACHE=0" if not _wanted else
                     "no writable cache directory (package dir, NUMBA_CACHE_DIR, ~/.cache/numba)")

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
