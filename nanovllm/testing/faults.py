"""Fault injection for tests, installed on the workers through the explicit InstallHook message."""
import os
import signal
from dataclasses import dataclass

from nanovllm.worker.messages import InstallHook


@dataclass
class WorkerFault:
    """A step hook: on rank `rank`, let `steps` more steps run, then raise (or SIGKILL the process) at the start of
    the next one, before its collectives."""
    rank: int
    steps: int = 0
    kill: bool = False

    def __call__(self, runner, step) -> None:
        if runner.tp.rank != self.rank:
            return
        if self.steps > 0:
            self.steps -= 1
            return
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"fault injected for a test on rank {self.rank}")


def install_fault(llm, rank: int, steps: int = 0, kill: bool = False) -> None:
    """Make worker `rank` of a tensor-parallel engine fail at the start of its (steps + 1)-th next step."""
    workers = llm.model_runner.workers
    if workers is None or not 1 <= rank < workers.size:
        raise ValueError(f"rank {rank} is not a worker of this engine")
    workers.send(InstallHook(WorkerFault(rank, steps, kill)))
    workers.in_flight = False  # nothing for rank 0 to run
