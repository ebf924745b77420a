"""LinearWeight's kernels on this machine (float32, float16, int8 storage; one row and several) against
float64 numpy, within the documented bound: float32 accumulation, plus for int8 the rounding of each row
of x to int16 per block of 32 inputs. Exits 1 on a miss. Used by scripts/test-aarch64.sh, where the int8
kernels' pair products run as generic IR (NEON), not as x86's vpmaddwd.

    python scripts/linear_smoke.py [float32 float16 int8]    (default: all three storages)
"""

import sys

import numpy as np

from numba_attn.linear import LinearWeight


def bound(x, w):
    """n·eps32·(|x| @ (s|q| + |m|)) + Σ_b (max|x_b| / 65534)·Σ_{k∈b} (s|q| + |m|), per output."""
    eps = float(np.finfo(np.float32).eps)
    x64 = np.abs(x.astype(np.float64))
    K, N = w.shape
    if w.dtype != np.int8:
        return (K + 4) * eps * (x64 @ np.abs(w.dequantize().astype(np.float64)))
    codes = w._codes()
    P, K_pad, T = codes.shape
    s = w._scales[:, :, None, 0, :].astype(np.float64)
    m = np.abs(w._scales[:, :, None, 1, :].astype(np.float64))
    mag = (np.abs(codes.astype(np.float64)).reshape(P, K_pad // 32, 32, T) * s + m).reshape(P, K_pad, T)
    mag = mag.transpose(1, 0, 2).reshape(K_pad, P * T)[:, :N]
    padded = np.zeros((x.shape[0], K_pad))
    padded[:, :K] = x64
    half_step = np.repeat(padded.reshape(x.shape[0], -1, 32).max(axis=2) / 65534, 32, axis=1)
    n = K + 2 * (K_pad // 32) + 4
    return n * eps * (padded @ mag) + half_step @ mag * (1 + 1e-6)


def main(argv=None):
    storages = (sys.argv[1:] if argv is None else argv) or ["float32", "float16", "int8"]
    rng = np.random.default_rng(0)
    failures = 0
    for K, N in ((100, 130), (576, 192)):
        W = rng.standard_normal((K, N)).astype(np.float32) * 0.05
        b = rng.standard_normal(N).astype(np.float32)
        for storage in storages:
            w = LinearWeight(W, b, dtype=storage)
            for M in (1, 5):
                x = rng.standard_normal((M, K)).astype(np.float32)
                y = w(x)
                ref = x.astype(np.float64) @ w.dequantize().astype(np.float64) + b
                excess = np.abs(y - ref) - bound(x, w)
                ok = bool(np.isfinite(y).all() and excess.max() <= 0)
                failures += not ok
                worst = float(np.abs(y - ref).max())
                print(f"{'ok  ' if ok else 'FAIL'} {storage:8} K={K:4} N={N:4} rows={M}: max |y - ref| {worst:.2e}")
    print("linear smoke:", "all within the bound" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
