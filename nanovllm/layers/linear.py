"""Linear layers that shard their weights across tensor-parallel ranks.

Each parameter carries a `weight_loader(param, loaded_weight[, shard_id])` that copies this rank's slice of a full
checkpoint tensor into it.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed.tp import SINGLE, TPInfo
from nanovllm.kernels import gemv
from nanovllm.layers.activation import silu_and_mul


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gated: bool = False) -> torch.Tensor:
    """F.linear; decode-sized inputs (x [M <= 16, K], bf16/fp16 on a GPU) take the weight-streaming Triton GEMV.
    gated: x is [M, 2K] = [gate | up] and the layer's input is silu(gate) * up; the GEMV computes it as it reads x
    (one kernel less per MLP), other sizes run silu_and_mul first."""
    if gemv.supports(x, weight, gated):
        return gemv.small_m_linear(x, weight, bias, gated=gated)
    return F.linear(silu_and_mul(x) if gated else x, weight, bias)


def check_shape(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter of shape "
                         f"{tuple(param.shape)}")


def divide(size: int, tp: TPInfo, what: str) -> int:
    if size % tp.size:
        raise ValueError(f"{what} {size} is not divisible by tensor_parallel_size {tp.size}")
    return size // tp.size


class LinearBase(nn.Module):
    """y = x W^T + b with W [output_size, input_size]; tp_dim is the sharded dimension of W."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TPInfo, tp_dim: int) -> None:
        super().__init__()
        self.tp = tp
        self.tp_dim = tp_dim
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def shard(self, loaded_weight: torch.Tensor, dim: int) -> torch.Tensor:
        return loaded_weight.chunk(self.tp.size, dim)[self.tp.rank] if self.tp.size > 1 else loaded_weight

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.dim() > self.tp_dim:  # a row-parallel bias (1-D) is not sharded
            loaded_weight = self.shard(loaded_weight, self.tp_dim)
        check_shape(param, loaded_weight)
        param.data.copy_(loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Splits the output features: each rank computes a slice of y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp: TPInfo = SINGLE) -> None:
        super().__init__(input_size, divide(output_size, tp, "output size"), bias, tp, tp_dim=0)

    def load_part(self, param: nn.Parameter, loaded_weight: torch.Tensor, offset: int, size: int) -> None:
        """Copy this rank's slice of one packed part into rows [offset, offset + size) of param."""
        target = param.data.narrow(0, offset, size)
        loaded_weight = self.shard(loaded_weight, 0)
        check_shape(target, loaded_weight)
        target.copy_(loaded_weight)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stored as one (e.g. gate_up_proj); shard_id picks the part."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, tp: TPInfo = SINGLE) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int) -> None:
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        self.load_part(param, loaded_weight, offset, self.output_sizes[shard_id] // self.tp.size)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix; each rank holds its heads of each."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False, tp: TPInfo = SINGLE) -> None:
        self.head_size = head_size
        self.num_heads = divide(total_num_heads, tp, "num_attention_heads")
        self.num_kv_heads = divide(total_num_kv_heads, tp, "num_key_value_heads")
        super().__init__(hidden_size, (total_num_heads + 2 * total_num_kv_heads) * head_size, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str) -> None:
        q_size, kv_size = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        self.load_part(param, loaded_weight, offset, size)


class RowParallelLinear(LinearBase):
    """Splits the input features: each rank computes a partial y, summed by all-reduce. The bias is added once, on
    rank 0, before the reduction (GeeeekExplorer/nano-vllm#203: a biased row-parallel layer must load)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp: TPInfo = SINGLE) -> None:
        super().__init__(divide(input_size, tp, "input size"), output_size, bias, tp, tp_dim=1)

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """x [N, input_size / tp] ([N, 2 * input_size / tp] = [gate | up] when gated: see `linear`)."""
        y = linear(x, self.weight, self.bias if self.tp.is_first else None, gated)
        return self.tp.all_reduce(y)
