"""RMSNorm and fused residual-add + RMSNorm: one Triton program per row, fp32 math, HF semantics.

HF's RMSNorm: normed = x.float() * rsqrt(mean(x.float() ** 2) + eps); out = weight * normed.to(x.dtype).
With a residual, the new residual x + residual is rounded to x's dtype first and the norm is computed from that
rounded value (as HF's decoder layer adds in the model dtype). Outputs have x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.kernels.launch import pdl_launch, use_pdl, wait_for_previous_kernel

MAX_HIDDEN = 32768  # one register tile per row


@triton.jit
def _rms_norm_kernel(x_ptr,    # [N, D], row stride stride_x
                     res_ptr,  # [N, D], row stride stride_r; new residual written here (HAS_RES)
                     w_ptr,    # [D]
                     out_ptr,  # [N, D] contiguous
                     stride_x, stride_r, dim, eps,
                     BLOCK_D: tl.constexpr, HAS_RES: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < dim
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:  # new residual, rounded to the model dtype before the norm reads it
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype)
        tl.store(res_ptr + row * stride_r + offs, x, mask=mask)
        x = x.to(tl.float32)
    # Normalise in fp32, round to the model dtype, then scale by the weight (one rounding).
    rstd = tl.rsqrt(tl.sum(x * x, 0) / dim + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (x * rstd).to(dtype).to(tl.float32) * w
    tl.store(out_ptr + row * dim + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [N, D] with a contiguous last dim, got {tuple(x.shape)} strides {x.stride()}")
    if weight.shape != (x.shape[1],) or weight.device != x.device:
        raise ValueError(f"weight must be [{x.shape[1]}] on {x.device}, got {tuple(weight.shape)} on {weight.device}")
    if x.shape[1] > MAX_HIDDEN:
        raise ValueError(f"hidden size {x.shape[1]} > {MAX_HIDDEN} is not supported by the fused RMSNorm")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride(-1) != 1 or residual.device != x.device):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} "
                         f"{x.dtype} with a contiguous last dim")


def _output(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(x.shape)} {x.dtype} tensor, got {tuple(out.shape)} "
                         f"{out.dtype}")
    return out


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor | None) -> torch.Tensor:
    num_rows, dim = x.shape
    out = _output(x, out)
    if num_rows == 0 or dim == 0:
        return out
    block = triton.next_power_of_2(dim)
    res = residual if residual is not None else x
    pdl = use_pdl(x)
    _rms_norm_kernel[(num_rows,)](
        x, res, weight, out, x.stride(0), res.stride(0), dim, eps,
        BLOCK_D=block, HAS_RES=residual is not None, **pdl_launch(pdl),
        num_warps=1 if x.device.type == "cpu" else min(16, max(1, block // 256)))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight * rmsnorm(x) for x [N, D] (row stride free) -> contiguous [N, D] in x's dtype (into `out` if given)."""
    _check(x, weight, None)
    return _launch(x, None, weight, eps, out)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual). The new residual is written IN PLACE into `residual`
    (rounded to x's dtype) and `residual` itself is returned as the second element."""
    _check(x, weight, residual)
    return _launch(x, residual, weight, eps, out), residual


# ----------------------------------------------------------------------------------------------
# Torch references
# ----------------------------------------------------------------------------------------------

def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h.to(dtype).float()).to(dtype)


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as add_rms_norm: `residual` is updated in place and returned."""
    residual.copy_(x + residual)
    return rms_norm_torch(residual, weight, eps), residual
