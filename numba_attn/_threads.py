"""Threads: how many the kernels use, and running parallel kernels safely from many Python threads.

numba's thread count is per calling thread (``numba.set_num_threads`` in one Python thread does not
change another's) and capped by ``NUMBA_NUM_THREADS``, read at start-up. On a board with big and
little cores (e.g. 4 × Cortex-A76 + 4 × A55) the little ones slow a parallel region down to their
pace: use as many threads as big cores, ``numba_attn.set_num_threads(4)``, or start the process
with ``NUMBA_NUM_THREADS=4``.
"""

import contextlib
import os
import threading

import numba

from . import config

__all__ = ["set_num_threads", "get_num_threads", "num_threads", "launch"]


def get_num_threads():
    """Threads the kernels use when called from this Python thread."""
    start_pool()
    return numba.get_num_threads()


def set_num_threads(n):
    """Use ``n`` threads (1 … NUMBA_NUM_THREADS) for kernels called from this Python thread.

    >>> import numba_attn
    >>> before = numba_attn.get_num_threads()
    >>> numba_attn.set_num_threads(1)
    >>> numba_attn.get_num_threads()
    1
    >>> numba_attn.set_num_threads(before)
    >>> numba_attn.set_num_threads(0)
    Traceback (most recent call last):
    ...
    ValueError: n must be an int from 1 to NUMBA_NUM_THREADS = ...
    """
    start_pool()
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise ValueError(
            f"n must be an int from 1 to NUMBA_NUM_THREADS = {limit}, got {n!r} "
            "(start the process with a larger NUMBA_NUM_THREADS for more)"
        )
    numba.set_num_threads(n)


@contextlib.contextmanager
def num_threads(n):
    """``with numba_attn.num_threads(4): ...`` — ``n`` threads inside the block, the old count after.

    >>> import numba_attn
    >>> before = numba_attn.get_num_threads()
    >>> with numba_attn.num_threads(1):
    ...     numba_attn.get_num_threads()
    1
    >>> numba_attn.get_num_threads() == before
    True
    """
    start_pool()
    old = numba.get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)


def start_pool():
    """Start numba's thread pool now, its libgomp spinning ``config.GOMP_SPINCOUNT`` after each region.

    libgomp spins its idle threads ~3 ms by default before they sleep: on a board where other work
    shares the cores, a parallel region then waits for threads that spin or are descheduled (a decode
    step measured 7x slower than passive). Passive threads (no spin) make every region pay their
    wake-up instead (~100-150 µs on a 2-core Zen 3 VM). A short spin (``config.GOMP_SPINCOUNT``, or
    ``config.OMP_WAIT_POLICY`` when set) covers the gaps between a decode step's kernels and hands
    the cores back soon after. libgomp reads the variable once, when numba's omp layer loads it; it is
    set just for that moment and restored after, so other libraries' OpenMP runtimes loaded later
    (torch ships its own libgomp) keep their defaults. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT
    wins; a pool numba already started (the process ran a parallel numba function before numba_attn's
    first) is left alone.

    Called before numba_attn's first parallel kernel or thread query, not at import: once libgomp's
    threads run, a ``fork()`` (multiprocessing's default start method on Linux, asv) terminates the
    child ("fork() called from a process already using GNU OpenMP"), so importing must not start them.
    """
    global _pool_started
    if _pool_started:
        return
    _pool_started = True
    user_set = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    ours = {}
    if not user_set:
        ours = {"OMP_WAIT_POLICY": config.OMP_WAIT_POLICY} if config.OMP_WAIT_POLICY else {}
        ours = ours or {"GOMP_SPINCOUNT": config.GOMP_SPINCOUNT}
        os.environ.update(ours)
    try:
        numba.get_num_threads()  # loads the threading layer and starts its threads
    finally:
        for name in ours:
            del os.environ[name]


_pool_started = False
_launch_lock = threading.Lock()
_layer_is_threadsafe = None


def launch(kernel, *args):
    """Run a parallel kernel; serialise callers when numba's threading layer is ``workqueue``.

    numba's workqueue layer aborts the process when two Python threads enter a parallel region at
    once ("Concurrent access has been detected"); omp and tbb are safe. ``get_num_threads`` starts
    numba's pool (a kernel loaded from the cache does not), after which the layer is known.
    """
    global _layer_is_threadsafe
    if _layer_is_threadsafe is None:
        start_pool()
        numba.get_num_threads()
        _layer_is_threadsafe = numba.threading_layer() != "workqueue"
    if _layer_is_threadsafe:
        return kernel(*args)
    with _launch_lock:
        return kernel(*args)
