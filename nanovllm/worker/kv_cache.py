"""The paged KV cache of one rank: its layout, how many blocks fit, allocation, and binding to attention layers.

Layout: one tensor [num_layers, 2 (k, v), num_blocks * block_size * num_kv_heads (this rank's) * head_dim]; layer
i's attention sees k and v as [num_blocks, block_size, num_kv_heads, head_dim] views of data[i]
(torch_attention.new_kv_cache: head_dim-contiguous; fp8: head-major, and V [num_blocks, block_size / 64, 64,
num_kv_heads, head_dim] in token-contiguous runs of 64 tokens). An FP8
cache (kv_cache_dtype="fp8") stores float8 e4m3 codes there plus a float32 scale per (token, KV head):
scales [2, num_layers, num_blocks, num_kv_heads, block_size] (head-major inside a block, so one head's scales for a
tile of tokens are one contiguous load). Scales follow the data: each token's K and V of each head are scaled by
their own max |x| / 448 when written, so no calibration is needed and nothing is re-quantised as a sequence grows."""
import os
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.config import Config
from nanovllm.kernels.torch_attention import kv_storage, new_kv_cache
from nanovllm.layers.attention import Attention, LayerKVCache
from nanovllm.models.utils import head_dim_of

CPU_MAX_BLOCKS = 8192


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    block_size: int
    num_kv_heads: int  # on this rank
    head_dim: int
    dtype: torch.dtype  # the cache's element type (float8_e4m3fn for an fp8 cache)

    @classmethod
    def from_config(cls, config: Config) -> "KVCacheSpec":
        hf = config.hf_config
        return cls(hf.num_hidden_layers, config.kvcache_block_size,
                   hf.num_key_value_heads // config.tensor_parallel_size, head_dim_of(hf),
                   config.kv_cache_torch_dtype)

    @property
    def fp8(self) -> bool:
        return self.dtype == torch.float8_e4m3fn

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return self.num_layers, 2, num_blocks * self.block_size * self.num_kv_heads * self.head_dim

    def layer_views(self, data: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        num_blocks = data.shape[2] // (self.block_size * self.num_kv_heads * self.head_dim)
        return new_kv_cache(num_blocks, self.block_size, self.num_kv_heads, self.head_dim, self.dtype, data.device,
                            storage=data[layer])

    def scale_shape(self, num_blocks: int) -> tuple[int, ...]:
        return 2, self.num_layers, num_blocks, self.num_kv_heads, self.block_size

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers (K and V, and their scales for fp8)."""
        per_token = self.head_dim * self.dtype.itemsize + (4 if self.fp8 else 0)
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * per_token


@dataclass
class KVCache:
    spec: KVCacheSpec
    data: torch.Tensor                  # spec.shape(num_blocks)
    scales: torch.Tensor | None = None  # spec.scale_shape(num_blocks) float32, fp8 only


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def allocate(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> KVCache:
    data = kv_storage(spec.shape(num_blocks), spec.dtype, device)
    scales = torch.empty(spec.scale_shape(num_blocks), dtype=torch.float32, device=device) if spec.fp8 else None
    return KVCache(spec, data, scales)


def bind(model: nn.Module, cache: KVCache | None) -> None:
    """Point every attention layer at its slice of cache (None: unbind, so the cache can be freed)."""
    for i, attn in enumerate(attention_layers(model)):
        if cache is None:
            attn.kv_cache = None
        elif cache.scales is None:
            attn.kv_cache = LayerKVCache(*cache.spec.layer_views(cache.data, i))
        else:
            attn.kv_cache = LayerKVCache(*cache.spec.layer_views(cache.data, i), cache.scales[0, i],
                                         cache.scales[1, i])


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
