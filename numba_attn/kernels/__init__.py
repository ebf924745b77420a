"""Numba kernels: one module per concern (prefill, decode, quantised)."""
