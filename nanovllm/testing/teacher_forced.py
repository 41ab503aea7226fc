"""The teacher-forced check shared by the GPU tests and benchmarks/tp_gpu_check.py: run HF on prompt + our
completion and measure, position by position, how far the token we chose trails HF's best logit."""
import torch


def teacher_forced_gaps(hf, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """HF's best logit minus HF's logit of each token we chose, position by position."""
    device = next(hf.parameters()).device
    ids = torch.tensor([prompt + completion], device=device)
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1:-1].float()  # [len(completion), vocab]
    chosen = logits.gather(1, torch.tensor(completion, device=device)[:, None])[:, 0]
    return logits.max(-1).values - chosen
