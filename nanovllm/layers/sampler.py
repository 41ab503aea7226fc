import torch
from torch import nn


class Sampler(nn.Module):
    """Temperature sampling by the exponential trick (argmax of probs / Exp(1) noise); temperature 0 is
    greedy. Batched: one row of logits and one temperature per sequence."""

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        temps = temperatures.unsqueeze(1)
        probs = torch.softmax(logits / temps.clamp(min=1e-5), dim=-1)
        noise = torch.empty_like(probs).exponential_(1).clamp_(min=1e-10)
        sampled = probs.div_(noise).argmax(dim=-1)
        return torch.where(temperatures == 0, greedy, sampled)
