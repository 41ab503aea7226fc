"""Pure-torch paged attention: the reference every faster backend is tested against.

Cache layout (per layer): k_cache [num_blocks, block_size, num_kv_heads, head_dim]; v_cache the same, or split
into runs of G tokens: [num_blocks, block_size / G, G, num_kv_heads, head_dim] (new_kv_cache does that for fp8,
see there). Slot s lives at block s // block_size, offset s % block_size (run offset // G, token offset % G:
slot_index). k_cache's head_dim is contiguous; v_cache's head_dim or its token dim; every function here and in
triton_attention.py follows the shapes and strides.

FP8 KV cache (k_scale / v_scale given): the caches are float8_e4m3fn and every (token, KV head) vector x of
head_dim values is stored as codes = round(x / s) with its own float32 scale s = amax(|x|) / 448 (1 where x is
all zeros), kept in k_scale / v_scale of shape kv_scale_shape(k_cache) = [num_blocks, num_kv_heads, block_size].
Why per (token, head): scales are computed when the token is written (no calibration), a written token never
needs requantising when later tokens arrive (decode appends one at a time), one outlier only coarsens its own
128 values, and the cost is 4 bytes per 128 (3%). Head-major scales within a block make one KV head's scales
for a tile of tokens contiguous for the attention kernels.
"""
import struct

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_INV_MAX = struct.unpack("f", struct.pack("f", 1 / 448))[0]  # 1/448 rounded to float32
FP8_V_BLOCK = 64  # tokens per token-contiguous run of an fp8 V cache (new_kv_cache)


def kv_scale_shape(k_cache: torch.Tensor) -> tuple[int, int, int]:
    """Shape of the float32 k_scale / v_scale tensors of an fp8 cache: [num_blocks, num_kv_heads, block_size]."""
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    return num_blocks, num_kv_heads, block_size


def check_kv_scales(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None) -> bool:
    """True for an fp8 cache with valid scales, False for a plain cache; ValueError for anything in between."""
    if k_scale is None and v_scale is None:
        if k_cache.dtype == FP8_DTYPE:
            raise ValueError("an fp8 KV cache needs k_scale and v_scale (float32, kv_scale_shape(k_cache))")
        return False
    if k_scale is None or v_scale is None:
        raise ValueError("pass both k_scale and v_scale (fp8 cache) or neither (cache in the model dtype)")
    if k_cache.dtype != FP8_DTYPE or v_cache.dtype != FP8_DTYPE:
        raise ValueError(f"k_scale / v_scale need float8_e4m3fn caches, got {k_cache.dtype} / {v_cache.dtype}")
    shape = kv_scale_shape(k_cache)
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if (scale.shape != shape or scale.dtype != torch.float32 or not scale.is_contiguous()
                or scale.device != k_cache.device):
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape {shape} on {k_cache.device} "
                             f"(kv_scale_shape(k_cache)), got {tuple(scale.shape)} {scale.dtype}")
    return True


def kv_storage(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Memory for K/V caches of `dtype`: zero-filled for fp8 (the attention kernels read the unused rest of a
    sequence's last page, times zero, so its codes must be finite: triton_attention module doc), else uninitialised."""
    return (torch.zeros if dtype == FP8_DTYPE else torch.empty)(shape, dtype=dtype, device=device)


def new_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, storage: torch.Tensor | None = None,
                 v_block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache) in the layouts the engine uses. Model dtype: both [num_blocks, block_size, num_kv_heads,
    head_dim], head_dim contiguous. fp8: stored head-major (permuted views are returned), so one head's decode tile
    is one contiguous run (16 KB for 128 tokens; 90.1% of copy bandwidth at 256 x 1k on an H100 against 88.7%
    interleaved): k [num_blocks, num_kv_heads, block_size, head_dim]; v [num_blocks, num_kv_heads, block_size / G,
    head_dim, G] with G = v_block_size (FP8_V_BLOCK by default), seen as [num_blocks, block_size / G, G,
    num_kv_heads, head_dim]. Why V is token-contiguous: P.V reduces over tokens, and 8-bit tensor-core operands must
    be contiguous along the reduced dim (16-bit ones are transposed by ldmatrix), so the attention kernels load V
    tiles with 16-byte loads instead of byte by byte. Why runs of G = 64 tokens rather than whole blocks: a decode
    step writes one token, whose codes of one head land in head_dim rows G bytes apart, a read-modify-write of a
    32-byte sector each, and shorter runs keep those rows close. H100 (benchmarks.fused_bench --store-layouts,
    attention_bench --v-block): store of 256 decode tokens after an L2 flush 23.2 / 14.0 / 11.5 / 8.9 us for G = 256 /
    64 / 32 / 16; decode 256 x 1k at 91.1 / 93.9 / 89.8 / 79.4% of copy bandwidth (16-byte pieces of runs under 32
    tokens read slower, with the same instructions). G = 64 gives the fastest engine step: 5.16 ms at batch 256
    (benchmarks.profile_steps) against 5.50 with whole 256-token blocks and 5.57 with G = 16.
    storage: optional [2, num_blocks * block_size * num_kv_heads * head_dim] tensor of `dtype` to view (else a new
    kv_storage)."""
    numel = num_blocks * block_size * num_kv_heads * head_dim
    if storage is None:
        storage = kv_storage((2, numel), dtype, device)
    if dtype != FP8_DTYPE:
        return (storage[0].view(num_blocks, block_size, num_kv_heads, head_dim),
                storage[1].view(num_blocks, block_size, num_kv_heads, head_dim))
    run = min(v_block_size or FP8_V_BLOCK, block_size)
    if block_size % run:
        raise ValueError(f"v_block_size {run} must divide block_size {block_size}")
    k = storage[0].view(num_blocks, num_kv_heads, block_size, head_dim).permute(0, 2, 1, 3)
    v = storage[1].view(num_blocks, num_kv_heads, block_size // run, head_dim, run).permute(0, 2, 4, 1, 3)
    return k, v


def slot_index(cache: torch.Tensor, slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, ...]:
    """Index of cache rows (each [num_kv_heads, head_dim]) at slots [n] (int64) in a cache of blocks of block_size
    tokens: [blocks, block_size, H, D] or in runs [blocks, block_size / G, G, H, D]."""
    if cache.dim() == 4:
        return slots // block_size, slots % block_size
    run = cache.shape[2]
    return slots // block_size, slots % block_size // run, slots % run


def quantize_fp8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (float8_e4m3fn codes [..., D], float32 scales [...]) with x ~= codes * scale."""
    xf = x.float()
    scale = xf.abs().amax(-1) * FP8_INV_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    inv = 1.0 / scale
    return (xf * inv.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def store_kvcache_torch(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> None:
    """Write key/value [N, num_kv_heads, head_dim] into their cache slots; slot -1 means skip.
    With k_scale / v_scale the cache is fp8: values are quantised per (token, head) and their scales stored."""
    fp8 = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    for x, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        x = x[valid]
        if fp8:
            x, s = quantize_fp8_torch(x)
            scale[slots // k_cache.shape[1], :, slots % k_cache.shape[1]] = s  # [n, H_kv] into [blocks, H_kv, bs]
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)  # index_put on float8 is not everywhere
        cache[slot_index(cache, slots, k_cache.shape[1])] = x.to(cache.dtype)  # any strides


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, seqlen_k: int, scale: torch.Tensor | None = None,
              block_size: int | None = None) -> torch.Tensor:
    """Keys (or values) of one sequence read through its block table, whose blocks hold block_size tokens
    (default: cache.shape[1]): [seqlen_k, num_kv_heads, head_dim] (float32, dequantised, when `scale` is given)."""
    page = block_size or cache.shape[1]
    pos = torch.arange(seqlen_k, device=cache.device)
    slots = block_table_row.to(cache.device)[pos // page].long() * page + pos % page  # [seqlen_k]
    x = cache[slot_index(cache, slots, page)]  # [seqlen_k, H_kv, D]
    if scale is None:
        return x
    s = scale[slots // page, :, slots % page]  # [blocks, H_kv, page] -> [seqlen_k, H_kv]
    return x.float() * s.unsqueeze(-1)


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
                           block_table: torch.Tensor, softmax_scale: float, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill: q [total_q, H, D] packed by cu_seqlens_q; keys of sequence i are the first
    cu_seqlens_k[i+1] - cu_seqlens_k[i] tokens reached through block_table[i]. k_scale / v_scale: fp8 cache."""
    check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        seqlen_k = ck[i + 1] - ck[i]
        k = gather_kv(k_cache, block_table[i], seqlen_k, k_scale)
        v = gather_kv(v_cache, block_table[i], seqlen_k, v_scale, k_cache.shape[1])
        out[cq[i]:cq[i + 1]] = attend_one(q[cq[i]:cq[i + 1]], k, v, softmax_scale)
    return out


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           context_lens: torch.Tensor, block_table: torch.Tensor,
                           softmax_scale: float, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Decode: q [B, H, D], one query per sequence over its context_lens[i] cached tokens.
    Rows with context length 0 (padding) produce zeros. k_scale / v_scale: fp8 cache."""
    check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for i, seqlen_k in enumerate(context_lens.tolist()):
        if seqlen_k > 0:
            k = gather_kv(k_cache, block_table[i], seqlen_k, k_scale)
            v = gather_kv(v_cache, block_table[i], seqlen_k, v_scale, k_cache.shape[1])
            out[i:i + 1] = attend_one(q[i:i + 1], k, v, softmax_scale)
    return out
