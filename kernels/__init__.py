"""Triton kernels, one module per op (installed as vpfast.kernels; imported lazily, only when used)."""
