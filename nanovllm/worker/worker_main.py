"""Entry point of a spawned tensor-parallel worker process (ranks 1..N-1)."""
import os
from datetime import timedelta
from multiprocessing.connection import Connection

import torch.distributed as dist

from nanovllm.config import Config
from nanovllm.distributed.shm_channel import ShmChannel
from nanovllm.distributed.workers import init_tp, report_failure
from nanovllm.worker.messages import InstallHook, Shutdown, StepInput
from nanovllm.worker.model_runner import ModelRunner


def worker_main(config: Config, rank: int, store_port: int, channel_name: str, conn: Connection) -> None:
    """Attach, build this rank's runner, then execute what rank 0 sends until Shutdown. On an exception send it to
    rank 0 and exit at once (os._exit), so rank 0's pending collectives fail on the closed connection; exit quietly
    when rank 0 is gone (EOF on the pipe)."""
    conn.send(("started", rank))
    try:
        store = dist.TCPStore("127.0.0.1", store_port, config.tensor_parallel_size, is_master=False,
                              timeout=timedelta(seconds=config.worker_start_timeout_s))
        store.set(f"attached/{rank}", "1")
        runner = ModelRunner(config, init_tp(config, rank, store))
        channel = ShmChannel(channel_name, config.tensor_parallel_size - 1)
        serve(runner, channel, conn, rank)
    except EOFError:
        os._exit(0)
    except BaseException:
        report_failure(conn, rank)
        os._exit(1)
    os._exit(0)


def serve(runner: ModelRunner, channel: ShmChannel, conn: Connection, rank: int) -> None:
    while True:
        conn.recv_bytes()  # rank 0 wrote a message
        message = channel.read(rank - 1)
        if isinstance(message, StepInput):
            runner.execute(message)
        elif isinstance(message, InstallHook):
            runner.hooks.append(message.hook)
        elif isinstance(message, Shutdown):
            runner.exit()
            channel.close()
            return
        else:
            raise TypeError(f"unknown message {type(message).__name__}")
