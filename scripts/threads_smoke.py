"""8 Python threads calling numba_attn at once get the same results as serial calls (any threading layer)."""

import concurrent.futures

import numba
import numpy as np

import numba_attn

rng = np.random.default_rng(0)
jobs = []
for L, S in ((200, 200), (1, 1024), (130, 300), (1, 700)):
    q = rng.standard_normal((1, 4, L, 32)).astype(np.float32)
    k = rng.standard_normal((1, 4, S, 32)).astype(np.float32)
    v = rng.standard_normal((1, 4, S, 32)).astype(np.float32)
    jobs.append((q, k, v))
serial = [numba_attn.scaled_dot_product_attention(*j) for j in jobs]
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for _ in range(3):
        results = list(pool.map(lambda j: numba_attn.scaled_dot_product_attention(*j), jobs * 2))
        assert all(np.array_equal(r, s) for r, s in zip(results, serial * 2)), "concurrent results differ"
print(f"threads smoke test ok: 8 Python threads, threading layer {numba.threading_layer()}")
