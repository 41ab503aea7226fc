"""Fused q/k RMSNorm + neox RoPE + paged K/V store: one Triton program per token, fp32 math.

Per token: q and k heads are RMS-normalised over head_dim (HF semantics, rounded to the model dtype, as
Qwen3's q_norm / k_norm), rotated by the neox (rotate-half) RoPE with fp32 cos/sin from cos_sin_cache, and
rounded once to the model dtype. q is written back IN PLACE into q's storage (the strided view is returned);
k goes to the cache only (never back to memory); v is copied to the cache unchanged. slot -1 rows still
rotate q but store nothing. Without q/k weights the norm is skipped (Llama / Qwen2: RoPE + store only).

Note: HF rounds cos/sin to the model dtype before rotating; we rotate with the fp32 table (one rounding at the
end), so results can differ from HF's eager bf16 path by about one bf16 ulp.

FP8 KV cache (k_scale / v_scale given): k (after rounding to the model dtype, so the result equals RoPE
followed by store_kvcache) and v are quantised per (token, head) in the same pass, codes and scales written
as store_kvcache does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.kernels.launch import pdl_launch, use_pdl, wait_for_previous_kernel
from nanovllm.kernels.norm import rms_norm_torch
from nanovllm.kernels.torch_attention import check_kv_scales, store_kvcache_torch
from nanovllm.kernels.triton_attention import (
    _check_cache_layout,
    _fp8_encode,
    _fp8_scale,
    _kernel_cache_args,
    _v_layout,
)


@triton.jit
def _norm_rope(x1, x2,        # [HEADS_P2, HALF_P2] first / second halves of each head
               cos, sin,      # [HALF_P2] fp32
               w_ptr,         # [D] norm weight (NORM only)
               offs_c, c_ok, eps,
               HEAD_DIM: tl.constexpr, NORM: tl.constexpr):
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if NORM:  # HF RMSNorm: fp32 normalise, round, times weight, round
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)[:, None]
        w1 = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HEAD_DIM // 2 + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    # Rotate half: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    return out1.to(dtype), out2.to(dtype)


@triton.jit
def _store_halves_fp8(cache_ptr,  # uint8 view of a float8_e4m3fn cache
                      scale_ptr,  # [num_blocks, H_kv, block_size] fp32
                      dst, sdst, x1, x2, head_ok, mask, half_offset):
    """Quantise heads given as halves x1, x2 [HEADS, HALF_P2] (fp32, padding zero) with one scale per head; the
    second half's codes go half_offset elements after the first's."""
    amax = tl.maximum(tl.max(tl.abs(x1), 1), tl.max(tl.abs(x2), 1))
    scale, inv = _fp8_scale(amax)
    tl.store(cache_ptr + dst, _fp8_encode(x1, inv), mask=mask)
    tl.store(cache_ptr + dst + half_offset, _fp8_encode(x2, inv), mask=mask)
    tl.store(scale_ptr + sdst, scale, mask=head_ok)


@triton.jit
def _qk_norm_rope_store_kernel(
        q_ptr,                      # [N, H, D] strided rows/heads; rewritten in place
        k_ptr, v_ptr,               # [N, H_kv, D] strided rows/heads
        pos_ptr,                    # [N] int
        cos_sin_ptr,                # [max_pos, D] fp32: [cos | sin]
        k_cache_ptr, v_cache_ptr,   # [num_blocks, block_size, H_kv, D] (uint8 views when FP8); v: runs of
                                    # V_BLOCK tokens (triton_attention._v_layout), any strides
        k_scale_ptr, v_scale_ptr,   # [num_blocks, H_kv, block_size] fp32 (FP8 only)
        slot_ptr,                   # [N] int; -1 = do not store
        qw_ptr, kw_ptr,             # [D] norm weights (Q_NORM / K_NORM)
        eps,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
        stride_cblk, stride_cslot, stride_ch,             # k_cache strides (head_dim: 1)
        stride_vblk, stride_vgrp, stride_vslot, stride_vch, stride_vd,  # _v_layout
        stride_sblk, stride_sh,
        NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        HEADS_P2: tl.constexpr, KV_HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        V_BLOCK: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr, FP8: tl.constexpr, USE_PDL: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    wait_for_previous_kernel(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, HALF_P2)
    c_ok = offs_c < HALF
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_c, mask=c_ok, other=0.0).to(tl.float32)

    # q: norm + rope, back in place
    offs_h = tl.arange(0, HEADS_P2)
    q_mask = (offs_h < NUM_HEADS)[:, None] & c_ok[None, :]
    q_ptrs = q_ptr + tok * stride_qt + offs_h[:, None] * stride_qh + offs_c[None, :]
    q1, q2 = _norm_rope(tl.load(q_ptrs, mask=q_mask, other=0.0), tl.load(q_ptrs + HALF, mask=q_mask, other=0.0),
                        cos, sin, qw_ptr, offs_c, c_ok, eps, HEAD_DIM, Q_NORM)
    tl.store(q_ptrs, q1, mask=q_mask)
    tl.store(q_ptrs + HALF, q2, mask=q_mask)

    # k: norm + rope, v as is; both only to the cache (nothing loaded or stored for slot -1)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    offs_kh = tl.arange(0, KV_HEADS_P2)
    kv_mask = (offs_kh < tl.where(slot >= 0, NUM_KV_HEADS, 0))[:, None] & c_ok[None, :]
    k_ptrs = k_ptr + tok * stride_kt + offs_kh[:, None] * stride_kh + offs_c[None, :]
    v_ptrs = v_ptr + tok * stride_vt + offs_kh[:, None] * stride_vh + offs_c[None, :]
    k1, k2 = _norm_rope(tl.load(k_ptrs, mask=kv_mask, other=0.0), tl.load(k_ptrs + HALF, mask=kv_mask, other=0.0),
                        cos, sin, kw_ptr, offs_c, c_ok, eps, HEAD_DIM, K_NORM)
    v1 = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    v2 = tl.load(v_ptrs + HALF, mask=kv_mask, other=0.0)
    dst = (slot // BLOCK_SIZE) * stride_cblk + (slot % BLOCK_SIZE) * stride_cslot \
        + offs_kh[:, None] * stride_ch + offs_c[None, :]
    vdst = (slot // BLOCK_SIZE) * stride_vblk + (slot % BLOCK_SIZE // V_BLOCK) * stride_vgrp \
        + (slot % V_BLOCK) * stride_vslot \
        + offs_kh[:, None] * stride_vch + offs_c[None, :] * stride_vd
    if FP8:  # quantise per (token, head) over both halves; scales beside the codes
        sdst = (slot // BLOCK_SIZE) * stride_sblk + offs_kh * stride_sh + slot % BLOCK_SIZE
        head_ok = offs_kh < tl.where(slot >= 0, NUM_KV_HEADS, 0)
        _store_halves_fp8(k_cache_ptr, k_scale_ptr, dst, sdst, k1.to(tl.float32), k2.to(tl.float32), head_ok,
                          kv_mask, HALF)
        _store_halves_fp8(v_cache_ptr, v_scale_ptr, vdst, sdst, v1.to(tl.float32), v2.to(tl.float32), head_ok,
                          kv_mask, HALF * stride_vd)
    else:
        cache_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + dst, k1.to(cache_dtype), mask=kv_mask)
        tl.store(k_cache_ptr + dst + HALF, k2.to(cache_dtype), mask=kv_mask)
        tl.store(v_cache_ptr + vdst, v1.to(cache_dtype), mask=kv_mask)
        tl.store(v_cache_ptr + vdst + HALF * stride_vd, v2.to(cache_dtype), mask=kv_mask)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor, slot_mapping: torch.Tensor, q_weight: torch.Tensor | None,
                  k_weight: torch.Tensor | None) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q [N, H, D] {tuple(q.shape)}, k / v [N, H_kv, D] {tuple(k.shape)} / {tuple(v.shape)} "
                         "do not match")
    num_tokens, _, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even for rotate-half RoPE")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a contiguous last dim (views of the qkv output are fine)")
    if positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"positions {tuple(positions.shape)} / slot_mapping {tuple(slot_mapping.shape)} must be "
                         f"[{num_tokens}]")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"cos_sin_cache must be [max_position, {head_dim}] ([cos | sin]), "
                         f"got {tuple(cos_sin_cache.shape)}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None and w.shape != (head_dim,):
            raise ValueError(f"{name} must be [{head_dim}] or None, got {tuple(w.shape)}")


def qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                       eps: float, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm (q_weight / k_weight, None = skip) + neox RoPE at `positions` for q [N, H, D] and k [N, H_kv, D];
    k and v [N, H_kv, D] are written to the paged caches at slot_mapping (-1 = skip). Returns q, normed and
    rotated IN PLACE. k_scale / v_scale: see store_kvcache (None = cache in q's dtype)."""
    _check_inputs(q, k, v, positions, cos_sin_cache, slot_mapping, q_weight, k_weight)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    _check_cache_layout(k_cache, v_cache, num_kv_heads, head_dim)
    fp8 = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    if num_tokens == 0:
        return q
    k_dst, v_dst, k_scale, v_scale = _kernel_cache_args(k_cache, v_cache, k_scale, v_scale, fp8)
    pdl = use_pdl(q)
    v_block, v_strides = _v_layout(v_cache)
    _qk_norm_rope_store_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, k_dst, v_dst, k_scale, v_scale, slot_mapping,
        q_weight if q_weight is not None else q, k_weight if k_weight is not None else q, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *v_strides, k_scale.stride(0),
        k_scale.stride(1), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_P2=triton.next_power_of_2(num_heads), KV_HEADS_P2=triton.next_power_of_2(num_kv_heads),
        HALF_P2=triton.next_power_of_2(head_dim // 2), BLOCK_SIZE=k_cache.shape[1], V_BLOCK=v_block,
        Q_NORM=q_weight is not None, K_NORM=k_weight is not None, FP8=fp8, **pdl_launch(pdl),
        num_warps=1 if q.device.type == "cpu" else 4)
    return q


# ----------------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------------

def norm_rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    """x [N, heads, D]; cos, sin [N, D/2] fp32. HF RMSNorm (if weight) then fp32 rotate-half, one rounding."""
    if weight is not None:
        x = rms_norm_torch(x, weight, eps)
    x1, x2 = x.float().chunk(2, -1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, D/2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def qk_norm_rope_store_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                             cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slot_mapping: torch.Tensor, q_weight: torch.Tensor | None,
                             k_weight: torch.Tensor | None, eps: float, k_scale: torch.Tensor | None = None,
                             v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of qk_norm_rope_store from plain ops (same contract: q rewritten in place and returned)."""
    _check_inputs(q, k, v, positions, cos_sin_cache, slot_mapping, q_weight, k_weight)
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, -1)  # [N, D/2] each
    k_rot = norm_rope_torch(k, cos, sin, k_weight, eps)
    store_kvcache_torch(k_rot, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q.copy_(norm_rope_torch(q, cos, sin, q_weight, eps))
