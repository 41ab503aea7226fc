"""The small trained model shipped in assets/tiny-qwen3-stdlib: HF transformers loads it, our engine's greedy output
equals HF's token for token (float32 on CPU; within the teacher-forced bound in bf16 on a GPU), and its peaked, real
next-token distributions exercise the sampling filters: every sampled token lies in the set the filter keeps, computed
from HF's logits."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanovllm import LLM, SamplingParams
from nanovllm.testing.teacher_forced import hf_greedy as hf_greedy_ids
from nanovllm.testing.teacher_forced import teacher_forced_gaps

QUESTIONS = ["What does `os.path.join(a, *p)` do?", "What does `json.dumps(obj)` do?",
             "What does `shutil.copyfile(src, dst)` do?"]
CODE = ["import os\n\n\ndef read_lines(path):\n    \"\"\"", "class Stack:\n    def push(self, item):\n",
        "def fibonacci(n):\n"]


@pytest.fixture(scope="module")
def tok(trained_model):
    return AutoTokenizer.from_pretrained(trained_model)


@pytest.fixture(scope="module")
def hf(trained_model):
    return AutoModelForCausalLM.from_pretrained(trained_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    return [tok.encode(p) for p in chats + CODE]


@pytest.fixture(scope="module")
def llm(trained_model):
    with LLM(trained_model, dtype="float32", device="cpu", kvcache_block_size=16, max_model_len=512) as engine:
        yield engine


def hf_logits(hf, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].float()


def test_greedy_equals_hf_and_stops_at_its_eos(llm, hf, tok, prompts):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for prompt, out in zip(prompts, outs, strict=True):
        want = hf_greedy_ids(hf, prompt, 48, [eos, tok.convert_tokens_to_ids("<|endoftext|>")])
        assert out["token_ids"] == want
    assert sum(o["finish_reason"] == "stop" for o in outs[:3]) >= 2  # chat answers end with <|im_end|>
    assert all(o["text"].strip() for o in outs)


@pytest.mark.parametrize("name,params,keep", [
    ("top_p", dict(top_p=0.5), lambda lp: nucleus(lp, 0.5)),
    ("top_k", dict(top_k=2), lambda lp: lp.topk(2).indices.tolist()),
    ("min_p", dict(min_p=0.3), lambda lp: (lp >= lp.max() + torch.log(torch.tensor(0.3))).nonzero()[:, 0].tolist()),
])
def test_filters_keep_only_allowed_tokens_of_peaked_distributions(llm, hf, prompts, name, params, keep):
    sp = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True, seed=7, n=3, **params)
    kept_sizes = []
    for prompt, out in zip(prompts, llm.generate(prompts, sp, use_tqdm=False), strict=True):
        for sample in out["outputs"]:
            logprobs = hf_logits(hf, prompt, sample["token_ids"]).log_softmax(-1)
            for pos, token in enumerate(sample["token_ids"]):
                allowed = keep(logprobs[pos])
                kept_sizes.append(len(allowed))
                assert token in allowed, (name, pos, token, allowed[:8])
    assert max(kept_sizes) > 1  # flatter positions occur...
    assert name == "top_k" or min(kept_sizes) == 1  # ...and peaked ones, where top-p / min-p keep one token


def nucleus(logprobs: torch.Tensor, top_p: float) -> list[int]:
    """The smallest set of most likely tokens reaching top_p, with the one that crosses it (vLLM's rule)."""
    probs, order = logprobs.exp().sort(descending=True)
    before = probs.cumsum(0) - probs
    return order[before < top_p].tolist()


@pytest.mark.gpu
def test_bf16_on_gpu_within_the_teacher_forced_bound(trained_model, prompts):
    """bf16 with CUDA graphs and the Triton kernels: every greedy token within 0.25 logits of HF's best (bf16)."""
    hf_bf16 = AutoModelForCausalLM.from_pretrained(trained_model, dtype=torch.bfloat16).cuda().eval()
    with LLM(trained_model, attention_backend="triton", kvcache_block_size=16) as engine:
        outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                               use_tqdm=False)
    worst = max(teacher_forced_gaps(hf_bf16, p, o["token_ids"]).max().item()
                for p, o in zip(prompts, outs, strict=True))
    assert worst <= 0.25, worst
