"""Every figure of issue 13 in one run, each beside its target. Run it on a quiet machine:

    python scripts/issue13_figures.py                 # all of numba's threads; ~5-10 minutes
    python scripts/issue13_figures.py --threads 2 --json issue13.json
    python scripts/issue13_figures.py --quick         # a rough look: 512 tokens only, shorter timing

It prints, from one process (and its neighbours and example runs):

1. ``bench --layer``'s table: a SmolLM2-shaped attention layer decode step for every cache × weight
   format at 512 and 4096 cached tokens, split into projections / attention / rest, × the old
   float32 path and × torch; the per-call overhead of a 1-token GQA ``cache.attend`` at 64 tokens;
   one-token ``KVCache.append`` per format.
2. ``bench --busy``'s table: decode, prefill and SmolLM2's ``cache.attend`` step idle and beside
   each neighbour (a busy loop, BLAS, numba), ours and torch.
3. ``examples/smollm_chat.py``'s decode tokens/s with float32, with int8 cache + weights and with int8
   cache + int4 weights (left out
   with a note when the model package is not installed; ``--no-example`` skips it).
4. A summary: each target of the issue, the figure measured here, and whether it is met.

Timings from a loaded machine mean nothing: run it when nothing else runs.
"""

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's numba_attn, whatever is installed

from numba_attn import bench  # noqa: E402

#: (cache, weights) of the example's runs: float32 (the starting point), int8 weights, and int4 weights
#: (the GGUF's own width for the layers; its lm_head stays int8), which the ≥ 50 tokens/s target is read on
EXAMPLE_RUNS = (("float32", "float32"), ("int8", "int8"), ("int8", "int4"))
EXAMPLE_TARGET_RUN = ("int8", "int4")
#: a prompt the model answers at length: the default question's 8-token answer times the first steps only
PROMPT = "Tell me a long story about a dragon."


def example_tokens_per_second(cache_dtype, weights, threads):
    """(tokens/s, None) from the SmolLM2 example's 'decode N tokens/s' line, or (None, why not)."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "examples", "smollm_chat.py"),
        PROMPT,
        "--cache-dtype",
        cache_dtype,
        "--weights",
        weights,
        "--threads",
        str(threads),
        "--max-new-tokens",
        "64",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    found = re.search(r"decode (\d+(?:\.\d+)?) tokens/s", proc.stdout)
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"the example did not run (status {proc.returncode}): {tail[0]}"
    return float(found.group(1)), None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="threads for every implementation (default: all)")
    ap.add_argument("--quick", action="store_true", help="512 tokens only, shorter timing")
    ap.add_argument("--no-example", action="store_true", help="leave out the SmolLM2 example's tokens/s")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = ap.parse_args(argv)

    bench.preload_baselines()  # torch before numba's pool starts
    threads = bench._check_threads(args.threads)
    if threads is None:
        return 2
    cores = bench.available_cores()
    out = sys.stdout
    tokens = (512,) if args.quick else bench.LAYER_TOKENS

    print(f"issue 13 figures: {threads} threads, {cores} cores" + (", quick" if args.quick else ""), file=sys.stderr)
    limits = bench._blas_limits(threads)
    try:
        layer = bench.layer_results(threads, quick=args.quick, tokens=tokens, progress=bench._progress)
        bench._progress("call overhead and appends ...")
        overhead = dict(bench.call_overhead(64, threads), tokens=64)
        appends = {d: bench.append_seconds(d) for d in bench.FORMATS}
    finally:
        if limits is not None:
            limits.unregister()
    print("== SmolLM2-shaped attention layer, one decode step ==", file=out)
    bench.print_layer(layer, overhead, appends, threads, out)

    busy = bench.busy_results(threads, quick=args.quick, cores=cores, progress=bench._progress)
    print("\n== beside other work (bench --busy) ==", file=out)
    bench.print_busy(busy, threads, cores, out)

    example = {}
    if not args.no_example:
        for cache_dtype, weights in EXAMPLE_RUNS:
            bench._progress(f"SmolLM2 example, {cache_dtype} cache, {weights} weights ...")
            example[cache_dtype, weights] = example_tokens_per_second(cache_dtype, weights, threads)

    summary = []  # (figure, measured text, target text, met: True/False/None)
    at512 = {(r["cache"], r["weights"]): r for r in layer if r["tokens"] == 512}
    for (cache_dtype, weights), target in bench.LAYER_TARGETS.items():
        r = at512[cache_dtype, weights]
        speedup = r["old_s"] / r["step_s"]
        summary.append(
            (
                f"layer step at 512 tokens, {cache_dtype} cache + {weights} weights, × old float32 path",
                f"{speedup:.2f}× ({r['step_s'] * 1e3:.3f} ms vs {r['old_s'] * 1e3:.3f} ms)",
                f"≥ {target:g}×",
                speedup >= target,
            )
        )
    summary.append(
        (
            "1-token GQA decode call at 64 tokens (cache.attend), in all",
            f"{overhead['attend'] * 1e6:.1f} µs",
            f"≤ {bench.CALL_TARGET * 1e6:.0f} µs",
            overhead["attend"] <= bench.CALL_TARGET,
        )
    )
    summary.append(
        (
            "the same call beyond the numba kernel",
            f"{overhead['beyond_kernel'] * 1e6:.1f} µs (kernel {overhead['kernel'] * 1e6:.1f} µs)",
            f"≤ {bench.BEYOND_KERNEL_TARGET * 1e6:.0f} µs",
            overhead["beyond_kernel"] <= bench.BEYOND_KERNEL_TARGET,
        )
    )
    for dtype, seconds in appends.items():
        summary.append(
            (
                f"one-token append, {dtype} cache",
                f"{seconds * 1e6:.1f} µs",
                f"≤ {bench.APPEND_TARGET * 1e6:.0f} µs",
                seconds <= bench.APPEND_TARGET,
            )
        )
    for r in busy:
        ours, theirs, quotient = bench.busy_ratio(r)
        summary.append(
            (
                f"busy: {r['case']}, beside {r['neighbour']}: (ours busy/idle) / (torch busy/idle)",
                f"{ours:.2f} / {theirs:.2f} = {quotient:.2f}" if quotient is not None else f"ours {ours:.2f}, no torch",
                f"≤ {bench.BUSY_TARGET}",
                None if quotient is None else quotient <= bench.BUSY_TARGET,
            )
        )
    for (cache_dtype, weights), (tps, why) in example.items():
        summary.append(
            (
                f"SmolLM2 example decode, {cache_dtype} cache + {weights} weights",
                f"{tps:.1f} tokens/s" if tps is not None else why,
                "≥ 50 tokens/s" if (cache_dtype, weights) == EXAMPLE_TARGET_RUN else "(before/after)",
                (tps >= 50 if tps is not None else None) if (cache_dtype, weights) == EXAMPLE_TARGET_RUN else None,
            )
        )

    from numba_attn.check import print_table

    print("\n== issue 13: figure, measured, target ==", file=out)
    met_text = {True: "met", False: "NOT met", None: "-"}
    print_table(("figure", "measured", "target", ""), [(f, m, t, met_text[ok]) for f, m, t, ok in summary], out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "threads": threads,
                    "cores": cores,
                    "layer": layer,
                    "call_overhead_s": overhead,
                    "append_s": appends,
                    "busy": busy,
                    "example_tokens_per_s": {f"{c} cache, {w} weights": v[0] for (c, w), v in example.items()},
                    "summary": [{"figure": f, "measured": m, "target": t, "met": ok} for f, m, t, ok in summary],
                },
                f,
                indent=2,
            )
        print(f"wrote {args.json}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
