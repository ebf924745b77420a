"""The float32 prefill cases of the bench table (and L=S=2048 D128) against torch and ONNX Runtime, with the
ratio to the faster of the two: issue 12's prefill targets in one run (bench's own timing: alternating
order, medians). ``python scripts/prefill_baselines.py [budget seconds per case, default 1]``."""

import sys

from numba_attn import bench


def main(budget=1.0, threads=2):
    cases = [
        c
        for c in bench.CASES
        if "bench" in c.uses and c.name.startswith(("prefill", "encoder")) and c.dtype == "float32"
    ]
    cases += [c for c in bench.CASES if c.name == "prefill" and c.L == 2048 and c.D == 128 and not c.causal][:1]
    impls = [i for i in bench.IMPLEMENTATIONS if i.name in ("numba_attn", "torch", "onnxruntime")]
    res = bench.run_cases(cases, threads, impls, budget=budget)
    for c in cases:
        ours, t, o = res[c, "numba_attn"], res[c, "torch"], res[c, "onnxruntime"]
        timed = [x for x in (t, o) if isinstance(x, float)]
        ratio = f"{min(timed) / ours:5.2f}" if timed else "  -  "
        fmt = lambda x: f"{x * 1e3:7.2f}" if isinstance(x, float) else "      -"  # noqa: E731
        print(f"{c.name:24s} {c.shape:32s} ours {fmt(ours)}  torch {fmt(t)}  ort {fmt(o)}  ours x faster {ratio}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
