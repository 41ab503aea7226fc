"""Offline throughput benchmark with upstream nano-vllm's workload and output line.

Without the model directory it benchmarks a random-weight checkpoint with Qwen3-0.6B's exact configuration
(built once and cached; see benchmarks/random_checkpoint.py): throughput does not depend on the weights' values.
"""
import argparse
import os
import sys
import time
from random import randint, seed

from nanovllm import SamplingParams

DEFAULT_MODEL = os.path.expanduser("~/huggingface/Qwen3-0.6B/")
MAX_PROMPT_TOKEN_ID = 10000


def make_workload(num_seqs: int = 256, max_input_len: int = 1024, max_output_len: int = 1024,
                  rng_seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Upstream's draws, in upstream's order: every prompt first, then every request's max_tokens."""
    seed(rng_seed)
    prompt_token_ids = [[randint(0, MAX_PROMPT_TOKEN_ID) for _ in range(randint(100, max_input_len))]
                        for _ in range(num_seqs)]
    sampling_params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_output_len))
                       for _ in range(num_seqs)]
    return prompt_token_ids, sampling_params


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model directory; when the default is missing, a cached random-weight Qwen3-0.6B is used")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enforce-eager", action="store_true", help="run decode without CUDA graphs")
    args = parser.parse_args(argv)
    if args.max_input_len < 100 or args.max_output_len < 100:
        parser.error("--max-input-len and --max-output-len must be >= 100 (lengths are drawn from [100, max])")
    return args


def check_vocab(llm, max_token_id: int = MAX_PROMPT_TOKEN_ID) -> None:
    vocab_size = llm.config.hf_config.vocab_size
    if vocab_size <= max_token_id:
        sys.exit(f"error: the workload's prompt token ids reach {max_token_id}, but the model's vocabulary "
                 f"has only {vocab_size} entries")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from nanovllm import LLM
    from benchmarks.random_checkpoint import resolve_model
    if args.model != DEFAULT_MODEL and not os.path.isdir(os.path.expanduser(args.model)):
        sys.exit(f"error: model directory {args.model!r} does not exist (leave out --model to benchmark "
                 f"a random-weight Qwen3-0.6B when {DEFAULT_MODEL} is missing)")
    path, random_weights = resolve_model(args.model)
    llm = LLM(path, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
              tensor_parallel_size=args.tensor_parallel_size)
    check_vocab(llm)
    prompt_token_ids, sampling_params = make_workload(args.num_seqs, args.max_input_len, args.max_output_len)

    llm.generate(["Benchmark: "], SamplingParams())  # warm-up
    t = time.perf_counter()
    outputs = llm.generate(prompt_token_ids, sampling_params, use_tqdm=False)
    t = time.perf_counter() - t

    total_tokens = sum(len(o["token_ids"]) for o in outputs)
    expected = sum(sp.max_tokens for sp in sampling_params)
    if total_tokens != expected:
        print(f"warning: produced {total_tokens} tokens, the workload asks for {expected}", file=sys.stderr)
    if random_weights:
        print(f"Model: {path} (RANDOM WEIGHTS, Qwen3-0.6B's configuration; throughput does not depend on them)")
    throughput = total_tokens / t
    print(f"Total: {total_tokens}tok, Time: {t:.2f}s, Throughput: {throughput:.2f}tok/s")
    llm.exit()


if __name__ == "__main__":
    main()
