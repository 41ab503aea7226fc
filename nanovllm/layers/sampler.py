"""Batched sampling: one row of logits and one set of parameters per sequence, no per-sequence Python loop and no
host sync. Order, as vLLM: min_tokens ban, temperature, min_p, top_k, top_p, then the exponential trick
(argmax of probs / Exp(1) noise) with noise from the counter RNG keyed by each row's (seed, position), so a row's
sample never depends on the rest of the batch."""
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.kernels.sampling import new_workspace, sample_gumbel
from nanovllm.layers.sampling_rng import seeded_exponential

NEG_INF = float("-inf")


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the logits' device (from a SamplingInput); the flag is host-side, so the
    greedy fast path costs no sync."""
    temperatures: torch.Tensor           # [B] float32, 0 = greedy
    seeds: torch.Tensor                  # [B] int64
    positions: torch.Tensor              # [B] int64
    top_k: torch.Tensor | None = None    # [B] int64, <= 0 = off; None (with top_p) when no row needs the sort
    top_p: torch.Tensor | None = None    # [B] float32, 1 = off
    min_p: torch.Tensor | None = None    # [B] float32, 0 = off; None when no row uses it
    banned: torch.Tensor | None = None   # [2, M] int64: row, token id masked out (min_tokens)
    all_greedy: bool = False
    logprob_rows: torch.Tensor | None = None  # [R] int64 rows whose logprobs are returned
    num_logprobs: int = 0

    @property
    def fast(self) -> bool:
        """No filter and no ban: temperature and Gumbel noise alone (the fused kernel's job)."""
        return self.top_k is None and self.min_p is None and self.banned is None


def ban_tokens(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    return logits.index_put((banned[0], banned[1]), logits.new_full((), NEG_INF))


def apply_temperature(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    temps = torch.where(temperatures > 0, temperatures, torch.ones_like(temperatures))
    return logits / temps.unsqueeze(1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with p < min_p * p_max, i.e. logit < max logit + log(min_p) (min_p 0 keeps all)."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)
    return logits.masked_fill(logits < threshold, NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """One descending sort: keep ranks < k, then (on the renormalised top-k) the tokens whose more likely tokens sum
    to < top_p, so the one crossing top_p stays."""
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab_size, device=logits.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab_size))
    sorted_logits = sorted_logits.masked_fill(ranks >= k.unsqueeze(1), NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop = (before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.full_like(logits, NEG_INF).scatter_(-1, order, sorted_logits)


def filtered_probs(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    logits = apply_temperature(logits, params.temperatures)
    if params.min_p is not None:
        logits = apply_min_p(logits, params.min_p)
    if params.top_k is not None:
        logits = apply_top_k_top_p(logits, params.top_k, params.top_p)
    return logits.softmax(dim=-1)


def banned_logits(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    logits = logits.float()
    return ban_tokens(logits, params.banned) if params.banned is not None else logits


def compute_logprobs(logits: torch.Tensor, params: SamplingTensors,
                     sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For params.logprob_rows: (sampled token's logprob [R], top-k ids [R, k], top-k logprobs [R, k]) of the
    distribution each row sampled from: the min_tokens-banned logits over the temperature (raw for greedy rows)."""
    rows = params.logprob_rows
    scaled = apply_temperature(banned_logits(logits, params)[rows], params.temperatures[rows])
    logprobs = scaled.log_softmax(dim=-1)  # [R, V]
    chosen = logprobs.gather(1, sampled[rows].unsqueeze(1)).squeeze(1)
    top_lp, top_ids = logprobs.topk(params.num_logprobs, dim=-1)  # k = 0 gives [R, 0]
    return chosen, top_ids, top_lp


class Sampler(nn.Module):
    """Samples one token per row; temperature-0 rows take the argmax (of the min_tokens-banned logits). On CUDA,
    rows without filters or bans take the fused Triton kernel (one read of the logits, same noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.workspace: torch.Tensor | None = None  # the fused kernel's (kernels/sampling.new_workspace), grown

    def forward(self, logits: torch.Tensor, params: SamplingTensors, out: torch.Tensor | None = None) -> torch.Tensor:
        if logits.is_cuda and params.fast:
            ws = self.workspace
            if ws is None or ws.shape[1] < logits.shape[0] or ws.device != logits.device:
                ws = self.workspace = new_workspace(logits.shape[0], logits.device)
            return sample_gumbel(logits, params.temperatures, params.seeds, params.positions, out=out, workspace=ws)
        ids = self.sample_torch(logits, params)
        return ids if out is None else out.copy_(ids)

    def sample_torch(self, logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
        logits = banned_logits(logits, params)
        greedy = logits.argmax(dim=-1)
        if params.all_greedy:
            return greedy
        probs = filtered_probs(logits, params)
        noise = seeded_exponential(params.seeds, params.positions, probs.shape[-1]).clamp_(min=1e-10)
        sampled = probs.div_(noise).argmax(dim=-1)
        return torch.where(params.temperatures == 0, greedy, sampled)
