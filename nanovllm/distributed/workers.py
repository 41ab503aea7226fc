"""Rank 0's side of the tensor-parallel worker processes: start, send, liveness, failure reports, close.

Start-up: rank 0 opens a TCPStore on a free port and the shared-memory channel, spawns ranks 1..N-1, and waits,
polling their liveness every few milliseconds, until each has attached to the store; only then do all ranks join
the process group (so a worker that dies while starting is reported within seconds, and Ctrl-C works). Each worker
reports "started" on its pipe first: one that exits before that failed while Python bootstrapped it, which almost
always means the script that created the LLM lacks an `if __name__ == "__main__":` guard.

Steps: rank 0 writes a message to the channel and wakes each worker with one byte on its pipe (a send to a dead
worker fails at once). A worker that raises sends its traceback on the pipe and exits, so rank 0's pending
collectives fail on the closed connection (gloo); with NCCL a blocked collective waits up to dist_timeout_s."""
import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from nanovllm.config import Config
from nanovllm.distributed.shm_channel import ShmChannel, unique_shm_name
from nanovllm.distributed.tp import TPInfo
from nanovllm.engine.errors import EngineDeadError

MAX_ERROR_CHARS = 20_000  # worker tracebacks sent to rank 0 are cut to their last this many characters
EXIT_WAIT_S = 3.0  # after a failed call, how long to wait for a failing worker to report or exit
JOIN_TIMEOUT_S = 60.0
POLL_S = 0.005
GUARD_HINT = ("tensor-parallel workers are spawned processes that re-import your main script: create the LLM "
              "under `if __name__ == \"__main__\":`")


def init_tp(config: Config, rank: int, store: dist.Store) -> TPInfo:
    """Join the engine's process group (NCCL on GPUs, gloo on CPU) and return this rank's TPInfo."""
    size = config.tensor_parallel_size
    if size == 1:
        return TPInfo()
    device = torch.device("cuda", rank) if config.device == "cuda" else None
    if device is not None:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device is not None else "gloo", store=store, rank=rank, world_size=size,
                            timeout=timedelta(seconds=config.dist_timeout_s), device_id=device)
    return TPInfo(rank, size, dist.group.WORLD)


def set_worker_env(config: Config) -> None:
    """Environment the spawned workers inherit: NVLink multicast (NVLS) off for NCCL unless the user set it."""
    if config.device == "cuda" and config.tensor_parallel_size > 1:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


def describe_exit(exitcode: int | None) -> str:
    """ "exit code 1", or "exit code -9, killed by SIGKILL" for a signal."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"exit code {exitcode}, killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"exit code {exitcode}"


class WorkerGroup:
    def __init__(self, config: Config, channel_capacity: int) -> None:
        if dist.is_initialized():
            raise RuntimeError("one tensor-parallel engine per process: another LLM with tensor_parallel_size > 1 "
                               "is running in this process; exit() it first (engines with tensor_parallel_size=1 "
                               "can run beside it)")
        self.config = config
        self.size = config.tensor_parallel_size
        self.processes: list[mp.Process] = []
        self.conns: list[Connection] = []  # rank 0's end of each worker's pipe, rank order
        self.started: set[int] = set()
        self.errors: list[tuple[float, int, str, BaseException | None]] = []  # (time, rank, traceback, exception)
        self.failure: str | None = None  # once set, the engine is dead
        self.in_flight = False  # workers got a step whose collectives rank 0 has not finished
        self.store = dist.TCPStore("127.0.0.1", 0, self.size, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=config.worker_start_timeout_s))
        self.channel = ShmChannel(unique_shm_name(), self.size - 1, channel_capacity, create=True)
        try:
            self._spawn()
            self._wait_attached()
        except BaseException:
            self.close(graceful=False)
            raise

    # -- start-up -------------------------------------------------------------------------------------------------
    def _spawn(self) -> None:
        set_worker_env(self.config)
        from nanovllm.worker.worker_main import worker_main
        ctx = mp.get_context("spawn")
        for rank in range(1, self.size):
            conn, child_conn = ctx.Pipe()
            process = ctx.Process(target=worker_main, daemon=True,
                                  args=(self.config, rank, self.store.port, self.channel.name, child_conn))
            process.start()
            child_conn.close()  # only the worker holds its end: a send to a dead worker then fails at once
            self.processes.append(process)
            self.conns.append(conn)

    def _wait_attached(self) -> None:
        deadline = time.monotonic() + self.config.worker_start_timeout_s
        while not all(self._attached(rank) for rank in range(1, self.size)):
            self.raise_if_failed()
            if time.monotonic() > deadline:
                raise EngineDeadError(f"tensor-parallel workers did not start within worker_start_timeout_s="
                                      f"{self.config.worker_start_timeout_s}")
            time.sleep(POLL_S)

    def _attached(self, rank: int) -> bool:
        return self.store.check([f"attached/{rank}"])

    def init_tp(self) -> TPInfo:
        return init_tp(self.config, 0, self.store)

    # -- liveness and failures --------------------------------------------------------------------------------------
    def _drain(self) -> None:
        """Collect what the workers sent: "started" notes and error reports."""
        for conn in self.conns:
            try:
                while conn.poll():
                    kind, rank, *rest = conn.recv()
                    if kind == "started":
                        self.started.add(rank)
                    else:
                        self.errors.append((rest[0], rank, rest[1], rest[2]))
            except (EOFError, OSError):  # the worker exited; whatever it sent came before
                pass

    def check(self, wait_s: float = 0.0) -> str | None:
        """What went wrong with the first failed worker, or None while all run; waits up to wait_s for a failing
        worker to report or exit."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [rank for rank, p in enumerate(self.processes, 1) if not p.is_alive()]
            self._drain()  # after the liveness check: a worker reports before exiting
            if self.errors:
                _, rank, tb, _ = min(self.errors, key=lambda e: e[0])
                return f"worker rank {rank} raised:\n{tb}"
            if dead:
                rank = dead[0]
                how = describe_exit(self.processes[rank - 1].exitcode)
                if rank not in self.started:
                    return f"worker rank {rank} exited ({how}) before it started; {GUARD_HINT}"
                return f"worker rank {rank} died ({how})"
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S)

    def worker_exception(self) -> BaseException | None:
        """The first worker's exception, when it could be sent (e.g. a CheckpointError while loading)."""
        self._drain()
        reports = sorted((e for e in self.errors if e[3] is not None), key=lambda e: e[0])
        return reports[0][3] if reports else None

    def raise_if_failed(self) -> None:
        if self.failure is None:
            self.failure = self.check()
        if self.failure is not None:
            raise EngineDeadError(self.failure)

    def mark_failed(self, cause: BaseException) -> str | None:
        """After a failed call: the reason the engine is dead (a worker failed, or rank 0 failed mid-step), or None
        when the failure left every rank in step."""
        if self.failure is None:
            self.failure = self.check(EXIT_WAIT_S if isinstance(cause, Exception) else 0.0)
        if self.failure is None and self.in_flight:
            self.failure = (f"rank 0 failed in the middle of a tensor-parallel step ({type(cause).__name__}: "
                            f"{cause}), so the workers are out of step")
        return self.failure

    # -- messages -------------------------------------------------------------------------------------------------
    def send(self, message: object) -> None:
        """Publish message to every worker and wake them; from here on a failure of rank 0 leaves them out of
        step (in_flight)."""
        self.raise_if_failed()
        self.channel.write(message, wait=self._wait_for_readers)  # may raise: nothing was sent yet
        self.in_flight = True
        for conn in self.conns:
            conn.send_bytes(b"\x01")

    def _wait_for_readers(self) -> None:
        self.raise_if_failed()
        time.sleep(POLL_S)

    # -- shutdown ---------------------------------------------------------------------------------------------------
    def close(self, graceful: bool) -> None:
        """graceful: the workers were sent Shutdown; wait for them. Otherwise (or when they do not exit) kill them.
        Unlink the channel; close the store."""
        for p in self.processes:
            if graceful:
                p.join(JOIN_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()
        self.conns = []
        self.channel.close()


def report_failure(conn: Connection, rank: int) -> None:
    """Worker side: send the current exception (and, if it pickles, the exception itself) to rank 0."""
    exc = sys.exc_info()[1]
    try:
        pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - any unpicklable exception is sent as text only
        exc = None
    try:
        conn.send(("error", rank, time.time(), traceback.format_exc()[-MAX_ERROR_CHARS:], exc))
    except OSError:
        pass
