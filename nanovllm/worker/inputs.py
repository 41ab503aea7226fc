"""StepInput -> device tensors and the per-step attention Context (plain functions, testable without a model)."""
import numpy as np
import torch

from nanovllm.utils.context import Context
from nanovllm.worker.messages import StepInput


def to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(host)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def prepare(step: StepInput, device: torch.device,
            last_sampled: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Context]:
    """(input_ids [N] int64, positions [N] int32, context). Every int32 array travels in one host-to-device copy.
    Tokens sampled by the previous step are gathered on the device from last_sampled [B_prev] (never via the host).
    """
    b = step.num_seqs
    parts = [step.input_ids, step.positions, step.slot_mapping]
    if step.is_prefill:
        parts += [step.cu_seqlens_q, step.cu_seqlens_k]
    else:
        parts.append(step.context_lens)
        if step.decode_order is not None:
            parts.append(step.decode_order)
    if step.prev_rows is not None:
        parts.append(step.prev_rows)
    parts.append(step.block_tables.reshape(-1))
    dev = to_device(np.concatenate(parts), device)
    views, offset = [], 0
    for part in parts:
        views.append(dev[offset:offset + len(part)])
        offset += len(part)
    input_ids, positions, slot_mapping = views[:3]
    block_tables = views[-1].view(b, -1)  # [B * W] -> [B, W]
    input_ids = input_ids.long()
    if step.prev_rows is not None:
        if last_sampled is None:
            raise RuntimeError("the step reads the previous step's samples, but there is no previous step")
        prev_rows = views[-2]
        taken = last_sampled[prev_rows.clamp(min=0).long()]
        input_ids = torch.where(prev_rows >= 0, taken, input_ids)
    if step.is_prefill:
        cu_q, cu_k = views[3], views[4]
        q_lens, k_lens = np.diff(step.cu_seqlens_q), np.diff(step.cu_seqlens_k)
        context = Context(is_prefill=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int(q_lens.max()),
                          max_seqlen_k=int(k_lens.max()), slot_mapping=slot_mapping, block_tables=block_tables)
    else:
        context = Context(is_prefill=False, slot_mapping=slot_mapping, context_lens=views[3],
                          decode_order=views[4] if step.decode_order is not None else None,
                          block_tables=block_tables)
    return input_ids, positions, context
