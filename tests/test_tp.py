"""Tensor parallelism on CPU (gloo): TP=2 must generate exactly what TP=1 does, shards must hold the right
slices of the checkpoint, and engines must shut down cleanly (workers, process group, shared memory).

Spawning a TP=2 engine costs seconds here, so each configuration is built once (module fixtures) and
asked many prompts at once."""
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoConfig

from nanovllm import LLM, SamplingParams
from nanovllm.distributed import workers
from nanovllm.distributed.tp import TPInfo
from nanovllm.layers.attention import make_backend
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.loader import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIGHT = dict(kvcache_block_size=16, max_model_len=256, max_num_batched_tokens=64, num_kvcache_blocks=24,
             dtype="float32", device="cpu")  # chunked prefill, preemption and prefix hits all happen
ODD = dict(tie=True, attention_bias=True, vocab_size=321, tokenizer=False)


def shm_exists(name: str) -> bool:
    return os.path.exists(os.path.join("/dev/shm", name))


def mixed_prompts() -> tuple[list, list[SamplingParams]]:
    """Token-id prompts of many lengths (some longer than the 64-token budget), several sharing a 48-token
    prefix (three full blocks), plus text prompts; greedy, mostly fixed length."""
    shared = [(7 * i) % 300 + 3 for i in range(48)]
    prompts = [[11], [5, 9, 2], list(range(3, 40)), [(13 * i) % 311 + 1 for i in range(100)],
               [(17 * i) % 307 + 2 for i in range(150)], shared + [1, 2, 3], shared + list(range(60, 90)),
               shared, "hello world, the quick brown fox", "list all prime numbers within 100:"]
    params = [SamplingParams(temperature=0, max_tokens=4 + 2 * i, ignore_eos=i % 3 != 0)
              for i in range(len(prompts))]
    return prompts, params


def token_ids(outputs: list[dict]) -> list[list[int]]:
    return [o["token_ids"] for o in outputs]


def generate_twice(llm: LLM) -> dict:
    """Run the mixed batch, then its shared-prefix prompts again (prefix hits across calls), counting
    preemptions."""
    preemptions = []
    preempt = llm.scheduler.preempt
    llm.scheduler.preempt = lambda seq: (preemptions.append(seq.seq_id), preempt(seq))[-1]
    prompts, params = mixed_prompts()
    first = llm.generate(prompts, params, use_tqdm=False)
    second = llm.generate(prompts[7:4:-1], params[7:4:-1], use_tqdm=False)
    return dict(first=token_ids(first), second=token_ids(second)[::-1], preemptions=len(preemptions),
                cached=[o["num_cached_tokens"] for o in first + second])


def tp2_state(llm: LLM) -> dict:
    group = llm.model_runner.workers
    return dict(shm=group.channel.name, workers=list(group.processes))


@pytest.fixture(scope="module")
def tight_runs(tiny_model) -> dict:
    """Tight-budget runs at TP=1 and TP=2; the TP=2 engine is shut down with exit()."""
    with LLM(tiny_model, tensor_parallel_size=1, **TIGHT) as llm:
        tp1 = generate_twice(llm)
    llm = LLM(tiny_model, tensor_parallel_size=2, **TIGHT)
    tp2 = generate_twice(llm)
    state = tp2_state(llm)
    state["shm_while_running"] = shm_exists(state["shm"])
    llm.exit()
    state.update(shm_after_exit=shm_exists(state["shm"]), pg_after_exit=dist.is_initialized())
    return dict(tp1=tp1, tp2=tp2, state=state)


@pytest.fixture(scope="module")
def odd_runs(tiny_model_factory, tight_runs) -> dict:
    """Tied embeddings, attention bias, odd vocabulary. The TP=2 engine follows the tight one in this process,
    is used as a context manager, and has a worker killed before the block ends (exit must not hang)."""
    path = tiny_model_factory(**ODD)
    prompts = [[i % 321 for i in range(n, 3 * n)] for n in (1, 4, 30, 90)] + [[320, 319, 160, 161]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = {}
    with LLM(path, tensor_parallel_size=1, dtype="float32", device="cpu") as llm:
        runs["tp1"] = token_ids(llm.generate(prompts, params, use_tqdm=False))
    with LLM(path, tensor_parallel_size=2, dtype="float32", device="cpu") as llm:
        runs["tp2"] = token_ids(llm.generate(prompts, params, use_tqdm=False))
        state = tp2_state(llm)
        state["workers"][0].kill()
        state["workers"][0].join()
    state.update(shm_after_exit=shm_exists(state["shm"]), pg_after_exit=dist.is_initialized())
    runs["state"] = state
    return runs


# -- TP=2 == TP=1 --------------------------------------------------------------------------------------------
def test_tp2_matches_tp1_with_chunking_preemption_and_prefix_hits(tight_runs):
    tp1, tp2 = tight_runs["tp1"], tight_runs["tp2"]
    assert tp2["first"] == tp1["first"]
    assert tp2["second"] == tp1["second"]
    assert tp1["second"] == tp1["first"][5:8]  # prefix hits across calls change nothing
    assert tp2["preemptions"] > 0, "the tight KV pool should force preemption (#144 path)"
    assert max(tp2["cached"]) > 0, "shared prefixes should hit the prefix cache"
    assert max(len(p) for p in mixed_prompts()[0]) > TIGHT["max_num_batched_tokens"]  # chunked prefill


def test_tp2_matches_tp1_tied_bias_odd_vocab(odd_runs):
    assert odd_runs["tp2"] == odd_runs["tp1"]
    assert all(len(t) == 12 for t in odd_runs["tp1"])


# -- shutdown ------------------------------------------------------------------------------------------------
def test_exit_cleans_up_and_a_second_engine_follows(tight_runs, odd_runs):
    state = tight_runs["state"]
    assert state["shm_while_running"]
    assert not state["shm_after_exit"]
    assert not state["pg_after_exit"]
    assert all(p.exitcode == 0 for p in state["workers"])
    assert odd_runs["state"]["shm"] != state["shm"]  # the next engine in this process got its own channel


def test_context_manager_exit_after_a_worker_died_cleans_up(odd_runs):
    state = odd_runs["state"]
    assert not state["shm_after_exit"]
    assert not state["pg_after_exit"]
    assert not any(p.is_alive() for p in state["workers"])


def test_generate_after_exit_raises(tiny_model):
    llm = LLM(tiny_model, tensor_parallel_size=1, dtype="float32", device="cpu")
    llm.exit()
    llm.exit()  # idempotent
    with pytest.raises(RuntimeError, match="exited"):
        llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)


CHILD = textwrap.dedent("""
    import json, sys
    from nanovllm import LLM, SamplingParams

    if __name__ == "__main__":
        llm = LLM(sys.argv[1], tensor_parallel_size=2, **json.loads(sys.argv[2]))
        out = llm.generate(json.loads(sys.argv[3]), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                           use_tqdm=False)
        print(json.dumps({"shm": llm.model_runner.workers.channel.name, "tokens": [o["token_ids"] for o in out]}))
        # no exit(): atexit must stop the worker and unlink the shared memory
""")


def test_two_processes_at_once_and_atexit(tiny_model, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    prompts = [[3, 4, 5], list(range(10, 80))]
    with LLM(tiny_model, tensor_parallel_size=1, **TIGHT) as llm:
        want = token_ids(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                      use_tqdm=False))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, str(script), tiny_model, json.dumps(TIGHT), json.dumps(prompts)]
    children = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    results = [c.communicate(timeout=240) for c in children]
    for child, (_, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err[-3000:]
        assert "leaked" not in err, err[-3000:]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert got[0]["shm"] != got[1]["shm"]
    for g in got:
        assert g["tokens"] == want
        assert not shm_exists(g["shm"])


def test_worker_env_turns_nvls_off_on_cuda_only(monkeypatch):
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    workers.set_worker_env(SimpleNamespace(device="cpu", tensor_parallel_size=2))
    assert "NCCL_NVLS_ENABLE" not in os.environ
    workers.set_worker_env(SimpleNamespace(device="cuda", tensor_parallel_size=2))
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # the user's choice wins
    workers.set_worker_env(SimpleNamespace(device="cuda", tensor_parallel_size=2))
    assert os.environ["NCCL_NVLS_ENABLE"] == "1"


# -- weight shards -------------------------------------------------------------------------------------------
def build_rank(path: str, rank: int, world_size: int) -> torch.nn.Module:
    """The model as rank `rank` of `world_size` builds and loads it (TPInfo is explicit: no process group needed)."""
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(path), TPInfo(rank, world_size), make_backend("torch"))
    load_model(model, path)
    return model


@pytest.mark.parametrize("kind", ["untied", "tied_bias_odd_vocab"])
@pytest.mark.parametrize("rank", [0, 1])
def test_shards_are_slices_of_the_checkpoint(kind, rank, tiny_model, tiny_model_factory):
    path = tiny_model if kind == "untied" else tiny_model_factory(**ODD)
    full = load_file(os.path.join(path, "model.safetensors"))
    hf = AutoConfig.from_pretrained(path)
    model = build_rank(path, rank, 2)
    params = dict(model.named_parameters(remove_duplicate=False))

    def part(name: str, dim: int = 0) -> torch.Tensor:
        return full[name].chunk(2, dim)[rank]

    for i in range(hf.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        qkv = torch.cat([part(f"{attn}.{p}_proj.weight") for p in "qkv"])
        torch.testing.assert_close(params[f"{attn}.qkv_proj.weight"], qkv, rtol=0, atol=0)
        gate_up = torch.cat([part(f"{mlp}.gate_proj.weight"), part(f"{mlp}.up_proj.weight")])
        torch.testing.assert_close(params[f"{mlp}.gate_up_proj.weight"], gate_up, rtol=0, atol=0)
        torch.testing.assert_close(params[f"{attn}.o_proj.weight"], part(f"{attn}.o_proj.weight", 1), rtol=0, atol=0)
        torch.testing.assert_close(params[f"{mlp}.down_proj.weight"], part(f"{mlp}.down_proj.weight", 1),
                                   rtol=0, atol=0)
        torch.testing.assert_close(params[f"{attn}.q_norm.weight"], full[f"{attn}.q_norm.weight"], rtol=0, atol=0)
        if hf.attention_bias:
            qkv_bias = torch.cat([part(f"{attn}.{p}_proj.bias") for p in "qkv"])
            torch.testing.assert_close(params[f"{attn}.qkv_proj.bias"], qkv_bias, rtol=0, atol=0)
            torch.testing.assert_close(params[f"{attn}.o_proj.bias"], full[f"{attn}.o_proj.bias"], rtol=0, atol=0)
    check_vocab_shard(params["model.embed_tokens.weight"], full["model.embed_tokens.weight"], rank)
    if hf.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        check_vocab_shard(params["lm_head.weight"], full["lm_head.weight"], rank)


def check_vocab_shard(shard: torch.Tensor, full: torch.Tensor, rank: int) -> None:
    """Rank r holds rows [r * s, (r + 1) * s) with s = ceil(vocab / 2); rows past the vocabulary are zero."""
    rows = (full.shape[0] + 1) // 2
    want = full[rank * rows:(rank + 1) * rows]
    assert shard.shape == (rows, full.shape[1])
    torch.testing.assert_close(shard[:want.shape[0]], want, rtol=0, atol=0)
    assert not shard[want.shape[0]:].any()
