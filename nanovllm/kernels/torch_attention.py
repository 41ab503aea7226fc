"""Pure-torch paged attention: the reference every faster backend is tested against.

Cache layout (per layer): k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads, head_dim].
Slot s lives at block s // block_size, offset s % block_size.
"""
import torch


def store_kvcache_torch(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """Write key/value [N, num_kv_heads, head_dim] into their cache slots; slot -1 means skip."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[valid].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[valid].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, seqlen_k: int) -> torch.Tensor:
    """Keys (or values) of one sequence read through its block table: [seqlen_k, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (seqlen_k + block_size - 1) // block_size
    blocks = block_table_row[:num_blocks].long()
    return cache[blocks].flatten(0, 1)[:seqlen_k]  # [num_blocks * block_size, H_kv, D] -> [seqlen_k, H_kv, D]


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [Lq, H, D] over k, v [Lk, H_kv, D], bottom-right aligned; fp32 math."""
    lq, num_heads, _ = q.shape
    lk, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.float().repeat_interleave(group, dim=1)  # [Lk, H, D]
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [H, Lq, Lk]
    q_pos = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
    k_pos = torch.arange(lk, device=q.device)[None, :]
    scores.masked_fill_(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def varlen_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           block_table: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Prefill: q [total_q, H, D] packed by cu_seqlens_q; keys of sequence i are the first
    cu_seqlens_k[i+1] - cu_seqlens_k[i] tokens reached through block_table[i]."""
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        seqlen_k = ck[i + 1] - ck[i]
        k = gather_kv(k_cache, block_table[i], seqlen_k)
        v = gather_kv(v_cache, block_table[i], seqlen_k)
        out[cq[i]:cq[i + 1]] = attend_one(q[cq[i]:cq[i + 1]], k, v, softmax_scale)
    return out


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           context_lens: torch.Tensor, block_table: torch.Tensor,
                           softmax_scale: float) -> torch.Tensor:
    """Decode: q [B, H, D], one query per sequence over its context_lens[i] cached tokens.
    Rows with context length 0 (padding) produce zeros."""
    out = torch.zeros_like(q)
    for i, seqlen_k in enumerate(context_lens.tolist()):
        if seqlen_k > 0:
            k = gather_kv(k_cache, block_table[i], seqlen_k)
            v = gather_kv(v_cache, block_table[i], seqlen_k)
            out[i:i + 1] = attend_one(q[i:i + 1], k, v, softmax_scale)
    return out
