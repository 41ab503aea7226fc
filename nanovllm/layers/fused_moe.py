"""Mixture-of-experts FFN layer: top-k routing of the router's logits, then every expert's SiLU-gated MLP in one
fused call (kernels/fused_moe.py: the Triton kernel on CUDA, the torch reference elsewhere).

Tensor parallelism shards each expert's intermediate dimension over the ranks, like a column-parallel gate_up and
a row-parallel down projection: every rank holds a slice of every expert, so the work stays balanced whatever the
routing, no token moves between ranks, and the partial outputs are summed by the all-reduce a dense MLP needs anyway.

Weights, stacked per layer (the kernel's layout): w13.weight [E, 2 * I / tp, H] (gate rows, then up rows),
w2.weight [E, H, I / tp]. They load from per-expert checkpoint tensors (`experts.{e}.gate_proj.weight` etc., what
HF `save_pretrained` writes by default) with shard_id (expert, part), or from fused ones (`experts.gate_up_proj`
[E, 2I, H] / `experts.down_proj` [E, H, I], `save_pretrained(save_original_format=False)`) with shard_id FUSED.
"""
import torch
from torch import nn

from nanovllm.distributed.tp import SINGLE, TPInfo
from nanovllm.kernels.fused_moe import fused_moe, fused_moe_torch, route_topk
from nanovllm.layers.linear import LinearBase, check_shape, divide

FUSED = "fused"  # shard_id of a checkpoint tensor holding every expert's weights


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole (the MoE router: [num_experts, hidden])."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, SINGLE, tp_dim=0)


class ExpertWeights(nn.Module):
    """One projection of all experts stacked: weight [E, sum(output_sizes) (/ tp), input_size (/ tp)], the parts
    (e.g. gate and up) one after another along dim 1. shard_input: shard the input dim (down) instead of each
    part's output dim (gate_up)."""

    def __init__(self, num_experts: int, output_sizes: list[int], input_size: int, tp: TPInfo,
                 shard_input: bool, what: str) -> None:
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.shard_dim = -1 if shard_input else -2  # of a [.., out, in] tensor
        self.output_sizes = output_sizes if shard_input else [divide(s, tp, what) for s in output_sizes]
        in_size = divide(input_size, tp, what) if shard_input else input_size
        self.weight = nn.Parameter(torch.empty(num_experts, sum(self.output_sizes), in_size))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: tuple[int, int] | str) -> set[tuple[int, int]]:
        """shard_id (expert, part): one expert's [out_part, in] tensor; FUSED: all experts' [E, sum(out), in].
        Returns the (expert, part) shards written."""
        if shard_id == FUSED:
            full_sizes = [s * (self.tp.size if self.shard_dim == -2 else 1) for s in self.output_sizes]
            if loaded_weight.dim() != 3 or loaded_weight.shape[1] != sum(full_sizes):
                raise ValueError(f"fused expert tensor of shape {tuple(loaded_weight.shape)} does not fit "
                                 f"[{self.num_experts}, {sum(full_sizes)}, in]")
            parts = loaded_weight.split(full_sizes, dim=1)  # [E, out_part, in] each
            for part, tensor in enumerate(parts):
                self._load(param.data, tensor, part)
            return {(e, p) for e in range(self.num_experts) for p in range(len(parts))}
        expert, part = shard_id
        self._load(param.data[expert], loaded_weight, part)
        return {shard_id}

    def _load(self, target: torch.Tensor, loaded: torch.Tensor, part: int) -> None:
        """Copy this rank's slice of one part ([.., out_part, in], full size) into target [.., sum(out), in]."""
        offset = sum(self.output_sizes[:part])
        target = target.narrow(-2, offset, self.output_sizes[part])
        if self.tp.size > 1:
            loaded = loaded.chunk(self.tp.size, self.shard_dim)[self.tp.rank]
        check_shape(target, loaded)
        target.copy_(loaded)


class FusedMoE(nn.Module):
    """The experts of one MoE layer: hidden_states [T, H] and router_logits [T, E] -> [T, H] (summed over ranks).
    Routing as HF Qwen3-MoE: softmax over all experts, top_k, renormalised over the k when norm_topk_prob."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 norm_topk_prob: bool, tp: TPInfo = SINGLE) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be in 1..num_experts ({num_experts})")
        self.tp = tp
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        what = "moe_intermediate_size"
        self.w13 = ExpertWeights(num_experts, [intermediate_size] * 2, hidden_size, tp, shard_input=False, what=what)
        self.w2 = ExpertWeights(num_experts, [hidden_size], intermediate_size, tp, shard_input=True, what=what)

    def partial(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output (its slice of every expert's intermediate dimension)."""
        topk_weights, topk_ids = route_topk(router_logits, self.top_k, self.norm_topk_prob)  # [T, K] each
        moe = fused_moe if hidden_states.is_cuda else fused_moe_torch
        return moe(hidden_states, self.w13.weight, self.w2.weight, topk_weights, topk_ids)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.partial(hidden_states, router_logits))


def expert_packed_modules_mapping(num_experts: int, prefix: str = "experts") -> dict:
    """Checkpoint name part -> (our parameter name part, shard id) for the stacked expert weights; put it before a
    model's dense entries (its `up_proj` would otherwise match inside `gate_up_proj`)."""
    mapping = {f"{prefix}.gate_up_proj": (f"{prefix}.w13.weight", FUSED),
               f"{prefix}.down_proj": (f"{prefix}.w2.weight", FUSED)}
    for e in range(num_experts):
        mapping[f"{prefix}.{e}.gate_proj"] = (f"{prefix}.w13", (e, 0))
        mapping[f"{prefix}.{e}.up_proj"] = (f"{prefix}.w13", (e, 1))
        mapping[f"{prefix}.{e}.down_proj"] = (f"{prefix}.w2", (e, 0))
    return mapping
