"""The engine loop in a process of its own (AsyncLLM(engine_process=True), what `nanovllm serve` runs).

In one process the engine loop's Python (schedule, prepare, read back, detokenise) shares the GIL with the caller's
event loop; a server formatting ~20,000 stream chunks a second then slows every step. Here the child process runs
the same EngineLoop as the threaded AsyncLLM, and the parent keeps a client with the loop's interface:

    parent: AsyncLLM -> EngineProcess.send(command) --pipe--> child main thread -> EngineLoop (engine thread)
    parent: reader thread -> streams / futures     <--pipe-- post / settle, one message per step

Commands carry integer keys instead of the parent's RequestStreams and futures (the parent maps them back).
Messages are the typed dataclasses below plus async_llm's AddRequest / AbortRequest / CallEngine / Stop, pickled by
the pipe. The child is not a daemon (it starts the tensor-parallel workers); it exits when the parent sends Stop or
goes away (end of file on the pipe), exiting the engine either way."""
from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import pickle
import threading
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from nanovllm.config import Config
from nanovllm.engine.errors import EngineDeadError
from nanovllm.engine.output_processor import RequestOutput
from nanovllm.entrypoints.async_llm import (
    STOP,
    AbortRequest,
    AddRequest,
    CallEngine,
    EngineLoop,
    RequestStream,
    Stop,
    closed_error,
    post,
    settle,
)

STOP_TIMEOUT_S = 60.0  # stop() waits this long for the child to exit the engine before killing it


# -- child -> parent ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    config: Config
    num_kvcache_blocks: int


@dataclass(frozen=True)
class StartupFailed:
    error: BaseException


@dataclass(frozen=True)
class Posts:
    items: list[tuple[int, Any]]  # (request key, RequestOutput | Aborted | exception)


@dataclass(frozen=True)
class Reply:
    key: int
    result: Any
    error: BaseException | None


@dataclass(frozen=True)
class Closed:
    dead: EngineDeadError | None  # why the loop ended, if the engine died


# -- the child ----------------------------------------------------------------------------------------------------
def picklable(error: BaseException) -> BaseException:
    """error itself if it survives pickling, else a RuntimeError carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class Outbox:
    """The child's end of the pipe: the engine thread and the forwarding thread both send through it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, message: Any) -> None:
        with self.lock:
            try:
                self.conn.send(message)
            except (BrokenPipeError, EOFError, OSError):  # the parent is gone: nothing to tell
                pass

    def post(self, items: list[tuple[int, Any]]) -> None:
        if not items:
            return
        if any(isinstance(item, BaseException) for _, item in items):  # errors are rare: check them
            items = [(key, picklable(item) if isinstance(item, BaseException) else item) for key, item in items]
        self.send(Posts(items))

    def settle(self, key: int, result: Any, error: BaseException | None) -> None:
        if error is not None:
            error = picklable(error)
        try:
            pickle.dumps(result)
        except Exception as e:
            result, error = None, TypeError(f"run_on_engine's result cannot cross to the parent process: {e}")
        self.send(Reply(key, result, error))


def forward(conn: Connection, loop: EngineLoop, outbox: Outbox) -> None:
    """Commands from the parent to the loop until Stop or end of file (the parent went away: stop too)."""
    while True:
        try:
            command = conn.recv()
        except (EOFError, OSError):
            command = STOP
        if isinstance(command, Stop):
            loop.stop()
            return
        try:
            loop.send(command)
        except (EngineDeadError, RuntimeError) as e:  # the loop closed meanwhile
            outbox.post(loop.refuse(command, e))


def child_main(conn: Connection, model: str, kwargs: dict[str, Any]) -> None:
    """The engine core process: 1. start the engine loop (its own thread, as in AsyncLLM); 2. forward commands on
    another thread; 3. once the loop ended (Stop, or the engine died; it exited the engine), say so and return."""
    outbox = Outbox(conn)
    loop = EngineLoop(model, kwargs, post=outbox.post, settle=outbox.settle)
    if loop.startup_error is not None:
        outbox.send(StartupFailed(picklable(loop.startup_error)))
        return
    outbox.send(Started(loop.config, loop.num_kvcache_blocks))
    threading.Thread(target=forward, args=(conn, loop, outbox), name="nanovllm-engine-commands", daemon=True).start()
    loop.thread.join()
    outbox.send(Closed(picklable(loop.dead) if loop.dead is not None else None))


# -- the parent ---------------------------------------------------------------------------------------------------
class EngineProcess:
    """The parent's side: EngineLoop's interface (send, stop, dead, startup_error, config) over the child."""

    def __init__(self, model: str, kwargs: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=child_main, args=(child_conn, model, kwargs), name="nanovllm-engine-core")
        self.process.start()
        child_conn.close()
        self.lock = threading.Lock()  # guards the pipe's sending end, the tables and closed
        self.closed = False
        self.dead: EngineDeadError | None = None
        self.startup_error: BaseException | None = None
        self.streams: dict[int, RequestStream] = {}
        self.stream_keys: dict[RequestStream, int] = {}
        self.unfinished: dict[int, int] = {}  # samples of each request key not finished yet
        self.replies: dict[int, asyncio.Future] = {}
        self.keys = itertools.count()
        self.config: Config | None = None
        self.num_kvcache_blocks = 0
        try:
            first = self.conn.recv()
        except (EOFError, OSError):
            first = StartupFailed(RuntimeError(f"the engine process exited while starting (exit code "
                                               f"{self.process.join(5) or self.process.exitcode})"))
        if isinstance(first, StartupFailed):
            self.startup_error, self.closed = first.error, True
            return
        self.config, self.num_kvcache_blocks = first.config, first.num_kvcache_blocks
        self.reader = threading.Thread(target=self.read, name="nanovllm-engine-reader", daemon=True)
        self.reader.start()

    # -- commands (any thread) --------------------------------------------------------------------------------------
    def send(self, command: Any) -> None:
        with self.lock:
            if self.closed:
                raise self.closed_error()
            message = self.keyed(command)
            try:
                self.conn.send(message)
            except (BrokenPipeError, OSError):  # the child is gone; the reader is failing everything
                raise self.closed_error() from None
            except Exception as e:  # not picklable (run_on_engine's fn, most likely)
                self.unregister(message)
                raise TypeError(f"this command cannot be sent to the engine process: {e}; with "
                                "engine_process=True, run_on_engine needs a picklable (module-level) function") from e

    def keyed(self, command: Any) -> Any:
        """The command with its stream and reply replaced by keys (new ones registered)."""
        if isinstance(command, AddRequest):
            key = next(self.keys)
            self.streams[key], self.stream_keys[command.stream] = command.stream, key
            self.unfinished[key] = command.params.n
            return replace(command, stream=key)
        if isinstance(command, AbortRequest):
            return replace(command, stream=self.stream_keys.get(command.stream, -1),
                           reply=self.reply_key(command.reply))
        if isinstance(command, CallEngine):
            return replace(command, reply=self.reply_key(command.reply))
        return command

    def unregister(self, message: Any) -> None:
        if isinstance(message, AddRequest):
            self.forget(message.stream)
        elif isinstance(message, (AbortRequest, CallEngine)) and message.reply is not None:
            self.replies.pop(message.reply, None)

    def reply_key(self, future: asyncio.Future | None) -> int | None:
        if future is None:
            return None
        key = next(self.keys)
        self.replies[key] = future
        return key

    def closed_error(self) -> Exception:
        return closed_error(self.dead)

    def stop(self) -> None:
        """Ask the child to stop (requests in flight fail), wait for it to exit the engine. Idempotent."""
        with self.lock:
            try:  # also after the engine died: the child waits for this (or the pipe's end) to exit
                self.conn.send(STOP)
            except (BrokenPipeError, OSError):
                pass
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        if self.startup_error is None and threading.current_thread() is not self.reader:
            self.reader.join()

    # -- what comes back (the reader thread) ------------------------------------------------------------------------
    def read(self) -> None:
        closed = None
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the child is gone without saying so: it crashed or was killed
                break
            if isinstance(message, Posts):
                self.route(message.items)
            elif isinstance(message, Reply):
                with self.lock:
                    future = self.replies.pop(message.key, None)
                    self.note_death(message.error)
                if future is not None:
                    settle(future, message.result, message.error)
            elif isinstance(message, Closed):
                closed = message
                break
        if closed is None:
            self.process.join(1.0)
            closed = Closed(EngineDeadError(f"the engine process exited unexpectedly (exit code "
                                            f"{self.process.exitcode}); create a new AsyncLLM"))
        self.close(closed.dead)

    def route(self, items: list[tuple[int, Any]]) -> None:
        """Hand a step's items to their streams; forget a request once its last sample finished (or it failed or
        was aborted)."""
        resolved = []
        with self.lock:
            for key, item in items:
                stream = self.streams.get(key)
                if stream is None:
                    continue
                resolved.append((stream, item))
                self.note_death(item)
                if isinstance(item, RequestOutput):
                    self.unfinished[key] -= item.finished
                    if self.unfinished[key] > 0:
                        continue
                self.forget(key)
        post(resolved)

    def note_death(self, item: Any) -> None:
        """is_dead turns True with the first EngineDeadError that comes back (before the loop's Closed)."""
        if isinstance(item, EngineDeadError) and self.dead is None:
            self.dead = item

    def forget(self, key: int) -> None:
        stream = self.streams.pop(key, None)
        self.stream_keys.pop(stream, None)
        self.unfinished.pop(key, None)

    def close(self, dead: EngineDeadError | None) -> None:
        """The child ended: fail whatever still waits on it."""
        with self.lock:
            self.closed = True
            if dead is not None:
                self.dead = dead
            error = self.closed_error()
            streams, self.streams, self.stream_keys, self.unfinished = list(self.streams.values()), {}, {}, {}
            replies, self.replies = list(self.replies.values()), {}
        post([(stream, error) for stream in streams if not stream.done])
        for future in replies:
            settle(future, None, error)
