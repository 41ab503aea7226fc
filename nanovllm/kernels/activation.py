"""SiLU-and-multiply for gated MLPs: x = [gate | up] [N, 2I] -> silu(gate) * up [N, I], fp32 math, one rounding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nanovllm.kernels.launch import pdl_launch, use_pdl, wait_for_previous_kernel

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def silu_mul(gate, up):
    """silu(gate) * up in fp32 (gate, up: fp32 tensors); shared with the gated GEMV so both round the same value."""
    return gate / (1.0 + tl.exp2(-gate * LOG2E)) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr,    # [N, 2I], row stride stride_x
                         out_ptr,  # [N, I] contiguous
                         stride_x, inter,
                         BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = silu_mul(gate, up)
    tl.store(out_ptr + row * inter + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x [N, 2I] (row stride free, last dim contiguous) -> contiguous [N, I]
    in x's dtype (into `out` if given)."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [N, 2I] with a contiguous last dim, got {tuple(x.shape)} strides {x.stride()}")
    num_rows, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)
    elif out.shape != (num_rows, inter) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({num_rows}, {inter}) {x.dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if num_rows == 0 or inter == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    pdl = use_pdl(x)
    _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
        x, out, x.stride(0), inter, BLOCK=block, **pdl_launch(pdl),
        num_warps=1 if x.device.type == "cpu" else max(1, min(4, block // 256)))
    return out


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """Reference with the same rounding as the kernel (fp32 math, one rounding to x's dtype). The eager
    `F.silu(gate) * up` in bf16 rounds twice and may differ by one bf16 ulp."""
    gate, up = x.float().chunk(2, -1)
    return (F.silu(gate) * up).to(x.dtype)
