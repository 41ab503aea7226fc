"""Scale-out through Ray Data: bench.py's workload (2x by default) through nanovllm.integrations.ray with 1 engine
replica, then 2 (one GPU each), on one machine. Prints each run's throughput and, last, the ratio (target >= 1.8).

Throughput is generated tokens over the window from the first batch's start to the last batch's end (every
replica is started and warmed up before any batch is handed out), so it leaves out engine start-up but counts
Ray's dispatch and any imbalance between replicas. Exits 1 when the ratio misses the target.

    python3 -m benchmarks.ray_bench                      # from the repo root, >= 2 GPUs, Ray installed
    python3 -m benchmarks.ray_bench --num-seqs 256       # bench.py's workload exactly
"""
import argparse
import os
import sys
import time

import pyarrow as pa
import ray

from nanovllm.integrations.ray import LLMPredictor, build_processor
from nanovllm.testing.random_checkpoint import resolve_model
from nanovllm.testing.workload import make_workload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.expanduser("~/huggingface/Qwen3-0.6B/")
# Ray's workers inherit the environment: they import nanovllm (and ray, when it sits on PYTHONPATH) from here too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)

TARGET_RATIO = 1.8


class TimedPredictor(LLMPredictor):
    """LLMPredictor that warms up (as bench.py does) and stamps each batch with its wall-clock window
    and the replica's pid."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        warmup = {"prompt": ["Benchmark: "], "sampling_params": [{"temperature": 0.6}]}
        super().__call__(pa.table(warmup))  # the engine and this class's own path, once

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.time()
        out = super().__call__(batch)
        end = time.time()
        for name, value in (("t_start", start), ("t_end", end), ("replica", float(os.getpid()))):
            out = out.append_column(name, pa.array([value] * out.num_rows, pa.float64()))
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model directory; when missing, a cached random-weight Qwen3-0.6B is built and used")
    parser.add_argument("--num-seqs", type=int, default=512, help="bench.py's workload is 256; default 2x")
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256, help="rows per generate call")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="runs to make, in order")
    parser.add_argument("--enforce-eager", action="store_true")
    return parser.parse_args(argv)


def workload_rows(args: argparse.Namespace) -> list[dict]:
    prompts, params = make_workload(args.num_seqs, args.max_input_len, args.max_output_len)
    return [{"id": i, "prompt_token_ids": ids, "sampling_params": {
                "temperature": sp.temperature, "ignore_eos": sp.ignore_eos, "max_tokens": sp.max_tokens}}
            for i, (ids, sp) in enumerate(zip(prompts, params, strict=True))]


def wait_for_gpus(total: float, timeout_s: float = 120) -> None:
    """Until the last run's actors have exited and given their GPUs back to Ray."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("GPU", 0) < total and time.monotonic() < deadline:
        time.sleep(1)


def run(model: str, rows: list[dict], replicas: int, args: argparse.Namespace) -> dict:
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // args.batch_size))
    engine_kwargs = {"max_model_len": args.max_model_len, "enforce_eager": args.enforce_eager}
    process = build_processor(model, engine_kwargs, concurrency=replicas, batch_size=args.batch_size,
                              max_tasks_in_flight_per_actor=1, predictor=TimedPredictor)
    out = process(ds).to_pandas()  # no downstream operator: its tasks could hold back the next batch's dispatch
    if sorted(out["id"]) != list(range(len(rows))):
        raise RuntimeError(f"{replicas} replica(s): rows lost or duplicated ({len(out)} outputs for {len(rows)} rows)")
    tokens = int(out["num_generated_tokens"].sum())
    expected = sum(r["sampling_params"]["max_tokens"] for r in rows)
    if tokens != expected:
        print(f"warning: produced {tokens} tokens, the workload asks for {expected}", file=sys.stderr)
    window = out["t_end"].max() - out["t_start"].min()
    per_replica = out.groupby("replica")["num_generated_tokens"].agg(["count", "sum"])
    return {"replicas": replicas, "used": len(per_replica), "tokens": tokens, "seconds": window,
            "tok_s": tokens / window, "rows_per_replica": sorted(per_replica["count"].tolist())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, _ = resolve_model(args.model, in_child_process=True)
    rows = workload_rows(args)
    ray.init(include_dashboard=False, object_store_memory=4 * 1024**3)
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < max(args.replicas):
        sys.exit(f"error: {max(args.replicas)} replicas need as many GPUs; Ray sees {gpus:g}")
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = 600  # every replica is up before the first batch is handed out
    ctx.enable_progress_bars = False
    results = []
    for replicas in args.replicas:
        wait_for_gpus(gpus)
        results.append(run(model, rows, replicas, args))
        r = results[-1]
        print(f"{replicas} replica(s): {r['tokens']} tok in {r['seconds']:.2f}s = {r['tok_s']:.0f} tok/s", flush=True)
    ray.shutdown()

    print(f"\nworkload: {args.num_seqs} seqs (bench.py's draws), batch size {args.batch_size}, model {model}")
    print(f"{'replicas':>8} {'used':>4} {'rows/replica':>14} {'tokens':>8} {'seconds':>8} {'tok/s':>9} {'ratio':>6}")
    base = results[0]["tok_s"]
    for r in results:
        print(f"{r['replicas']:>8} {r['used']:>4} {str(r['rows_per_replica']):>14} {r['tokens']:>8} "
              f"{r['seconds']:>8.2f} {r['tok_s']:>9.0f} {r['tok_s'] / base:>6.2f}")
    ratio = results[-1]["tok_s"] / base
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    print(f"ratio {results[-1]['replicas']} vs {results[0]['replicas']} replica(s): {ratio:.2f} "
          f"({verdict} the target {TARGET_RATIO})")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
