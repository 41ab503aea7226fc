"""Mixture-of-experts FFN: routing, a fused Triton MoE kernel and its plain torch reference.

Layout (this rank's shard of the intermediate size I; the caller all-reduces the output under TP):
  w13 [E, 2I, H]: per expert, the gate rows then the up rows (a merged gate_up projection)
  w2  [E, H, I]:  per expert, the down projection
  topk_ids / topk_weights [T, K]: the K experts of each token and their routing weights

out[t] = sum_k topk_weights[t, k] * (silu(x_t W_gate^T) * (x_t W_up^T)) W_down^T, experts topk_ids[t, k].
A slot is one (token, k) pair, numbered t * K + k. Slots whose expert id lies outside [0, E) contribute
nothing (a caller can mark experts it does not hold with -1).

The Triton path (fused_moe), all on the GPU with no host syncs (CUDA-graph safe for a fixed T):
  1. moe_align_block_size: slots grouped by expert, each expert's group padded to BLOCK_M rows;
  2. one grouped-GEMM launch for gate_up, SiLU-and-mul in its epilogue -> act [T*K, I];
  3. one grouped-GEMM launch for down, times the routing weight in its epilogue -> y [T*K, H];
  4. a sum over each token's K slots in float32 -> out [T, H].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nanovllm.kernels.launch import dot_precision, last_dim_contiguous

# M = T*K slots at or below this: the alignment runs as one program (one launch, the decode case).
ALIGN_ONE_PROGRAM_MAX = 4096
_ALIGN_CHUNK = 1024  # slots per program step in the alignment kernels
_PLAN_BLOCKS = 64  # blocks per step when writing the block -> expert table


# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------

def route_topk(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE routing, op for op as HF's Qwen3MoeTopKRouter: softmax in float32 over experts, top-k,
    renormalise over the k when norm_topk_prob, then round to the logits' dtype (HF hands the experts
    weights in that dtype). Returns (topk_weights [T, K] float32, topk_ids [T, K] int32)."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [num_tokens, num_experts], got {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k {top_k} must be in 1..num_experts ({num_experts})")
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    topk_weights = topk_weights.to(router_logits.dtype).to(torch.float32)
    return topk_weights, topk_ids.to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Torch reference (the CPU path)
# ----------------------------------------------------------------------------------------------

def fused_moe_torch(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference MoE: one dense pass per expert that has tokens, float32 math, output in the input dtype."""
    num_tokens, hidden, num_experts, inter, top_k = _check_moe_args(hidden_states, w13, w2, topk_weights, topk_ids)
    out = _check_out(out, hidden_states)
    flat_ids = topk_ids.reshape(-1).long()  # [T*K], slot t*K+k
    valid = (flat_ids >= 0) & (flat_ids < num_experts)
    order = torch.argsort(torch.where(valid, flat_ids, num_experts), stable=True)  # slots grouped by expert
    counts = torch.bincount(flat_ids[valid], minlength=num_experts).tolist()
    flat_weights = topk_weights.reshape(-1).float()
    acc = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=hidden_states.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start:start + count]
        start += count
        tokens = slots // top_k
        gate_up = hidden_states[tokens].float() @ w13[expert].float().t()  # [n, 2I]
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = act @ w2[expert].float().t()  # [n, H]
        acc.index_add_(0, tokens, y * flat_weights[slots, None])
    out.copy_(acc)
    return out


# ----------------------------------------------------------------------------------------------
# Tile configs (chosen on the host from shapes only: fixed per T, so safe inside CUDA graphs)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemmTile:
    """One grouped GEMM's tile: output columns per program, reduction step, warps, pipeline depth."""
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoeConfig:
    """block_m: slot rows per tile (experts' groups are padded to it); gate_up.block_n counts intermediate
    columns (the program computes that many gate and as many up columns)."""
    block_m: int
    gate_up: GemmTile
    down: GemmTile


def moe_config(num_tokens: int, top_k: int, num_experts: int, interpret: bool = False) -> MoeConfig:
    """Tiles keyed on the mean number of slots per expert (T*K/E). Starting points from vLLM's H100 tables
    for E=128, I=768 (decode: 16-row tiles; prefill: 128-row tiles); benchmarks/moe_bench.py --sweep re-tunes."""
    if interpret:
        return MoeConfig(16, GemmTile(16, 16, 4, 1), GemmTile(16, 16, 4, 1))
    per_expert = num_tokens * top_k / max(num_experts, 1)
    if per_expert <= 1:  # T <= 16 on 30B-A3B: many narrow programs to keep every SM streaming weights
        return MoeConfig(16, GemmTile(32, 128, 4, 4), GemmTile(64, 128, 4, 4))
    if per_expert <= 8:  # T <= 128
        return MoeConfig(16, GemmTile(64, 128, 4, 3), GemmTile(128, 128, 4, 3))
    if per_expert <= 16:  # T <= 256
        return MoeConfig(32, GemmTile(64, 128, 4, 3), GemmTile(128, 128, 4, 3))
    if per_expert <= 48:  # T <= 768
        return MoeConfig(64, GemmTile(64, 64, 4, 4), GemmTile(128, 64, 4, 4))
    return MoeConfig(128, GemmTile(128, 64, 8, 4), GemmTile(256, 64, 8, 4))


# ----------------------------------------------------------------------------------------------
# Alignment: slots grouped by expert, padded to BLOCK_M (moe_align_block_size)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _chunk_ids(ids_ptr, start, num_slots, num_experts, CHUNK: tl.constexpr):
    """Slot numbers [CHUNK], their expert ids (int32) and whether the id is one of ours."""
    slots = start + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1).to(tl.int32)
    return slots, ids, (ids >= 0) & (ids < num_experts)


@triton.jit
def _align_plan(counts, sorted_ptr, block_expert_ptr, num_post_ptr, cursor_ptr, num_slots, num_experts,
                max_blocks, BLOCK_M: tl.constexpr, E_P2: tl.constexpr, PLAN_BLOCKS: tl.constexpr):
    """From per-expert slot counts [E_P2]: padded group starts (-> cursor), the block -> expert table,
    the padded total, and the pad entries (= num_slots) at the tail of each expert's last block."""
    offs_e = tl.arange(0, E_P2)
    e_ok = offs_e < num_experts
    padded = tl.where(e_ok, tl.cdiv(counts, BLOCK_M) * BLOCK_M, 0)
    pend = tl.cumsum(padded, 0)  # [E_P2] end of each expert's padded group
    pstart = pend - padded
    tl.store(num_post_ptr, tl.sum(padded, 0))
    tl.store(cursor_ptr + offs_e, pstart, mask=e_ok)
    # Block b belongs to the expert whose padded group covers row b*BLOCK_M: count the groups ending at/before it.
    for b0 in range(0, max_blocks, PLAN_BLOCKS):
        offs_b = b0 + tl.arange(0, PLAN_BLOCKS)
        before = (pend[None, :] <= offs_b[:, None] * BLOCK_M) & e_ok[None, :]  # [PLAN_BLOCKS, E_P2]
        expert = tl.minimum(tl.sum(before.to(tl.int32), 1), num_experts - 1)  # blocks past the end: never run
        tl.store(block_expert_ptr + offs_b, expert, mask=offs_b < max_blocks)
    # Pads: rows [pstart + count, pend) of each group.
    offs_j = tl.arange(0, BLOCK_M)
    pad_pos = (pstart + counts)[:, None] + offs_j[None, :]  # [E_P2, BLOCK_M]
    pad_ok = offs_j[None, :] < (padded - counts)[:, None]
    tl.store(sorted_ptr + pad_pos, tl.full([E_P2, BLOCK_M], 0, tl.int32) + num_slots, mask=pad_ok & e_ok[:, None])


@triton.jit
def _align_scatter(ids_ptr, sorted_ptr, cursor_ptr, start, num_slots, num_experts, CHUNK: tl.constexpr):
    """Place one chunk of slots: each takes the next free row of its expert's group."""
    slots, ids, ok = _chunk_ids(ids_ptr, start, num_slots, num_experts, CHUNK)
    pos = tl.atomic_add(cursor_ptr + ids, 1, mask=ok)
    tl.store(sorted_ptr + pos, slots, mask=ok)


@triton.jit
def _align_one_program_kernel(ids_ptr,  # [M] expert id of each slot, int32/int64
                              sorted_ptr,  # [max_blocks * BLOCK_M] int32 out: slots grouped by expert
                              block_expert_ptr,  # [max_blocks] int32 out
                              num_post_ptr,  # [1] int32 out: padded row count
                              cursor_ptr,  # [E] int32 scratch
                              num_slots, num_experts, max_blocks,
                              BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr,
                              PLAN_BLOCKS: tl.constexpr):
    # 1. Per-expert counts, 2. the plan, 3. scatter (after the cursor stores are visible to every thread).
    counts = tl.zeros([E_P2], tl.int32)
    for start in range(0, num_slots, CHUNK):
        _, ids, ok = _chunk_ids(ids_ptr, start, num_slots, num_experts, CHUNK)
        counts += tl.histogram(ids, E_P2, mask=ok)
    _align_plan(counts, sorted_ptr, block_expert_ptr, num_post_ptr, cursor_ptr, num_slots, num_experts,
                max_blocks, BLOCK_M, E_P2, PLAN_BLOCKS)
    tl.debug_barrier()
    for start in range(0, num_slots, CHUNK):
        _align_scatter(ids_ptr, sorted_ptr, cursor_ptr, start, num_slots, num_experts, CHUNK)


@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, num_slots, num_experts, E_P2: tl.constexpr, CHUNK: tl.constexpr):
    _, ids, ok = _chunk_ids(ids_ptr, tl.program_id(0) * CHUNK, num_slots, num_experts, CHUNK)
    offs_e = tl.arange(0, E_P2)
    tl.atomic_add(counts_ptr + offs_e, tl.histogram(ids, E_P2, mask=ok), mask=offs_e < num_experts)


@triton.jit
def _align_plan_kernel(counts_ptr, sorted_ptr, block_expert_ptr, num_post_ptr, cursor_ptr, num_slots,
                       num_experts, max_blocks, BLOCK_M: tl.constexpr, E_P2: tl.constexpr,
                       PLAN_BLOCKS: tl.constexpr):
    offs_e = tl.arange(0, E_P2)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0)
    _align_plan(counts, sorted_ptr, block_expert_ptr, num_post_ptr, cursor_ptr, num_slots, num_experts,
                max_blocks, BLOCK_M, E_P2, PLAN_BLOCKS)


@triton.jit
def _align_scatter_kernel(ids_ptr, sorted_ptr, cursor_ptr, num_slots, num_experts, CHUNK: tl.constexpr):
    _align_scatter(ids_ptr, sorted_ptr, cursor_ptr, tl.program_id(0) * CHUNK, num_slots, num_experts, CHUNK)


def max_num_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the padded blocks: sum_e ceil(n_e / B) <= M // B + (experts with any slot)."""
    return num_slots // block_m + min(num_experts, num_slots)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                         one_program_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the T*K slots by expert. Returns
      sorted_ids [max_blocks * block_m] int32: expert 0's slots, padded with T*K to a multiple of block_m,
        then expert 1's, ...; entries past num_post are unset;
      block_expert [max_blocks] int32: the expert of each block (blocks at or past num_post // block_m unused);
      num_post [1] int32: rows in use (a multiple of block_m).
    Slots of one expert keep no particular order. No host syncs. Up to one_program_max slots (default
    ALIGN_ONE_PROGRAM_MAX) the work is one launch; beyond, a count / plan / scatter sequence."""
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m {block_m} must be a power of two")
    device = topk_ids.device
    flat_ids = topk_ids.reshape(-1)  # [M]
    num_slots = flat_ids.numel()
    max_blocks = max_num_blocks(num_slots, num_experts, block_m)
    sorted_ids = _alloc((max(max_blocks, 1) * block_m,), torch.int32, device)
    block_expert = _alloc((max(max_blocks, 1),), torch.int32, device)
    num_post = _alloc((1,), torch.int32, device)
    cursor = _alloc((num_experts,), torch.int32, device)
    e_p2 = max(triton.next_power_of_2(num_experts), 2)
    common = {"BLOCK_M": block_m, "E_P2": e_p2, "PLAN_BLOCKS": _PLAN_BLOCKS}
    if num_slots <= (ALIGN_ONE_PROGRAM_MAX if one_program_max is None else one_program_max):
        _align_one_program_kernel[(1,)](flat_ids, sorted_ids, block_expert, num_post, cursor,
                                        num_slots, num_experts, max_blocks, CHUNK=_ALIGN_CHUNK, **common,
                                        num_warps=8)
        return sorted_ids, block_expert, num_post
    counts = torch.zeros((num_experts,), dtype=torch.int32, device=device)
    grid = (triton.cdiv(num_slots, _ALIGN_CHUNK),)
    _align_count_kernel[grid](flat_ids, counts, num_slots, num_experts, E_P2=e_p2, CHUNK=_ALIGN_CHUNK,
                              num_warps=8)
    _align_plan_kernel[(1,)](counts, sorted_ids, block_expert, num_post, cursor, num_slots, num_experts,
                             max_blocks, **common, num_warps=8)
    _align_scatter_kernel[grid](flat_ids, sorted_ids, cursor, num_slots, num_experts, CHUNK=_ALIGN_CHUNK,
                                num_warps=8)
    return sorted_ids, block_expert, num_post


# ----------------------------------------------------------------------------------------------
# Grouped GEMMs: one program = BLOCK_M rows of one expert's group x BLOCK_N output columns
# ----------------------------------------------------------------------------------------------

@triton.jit
def _tile_rows(sorted_ptr, block_expert_ptr, pid_m, num_slots, BLOCK_M: tl.constexpr):
    """The tile's slots [BLOCK_M] (pads clamped to slot 0, never stored), their mask and the expert."""
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = slots < num_slots
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    return tl.where(row_ok, slots, 0).to(tl.int64), row_ok, expert


@triton.jit
def _gate_up_kernel(x_ptr,  # [T, H] hidden states
                    w13_ptr,  # [E, 2I, H]: gate rows [0, I), up rows [I, 2I)
                    act_ptr,  # [M, I] out: silu(gate) * up per slot (row = slot)
                    sorted_ptr,  # [max_blocks * BLOCK_M] int32 slots grouped by expert
                    block_expert_ptr,  # [max_blocks] int32
                    num_post_ptr,  # [1] int32 padded rows in use
                    num_slots, hidden, inter,
                    stride_xt, stride_we, stride_wn, stride_at,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)  # fastest: neighbouring programs share a weight tile (L2)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    slots, row_ok, expert = _tile_rows(sorted_ptr, block_expert_ptr, pid_m, num_slots, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Columns past I wrap to valid rows (loads stay in bounds, no N masks); they are never stored.
    w_rows = (offs_n % inter).to(tl.int64)
    a_ptrs = x_ptr + (slots // TOP_K)[:, None] * stride_xt + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    g_ptrs = w13_ptr + expert * stride_we + w_rows[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # Step: one A tile shared by the gate and the up dot.
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = offs_k < hidden - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    # Epilogue: SiLU(gate) * up in float32.
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    out_ptrs = act_ptr + slots[:, None] * stride_at + offs_n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < inter)[None, :])


@triton.jit
def _down_kernel(act_ptr,  # [M, I] per-slot activations
                 w2_ptr,  # [E, H, I]
                 y_ptr,  # [M, H] out: per-slot expert output times its routing weight
                 weights_ptr,  # [M] float32 routing weights
                 sorted_ptr,  # [max_blocks * BLOCK_M] int32
                 block_expert_ptr,  # [max_blocks] int32
                 num_post_ptr,  # [1] int32
                 num_slots, hidden, inter,
                 stride_at, stride_we, stride_wn, stride_yt,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    slots, row_ok, expert = _tile_rows(sorted_ptr, block_expert_ptr, pid_m, num_slots, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = (offs_n % hidden).to(tl.int64)
    a_ptrs = act_ptr + slots[:, None] * stride_at + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = w2_ptr + expert * stride_we + w_rows[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < inter - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    # Epilogue: scale each row by its slot's routing weight.
    acc *= tl.load(weights_ptr + slots)[:, None]
    out_ptrs = y_ptr + slots[:, None] * stride_yt + offs_n[None, :]
    tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < hidden)[None, :])


@triton.jit
def _sum_slots_kernel(y_ptr,  # [T*K, H] per-slot outputs
                      ids_ptr,  # [T*K] expert ids
                      out_ptr,  # [T, H]
                      hidden, num_experts, stride_yt, stride_ot,
                      TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H], tl.float32)
    for k in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + k)
        limit = tl.where((e >= 0) & (e < num_experts), hidden, 0)  # other experts' slots were never written
        y = tl.load(y_ptr + (t * TOP_K + k) * stride_yt + offs_h, mask=offs_h < limit, other=0.0)
        acc += y.to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs_h, acc.to(out_ptr.dtype.element_ty), mask=offs_h < hidden)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def fused_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              out: torch.Tensor | None = None, config: MoeConfig | None = None) -> torch.Tensor:
    """Triton MoE (see the module docstring). hidden_states [T, H]; w13 [E, 2I, H]; w2 [E, H, I];
    topk_weights [T, K] (float32); topk_ids [T, K] int32/int64. Returns out [T, H] in the input dtype.
    No host syncs. `config` overrides the tile choice (benchmarks only)."""
    num_tokens, hidden, num_experts, inter, top_k = _check_moe_args(hidden_states, w13, w2, topk_weights, topk_ids)
    out = _check_out(out, hidden_states)
    if num_tokens == 0:
        return out
    interpret = hidden_states.device.type == "cpu"
    cfg = config or moe_config(num_tokens, top_k, num_experts, interpret)
    hidden_states, w13, w2 = (last_dim_contiguous(t) for t in (hidden_states, w13, w2))
    flat_ids = topk_ids.reshape(-1).contiguous()  # [M]
    flat_weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [M]
    plan = moe_align_block_size(flat_ids, num_experts, cfg.block_m)
    act = _gate_up(hidden_states, w13, plan, top_k, inter, cfg)  # [M, I]
    y = _down(act, w2, flat_weights, plan, hidden, cfg)  # [M, H]
    _sum_slots(y, flat_ids, out, num_experts, top_k)
    return out


def _gate_up(hidden_states: torch.Tensor, w13: torch.Tensor, plan: tuple, top_k: int, inter: int,
             cfg: MoeConfig) -> torch.Tensor:
    sorted_ids, block_expert, num_post = plan
    num_slots = hidden_states.shape[0] * top_k
    hidden = hidden_states.shape[1]
    act = _alloc((num_slots, inter), hidden_states.dtype, hidden_states.device)
    tile = cfg.gate_up
    grid = (block_expert.numel(), triton.cdiv(inter, tile.block_n))
    _gate_up_kernel[grid](
        hidden_states, w13, act, sorted_ids, block_expert, num_post, num_slots, hidden, inter,
        hidden_states.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, BLOCK_M=cfg.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        EVEN_K=hidden % tile.block_k == 0, DOT_PREC=dot_precision(hidden_states),
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return act


def _down(act: torch.Tensor, w2: torch.Tensor, flat_weights: torch.Tensor, plan: tuple, hidden: int,
          cfg: MoeConfig) -> torch.Tensor:
    sorted_ids, block_expert, num_post = plan
    num_slots, inter = act.shape
    y = _alloc((num_slots, hidden), act.dtype, act.device)
    tile = cfg.down
    grid = (block_expert.numel(), triton.cdiv(hidden, tile.block_n))
    _down_kernel[grid](
        act, w2, y, flat_weights, sorted_ids, block_expert, num_post, num_slots, hidden, inter,
        act.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        EVEN_K=inter % tile.block_k == 0, DOT_PREC=dot_precision(act),
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return y


def _sum_slots(y: torch.Tensor, flat_ids: torch.Tensor, out: torch.Tensor, num_experts: int, top_k: int) -> None:
    num_tokens, hidden = out.shape
    block_h = min(1024, triton.next_power_of_2(hidden))
    _sum_slots_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, flat_ids, out, hidden, num_experts, y.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK_H=block_h, num_warps=4)


def _alloc(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scratch buffers (tests swap this for a poisoning allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_out(out: torch.Tensor | None, hidden_states: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)
    if out.shape != hidden_states.shape or out.dtype != hidden_states.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must match hidden_states "
                         f"{tuple(hidden_states.shape)} {hidden_states.dtype} with a contiguous last dim")
    return out


def _check_moe_args(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate shapes/dtypes; returns (T, H, E, I, K)."""
    if hidden_states.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expected hidden_states [T, H], w13 [E, 2I, H], w2 [E, H, I]; got "
                         f"{tuple(hidden_states.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    num_tokens, hidden = hidden_states.shape
    num_experts, two_inter, w13_hidden = w13.shape
    inter = two_inter // 2
    if two_inter % 2 or w13_hidden != hidden or tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(f"w13 {tuple(w13.shape)} must be [E, 2I, H={hidden}] and w2 {tuple(w2.shape)} "
                         f"[E, H, I] with the same E and I")
    if w13.dtype != hidden_states.dtype or w2.dtype != hidden_states.dtype:
        raise ValueError(f"w13 {w13.dtype} / w2 {w2.dtype} must have hidden_states' dtype {hidden_states.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                         f"must both be [T={num_tokens}, K]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids dtype {topk_ids.dtype} must be int32 or int64")
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights dtype {topk_weights.dtype} must be floating point (float32)")
    top_k = topk_ids.shape[1]
    if num_experts < 1 or inter < 1 or top_k < 1:
        raise ValueError(f"need at least one expert, intermediate column and top-k slot "
                         f"(E={num_experts}, I={inter}, K={top_k})")
    return num_tokens, hidden, num_experts, inter, top_k
