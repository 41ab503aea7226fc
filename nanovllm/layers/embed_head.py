"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.linear import check_shape
from nanovllm.utils.context import get_context
from nanovllm.utils.distributed import get_tp_rank, get_tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.num_embeddings = num_embeddings
        self.shard_size = (num_embeddings + self.tp_size - 1) // self.tp_size
        self.vocab_start = self.shard_size * self.tp_rank
        self.vocab_end = min(self.vocab_start + self.shard_size, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        shard = loaded_weight[self.vocab_start:self.vocab_end]
        target = param.data[:shard.shape[0]]
        check_shape(target, shard)
        target.copy_(shard)
        param.data[shard.shape[0]:].zero_()  # padding rows of the last shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(x, self.weight)
        mask = (x >= self.vocab_start) & (x < self.vocab_end)
        y = F.embedding((x - self.vocab_start) * mask, self.weight) * mask.unsqueeze(-1)
        dist.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """Logits of each sequence's last scheduled position only, gathered to rank 0 (None elsewhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        context = get_context()
        if context.is_prefill:
            x = x[context.cu_seqlens_q[1:].long() - 1]  # [B, hidden]: last position of each sequence
        logits = F.linear(x, self.weight)  # [B, shard_size]
        if self.tp_size == 1:
            return logits[:, :self.num_embeddings]
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
        dist.gather(logits, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, :self.num_embeddings] if self.tp_rank == 0 else None
