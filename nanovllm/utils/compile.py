"""torch.compile for small elementwise ops, on CUDA only (CPU stays eager)."""
import functools
import os
from typing import Callable

import torch

ENABLED = os.environ.get("NANOVLLM_COMPILE", "1") != "0"


def compile_on_cuda(fn: Callable) -> Callable:
    """Run fn compiled when its first tensor argument is on CUDA, eagerly otherwise."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        if not (ENABLED and tensor.is_cuda):
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args, **kwargs)
    return wrapper
