"""A parallel read of a large array: the memory-bandwidth yardstick for the decode kernels."""

from numba import njit, prange

from .. import config


@njit(parallel=True, fastmath=config.FASTMATH, cache=config.CACHE)
def parallel_sum(a):
    """Σ a[i] over a 1-D array, split over all threads: reads every byte once."""
    total = 0.0
    for i in prange(a.shape[0]):
        total += a[i]
    return total
