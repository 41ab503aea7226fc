"""The OpenAI-compatible HTTP server on FastAPI + uvicorn, over one AsyncLLM.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (200; 503 once the engine is
dead), GET /version, GET /metrics (Prometheus text: scheduler and KV-cache counts). Every request is checked before
anything is queued: a bad one gets a 400 with an OpenAI-style error body and nothing else changes. A completion
request with several prompts, or n > 1, runs as several engine requests (choice index = prompt index * n + sample
index, as vLLM). Streams are server-sent events ending with `data: [DONE]`; a client that disconnects, streaming
or not, aborts its requests at once (their KV blocks are freed)."""
import asyncio
import secrets
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from nanovllm.engine.detokenizer import byte_level_alphabet
from nanovllm.engine.errors import EngineDeadError, RequestsFailedError
from nanovllm.entrypoints.async_llm import AsyncLLM, StreamOutput
from nanovllm.entrypoints.openai import protocol
from nanovllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from nanovllm.sampling_params import SamplingParams

HEALTH_TIMEOUT_S = 30.0  # /health answers 503 when the engine loop does not answer within this
GRACEFUL_SHUTDOWN_S = 5.0
COUNTERS = ("num_steps", "num_requests_aborted", "num_preemptions")  # /metrics: the rest are gauges
SWITCH_INTERVAL_S = 0.0005  # the server process's GIL switch interval (see run_server)
DONE = protocol.sse("[DONE]")
T = TypeVar("T")
B = TypeVar("B", bound=SamplingRequest)


def package_version() -> str:
    try:
        return version("nano-vllm")
    except PackageNotFoundError:
        return "unknown"


class APIError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def as_api_error(error: Exception) -> APIError:
    """The HTTP status for an error from the engine side: bad request 400, dead or shut-down engine 503, else 500."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    if isinstance(error, RequestsFailedError):
        return APIError(500, str(error))
    if isinstance(error, (EngineDeadError, RuntimeError)):
        return APIError(503, f"the engine cannot serve requests: {error}")
    return APIError(500, f"{type(error).__name__}: {error}")


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, status), status_code=status)


def validation_message(request: Request, error: RequestValidationError) -> str:
    if "json" not in request.headers.get("content-type", ""):
        return "the request body must be JSON, sent with `Content-Type: application/json`"
    parts = []
    for e in error.errors():
        loc = e.get("loc", ())[1:]  # without the leading "body"
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({e.get('msg')} at character {loc[0] if loc else '?'})")
        else:
            where = ".".join(str(x) for x in loc)
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


# -- streams ------------------------------------------------------------------------------------------------------
class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed (aborting its requests) as soon as the client disconnects,
    while it waits for the engine too, not only when a later send fails."""
    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait((streaming, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watcher):
                task.cancel()
            await asyncio.gather(streaming, watcher, return_exceptions=True)
            await self.body_iterator.aclose()
        if not streaming.cancelled() and isinstance(streaming.exception(), Exception):
            if not isinstance(streaming.exception(), OSError):  # OSError: the client is gone
                raise streaming.exception()


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """work's result, or None once the client disconnected first (work is then cancelled: its requests abort)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


END = object()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several async iterators as they come; leaving early closes them all."""
    items: asyncio.Queue = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                items.put_nowait(item)
            items.put_nowait(END)
        except Exception as e:
            items.put_nowait(e)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await items.get()
            if item is END:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


# -- requests -----------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """One engine request of an HTTP request: checked token ids and sampling parameters."""
    token_ids: list[int]
    params: SamplingParams
    echo: str = ""  # completions with echo: the prompt's text, put before each choice's text


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None


class TokenTexts:
    """Token id -> its text and its bytes, for logprobs (cached; used on the event loop's thread only). A byte-level
    BPE token that is part of a UTF-8 character has the text "\ufffd" but its own byte(s)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.texts: dict[int, str] = {}
        self.bytes: dict[int, list[int]] = {}
        self.alphabet = {c: b for b, c in byte_level_alphabet().items()}  # stand-in character -> byte

    def __call__(self, token_id: int) -> str:
        text = self.texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"
            self.texts[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> list[int]:
        raw = self.bytes.get(token_id)
        if raw is None:
            text = self(token_id)
            token = self.tokenizer.convert_ids_to_tokens(token_id) if self.tokenizer is not None else None
            raw = list(text.encode("utf-8"))
            if isinstance(token, str) and token and all(c in self.alphabet for c in token):
                as_bytes = bytes(self.alphabet[c] for c in token)
                if as_bytes.decode("utf-8", "replace") == text:  # a byte-level token: its own bytes
                    raw = list(as_bytes)
            self.bytes[token_id] = raw
        return raw


class OpenAIServing:
    """The endpoints' work: check a request, run its engine requests, build the response or the event stream."""

    def __init__(self, llm: AsyncLLM, model_name: str) -> None:
        self.llm = llm
        self.model_name = model_name
        self.token_text = TokenTexts(llm.tokenizer)
        self.created = int(time.time())

    # -- checks ---------------------------------------------------------------------------------------------------
    def checked(self, prepare: Callable[[B], list[Prepared]], body: B) -> list[Prepared]:
        """prepare(body), every failure as an APIError (a bad request 400), after checking the engine is alive."""
        if self.llm.is_dead:
            raise APIError(503, "the engine is dead (a tensor-parallel worker failed); restart the server")
        try:
            return prepare(body)
        except Exception as e:
            raise as_api_error(e) from e

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(400, f"model {model!r} is not served here; this server serves {self.model_name!r}")

    def prepare(self, prompt: str | list[int], body: SamplingRequest, max_tokens: int | None,
                logprobs: int | None, where: str = "prompt") -> Prepared:
        """Tokenise and check one prompt; max_tokens None: what fits in max_model_len after the prompt."""
        token_ids = self.llm.encode(prompt, where)
        if max_tokens is None:
            max_tokens = max(self.llm.config.max_model_len - len(token_ids), 1)
        params = body.sampling_params(max_tokens, logprobs)
        return Prepared(self.llm.process_inputs(token_ids, params, where), params)

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        tokenizer = self.llm.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"model {self.model_name!r} has no chat template; use /v1/completions")
        messages = [m.for_template() for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=
                                                 body.add_generation_prompt, **(body.chat_template_kwargs or {}))
        except Exception as e:  # a template's own raise_exception (e.g. roles must alternate), bad kwargs
            raise ValueError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e
        return tokenizer.encode(text, add_special_tokens=False)  # the template writes any special tokens itself

    def outputs(self, request_id: str, prepared: list[Prepared]) -> AsyncIterator[StreamOutput]:
        """The outputs of the engine requests "{request_id}-{i}", one per prepared prompt, as they come."""
        streams = [self.llm.generate(p.token_ids, p.params, request_id=f"{request_id}-{i}", checked=True)
                   for i, p in enumerate(prepared)]
        return streams[0] if len(streams) == 1 else merge(streams)

    def header(self, request_id: str, obj: str) -> dict:
        return {"id": request_id, "object": obj, "created": int(time.time()), "model": self.model_name}

    async def collect(self, request_id: str, prepared: list[Prepared], n: int) -> dict[int, Choice]:
        """Every choice's whole output (non-streaming), by choice index."""
        prompt_index = prompt_indices(request_id, len(prepared))
        choices: dict[int, Choice] = {}
        async with aclosing(self.outputs(request_id, prepared)) as outputs:
            async for out in outputs:
                index = prompt_index[out.request_id] * n + out.index
                choice = choices.setdefault(index, Choice(logprobs=None if out.logprobs is None else []))
                choice.text += out.text
                choice.token_ids += out.token_ids
                if choice.logprobs is not None:
                    choice.logprobs += out.logprobs or []
                choice.finish_reason = out.finish_reason
        return dict(sorted(choices.items()))

    # -- /v1/completions --------------------------------------------------------------------------------------------
    def prepare_completion(self, body: CompletionRequest) -> list[Prepared]:
        self.check_model(body.model)
        body.check_supported()
        prompts = body.prompts()
        prepared = [self.prepare(p, body, body.max_tokens, body.logprobs, f"prompt[{i}]" if len(prompts) > 1
                                 else "prompt") for i, p in enumerate(prompts)]
        if body.echo:
            tokenizer = self.llm.tokenizer
            for p, prompt in zip(prepared, prompts, strict=True):
                p.echo = prompt if isinstance(prompt, str) else tokenizer.decode(prompt) if tokenizer else ""
        return prepared

    async def completion(self, body: CompletionRequest, prepared: list[Prepared]) -> dict:
        request_id = f"cmpl-{uuid.uuid4().hex}"
        choices = await self.collect(request_id, prepared, body.n)
        out = []
        for index, c in choices.items():
            choice = {"index": index, "text": prepared[index // body.n].echo + c.text, "logprobs": None,
                      "finish_reason": c.finish_reason}
            if c.logprobs is not None:
                choice["logprobs"] = protocol.completion_logprobs(c.token_ids, c.logprobs, self.token_text, 0)[0]
            if body.return_token_ids:
                choice["token_ids"] = c.token_ids
            out.append(choice)
        num_prompt = sum(len(p.token_ids) for p in prepared)
        return {**self.header(request_id, "text_completion"), "choices": out,
                "usage": protocol.usage(num_prompt, sum(len(c.token_ids) for c in choices.values()))}

    async def completion_events(self, body: CompletionRequest, prepared: list[Prepared]) -> AsyncIterator[str]:
        request_id = f"cmpl-{uuid.uuid4().hex}"
        header = self.header(request_id, "text_completion")
        chunk = protocol.ChunkFormat(header, body.include_usage)
        prompt_index = prompt_indices(request_id, len(prepared))
        offsets: dict[int, int] = {}  # choices already started: their text offset, for logprobs
        num_tokens = 0
        try:
            async with aclosing(self.outputs(request_id, prepared)) as outputs:
                async for out in outputs:
                    i = prompt_index[out.request_id]
                    index = i * body.n + out.index
                    text = out.text if index in offsets or not body.echo else prepared[i].echo + out.text
                    logprobs = None
                    if out.logprobs is not None:
                        logprobs, offsets[index] = protocol.completion_logprobs(
                            out.token_ids, out.logprobs, self.token_text, offsets.get(index, 0))
                    offsets.setdefault(index, 0)
                    num_tokens += len(out.token_ids)
                    yield chunk(protocol.completion_choice(index, text, out.finish_reason, logprobs,
                                                           out.token_ids if body.return_token_ids else None))
            if body.include_usage:
                num_prompt = sum(len(p.token_ids) for p in prepared)
                yield protocol.sse({**header, "choices": [], "usage": protocol.usage(num_prompt, num_tokens)})
        except Exception as e:
            yield stream_error(e)
        yield DONE

    # -- /v1/chat/completions ---------------------------------------------------------------------------------------
    def prepare_chat(self, body: ChatCompletionRequest) -> list[Prepared]:
        self.check_model(body.model)
        body.check_supported()
        return [self.prepare(self.chat_prompt(body), body, body.max_tokens_asked, body.num_logprobs())]

    async def chat(self, body: ChatCompletionRequest, prepared: list[Prepared]) -> dict:
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        choices = await self.collect(request_id, prepared, body.n)
        out = []
        for index, c in choices.items():
            choice = {"index": index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                      "finish_reason": c.finish_reason}
            if c.logprobs is not None:
                choice["logprobs"] = protocol.chat_logprobs(c.token_ids, c.logprobs, body.top_logprobs or 0,
                                                            self.token_text, self.token_text.token_bytes)
            out.append(choice)
        return {**self.header(request_id, "chat.completion"), "choices": out,
                "usage": protocol.usage(len(prepared[0].token_ids), sum(len(c.token_ids) for c in choices.values()))}

    async def chat_events(self, body: ChatCompletionRequest, prepared: list[Prepared]) -> AsyncIterator[str]:
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        header = self.header(request_id, "chat.completion.chunk")
        chunk = protocol.ChunkFormat(header, body.include_usage)
        num_tokens = 0
        try:
            for index in range(body.n):
                yield chunk(protocol.chat_choice(index, "", None, role="assistant"))
            async with aclosing(self.outputs(request_id, prepared)) as outputs:
                async for out in outputs:
                    logprobs = None
                    if out.logprobs is not None:
                        logprobs = protocol.chat_logprobs(out.token_ids, out.logprobs, body.top_logprobs or 0,
                                                          self.token_text, self.token_text.token_bytes)
                    num_tokens += len(out.token_ids)
                    text = out.text if out.text or not out.finished else None
                    yield chunk(protocol.chat_choice(out.index, text, out.finish_reason, logprobs))
            if body.include_usage:
                num_prompt = len(prepared[0].token_ids)
                yield protocol.sse({**header, "choices": [], "usage": protocol.usage(num_prompt, num_tokens)})
        except Exception as e:
            yield stream_error(e)
        yield DONE


def prompt_indices(request_id: str, num_prompts: int) -> dict[str, int]:
    """Engine request id -> the index of its prompt in the HTTP request."""
    return {f"{request_id}-{i}": i for i in range(num_prompts)}


def stream_error(error: Exception) -> str:
    """An error after the stream started: an event with an OpenAI error body (the openai client raises it)."""
    api_error = as_api_error(error)
    return protocol.sse(protocol.error_body(str(api_error), api_error.status))


# -- the app ------------------------------------------------------------------------------------------------------
def api_key_check(api_key: str) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send `Authorization: Bearer <key>`)")
    return check


def build_app(llm: AsyncLLM, served_model_name: str | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving llm as served_model_name (default: the model directory). With api_key, the /v1 routes
    need `Authorization: Bearer <api_key>`."""
    serving = OpenAIServing(llm, served_model_name or llm.config.model)
    app = FastAPI(title="nano-vllm", version=package_version())
    add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        try:
            await asyncio.wait_for(llm.check_health(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return error_response(503, f"the engine did not answer within {HEALTH_TIMEOUT_S:.0f} s")
        except (EngineDeadError, RuntimeError) as e:
            return error_response(503, f"the engine cannot serve requests: {e}")
        return Response(status_code=200)

    @app.get("/version")
    async def show_version() -> dict:
        return {"version": package_version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            stats = await llm.stats()
        except (EngineDeadError, RuntimeError) as e:
            return error_response(503, f"the engine cannot serve requests: {e}")
        lines = [f"# TYPE nanovllm:{name} {'counter' if name in COUNTERS else 'gauge'}\nnanovllm:{name} {value}"
                 for name, value in stats.items()]
        return PlainTextResponse("\n".join(lines) + "\n")

    v1 = APIRouter(dependencies=[Depends(api_key_check(api_key))] if api_key else [])

    @v1.get("/v1/models")
    async def models() -> dict:
        card = {"id": serving.model_name, "object": "model", "created": serving.created, "owned_by": "nanovllm",
                "root": llm.config.model, "max_model_len": llm.config.max_model_len}
        return {"object": "list", "data": [card]}

    @v1.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prepared = serving.checked(serving.prepare_completion, body)
        if body.stream:
            return EventStream(serving.completion_events(body, prepared))
        return await respond(request, serving.completion(body, prepared))

    @v1.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        prepared = serving.checked(serving.prepare_chat, body)
        if body.stream:
            return EventStream(serving.chat_events(body, prepared))
        return await respond(request, serving.chat(body, prepared))

    app.include_router(v1)
    return app


async def respond(request: Request, work: Awaitable[dict]) -> Response:
    try:
        result = await unless_disconnected(request, work)
    except Exception as e:
        error = as_api_error(e)
        return error_response(error.status, str(error))
    return JSONResponse(result) if result is not None else Response(status_code=499)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(request, e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))


def exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def run_server(model: str, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
               api_key: str | None = None, log_level: str = "info", engine_process: bool = True,
               **engine_kwargs: Any) -> None:
    """Start the engine, then serve it until Ctrl-C or SIGTERM (requests in flight get GRACEFUL_SHUTDOWN_S to
    finish); the engine exits afterwards. engine_process: the engine loop runs in a process of its own (AsyncLLM's
    engine_process), so formatting and writing stream chunks here never slows its steps."""
    import uvicorn

    # The engine thread and the event loop share the GIL; the engine must get it back promptly once the GPU step it
    # waited for is done (the default 5 ms switch interval can stall a step behind a busy event loop).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # uvicorn re-raises the signal that stopped it once it is done: SIGTERM must then unwind (and exit the engine)
    # rather than kill the process.
    signal.signal(signal.SIGTERM, exit_on_signal)
    llm = AsyncLLM(model, engine_process=engine_process, **engine_kwargs)
    try:
        app = build_app(llm, served_model_name or model, api_key)
        uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="off",
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    except KeyboardInterrupt:
        pass
    finally:
        llm.shutdown()
