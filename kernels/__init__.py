"""Triton kernels (installed as lvface.kernels). Each kernel has a plain-PyTorch reference beside it."""
