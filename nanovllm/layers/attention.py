"""Paged attention: q/k RMSNorm (Qwen3) and RoPE, the new K/V written into the cache, then attention through the
block table.

One backend object per kernels/ module, all with the same methods, chosen once per engine
(`Config.attention_backend`, resolved in config.py): the pure-torch reference (CPU), our Triton kernels, or
flash-attn. `rope_store` normalises and rotates q and k and writes K/V (one fused kernel on the GPU: K never returns
to memory); `prefill` / `decode` then read every key through the block table, so plain, prefix-cached and chunked
prefill take one path. With an FP8 KV cache the layer's cache carries per-(token, head) scales.
"""
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.utils.context import Context, get_context


@dataclass
class LayerKVCache:
    """One layer's slice of the KV cache: k, v [num_blocks, block_size, num_kv_heads, head_dim]; for an FP8 cache
    also k_scale, v_scale float32 (kernels/torch_attention.kv_scale_shape), else None."""
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


class TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        from nanovllm.kernels import torch_attention
        self.ops = torch_attention

    def rope_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   rotary: RotaryEmbedding, q_norm: RMSNorm | None, k_norm: RMSNorm | None, cache: LayerKVCache,
                   slot_mapping: torch.Tensor) -> torch.Tensor:
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        q, k = rotary(positions, q, k)
        self.ops.store_kvcache_torch(k, v, cache.k, cache.v, slot_mapping, cache.k_scale, cache.v_scale)
        return q

    def prefill(self, q: torch.Tensor, cache: LayerKVCache, ctx: Context, scale: float) -> torch.Tensor:
        return self.ops.varlen_attention_torch(q, cache.k, cache.v, ctx.cu_seqlens_q, ctx.cu_seqlens_k,
                                               ctx.block_tables, scale, cache.k_scale, cache.v_scale)

    def decode(self, q: torch.Tensor, cache: LayerKVCache, ctx: Context, scale: float) -> torch.Tensor:
        return self.ops.decode_attention_torch(q, cache.k, cache.v, ctx.context_lens, ctx.block_tables, scale,
                                               cache.k_scale, cache.v_scale)


class TritonBackend:
    name = "triton"

    def __init__(self) -> None:
        from nanovllm.kernels import rope_store, triton_attention
        self.ops = triton_attention
        self.rope_store_op = rope_store.qk_norm_rope_store

    def rope_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   rotary: RotaryEmbedding, q_norm: RMSNorm | None, k_norm: RMSNorm | None, cache: LayerKVCache,
                   slot_mapping: torch.Tensor) -> torch.Tensor:
        """One kernel: q normed and rotated in place (returned), k normed, rotated and stored, v stored."""
        return self.rope_store_op(q, k, v, positions, rotary.cos_sin_cache, cache.k, cache.v, slot_mapping,
                                  q_norm.weight if q_norm is not None else None,
                                  k_norm.weight if k_norm is not None else None,
                                  q_norm.eps if q_norm is not None else 0.0, cache.k_scale, cache.v_scale)

    def prefill(self, q: torch.Tensor, cache: LayerKVCache, ctx: Context, scale: float) -> torch.Tensor:
        return self.ops.varlen_attention_triton(q, cache.k, cache.v, ctx.cu_seqlens_q, ctx.cu_seqlens_k,
                                                ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.block_tables, scale,
                                                k_scale=cache.k_scale, v_scale=cache.v_scale)

    def decode(self, q: torch.Tensor, cache: LayerKVCache, ctx: Context, scale: float) -> torch.Tensor:
        return self.ops.decode_attention_triton(q, cache.k, cache.v, ctx.context_lens, ctx.block_tables, scale,
                                                k_scale=cache.k_scale, v_scale=cache.v_scale,
                                                order=ctx.decode_order)


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
    """q [N, H, D], k/v [N, H_kv, D] (views of the qkv projection) -> out [N, H, D]. The model runner binds
    `kv_cache` before the first step."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.backend = backend
        self.kv_cache: LayerKVCache | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                rotary: RotaryEmbedding, q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None) -> torch.Tensor:
        """q_norm / k_norm: Qwen3's per-head RMSNorms (None for models without them)."""
        ctx = get_context()
        if self.kv_cache is None:
            raise RuntimeError("attention ran before the KV cache was allocated")
        q = self.backend.rope_store(q, k, v, positions, rotary, q_norm, k_norm, self.kv_cache, ctx.slot_mapping)
        attend = self.backend.prefill if ctx.is_prefill else self.backend.decode
        return attend(q, self.kv_cache, ctx, self.scale)
