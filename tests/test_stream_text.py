"""Streamed text (step_stream deltas of stream=True requests) around stop strings: a delta never carries text that
a stop string later turns out to start in. The shipped trained model, float32."""
import pytest

from nanovllm import LLM, SamplingParams

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
