"""HF transformers references shared by the tests and benchmarks/tp_gpu_check.py: HF's greedy completion of a prompt,
and the teacher-forced check (run HF on prompt + our completion and measure, position by position, how far the token
we chose trails HF's best logit)."""
import numpy as np
import torch


def hf_greedy(hf, prompt: list[int], max_new_tokens: int, eos_token_id: int | list[int] | None = None,
              min_new_tokens: int | None = None) -> list[int]:
    """HF's greedy completion token ids of one prompt, on the model's device (eos_token_id None: the model's
    generation config decides)."""
    ids = torch.tensor([list(prompt)], device=next(hf.parameters()).device)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eos_token_id, min_new_tokens=min_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def teacher_forced_gaps(hf, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """HF's best logit minus HF's logit of each token we chose, position by position."""
    device = next(hf.parameters()).device
    ids = torch.tensor([prompt + completion], device=device)
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1:-1].float()  # [len(completion), vocab]
    chosen = logits.gather(1, torch.tensor(completion, device=device)[:, None])[:, 0]
    return logits.max(-1).values - chosen


def engine_teacher_forced_logprobs(llm, sequences: list[list[int]], prefill_len: int) -> torch.Tensor:
    """Next-token log-probabilities [num_seqs, L - prefill_len, vocab] (float32) of our engine, teacher-forced over
    sequences (all of length L): a prefill of the first prefill_len tokens, then one decode step per later token,
    each reading every earlier token's K/V from the engine's paged cache (so an FP8 cache is exercised exactly as in
    generation). Runs on rank 0's runner of an idle engine without tensor parallelism, and empties its prefix cache
    (the blocks are overwritten)."""
    from nanovllm.worker.messages import StepInput

    runner, bm = llm.model_runner, llm.scheduler.block_manager
    if not llm.is_finished() or runner.tp.size != 1:
        raise ValueError("needs an idle engine without tensor parallelism")
    num_seqs, length, bs = len(sequences), len(sequences[0]), bm.block_size
    blocks_per_seq = -(-length // bs)
    if any(len(s) != length for s in sequences) or num_seqs * blocks_per_seq > len(bm.blocks):
        raise ValueError("sequences must share one length and fit the KV cache")
    if length > llm.config.max_model_len:
        raise ValueError(f"sequences of {length} tokens exceed max_model_len={llm.config.max_model_len}")
    tables = np.arange(num_seqs * blocks_per_seq, dtype=np.int32).reshape(num_seqs, blocks_per_seq)
    ids = np.asarray(sequences, dtype=np.int32)

    def slots(pos: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return (tables[rows, pos // bs] * bs + pos % bs).astype(np.int32)

    def logprobs(step: StepInput) -> torch.Tensor:
        with torch.inference_mode():
            return runner.model.compute_logits(runner._forward(step)).float().log_softmax(-1).cpu()

    pos = np.tile(np.arange(prefill_len, dtype=np.int32), num_seqs)
    rows = np.repeat(np.arange(num_seqs), prefill_len)
    cu = np.arange(0, (num_seqs + 1) * prefill_len, prefill_len, dtype=np.int32)
    out = [logprobs(StepInput(True, ids[:, :prefill_len].reshape(-1), None, pos, slots(pos, rows), tables, cu, cu))]
    all_rows = np.arange(num_seqs)
    for p in range(prefill_len, length - 1):
        pos = np.full(num_seqs, p, dtype=np.int32)
        out.append(logprobs(StepInput(False, ids[:, p].copy(), None, pos, slots(pos, all_rows), tables,
                                      context_lens=pos + 1)))
    for block in bm.blocks:  # the cache now holds these sequences, not what the hashes say
        bm._forget_hash(block)
    return torch.stack(out, dim=1)  # [num_seqs, L - prefill_len, vocab]


def agreement_and_kl(ref: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    """(fraction of positions whose argmax agrees, mean KL(ref || test)) of two [..., vocab] log-prob tensors."""
    agree = (ref.argmax(-1) == test.argmax(-1)).float().mean().item()
    kl = (ref.exp() * (ref - test)).sum(-1).mean().item()
    return agree, kl
