"""Numba kernels: one module per concern (prefill, decode, quantised)."""
import types


def variant(fn, suffix):
    """A copy of ``fn`` under another name, to compile it twice (say parallel and serial).

    numba's on-disk cache names its files after the function's qualified name and line: two
    dispatchers built from the *same* function with ``cache=True`` share files and load each
    other's machine code (a "parallel" kernel that runs serially). A renamed copy gets its own.
    """
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__doc__ = fn.__doc__
    return copy
