"""Host-side helpers the Triton kernels' launchers share."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def cuda_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launch configs ask every call)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(t: torch.Tensor) -> str:
    """tl.dot's input_precision: exact fp32 products for fp32 inputs (the tests' references), tf32 otherwise (a
    no-op for 16-bit inputs)."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
