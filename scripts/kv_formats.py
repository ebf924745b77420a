"""Every KV-cache format side by side: bytes, cold-cache decode time against torch's float32 SDPA on the
same tokens, what the Hadamard rotation costs, and the per-key cost with one thread (issue 14's speed
targets). Run it on a quiet machine:

    python scripts/kv_formats.py              # 2 threads (default) or --threads N; --quick for fewer rounds

1. Cold-cache decode, B1 H32 S4096 D64 (the ``bench`` case): ``cache.attend(q)`` on a KVCache of each
   format, EVICT_BYTES of other memory read before every timed call, timed in turns with torch's float32
   ``scaled_dot_product_attention`` on 4-D tensors (``bench.alternate``), and with the same cache's
   storage read without rotation (``rotate=False``) to give what the rotation of the query (and of the
   output) costs per step.
2. ns per key, 1 thread, warm (B1 H8 S2048): ``scaled_dot_product_attention`` on quantised tensors, the
   compute cost of reading one key and one value in each format.
"""

import argparse
import os
import time

import numpy as np

from numba_attn import bench

bench.preload_baselines()  # torch before numba's thread pool (see there: else its SDPA runs 2-5× slower)

import numba_attn  # noqa: E402

FORMATS = {  # name: (key format, value format)
    "float32": (np.float32, np.float32),
    "float16": (np.float16, np.float16),
    "int8": (np.int8, np.int8),
    "int8 keys / int4 values": (np.int8, "int4"),
    "int4": ("int4", "int4"),
}


def decode_table(threads, rounds):
    import torch

    torch.set_num_threads(threads)
    numba_attn.set_num_threads(threads)
    B, H, S, D = 1, 32, 4096, 64
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, H, 1, D), dtype=np.float32)
    k = rng.standard_normal((B, H, S, D), dtype=np.float32)
    v = rng.standard_normal((B, H, S, D), dtype=np.float32)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

    def torch_call():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

    float32_bytes = None
    print(f"cold-cache decode B{B} H{H} S{S} D{D}, {threads} threads, cache.attend vs torch float32 SDPA (4-D)")
    print(
        "| format | KV bytes | × float32 | rotation | ms | torch fp32 ms | ours × torch | unrotated ms "
        "| rotation cost |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (kf, vf) in FORMATS.items():
        caches = {}
        for rotate in (None, False):
            cache = numba_attn.KVCache(B, H, D, S, key_dtype=kf, value_dtype=vf, rotate=rotate)
            cache.append(k, v)
            caches[rotate] = cache
        float32_bytes = float32_bytes or caches[None].nbytes
        fns = {"torch": ("torch", torch_call)}
        fns["ours"] = ("numba_attn", lambda c=caches[None]: c.attend(q))
        rotated = caches[None].rotate
        if rotated:
            fns["unrotated"] = ("numba_attn", lambda c=caches[False]: c.attend(q))
        t = bench.alternate(fns, rounds=rounds, calls=5, evict=True)
        row = [
            name,
            f"{caches[None].nbytes / 2**20:.1f} MiB",
            f"{caches[None].nbytes / float32_bytes:.3f}",
            rotated or "none",
            f"{t['ours'] * 1e3:.2f}",
            f"{t['torch'] * 1e3:.2f}",
            f"{t['torch'] / t['ours']:.2f}×",
        ]
        if rotated:
            row += [f"{t['unrotated'] * 1e3:.2f}", f"{100 * (t['ours'] / t['unrotated'] - 1):+.1f} %"]
        else:
            row += ["", ""]
        print("| " + " | ".join(row) + " |", flush=True)


def ns_per_key(rounds):
    numba_attn.set_num_threads(1)
    B, H, S, D = 1, 8, 2048, 64
    rng = np.random.default_rng(1)
    q = rng.standard_normal((B, H, 1, D), dtype=np.float32)
    k = rng.standard_normal((B, H, S, D), dtype=np.float32)
    v = rng.standard_normal((B, H, S, D), dtype=np.float32)

    def stored(x, fmt):
        if fmt == "int4":
            return numba_attn.quantize(x, bits=4)
        if fmt == np.int8:
            return numba_attn.quantize(x)
        return x.astype(fmt)

    calls = {name: (stored(k, kf), stored(v, vf)) for name, (kf, vf) in FORMATS.items()}
    best = {name: np.inf for name in calls}
    for kk, vv in calls.values():
        numba_attn.scaled_dot_product_attention(q, kk, vv)
    for _ in range(rounds):
        for name, (kk, vv) in calls.items():
            t0 = time.perf_counter()
            for _ in range(20):
                numba_attn.scaled_dot_product_attention(q, kk, vv)
            best[name] = min(best[name], (time.perf_counter() - t0) / 20)
    print(f"\nns per key (one key and one value), 1 thread, warm, B{B} H{H} S{S} D{D}")
    for name, t in best.items():
        print(f"  {name:26s} {t / (H * S) * 1e9:6.2f} ns/key")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else 6
    import llvmlite.binding as llvm

    print(f"numba JIT target: {llvm.get_host_cpu_name()}, load average {os.getloadavg()[0]:.2f}")
    decode_table(args.threads, rounds)
    ns_per_key(rounds)


if __name__ == "__main__":
    main()
