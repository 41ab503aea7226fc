"""Helpers the Triton kernels' launchers share (host side), and the programmatic-dependent-launch wait (device)."""
import functools
import os

import torch
import triton
import triton.language as tl

# NANOVLLM_PDL=0 turns programmatic dependent launch off (read once, at import): for debugging and A/B timings.
_PDL_ALLOWED = os.environ.get("NANOVLLM_PDL", "1") != "0"
# Triton >= 3.3 has the griddepcontrol wrappers and the `launch_pdl` launch option (older ones reject the option).
_TRITON_HAS_PDL = hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launch configs ask every call)."""
    return _sm_count(_index(device))


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels working on `t` launch with programmatic dependent launch (PDL, sm90+): a kernel's programs
    may be scheduled while the previous kernel in the stream drains, so launch latency overlaps that tail; each
    such kernel calls `wait_for_previous_kernel` before it reads or writes anything another kernel touches."""
    return _PDL_ALLOWED and _TRITON_HAS_PDL and t.is_cuda and _pdl_capable(_index(t.device))


def pdl_launch(pdl: bool) -> dict:
    """A PDL kernel's launch keywords: its USE_PDL constexpr, and `launch_pdl` only when on (Triton before 3.3 does
    not know the option)."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl else {"USE_PDL": False}


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """PDL: block until the previous kernel in the stream has finished and its writes are visible, then let the
    next kernel's programs start launching (they wait the same way). A no-op when USE_PDL is False."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def dot_precision(t: torch.Tensor) -> str:
    """tl.dot's input_precision: exact fp32 products for fp32 inputs (the tests' references), tf32 otherwise (a
    no-op for 16-bit inputs)."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
