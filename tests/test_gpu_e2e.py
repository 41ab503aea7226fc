"""End to end on the GPU: HF equality in float32 and a teacher-forced check of a Qwen3-0.6B-shaped model."""
import os
import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.testing.random_checkpoint import build_qwen3_0_6b
from nanovllm.testing.teacher_forced import hf_greedy, teacher_forced_gaps

pytestmark = pytest.mark.gpu
MARGIN = 0.25  # bf16: a greedy token may trail HF's best logit by at most this much


def random_prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_hf(tiny_model):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).cuda().eval()


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_tiny_float32_equals_hf(tiny_model, tiny_hf, enforce_eager):
    """Triton kernels + (optionally) CUDA graphs: greedy tokens equal HF's with chunked prefill, prefix
    hits (a shared prefix, an exact multiple of the block size twice) and preemption (few blocks)."""
    prompts = random_prompts(10, (1, 70), 320, seed=1)
    prompts += [prompts[4][:5] + p for p in prompts[:3]] + [list(range(32))] * 2
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [hf_greedy(tiny_hf, p, 24) for p in prompts]
    for kwargs in (dict(max_num_batched_tokens=64), dict(num_kvcache_blocks=12, max_num_seqs=5)):
        with LLM(tiny_model, kvcache_block_size=16, enforce_eager=enforce_eager, attention_backend="triton",
                 max_model_len=256, **kwargs) as llm:
            for _ in range(2):  # the second call hits the prefix cache
                outs = llm.generate(prompts, sp, use_tqdm=False)
                assert [o["token_ids"] for o in outs] == expected


@pytest.fixture(scope="module")
def qwen3_0_6b(tmp_path_factory):
    path = os.environ.get("NANOVLLM_TEST_0_6B") or str(tmp_path_factory.mktemp("qwen3") / "ckpt")
    return build_qwen3_0_6b(path)


@pytest.fixture(scope="module")
def big_hf(qwen3_0_6b):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(qwen3_0_6b, dtype=torch.bfloat16,
                                                attn_implementation="sdpa").cuda().eval()


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_qwen3_0_6b_teacher_forced(qwen3_0_6b, big_hf, enforce_eager):
    """bf16 Qwen3-0.6B shape: every greedy token is within MARGIN of HF's best logit, with graphs on/off,
    prefix hits (repeated prompts, shared prefixes) and preemption (a pool too small for the batch)."""
    prompts = random_prompts(6, (200, 700), 10000, seed=2)
    prompts += [prompts[0][:512] + p[:50] for p in prompts[1:3]] + [prompts[1]]
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    with LLM(qwen3_0_6b, enforce_eager=enforce_eager, max_model_len=1024, num_kvcache_blocks=8,
             max_num_seqs=16) as llm:
        outs = llm.generate(prompts, sp, use_tqdm=False)
    worst = max(teacher_forced_gaps(big_hf, p, o["token_ids"]).max().item() for p, o in zip(prompts, outs, strict=True))
    print(f"teacher-forced max gap (enforce_eager={enforce_eager}): {worst:.4f}")
    assert all(len(o["token_ids"]) == 48 for o in outs)
    assert worst <= MARGIN


PDL_SCRIPT = """
import json, sys
from nanovllm import LLM, SamplingParams
prompts = json.loads(sys.argv[2])
sp = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
      SamplingParams(temperature=0.8, seed=7, max_tokens=40, ignore_eos=True)]
with LLM(sys.argv[1], dtype="bfloat16", max_model_len=512) as llm:
    outs = llm.generate(prompts, [sp[i % 2] for i in range(len(prompts))], use_tqdm=False)
print(json.dumps([o["token_ids"] for o in outs]))
"""


def test_programmatic_dependent_launch_changes_no_token(trained_model):
    """Kernels launched with PDL (the default on sm90+) give the same tokens as with NANOVLLM_PDL=0, greedy and
    seeded, batch sizes 1 and 8 in CUDA graphs (bf16: the fused gated GEMV at decode)."""
    import json
    import subprocess
    import sys
    prompts = [[3 + i, 40, 50 + 7 * i] * (i + 1) for i in range(8)]
    results = {}
    for flag in ("1", "0"):
        env = dict(os.environ, NANOVLLM_PDL=flag)
        for batch in (prompts[:1], prompts):
            out = subprocess.run([sys.executable, "-c", PDL_SCRIPT, trained_model, json.dumps(batch)], env=env,
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-2000:]
            results[flag, len(batch)] = json.loads(out.stdout.strip().splitlines()[-1])
    for batch in (1, 8):
        assert results["1", batch] == results["0", batch]
    assert torch.cuda.get_device_capability()[0] < 9 or _pdl_on()


def _pdl_on() -> bool:
    from nanovllm.kernels.launch import use_pdl
    return use_pdl(torch.zeros(1, device="cuda"))
