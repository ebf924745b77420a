"""``python -m numba_attn info | check | bench | warmup``: what the JIT targets here, a self-test of every
kernel against the float64 reference, a side-by-side benchmark against the baselines, and compiling
every kernel once into the on-disk cache."""
import argparse
import os
import platform
import sys
import time

import numpy as np

from . import __version__, config, reference
from .api import scaled_dot_product_attention

#: acceptance bounds of ``check`` per precision: (max |out - ref| / max(1, max |ref|), ‖out - ref‖ / ‖ref‖)
TOLERANCE = {"float64": (1e-10, 1e-12), "float32": (2e-5, 1e-5), "float16": (2e-3, 2e-3), "int8": (np.inf, 1.5e-2)}


def _check_cases():
    """(name, spec) for every kernel path: masks, both causal alignments, GQA, broadcasting, decode."""
    alibi = 2.0 ** -np.arange(1, 9)
    return [
        ("prefill", dict(q=(1, 8, 256, 64), k=(1, 8, 256, 64))),
        ("prefill causal upper_left", dict(q=(1, 8, 256, 64), k=(1, 8, 256, 64), is_causal=True)),
        ("prefill causal lower_right", dict(q=(1, 8, 100, 64), k=(1, 8, 300, 64), is_causal="lower_right")),
        ("prefill bool mask", dict(q=(2, 4, 128, 32), k=(2, 4, 200, 32), mask="bool")),
        ("prefill float mask (-inf)", dict(q=(2, 4, 128, 32), k=(2, 4, 200, 32), mask="float")),
        ("prefill GQA 8/2 heads", dict(q=(1, 8, 128, 64), k=(1, 2, 256, 64), enable_gqa=True)),
        ("prefill window + ALiBi + softcap", dict(q=(1, 8, 200, 64), k=(1, 8, 200, 64), is_causal=True, window=64,
                                                  alibi_slopes=alibi, softcap=30.0)),
        ("encoder batch", dict(q=(8, 12, 128, 32), k=(8, 12, 128, 32))),
        ("odd sizes, 2-D", dict(q=(77, 33), k=(131, 33), v=(131, 7))),
        ("decode (split-K)", dict(q=(1, 32, 1, 64), k=(1, 32, 1024, 64))),
        ("decode GQA 4 tokens causal", dict(q=(1, 8, 4, 64), k=(1, 2, 2048, 64), enable_gqa=True,
                                            is_causal="lower_right")),
        ("decode window + mask", dict(q=(2, 8, 1, 64), k=(2, 8, 1500, 64), is_causal="lower_right", window=500,
                                      mask="bool")),
    ]


def _median_ms(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _inputs(rng, spec, precision):
    """(query, key, value) as handed to numba_attn, and the float64 values the reference should see."""
    from .quant import dequantize, quantize
    q = rng.standard_normal(spec["q"])
    k = rng.standard_normal(spec["k"])
    v = rng.standard_normal(spec.get("v", spec["k"]))
    if precision == "int8":
        kq, vq = quantize(k), quantize(v)
        return (q.astype(np.float32), kq, vq), (q, k, v), (q, dequantize(kq), dequantize(vq))
    dt = np.dtype(precision)
    ours = tuple(x.astype(dt) for x in (q, k, v))
    return ours, tuple(x.astype(np.float64) for x in ours), None


QUICK_CASES = ("prefill causal lower_right", "decode GQA 4 tokens causal", "odd sizes, 2-D")


def run_check(quick=False, out=None):
    """Every kernel path in every precision against the reference; ``quick``: one case per kernel
    (prefill parallel and serial, masks, decode) and precision, for slow machines and emulators."""
    out = sys.stdout if out is None else out
    rng = np.random.default_rng(0)
    rows = []
    failed = 0
    cases = [c for c in _check_cases() if not quick or c[0] in QUICK_CASES]
    for precision in ("float32", "float64", "float16", "int8"):
        for name, spec in cases:
            kwargs = {key: spec[key] for key in ("is_causal", "enable_gqa", "window", "alibi_slopes", "softcap")
                      if key in spec}
            (qd, kd, vd), exact, _ = _inputs(rng, spec, precision)
            L, S = spec["q"][-2], spec["k"][-2]
            if spec.get("mask") == "bool":
                kwargs["attn_mask"] = rng.random((L, S)) > 0.3
            elif spec.get("mask") == "float":
                m = rng.standard_normal((L, S))
                m[rng.random(m.shape) < 0.3] = -np.inf
                kwargs["attn_mask"] = m.astype(np.float32 if precision != "float64" else np.float64)
            t0 = time.perf_counter()
            got = scaled_dot_product_attention(qd, kd, vd, **kwargs)
            first_ms = 1e3 * (time.perf_counter() - t0)
            ms = _median_ms(lambda: scaled_dot_product_attention(qd, kd, vd, **kwargs))
            want = reference.scaled_dot_product_attention(*exact, **kwargs)
            diff = got.astype(np.float64) - want
            err = float(np.abs(diff).max())
            rel = float(np.linalg.norm(diff) / max(np.linalg.norm(want), 1e-300))
            tol_abs, tol_rel = TOLERANCE[precision]
            ok = bool(np.isfinite(got).all() and err <= tol_abs * max(1.0, float(np.abs(want).max()))
                      and rel <= tol_rel)
            failed += not ok
            shape = f"q{spec['q']} k{spec['k']}"
            rows.append((name, precision, shape, f"{err:.2e}", f"{rel:.2e}", f"{ms:.2f}", f"{first_ms:.0f}",
                         "ok" if ok else "FAIL"))
            print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    header = ("case", "precision", "shape", "max abs err", "rel err", "ms", "first call ms", "")
    _print_table(header, rows, out)
    bounds = "; ".join(f"{p}: max abs ≤ {a:g}·max(1, max|ref|), rel ≤ {r:g}" for p, (a, r) in TOLERANCE.items())
    print(f"\n{len(rows) - failed}/{len(rows)} cases within tolerance ({bounds}). Reference: numba_attn.reference in "
          "float64 on the same (rounded) inputs; int8 against the unquantised inputs. rel err = ‖out − ref‖ / ‖ref‖. "
          "'first call' includes compiling or loading the kernel.", file=out)
    return 1 if failed else 0


def _print_table(header, rows, out):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header), file=out)
    print(fmt.format(*("-" * w for w in widths)), file=out)
    for r in rows:
        print(fmt.format(*r), file=out)


def run_info(out=None):
    out = sys.stdout if out is None else out
    import llvmlite
    import numba
    from numba.core import config as nconfig
    from numba.misc import numba_sysinfo

    warnings = []
    # Start numba's thread pool so that it picks (and reports) its threading layer.
    numba.set_num_threads(numba.get_num_threads())
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "(not initialised)"
    if layer == "workqueue":
        warnings.append("threading layer is 'workqueue', which is not thread-safe: numba_attn serialises "
                        "concurrent calls behind a lock. Install tbb (pip install tbb) or GNU OpenMP "
                        "(libgomp1) for concurrent callers.")
    info = numba_sysinfo.get_sysinfo()
    if not config.CACHE:
        warnings.append(f"on-disk compile cache is off ({config.CACHE_UNAVAILABLE}): every process compiles its "
                        "kernels (seconds each); set NUMBA_CACHE_DIR to a writable directory")
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
        ("threads (numba.get_num_threads)", str(numba.get_num_threads())),
        ("NUMBA_NUM_THREADS", str(nconfig.NUMBA_NUM_THREADS)),
        ("compile cache", config.CACHE_DIR if config.CACHE else f"off: {config.CACHE_UNAVAILABLE}"),
        ("prefill blocks (query rows x keys)", f"{config.PREFILL_BLOCK_Q} (or {config.PREFILL_BLOCK_Q_LARGE}) x {config.PREFILL_BLOCK_K}"),
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
    storage, no mask / boolean mask / float mask. Run once after installing (the results land in
    the on-disk cache, see ``info``).
    """
    out = sys.stdout if out is None else out
    from .quant import quantize
    rng = np.random.default_rng(0)
    t_all = time.perf_counter()
    shapes = {  # (query shape, key shape): small ones take the serial builds
        "prefill": ((1, 2, 160, 64), (1, 2, 160, 64)), "prefill small": ((1, 1, 8, 16), (1, 1, 8, 16)),
        "decode": ((1, 4, 1, 64), (1, 4, 512, 64)), "decode small": ((1, 1, 1, 16), (1, 1, 300, 16)),
    }
    n = 0
    for precision in ("float32", "float16", "int8", "float64"):
        t0 = time.perf_counter()
        for qs, ks in shapes.values():
            q = rng.standard_normal(qs).astype(np.float32 if precision in ("float16", "int8") else precision)
            k = rng.standard_normal(ks)
            if precision == "int8":
                k = v = quantize(k)
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
        print(f"  {precision}: {time.perf_counter() - t0:.1f} s", file=out, flush=True)
    where = config.CACHE_DIR if config.CACHE else f"nowhere (cache off: {config.CACHE_UNAVAILABLE})"
    print(f"warmed {n} kernel calls in {time.perf_counter() - t_all:.1f} s; compiled code cached in {where}",
          file=out)
    return 0


def _total_memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def run_bench(quick=False, threads=None, json_path=None, plot_path=None, full=False, out=None):
    out = sys.stdout if out is None else out
    import json
    import tempfile

    import numba

    from . import bench

    bench.preload_baselines()          # before numba's pool starts: see preload_baselines
    threads = threads or numba.config.NUMBA_NUM_THREADS
    if threads > numba.config.NUMBA_NUM_THREADS:
        print(f"--threads {threads} is more than numba's pool ({numba.config.NUMBA_NUM_THREADS}); "
              "set NUMBA_NUM_THREADS first", file=sys.stderr)
        return 2
    small = 0 < _total_memory_bytes() < (3 << 30)
    cases = bench.default_cases(quick=quick, small_memory=small, full=full)

    def progress(msg):
        print(f"  {msg}", file=sys.stderr, flush=True)

    print(f"numba_attn {__version__} bench: {len(cases)} cases, {threads} threads"
          + (", quick" if quick else "") + (", small-memory defaults" if small else ""), file=sys.stderr)
    progress("compile times (fresh processes) ...")
    with tempfile.TemporaryDirectory() as empty_cache:
        t_import, t_cold = bench.first_call_seconds(cache_dir=empty_cache)
    bench.first_call_seconds()                       # make sure the normal cache is filled
    _, t_cached = bench.first_call_seconds()
    progress("memory bandwidth ...")
    bandwidth = bench.read_bandwidth(threads, nbytes=(256 << 20) if (quick or small) else (1 << 30))
    results = bench.run_cases(cases, threads, progress=progress, budget=0.2 if quick else 0.4)

    baselines = [impl.name for impl in bench.IMPLEMENTATIONS if impl.name != "numba_attn"]
    header = ["case", "shape", "numba_attn ms", "throughput"] + [f"{b} ms (ours ×)" for b in baselines] + [
        "ours × torch fp32"]
    twins = {bench.same_tokens(c): c for c in cases if c.dtype == "float32"}
    rows, records = [], []
    for case in cases:
        ours = results[case, "numba_attn"]
        value, unit = bench.throughput(case, ours)
        tp = f"{value:.1f} {unit}" + (f" ({100 * value / bandwidth:.0f}% bw)" if unit == "GB/s" else "")
        row = [case.name, case.shape, f"{ours * 1e3:.2f}", tp]
        record = {"case": case.name, **dataclasses_asdict(case), "numba_attn_s": ours, "unit": unit, "throughput": value}
        for b in baselines:
            theirs = results[case, b]
            if isinstance(theirs, str):
                row.append("-")
                record[f"{b}_s"] = None
                record[f"{b}_skipped"] = theirs
            else:
                row.append(f"{theirs * 1e3:.2f} ({theirs / ours:.2f}×)")
                record[f"{b}_s"] = theirs
        twin = twins.get(bench.same_tokens(case))
        torch32 = results.get((twin, "torch")) if twin is not None else None
        if isinstance(torch32, float):
            row.append(f"{torch32 / ours:.2f}×")
            record["torch_float32_same_tokens_s"] = torch32
        else:
            row.append("-")
        rows.append(row)
        records.append(record)
    print(file=out)
    _print_table(tuple(header), [tuple(r) for r in rows], out)
    skipped = sorted({(b, results[c, b]) for c in cases for b in baselines if isinstance(results[c, b], str)})
    print(f"\nours × = baseline time / numba_attn time (above 1: numba_attn is faster). Median wall times, "
          f"{threads} threads for every implementation. Cases name the storage of K and V; a baseline runs the "
          "same dtype (torch float16 = its own float16 SDPA); 'ours × torch fp32' compares with torch's float32 "
          "SDPA on the same tokens. GB/s counts the bytes of K and V as stored.", file=out)
    print(f"memory read bandwidth, measured in this run: {bandwidth:.1f} GB/s (decode's limit; 'bw' = share of it)",
          file=out)
    print(f"import numba_attn {t_import:.2f} s; first prefill + decode call in a new process: cold compile "
          f"{t_cold:.1f} s, from the on-disk cache {t_cached:.2f} s", file=out)
    for b, why in skipped:
        print(f"- {b} skipped on some cases: {why}", file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"threads": threads, "bandwidth_GBps": bandwidth, "import_s": t_import, "cold_first_call_s": t_cold,
                       "cached_first_call_s": t_cached, "results": records}, f, indent=2)
        print(f"wrote {json_path}", file=out)
    if plot_path:
        return _plot(cases, results, plot_path, out)
    return 0


def dataclasses_asdict(case):
    import dataclasses
    return {k: v for k, v in dataclasses.asdict(case).items() if k != "name"}


def _plot(cases, results, path, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'numba_attn[plot]' (or pip install matplotlib)", file=sys.stderr)
        return 2
    from . import bench
    sweep = sorted((c for c in cases if c.name.startswith("prefill") and not c.causal and c.D == 64 and c.B == 1
                    and c.H == 8), key=lambda c: c.L)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in bench.IMPLEMENTATIONS:
        pts = [(c.L, bench.throughput(c, results[c, impl.name])[0]) for c in sweep
               if not isinstance(results[c, impl.name], str)]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=impl.name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L = S (B1 H8 D64, not causal)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("attention prefill throughput")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=out)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m numba_attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, threading layer, CPU target, compile cache")
    c = sub.add_parser("check", help="run every kernel on random data against the float64 reference")
    c.add_argument("--quick", action="store_true", help="one case per kernel and precision")
    sub.add_parser("warmup", help="compile every kernel variant once (e.g. at install time) into the cache")
    b = sub.add_parser("bench", help="time numba_attn against numpy, torch and onnxruntime (those installed)")
    b.add_argument("--quick", action="store_true", help="fewer, smaller cases and shorter timing")
    b.add_argument("--full", action="store_true", help="also the L = S = 4096 prefills")
    b.add_argument("--threads", type=int, default=None, help="threads for every implementation (default: all)")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="plot throughput against sequence length (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return run_info()
    if args.command == "warmup":
        return run_warmup()
    if args.command == "bench":
        return run_bench(args.quick, args.threads, args.json, args.plot, args.full)
    return run_check(quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
