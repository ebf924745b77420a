"""Numba kernels: one module per concern (prefill, decode, quantised)."""

import contextlib
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


def _cache_probe():  # pragma: no cover - never called: numba's cache locator reads where it lives
    return None


def _fingerprint():
    """sha256 over the sources of every kernel module, numba's version and the register tile shape (a
    kernel compiled for another shape, e.g. before ``tune``, must not be loaded)."""
    import hashlib
    import os

    import numba

    from .. import config

    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256(numba.__version__.encode())
    digest.update(repr((config.TILE_VW, config.TILE_NV, config.TILE_KI)).encode())
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


def drop_stale_cache():
    """Delete our cached machine code when any kernel source (or numba) changed since it was written.

    numba keys a cached kernel on the source file of the decorated function only: a kernel whose
    own module is unchanged but whose helpers (another module, inlined) changed, was renamed or
    were removed would load stale machine code, or fail to unpickle ("No module named ...") after
    an upgrade in place. A fingerprint of all kernel sources beside the cache files decides. Never
    raises: without it numba's own (narrower) check still applies.
    """
    import glob
    import os

    from .. import config

    if not config.CACHE:
        return
    try:
        from numba.core.caching import CacheImpl  # the locators numba tries, in its order

        for locator_class in CacheImpl._locator_classes:
            locator = locator_class.from_function(_cache_probe, os.path.abspath(__file__))
            if locator is not None:
                break
        else:
            return
        path = locator.get_cache_path()
        stamp = os.path.join(path, "numba_attn.fingerprint")
        want = _fingerprint()
        with contextlib.suppress(OSError), open(stamp) as f:  # no stamp yet: the cache is ours to clear
            if f.read() == want:
                return
        for old in glob.glob(os.path.join(path, "*.nbi")) + glob.glob(os.path.join(path, "*.nbc")):
            with contextlib.suppress(OSError):
                os.remove(old)
        tmp = f"{stamp}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(want)
        os.replace(tmp, stamp)
    except Exception:
        return


drop_stale_cache()
