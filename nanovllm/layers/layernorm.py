"""RMSNorm with an optional fused residual add: norm(x + residual) and the new residual. Our Triton kernel on CUDA
(one launch), the same arithmetic in plain torch elsewhere (nanovllm/kernels/norm.py holds both)."""
import torch
from torch import nn

from nanovllm.kernels import norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [..., D]. With residual: (norm(x + residual), x + residual), the latter written into residual."""
        if x.is_cuda and x.dim() == 2:
            return norm.rms_norm(x, self.weight, self.eps) if residual is None else \
                norm.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return norm.rms_norm_torch(x, self.weight, self.eps)
        return norm.add_rms_norm_torch(x, residual, self.weight, self.eps)
