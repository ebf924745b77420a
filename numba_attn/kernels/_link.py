"""Calling one compiled kernel body from several kernels without compiling it into each of them.

numba links the LLVM module of every jitted function a kernel calls into the kernel's own module,
then optimises and compiles the whole module again: a body called from the parallel and the serial
build of a kernel is optimised and turned into machine code three or four times (once on its own,
once per caller library; a ``prange`` loop is two or three libraries: its gufunc, the gufunc's
wrapper, the kernel), which took longer than compiling the body itself. ``shared(dispatcher)``
returns an intrinsic that calls the dispatcher's compiled function through an external symbol
instead: the caller's module holds a declaration and a call, nothing else.

    _rows = callee(_rows_body)               # or any @njit dispatcher
    call_rows = shared(_rows, "_rows")
    ...
    fixed = (a, b, c)          # built once: a tuple increfs the arrays it holds, and drops them
    for w in prange(n):
        call_rows(fixed, (w,))  # in a kernel: _rows(a, b, c, w), not linked in

The symbol, ``numba_attn.shared.<module>.<name>.<hash of the argument types>``, is given the
compiled function's address with ``llvmlite.binding.add_symbol`` when the caller compiles, and
again when a cached caller is loaded in a new process: numba runs a library's ``reload_init``
functions before it links cached machine code, and the caller's gets one that loads (or compiles)
the callee for those argument types and registers its address. The call follows numba's calling
convention (an exception raised in the callee propagates); LLVM cannot inline it, so it suits a
body that runs long per call (a work item), not a small helper.
"""

import functools
import hashlib
import importlib

from llvmlite import binding as llvm_binding
from numba import njit, types
from numba.core import cgutils
from numba.core.compiler import CompilerBase, DefaultPassBuilder
from numba.core.compiler_machinery import FunctionPass, register_pass
from numba.core.typed_passes import NopythonTypeInference
from numba.extending import intrinsic

from .. import config

_PREFIX = "numba_attn.shared."
#: symbol -> address registered in this process (the compile results stay alive in their dispatchers)
_registered = {}


def symbol_name(dispatcher, argtypes):
    """The external symbol a caller uses for ``dispatcher`` compiled for ``argtypes``: the same in
    every process (numba's own mangled names carry a per-process counter)."""
    py_func = dispatcher.py_func
    digest = hashlib.sha256(repr(tuple(argtypes)).encode()).hexdigest()[:24]
    return f"{_PREFIX}{py_func.__module__}.{py_func.__qualname__}.{digest}"


def export(dispatcher, argtypes):
    """Compile (or load from the cache) ``dispatcher`` for ``argtypes`` and register its address
    under ``symbol_name``; returns (symbol, compile result)."""
    argtypes = tuple(argtypes)
    cres = dispatcher.overloads.get(argtypes)
    if cres is None:
        dispatcher.compile(argtypes)
        cres = dispatcher.overloads[argtypes]
    name = symbol_name(dispatcher, argtypes)
    address = cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
    if _registered.get(name) != address:
        llvm_binding.add_symbol(name, address)
        _registered[name] = address
    return name, cres


def _reload(module, name, argtypes):
    """A cached caller's ``reload_init``: make its callee's symbol resolvable before its code links."""
    export(getattr(importlib.import_module(module), name), argtypes)


def _single_pass_library(codegen):
    """numba's code library class for ``codegen``, except that a module added to it skips numba's
    per-function optimisation (a full function simplification pipeline run on each function before
    linking) and is only optimised by the module pipeline that runs on the linked module anyway (O3,
    which starts with the same simplifications). For a kernel body that pre-pass took longer than the
    module pipeline (prefill float32 on a busy 2-core Zen 3: 2.5 s against 1.5-1.9 s; without it the
    module pipeline took 0.8 s more, 1.5 s less in all); the machine code kept its vector loops (the
    same vector FMAs and loads, NRT reference-count operations) with a few percent more or fewer scalar
    instructions around them."""
    base = codegen._library_class
    cls = _library_classes.get(base)
    if cls is None:

        class SinglePassLibrary(base):
            def _optimize_functions(self, ll_module):
                ll_module.data_layout = self._codegen._data_layout  # what the skipped pass also did

        cls = _library_classes[base] = SinglePassLibrary
    return cls


_library_classes = {}


class _SinglePassLibraryPass(FunctionPass):
    _name = "numba_attn_single_pass_library"

    def __init__(self):
        FunctionPass.__init__(self)

    def run_pass(self, state):
        if state.library is None:  # numba's lowering creates the library only when none is set
            codegen = state.targetctx.codegen()
            state.library = _single_pass_library(codegen)(codegen, state.func_id.func_qualname)
            state.library.enable_object_caching()  # as numba's lowering does, for the on-disk cache
        return False


register_pass(mutates_CFG=False, analysis_only=True)(_SinglePassLibraryPass)


class _CalleeCompiler(CompilerBase):
    """numba's nopython pipeline with ``_SinglePassLibraryPass`` before lowering."""

    def define_pipelines(self):
        pm = DefaultPassBuilder.define_nopython_pipeline(self.state)
        pm.add_pass_after(_SinglePassLibraryPass, NopythonTypeInference)
        pm.finalize()
        return [pm]


def callee(fn):
    """``fn`` compiled as the kernels are (fastmath, numpy's error model, on-disk cache) for calling from
    kernels only, through ``shared``: no Python or C entry point (the Python entry's unboxing of ~30 array
    arguments alone took ~0.25 s to compile), and LLVM's optimisation run once over it
    (``_single_pass_library``)."""
    return njit(
        fastmath=config.FASTMATH,
        error_model=config.ERROR_MODEL,
        cache=config.CACHE,
        no_cpython_wrapper=True,
        no_cfunc_wrapper=True,
        pipeline_class=_CalleeCompiler,
    )(fn)


def shared(dispatcher, name=None):
    """An intrinsic ``call(head, tail)`` that calls ``dispatcher(*head, *tail)`` through its shared symbol
    (see module doc): ``head`` the arguments every call of a loop shares, as one tuple built before the
    loop (building a tuple increfs each array in it and dropping it decrefs them, two atomic operations
    per array: built per work item, ~100 of the ~450 such operations that a SmolLM2-sized decode call
    made, counted in gdb), ``tail`` the few scalars that change (a work item's range). ``dispatcher`` must be a
    module-level global (``name`` in its module, default its ``__name__``) so that a new process can find
    it."""
    module = dispatcher.py_func.__module__
    attr = name or dispatcher.py_func.__name__

    def call(typingctx, head, tail):
        if not isinstance(head, types.BaseTuple) or not isinstance(tail, types.BaseTuple):
            return None
        argtypes = tuple(head) + tuple(tail)
        restype = dispatcher.get_call_template(argtypes, {})[0].cases[0].return_type

        def codegen(context, builder, signature, llargs):
            symbol, cres = export(dispatcher, argtypes)
            # a cached caller re-registers the symbol in a new process before its code is linked
            context.active_code_library._reload_init.add(functools.partial(_reload, module, attr, argtypes))
            fnty = context.call_conv.get_function_type(cres.signature.return_type, argtypes)
            fn = cgutils.get_or_insert_function(builder.module, fnty, symbol)
            values = cgutils.unpack_tuple(builder, llargs[0], len(head))
            values += cgutils.unpack_tuple(builder, llargs[1], len(tail))
            status, res = context.call_conv.call_function(builder, fn, cres.signature.return_type, argtypes, values)
            with cgutils.if_unlikely(builder, status.is_error):
                context.call_conv.return_status_propagate(builder, status)
            return res

        return restype(head, tail), codegen

    call.__name__ = f"call_{attr}"
    call.__qualname__ = call.__name__
    return intrinsic(call)
