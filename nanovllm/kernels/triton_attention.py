"""Triton paged-attention kernels: KV-cache store, varlen causal prefill and split-K decode.

Cache layout (per layer): k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
slot s lives at block s // block_size, offset s % block_size. Each function computes the same thing as
its counterpart in torch_attention.py. All launches are free of host syncs; decode is CUDA-graph safe.

FP8 KV cache: pass k_scale / v_scale (float32, kv_scale_shape(k_cache) = [num_blocks, num_kv_heads, block_size])
with float8_e4m3fn caches; the format and the per-(token, head) scale choice are described in torch_attention.py.
Attention reads V (and the scales) up to 15 rows past a sequence's length, so its loads keep their 16-byte vectors,
and zeroes the scores and v_scale of those rows, so the V codes there (rest of its last page) must be finite:
new_kv_cache zero-fills fp8 caches and the store kernels never write a NaN code (their clamp drops NaN), so the
engine's caches always are.
The store quantises in the same pass (exact round-to-nearest-even e4m3 encoding in integer arithmetic, bit-equal
to torch's cast, also under the CPU interpreter whose float8 cast is not). Prefill and decode load fp8 tiles,
convert them to q's dtype in registers for tl.dot, and fold the scales into the scores (qk * k_scale per key)
and into the probabilities before P.V (p * v_scale per key); softmax state and accumulators stay float32.
Without scales the FP8 constexpr is False and the kernels compile exactly as before.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.kernels.launch import (
    cuda_sm_count,
    dot_precision,
    last_dim_contiguous,
    pdl_launch,
    use_pdl,
    wait_for_previous_kernel,
)
from nanovllm.kernels.torch_attention import FP8_INV_MAX, FP8_MAX, check_kv_scales, kv_scale_shape

LOG2E = 1.4426950408889634
_FP8_MAX: tl.constexpr = tl.constexpr(FP8_MAX)
_FP8_INV_MAX: tl.constexpr = tl.constexpr(FP8_INV_MAX)

__all__ = ["decode_attention_triton", "kv_scale_shape", "store_kvcache", "varlen_attention_triton"]


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _page_index(bt_row, start, offs_n, limit, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
                ONE_PAGE: tl.constexpr):
    """(page id as int64, offset in the page) of cache rows start + offs_n.

    ONE_PAGE: the tile lies inside one page (BLOCK_SIZE % TILE_N == 0) -> one scalar block-table load.
    Otherwise each token looks up its own page (masked beyond `limit`, so no out-of-range table reads).
    """
    if ONE_PAGE:  # start is a multiple of TILE_N: tell the compiler, so token-contiguous V loads vectorise
        page = tl.load(bt_row + start // BLOCK_SIZE).to(tl.int64)
        return page, tl.max_contiguous(tl.multiple_of((start % BLOCK_SIZE) + offs_n, TILE_N), TILE_N)
    else:
        pos = start + offs_n
        page = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos < limit, other=0).to(tl.int64)
        return page, pos % BLOCK_SIZE


@triton.jit
def _v_rows(page, in_page, stride_vblk, stride_vgrp, stride_vslot, BLOCK_SIZE: tl.constexpr, V_BLOCK: tl.constexpr):
    """int64 element offsets of V rows (page, in_page) when V's pages are split into runs of V_BLOCK tokens."""
    in_page = in_page.to(tl.int64)
    if V_BLOCK == BLOCK_SIZE:
        return page * stride_vblk + in_page * stride_vslot
    return page * stride_vblk + (in_page // V_BLOCK) * stride_vgrp + (in_page % V_BLOCK) * stride_vslot


@triton.jit
def _page_rows(bt_row, start, offs_n, limit, stride_blk, stride_slot, stride_vblk, stride_vgrp, stride_vslot,
               BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, ONE_PAGE: tl.constexpr, V_LIKE_K: tl.constexpr,
               V_BLOCK: tl.constexpr):
    """int64 element offsets [TILE_N] of cache rows start + offs_n in K and in V (one block-table lookup;
    V_LIKE_K: v_cache has k_cache's shape and strides, so the offsets are shared)."""
    page, in_page = _page_index(bt_row, start, offs_n, limit, BLOCK_SIZE, TILE_N, ONE_PAGE)
    rows = page * stride_blk + in_page.to(tl.int64) * stride_slot
    if V_LIKE_K:
        return rows, rows
    return rows, _v_rows(page, in_page, stride_vblk, stride_vgrp, stride_vslot, BLOCK_SIZE, V_BLOCK)


@triton.jit
def _fp8_tile(k_head, v_head, ks_head, vs_head, bt_row, start, offs_n, offs_d, limit, qk_scale, dtype: tl.constexpr,
              stride_cblk, stride_cslot, stride_vblk, stride_vgrp, stride_vslot, stride_vd, stride_sblk,
              BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, ONE_PAGE: tl.constexpr, MASKED: tl.constexpr,
              V_BLOCK: tl.constexpr):
    """One fp8 K/V tile converted to `dtype` [TILE_N, D] and its per-key scales [TILE_N] (k's times qk_scale).
    Every row addressed lies in an allocated page (the tile's page, or page 0 for rows past `limit` without
    ONE_PAGE). MASKED (a tile that may reach past `limit`, inside the one pipelined loop): K rows past `limit` are
    not read; V and the scales are read up to `limit` rounded up to 16 rows, so the token-contiguous V keeps its
    16-byte loads (a mask finer than the vector would split them into bytes); v_scale of rows at or past `limit` is
    zeroed, so the up to 15 rows read past it add p * 0 * v = 0 as long as their V codes are finite (module doc);
    callers mask their scores."""
    page, in_page = _page_index(bt_row, start, offs_n, limit, BLOCK_SIZE, TILE_N, ONE_PAGE)
    rows = page * stride_cblk + in_page.to(tl.int64) * stride_cslot
    v_ptrs = v_head + _v_rows(page, in_page, stride_vblk, stride_vgrp, stride_vslot, BLOCK_SIZE, V_BLOCK)[:, None] \
        + offs_d[None, :] * stride_vd
    srows = page * stride_sblk + in_page
    if MASKED:
        pos = start + offs_n
        k_ok = pos < limit
        v_ok = pos < tl.multiple_of(tl.cdiv(limit, 16) * 16, 16)
        k = tl.load(k_head + rows[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0).to(dtype)
        v = tl.load(v_ptrs, mask=v_ok[:, None], other=0.0).to(dtype)
        ks = tl.load(ks_head + srows, mask=v_ok, other=0.0)
        vs = tl.where(k_ok, tl.load(vs_head + srows, mask=v_ok, other=0.0), 0.0)
    else:
        k = tl.load(k_head + rows[:, None] + offs_d[None, :]).to(dtype)
        v = tl.load(v_ptrs).to(dtype)
        ks = tl.load(ks_head + srows)
        vs = tl.load(vs_head + srows)
    return k, v, ks * qk_scale, vs


@triton.jit
def _softmax_step(acc, m_i, l_i, qk, v, DOT_PREC: tl.constexpr):
    """One online-softmax update with log2-domain scores qk [M, N] (masked entries = -inf)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked row: keep exp2 finite
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _softmax_step_vscaled(acc, m_i, l_i, qk, v, v_scale, DOT_PREC: tl.constexpr):
    """_softmax_step for a quantised V tile: each key's probability is multiplied by its v_scale [N] before P.V
    (the normaliser l_i uses the unscaled probabilities)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = (p * v_scale[None, :]).to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _fp8_e4m3_bits(y):
    """float32 y with |y| <= 448 -> float8_e4m3fn bit pattern (uint8), round to nearest even, as torch's cast."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # Normal e4m3 (|y| >= 2**-6): round the 23-bit mantissa to 3 bits (half to even), rebias exponent 127 -> 7.
    rounded = mag + 0x7FFFF + ((mag >> 20) & 1)
    normal = (rounded >> 20) - 960  # 960 = (127 - 7) << 3
    # Subnormal e4m3 (|y| < 2**-6): multiples of 2**-9; the fp32 adder rounds |y| * 2**9 half to even.
    sub = ((mag.to(tl.float32, bitcast=True) * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)
    return (tl.where(mag >= 0x3C800000, normal, sub) | sign).to(tl.uint8)  # 0x3C800000 = 2**-6


@triton.jit
def _fp8_scale(amax):
    """Per-row amax [R] -> (scale, 1 / scale), as torch_attention.quantize_fp8_torch: amax / 448, 1 if that is 0."""
    scale = amax * _FP8_INV_MAX
    scale = tl.where(scale > 0, scale, 1.0)
    return scale, tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _fp8_encode(x, inv):
    """x [R, C] fp32, inv [R] -> e4m3 codes [R, C] (uint8) of clamp(x * inv, -448, 448)."""
    return _fp8_e4m3_bits(tl.minimum(tl.maximum(x * inv[:, None], -_FP8_MAX), _FP8_MAX))


# ----------------------------------------------------------------------------------------------
# store_kvcache
# ----------------------------------------------------------------------------------------------

@triton.jit
def _store_fp8(cache_ptr,  # uint8 view of a float8_e4m3fn cache
               scale_ptr,  # [num_blocks, H_kv, block_size] fp32
               dst, sdst, x, head_ok):
    """Quantise x [HEADS, D] (fp32) per head; codes to cache_ptr + dst [HEADS, D], scales to scale_ptr + sdst."""
    scale, inv = _fp8_scale(tl.max(tl.abs(x), 1))
    tl.store(cache_ptr + dst, _fp8_encode(x, inv), mask=head_ok[:, None])
    tl.store(scale_ptr + sdst, scale, mask=head_ok)


@triton.jit
def _store_kvcache_kernel(key_ptr, value_ptr,      # [N, H_kv, D] strided rows / heads
                          k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, H_kv, D] (uint8 views when FP8)
                          slot_ptr,                  # [N] int; -1 = skip
                          k_scale_ptr, v_scale_ptr,  # [num_blocks, H_kv, block_size] fp32 (FP8 only)
                          stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_cblk, stride_cslot, stride_ch,             # k_cache strides (head_dim: 1)
                          stride_vblk, stride_vgrp, stride_vslot, stride_vch, stride_vd,  # _v_layout
                          stride_sblk, stride_sh,
                          NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          HEADS_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, V_BLOCK: tl.constexpr,
                          FP8: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    offs_h = tl.arange(0, HEADS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < tl.where(slot >= 0, NUM_KV_HEADS, 0))[:, None]  # slot -1: store nothing
    src_k = tok.to(tl.int64) * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = tok.to(tl.int64) * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    dst = (slot // BLOCK_SIZE) * stride_cblk + (slot % BLOCK_SIZE) * stride_cslot \
        + offs_h[:, None] * stride_ch + offs_d[None, :]
    vdst = (slot // BLOCK_SIZE) * stride_vblk + (slot % BLOCK_SIZE // V_BLOCK) * stride_vgrp \
        + (slot % V_BLOCK) * stride_vslot \
        + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vd
    k = tl.load(key_ptr + src_k, mask=mask)
    v = tl.load(value_ptr + src_v, mask=mask)
    if FP8:  # quantise per (token, head) in registers; scales beside the codes
        sdst = (slot // BLOCK_SIZE) * stride_sblk + offs_h * stride_sh + slot % BLOCK_SIZE
        head_ok = offs_h < tl.where(slot >= 0, NUM_KV_HEADS, 0)
        _store_fp8(k_cache_ptr, k_scale_ptr, dst, sdst, k.to(tl.float32), head_ok)
        _store_fp8(v_cache_ptr, v_scale_ptr, vdst, sdst, v.to(tl.float32), head_ok)
    else:
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + vdst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """Write key/value [N, num_kv_heads, head_dim] into cache slots slot_mapping [N]; slot -1 = skip.
    k_scale / v_scale given: float8_e4m3fn caches, quantised per (token, head) with the scales written too."""
    num_tokens, num_kv_heads, head_dim = key.shape
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    fp8 = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    if value.shape != key.shape or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"store_kvcache: key {tuple(key.shape)}, value {tuple(value.shape)}, "
                         f"slot_mapping {tuple(slot_mapping.shape)} do not match")
    if num_tokens == 0:
        return
    key, value = last_dim_contiguous(key), last_dim_contiguous(value)
    k_dst, v_dst, k_scale, v_scale = _kernel_cache_args(k_cache, v_cache, k_scale, v_scale, fp8)
    pdl = use_pdl(key)
    v_block, v_strides = _v_layout(v_cache)
    _store_kvcache_kernel[(num_tokens,)](
        key, value, k_dst, v_dst, slot_mapping, k_scale, v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *v_strides, k_scale.stride(0),
        k_scale.stride(1), NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_P2=triton.next_power_of_2(num_kv_heads),
        BLOCK_SIZE=k_cache.shape[1], V_BLOCK=v_block, FP8=fp8, **pdl_launch(pdl),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1)


def _kernel_cache_args(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                       v_scale: torch.Tensor | None, fp8: bool) -> tuple:
    """Caches as the store kernels write them (uint8 views of fp8 caches) and scale tensors (or stand-ins
    with 3 dims, never dereferenced, when the cache holds the model dtype)."""
    if fp8:
        return k_cache.view(torch.uint8), v_cache.view(torch.uint8), k_scale, v_scale
    return k_cache, v_cache, k_cache[0], v_cache[0]


# ----------------------------------------------------------------------------------------------
# Prefill: varlen causal attention, K/V always read through the block table
# ----------------------------------------------------------------------------------------------

# The block-table width changes every step, and the step's cu_seqlens / block-table slices are 16-byte aligned or
# not by chance: without these, bench.py compiled 3 more variants (4.3 s) inside its timed run. Scalar loads only.
@triton.jit(do_not_specialize=["stride_bt", "cu_q_ptr", "cu_k_ptr", "bt_ptr"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_q_ptr, cu_k_ptr, bt_ptr,
                    k_scale_ptr, v_scale_ptr,  # [num_blocks, H_kv, block_size] fp32 (FP8 only)
                    qk_scale,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_cblk, stride_cslot, stride_ch,             # k_cache strides (head_dim: 1)
                    stride_vblk, stride_vgrp, stride_vslot, stride_vch, stride_vd,  # _v_layout
                    stride_bt, stride_sblk, stride_sh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, TOKENS: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, ONE_PAGE: tl.constexpr,
                    NUM_STAGES: tl.constexpr, DOT_PREC: tl.constexpr, FP8: tl.constexpr,
                    KV_DTYPE: tl.constexpr, V_LIKE_K: tl.constexpr, V_BLOCK: tl.constexpr):
    # Tile = TOKENS query tokens x GROUP query heads (row r: token r // GROUP, head r % GROUP).
    m_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last) tiles first
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    k_len = tl.load(cu_k_ptr + b + 1) - tl.load(cu_k_ptr + b)
    m_start = m_tile * TOKENS
    shift = k_len - q_len  # bottom-right causal alignment

    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, TILE_N)
    tok = m_start + offs_r // GROUP
    head = kvh * GROUP + offs_r % GROUP
    row_ok = (offs_r < TOKENS * GROUP) & (tok < q_len)
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # [ROWS, D]
    q_pos = tok + shift  # last key each row may see

    # Keys [0, n_full) are visible to every row: no masks. [n_full, n_end): causal + length masks.
    active = m_start < q_len
    n_end = tl.where(active, tl.minimum(k_len, tl.minimum(m_start + TOKENS, q_len) + shift), 0)
    n_full = tl.minimum((tl.maximum(m_start + shift + 1, 0) // TILE_N) * TILE_N, n_end)

    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_ch
    v_head = v_cache_ptr + kvh * stride_vch
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    if FP8:  # same loops; tiles converted to KV_DTYPE, scales folded into scores and probabilities
        qc = q.to(KV_DTYPE)  # bf16 queries: fp8 converts to fp16 in hardware, so the dots run in fp16
        ks_head = k_scale_ptr + kvh * stride_sh
        vs_head = v_scale_ptr + kvh * stride_sh
        for start in tl.range(0, n_full, TILE_N, num_stages=NUM_STAGES):
            k, v, ks, vs = _fp8_tile(k_head, v_head, ks_head, vs_head, bt_row, start, offs_n, offs_d, k_len,
                                     qk_scale, KV_DTYPE, stride_cblk, stride_cslot, stride_vblk, stride_vgrp,
                                     stride_vslot, stride_vd, stride_sblk, BLOCK_SIZE, TILE_N, ONE_PAGE, False, V_BLOCK)
            qk = tl.dot(qc, tl.trans(k), input_precision=DOT_PREC) * ks[None, :]
            acc, m_i, l_i = _softmax_step_vscaled(acc, m_i, l_i, qk, v, vs, DOT_PREC)
        for start in tl.range(n_full, n_end, TILE_N, num_stages=NUM_STAGES):
            pos = start + offs_n
            k, v, ks, vs = _fp8_tile(k_head, v_head, ks_head, vs_head, bt_row, start, offs_n, offs_d, k_len,
                                     qk_scale, KV_DTYPE, stride_cblk, stride_cslot, stride_vblk, stride_vgrp,
                                     stride_vslot, stride_vd, stride_sblk, BLOCK_SIZE, TILE_N, ONE_PAGE, True, V_BLOCK)
            qk = tl.dot(qc, tl.trans(k), input_precision=DOT_PREC) * ks[None, :]
            visible = (pos[None, :] <= q_pos[:, None]) & (pos < k_len)[None, :]
            qk = tl.where(visible, qk, float("-inf"))
            acc, m_i, l_i = _softmax_step_vscaled(acc, m_i, l_i, qk, v, vs, DOT_PREC)
    else:
        for start in tl.range(0, n_full, TILE_N, num_stages=NUM_STAGES):
            rows, vrows = _page_rows(bt_row, start, offs_n, k_len, stride_cblk, stride_cslot, stride_vblk,
                                     stride_vgrp, stride_vslot, BLOCK_SIZE, TILE_N, ONE_PAGE, V_LIKE_K, V_BLOCK)
            k = tl.load(k_head + rows[:, None] + offs_d[None, :])
            v = tl.load(v_head + vrows[:, None] + offs_d[None, :] * stride_vd)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, v, DOT_PREC)
        for start in tl.range(n_full, n_end, TILE_N, num_stages=NUM_STAGES):
            pos = start + offs_n
            kv_ok = (pos < k_len)[:, None]
            rows, vrows = _page_rows(bt_row, start, offs_n, k_len, stride_cblk, stride_cslot, stride_vblk,
                                     stride_vgrp, stride_vslot, BLOCK_SIZE, TILE_N, ONE_PAGE, V_LIKE_K, V_BLOCK)
            k = tl.load(k_head + rows[:, None] + offs_d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(v_head + vrows[:, None] + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            visible = (pos[None, :] <= q_pos[:, None]) & (pos < k_len)[None, :]
            qk = tl.where(visible, qk, float("-inf"))
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, v, DOT_PREC)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _prefill_config(head_dim: int, elem_size: int, interpret: bool) -> dict:
    """Rows per tile (query tokens x group heads), KV tile length, warps and pipeline depth."""
    if interpret:
        return {"rows": 64, "tile_n": 32, "num_warps": 4, "num_stages": 1}
    if elem_size > 2:  # fp32: twice the shared memory per tile
        return {"rows": 64, "tile_n": 32, "num_warps": 4, "num_stages": 2}
    if head_dim <= 64:
        return {"rows": 128, "tile_n": 64, "num_warps": 4, "num_stages": 3}
    if head_dim <= 128:  # H100 sweep, 8x1024 / 4x4096 tokens: 248 / 359 TFLOP/s vs 212 / 317 for 128x64 w8 s3
        return {"rows": 64, "tile_n": 64, "num_warps": 4, "num_stages": 2}
    return {"rows": 64, "tile_n": 32, "num_warps": 8, "num_stages": 2}


def varlen_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, block_table: torch.Tensor,
                            softmax_scale: float, config: dict | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal varlen prefill. q [total_q, H, D] (row / head strides free); sequence i's keys are the first
    cu_seqlens_k[i+1] - cu_seqlens_k[i] tokens reached through block_table[i] (bottom-right causal).
    k_scale / v_scale: fp8 cache (see module doc). `config` overrides the tile choice (benchmarks only).
    Returns a new contiguous [total_q, H, D] tensor."""
    total_q, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    fp8 = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    group = _group_size(num_heads, num_kv_heads)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if block_table.dim() != 2 or block_table.shape[0] < num_seqs:
        raise ValueError(f"block_table shape {tuple(block_table.shape)} does not cover {num_seqs} sequences")
    q = last_dim_contiguous(q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if total_q == 0 or num_seqs == 0 or max_seqlen_q <= 0:
        return out
    cfg = config or _prefill_config(head_dim, q.element_size(), _interpreting(q))
    rows = max(cfg["rows"], triton.next_power_of_2(group))
    tokens = rows // group
    block_size = k_cache.shape[1]
    k_scale, v_scale = (k_scale, v_scale) if fp8 else (q, q)  # stand-ins, never read
    v_block, v_strides = _v_layout(v_cache)
    grid = (triton.cdiv(max_seqlen_q, tokens), num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q, cu_seqlens_k, block_table, k_scale, v_scale,
        softmax_scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *v_strides, block_table.stride(0),
        k_scale.stride(0), k_scale.stride(1),
        GROUP=group, HEAD_DIM=head_dim, ROWS=rows, TOKENS=tokens, BLOCK_SIZE=block_size,
        TILE_N=cfg["tile_n"], ONE_PAGE=block_size % cfg["tile_n"] == 0, NUM_STAGES=cfg["num_stages"],
        DOT_PREC=dot_precision(q), FP8=fp8, KV_DTYPE=_fp8_compute_dtype(q),
        V_LIKE_K=_v_like_k(k_cache, v_cache), V_BLOCK=v_block, num_warps=cfg["num_warps"])
    return out


# ----------------------------------------------------------------------------------------------
# Decode: split-K flash-decoding, split count chosen on the device
# ----------------------------------------------------------------------------------------------

@triton.jit
def _split_plan(ctx_len, max_splits, min_split_tiles, TILE_N: tl.constexpr):
    """(num_splits, tiles_per_split) for one sequence; no split is ever empty; >= 1 split."""
    num_tiles = tl.cdiv(ctx_len, TILE_N)
    want = tl.minimum(tl.maximum(num_tiles // min_split_tiles, 1), max_splits)
    per_split = tl.maximum(tl.cdiv(num_tiles, want), 1)
    num_splits = tl.maximum(tl.cdiv(num_tiles, per_split), 1)
    return num_splits, per_split


@triton.jit(do_not_specialize=["stride_bt", "max_splits", "ctx_ptr", "bt_ptr", "order_ptr"])  # see _prefill_kernel
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_o_ptr, part_lse_ptr,
                   ctx_ptr, bt_ptr,
                   order_ptr,  # [B] int32: sequences longest first (read only when ORDERED)
                   k_scale_ptr, v_scale_ptr,  # [num_blocks, H_kv, block_size] fp32 (FP8 only)
                   qk_scale,
                   stride_qb, stride_qh, stride_ob, stride_oh,
                   stride_cblk, stride_cslot, stride_ch,             # k_cache strides (head_dim: 1)
                   stride_vblk, stride_vgrp, stride_vslot, stride_vch, stride_vd,  # _v_layout
                   stride_bt, stride_sblk, stride_sh,
                   max_splits, min_split_tiles,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, ONE_PAGE: tl.constexpr,
                   NUM_STAGES: tl.constexpr, DOT_PREC: tl.constexpr, FP8: tl.constexpr,
                   KV_DTYPE: tl.constexpr, V_LIKE_K: tl.constexpr, V_BLOCK: tl.constexpr, ORDERED: tl.constexpr,
                   USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)
    if ORDERED:
        # Longest sequences first: programs start in grid order (axis 0 fastest), so program (i, j) takes KV head
        # r % H_kv of the r-th longest sequence, r = j * B + i: the long ones start early instead of forming a tail.
        r = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        b = tl.load(order_ptr + r // tl.num_programs(1))
        kvh = r % tl.num_programs(1)
    else:
        b = tl.program_id(0)
        kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(ctx_ptr + b)
    num_splits, per_split = _split_plan(ctx_len, max_splits, min_split_tiles, TILE_N)
    num_tiles = tl.cdiv(ctx_len, TILE_N)
    tile_lo = tl.minimum(split * per_split, num_tiles)
    tile_hi = tl.minimum(tile_lo + per_split, num_tiles)

    offs_g = tl.arange(0, GROUP_PAD)  # query heads of this KV head, padded to >= 16 rows for tl.dot
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, TILE_N)
    g_ok = offs_g < GROUP
    head = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)  # [GROUP_PAD, D]

    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_ch
    v_head = v_cache_ptr + kvh * stride_vch
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    if FP8:  # tiles converted to KV_DTYPE, scales folded into scores and probabilities
        qc = q.to(KV_DTYPE)  # bf16 queries: fp8 converts to fp16 in hardware, so the dots run in fp16
        ks_head = k_scale_ptr + kvh * stride_sh
        vs_head = v_scale_ptr + kvh * stride_sh
        for t in tl.range(tile_lo, tile_hi, num_stages=NUM_STAGES):  # one pipelined loop, the partial tile too
            start = t * TILE_N
            k, v, ks, vs = _fp8_tile(k_head, v_head, ks_head, vs_head, bt_row, start, offs_n, offs_d, ctx_len,
                                     qk_scale, KV_DTYPE, stride_cblk, stride_cslot, stride_vblk, stride_vgrp,
                                     stride_vslot, stride_vd, stride_sblk, BLOCK_SIZE, TILE_N, ONE_PAGE, True, V_BLOCK)
            qk = tl.dot(qc, tl.trans(k), input_precision=DOT_PREC) * ks[None, :]
            qk = tl.where((start + offs_n < ctx_len)[None, :], qk, float("-inf"))
            acc, m_i, l_i = _softmax_step_vscaled(acc, m_i, l_i, qk, v, vs, DOT_PREC)
    else:
        for t in tl.range(tile_lo, tile_hi, num_stages=NUM_STAGES):
            start = t * TILE_N
            pos = start + offs_n
            kv_ok = (pos < ctx_len)[:, None]
            rows, vrows = _page_rows(bt_row, start, offs_n, ctx_len, stride_cblk, stride_cslot, stride_vblk,
                                     stride_vgrp, stride_vslot, BLOCK_SIZE, TILE_N, ONE_PAGE, V_LIKE_K, V_BLOCK)
            k = tl.load(k_head + rows[:, None] + offs_d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(v_head + vrows[:, None] + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            qk = tl.where((pos < ctx_len)[None, :], qk, float("-inf"))
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, v, DOT_PREC)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # context_len 0 -> zeros
    # Scalar conditions folded into row limits: one split -> split 0 writes the output directly.
    direct_rows = tl.where(num_splits == 1, tl.where(split == 0, GROUP, 0), 0)
    o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=(offs_g < direct_rows)[:, None])
    # Partials: [B, H, max_splits, D] fp32 (normalized) and LSE [B, H, max_splits] in the log2 domain.
    part_row = (b.to(tl.int64) * tl.num_programs(1) * GROUP + head) * max_splits + split
    keep = offs_g < tl.where(num_splits > 1, tl.where(split < num_splits, GROUP, 0), 0)
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(part_o_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=keep[:, None])
    tl.store(part_lse_ptr + part_row, lse, mask=keep)


@triton.jit(do_not_specialize=["ctx_ptr"])
def _decode_merge_kernel(out_ptr, part_o_ptr, part_lse_ptr, ctx_ptr, stride_ob, stride_oh,
                         max_splits, min_split_tiles,
                         HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr, TILE_N: tl.constexpr,
                         USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_splits, _ = _split_plan(tl.load(ctx_ptr + b), max_splits, min_split_tiles, TILE_N)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < tl.where(num_splits > 1, num_splits, 0)
    base = (b.to(tl.int64) * tl.num_programs(1) + h) * max_splits
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # masked splits -> weight 0
    parts = tl.load(part_o_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None], other=0.0)
    denom = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=offs_d < tl.where(num_splits > 1, HEAD_DIM, 0))


def _decode_config(q: torch.Tensor, num_kv_heads: int, head_dim: int, fp8: bool = False) -> dict:
    """Tile/warp choice plus the split cap, which depends only on the batch size (graph safe); "maxnreg" (optional,
    CUDA only) caps registers per thread."""
    batch = q.shape[0]
    if _interpreting(q):
        return {"tile_n": 32, "num_warps": 4, "num_stages": 1, "max_splits": 4, "min_split_tiles": 1}
    sms = cuda_sm_count(q.device)
    target = 2 * sms  # programs wanted; split only when batch x kv_heads is short of it (H100-tuned)
    max_splits = min(32, triton.next_power_of_2(triton.cdiv(target, batch * num_kv_heads)))
    # Latency-bound batches (fewer programs than SMs) split down to one tile per program; others keep >= 4 tiles.
    small = batch * num_kv_heads < sms
    min_split_tiles = 1 if small else 4
    tile_n = 64 if head_dim <= 128 else 32
    stages = 2
    if fp8 and not small and head_dim <= 128:  # H100 sweep (attention_bench --kv-dtype fp8 --sweep): 128 x 2 stages
        tile_n, stages = 128, 2  # (3 stages: 0.2-0.6 points lower at every swept shape, and 2 programs/SM, not 3)
    return {"tile_n": tile_n, "num_warps": 4, "num_stages": stages, "max_splits": max_splits,
            "min_split_tiles": min_split_tiles}


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            context_lens: torch.Tensor, block_table: torch.Tensor,
                            softmax_scale: float, config: dict | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None, order: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention: q [B, H, D], one query per sequence over its context_lens[i] cached tokens
    through block_table[i]. Rows with context length 0 give zeros. No host syncs: CUDA-graph safe.
    k_scale / v_scale: fp8 cache (see module doc). `config` overrides the tile/split choice (benchmarks only).
    order: [B] int32, a permutation of the rows, longest context first (decode_order); the programs of long
    sequences then start first and the kernel has no tail of them (the result does not depend on it)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    fp8 = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    group = _group_size(num_heads, num_kv_heads)
    if context_lens.shape != (batch,) or block_table.dim() != 2 or block_table.shape[0] < batch:
        raise ValueError(f"decode: context_lens {tuple(context_lens.shape)} / block_table "
                         f"{tuple(block_table.shape)} do not match batch {batch}")
    if order is not None and (order.shape != (batch,) or order.dtype != torch.int32 or order.device != q.device):
        raise ValueError(f"decode: order must be a [{batch}] int32 tensor on {q.device} (a permutation of the "
                         f"rows), got {tuple(order.shape)} {order.dtype} on {order.device}")
    q = last_dim_contiguous(q)
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    cfg = config or _decode_config(q, num_kv_heads, head_dim, fp8)
    max_splits = cfg["max_splits"]
    if max_splits > 1:
        part_o = torch.empty((batch, num_heads, max_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, max_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # never written: every row takes the direct path
    block_size = k_cache.shape[1]
    k_scale, v_scale = (k_scale, v_scale) if fp8 else (q, q)  # stand-ins, never read
    v_block, v_strides = _v_layout(v_cache)
    pdl = use_pdl(q)
    _decode_kernel[(batch, num_kv_heads, max_splits)](
        q, k_cache, v_cache, out, part_o, part_lse, context_lens, block_table,
        order if order is not None else context_lens, k_scale, v_scale,
        softmax_scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *v_strides, block_table.stride(0),
        k_scale.stride(0), k_scale.stride(1),
        max_splits, cfg["min_split_tiles"],
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE_N=cfg["tile_n"], ONE_PAGE=block_size % cfg["tile_n"] == 0,
        NUM_STAGES=cfg["num_stages"], DOT_PREC=dot_precision(q), FP8=fp8, KV_DTYPE=_fp8_compute_dtype(q),
        V_LIKE_K=_v_like_k(k_cache, v_cache), V_BLOCK=v_block, ORDERED=order is not None,
        **pdl_launch(pdl),
        num_warps=cfg["num_warps"],
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}))
    if max_splits > 1:
        _decode_merge_kernel[(batch, num_heads)](
            out, part_o, part_lse, context_lens, out.stride(0), out.stride(1),
            max_splits, cfg["min_split_tiles"],
            HEAD_DIM=head_dim, SPLITS_P2=triton.next_power_of_2(max_splits), TILE_N=cfg["tile_n"],
            **pdl_launch(pdl), num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# Host helpers
# ----------------------------------------------------------------------------------------------

def _fp8_compute_dtype(q: torch.Tensor) -> tl.dtype:
    """Dot operand type for fp8 K/V tiles: fp16 for bf16 queries (e4m3 -> fp16 is one hardware conversion and fp16
    keeps more of q's mantissa), else q's own type (fp32 / fp16, e.g. in the interpreter)."""
    return {torch.bfloat16: tl.float16, torch.float16: tl.float16, torch.float32: tl.float32}[q.dtype]


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _group_size(num_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    return num_heads // num_kv_heads


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    _check_cache_layout(k_cache, v_cache, num_kv_heads, head_dim)
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim {head_dim} must be a power of two in 16..256")


def _v_like_k(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    return v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()


def _v_layout(v_cache: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """(V_BLOCK, strides (block, run, slot, head, dim)) of a v_cache [blocks, block_size, H, D] (one run per block:
    the run stride is never used) or [blocks, block_size / G, G, H, D] (runs of G tokens)."""
    if v_cache.dim() == 4:
        s_blk, s_slot, s_h, s_d = v_cache.stride()
        return v_cache.shape[1], (s_blk, 0, s_slot, s_h, s_d)
    return v_cache.shape[2], v_cache.stride()


def _check_cache_layout(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    """k_cache [num_blocks, block_size, num_kv_heads, head_dim] with head_dim contiguous; v_cache the same or split
    into runs of G tokens ([num_blocks, block_size / G, G, ...]), with a contiguous head_dim or token dim (the
    token-contiguous layout of the engine's fp8 V cache, torch_attention.new_kv_cache)."""
    v_shape = v_cache.shape if v_cache.dim() != 5 else (v_cache.shape[0], v_cache.shape[1] * v_cache.shape[2],
                                                         *v_cache.shape[3:])
    if k_cache.dim() != 4 or v_cache.dim() not in (4, 5) or k_cache.shape != v_shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
                         "[num_blocks, block_size, num_kv_heads, head_dim] (v_cache: or [num_blocks, block_size / G, "
                         "G, num_kv_heads, head_dim])")
    if k_cache.shape[2] != num_kv_heads or k_cache.shape[3] != head_dim:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match num_kv_heads {num_kv_heads}, "
                         f"head_dim {head_dim}")
    token_dim = 1 if v_cache.dim() == 4 else 2
    if k_cache.stride(3) != 1 or 1 not in (v_cache.stride(-1), v_cache.stride(token_dim)):
        raise ValueError(f"k_cache strides {k_cache.stride()} need a contiguous head_dim; v_cache strides "
                         f"{v_cache.stride()} a contiguous head_dim or token dim")
