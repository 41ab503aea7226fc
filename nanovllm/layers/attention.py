"""Paged attention layer: writes new K/V into the cache, then attends through the block table.

The backend is chosen here, in one place: flash-attn when importable on CUDA, else our Triton kernels
on CUDA, else the pure-torch reference (CPU). `Config.attention_backend` overrides the choice.
"""
import importlib.util
from typing import Callable, NamedTuple

import torch
from torch import nn

from nanovllm.utils.context import get_context

BACKENDS = ("flash_attn", "triton", "torch")


class Backend(NamedTuple):
    store_kvcache: Callable
    prefill: Callable  # (q, k_cache, v_cache, context, scale) -> out
    decode: Callable   # (q, k_cache, v_cache, context, scale) -> out


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_attention_backend(requested: str, device: str) -> str:
    if requested == "auto":
        if device != "cuda":
            return "torch"
        return "flash_attn" if flash_attn_available() else "triton"
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend must be 'auto' or one of {list(BACKENDS)}, got {requested!r}")
    if requested != "torch" and device != "cuda":
        raise ValueError(f"attention_backend={requested!r} needs device='cuda'; use 'torch' on {device}")
    if requested == "flash_attn" and not flash_attn_available():
        raise ValueError("attention_backend='flash_attn' but flash_attn is not installed; "
                         "`pip install nano-vllm[flash-attn]` or use attention_backend='triton'")
    return requested


def load_backend(name: str) -> Backend:
    if name == "torch":
        from nanovllm.kernels import torch_attention as ta
        return Backend(
            ta.store_kvcache_torch,
            lambda q, kc, vc, c, s: ta.varlen_attention_torch(q, kc, vc, c.cu_seqlens_q, c.cu_seqlens_k,
                                                               c.block_tables, s),
            lambda q, kc, vc, c, s: ta.decode_attention_torch(q, kc, vc, c.context_lens, c.block_tables, s))
    from nanovllm.kernels import triton_attention as tri
    if name == "triton":
        return Backend(
            tri.store_kvcache,
            lambda q, kc, vc, c, s: tri.varlen_attention_triton(q, kc, vc, c.cu_seqlens_q, c.cu_seqlens_k,
                                                                 c.max_seqlen_q, c.max_seqlen_k,
                                                                 c.block_tables, s),
            lambda q, kc, vc, c, s: tri.decode_attention_triton(q, kc, vc, c.context_lens, c.block_tables, s))
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    return Backend(
        tri.store_kvcache,
        lambda q, kc, vc, c, s: flash_attn_varlen_func(q, kc, vc, max_seqlen_q=c.max_seqlen_q,
                                                       cu_seqlens_q=c.cu_seqlens_q, max_seqlen_k=c.max_seqlen_k,
                                                       cu_seqlens_k=c.cu_seqlens_k, softmax_scale=s,
                                                       causal=True, block_table=c.block_tables),
        lambda q, kc, vc, c, s: flash_attn_with_kvcache(q.unsqueeze(1), kc, vc, cache_seqlens=c.context_lens,
                                                        block_table=c.block_tables, softmax_scale=s,
                                                        causal=True).squeeze(1))


class Attention(nn.Module):
    """q [N, H, D], k/v [N, H_kv, D] -> out [N, H, D]. k_cache/v_cache are bound by the model runner."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 backend: str = "torch") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.backend = load_backend(backend)
        self.k_cache = self.v_cache = torch.tensor([])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        context = get_context()
        if self.k_cache.numel() == 0:
            raise RuntimeError("attention ran before the KV cache was allocated")
        self.backend.store_kvcache(k, v, self.k_cache, self.v_cache, context.slot_mapping)
        run = self.backend.prefill if context.is_prefill else self.backend.decode
        return run(q, self.k_cache, self.v_cache, context, self.scale)
