"""``python -m numba_attn info`` and ``warmup``: what the JIT targets on this machine, and compiling
every kernel variant once into numba's on-disk cache."""

import platform
import sys
import time

import numpy as np

from . import __version__, config
from ._threads import get_num_threads
from .api import scaled_dot_product_attention
from .varlen import scaled_dot_product_attention_varlen


def run_info(out=None):
    """Versions, CPU target, threading layer and compile cache, one ``name  value`` line each, then
    warnings (a thread-unsafe layer, caching off); returns 0."""
    out = sys.stdout if out is None else out
    import llvmlite
    import numba
    from numba.core import config as nconfig
    from numba.misc import numba_sysinfo

    warnings = []
    # Start numba's thread pool so that it picks (and reports) its threading layer.
    numba.set_num_threads(get_num_threads())
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "(not initialised)"
    if layer == "workqueue":
        warnings.append(
            "threading layer is 'workqueue', which is not thread-safe: numba_attn serialises "
            "concurrent calls behind a lock. Install tbb (pip install tbb) or GNU OpenMP "
            "(libgomp1) for concurrent callers."
        )
    info = numba_sysinfo.get_sysinfo()
    if not config.CACHE:
        warnings.append(
            f"on-disk compile cache is off ({config.CACHE_UNAVAILABLE}): every process compiles its "
            "kernels (seconds each); set NUMBA_CACHE_DIR to a writable directory"
        )
    rows = [
        ("numba_attn", __version__),
        ("python", platform.python_version()),
        ("numpy", np.__version__),
        ("numba", numba.__version__),
        ("llvmlite", llvmlite.__version__),
        ("machine", platform.machine()),
        ("CPU name (JIT target)", info.get("CPU Name", "?")),
        ("CPU features", info.get("CPU Features", "?")),
        ("threading layer", layer),
        ("threads (numba.get_num_threads)", str(get_num_threads())),
        ("NUMBA_NUM_THREADS", str(nconfig.NUMBA_NUM_THREADS)),
        ("compile cache", config.CACHE_DIR if config.CACHE else f"off: {config.CACHE_UNAVAILABLE}"),
        (
            "prefill blocks (query rows x keys)",
            f"{config.PREFILL_BLOCK_Q} (or {config.PREFILL_BLOCK_Q_LARGE}) x {config.PREFILL_BLOCK_K}",
        ),
        (
            "register tile (rows x lanes x vectors)",
            f"{config.TILE_KI} x {config.TILE_VW} x {config.TILE_NV}: {config.TILE_SOURCE}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=out)
    for w in warnings:
        print(f"warning: {w}", file=out)
    return 0


def run_warmup(out=None):
    """Compile (or load) every kernel variant a typical program meets, so its first call is fast.

    Variants: prefill and decode kernels, parallel and serial builds, float32/float64/float16/int8
    storage, int8 keys with 4-bit values and 4-bit both (a cache's quantised formats), no mask /
    boolean mask / float mask; the packed-batch (varlen) kernel, parallel and serial,
    float32/float64/float16 storage; the Hadamard rotation a quantised cache applies. Run once after
    installing (the results land in the on-disk cache, see ``info``).
    """
    out = sys.stdout if out is None else out
    from .quant import quantize
    from .rotation import hadamard_transform

    rng = np.random.default_rng(0)
    t_all = time.perf_counter()
    shapes = {  # (query shape, key shape): small ones take the serial builds
        "prefill": ((1, 2, 160, 64), (1, 2, 160, 64)),
        "prefill small": ((1, 1, 8, 16), (1, 1, 8, 16)),
        "decode": ((1, 4, 1, 64), (1, 4, 512, 64)),
        "decode small": ((1, 1, 1, 16), (1, 1, 300, 16)),
    }
    n = 0
    quantised = ("int8", "int8/int4", "int4")
    for precision in ("float32", "float16", *quantised, "float64"):
        t0 = time.perf_counter()
        for qs, ks in shapes.values():
            q = rng.standard_normal(qs).astype(np.float32 if precision in ("float16", *quantised) else precision)
            k = rng.standard_normal(ks)
            if precision in quantised:
                bits = {"int8": 8, "int4": 4}
                k, v = (quantize(k, bits=bits[f]) for f in (precision.split("/")[0], precision.split("/")[-1]))
                if precision != "int8":
                    hadamard_transform(q)
            else:
                k = v = k.astype(precision)
            for mask in (None, "bool", "float"):
                m = None
                if mask == "bool":
                    m = np.ones((qs[-2], ks[-2]), bool)
                elif mask == "float":
                    m = np.zeros((qs[-2], ks[-2]), np.float64 if precision == "float64" else np.float32)
                scaled_dot_product_attention(q, k, v, attn_mask=m)
                n += 1
        if precision not in quantised:  # the varlen kernel reads float K/V only
            for lengths in ((3, 5), (150, 90)):  # the serial build, then the parallel one
                cu = np.concatenate([[0], np.cumsum(lengths)])
                q = rng.standard_normal((cu[-1], 2, 64)).astype(np.float32 if precision == "float16" else precision)
                k = rng.standard_normal((cu[-1], 2, 64)).astype(precision)
                scaled_dot_product_attention_varlen(q, k, k, cu, cu)
                n += 1
        print(f"  {precision}: {time.perf_counter() - t0:.1f} s", file=out, flush=True)
    where = config.CACHE_DIR if config.CACHE else f"nowhere (cache off: {config.CACHE_UNAVAILABLE})"
    print(f"warmed {n} kernel calls in {time.perf_counter() - t_all:.1f} s; compiled code cached in {where}", file=out)
    return 0
