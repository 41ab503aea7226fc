"""Tensor parallelism on two GPUs: TP=1 and TP=2 greedy on a random bf16 Qwen3-0.6B-shaped checkpoint, each
checked teacher-forced against HF transformers (every token we chose must be within --margin logits of HF's
best at its position). Prints a table last; exits non-zero when a check fails.

    python3 -m benchmarks.tp_gpu_check                     # from the repo root, on a machine with >= 2 GPUs
    python3 -m benchmarks.tp_gpu_check --model /tmp/ckpt   # where the random checkpoint is (built once)
"""
import argparse
import gc
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from nanovllm.testing.random_checkpoint import build_qwen3_0_6b
from nanovllm.testing.teacher_forced import teacher_forced_gaps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = "/tmp/nanovllm-random-qwen3-0.6b"


@dataclass
class Check:
    tp: int
    tokens: int
    seconds: float
    same_as_tp1: int   # sequences whose tokens equal TP=1's
    num_seqs: int
    max_gap: float
    mean_gap: float

    def passed(self, margin: float) -> bool:
        return self.max_gap <= margin


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="random checkpoint directory (built when missing)")
    parser.add_argument("--margin", type=float, default=0.5, help="allowed logit gap to HF's best (bf16)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    return parser.parse_args()


def make_prompts(seed: int = 0) -> list[list[int]]:
    """Random prompts of mixed lengths, two sharing a long prefix with the first, and a repeat (prefix hits)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10000) for _ in range(n)] for n in (1, 17, 130, 300, 700, 1500)]
    prompts += [prompts[4][:512] + p[:40] for p in prompts[1:3]] + [prompts[3]]
    return prompts


def run_engine(path: str, tp: int, prompts: list[list[int]], max_tokens: int,
               enforce_eager: bool) -> tuple[list[list[int]], float]:
    from nanovllm import LLM, SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(path, tensor_parallel_size=tp, enforce_eager=enforce_eager, max_model_len=4096,
             gpu_memory_utilization=0.5) as llm:
        llm.generate([prompts[0]], sp, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompts, sp, use_tqdm=False)
        seconds = time.perf_counter() - start
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o["token_ids"] for o in outputs], seconds


def check(hf, tp: int, prompts: list[list[int]], outputs: list[list[int]], reference: list[list[int]],
          seconds: float) -> Check:
    gaps = torch.cat([teacher_forced_gaps(hf, p, o) for p, o in zip(prompts, outputs, strict=True)])
    same = sum(o == r for o, r in zip(outputs, reference, strict=True))
    return Check(tp, int(gaps.numel()), seconds, same, len(prompts), gaps.max().item(), gaps.mean().item())


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except OSError:
        return "unknown"


def main() -> int:
    args = parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit(f"error: needs 2 GPUs, found {torch.cuda.device_count()}")
    path = build_qwen3_0_6b(args.model)
    prompts = make_prompts()
    runs = {tp: run_engine(path, tp, prompts, args.max_tokens, args.enforce_eager) for tp in (1, 2)}
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    checks = [check(hf, tp, prompts, out, runs[1][0], secs) for tp, (out, secs) in runs.items()]
    print(f"\ncommit {commit()}; {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}; torch "
          f"{torch.__version__}; NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}; model {path} (random bf16 "
          f"Qwen3-0.6B shape); {len(prompts)} prompts, {args.max_tokens} greedy tokens each; "
          f"{'eager' if args.enforce_eager else 'CUDA graphs'}; margin {args.margin}")
    print("| TP | tokens | seconds | seqs equal to TP=1 | max gap | mean gap | teacher-forced |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for c in checks:
        print(f"| {c.tp} | {c.tokens} | {c.seconds:.2f} | {c.same_as_tp1}/{c.num_seqs} | {c.max_gap:.3f} | "
              f"{c.mean_gap:.4f} | {'PASS' if c.passed(args.margin) else 'FAIL'} |")
    return 0 if all(c.passed(args.margin) for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
