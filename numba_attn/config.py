"""Every tunable of numba_attn in one place; kernels read these at compile time.

Environment variables (read once, at import):

``NUMBA_ATTN_CACHE``   ``1`` (default) keeps compiled kernels in numba's on-disk cache, ``0`` turns it off.
"""
import os

#: LLVM fast-math flags for every kernel. Not ``fastmath=True``: that adds ``nnan``/``ninf``, which
#: lets LLVM assume no -inf, and then masked scores (-inf) turn into NaN. This subset keeps inf/NaN
#: semantics but still lets reductions vectorise (``reassoc``) and FMAs fuse (``contract``).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: On-disk compile cache (numba ``cache=True``).
CACHE = os.environ.get("NUMBA_ATTN_CACHE", "1") not in ("0", "false", "False", "")

#: Query rows per parallel work item of the prefill kernel (the length of every vector loop).
PREFILL_BLOCK_Q = 128
#: Keys per streaming-softmax block of the prefill kernel.
PREFILL_BLOCK_K = 128
#: Below this many multiply-adds (L·S·(E+Ev) summed over the batch) a serial kernel is used:
#: starting a parallel region costs more than it saves.
SERIAL_BELOW_FLOPS = 2_000_000

#: The decode kernel takes over when the query has at most this many rows ...
DECODE_MAX_QUERY_ROWS = 8
#: ... and there are at least this many keys.
DECODE_MIN_KEYS = 256
#: Most query rows (grouped heads × query tokens) processed in one pass over a KV head.
DECODE_MAX_ROWS = 64
#: Keys per streaming-softmax block of the decode kernel.
DECODE_BLOCK_K = 128
#: Work items (KV group × key part) per thread that the key split aims for.
DECODE_ITEMS_PER_THREAD = 4
#: The fewest keys in one part of the split key range.
DECODE_MIN_SPLIT = 256
