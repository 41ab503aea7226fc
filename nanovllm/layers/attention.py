"""Paged attention: write the new K/V into the cache, then attend through the block table.

One backend object per kernels/ module, all with the same three methods, chosen once per engine
(`Config.attention_backend`, resolved in config.py): the pure-torch reference (CPU), our Triton kernels, or
flash-attn. Every backend reads all keys through the block table, so plain, prefix-cached and chunked prefill take
one path.
"""
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.utils.context import Context, get_context


@dataclass
class LayerKVCache:
    """One layer's slice of the KV cache: k, v [num_blocks, block_size, num_kv_heads, head_dim]."""
    k: torch.Tensor
    v: torch.Tensor


class TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        from nanovllm.kernels import torch_attention
        self.ops = torch_attention

    def store_kvcache(self, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                      slot_mapping: torch.Tensor) -> None:
        self.ops.store_kvcache_torch(key, value, cache.k, cache.v, slot_mapping)

    def prefill(self, q: torch.Tensor, cache: LayerKVCache, ctx: Context, scale: float) -> torch.Tensor:
        return self.ops.varlen_attention_torch(q, cache.k, cache.v, ctx.cu_seqlens_q, ctx.cu_seqlens_k,
                                               ctx.block_tables, scale)

    def decode(self, q: torch.Tensor, cache: LayerKVCache, ctx: Context, scale: float) -> torch.Tensor:
        return self.ops.decode_attention_torch(q, cache.k, cache.v, ctx.context_lens, ctx.block_tables, scale)


class TritonBackend:
    name = "triton"

    def __init__(self) -> None:
        from nanovllm.kernels import triton_attention
        self.ops = triton_attention

    def store_kvcache(self, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                      slot_mapping: torch.Tensor) -> None:
        self.ops.store_kvcache(key, value, cache.k, cache.v, slot_mapping)

    def prefill(self, q: torch.Tensor, cache: LayerKVCache, ctx: Context, scale: float) -> torch.Tensor:
        return self.ops.varlen_attention_triton(q, cache.k, cache.v, ctx.cu_seqlens_q, ctx.cu_seqlens_k,
                                                ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.block_tables, scale)

    def decode(self, q: torch.Tensor, cache: LayerKVCache, ctx: Context, scale: float) -> torch.Tensor:
        return self.ops.decode_attention_triton(q, cache.k, cache.v, ctx.context_lens, ctx.block_tables, scale)


class FlashAttnBackend(TritonBackend):
    """flash-attn's varlen and paged-KV kernels; K/V are written by our Triton store kernel."""
    name = "flash_attn"

    def __init__(self) -> None:
        super().__init__()
        import flash_attn
        self.fa = flash_attn

    def prefill(self, q: torch.Tensor, cache: LayerKVCache, ctx: Context, scale: float) -> torch.Tensor:
        return self.fa.flash_attn_varlen_func(q, cache.k, cache.v, max_seqlen_q=ctx.max_seqlen_q,
                                              cu_seqlens_q=ctx.cu_seqlens_q, max_seqlen_k=ctx.max_seqlen_k,
                                              cu_seqlens_k=ctx.cu_seqlens_k, softmax_scale=scale, causal=True,
                                              block_table=ctx.block_tables)

    def decode(self, q: torch.Tensor, cache: LayerKVCache, ctx: Context, scale: float) -> torch.Tensor:
        out = self.fa.flash_attn_with_kvcache(q.unsqueeze(1), cache.k, cache.v, cache_seqlens=ctx.context_lens,
                                              block_table=ctx.block_tables, softmax_scale=scale, causal=True)
        return out.squeeze(1)  # [B, 1, H, D] -> [B, H, D]


BACKENDS = {"torch": TorchBackend, "triton": TritonBackend, "flash_attn": FlashAttnBackend}
AttentionBackend = TorchBackend | TritonBackend | FlashAttnBackend


def make_backend(name: str) -> AttentionBackend:
    return BACKENDS[name]()


class Attention(nn.Module):
    """q [N, H, D], k/v [N, H_kv, D] -> out [N, H, D]. The model runner binds `kv_cache` before the first step."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.backend = backend
        self.kv_cache: LayerKVCache | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        if self.kv_cache is None:
            raise RuntimeError("attention ran before the KV cache was allocated")
        self.backend.store_kvcache(k, v, self.kv_cache, ctx.slot_mapping)
        attend = self.backend.prefill if ctx.is_prefill else self.backend.decode
        return attend(q, self.kv_cache, ctx, self.scale)
