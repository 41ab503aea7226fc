"""The OpenAI-compatible server (issue 18), driven by the official `openai` client (and httpx for raw HTTP) against
`python -m nanovllm serve` spawned on 127.0.0.1 and a free port. The shipped trained model in float32 on CPU: its
outputs are checked against LLM.generate, its logprobs against HF's log_softmax. Bad requests get 400s and the
server serves on; 64 concurrent streams are all correct; a client that disconnects (streaming or not) aborts its
request and frees its blocks; with TP=2 /health turns 503 once a worker is killed."""
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from functools import lru_cache

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = dict(dtype="float32", device="cpu", kvcache_block_size=16, max_model_len=512)
NAME = "tiny"
START_TIMEOUT_S = 120
TIMEOUT_S = 60  # any one client call
PROMPT = "import os\n\n\ndef read_lines(path):\n"
CHAT = [{"role": "user", "content": "What does `os.path.join(a, *p)` do?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_flags(kwargs: dict) -> list[str]:
    return [x for k, v in kwargs.items() for x in (f"--{k.replace('_', '-')}", str(v))]


class Server:
    """`python -m nanovllm serve` on 127.0.0.1 and a free port; stopped with SIGTERM."""

    def __init__(self, model: str, tmp_path, **engine: object) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "nanovllm", "serve", model, "--host", "127.0.0.1", "--port", port,
               "--served-model-name", NAME, "--uvicorn-log-level", "warning", *engine_flags(engine)]
        self.log = open(tmp_path / f"server-{port}.log", "w+")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server was not up within {START_TIMEOUT_S} s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)

    def metrics(self) -> dict[str, int]:
        text = httpx.get(f"{self.url}/metrics", timeout=TIMEOUT_S).text
        return {m[1]: int(m[2]) for m in re.finditer(r"^nanovllm:(\w+) (\d+)$", text, re.M)}

    def wait_idle(self) -> dict[str, int]:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            stats = self.metrics()
            if stats["num_requests_unfinished"] == 0:
                return stats
            time.sleep(0.1)
        raise AssertionError(f"requests still unfinished: {stats}")


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
    srv = Server(trained_model, tmp_path_factory.mktemp("server"), num_kvcache_blocks=256, **ENGINE)
    yield srv
    assert srv.stop() == 0, srv.output()  # SIGTERM: a clean exit


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def llm(trained_model):
    with LLM(trained_model, **ENGINE) as engine:
        yield engine


@pytest.fixture(scope="module")
def tok(trained_model):
    return AutoTokenizer.from_pretrained(trained_model)


def generate(llm: LLM, prompt, **kwargs) -> dict:
    return llm.generate([prompt], SamplingParams(**kwargs), use_tqdm=False)[0]


def stream_text(chunks) -> tuple[dict[int, str], dict[int, list], dict | None]:
    """Concatenated text per choice index, every finish_reason seen per index (None for unfinished chunks), and the
    usage chunk's usage."""
    texts, reasons, usage = {}, {}, None
    for chunk in chunks:
        if chunk.usage is not None and not chunk.choices:
            usage = chunk.usage
        for c in chunk.choices:
            text = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + text
            reasons.setdefault(c.index, []).append(c.finish_reason)
    return texts, reasons, usage


# -- basics -------------------------------------------------------------------------------------------------------
def test_models_health_version_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT_S).status_code == 200
    assert httpx.get(f"{server.url}/version", timeout=TIMEOUT_S).json()["version"]
    stats = server.metrics()
    assert stats["kv_cache_total_blocks"] == 256 and stats["kv_cache_free_blocks"] == 256


def test_completion_stream_equals_non_stream(client, llm, tok):
    """temperature 0: the non-streamed text is LLM.generate's; the streamed chunks concatenate to it; usage counts
    the prompt's and the completion's tokens; finish_reason only on the last chunk; include_usage adds a last chunk
    with no choices."""
    want = generate(llm, PROMPT, temperature=0, max_tokens=24)
    out = client.completions.create(model=NAME, prompt=PROMPT, temperature=0, max_tokens=24)
    assert out.choices[0].text == want["text"] and out.choices[0].finish_reason == want["finish_reason"]
    assert out.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert out.usage.completion_tokens == len(want["token_ids"])
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}))
    texts, reasons, usage = stream_text(chunks)
    assert texts == {0: want["text"]} and len(reasons[0]) > 2
    assert reasons[0][-1] == want["finish_reason"] and not any(reasons[0][:-1])
    assert chunks[-1].choices == [] and usage.model_dump() == out.usage.model_dump()


def test_finish_reasons_length_and_stop(client, llm):
    out = client.completions.create(model=NAME, prompt=PROMPT, temperature=0, max_tokens=5,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    text = generate(llm, PROMPT, temperature=0, max_tokens=24, ignore_eos=True)["text"]
    stop = text[8:12]
    assert stop.strip() and text.index(stop) > 0
    out = client.completions.create(model=NAME, prompt=PROMPT, temperature=0, max_tokens=24, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == text[:text.index(stop)]


def test_n_samples_with_seed(client, llm):
    """n=2 with a seed: two choices (indices 0 and 1), each equal to LLM.generate's sample (seed + index),
    streamed or not; usage counts both."""
    kwargs = dict(temperature=1.0, max_tokens=10, seed=7)
    want = [s["text"] for s in generate(llm, PROMPT, n=2, **kwargs)["outputs"]]
    assert want[0] != want[1]
    out = client.completions.create(model=NAME, prompt=PROMPT, n=2, **kwargs)
    assert [(c.index, c.text) for c in out.choices] == [(0, want[0]), (1, want[1])]
    texts, reasons, _ = stream_text(client.completions.create(model=NAME, prompt=PROMPT, n=2, stream=True, **kwargs))
    assert texts == {0: want[0], 1: want[1]} and all(r[-1] and not any(r[:-1]) for r in reasons.values())
    assert out.usage.completion_tokens == sum(len(s["token_ids"]) for s in
                                              generate(llm, PROMPT, n=2, **kwargs)["outputs"])


def test_token_id_prompts(client, llm, tok):
    """prompt as one token-id list and as a list of them: one choice per prompt, in order."""
    ids = [tok.encode(PROMPT), tok.encode("class Stack:\n    def push(self, item):\n")]
    want = [generate(llm, p, temperature=0, max_tokens=8)["text"] for p in ids]
    out = client.completions.create(model=NAME, prompt=ids[0], temperature=0, max_tokens=8)
    assert out.choices[0].text == want[0] and out.usage.prompt_tokens == len(ids[0])
    out = client.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=8)
    assert [(c.index, c.text) for c in out.choices] == [(0, want[0]), (1, want[1])]
    assert out.usage.prompt_tokens == len(ids[0]) + len(ids[1])


# -- logprobs -----------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def hf_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_log_softmax(path: str, prompt_ids: list[int], completion: list[int]) -> torch.Tensor:
    """HF's next-token log_softmax at every completion position, teacher-forced: [len(completion), vocab]."""
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([prompt_ids + completion])).logits[0, len(prompt_ids) - 1:-1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_completion_logprobs_match_hf(client, tok, trained_model):
    out = client.completions.create(model=NAME, prompt=PROMPT, temperature=0, max_tokens=10, logprobs=3,
                                    extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = out.choices[0]
    token_ids = choice.model_extra["token_ids"]
    ref = hf_log_softmax(trained_model, tok.encode(PROMPT), token_ids)
    lp = choice.logprobs
    assert lp.tokens == [tok.decode([t]) for t in token_ids] and len(lp.top_logprobs) == len(token_ids)
    for pos, (t, value, top) in enumerate(zip(token_ids, lp.token_logprobs, lp.top_logprobs, strict=True)):
        assert value == pytest.approx(ref[pos, t].item(), abs=2e-4)
        best = ref[pos].topk(3)
        assert t == int(best.indices[0])  # greedy
        assert {tok.decode([i]): pytest.approx(v, abs=2e-4) for i, v in zip(best.indices.tolist(),
                                                                            best.values.tolist(), strict=True)} == top
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_chat_logprobs_match_hf(client, llm, tok, trained_model):
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    token_ids = generate(llm, prompt, temperature=0, max_tokens=8, ignore_eos=True)["token_ids"]
    out = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=8, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([t]) for t in token_ids]
    ref = hf_log_softmax(trained_model, tok.encode(prompt), token_ids)
    for pos, entry in enumerate(content):
        best = ref[pos].topk(2)
        assert entry.logprob == pytest.approx(best.values[0].item(), abs=2e-4)  # greedy: the top token
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in best.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=2e-4)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


# -- chat ---------------------------------------------------------------------------------------------------------
def test_chat_completion_through_the_template(client, llm, tok):
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    want = generate(llm, prompt, temperature=0, max_tokens=32)
    out = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=32)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want["text"]
    assert out.choices[0].finish_reason == want["finish_reason"]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(tok.encode(prompt)), len(want["token_ids"]))
    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=32,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    texts, reasons, usage = stream_text(chunks)
    assert texts == {0: want["text"]} and reasons[0][-1] == want["finish_reason"] and not any(reasons[0][:-1])
    assert usage.completion_tokens == len(want["token_ids"])


# -- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(model="gpt-4"), "not served"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n must be"),
    (dict(logprobs=21), "logprobs"),
    (dict(max_tokens=600), "max_model_len"),
    (dict(extra_body={"top_k": -2}), "top_k"),
    (dict(extra_body={"min_tokens": 50}), "min_tokens"),
    (dict(extra_body={"bogus": 1}), "bogus"),
    (dict(prompt=[[]]), "empty"),
    (dict(prompt=[10**6]), "token ids"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
])
def test_bad_completion_requests_get_400(client, kwargs, match):
    request = dict(model=NAME, prompt=PROMPT, max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError, match=match) as info:
        client.completions.create(**request)
    assert info.value.status_code == 400 and info.value.body["type"] == "BadRequestError"
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_logprobs=21, logprobs=True), "logprobs"),
    (dict(top_logprobs=2), "top_logprobs needs logprobs"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "text"),
    (dict(max_completion_tokens=600), "max_model_len"),
])
def test_bad_chat_requests_get_400(client, kwargs, match):
    request = dict(model=NAME, messages=CHAT, max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError, match=match):
        client.chat.completions.create(**request)


@pytest.mark.parametrize("body, headers, match", [
    (b'{"prompt": "hi", ', {"content-type": "application/json"}, "not valid JSON"),
    (b'{"prompt": "hi"}', {"content-type": "text/plain"}, "must be JSON"),
    (b'["hi"]', {"content-type": "application/json"}, "invalid request"),
])
def test_malformed_bodies_get_400(server, client, body, headers, match):
    response = httpx.post(f"{server.url}/v1/completions", content=body, headers=headers, timeout=TIMEOUT_S)
    assert response.status_code == 400
    error = response.json()["error"]
    assert re.search(match, error["message"]) and error["code"] == 400
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2).choices[0].text is not None


# -- load and disconnects -----------------------------------------------------------------------------------------
def test_64_concurrent_streams(server, llm):
    prompts = [f"def function_{i}(x):\n    return x * {i}" for i in range(64)]
    want = [o["text"] for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)]

    async def one(client, prompt: str) -> str:
        stream = await client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                                      timeout=TIMEOUT_S) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(asyncio.wait_for(main(), 2 * TIMEOUT_S)) == want
    assert server.wait_idle()["kv_cache_free_blocks"] == 256


def test_stream_disconnect_aborts_and_frees_blocks(server):
    before = server.wait_idle()
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 480, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT_S) as response:
        events = response.iter_lines()
        assert next(line for line in events if line.startswith("data: "))
        assert server.metrics()["kv_cache_free_blocks"] < 256
    after = server.wait_idle()
    assert after["num_requests_aborted"] == before["num_requests_aborted"] + 1
    assert after["kv_cache_free_blocks"] == 256


def test_non_stream_disconnect_aborts(server):
    before = server.wait_idle()
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True}  # seconds on CPU
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.2)
    after = server.wait_idle()
    assert after["num_requests_aborted"] == before["num_requests_aborted"] + 1
    assert after["kv_cache_free_blocks"] == 256


# -- a dead engine ------------------------------------------------------------------------------------------------
def worker_pids(pid: int) -> list[int]:
    """The server's tensor-parallel workers: the children its engine process (the server's one spawned child)
    started by multiprocessing's spawn."""
    (engine,) = spawned_children(pid)
    return spawned_children(engine)


def spawned_children(pid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except (OSError, ValueError, IndexError):  # not a process, or it exited meanwhile
            continue
        if parent == pid and spawned:
            pids.append(int(entry))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
def test_health_turns_503_after_a_worker_dies(tiny_model, tmp_path):
    srv = Server(tiny_model, tmp_path, tensor_parallel_size=2, num_kvcache_blocks=64, **ENGINE)
    try:
        client = srv.client()
        assert client.completions.create(model=NAME, prompt="hello", max_tokens=3).usage.completion_tokens >= 1
        workers = worker_pids(srv.proc.pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while httpx.get(f"{srv.url}/health", timeout=TIMEOUT_S).status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 after the worker died"
            time.sleep(0.2)
        error = httpx.get(f"{srv.url}/health", timeout=TIMEOUT_S).json()["error"]
        assert "died" in error["message"] and error["code"] == 503
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model=NAME, prompt="hello", max_tokens=3)
        assert info.value.status_code == 503
        assert httpx.get(f"{srv.url}/version", timeout=TIMEOUT_S).status_code == 200  # still serving
    finally:
        srv.stop()


def test_cli_rejects_unknown_engine_values(tiny_model):
    proc = subprocess.run([sys.executable, "-m", "nanovllm", "serve", tiny_model, "--port", "0", "--kvcache-block-size",
                           "15", "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0 and "kvcache_block_size must be a power of two" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "nanovllm", "serve", tiny_model, "--no-such-flag"], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2 and "--no-such-flag" in proc.stderr


def test_api_key_guards_the_v1_routes(tiny_model):
    """build_app in process (starlette's TestClient): with an API key the /v1 routes need the bearer token,
    /health does not."""
    from fastapi.testclient import TestClient

    from nanovllm import AsyncLLM
    from nanovllm.entrypoints.openai.server import build_app
    with AsyncLLM(tiny_model, num_kvcache_blocks=16, **ENGINE) as engine, \
            TestClient(build_app(engine, NAME, api_key="sesame")) as http:
        assert http.get("/health").status_code == 200
        refused = http.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "AuthenticationError"
        assert http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = http.post("/v1/completions", headers={"Authorization": "Bearer sesame"},
                       json={"model": NAME, "prompt": "hello", "max_tokens": 3, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_logprob_bytes_rebuild_multibyte_text(tok):
    """Byte-level tokens inside a UTF-8 character have the text "\ufffd" but carry their own bytes."""
    from nanovllm.entrypoints.openai.server import TokenTexts
    texts = TokenTexts(tok)
    ids = tok.encode("héllo 日本")
    assert any(texts(i) == "\ufffd" for i in ids)
    assert bytes(b for i in ids for b in texts.token_bytes(i)).decode() == "héllo 日本"


def test_json_body_of_a_stream_error_is_openai_style():
    """A failure after a stream started is sent as an event the openai client raises."""
    from nanovllm.entrypoints.openai.server import stream_error
    event = stream_error(ValueError("bad"))
    assert event.startswith("data: ") and json.loads(event[6:])["error"] == {
        "message": "bad", "type": "BadRequestError", "param": None, "code": 400}
