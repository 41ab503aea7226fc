"""Streamed text (step_stream deltas of stream=True requests) around stop strings and tokens without text: a delta
never carries text that a stop string later turns out to start in, and a long run of tokens that decode to nothing
keeps the incremental detokeniser's decode window bounded (not quadratic). The shipped trained model, float32."""
import random

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.detokenizer import MAX_DECODE_WINDOW, IncrementalDetokenizer
from nanovllm.testing.random_checkpoint import build_tokenizer

PROMPT = "import os\n\n\ndef read_lines(path):\n"


@pytest.fixture(scope="module")
def llm(trained_model):
    with LLM(trained_model, dtype="float32", device="cpu", kvcache_block_size=16, max_model_len=512) as engine:
        yield engine


def streamed(llm: LLM, sp: SamplingParams) -> tuple[str, str]:
    llm.add_request(PROMPT, sp, stream=True)
    text, reason = "", None
    while not llm.is_finished():
        for out in llm.step_stream():
            text += out.text
            reason = out.finish_reason or reason
    return text, reason


def test_stop_strings_spanning_tokens_are_never_streamed(llm):
    """Stop strings cut from the middle of the greedy text (several span tokens, e.g. "eads" in "Reads", whose
    "ead" arrives a token before the "s" that completes it): the streamed text equals generate's, which ends
    before the stop string."""
    full = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0]["text"]
    for start in (8, 9, 13, 20, 30):
        stop = full[start:start + 4]
        sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "zzzzzzzz"])
        want = llm.generate([PROMPT], sp, use_tqdm=False)[0]
        assert want["finish_reason"] == "stop" and want["text"] == full[:full.index(stop)]
        assert streamed(llm, sp) == (want["text"], "stop"), stop


def test_tokens_without_text_keep_the_decode_window_bounded():
    """Ids a 259-token tokenizer lacks (as a random-weight Qwen3 samples them), with an ASCII letter now and then:
    the window decoded per token stays within about MAX_DECODE_WINDOW tokens (before: everything since the last
    text, so quadratic), and the text equals the whole decode."""
    tokenizer = build_tokenizer()
    letters = tokenizer.convert_tokens_to_ids(list("abcdefgh"))
    rng = random.Random(0)
    ids = [rng.choice(letters) if rng.random() < 0.01 else rng.randrange(300, 151936) for _ in range(2000)]
    detok = IncrementalDetokenizer(tokenizer, [], True)
    widest = 0
    for n in range(1, len(ids) + 1):
        detok.update(ids[:n], search_stop=False)
        widest = max(widest, n - detok.prefix_offset)
    assert widest <= MAX_DECODE_WINDOW + 1
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)
