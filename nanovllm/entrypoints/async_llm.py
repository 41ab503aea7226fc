"""AsyncLLM: the engine behind an asyncio API, for servers and other programs with many requests in flight.

One background thread, the engine loop, owns the LLMEngine (it creates, steps and exits it: the engine is not
thread-safe). Callers on an event loop hand it commands through a thread-safe queue: add a request, abort one, run
a function on the engine. Between steps the loop takes every queued command, so a new request joins the running
batch at the next step (continuous batching); with nothing unfinished it sleeps on the queue, waking every
IDLE_CHECK_S to check the tensor-parallel workers. Each step's outputs go back to the event loop in one
`call_soon_threadsafe`, into the requests' RequestStreams; `generate()` yields what arrived since its last yield,
merged per sample, so a consumer that falls behind gets fewer, larger deltas instead of a growing backlog.

Prompts are tokenised and checked on the caller's thread with a tokenizer of its own (one HF tokenizer must not be
used by two threads at once), so a bad request raises ValueError at once and never reaches the engine."""
import asyncio
import logging
import queue
import threading
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from nanovllm.engine.errors import EngineDeadError, RequestsFailedError
from nanovllm.engine.inputs import InputProcessor, Prompt, load_tokenizer
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.output_processor import RequestOutput
from nanovllm.sampling_params import SamplingParams

IDLE_CHECK_S = 1.0  # an idle engine loop checks the workers (and whether the main thread ended) this often
T = TypeVar("T")
logger = logging.getLogger(__name__)


# What generate() yields: a RequestOutput whose request_id is the caller's (str) id, one per sample per yield.
StreamOutput = RequestOutput


class RequestStream:
    """One request's outputs on its event loop: the engine loop posts, generate() takes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list = []  # RequestOutputs, then possibly ABORTED or an exception
        self.waiter: asyncio.Future | None = None  # take() waiting for items
        self.done = False  # every sample finished, or the request was aborted or failed

    def put(self, item: Any) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list:
        """Everything posted since the last take (waits for something)."""
        if not self.items:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


# -- commands (event loop -> engine loop) and what the loop posts back ---------------------------------------------
# A request's `stream` and a command's `reply` are handles the loop only passes back to its post / settle functions:
# the RequestStream and asyncio.Future themselves in a thread, integer keys across a process boundary.
@dataclass
class AddRequest:
    stream: Any
    token_ids: list[int]
    params: SamplingParams


@dataclass
class AbortRequest:
    stream: Any
    reply: Any = None  # gets True when the request was running and is now aborted


@dataclass
class CallEngine:
    fn: Callable[[LLMEngine], Any]
    reply: Any
    on_loop: bool = False  # fn takes the EngineLoop (its counters and its engine) instead of the engine


@dataclass(frozen=True)
class Stop:
    """Leave the loop after the current step, fail what is in flight, exit the engine."""


@dataclass(frozen=True)
class Aborted:
    """Posted to a request's stream when it was aborted."""


STOP, ABORTED = Stop(), Aborted()
Post = Callable[[list[tuple[Any, Any]]], None]   # [(stream handle, RequestOutput | Aborted | exception)]
Settle = Callable[[Any, Any, BaseException | None], None]  # (reply handle, result, error)


@dataclass
class Running:
    stream: Any
    unfinished: int  # samples not finished yet


def call_on(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Complete future from the engine thread (unless its caller gave up meanwhile)."""
    def complete() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    call_on(future.get_loop(), complete)


def put_all(items: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in items:
        stream.put(item)


def post(items: list[tuple[RequestStream, Any]]) -> None:
    """Hand items to their streams, one call_soon_threadsafe per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, item in items:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, batch in by_loop.items():
        call_on(loop, put_all, batch)


def check_workers(engine: LLMEngine) -> None:
    """Raise EngineDeadError when a tensor-parallel worker died. Every engine call checks the workers first; no
    request has id -1, so this one does nothing else."""
    engine.abort_request(-1)


def engine_stats(engine: LLMEngine) -> dict[str, int]:
    scheduler = engine.scheduler
    blocks = scheduler.block_manager
    return {"num_requests_unfinished": len(engine.requests), "num_seqs_running": len(scheduler.running),
            "num_seqs_waiting": len(scheduler.waiting), "kv_cache_free_blocks": blocks.num_free_blocks,
            "kv_cache_total_blocks": len(blocks.blocks), "num_preemptions": scheduler.num_preemptions}


def loop_stats(loop: "EngineLoop") -> dict[str, int]:
    return {**engine_stats(loop.engine), "num_steps": loop.num_steps, "num_requests_aborted": loop.num_aborted}


def closed_error(dead: EngineDeadError | None) -> Exception:
    """What a call on a closed engine loop raises: the engine's death, or that it was shut down."""
    if dead is not None:
        return EngineDeadError(str(dead))
    return RuntimeError("this AsyncLLM was shut down; create a new one")


def as_dead(error: BaseException) -> EngineDeadError:
    """The EngineDeadError behind error, or one saying the engine loop itself failed (a bug)."""
    if isinstance(error, EngineDeadError):
        return error
    if isinstance(error.__cause__, EngineDeadError):
        return error.__cause__
    logger.error("the engine loop failed", exc_info=error)
    dead = EngineDeadError(f"the engine loop failed ({type(error).__name__}: {error}); create a new AsyncLLM")
    dead.__cause__ = error
    return dead


class EngineLoop:
    """The engine thread: owns the engine, runs commands between steps, posts every step's outputs (through `post`,
    one call per step) and command results (through `settle`)."""

    def __init__(self, model: str, kwargs: dict[str, Any], post: Post = post, settle: Settle = settle) -> None:
        self.post, self.settle = post, settle
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: deque = deque()  # commands taken from the queue, not run yet
        self.lock = threading.Lock()   # guards closed: no command is queued after close() drained the queue
        self.closed = False
        self.dead: EngineDeadError | None = None
        self.engine: LLMEngine | None = None
        self.startup_error: BaseException | None = None
        self.requests: dict[int, Running] = {}           # by engine request id
        self.engine_ids: dict[Any, int] = {}  # by stream handle
        self.num_steps = 0
        self.num_aborted = 0
        self.started = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(model, kwargs), name="nanovllm-engine-loop")
        self.thread.start()
        self.started.wait()

    # -- any thread -------------------------------------------------------------------------------------------------
    def send(self, command: Any) -> None:
        with self.lock:
            if self.closed:
                raise self.closed_error()
            self.commands.put(command)

    def closed_error(self) -> Exception:
        return closed_error(self.dead)

    @property
    def config(self):  # noqa: ANN201 (nanovllm.config.Config)
        return self.engine.config

    @property
    def num_kvcache_blocks(self) -> int:
        return self.engine.inputs.num_kvcache_blocks

    def stop(self) -> None:
        """Leave the loop after the current step, fail what is in flight, exit the engine; wait for all that."""
        with self.lock:
            if not self.closed:
                self.commands.put(STOP)
        if threading.current_thread() is not self.thread:
            self.thread.join()

    # -- the engine thread ------------------------------------------------------------------------------------------
    def run(self, model: str, kwargs: dict[str, Any]) -> None:
        try:
            self.engine = LLMEngine(model, **kwargs)
        except BaseException as e:
            self.startup_error = e
            with self.lock:
                self.closed = True
            return
        finally:
            self.started.set()
        try:
            self.serve()
        except BaseException as e:
            self.dead = as_dead(e)
        finally:
            self.close()

    def serve(self) -> None:
        engine = self.engine
        while True:
            woke = self.take_commands(block=engine.is_finished())
            while self.pending:
                command = self.pending.popleft()
                if isinstance(command, Stop):
                    return
                self.handle(command)
            if not threading.main_thread().is_alive():  # the program is exiting without shutdown()
                return
            if not engine.is_finished():
                self.step()
            elif not woke:
                check_workers(engine)

    def take_commands(self, block: bool) -> bool:
        """Move queued commands to pending; with block, wait up to IDLE_CHECK_S for one. False when none came."""
        count = len(self.pending)
        try:
            if block:
                self.pending.append(self.commands.get(timeout=IDLE_CHECK_S))
            while True:
                self.pending.append(self.commands.get_nowait())
        except queue.Empty:
            pass
        return len(self.pending) > count

    def handle(self, command: Any) -> None:
        if isinstance(command, AddRequest):
            self.add(command)
        elif isinstance(command, AbortRequest):
            aborted = self.abort(command.stream)
            if command.reply is not None:
                self.settle(command.reply, aborted, None)
        else:
            self.call(command)

    def add(self, command: AddRequest) -> None:
        try:
            request_id = self.engine.add_request(command.token_ids, command.params, stream=True)
        except Exception as e:
            self.post([(command.stream, e)])
            if isinstance(e, EngineDeadError):
                raise
            return
        self.requests[request_id] = Running(command.stream, command.params.n)
        self.engine_ids[command.stream] = request_id

    def abort(self, stream: Any) -> bool:
        request_id = self.engine_ids.get(stream)
        if request_id is None:  # finished, failed or never added
            return False
        self.engine.abort_request(request_id)
        del self.engine_ids[stream], self.requests[request_id]
        self.num_aborted += 1
        self.post([(stream, ABORTED)])
        return True

    def call(self, command: CallEngine) -> None:
        try:
            result = command.fn(self if command.on_loop else self.engine)
        except Exception as e:
            self.settle(command.reply, None, e)
            if isinstance(e, EngineDeadError):
                raise
            return
        self.settle(command.reply, result, None)

    def step(self) -> None:
        self.num_steps += 1
        try:
            outputs = self.engine.step_stream()
        except RequestsFailedError as e:
            if isinstance(e.__cause__, EngineDeadError):
                raise
            self.fail(e.request_ids, e)
            return
        posts = []
        for out in outputs:
            running = self.requests.get(out.request_id)
            if running is None:
                continue
            if out.finished:
                running.unfinished -= 1
                if running.unfinished == 0:
                    del self.requests[out.request_id], self.engine_ids[running.stream]
            posts.append((running.stream, out))
        self.post(posts)

    def fail(self, request_ids: list[int], error: Exception) -> None:
        posts = []
        for request_id in request_ids:
            running = self.requests.pop(request_id, None)
            if running is not None:
                del self.engine_ids[running.stream]
                posts.append((running.stream, error))
        self.post(posts)

    def refuse(self, command: Any, error: Exception) -> list[tuple[Any, Any]]:
        """Answer a command the closed loop will not run: replies are settled now; an added request's failure is
        returned, for the caller's next post."""
        if isinstance(command, AbortRequest) and command.reply is not None:
            self.settle(command.reply, False, None)
        elif isinstance(command, CallEngine):
            self.settle(command.reply, None, error)
        return [(command.stream, error)] if isinstance(command, AddRequest) else []

    def close(self) -> None:
        """Fail every request in flight and every command not run, then exit the engine."""
        with self.lock:
            self.closed = True
        error = self.closed_error()
        posts = [(running.stream, error) for running in self.requests.values()]
        self.requests.clear()
        self.engine_ids.clear()
        self.take_commands(block=False)
        for command in self.pending:
            posts += self.refuse(command, error)
        self.pending.clear()
        self.post(posts)
        self.engine.exit()


def merge_outputs(request_id: str, outputs: list[RequestOutput]) -> list[StreamOutput]:
    """One output per sample from consecutive deltas, in the order the samples first appear, under request_id."""
    merged: dict[int, StreamOutput] = {}
    for out in outputs:
        m = merged.get(out.index)
        if m is None:
            merged[out.index] = replace(out, request_id=request_id)
            continue
        m.text += out.text
        m.token_ids = m.token_ids + out.token_ids
        if m.logprobs is not None:
            m.logprobs = m.logprobs + (out.logprobs or [])
        m.finished, m.finish_reason = out.finished, out.finish_reason
    return list(merged.values())


class AsyncLLM:
    """The engine behind an asyncio API: `async for out in llm.generate(prompt, params)` streams one request's
    outputs while any number of others run in the same batches. Takes LLM's arguments (tensor parallelism
    included); the constructor blocks while the engine starts and raises what LLM would. Call shutdown() when done
    (or use `with AsyncLLM(...) as llm:`).

    engine_process=False (default): the engine loop is a thread of this process (run_on_engine takes any callable).
    engine_process=True: it runs in a process of its own (entrypoints/engine_process.py), so the caller's Python work
    (an HTTP server formatting thousands of stream chunks a second) never competes with the step loop for the GIL;
    commands and outputs cross a pipe, and run_on_engine needs a picklable function. `nanovllm serve` uses it."""

    def __init__(self, model: str, engine_process: bool = False, **kwargs: Any) -> None:
        if engine_process:
            from nanovllm.entrypoints.engine_process import EngineProcess
            self._core = EngineProcess(model, kwargs)
        else:
            self._core = EngineLoop(model, kwargs)
        if self._core.startup_error is not None:
            self._core.stop()
            raise self._core.startup_error
        self.config = self._core.config
        self.tokenizer = load_tokenizer(self.config.model)  # the caller thread's own (the engine's stays there)
        self._inputs = InputProcessor(self.config, self.tokenizer, self._core.num_kvcache_blocks)
        self._streams: dict[str, RequestStream] = {}
        self._shutdown = weakref.finalize(self, self._core.stop)

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the engine loop (requests in flight fail with RuntimeError) and exit the engine. Idempotent."""
        self._shutdown()

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    @property
    def is_dead(self) -> bool:
        """True once the engine died (a tensor-parallel worker failed): every later call raises EngineDeadError."""
        return self._core.dead is not None

    # -- requests ---------------------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, where: str = "prompt") -> list[int]:
        """The prompt's token ids (ValueError for an empty prompt, ids out of the vocabulary, text without a
        tokenizer)."""
        return self._inputs.encode(prompt, where)

    def process_inputs(self, prompt: Prompt, sampling_params: SamplingParams, where: str = "prompt") -> list[int]:
        """The prompt's token ids after every check generate() makes (ValueError naming what is wrong, e.g. a
        request over max_model_len)."""
        return self._inputs.process(prompt, sampling_params, where)

    async def generate(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, checked: bool = False) -> AsyncIterator[StreamOutput]:
        """Add a request and yield its outputs as they come: new text, token ids and logprobs per sample, the
        finish reason on each sample's last output. A bad request raises ValueError at the first iteration;
        leaving the loop early (break, cancellation, a closed client) aborts the request and frees its blocks.
        A failed step raises RequestsFailedError; a dead engine EngineDeadError. checked=True: prompt is the token
        id list process_inputs returned for these sampling_params, so the checks are not repeated here."""
        sp = sampling_params if sampling_params is not None else SamplingParams()
        token_ids = prompt if checked else self.process_inputs(prompt, sp)
        request_id = uuid.uuid4().hex if request_id is None else request_id
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in flight; use a unique id (or none)")
        stream = RequestStream(asyncio.get_running_loop())
        self._core.send(AddRequest(stream, token_ids, sp))
        self._streams[request_id] = stream
        unfinished = set(range(sp.n))
        try:
            while unfinished:
                outputs = []
                for item in await stream.take():
                    if isinstance(item, RequestOutput):
                        outputs.append(item)
                        if item.finished:
                            unfinished.discard(item.index)
                    elif isinstance(item, Aborted):
                        outputs += [RequestOutput(0, i, [], "", None, True, "abort", len(token_ids), 0)
                                    for i in sorted(unfinished)]
                        unfinished.clear()
                    else:
                        stream.done = True
                        raise item
                stream.done = not unfinished
                for out in merge_outputs(request_id, outputs):
                    yield out
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if not stream.done:
                self._abort_soon(stream)

    def _abort_soon(self, stream: RequestStream) -> None:
        try:
            self._core.send(AbortRequest(stream))
        except (EngineDeadError, RuntimeError):  # shut down or dead: nothing runs any more
            pass

    async def abort(self, request_id: str) -> bool:
        """Abort a request in flight and free its blocks (done when this returns); its generate() yields an
        "abort" output for every unfinished sample and ends. False when no such request is running."""
        stream = self._streams.get(request_id)
        if stream is None or stream.done or self.is_dead:
            return False
        reply = asyncio.get_running_loop().create_future()
        try:
            self._core.send(AbortRequest(stream, reply))
        except (EngineDeadError, RuntimeError):
            return False
        return await reply

    # -- the engine -------------------------------------------------------------------------------------------------
    async def run_on_engine(self, fn: Callable[[LLMEngine], T], on_loop: bool = False) -> T:
        """fn(engine) on the engine thread, between steps (for tools and tests: inspect or instrument the engine);
        on_loop: fn(the EngineLoop). With engine_process=True, fn and its result must be picklable."""
        reply = asyncio.get_running_loop().create_future()
        self._core.send(CallEngine(fn, reply, on_loop))
        return await reply

    async def check_health(self) -> None:
        """Raise EngineDeadError when the engine is dead: the workers are checked now, between steps."""
        await self.run_on_engine(check_workers)

    async def stats(self) -> dict[str, int]:
        """Scheduler and KV-cache counts, engine steps and aborted requests so far."""
        return await self.run_on_engine(loop_stats, on_loop=True)
