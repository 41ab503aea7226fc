"""Offline throughput benchmark with upstream nano-vllm's workload and output line; --latency for ms per decode step.

The workload (as upstream): 256 prompts of 100..1024 random token ids drawn from [0, 10000] (so the model needs a
vocabulary of more than 10,000 ids), each generating 100..1024 tokens at temperature 0.6 with ignore_eos. Without the
model directory it benchmarks a random-weight checkpoint with Qwen3-0.6B's exact configuration (built once and cached
in ~/.cache/nanovllm): throughput does not depend on the weights' values.
"""
import argparse
import os
import sys
import time
from random import randint, seed

from nanovllm import SamplingParams
from nanovllm.testing.workload import MAX_PROMPT_TOKEN_ID, make_workload

DEFAULT_MODEL = os.path.expanduser("~/huggingface/Qwen3-0.6B/")
LATENCY_BATCHES = (1, 8)
LATENCY_PROMPT, LATENCY_OUTPUT = 128, 512


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model directory (default: %(default)s; when it is "
                        "missing, a cached random-weight Qwen3-0.6B is used)")
    parser.add_argument("--num-seqs", type=int, default=256, help="requests (default: %(default)s)")
    parser.add_argument("--max-input-len", type=int, default=1024, help="longest prompt (default: %(default)s)")
    parser.add_argument("--max-output-len", type=int, default=1024, help="longest output (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="engine max_model_len; must hold the "
                        "longest prompt plus output (default: %(default)s)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="(default: %(default)s)")
    parser.add_argument("--enforce-eager", action="store_true", help="run decode without CUDA graphs")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                        help="KV-cache element type: the model's (auto) or float8 e4m3 (default: %(default)s)")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="the serial step loop instead of overlap scheduling (for comparison)")
    parser.add_argument("--latency", action="store_true", help=f"instead of throughput: ms per decode step at batch "
                        f"{' and '.join(map(str, LATENCY_BATCHES))}, {LATENCY_PROMPT}-token prompts")
    parser.add_argument("--latency-output-len", type=int, default=LATENCY_OUTPUT,
                        help="tokens generated per request in --latency mode (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.max_input_len < 100 or args.max_output_len < 100:
        parser.error("--max-input-len and --max-output-len must be >= 100 (lengths are drawn from [100, max])")
    if args.latency_output_len < 2:
        parser.error("--latency-output-len must be >= 2")
    need = LATENCY_PROMPT + args.latency_output_len if args.latency else args.max_input_len + args.max_output_len
    if args.max_model_len < need:
        parser.error(f"--max-model-len {args.max_model_len} cannot hold the workload's longest request ({need} "
                     "tokens); raise it or lower --max-input-len / --max-output-len")
    return args


def check_vocab(llm, max_token_id: int = MAX_PROMPT_TOKEN_ID) -> None:
    vocab_size = llm.config.hf_config.vocab_size
    if vocab_size <= max_token_id:
        sys.exit(f"error: the workload's prompt token ids reach {max_token_id}, but the model's vocabulary has only "
                 f"{vocab_size} entries (bench.py needs a model with more than {max_token_id} token ids)")


def throughput(llm, args: argparse.Namespace) -> None:
    prompt_token_ids, sampling_params = make_workload(args.num_seqs, args.max_input_len, args.max_output_len)
    llm.generate(["Benchmark: "], SamplingParams())  # warm-up
    t = time.perf_counter()
    outputs = llm.generate(prompt_token_ids, sampling_params, use_tqdm=False)
    t = time.perf_counter() - t
    total_tokens = sum(len(o["token_ids"]) for o in outputs)
    expected = sum(sp.max_tokens for sp in sampling_params)
    if total_tokens != expected:
        print(f"warning: produced {total_tokens} tokens, the workload asks for {expected}", file=sys.stderr)
    print(f"Total: {total_tokens}tok, Time: {t:.2f}s, Throughput: {total_tokens / t:.2f}tok/s")


def latency(llm, output_len: int) -> None:
    """ms per decode step: (time for output_len tokens - time for 1 token) / (output_len - 1), median of 3 runs per
    batch size."""
    seed(0)
    llm.generate([[randint(0, MAX_PROMPT_TOKEN_ID) for _ in range(LATENCY_PROMPT)]], SamplingParams(max_tokens=16),
                 use_tqdm=False)  # warm-up

    def timed(prompts: list[list[int]], max_tokens: int) -> float:
        sp = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens)
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t

    for batch in LATENCY_BATCHES:
        runs = []
        for _ in range(3):  # fresh prompts every run: no prefix-cache hits
            prompts = [[randint(0, MAX_PROMPT_TOKEN_ID) for _ in range(LATENCY_PROMPT)] for _ in range(batch)]
            first = timed(prompts, 1)
            prompts = [[randint(0, MAX_PROMPT_TOKEN_ID) for _ in range(LATENCY_PROMPT)] for _ in range(batch)]
            runs.append((timed(prompts, output_len) - first) / (output_len - 1) * 1e3)
        print(f"Latency: batch {batch}, prompt {LATENCY_PROMPT}, {output_len} tokens: "
              f"{sorted(runs)[1]:.3f} ms/step (runs: {', '.join(f'{r:.3f}' for r in runs)})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from nanovllm import LLM
    from nanovllm.testing.random_checkpoint import resolve_model
    if args.model != DEFAULT_MODEL and not os.path.isdir(os.path.expanduser(args.model)):
        sys.exit(f"error: model directory {args.model!r} does not exist (leave out --model to benchmark "
                 f"a random-weight Qwen3-0.6B when {DEFAULT_MODEL} is missing)")
    path, random_weights = resolve_model(args.model)
    llm = LLM(path, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
              tensor_parallel_size=args.tensor_parallel_size, async_scheduling=not args.no_async_scheduling,
              kv_cache_dtype=args.kv_cache_dtype)
    check_vocab(llm)
    if random_weights:
        print(f"Model: {path} (RANDOM WEIGHTS, Qwen3-0.6B's configuration; throughput does not depend on them)")
    if args.latency:
        latency(llm, args.latency_output_len)
    else:
        throughput(llm, args)
    llm.exit()


if __name__ == "__main__":
    main()
