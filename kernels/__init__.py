"""Triton kernels (installed as lvface.kernels). Each kernel has a plain-PyTorch reference beside it;
registry.py is the table of the head's margin-softmax backends built from them."""
