"""Online serving benchmark: bench.py's workload sent to `nanovllm serve` over HTTP with Poisson arrivals at a few
request rates; throughput, TTFT and TPOT percentiles per rate, against bench.py's offline throughput on the same
workload and engine settings (run first, in its own process).

    python3 -m benchmarks.serving_bench --out /tmp/serving              # from the repo root, one GPU
    python3 -m benchmarks.serving_bench --rates 16 inf --num-seqs 64   # quicker

Per rate, requests go out at exponentially distributed gaps (seeded; `inf`: all at once) in the workload's order,
streamed, each with the workload's max_tokens, temperature 0.6 and ignore_eos. The saturating rate (`inf`, run
first) uses bench.py's exact workload; every other rate draws its own (same distribution, another seed), so no run
gets prefix-cache hits from an earlier one. TTFT: request sent -> first chunk carrying a token. TPOT: (last token -
first token) / (output tokens - 1). Throughput: output tokens / (first request sent -> last response done). A rate's
run is cut off after --rate-timeout s and the whole benchmark stops starting runs after --time-budget s (unfinished
requests are cancelled and reported). The client side uses only asyncio and aiohttp. Writes serving_bench.json and
serving_bench.png under --out, prints a markdown table last, and exits 1 when the saturating rate's throughput is
below --target times the offline throughput.
"""
import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp
import numpy as np

from nanovllm.testing.workload import make_workload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.expanduser("~/huggingface/Qwen3-0.6B/")
SERVED_NAME = "bench"
WARMUP_REQUESTS = 8


@dataclass
class Result:
    """One request, times in seconds from the run's start."""
    sent: float
    first_token: float | None = None
    last_token: float | None = None
    done: float | None = None
    output_tokens: int = 0
    expected_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.done is not None and self.output_tokens == self.expected_tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model directory; when missing, a cached random-weight Qwen3-0.6B is built and used")
    parser.add_argument("--out", required=True, help="directory for serving_bench.json, .png and the logs")
    parser.add_argument("--rates", nargs="+", default=["inf", "32", "16", "8", "4"],
                        help="request rates in requests/s, 'inf' = all at once (default: %(default)s)")
    parser.add_argument("--num-seqs", type=int, default=256, help="requests per rate (default: %(default)s)")
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--rate-timeout", type=float, default=120.0, help="cut-off per rate, s (default: %(default)s)")
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="no rate starts after this many seconds of the whole run (default: %(default)s)")
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="bench.py and the server must each be up within this, s (default: %(default)s)")
    parser.add_argument("--target", type=float, default=0.9,
                        help="saturating-rate throughput / offline throughput to pass (default: %(default)s)")
    parser.add_argument("--skip-offline", action="store_true", help="no bench.py run (no ratio, no pass/fail)")
    parser.add_argument("--no-engine-process", action="store_true",
                        help="serve with the engine loop in a thread of the server (default: its own process)")
    args = parser.parse_args(argv)
    try:
        args.rates = [math.inf if r == "inf" else float(r) for r in args.rates]
    except ValueError:
        parser.error(f"--rates takes numbers or 'inf', got {args.rates}")
    if any(r <= 0 for r in args.rates):
        parser.error("--rates must be > 0")
    args.rates.sort(reverse=True)  # the saturating rate first: it gets bench.py's exact workload
    if args.max_input_len + args.max_output_len > args.max_model_len:
        parser.error("--max-model-len must hold --max-input-len + --max-output-len")
    return args


def engine_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--max-model-len", str(args.max_model_len), "--tensor-parallel-size", str(args.tensor_parallel_size)]
    return flags + (["--enforce-eager"] if args.enforce_eager else [])


def run_offline(model: str, args: argparse.Namespace) -> dict:
    """bench.py on the same workload and engine settings: its output tokens, seconds and tok/s."""
    cmd = [sys.executable, "bench.py", "--model", model, "--num-seqs", str(args.num_seqs), "--max-input-len",
           str(args.max_input_len), "--max-output-len", str(args.max_output_len)] + engine_flags(args)
    print("offline:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.start_timeout)
    with open(os.path.join(args.out, "offline.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    found = re.search(r"Total: (\d+)tok, Time: ([\d.]+)s, Throughput: ([\d.]+)tok/s", proc.stdout)
    if proc.returncode != 0 or found is None:
        sys.exit(f"error: bench.py failed (exit {proc.returncode}); see {args.out}/offline.log:\n"
                 f"{(proc.stdout + proc.stderr)[-2000:]}")
    tokens, seconds, tps = found.groups()
    return {"output_tokens": int(tokens), "seconds": float(seconds), "tok_per_s": float(tps)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`nanovllm serve` in a child process on 127.0.0.1 and a free port, logging to a file."""

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "nanovllm", "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", SERVED_NAME, "--uvicorn-log-level", "warning"] + engine_flags(args)
        if args.no_engine_process:
            cmd.append("--no-engine-process")
        print("server:", " ".join(cmd), file=sys.stderr)
        self.log_path = os.path.join(args.out, "server.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    sys.exit(f"error: the server exited ({self.proc.returncode}); see {self.log_path}")
                try:
                    async with session.get(f"{self.url}/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        self.stop()
        sys.exit(f"error: the server was not up within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def send(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int, delay: float,
               t0: float) -> Result:
    """One streamed completion, sent delay s after t0; times relative to t0."""
    await asyncio.sleep(max(t0 + delay - time.perf_counter(), 0.0))
    result = Result(sent=time.perf_counter() - t0, expected_tokens=max_tokens)
    payload = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.6,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
               "return_token_ids": True}
    try:
        async with session.post(f"{url}/v1/completions", json=payload) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                now = time.perf_counter() - t0
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))[:200]
                    return result
                if any(choice.get("token_ids") for choice in chunk["choices"]):
                    result.first_token = now if result.first_token is None else result.first_token
                    result.last_token = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
        result.done = time.perf_counter() - t0
    except aiohttp.ClientError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_rate(url: str, rate: float, prompts: list[list[int]], max_tokens: list[int], timeout: float,
                   seed: int) -> list[Result]:
    """Every request at Poisson arrivals of `rate`; the ones still running after timeout s are cancelled."""
    rng = random.Random(seed)
    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(send(session, url, p, m, d, t0))
                 for p, m, d in zip(prompts, max_tokens, delays, strict=True)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return [task.result() if task in done else Result(sent=math.nan, error="cut off", expected_tokens=m)
            for task, m in zip(tasks, max_tokens, strict=True)]


async def wait_idle(session: aiohttp.ClientSession, url: str, timeout: float = 60.0) -> None:
    """Until the engine has no unfinished request (cancelled requests are aborted by then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with session.get(f"{url}/metrics") as resp:
            if re.search(r"^nanovllm:num_requests_unfinished 0$", await resp.text(), re.M):
                return
        await asyncio.sleep(0.2)


def percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    p50, p99 = np.percentile(np.array(values), [50, 99])
    return float(p50) * 1e3, float(p99) * 1e3  # ms


def summarize(rate: float, results: list[Result]) -> dict:
    ok = [r for r in results if r.ok]
    started = [r.sent for r in results if not math.isnan(r.sent)]
    duration = max((r.done for r in ok), default=math.nan) - min(started, default=math.nan)
    tokens = sum(r.output_tokens for r in ok)
    ttft = percentiles([r.first_token - r.sent for r in ok])
    tpot = percentiles([(r.last_token - r.first_token) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1])
    errors = sorted({r.error for r in results if r.error})
    return {"rate": "inf" if math.isinf(rate) else rate, "requests": len(results), "completed": len(ok),
            "output_tokens": tokens, "seconds": duration, "tok_per_s": tokens / duration if ok else 0.0,
            "req_per_s": len(ok) / duration if ok else 0.0, "ttft_p50_ms": ttft[0], "ttft_p99_ms": ttft[1],
            "tpot_p50_ms": tpot[0], "tpot_p99_ms": tpot[1], "errors": errors[:5]}


async def benchmark(url: str, args: argparse.Namespace, start: float) -> list[dict]:
    async with aiohttp.ClientSession() as session:
        prompts, params = make_workload(WARMUP_REQUESTS, args.max_input_len, args.max_output_len, rng_seed=1000)
        await run_rate(url, math.inf, prompts, [min(p.max_tokens, 16) for p in params], args.rate_timeout, 0)
        await wait_idle(session, url)
        summaries = []
        for i, rate in enumerate(args.rates):
            left = args.time_budget - (time.perf_counter() - start)
            if left <= 5:
                print(f"time budget spent: rate {rate} skipped", file=sys.stderr)
                continue
            prompts, params = make_workload(args.num_seqs, args.max_input_len, args.max_output_len, rng_seed=i)
            results = await run_rate(url, rate, prompts, [p.max_tokens for p in params],
                                     min(args.rate_timeout, left), seed=i)
            summaries.append(summarize(rate, results))
            print(json.dumps(summaries[-1]), file=sys.stderr)
            await wait_idle(session, url)
        return summaries


def plot(path: str, summaries: list[dict], offline: dict | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    finite = [s["rate"] for s in summaries if s["rate"] != "inf"]
    inf_x = max(finite, default=1.0) * 2
    order = sorted(summaries, key=lambda s: inf_x if s["rate"] == "inf" else s["rate"])
    xs = [inf_x if s["rate"] == "inf" else s["rate"] for s in order]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric, title in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "tpot", "TPOT (ms)")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(xs, [s[f"{metric}_{q}_ms"] for s in order], style, label=q)
        ax.set_title(title)
        ax.set_yscale("log")
    axes[2].plot(xs, [s["tok_per_s"] for s in order], "o-", label="server")
    if offline is not None:
        axes[2].axhline(offline["tok_per_s"], color="gray", linestyle=":", label="offline (bench.py)")
    axes[2].set_title("output tok/s")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(xs, [("inf" if s["rate"] == "inf" else f"{s['rate']:g}") for s in order])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(summaries: list[dict], offline: dict | None) -> str:
    rows = ["| rate (req/s) | completed | output tokens | seconds | output tok/s | of offline | TTFT p50 | TTFT p99 | "
            "TPOT p50 | TPOT p99 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if offline is not None:
        rows.append(f"| offline (bench.py) | | {offline['output_tokens']:,} | {offline['seconds']:.2f} | "
                    f"{offline['tok_per_s']:,.0f} | 100% | | | | |")
    for s in summaries:
        ratio = f"{s['tok_per_s'] / offline['tok_per_s']:.1%}" if offline else "-"
        rate = s["rate"] if s["rate"] == "inf" else f"{s['rate']:g}"
        rows.append(f"| {rate} | {s['completed']}/{s['requests']} | {s['output_tokens']:,} | {s['seconds']:.2f} "
                    f"| {s['tok_per_s']:,.0f} | {ratio} | {s['ttft_p50_ms']:.0f} ms | {s['ttft_p99_ms']:.0f} ms | "
                    f"{s['tpot_p50_ms']:.1f} ms | {s['tpot_p99_ms']:.1f} ms |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    from nanovllm.testing.random_checkpoint import resolve_model  # loads torch (CPU); the GPU stays untouched
    model, random_weights = resolve_model(args.model, in_child_process=True)
    offline = None if args.skip_offline else run_offline(model, args)
    server = Server(model, args)
    try:
        asyncio.run(server.wait_ready(args.start_timeout))
        summaries = asyncio.run(benchmark(server.url, args, start))
    finally:
        server.stop()
    saturating = summaries[0] if summaries and summaries[0]["rate"] == "inf" else None
    ratio = saturating["tok_per_s"] / offline["tok_per_s"] if saturating and offline else None
    report = {"model": model, "random_weights": random_weights, "args": vars(args) | {"rates": [
        "inf" if math.isinf(r) else r for r in args.rates]}, "offline": offline, "rates": summaries,
        "saturating_over_offline": ratio, "target": args.target, "seconds": time.perf_counter() - start}
    with open(os.path.join(args.out, "serving_bench.json"), "w") as f:
        json.dump(report, f, indent=2)
    if summaries:
        plot(os.path.join(args.out, "serving_bench.png"), summaries, offline)
    print(f"\nModel: {model}{' (RANDOM WEIGHTS)' if random_weights else ''}; {args.num_seqs} requests per rate; "
          f"wrote {args.out}/serving_bench.json and .png; {time.perf_counter() - start:.0f} s in all")
    if ratio is not None:
        verdict = "PASS" if ratio >= args.target else "FAIL"
        print(f"{verdict}: saturating-rate throughput is {ratio:.1%} of offline (target {args.target:.0%})")
    print(table(summaries, offline))
    if ratio is not None and ratio < args.target:
        sys.exit(1)


if __name__ == "__main__":
    main()
