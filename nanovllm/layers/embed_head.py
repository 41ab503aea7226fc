"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed.tp import SINGLE, TPInfo
from nanovllm.layers.linear import check_shape, linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPInfo = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.shard_size = -(-num_embeddings // tp.size)
        self.vocab_start = self.shard_size * tp.rank
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
        if self.tp.size == 1:
            return F.embedding(x, self.weight)
        mask = (x >= self.vocab_start) & (x < self.vocab_end)
        y = F.embedding((x - self.vocab_start) * mask, self.weight) * mask.unsqueeze(-1)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits of the given hidden states (the runner passes each sequence's last position); with tensor parallelism
    gathered to rank 0 (None elsewhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        logits = linear(x, self.weight)  # [B, hidden] -> [B, shard_size]
        logits = self.tp.gather_last_dim(logits)  # [B, shard_size * tp] on rank 0
        return None if logits is None else logits[:, :self.num_embeddings]
