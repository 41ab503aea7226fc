"""FP8 KV cache accuracy against the bf16 KV cache, teacher-forced over long contexts (GPU).

For each model, the same token sequences (the trained model: held-out CPython stdlib source it never saw in
training; the random Qwen3-0.6B: random ids) run through two engines that differ only in kv_cache_dtype. After a
48-token prefill every later position is predicted by a decode step that reads all earlier K/V from the paged cache
(nanovllm.testing.teacher_forced.engine_teacher_forced_logprobs). Reported: greedy next-token agreement and mean
KL(bf16 || fp8) of the next-token distributions, and the same for bf16 against a float32 KV cache as a yardstick.

    python3 -m benchmarks.fp8_accuracy [--length 2304] [--num-seqs 4] [--device cpu]

On CPU the torch path stores exactly the fp8 codes and scales the GPU kernels store (tests/test_fp8_kernels.py), so
the figures carry over; the random 0.6B model takes a while there (--skip-random).
"""
import argparse
import glob
import json
import os
import random
import sysconfig

import torch
from transformers import AutoConfig, AutoTokenizer

from nanovllm import LLM
from nanovllm.testing.random_checkpoint import build_qwen3_0_6b
from nanovllm.testing.teacher_forced import agreement_and_kl, engine_teacher_forced_logprobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED = os.path.join(REPO, "assets", "tiny-qwen3-stdlib")


def held_out_text() -> str:
    """The trained model's held-out stdlib files (listed in its train_log.json), else any stdlib source."""
    with open(os.path.join(TRAINED, "train_log.json")) as f:
        log = json.load(f)
    stdlib = sysconfig.get_paths()["stdlib"]
    names = log.get("held_out_file_list") or []
    paths = [os.path.join(stdlib, n) for n in names if os.path.isfile(os.path.join(stdlib, n))]
    paths = paths or sorted(glob.glob(os.path.join(stdlib, "*.py")))[:20]
    return "\n".join(open(p, encoding="utf-8", errors="replace").read() for p in paths)


def sequences(model: str, num_seqs: int, length: int) -> list[list[int]]:
    if model == TRAINED:
        ids = AutoTokenizer.from_pretrained(model).encode(held_out_text())
        if len(ids) < num_seqs * length:
            raise SystemExit(f"held-out text has {len(ids)} tokens, need {num_seqs * length}")
        return [ids[i * length:(i + 1) * length] for i in range(num_seqs)]
    rng = random.Random(0)
    return [[rng.randrange(10000) for _ in range(length)] for _ in range(num_seqs)]


def evaluate(model: str, seqs: list[list[int]], prefill: int, device: str) -> dict:
    logprobs = {}
    backend = "triton" if device == "cuda" else "torch"  # the CPU path stores the same fp8 codes and scales
    for name, dtype, kv in (("fp32", "float32", "auto"), ("bf16", "bfloat16", "auto"), ("fp8", "bfloat16", "fp8")):
        with LLM(model, dtype=dtype, kv_cache_dtype=kv, enforce_eager=True, max_model_len=len(seqs[0]) + 16,
                 attention_backend=backend, device=device, gpu_memory_utilization=0.5, kvcache_block_size=256,
                 num_kvcache_blocks=len(seqs) * -(-len(seqs[0]) // 256)) as llm:
            logprobs[name] = engine_teacher_forced_logprobs(llm, seqs, prefill)
    fp8 = agreement_and_kl(logprobs["bf16"], logprobs["fp8"])
    bf16 = agreement_and_kl(logprobs["fp32"], logprobs["bf16"])
    return dict(positions=logprobs["fp8"].shape[0] * logprobs["fp8"].shape[1], agree_fp8=fp8[0], kl_fp8=fp8[1],
                agree_bf16_vs_fp32=bf16[0], kl_bf16_vs_fp32=bf16[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=2304)
    p.add_argument("--num-seqs", type=int, default=4)
    p.add_argument("--prefill", type=int, default=48)
    p.add_argument("--random-model", default="/tmp/nanovllm-random-qwen3-0.6b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-random", action="store_true", help="only the trained model")
    args = p.parse_args()
    models = [("tiny-qwen3-stdlib (trained)", TRAINED)]
    if not args.skip_random:
        if not os.path.isdir(args.random_model):
            build_qwen3_0_6b(args.random_model)
        models.append(("Qwen3-0.6B (random)", args.random_model))
    rows = []
    for name, model in models:
        limit = AutoConfig.from_pretrained(model).max_position_embeddings  # the trained model has 2,048 positions
        r = evaluate(model, sequences(model, args.num_seqs, min(args.length, limit)), args.prefill, args.device)
        rows.append((name, r))
        print(name, r, flush=True)
    print(f"\n| model | positions (contexts {args.prefill}..{args.length} or the model's limit) | fp8 agreement | "
          "fp8 mean KL | bf16-vs-fp32 agreement | bf16-vs-fp32 mean KL |\n|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['positions']} | {r['agree_fp8']:.2%} | {r['kl_fp8']:.2e} | "
              f"{r['agree_bf16_vs_fp32']:.2%} | {r['kl_bf16_vs_fp32']:.2e} |")


if __name__ == "__main__":
    main()
