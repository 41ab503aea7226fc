import atexit
import multiprocessing as mp
import os
import signal
from time import monotonic, perf_counter, sleep
from typing import Any

import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm.config import Config
from nanovllm.engine.errors import EngineDeadError, RequestsFailedError
from nanovllm.engine.model_runner import ModelRunner, free_port, run_worker
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.shm_channel import unique_shm_name
from nanovllm.engine.stop_checker import StopStringChecker
from nanovllm.sampling_params import SamplingParams

WORKER_JOIN_TIMEOUT_S = 60
WORKER_EXIT_WAIT_S = 3.0  # after a failed call, how long to wait for a failing worker to report or exit
RECREATE = "; the engine cannot run again: call exit() and create a new LLM"
Prompt = str | list[int] | dict  # dict: vLLM-style {"prompt": str} or {"prompt_token_ids": [...]}


class LLMEngine:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.config = config = Config.from_kwargs(model, **kwargs)
        self.ps, self.conns = [], []  # worker processes (rank 1, 2, ...) and rank 0's end of their pipes
        self._failure: str | None = None  # once set (a worker failed), every call raises EngineDeadError
        self._exited = True  # until fully started: exit() has nothing to do
        port, shm_name = free_port(), unique_shm_name()
        set_worker_env(config)
        ctx = mp.get_context("spawn")
        for rank in range(1, config.tensor_parallel_size):
            conn, child_conn = ctx.Pipe()
            process = ctx.Process(target=run_worker, args=(config, rank, port, shm_name, child_conn), daemon=True)
            process.start()
            child_conn.close()  # only the worker holds its end: a send to a dead worker then fails at once
            self.ps.append(process)
            self.conns.append(conn)
        try:
            self.model_runner = ModelRunner(config, 0, port, shm_name, self.conns)
        except BaseException as e:  # workers would block forever waiting for rank 0
            failure = self._worker_failure(WORKER_EXIT_WAIT_S) if isinstance(e, Exception) and self.ps else None
            self._kill_workers()
            self._close_conns()
            if dist.is_initialized():  # let a later engine in this process initialise again
                dist.destroy_process_group()
            if failure is not None:
                raise EngineDeadError(failure) from e
            raise
        self.tokenizer = load_tokenizer(config.model)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            config.eos = self.tokenizer.eos_token_id
        stop_checker = StopStringChecker(self.tokenizer) if self.tokenizer is not None else None
        self.scheduler = Scheduler(config, self.model_runner.num_kvcache_blocks, stop_checker)
        self._exited = False
        atexit.register(self.exit)

    def exit(self) -> None:
        """Stop the workers, free the model, KV cache and CUDA graphs, unlink the shared memory and destroy
        the process group. Idempotent; also runs at interpreter exit and copes with failed workers."""
        if self._exited:
            return
        self._exited = True
        atexit.unregister(self.exit)
        runner = self.model_runner
        del self.model_runner  # the engine object may outlive exit(): drop the weights and cache with it
        if not self._exit_collectively(runner):  # a failed worker never reaches the exit barrier
            self._kill_workers()
            runner.exit(collective=False)
        for p in self.ps:
            p.join(WORKER_JOIN_TIMEOUT_S)
        self._kill_workers()
        self._close_conns()

    def _exit_collectively(self, runner: ModelRunner) -> bool:
        """The normal shutdown: every rank runs exit() together. False when a worker failed or is out of step."""
        if self._failure is not None or runner.in_flight or self._worker_failure() is not None:
            return False
        try:
            runner.call("exit")
            return True
        except Exception:
            return False

    def _kill_workers(self) -> None:
        for p in self.ps:
            if p.is_alive():
                p.kill()
                p.join()

    def _close_conns(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns = []

    # -- worker failures --------------------------------------------------------------------------------------
    def _worker_failure(self, wait_s: float = 0.0) -> str | None:
        """What went wrong with the first failed worker (its traceback, or how it died), or None while all
        run; waits up to wait_s for one to report or exit."""
        deadline = monotonic() + wait_s
        while True:
            dead = [rank for rank, p in enumerate(self.ps, 1) if not p.is_alive()]
            errors = self._worker_errors()  # read after the liveness check: a worker reports before exiting
            if errors:
                _, rank, tb = min(errors)
                return f"worker rank {rank} raised:\n{tb}"
            if dead:
                return f"worker rank {dead[0]} died ({describe_exit(self.ps[dead[0] - 1].exitcode)})"
            if monotonic() >= deadline:
                return None
            sleep(0.02)

    def _worker_errors(self) -> list[tuple[float, int, str]]:
        """(time, rank, traceback) reports waiting on the workers' pipes."""
        errors = []
        for conn in self.conns:
            try:
                while conn.poll():
                    errors.append(conn.recv())
            except (EOFError, OSError):  # the worker exited; its report, if any, came before
                pass
        return errors

    def _check_usable(self) -> None:
        if self._exited:
            raise RuntimeError("this engine has exited; create a new LLM")
        if self._failure is None and self.ps:
            self._failure = self._worker_failure()
        if self._failure is not None:
            raise EngineDeadError(self._failure + RECREATE)

    def _call(self, method: str, *args):
        """model_runner.call; a failure that leaves the ranks out of step (a worker died or raised, or rank 0
        failed mid-step under tensor parallelism) marks the engine dead and raises EngineDeadError."""
        try:
            return self.model_runner.call(method, *args)
        except BaseException as e:
            if not self.ps:
                raise
            self._failure = self._worker_failure(WORKER_EXIT_WAIT_S if isinstance(e, Exception) else 0)
            if self._failure is None and self.model_runner.in_flight:
                self._failure = (f"rank 0 failed in the middle of a tensor-parallel step ({type(e).__name__}: "
                                 f"{e}), so the workers are out of step")
            if self._failure is None or not isinstance(e, Exception):
                raise
            raise EngineDeadError(self._failure + RECREATE) from e

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.exit()

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams) -> int:
        """Validate and queue one request (nothing is queued when it is invalid); returns its id."""
        self._check_usable()
        self.check_sampling_params(sampling_params)
        token_ids = self.encode(prompt)
        self.check_fits(len(token_ids), sampling_params)
        return self._add(token_ids, sampling_params).seq_id

    def _add(self, token_ids: list[int], sampling_params: SamplingParams) -> Sequence:
        seq = Sequence(token_ids, sampling_params, self.config.kvcache_block_size)
        self.scheduler.add(seq)
        return seq

    def encode(self, prompt: Prompt, where: str = "prompt") -> list[int]:
        """Token ids of a prompt given as text, token ids, {"prompt": str} or {"prompt_token_ids": [...]}."""
        prompt = unwrap_prompt(prompt, where)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.config.model!r} has no tokenizer; pass prompts as token-id lists")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        vocab_size = self.config.hf_config.vocab_size
        if not token_ids:
            raise ValueError(f"{where} is empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in token_ids):
            raise ValueError(f"{where} token ids must be integers in [0, {vocab_size})")
        return token_ids

    def check_fits(self, num_prompt_tokens: int, sp: SamplingParams, where: str = "prompt") -> None:
        """ValueError unless the request fits max_model_len and, alone, the KV cache (else it would wait
        forever)."""
        total, max_len = num_prompt_tokens + sp.max_tokens, self.config.max_model_len
        if total > max_len:
            raise ValueError(f"{where} has {num_prompt_tokens} tokens and max_tokens={sp.max_tokens}: {total} > "
                             f"max_model_len={max_len}; shorten the prompt, lower max_tokens or raise "
                             "max_model_len")
        block_size = self.config.kvcache_block_size
        have = len(self.scheduler.block_manager.blocks)
        need = (total - 1 + block_size - 1) // block_size  # the last sampled token is never cached
        if need > have:
            raise ValueError(f"{where} needs {need} KV-cache blocks ({num_prompt_tokens} prompt tokens + "
                             f"max_tokens={sp.max_tokens}, {block_size} tokens per block) but the cache has only "
                             f"{have}; raise num_kvcache_blocks or gpu_memory_utilization, shorten the request, "
                             f"or set max_model_len <= {have * block_size} so longer requests are refused")

    def check_sampling_params(self, sp: SamplingParams, where: str = "sampling_params") -> None:
        if not isinstance(sp, SamplingParams):
            raise ValueError(f"{where} must be a SamplingParams, got {type(sp).__name__}")
        if sp.stop and self.tokenizer is None:
            raise ValueError(f"{where}.stop needs a tokenizer, and model {self.config.model!r} has none; "
                             "use stop_token_ids")
        vocab_size = self.config.hf_config.vocab_size
        if any(t >= vocab_size for t in sp.stop_token_ids):
            raise ValueError(f"{where}.stop_token_ids must be < vocab_size={vocab_size}, got {sp.stop_token_ids}")

    def step(self) -> tuple[list[tuple[int, list[int]]], int]:
        """One step: (finished (id, completion token ids), tokens computed: > 0 prefill, < 0 decode). When the
        step fails, its requests are aborted and RequestsFailedError names them."""
        finished, num_tokens = self._step()
        return [(seq.seq_id, seq.completion_token_ids) for seq in finished], num_tokens

    def _step(self) -> tuple[list[Sequence], int]:
        """One step; returns the sequences that finished and the token count (as step())."""
        self._check_usable()
        seqs, is_prefill = self.scheduler.schedule()
        try:
            if not seqs:  # check_fits should make this impossible; never spin forever
                raise RuntimeError("the scheduler found nothing to run although requests are queued")
            num_tokens = sum(seq.num_scheduled_tokens for seq in seqs) if is_prefill else -len(seqs)
            token_ids = self._call("run", seqs, is_prefill)
            return self.scheduler.postprocess(seqs, token_ids), num_tokens
        except BaseException as e:  # the step's KV writes and registered block hashes are not trusted
            self.scheduler.abort(seqs)
            if not isinstance(e, Exception):
                raise
            ids = [seq.seq_id for seq in seqs]
            raise RequestsFailedError(f"a step failed; requests {ids} were aborted: {describe(e)}", ids) from e

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    def generate(self, prompts: list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
        self._check_usable()
        for i, sp in enumerate(sampling_params):  # validate everything before queueing anything
            self.check_sampling_params(sp, f"sampling_params[{i}]")
        token_ids = [self.encode(p, f"prompt {i}") for i, p in enumerate(prompts)]
        for i, (ids, sp) in enumerate(zip(token_ids, sampling_params)):
            self.check_fits(len(ids), sp, f"prompt {i}")
        seqs = [self._add(ids, sp) for ids, sp in zip(token_ids, sampling_params)]
        try:
            outputs = self._run_to_completion(len(seqs), use_tqdm)
        except BaseException as e:  # report and remove this call's requests; the engine stays usable
            self.scheduler.abort(seqs)
            if not isinstance(e, Exception):
                raise
            ids = sorted({seq.seq_id for seq in seqs} | set(getattr(e, "request_ids", [])))
            cause = e.__cause__ if isinstance(e, RequestsFailedError) and e.__cause__ is not None else e
            raise RequestsFailedError(f"generate failed; requests {ids} were aborted: {describe(cause)}",
                                      ids) from cause
        return [self.make_output(outputs[seq.seq_id]) for seq in seqs]

    def _run_to_completion(self, num_prompts: int, use_tqdm: bool) -> dict[int, Sequence]:
        """Step until the scheduler is empty; the finished sequences by id."""
        outputs = {}
        prefill_tps = decode_tps = 0.0
        with tqdm(total=num_prompts, desc="Generating", dynamic_ncols=True, disable=not use_tqdm) as pbar:
            while not self.is_finished():
                t = perf_counter()
                finished, num_tokens = self._step()
                dt = perf_counter() - t
                if num_tokens > 0:
                    prefill_tps = num_tokens / dt
                else:
                    decode_tps = -num_tokens / dt
                pbar.set_postfix(Prefill=f"{prefill_tps:.0f}tok/s", Decode=f"{decode_tps:.0f}tok/s")
                for seq in finished:
                    outputs[seq.seq_id] = seq
                    pbar.update(1)
        return outputs

    def make_output(self, seq: Sequence) -> dict:
        """The completion: text (cut before a matched stop string), token_ids (every generated token, through
        the one that completed a stop string or EOS), finish_reason, and prompt tokens served from the prefix
        cache."""
        token_ids = seq.completion_token_ids
        text = seq.output_text
        if text is None:
            text = self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""
        return {"text": text, "token_ids": token_ids, "finish_reason": seq.finish_reason,
                "num_cached_tokens": seq.num_prefix_cached_tokens}


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def describe_exit(exitcode: int | None) -> str:
    """ "exit code 1", or "exit code -9, killed by SIGKILL" for a signal."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"exit code {exitcode}, killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"exit code {exitcode}"


def unwrap_prompt(prompt: Prompt, where: str = "prompt") -> str | list[int]:
    """Text or token ids from a plain or vLLM-style dict prompt; ValueError naming where and the type."""
    if isinstance(prompt, dict):
        keys = set(prompt)
        if keys == {"prompt"} and isinstance(prompt["prompt"], str):
            return prompt["prompt"]
        if keys == {"prompt_token_ids"} and isinstance(prompt["prompt_token_ids"], (list, tuple)):
            return prompt["prompt_token_ids"]
        raise ValueError(f"{where} is a dict with keys {sorted(map(str, keys))}; expected {{'prompt': str}} or "
                         "{'prompt_token_ids': list[int]}")
    if isinstance(prompt, (str, list, tuple)):
        return prompt
    raise ValueError(f"{where} has type {type(prompt).__name__}; expected str, list[int], {{'prompt': str}} or "
                     "{'prompt_token_ids': list[int]}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def set_worker_env(config: Config) -> None:
    """Environment that spawned workers inherit: NVLink multicast (NVLS) off for NCCL unless the user set it."""
    if config.device == "cuda" and config.tensor_parallel_size > 1:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


def load_tokenizer(path: str):
    # transformers 5 builds an empty tokenizer (eos 0) for a directory with no tokenizer files; that would
    # override the model config's eos, so only load when the checkpoint ships one.
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError, TypeError):
        return None
