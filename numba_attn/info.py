"""``python -m numba_attn info`` and ``warmup``: what the JIT targets on this machine, and compiling
every kernel variant once into numba's on-disk cache (``warmup --report``: how long each one took)."""

import importlib
import inspect
import pkgutil
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


class CompileLog:
    """The numba compiles that run inside ``with CompileLog() as log:`` (numba's ``numba:compile`` events).

    ``log.kernels()`` lists numba_attn's own functions with their compile times; loading a kernel from the
    on-disk cache is not a compile (``cache_hits`` counts those).
    """

    def __init__(self):
        #: [dispatcher, argument types, wall seconds, seconds of the compiles it set off, parent index or -1],
        #: in the order the compiles started
        self.compiles = []
        self._open = []  # indices of the compiles in flight, innermost last
        self._started = []  # perf_counter at the start of each

    def __enter__(self):
        from numba.core import event

        log = self

        class Listener(event.Listener):
            def on_start(self, ev):
                log._start(ev.data)

            def on_end(self, ev):
                log._end()

        self._listener = Listener()
        event.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc):
        from numba.core import event

        event.unregister("numba:compile", self._listener)
        return False

    def _start(self, data):
        parent = self._open[-1] if self._open else -1
        self.compiles.append([data["dispatcher"], tuple(data["args"]), 0.0, 0.0, parent])
        self._open.append(len(self.compiles) - 1)
        self._started.append(time.perf_counter())

    def _end(self):
        i = self._open.pop()
        seconds = time.perf_counter() - self._started[i]
        self.compiles[i][2] = seconds
        parent = self.compiles[i][4]
        if parent >= 0:
            self.compiles[parent][3] += seconds

    def kernels(self):
        """[(name, arrays, seconds, helpers)] for each compile of a numba_attn function, in the order they
        started: ``name`` ``module.qualname`` (module relative to ``numba_attn.kernels``), ``arrays`` its
        argument dtypes (``describe_arrays``), ``seconds`` its own compile plus ``helpers``: the compiles it
        set off of overload implementations (ours and numba's) and numba's functions (``np.zeros``, ...). A
        numba_attn function compiled for another (a shared body) has its own row, so the rows add up to
        the whole compile time."""
        rows = {}
        for i, (_, _, seconds, nested, _) in enumerate(self.compiles):
            owner = i
            while owner >= 0 and not _ours(self.compiles[owner][0]):
                owner = self.compiles[owner][4]
            if owner < 0:
                continue  # a compile of someone else's function
            own = seconds - nested
            row = rows.setdefault(owner, [0.0, 0.0])
            row[0] += own
            if owner != i:
                row[1] += own
        out = []
        for i, (seconds, helpers) in sorted(rows.items()):
            dispatcher, args = self.compiles[i][:2]
            f = dispatcher.py_func
            out.append(
                (
                    f"{f.__module__.removeprefix('numba_attn.kernels.')}.{f.__qualname__}",
                    describe_arrays(f, args),
                    seconds,
                    helpers,
                )
            )
        return out


def _ours(dispatcher):
    """A numba_attn function of its own (kernel, body, jitted helper); an ``@overload``'s implementation
    (a function local to the overload) counts as a helper of whatever it was compiled for."""
    f = dispatcher.py_func
    return getattr(f, "__module__", "").startswith("numba_attn.") and "<locals>" not in f.__qualname__


#: short names of the dtypes our kernels see (float16 arrives as its uint16 bits, 4-bit codes as uint8 bytes)
_SHORT = {"float32": "f32", "float64": "f64", "uint16": "f16", "int8": "i8", "uint8": "u4x2", "bool": "bool"}
#: the arguments that tell a kernel's variants apart, where a kernel has them
_KEY_ARRAYS = ("q", "k", "v", "mask", "out", "x", "data")


def describe_arrays(py_func, args):
    """``q=f32 k=f16 v=f16 mask=bool out=f32``: the dtypes of the array arguments ``q, k, v, mask, out``
    (or ``x``, ``data``) where the function has them, else of every array argument that is not int64."""
    from numba import types

    try:
        names = list(inspect.signature(py_func).parameters)
    except (TypeError, ValueError):
        names = [f"a{i}" for i in range(len(args))]
    arrays = [(n, t) for n, t in zip(names, args) if isinstance(t, types.Array)]
    key = [(n, t) for n, t in arrays if n in _KEY_ARRAYS]
    shown = key or [(n, t) for n, t in arrays if t.dtype != types.int64]
    return " ".join(f"{n}={_SHORT.get(str(t.dtype), str(t.dtype))}" for n, t in shown)


def kernel_dispatchers():
    """{name: dispatcher} of every numba-compiled function defined at the top level of a
    ``numba_attn.kernels`` module (``module.attribute``)."""
    from numba.core.dispatcher import Dispatcher

    from . import kernels

    found = {}
    for module_info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{module_info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, Dispatcher) and value.py_func.__module__ == module.__name__:
                found[f"{module_info.name}.{attr}"] = value
    return found


def cache_hits():
    """How many kernel variants numba_attn's dispatchers have loaded from the on-disk cache so far."""
    return sum(sum(d.stats.cache_hits.values()) for d in kernel_dispatchers().values())


def print_compile_report(log, loaded, out):
    """The table of ``warmup --report``: each compiled kernel variant with its seconds, slowest first."""
    rows = log.kernels()
    total = sum(r[2] for r in rows)
    print(
        f"\ncompile times, wall seconds ({len(rows)} numba_attn functions compiled in {total:.1f} s; "
        f"{loaded} kernel variants loaded from the on-disk cache instead)",
        file=out,
    )
    if not rows:
        return
    header = ("kernel", "arrays", "seconds", "of which helpers")
    table = [(name, arrays, f"{seconds:.2f}", f"{helpers:.2f}") for name, arrays, seconds, helpers in rows]
    table.sort(key=lambda r: -float(r[2]))
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))), file=out)
    for r in table:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))), file=out)
    print(
        "helpers: the overload implementations (ours and numba's, e.g. np.empty) compiled for that function; "
        "a body a kernel calls (_link.shared) has its own row",
        file=out,
    )


def run_warmup(out=None, report=False):
    """Compile (or load) every kernel variant a typical program meets, so its first call is fast.

    Variants: prefill and decode kernels, parallel and serial builds, float32/float64/float16/int8
    storage, int8 keys with 4-bit values and 4-bit both (a cache's quantised formats), no mask /
    boolean mask / float mask; the packed-batch (varlen) kernel, parallel and serial,
    float32/float64/float16 storage; the Hadamard rotation a quantised cache applies; a
    ``MultiHeadAttention`` prompt and decode step with float32/float16/int8/int4 weights over a cache of
    each format (the ``LinearWeight`` products, the cache's append kernels, ``Rotary``). Run once after
    installing (the results land in the on-disk cache, see ``info``). ``report``: then print the compile
    time of every kernel variant (``print_compile_report``).
    """
    out = sys.stdout if out is None else out
    if not report:
        return _warm(out)
    loaded_before = cache_hits()
    with CompileLog() as log:
        status = _warm(out)
    print_compile_report(log, cache_hits() - loaded_before, out)
    return status


def _warm_layers(rng, out):
    """``_warm``'s layer calls: a grouped-query ``MultiHeadAttention`` with float32, float16, int8 and
    int4 weights (the ``LinearWeight`` GEMV and GEMM kernels, serial and parallel builds) over a
    ``KVCache`` of each format (its append kernels and rotation, then ``attend``), with a ``Rotary``
    RoPE: a prompt, then one token, as a model's first reply runs them. Returns the number of layer
    calls."""
    from .layers import MultiHeadAttention
    from .rotary import Rotary

    n = 0
    t0 = time.perf_counter()
    for embed_dim in (64, 512):  # small products take the serial builds, larger ones the parallel
        rope = Rotary(embed_dim // 4)
        for weights in ("float32", "float16", "int8", "int4"):
            layer = MultiHeadAttention(embed_dim, 4, num_kv_heads=2, seed=0).quantize_weights(weights)
            for fmt in ("float32", "float16", "int8", "int4"):
                cache = layer.new_cache(batch=1, capacity=64, dtype=fmt)
                for tokens in (40, 1):
                    x = rng.standard_normal((1, tokens, embed_dim)).astype(np.float32)
                    layer(x, cache=cache, rotary=rope)
                    n += 1
    print(f"  layers: {time.perf_counter() - t0:.1f} s", file=out, flush=True)
    return n


def _warm(out):
    """``run_warmup``'s calls, one per kernel variant."""
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
    n += _warm_layers(rng, out)
    where = config.CACHE_DIR if config.CACHE else f"nowhere (cache off: {config.CACHE_UNAVAILABLE})"
    print(f"warmed {n} kernel calls in {time.perf_counter() - t_all:.1f} s; compiled code cached in {where}", file=out)
    return 0
