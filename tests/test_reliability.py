"""Reliability (issue 8): bad input is refused before any work and the engine stays usable; a worker that dies or
raises makes generate raise within seconds (never hang) and the engine report it on every later call; a failed
step leaves no half-updated scheduler state; preemption under a tiny KV pool loses and duplicates nothing;
shared memory, workers and GPU memory are released. docs/ERRORS.md lists the same cases.

TP=2 engines (gloo) cost a few seconds each to spawn, so only the worker-failure and hygiene cases use them."""
import gc
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from multiprocessing.shared_memory import SharedMemory

import pytest
import torch
import torch.distributed as dist
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from nanovllm import LLM, EngineDeadError, RequestsFailedError, SamplingParams
from nanovllm.distributed.shm_channel import unique_shm_name
from nanovllm.testing import install_fault

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = dict(kvcache_block_size=16, dtype="float32", device="cpu")
SMALL = dict(CPU, max_model_len=256, num_kvcache_blocks=8)  # 8 blocks = 128 cached tokens
SP = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
GOOD = [[5, 6, 7], [(7 * i) % 300 + 3 for i in range(40)], "hello world"]
FAILURE_DEADLINE_S = 15  # a failed generate must raise well within this (TP=2 on 2 CPU cores)


def token_ids(outputs: list[dict]) -> list[list[int]]:
    return [o["token_ids"] for o in outputs]


def shm_exists(name: str) -> bool:
    return os.path.exists(os.path.join("/dev/shm", name))


@pytest.fixture(scope="module")
def small_llm(tiny_model):
    with LLM(tiny_model, **SMALL) as llm:
        yield llm


@pytest.fixture(scope="module")
def expected(tiny_model) -> list[list[int]]:
    """GOOD's greedy tokens from a fresh engine that never saw a failure."""
    with LLM(tiny_model, **SMALL) as llm:
        return token_ids(llm.generate(GOOD, SP, use_tqdm=False))


def assert_clean(llm: LLM) -> None:
    """Nothing queued or running, every block free."""
    scheduler = llm.scheduler
    assert scheduler.is_finished()
    assert not scheduler.block_manager.used_block_ids
    assert scheduler.block_manager.num_free_blocks == len(scheduler.block_manager.blocks)


# -- 1. bad input: refused before any work, the engine stays usable ---------------------------------------------
def llama_dir(tmp_path) -> str:
    path = tmp_path / "llama"
    LlamaConfig(architectures=["MistralForCausalLM"], num_hidden_layers=1, hidden_size=64,
                num_attention_heads=4, intermediate_size=96, vocab_size=320).save_pretrained(path)
    return str(path)


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def flash_attn_backend(monkeypatch) -> None:
    from nanovllm import config
    monkeypatch.setattr(config, "resolve_attention_backend", lambda *args: "flash_attn")


# name -> (call(llm, model, tmp_path, monkeypatch), exception type, regex the message must match)
BAD_INPUTS = {
    "prompt over max_model_len": (
        lambda llm, *_: llm.generate([[1], list(range(3, 203))], SamplingParams(max_tokens=100), use_tqdm=False),
        ValueError, r"prompt 1 has 200 tokens and max_tokens=100: 300 > max_model_len=256; shorten the prompt, "
                    r"lower max_tokens or raise max_model_len"),
    "sequence never fits the KV cache": (
        lambda llm, *_: llm.generate([list(range(3, 153))], SamplingParams(max_tokens=10), use_tqdm=False),
        ValueError, r"prompt 0 needs 10 KV-cache blocks \(150 prompt tokens \+ max_tokens=10, 16 tokens per "
                    r"block\) but the cache has only 8; raise num_kvcache_blocks or gpu_memory_utilization.*"
                    r"max_model_len <= 128"),
    "add_request never fits": (
        lambda llm, *_: llm.add_request(list(range(3, 153)), SamplingParams(max_tokens=10)),
        ValueError, r"prompt needs 10 KV-cache blocks.*only 8"),
    "empty prompt": (
        lambda llm, *_: llm.generate([[1, 2], []], SP, use_tqdm=False), ValueError, r"prompt 1 is empty"),
    "empty text prompt": (
        lambda llm, *_: llm.generate([""], SP, use_tqdm=False), ValueError, r"prompt 0 is empty"),
    "token id out of vocabulary": (
        lambda llm, *_: llm.generate([[1, 2], [3, 320]], SP, use_tqdm=False),
        ValueError, r"prompt 1 token ids must be integers in \[0, 320\)"),
    "negative token id": (
        lambda llm, *_: llm.add_request([-1], SP), ValueError, r"prompt token ids must be integers in \[0, 320\)"),
    "prompt of the wrong type": (
        lambda llm, *_: llm.generate([[1], 7], SP, use_tqdm=False), ValueError, r"prompt 1 has type int"),
    "sampling_params list of the wrong length": (
        lambda llm, *_: llm.generate([[1], [2]], [SP], use_tqdm=False),
        ValueError, r"got 1 sampling_params for 2 prompts"),
    "sampling_params not a SamplingParams": (
        lambda llm, *_: llm.generate([[1], [2]], [SP, {"max_tokens": 3}], use_tqdm=False),
        ValueError, r"sampling_params\[1\] must be a SamplingParams, got dict"),
    "stop token id out of vocabulary": (
        lambda llm, *_: llm.generate([[1]], SamplingParams(stop_token_ids=[999]), use_tqdm=False),
        ValueError, r"stop_token_ids must be < vocab_size=320"),
    "missing model directory": (
        lambda llm, model, tmp, mp: LLM(str(tmp / "nowhere"), **CPU),
        FileNotFoundError, r"does not exist"),
    "hub id given as a path": (
        lambda llm, model, tmp, mp: LLM("Qwen/Qwen3-0.6B", **CPU),
        FileNotFoundError, r"looks like a Hugging Face hub id.*huggingface-cli download Qwen/Qwen3-0\.6B"),
    "directory without config.json": (
        lambda llm, model, tmp, mp: LLM(str(tmp), **CPU), FileNotFoundError, r"no config\.json"),
    "unsupported architecture": (
        lambda llm, model, tmp, mp: LLM(llama_dir(tmp), **CPU),
        ValueError, r"architectures \['MistralForCausalLM'\].*supported: \['LlamaForCausalLM', 'Qwen2ForCausalLM', "
                    r"'Qwen3ForCausalLM', 'Qwen3MoeForCausalLM'\]"),
    "tensor_parallel_size out of range": (
        lambda llm, model, tmp, mp: LLM(model, tensor_parallel_size=9, **CPU),
        ValueError, r"tensor_parallel_size must be an integer in 1\.\.8, got 9"),
    "tensor_parallel_size not dividing the heads": (
        lambda llm, model, tmp, mp: LLM(model, tensor_parallel_size=3, **CPU),
        ValueError, r"tensor_parallel_size=3 must divide num_attention_heads=4 and num_key_value_heads=2"),
    "tensor_parallel_size over the GPU count": (
        lambda llm, model, tmp, mp: (fake_gpus(mp, 1), LLM(model, tensor_parallel_size=2, device="cuda")),
        ValueError, r"tensor_parallel_size=2 exceeds the 1 visible GPU\(s\)"),
    "kvcache_block_size not a power of two": (
        lambda llm, model, tmp, mp: LLM(model, **dict(CPU, kvcache_block_size=24)),
        ValueError, r"kvcache_block_size must be a power of two >= 16, got 24"),
    "kvcache_block_size invalid for flash_attn": (
        lambda llm, model, tmp, mp: (flash_attn_backend(mp), LLM(model, **CPU)),
        ValueError, r"kvcache_block_size=16 must be a multiple of 256 with the flash_attn backend"),
    "gpu_memory_utilization zero": (
        lambda llm, model, tmp, mp: LLM(model, gpu_memory_utilization=0, **CPU),
        ValueError, r"gpu_memory_utilization must be in \(0, 1\], got 0"),
    "gpu_memory_utilization over one": (
        lambda llm, model, tmp, mp: LLM(model, gpu_memory_utilization=1.5, **CPU),
        ValueError, r"gpu_memory_utilization must be in \(0, 1\], got 1\.5"),
    "unknown engine argument": (
        lambda llm, model, tmp, mp: LLM(model, max_num_sequences=4, **CPU),
        ValueError, r"unknown engine argument\(s\) \['max_num_sequences'\]"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_before_any_work_and_the_engine_stays_usable(case, small_llm, expected, tiny_model,
                                                                      tmp_path, monkeypatch):
    call, exc_type, pattern = BAD_INPUTS[case]
    with pytest.raises(exc_type, match=pattern):
        call(small_llm, tiny_model, tmp_path, monkeypatch)
    assert_clean(small_llm)  # nothing of the bad call (nor of its valid prompts) was queued
    monkeypatch.undo()
    assert token_ids(small_llm.generate(GOOD, SP, use_tqdm=False)) == expected


def test_a_request_that_exactly_fits_the_pool_runs(small_llm):
    """The check is exact: 120 + 9 tokens, the last never cached, fill the 8 blocks."""
    out = small_llm.generate([list(range(3, 123))], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
                             use_tqdm=False)
    assert len(out[0]["token_ids"]) == 9


# -- 3. an exception inside a step on rank 0 -------------------------------------------------------------------
def test_step_failure_aborts_the_call_and_the_engine_recovers(small_llm, expected, monkeypatch):
    runner, bm = small_llm.model_runner, small_llm.scheduler.block_manager
    real_run, held, calls = runner.run, set(), []

    def flaky_run(step):
        calls.append(step.is_prefill)
        if len(calls) == 3:  # a decode step, after prefill wrote and registered full blocks
            held.update(b for seq in small_llm.scheduler.running for b in seq.block_table)
            raise torch.OutOfMemoryError("injected out of memory")
        return real_run(step)

    monkeypatch.setattr(runner, "run", flaky_run)
    with pytest.raises(RequestsFailedError, match="injected out of memory") as err:
        small_llm.generate(GOOD, SP, use_tqdm=False)
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    ids = err.value.request_ids
    assert len(ids) == len(GOOD) and str(ids) in str(err.value)
    assert_clean(small_llm)
    assert held and all(bm.blocks[b].hash == -1 for b in held)  # their contents are not trusted
    assert not held & set(bm.hash_to_block_id.values())
    monkeypatch.undo()
    assert token_ids(small_llm.generate(GOOD, SP, use_tqdm=False)) == expected


def test_step_failure_through_step_api_names_the_step_requests(small_llm, monkeypatch):
    seq_id = small_llm.add_request([4, 5, 6], SP)
    monkeypatch.setattr(small_llm.model_runner, "run", lambda step: 1 / 0)
    with pytest.raises(RequestsFailedError, match=rf"requests \[{seq_id}\] were aborted: ZeroDivisionError"):
        small_llm.step()
    assert_clean(small_llm)


# -- 4. preemption under a tiny pool: nothing lost, duplicated or starved ---------------------------------------
@pytest.fixture(scope="module")
def pools(tiny_model):
    """(large pool, tiny pool) engines: 10 blocks of 16 tokens and a 48-token budget (chunked prefill)."""
    with LLM(tiny_model, max_model_len=160, **CPU) as large, \
            LLM(tiny_model, max_model_len=160, num_kvcache_blocks=10, max_num_batched_tokens=48, **CPU) as tiny:
        yield large, tiny


REQUESTS = st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40), st.integers(0, 2)), min_size=1, max_size=6)


def workload(requests: list[tuple[int, int, int]]) -> tuple[list[list[int]], list[SamplingParams]]:
    """(prompt length, max_tokens, family): prompts of one family share a prefix (prefix-cache hits)."""
    prompts = [[(37 * family + 11 * i) % 317 + 3 for i in range(length)] for length, _, family in requests]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m, _ in requests]
    return prompts, params


def test_tiny_pool_preempts_and_matches_a_large_pool(pools):
    large, tiny = pools

    @settings(max_examples=15, deadline=None)
    @example(requests=[(60, 40, 0), (60, 40, 1), (55, 40, 2), (17, 33, 0), (1, 40, 1), (33, 1, 2)])
    @given(requests=REQUESTS)
    def check(requests):
        prompts, params = workload(requests)
        got = tiny.generate(prompts, params, use_tqdm=False)
        want = large.generate(prompts, params, use_tqdm=False)
        assert [len(o["token_ids"]) for o in got] == [p.max_tokens for p in params]
        assert token_ids(got) == token_ids(want)
        assert all(o["finish_reason"] == "length" for o in got)
        assert_clean(tiny)

    check()
    assert tiny.scheduler.num_preemptions > 0, "the tiny pool should force preemption"


# -- 2. worker failure (TP=2, gloo) ----------------------------------------------------------------------------
def worker_state(llm: LLM) -> dict:
    group = llm.model_runner.workers
    return dict(shm=group.channel.name, workers=list(group.processes))


def assert_cleaned_up(state: dict) -> None:
    assert not shm_exists(state["shm"])
    assert not dist.is_initialized()
    assert not any(p.is_alive() for p in state["workers"])


def timed_generate(llm: LLM, prompts: list, sp: SamplingParams) -> tuple[BaseException, float]:
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        llm.generate(prompts, sp, use_tqdm=False)
    return err.value, time.monotonic() - start


WORKER_FAULTS = {  # how the worker fails -> what the error says
    "raises in a step": (dict(steps=2, kill=False),
                         r"worker rank 1 raised:\nTraceback.*RuntimeError: fault injected for a test on rank 1"),
    "killed in a step": (dict(steps=2, kill=True), r"worker rank 1 died \(exit code -9, killed by SIGKILL\)"),
    "killed between calls": (None, r"worker rank 1 died \(exit code -9, killed by SIGKILL\)"),
}


@pytest.mark.parametrize("fault", list(WORKER_FAULTS))
def test_worker_failure_raises_now_and_on_every_later_call(fault, tiny_model):
    inject, pattern = WORKER_FAULTS[fault]
    llm = LLM(tiny_model, tensor_parallel_size=2, **SMALL)
    state = worker_state(llm)
    long_sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    try:
        assert len(llm.generate(GOOD, SP, use_tqdm=False)) == len(GOOD)
        if inject is None:
            worker = llm.model_runner.workers.processes[0]
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(5)
        else:
            install_fault(llm, 1, inject["steps"], inject["kill"])
        err, elapsed = timed_generate(llm, GOOD, long_sp)
        assert elapsed < FAILURE_DEADLINE_S
        assert re.search(pattern, str(err), re.DOTALL), str(err)
        if inject is None:  # noticed before queueing anything
            assert isinstance(err, EngineDeadError)
        else:  # the failing call's requests are reported and removed
            assert isinstance(err, RequestsFailedError) and isinstance(err.__cause__, EngineDeadError)
            assert len(err.request_ids) == len(GOOD)
        assert_clean(llm)
        again, elapsed = timed_generate(llm, GOOD, SP)
        assert isinstance(again, EngineDeadError) and elapsed < 1
        assert re.search(pattern, str(again), re.DOTALL) and "create a new LLM" in str(again)
        with pytest.raises(EngineDeadError):
            llm.add_request([1, 2], SP)
        assert_clean(llm)
    finally:
        llm.exit()
    assert_cleaned_up(state)


def test_rank0_failure_mid_step_under_tp_marks_the_engine_dead(tiny_model, monkeypatch):
    """Rank 0 raising inside a TP step leaves the workers waiting in a collective: the engine is dead, and exit()
    stops them without the barrier."""
    llm = LLM(tiny_model, tensor_parallel_size=2, **SMALL)
    state = worker_state(llm)
    try:
        monkeypatch.setattr(llm.model_runner, "execute", lambda step: 1 / 0)  # after the workers got the step
        err, elapsed = timed_generate(llm, GOOD, SP)
        assert elapsed < FAILURE_DEADLINE_S
        assert isinstance(err.__cause__, EngineDeadError)
        assert "rank 0 failed in the middle of a tensor-parallel step (ZeroDivisionError" in str(err)
        with pytest.raises(EngineDeadError, match="rank 0 failed"):
            llm.generate(GOOD, SP, use_tqdm=False)
    finally:
        start = time.monotonic()
        llm.exit()
        assert time.monotonic() - start < FAILURE_DEADLINE_S
    assert_cleaned_up(state)


# -- 5. resource hygiene ---------------------------------------------------------------------------------------
def test_stale_shared_memory_does_not_block_a_new_engine(tiny_model, expected):
    stale = SharedMemory(name=unique_shm_name(), create=True, size=4096)  # as left by a crashed engine
    try:
        with LLM(tiny_model, tensor_parallel_size=2, **SMALL) as llm:
            assert llm.model_runner.workers.channel.name != stale.name
            assert token_ids(llm.generate(GOOD, SP, use_tqdm=False)) == expected
    finally:
        stale.close()
        stale.unlink()


CRASHING_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from nanovllm import LLM, SamplingParams

    if __name__ == "__main__":
        llm = LLM(sys.argv[1], tensor_parallel_size=2, **json.loads(sys.argv[2]))
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
        group = llm.model_runner.workers
        print(json.dumps({"shm": group.channel.name, "worker": group.processes[0].pid}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # rank 0 crashes: no exit(), no atexit
""")


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)  # a zombie has exited
    except FileNotFoundError:
        return True


def test_rank0_crash_leaves_no_worker_or_shared_memory_behind(tiny_model, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_CHILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, str(script), tiny_model, json.dumps(SMALL)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    info = json.loads(child.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (process_gone(info["worker"]) and not shm_exists(info["shm"])):
        time.sleep(0.1)
    assert process_gone(info["worker"]), "the worker must exit once rank 0 is gone"
    assert not shm_exists(info["shm"]), "the crashed engine's shared memory must be unlinked"


@pytest.mark.gpu
def test_no_kv_block_fits_raises(tiny_model):
    with pytest.raises(RuntimeError, match="no room for even one KV-cache block"):
        LLM(tiny_model, kvcache_block_size=16, max_model_len=256, gpu_memory_utilization=1e-4)


@pytest.mark.gpu
def test_exit_returns_gpu_memory_to_baseline(tiny_model):
    """Weights, KV cache and CUDA graphs are freed by exit() even while the engine object is still referenced."""
    tolerance = 64 << 20
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base_allocated, base_free = torch.cuda.memory_allocated(), torch.cuda.mem_get_info()[0]
    llm = LLM(tiny_model, kvcache_block_size=16, max_model_len=256, max_num_seqs=16, enforce_eager=False,
              attention_backend="triton", gpu_memory_utilization=0.5)
    assert llm.model_runner.graphs is not None
    assert len(llm.generate(GOOD, SP, use_tqdm=False)) == len(GOOD)
    assert torch.cuda.memory_allocated() - base_allocated > tolerance  # the KV cache alone is far larger
    llm.exit()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() - base_allocated < tolerance
    assert base_free - torch.cuda.mem_get_info()[0] < tolerance
    assert llm is not None  # the engine object outlived exit()
