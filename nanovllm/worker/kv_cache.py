"""The paged KV cache of one rank: its layout, how many blocks fit, allocation, and binding to attention layers.

Layout: one tensor [2 (k, v), num_layers, num_blocks, block_size, num_kv_heads (this rank's), head_dim]; layer i's
attention sees k = cache[0, i] and v = cache[1, i], each [num_blocks, block_size, num_kv_heads, head_dim]."""
import os
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.config import Config
from nanovllm.layers.attention import Attention, LayerKVCache
from nanovllm.models.utils import head_dim_of

CPU_MAX_BLOCKS = 8192


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    block_size: int
    num_kv_heads: int  # on this rank
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_config(cls, config: Config) -> "KVCacheSpec":
        hf = config.hf_config
        return cls(hf.num_hidden_layers, config.kvcache_block_size,
                   hf.num_key_value_heads // config.tensor_parallel_size, head_dim_of(hf), config.torch_dtype)

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return 2, self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers (K and V)."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def allocate(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> torch.Tensor:
    return torch.empty(spec.shape(num_blocks), dtype=spec.dtype, device=device)


def bind(model: nn.Module, cache: torch.Tensor | None) -> None:
    """Point every attention layer at its slice of cache (None: unbind, so the cache can be freed)."""
    for i, attn in enumerate(attention_layers(model)):
        attn.kv_cache = None if cache is None else LayerKVCache(cache[0, i], cache[1, i])


def cpu_num_blocks(spec: KVCacheSpec, config: Config) -> int:
    """num_kvcache_blocks=-1 on CPU: cpu_kvcache_bytes' worth, at least one max_model_len sequence."""
    return max(min(config.cpu_kvcache_bytes // spec.block_bytes, CPU_MAX_BLOCKS), config.max_blocks_per_seq)


def cuda_num_blocks(spec: KVCacheSpec, config: Config, activation_peak: int, device: torch.device) -> int:
    """Blocks that fit in gpu_memory_utilization of the GPU after what is in use and the activation peak."""
    free, total = torch.cuda.mem_get_info(device)
    budget = total * config.gpu_memory_utilization - (total - free) - max(activation_peak, 0)
    num_blocks = int(budget // spec.block_bytes)
    if num_blocks < 1:
        raise RuntimeError(f"no room for even one KV-cache block on {device}: the model and activations use "
                           f"{(total - free) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB at gpu_memory_utilization="
                           f"{config.gpu_memory_utilization}; raise it, lower max_num_batched_tokens, or free GPU "
                           "memory")
    return num_blocks


def check_fits(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
    """ValueError when an explicit num_kvcache_blocks cannot be allocated (instead of the allocator's error)."""
    need = num_blocks * spec.block_bytes
    if device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    else:
        have, where = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of available RAM"
    if need > have:
        raise ValueError(f"num_kvcache_blocks={num_blocks} needs {need / 2**30:.1f} GiB ({spec.block_bytes} bytes per "
                         f"block) but only {have / 2**30:.1f} GiB is {where}; lower num_kvcache_blocks or leave it "
                         "at -1 to size the cache from memory")
