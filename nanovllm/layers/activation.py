"""silu(gate) * up for x = [gate | up] along the last dimension: one Triton kernel on CUDA, torch elsewhere. The MLPs
call it through `linear(..., gated=True)`, which folds it into the down projection at decode sizes."""
import torch

from nanovllm.kernels import activation


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [N, 2I] -> [N, I]."""
    if x.is_cuda:
        return activation.silu_and_mul(x)
    return activation.silu_and_mul_torch(x)
