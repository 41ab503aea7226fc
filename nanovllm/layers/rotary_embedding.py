"""Neox-style rotary position embedding (rotate the two halves of each head)."""
import torch
from torch import nn


def rope_theta_of(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
    return float(theta if theta is not None else 10000.0)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    rotated = torch.cat([-x2, x1], -1)
    return (x * torch.cat([cos, cos], -1) + rotated * torch.cat([sin, sin], -1)).to(x.dtype)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, D], k [N, H_kv, D] rotated by their token positions [N] (as HF: cos/sin in the model dtype)."""
    cos, sin = cos_sin_cache[positions.long()].to(q.dtype).unsqueeze(1).chunk(2, -1)  # [N, 1, D/2] each
    return rotate(q, cos, sin), rotate(k, cos, sin)


class RotaryEmbedding(nn.Module):
    """cos_sin_cache [max_position, head_size] float32: cos of each frequency, then sin."""

    def __init__(self, head_size: int, max_position: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)  # [P, D/2]
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return apply_rotary(positions, q, k, self.cos_sin_cache)
