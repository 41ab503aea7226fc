"""AsyncLLM (issue 18): the engine loop on a background thread, or in a process of its own (engine_process=True),
behind an asyncio API; every behaviour below is checked in both. Streamed outputs add up to LLM.generate's,
concurrent requests share batches, abort (explicit or by leaving the loop) frees the blocks, bad requests raise at
once without disturbing the engine, a failed step fails only its requests, and with TP=2 a killed worker makes every
call raise EngineDeadError. Tiny random Qwen3 on CPU, float32."""
import asyncio
import os
import time
from contextlib import aclosing

import pytest

from nanovllm import LLM, AsyncLLM, EngineDeadError, RequestsFailedError, SamplingParams

CPU = dict(device="cpu", dtype="float32", kvcache_block_size=16, max_model_len=256, num_kvcache_blocks=64)
PROMPTS = ["hello world", [5, 6, 7, 8, 9], {"prompt": "nano vllm is a small"}, "the quick brown fox jumps over"]
PARAMS = [SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True),
          SamplingParams(temperature=0.9, max_tokens=10, seed=3, n=2),
          SamplingParams(temperature=0, max_tokens=20, stop=["vll"], ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=7, min_tokens=7)]
DEADLINE_S = 20


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, DEADLINE_S))


@pytest.fixture(scope="module")
def expected(tiny_model) -> list[dict]:
    with LLM(tiny_model, **CPU) as llm:
        return [llm.generate([p], sp, use_tqdm=False)[0] for p, sp in zip(PROMPTS, PARAMS, strict=True)]


MODES = {"thread": False, "process": True}  # engine_process


@pytest.fixture(scope="module", params=list(MODES))
def llm(tiny_model, request):
    with AsyncLLM(tiny_model, engine_process=MODES[request.param], **CPU) as engine:
        yield engine


def core_alive(engine: AsyncLLM) -> bool:
    core = engine._core
    return core.process.is_alive() if MODES["process"] and hasattr(core, "process") else core.thread.is_alive()


def fail_next_step(engine) -> None:
    """(Runs on the engine's thread, in whichever process.) The next step's model run raises."""
    runner = engine.model_runner
    original = runner.run

    def run_once(step):
        runner.run = original
        raise RuntimeError("injected step failure")
    runner.run = run_once


def kill_first_worker(engine) -> None:
    engine.model_runner.workers.processes[0].kill()


async def assert_dead_after(engine: AsyncLLM, kill, match: str | None = None) -> None:
    """await kill() while a request streams: that stream, a health check and a new request raise EngineDeadError."""
    stream = engine.generate("hello", SamplingParams(max_tokens=200, ignore_eos=True))
    await stream.__anext__()
    await kill()
    with pytest.raises(EngineDeadError, match=match):
        async for _ in stream:
            pass
    with pytest.raises(EngineDeadError):
        await engine.check_health()
    with pytest.raises(EngineDeadError):
        await engine.generate("hello").__anext__()


async def collect(llm: AsyncLLM, prompt, sp: SamplingParams, request_id: str | None = None) -> dict[int, dict]:
    """Every sample's concatenated outputs, with how many outputs were finished (only the last may be)."""
    got: dict[int, dict] = {}
    async for out in llm.generate(prompt, sp, request_id=request_id):
        g = got.setdefault(out.index, dict(text="", token_ids=[], logprobs=[], finished=[], finish_reason=None))
        g["text"] += out.text
        g["token_ids"] += out.token_ids
        g["logprobs"] += out.logprobs or []
        g["finished"].append(out.finished)
        g["finish_reason"] = out.finish_reason
    return got


async def wait_idle(llm: AsyncLLM) -> dict:
    """Engine stats once nothing is unfinished (aborts are asynchronous when a consumer just leaves)."""
    for _ in range(200):
        stats = await llm.stats()
        if stats["num_requests_unfinished"] == 0:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"requests still unfinished: {stats}")


def test_streams_add_up_to_generate_outputs(llm, expected):
    """Four requests at once (text, token-id and dict prompts; logprobs; n=2 seeded; a stop string; min_tokens):
    each sample's deltas concatenate to LLM.generate's text, token ids and logprobs; only its last output is
    finished and it carries the finish reason."""
    async def main():
        return await asyncio.gather(*(collect(llm, p, sp) for p, sp in zip(PROMPTS, PARAMS, strict=True)))

    for got, want, sp in zip(run(main()), expected, PARAMS, strict=True):
        samples = want.get("outputs", [want])
        assert sorted(got) == list(range(sp.n))
        for index, sample in enumerate(samples):
            g = got[index]
            assert (g["text"], g["token_ids"], g["finish_reason"]) == (sample["text"], sample["token_ids"],
                                                                       sample["finish_reason"])
            assert g["finished"][-1] and not any(g["finished"][:-1])
            if "logprobs" in sample:
                assert [e.keys() for e in g["logprobs"]] == [e.keys() for e in sample["logprobs"]]
                # float32 sums round differently in a batch of four than alone (and on another thread's BLAS
                # partitioning): equal up to rounding that grows with |logprob|
                diffs = [(i, t, lp, sample["logprobs"][i][t]) for i, e in enumerate(g["logprobs"])
                         for t, lp in e.items() if lp != pytest.approx(sample["logprobs"][i][t], abs=1e-4, rel=1e-4)]
                assert not diffs, f"(position, token, streamed, generate) differing: {diffs}"
    assert expected[2]["finish_reason"] == "stop"  # the stop string was hit: the case is exercised


def test_concurrent_requests_share_steps(llm, expected):
    """16 requests in flight at once run in shared batches: far fewer engine steps than one after another."""
    sp = SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True)

    async def main():
        before = (await llm.stats())["num_steps"]
        outs = await asyncio.gather(*(collect(llm, PROMPTS[0], sp) for _ in range(16)))
        return outs, (await llm.stats())["num_steps"] - before

    outs, steps = run(main())
    assert all(o[0]["token_ids"] == expected[0]["token_ids"] for o in outs)
    assert steps < 3 * (sp.max_tokens + 1), steps  # one at a time: >= 16 * 13 steps


def test_abort_ends_the_stream_and_frees_blocks(llm):
    async def main():
        total = (await llm.stats())["kv_cache_total_blocks"]
        sp = SamplingParams(max_tokens=200, ignore_eos=True, n=2)
        outputs = []
        async with aclosing(llm.generate("hello world " * 8, sp, request_id="long")) as stream:
            async for out in stream:
                outputs.append(out)
                if len(outputs) == 1:
                    assert (await llm.stats())["kv_cache_free_blocks"] < total
                    assert await llm.abort("long") is True
        assert await llm.abort("long") is False
        stats = await wait_idle(llm)
        return outputs, stats, total

    outputs, stats, total = run(main())
    last = {o.index: o for o in outputs}
    assert sorted(last) == [0, 1] and all(o.finish_reason == "abort" and o.finished for o in last.values())
    assert stats["kv_cache_free_blocks"] == total


def test_leaving_the_loop_aborts(llm):
    """A consumer that stops early (break, then the generator is closed) aborts its request: blocks freed."""
    async def main():
        before = await llm.stats()
        async with aclosing(llm.generate("hello", SamplingParams(max_tokens=200, ignore_eos=True))) as stream:
            async for _ in stream:
                break
        return before, await wait_idle(llm)

    before, after = run(main())
    assert after["num_requests_aborted"] == before["num_requests_aborted"] + 1
    assert after["kv_cache_free_blocks"] == after["kv_cache_total_blocks"]


@pytest.mark.parametrize("prompt, sp, match", [
    ("", SamplingParams(), "empty"),
    ([5, 999_999], SamplingParams(), "token ids"),
    ("hello", SamplingParams(max_tokens=300), "max_model_len"),
    ("hello", "greedy", "SamplingParams"),
])
def test_bad_requests_raise_at_once(llm, prompt, sp, match):
    async def main():
        with pytest.raises(ValueError, match=match):
            await llm.generate(prompt, sp).__anext__()
        return await collect(llm, "hello", SamplingParams(temperature=0, max_tokens=3))

    assert len(run(main())[0]["token_ids"]) == 3


def test_duplicate_request_id_is_refused(llm):
    async def main():
        async with aclosing(llm.generate("hello", SamplingParams(max_tokens=50), request_id="dup")) as first:
            await first.__anext__()
            with pytest.raises(ValueError, match="already in flight"):
                await llm.generate("hello", request_id="dup").__anext__()
        return await wait_idle(llm)

    run(main())


def test_a_failed_step_fails_only_its_requests(llm):
    """The model raising in one step: that step's request gets RequestsFailedError, the engine serves on."""
    async def main():
        await llm.run_on_engine(fail_next_step)
        with pytest.raises(RequestsFailedError, match="injected step failure"):
            await collect(llm, "hello", SamplingParams(max_tokens=5))
        assert not llm.is_dead
        return await collect(llm, "hello", SamplingParams(temperature=0, max_tokens=4))

    assert len(run(main())[0]["token_ids"]) == 4


@pytest.mark.parametrize("mode", list(MODES))
def test_unknown_engine_argument_raises_from_the_constructor(tiny_model, mode):
    with pytest.raises(ValueError, match="unknown engine argument"):
        AsyncLLM(tiny_model, engine_process=MODES[mode], bogus=1)


@pytest.mark.parametrize("mode", list(MODES))
def test_shutdown_fails_requests_in_flight(tiny_model, mode):
    engine = AsyncLLM(tiny_model, engine_process=MODES[mode], **CPU)

    async def main():
        stream = engine.generate("hello", SamplingParams(max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        engine.shutdown()
        with pytest.raises(RuntimeError, match="shut down"):
            async for _ in stream:
                pass
        with pytest.raises(RuntimeError, match="shut down"):
            await engine.generate("hello").__anext__()

    run(main())
    assert not core_alive(engine)
    engine.shutdown()  # idempotent


@pytest.mark.parametrize("mode", list(MODES))
def test_tensor_parallel_outputs_and_a_killed_worker(tiny_model, expected, mode):
    """TP=2 (gloo): the same outputs as TP=1; after a worker is killed, the request in flight and every later
    call raise EngineDeadError and is_dead turns True."""
    engine = AsyncLLM(tiny_model, tensor_parallel_size=2, engine_process=MODES[mode], **CPU)
    try:
        async def main():
            got = await collect(engine, PROMPTS[0], PARAMS[0])
            assert got[0]["token_ids"] == expected[0]["token_ids"]
            await engine.check_health()
            await assert_dead_after(engine, lambda: engine.run_on_engine(kill_first_worker))

        start = time.monotonic()
        run(main())
        assert engine.is_dead and time.monotonic() - start < DEADLINE_S
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False])
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_engine_on_its_thread_equals_generate(tiny_model, enforce_eager, mode):
    """On CUDA the engine (torch.compile, CUDA graphs, Triton kernels) is built and stepped on AsyncLLM's
    thread (in this process or its engine process): 32 concurrent greedy streams equal LLM.generate's outputs."""
    prompts = [[(7 * i + j) % 300 + 3 for j in range(5 + 3 * i)] for i in range(32)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kwargs = dict(kvcache_block_size=16, max_model_len=256, num_kvcache_blocks=256, attention_backend="triton",
                  enforce_eager=enforce_eager)
    with LLM(tiny_model, **kwargs) as llm:
        want = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    async def all_streams(engine: AsyncLLM) -> list:
        return await asyncio.wait_for(asyncio.gather(*(collect(engine, p, sp) for p in prompts)), 120)

    with AsyncLLM(tiny_model, engine_process=MODES[mode], **kwargs) as engine:
        got = asyncio.run(all_streams(engine))  # gather needs a running loop (Python >= 3.12)
    assert [g[0]["token_ids"] for g in got] == want


def test_engine_process_refuses_unpicklable_functions_and_serves_on(tiny_model):
    """engine_process=True: run_on_engine with a lambda raises TypeError naming the fix; the engine serves on."""
    with AsyncLLM(tiny_model, engine_process=True, **CPU) as engine:
        async def main():
            with pytest.raises(TypeError, match="picklable"):
                await engine.run_on_engine(lambda e: 1)
            return await collect(engine, "hello", SamplingParams(temperature=0, max_tokens=3))

        assert len(run(main())[0]["token_ids"]) == 3
        assert engine._core.process.daemon is False  # it starts tensor-parallel workers of its own


KILLED_PARENT = """
import os, sys
from nanovllm import AsyncLLM
engine = AsyncLLM(sys.argv[1], engine_process=True, device="cpu", dtype="float32", kvcache_block_size=16,
                  max_model_len=256, num_kvcache_blocks=64)
print(engine._core.process.pid, flush=True)
os.kill(os.getpid(), 9)
"""


def exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)  # a zombie has exited
    except FileNotFoundError:
        return True


def test_engine_process_exits_when_its_parent_is_killed(tiny_model):
    """The engine process sees the end of its pipe when the parent dies (SIGKILL: no cleanup ran) and exits."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", KILLED_PARENT, tiny_model], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == -9, out.stderr[-2000:]
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + DEADLINE_S
    while not exited(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert exited(pid), f"the engine process {pid} outlived its parent"


def test_requests_failed_error_survives_pickling():
    """RequestsFailedError crosses from the engine process with its message and request ids."""
    import pickle
    error = pickle.loads(pickle.dumps(RequestsFailedError("step failed: boom", [3, 5])))
    assert isinstance(error, RequestsFailedError) and str(error) == "step failed: boom" and error.request_ids == [3, 5]


def test_a_killed_engine_process_makes_every_call_raise_engine_dead(tiny_model):
    """engine_process=True: the engine process killed mid-stream: the stream in flight and every later call raise
    EngineDeadError naming the exit, and is_dead turns True."""
    import signal
    engine = AsyncLLM(tiny_model, engine_process=True, **CPU)
    try:
        async def kill() -> None:
            os.kill(engine._core.process.pid, signal.SIGKILL)

        async def main():
            await assert_dead_after(engine, kill, match="exited unexpectedly")

        run(main())
        assert engine.is_dead
    finally:
        engine.shutdown()
