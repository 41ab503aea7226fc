"""The request API: add requests, step the engine, generate. Everything else has one owner: Config (settings),
InputProcessor (requests in), Scheduler (batches and KV blocks), ModelRunner (the model on every rank),
OutputProcessor (stopping and outputs).

A step (overlap scheduling, `async_scheduling=True`): schedule and launch step N+1, then read back and process step
N's sampled tokens while the device runs N+1. Step N+1 reads N's samples on the device, and the scheduler counts
them as pending tokens, so nothing waits for the host. A sequence that finishes at N may already be in N+1: that
extra token is discarded. With `async_scheduling=False` each step is processed before the next is scheduled."""
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.errors import EngineDeadError, RequestsFailedError
from nanovllm.engine.inputs import InputProcessor, Prompt, as_prompt_list, load_tokenizer
from nanovllm.engine.output_processor import OutputProcessor, RequestOutput, eos_token_ids
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_builder import build_step_input
from nanovllm.layers.sampling_rng import seed_to_int64
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.scheduler import ScheduledBatch, Scheduler
from nanovllm.worker.model_runner import ModelRunner, SampledIds

RECREATE = "; the engine cannot run again: call exit() and create a new LLM"


@dataclass
class LaunchedStep:
    batch: ScheduledBatch
    sampled: SampledIds


@dataclass
class StepResult:
    finished: list[Sequence]
    progressed: list[Sequence]  # every sequence that got a token (finished ones included)
    num_tokens: int  # tokens the step computed: > 0 prefill, < 0 decode, 0 idle


IDLE = StepResult([], [], 0)


class LLMEngine:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.config = config = Config.from_kwargs(model, **kwargs)
        self.model_runner = ModelRunner(config)
        # Frees workers, weights and cache when the engine is dropped without exit() (or at interpreter exit); it
        # holds the runner, never the engine, so dropping the last reference to the engine triggers it.
        self._finalizer = weakref.finalize(self, self.model_runner.exit)
        tokenizer = load_tokenizer(config.model)
        self.tokenizer = tokenizer
        self.inputs = InputProcessor(config, tokenizer, self.model_runner.num_kvcache_blocks)
        self.outputs = OutputProcessor(tokenizer, eos_token_ids(config.model, config.hf_config, tokenizer))
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens,
                                   self.model_runner.num_kvcache_blocks, config.kvcache_block_size)
        self.requests: dict[int, list[Sequence]] = {}  # unfinished requests by id: their n sequences
        self.in_flight: LaunchedStep | None = None
        self._lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def exit(self) -> None:
        """Stop the workers, free the model, KV cache and CUDA graphs, unlink the shared memory and destroy the
        process group. Idempotent; also runs when the engine is garbage-collected and at interpreter exit."""
        self._finalizer()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.exit()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One call at a time: the engine's state is not shared between threads."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this LLM is being used by another thread; an engine runs one call at a time: use one "
                               "LLM per thread, or AsyncLLM to serve many callers")
        try:
            if not self._finalizer.alive:
                raise RuntimeError("this engine has exited; create a new LLM")
            workers = self.model_runner.workers
            if workers is not None and workers.failure is None:
                workers.failure = workers.check()
            if workers is not None and workers.failure is not None:
                raise EngineDeadError(workers.failure + RECREATE)
            yield
        finally:
            self._lock.release()

    # -- requests ---------------------------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, sampling_params: SamplingParams, stream: bool = False) -> int:
        """Validate and queue one request (nothing is queued when it is invalid); returns its id. stream=True: its
        text is detokenised as it grows, for step_stream()."""
        with self._exclusive():
            return self._add(self.inputs.process(prompt, sampling_params), sampling_params, stream)[0].request_id

    def _add(self, token_ids: list[int], sp: SamplingParams, stream: bool = False) -> list[Sequence]:
        """Queue the request's n sequences (seeded: sample i with seed + i; else each draws its own seed)."""
        seqs = []
        for index in range(sp.n):
            seed = seed_to_int64(sp.seed + index) if sp.seed is not None else int(torch.randint(-2**62, 2**62, ()))
            seq = Sequence(token_ids, sp, self.config.kvcache_block_size, sampling_seed=seed)
            seq.request_id, seq.index = (seqs[0].seq_id if seqs else seq.seq_id), index
            self.outputs.add(seq, stream)
            self.scheduler.add(seq)
            seqs.append(seq)
        self.requests[seqs[0].request_id] = seqs
        return seqs

    def abort_request(self, request_id: int) -> bool:
        """Cancel an unfinished request and free its blocks; False when there is none with that id."""
        with self._exclusive():
            seqs = self.requests.pop(request_id, None)
            for seq in seqs or []:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")
                self.outputs.remove(seq)
            return seqs is not None

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and self.in_flight is None

    # -- steps ------------------------------------------------------------------------------------------------------
    def step(self) -> tuple[list[tuple[int, list[int]]], int]:
        """One step: (finished (id, completion token ids), tokens the processed step computed: > 0 prefill, < 0
        decode); ([], 0) when idle. When the step fails, its requests are aborted and RequestsFailedError names
        them."""
        with self._exclusive():
            result = self._step()
            for seq in result.finished:
                self.outputs.remove(seq)
        return [(seq.request_id, seq.completion_token_ids) for seq in result.finished], result.num_tokens

    def step_stream(self) -> list[RequestOutput]:
        """One step; for every sequence that got tokens, what it produced since its last output (text only for
        requests added with stream=True); a finished one's output has finished=True and its finish_reason."""
        with self._exclusive():
            result = self._step()
            outputs = [self.outputs.delta(seq) for seq in result.progressed]
            for seq in result.finished:
                self.outputs.remove(seq)
        return outputs

    def _step(self) -> StepResult:
        """Launch the next step, then process the one before it (or this one, without overlap)."""
        batch = launched = None
        previous, self.in_flight = self.in_flight, None
        try:
            batch = self.scheduler.schedule()
            if batch is not None:
                launched = self._launch(batch)
            if not self.config.async_scheduling and launched is not None:
                previous, launched = launched, None
            self.in_flight = launched
            return self._process(previous) if previous is not None else IDLE
        except BaseException as e:
            self.in_flight = None
            seqs = [s for b in (batch, previous and previous.batch) if b is not None for s in b.seqs]
            self._fail(e, seqs)

    def _launch(self, batch: ScheduledBatch) -> LaunchedStep:
        step = build_step_input(batch.seqs, batch.is_prefill, self.config.kvcache_block_size,
                                self.outputs.banned_tokens)
        self.scheduler.launched(batch)
        return LaunchedStep(batch, self.model_runner.run(step))

    def _process(self, launched: LaunchedStep) -> StepResult:
        """Read back a step's samples: resolve pending tokens, check stops, finish sequences."""
        batch, finished, progressed = launched.batch, [], []
        token_ids = launched.sampled.tolist()
        logprobs = launched.sampled.logprob_entries()
        for row, (seq, index) in enumerate(zip(batch.seqs, batch.sampled_index, strict=True)):
            if index < 0 or seq.is_finished:  # no sample this step, or finished meanwhile: discard
                continue
            seq.resolve(index, token_ids[row])
            self.scheduler.resolved(seq)
            progressed.append(seq)
            reason = self.outputs.add_token(seq, logprobs.get(row))
            if reason is not None:
                self.scheduler.finish(seq, reason)
                finished.append(seq)
                request = self.requests.get(seq.request_id, [])
                if all(s.is_finished for s in request):
                    self.requests.pop(seq.request_id, None)
        return StepResult(finished, progressed, batch.num_tokens if batch.is_prefill else -batch.num_tokens)

    def _fail(self, error: BaseException, seqs: list[Sequence]) -> None:
        """Abort the failed step's requests; a failure that leaves the ranks out of step kills the engine."""
        self._drop(seqs)
        workers = self.model_runner.workers
        cause = error
        if workers is not None and (failure := workers.mark_failed(error)) is not None and isinstance(error, Exception):
            cause = EngineDeadError(failure + RECREATE)
            cause.__cause__ = error
        if not isinstance(error, Exception):
            raise error
        ids = sorted({seq.request_id for seq in seqs})
        raise RequestsFailedError(f"a step failed; requests {ids} were aborted: {describe(cause)}", ids) from cause

    def _drop(self, seqs: list[Sequence]) -> None:
        """Abort seqs (their KV contents are not trusted) and the rest of their requests."""
        requests = [self.requests.pop(rid, []) for rid in {seq.request_id for seq in seqs}]
        seqs = list({id(s): s for s in seqs + [s for r in requests for s in r]}.values())
        self.scheduler.abort(seqs)
        for seq in seqs:
            self.outputs.remove(seq)

    # -- offline generation -----------------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None
                 = None, use_tqdm: bool = True) -> list[dict]:
        """One output dict per prompt, in order: {"text", "token_ids", "finish_reason", "num_cached_tokens"}, plus
        "logprobs" when asked, and with n > 1 "outputs": every sample's dict (the top-level keys are sample 0's). A
        single prompt (str, token-id list or dict) is one request."""
        prompts = as_prompt_list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, list):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        with self._exclusive():
            if not self.is_finished():
                raise RuntimeError(f"generate() cannot run while {len(self.requests)} request(s) added with "
                                   "add_request() are unfinished: call step() until is_finished(), or abort_request() "
                                   "them")
            for i, sp in enumerate(params):  # validate everything before queueing anything
                self.inputs.check_sampling_params(sp, f"sampling_params[{i}]")
            token_ids = [self.inputs.encode(p, f"prompt {i}") for i, p in enumerate(prompts)]
            for i, (ids, sp) in enumerate(zip(token_ids, params, strict=True)):
                self.inputs.check_fits(len(ids), sp, f"prompt {i}")
            requests = [self._add(ids, sp) for ids, sp in zip(token_ids, params, strict=True)]
            try:
                outputs = self._run_to_completion(sum(len(r) for r in requests), use_tqdm)
            except BaseException as e:  # report and remove this call's requests; the engine stays usable
                self.in_flight = None
                self._drop([seq for r in requests for seq in r])
                if not isinstance(e, Exception):
                    raise
                ids = sorted({r[0].request_id for r in requests} | set(getattr(e, "request_ids", [])))
                cause = e.__cause__ if isinstance(e, RequestsFailedError) and e.__cause__ is not None else e
                raise RequestsFailedError(f"generate failed; requests {ids} were aborted: {describe(cause)}",
                                          ids) from cause
        return [request_output([outputs[seq.seq_id] for seq in r]) for r in requests]

    def _run_to_completion(self, num_seqs: int, use_tqdm: bool) -> dict[int, dict]:
        """Step until nothing is left; the finished sequences' outputs by sequence id."""
        outputs = {}
        prefill_tps = decode_tps = 0.0
        with tqdm(total=num_seqs, desc="Generating", dynamic_ncols=True, disable=not use_tqdm) as pbar:
            while not self.is_finished():
                t = perf_counter()
                result = self._step()
                finished, num_tokens = result.finished, result.num_tokens
                dt = perf_counter() - t
                if num_tokens > 0:
                    prefill_tps = num_tokens / dt
                elif num_tokens < 0:
                    decode_tps = -num_tokens / dt
                if use_tqdm:
                    pbar.set_postfix(Prefill=f"{prefill_tps:.0f}tok/s", Decode=f"{decode_tps:.0f}tok/s")
                for seq in finished:
                    outputs[seq.seq_id] = self.outputs.make_output(seq)
                    pbar.update(1)
        return outputs


def request_output(samples: list[dict]) -> dict:
    """One request's output dict: sample 0's, plus every sample's under "outputs" when there are several."""
    return samples[0] if len(samples) == 1 else {**samples[0], "outputs": samples}


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
