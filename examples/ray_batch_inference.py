"""Offline batch inference over many engine replicas with Ray Data: prompts from JSONL or Parquet, results to Parquet.

Input rows: {"prompt": "text"} or {"prompt_token_ids": [1, 2, 3]}, with an optional "sampling_params" dict that
overrides the command line's defaults for that row ({"max_tokens": 32, "temperature": 0}); other columns (an "id",
say) are kept. Output: a directory of Parquet files, one row per input row, in input order, with generated_text,
generated_token_ids, finish_reason, num_prompt_tokens and num_generated_tokens added.

    # one machine (a laptop, or a host with N GPUs: one replica per GPU, or per --tensor-parallel-size GPUs)
    python examples/ray_batch_inference.py --model ~/huggingface/Qwen3-0.6B --input prompts.jsonl --output results
    # the same on a CPU-only laptop
    python examples/ray_batch_inference.py --model DIR --input prompts.jsonl --output results --device cpu
    # a cluster: `ray start --head` on one node, `ray start --address=HEAD_IP:6379` on the others, then on the head
    python examples/ray_batch_inference.py --address auto --model DIR --input /shared/in.parquet --output /shared/out
"""
import argparse
import json
import os
import sys
import time

import ray
from ray.data.aggregate import Count, Sum

from nanovllm.integrations.ray import build_processor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory (the same path on every node)")
    parser.add_argument("--input", required=True, help="a .jsonl/.json or .parquet file, or a directory of them "
                                                       "(on a cluster: shared or cloud storage, s3://...)")
    parser.add_argument("--output", required=True, help="directory for the Parquet results (on a cluster: shared or "
                                                        "cloud storage, s3://...)")
    parser.add_argument("--address", default=None, help="Ray cluster address ('auto' = the cluster this node "
                                                        "joined); default: $RAY_ADDRESS, else a local Ray")
    parser.add_argument("--replicas", type=int, default=None,
                        help="engine replicas; default: the cluster's GPUs // tensor-parallel-size (1 on CPU)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--engine-kwargs", type=json.loads, default={},
                        help='more LLM(...) arguments as JSON, e.g. \'{"kvcache_block_size": 16}\'')
    parser.add_argument("--batch-size", type=int, default=256, help="rows per generate call")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--ignore-eos", action="store_true")
    return parser.parse_args(argv)


JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def read_prompts(path: str) -> ray.data.Dataset:
    """JSONL (one object per line) or Parquet, by the file's extension; a directory or prefix is read as Parquet
    unless it is a local directory holding .jsonl/.json files."""
    name = path.rstrip("/").lower()
    if name.endswith(JSON_SUFFIXES) or (os.path.isdir(path) and
                                        any(n.lower().endswith(JSON_SUFFIXES) for n in os.listdir(path))):
        return ray.data.read_json(path)
    return ray.data.read_parquet(path)


def num_replicas(args: argparse.Namespace) -> int:
    if args.device == "cpu":
        cpus = int(ray.cluster_resources().get("CPU", 0))
        replicas = 1 if args.replicas is None else args.replicas
        if replicas >= cpus:  # each replica holds a CPU; reading and writing need at least one more
            raise SystemExit(f"error: {replicas} CPU replica(s) need at least {replicas + 1} CPUs in the Ray cluster "
                             f"(one more for reading and writing), which has {cpus}; lower --replicas")
        return replicas
    if args.replicas is not None:
        return args.replicas
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < args.tensor_parallel_size:
        raise SystemExit(f"error: the Ray cluster has {gpus} GPU(s), fewer than --tensor-parallel-size="
                         f"{args.tensor_parallel_size}; use --device cpu on a machine without GPUs")
    return gpus // args.tensor_parallel_size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ray.init(address=args.address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # output rows in input order
    replicas = num_replicas(args)
    engine_kwargs = {"tensor_parallel_size": args.tensor_parallel_size, "max_model_len": args.max_model_len,
                     "enforce_eager": args.enforce_eager, "device": args.device, **args.engine_kwargs}
    sampling_params = {"temperature": args.temperature, "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos}
    process = build_processor(os.path.expanduser(args.model), engine_kwargs, sampling_params=sampling_params,
                              concurrency=replicas, batch_size=args.batch_size)
    print(f"{replicas} replica(s) x {args.tensor_parallel_size} GPU(s)" if args.device != "cpu"
          else f"{replicas} CPU replica(s)", file=sys.stderr)

    start = time.perf_counter()
    process(read_prompts(args.input)).write_parquet(args.output)
    seconds = time.perf_counter() - start
    stats = ray.data.read_parquet(args.output).select_columns(["num_generated_tokens"]).aggregate(
        Count(), Sum("num_generated_tokens"))
    rows, tokens = stats["count()"], stats["sum(num_generated_tokens)"] or 0
    print(f"{rows} rows, {tokens} generated tokens in {seconds:.1f}s ({tokens / seconds:.0f} tok/s, start-up "
          f"included) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
