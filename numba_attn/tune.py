"""``python -m numba_attn tune``: choose the register tile of the prefill micro-kernels by measuring them here.

The prefill kernel's float32 products (``kernels/_prefill_tiles.py``) are register tiles of KI rows of A
(keys, or value columns) × NV vectors of VW lanes (query rows): KI·NV accumulators, NV operand
vectors and one broadcast live in the vector register file for the whole loop. Which shape is
fastest depends on the core (FMA latency and ports, loads per cycle, register count), not only on
the instruction set, so it is measured:

1. VW is the instruction set's (16 with AVX-512, 8 with AVX/AVX2, 4 for NEON/SSE); the candidates are
   the (KI, NV) whose KI·NV + NV + 1 vectors fit the register file (16 or 32) with at least 6
   (16 registers) or 12 (32) accumulators to cover the FMA latency (``candidates``);
2. each candidate runs one prefill work item's two products the way the kernel does (``work_item``:
   128 query rows padded to whole tiles, 1024 keys in blocks of 128, E = Ev = 64; Q·Kᵀ over the
   head dim, P·V over the key block, the keys and columns left over by tiles of 4, 2 and 1), on
   one thread, rounds interleaved, best of each;
3. the winner (useful GFLOP/s: padding rows count as waste) is stored in ``numba_attn_tiles.json``
   beside the kernel cache, keyed by the CPU name and features numba compiles for
   (``config.tune_key``); ``config.tile_shape`` reads it at import. Cached kernels built with another
   shape are dropped (the kernel fingerprint includes the shape), so the next call compiles anew.

``NUMBA_ATTN_TILE`` still overrides whatever is stored. Tuning is never run implicitly: a first call
never pays for it. The whole run takes about 1-2 s of compilation and ~1 s of timing per candidate.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from . import __version__, config

#: query rows, keys, key block and head dims of the timed work item (the bench's prefill case)
ROWS, KEYS, BLOCK_K, E = 128, 1024, 128, 64


def default_width():
    """The vector width of the instruction set numba compiles for (the default tile's VW, whatever a
    tuned file or NUMBA_ATTN_TILE says)."""
    return config.tile_shape(tuned_path=None, forced=False)[0]


def registers(width):
    """Vector registers the candidates may fill: 32 with AVX-512 (16 lanes) and on aarch64 (NEON), else 16."""
    return 32 if width == 16 or platform.machine().lower() in ("aarch64", "arm64") else 16


def candidates(width):
    """[(KI, NV)] worth timing for vectors of ``width`` lanes: every shape in config's ranges whose
    KI·NV accumulators + NV operands + 1 broadcast fit the register file, with enough accumulators
    (6-16 of 16 registers, 12-24 of 32), at least 2 rows of A; ordered by accumulators."""
    regs = registers(width)
    least, most = (6, 16) if regs == 16 else (12, 24)
    out = [
        (ki, nv)
        for nv in config.TILE_VECTORS
        for ki in config.TILE_ROWS
        if ki >= 2 and ki * nv + nv + 1 <= regs and least <= ki * nv <= most
    ]
    return sorted(out, key=lambda s: (-s[0] * s[1], s))


def work_item(ki, vw, nv):
    """An @njit function ``run(qt, kn, st, vn, acc, reps)`` timing one prefill work item's products with
    the ki × nv·vw tile (see the module docstring), and the useful flop count of one repetition."""
    from numba import njit

    from .kernels._prefill_tiles import tile_kernel

    w = vw * nv
    groups = -(-ROWS // w)
    main_set, main_add = tile_kernel(False, ki, vw, nv), tile_kernel(True, ki, vw, nv)
    set4, set2, set1 = (tile_kernel(False, k, vw, nv) for k in (4, 2, 1))
    add4, add2, add1 = (tile_kernel(True, k, vw, nv) for k in (4, 2, 1))

    @njit
    def run(qt, kn, st, vn, acc, reps):
        ks = kn.shape[1]
        for _ in range(reps):
            for j0 in range(0, kn.shape[0], BLOCK_K):
                for g in range(groups):
                    j = 0
                    while j + ki <= BLOCK_K:
                        main_set(kn, (j0 + j) * ks, ks, 1, qt, g * E * w, w, st, j * w, w, E)
                        j += ki
                    if ki > 4 and j + 4 <= BLOCK_K:
                        set4(kn, (j0 + j) * ks, ks, 1, qt, g * E * w, w, st, j * w, w, E)
                        j += 4
                    if ki > 2 and j + 2 <= BLOCK_K:
                        set2(kn, (j0 + j) * ks, ks, 1, qt, g * E * w, w, st, j * w, w, E)
                        j += 2
                    if ki > 1 and j < BLOCK_K:
                        set1(kn, (j0 + j) * ks, ks, 1, qt, g * E * w, w, st, j * w, w, E)
                    e = 0
                    while e + ki <= E:
                        main_add(vn, j0 * ks + e, 1, ks, st, 0, w, acc, g * E * w + e * w, w, BLOCK_K)
                        e += ki
                    if ki > 4 and e + 4 <= E:
                        add4(vn, j0 * ks + e, 1, ks, st, 0, w, acc, g * E * w + e * w, w, BLOCK_K)
                        e += 4
                    if ki > 2 and e + 2 <= E:
                        add2(vn, j0 * ks + e, 1, ks, st, 0, w, acc, g * E * w + e * w, w, BLOCK_K)
                        e += 2
                    if ki > 1 and e < E:
                        add1(vn, j0 * ks + e, 1, ks, st, 0, w, acc, g * E * w + e * w, w, BLOCK_K)

    return run, 4.0 * ROWS * KEYS * E


def measure(shapes, width, rounds=3, seconds=0.25, progress=None):
    """{(KI, NV): useful GFLOP/s} of each shape's work item on this thread: compiled first, then
    ``rounds`` interleaved rounds of about ``seconds`` each per shape, the best of each kept."""
    rng = np.random.default_rng(0)
    kv = (rng.standard_normal((KEYS, E)) * 0.1).astype(np.float32)
    prepared = {}
    for ki, nv in shapes:
        w = width * nv
        groups = -(-ROWS // w)
        run, flops = work_item(ki, width, nv)
        arrays = (
            rng.standard_normal((groups, E, w)).astype(np.float32),
            kv,
            np.zeros((BLOCK_K, w), np.float32),
            kv,
            np.zeros((groups, E, w), np.float32),
        )
        t0 = time.perf_counter()
        run(*arrays, 1)  # compiles
        if progress:
            progress(f"  compiled {ki} x {width} x {nv} in {time.perf_counter() - t0:.1f} s")
        prepared[ki, nv] = (run, arrays, flops)
    best = dict.fromkeys(prepared, 0.0)
    for _ in range(rounds):
        for shape, (run, arrays, flops) in prepared.items():
            t0 = time.perf_counter()
            run(*arrays, 1)
            once = max(time.perf_counter() - t0, 1e-6)
            reps = max(1, int(seconds / once / 3))
            for _ in range(3):
                t0 = time.perf_counter()
                run(*arrays, reps)
                best[shape] = max(best[shape], flops * reps / (time.perf_counter() - t0) / 1e9)
    return best


def store(path, width, ki, nv, results):
    """Write the winner for this CPU into ``path`` (other CPUs' entries kept), atomically."""
    try:
        with open(path) as f:
            table = json.load(f)
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    table[config.tune_key()] = {
        "VW": width,
        "NV": nv,
        "KI": ki,
        "useful_gflops": {f"{k}x{width}x{n}": round(g, 2) for (k, n), g in results.items()},
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "numba_attn": __version__,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def run_tune(out=None, write=True, shapes=None, rounds=3, seconds=0.25):
    """Time the candidate tiles on this CPU, print them, store the winner (``write``); returns 0, or 1
    when there is nowhere to store it (no writable cache directory)."""
    out = sys.stdout if out is None else out
    width = default_width()
    shapes = candidates(width) if shapes is None else shapes
    name, _ = config.target_cpu()
    print(
        f"tuning the prefill register tile for {name} ({width} lanes, {registers(width)} vector registers):", file=out
    )
    t0 = time.perf_counter()
    results = measure(shapes, width, rounds, seconds, progress=lambda m: print(m, file=out, flush=True))
    ki, nv = max(results, key=results.get)
    now = (config.TILE_KI, config.TILE_NV) if config.TILE_VW == width else None
    print(f"\n{'rows x lanes x vectors':<24}  useful GFLOP/s (1 thread)", file=out)
    for (k, n), g in sorted(results.items(), key=lambda item: -item[1]):
        mark = " <- best" if (k, n) == (ki, nv) else ""
        mark += " (in use)" if (k, n) == now else ""
        print(f"{f'{k} x {width} x {n}':<24}  {g:7.1f}{mark}", file=out)
    print(f"timed {len(results)} shapes in {time.perf_counter() - t0:.1f} s", file=out)
    if not write:
        return 0
    path = config.tuned_tiles_path()
    if path is None:
        print(f"not stored: {config.CACHE_UNAVAILABLE}; set NUMBA_ATTN_TILE={width}x{nv}x{ki} instead", file=out)
        return 1
    store(path, width, ki, nv, results)
    print(
        f"stored {ki} x {width} x {nv} for this CPU in {path}; kernels compiled from the next import on use it"
        + (" (NUMBA_ATTN_TILE is set and still overrides it)" if os.environ.get("NUMBA_ATTN_TILE") else ""),
        file=out,
    )
    return 0


def run_tune_then_warmup(out=None):
    """``warmup --tune``: tune, then compile every kernel in a fresh process (this one's kernels were
    built for the shape in use before tuning). Returns the first non-zero status, else 0."""
    status = run_tune(out=out)
    return status or subprocess.call([sys.executable, "-m", "numba_attn", "warmup"])
