"""Neox-style rotary position embedding (rotate the two halves of each head), with Llama 3's frequency scaling.

Every variant only changes the inverse frequencies; the table the kernels read, `cos_sin_cache` [max_pos, head_dim]
float32 = [cos | sin], is built the same way from them.
"""
import math

import torch
from torch import nn

ROPE_TYPES = ("default", "llama3")  # what get_rope implements
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_parameters_of(hf_config) -> dict:
    """The config's RoPE settings as one flat dict with 'rope_type' and 'rope_theta' (transformers 5 keeps them in
    `rope_parameters`; older configs in `rope_scaling` + `rope_theta`). ValueError for what we do not implement."""
    params = dict(getattr(hf_config, "rope_scaling", None) or {})
    params.update(getattr(hf_config, "rope_parameters", None) or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type RoPE parameters {params} are not supported (one set for all layers only)")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported rope types: {list(ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor {partial} is not supported (RoPE over the whole head only)")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    params.update(rope_type=rope_type, rope_theta=float(theta if theta is not None else 10000.0))
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_KEYS if params.get(k) is None]
        if missing:
            raise ValueError(f"rope_type 'llama3' needs {list(LLAMA3_KEYS)} in rope_parameters; missing {missing}")
    return params


def rope_theta_of(hf_config) -> float:
    """rope_theta of a config with plain RoPE; ValueError for any scaled type (models that take scaling build their
    rotary embedding with get_rope)."""
    params = rope_parameters_of(hf_config)
    if params["rope_type"] != "default":
        raise ValueError(f"rope_type {params['rope_type']!r} is not supported by this model (only 'default')")
    return params["rope_theta"]


def default_inv_freq(head_size: int, base: float) -> torch.Tensor:
    """[head_size / 2] float32: base^(-2i / head_size)."""
    return 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1 scaling: wavelengths longer than original / low_freq_factor are slowed down by `factor`, those
    shorter than original / high_freq_factor are kept, and the band between is interpolated (same float32
    arithmetic as HF's `_compute_llama3_parameters`)."""
    if high_freq_factor <= low_freq_factor:
        raise ValueError(f"llama3 rope needs high_freq_factor ({high_freq_factor}) > low_freq_factor "
                         f"({low_freq_factor})")
    original = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original / low_freq_factor  # longer: fully scaled
    high_freq_wavelen = original / high_freq_factor  # shorter: untouched
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)  # 0 .. 1 across the band
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    kept_or_smoothed = torch.where(wavelen < high_freq_wavelen, inv_freq, smoothed)
    return torch.where(wavelen > low_freq_wavelen, inv_freq / factor, kept_or_smoothed)


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
    """cos_sin_cache [max_position, head_size] float32: cos of each frequency, then sin. `scaling`: a 'llama3'
    parameter dict (rope_parameters_of's), or None for plain RoPE."""

    def __init__(self, head_size: int, max_position: int, base: float, scaling: dict | None = None) -> None:
        super().__init__()
        inv_freq = default_inv_freq(head_size, base)
        if scaling is not None:
            if scaling.get("rope_type") != "llama3":
                raise ValueError(f"rope scaling {scaling.get('rope_type')!r} is not supported; supported rope "
                                 f"types: {list(ROPE_TYPES)}")
            inv_freq = llama3_inv_freq(inv_freq, *(scaling[k] for k in LLAMA3_KEYS))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)  # [P, D/2]
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return apply_rotary(positions, q, k, self.cos_sin_cache)


def get_rope(hf_config, head_size: int) -> RotaryEmbedding:
    """The model's rotary embedding (any of ROPE_TYPES) over max_position_embeddings positions; build it once per
    model and share it between layers."""
    params = rope_parameters_of(hf_config)
    scaling = params if params["rope_type"] != "default" else None
    return RotaryEmbedding(head_size, hf_config.max_position_embeddings, params["rope_theta"], scaling)
