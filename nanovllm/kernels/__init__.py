"""Attention and KV-cache kernels: the torch reference and our Triton kernels."""
