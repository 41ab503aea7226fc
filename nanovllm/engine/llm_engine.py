import atexit
import multiprocessing as mp
import os
from time import perf_counter
from typing import Any

import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner, free_port
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.shm_channel import unique_shm_name
from nanovllm.engine.stop_checker import StopStringChecker
from nanovllm.sampling_params import SamplingParams

WORKER_JOIN_TIMEOUT_S = 60
Prompt = str | list[int] | dict  # dict: vLLM-style {"prompt": str} or {"prompt_token_ids": [...]}


class LLMEngine:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.config = config = Config.from_kwargs(model, **kwargs)
        self.ps, self.events = [], []
        port, shm_name = free_port(), unique_shm_name()
        set_worker_env(config)
        ctx = mp.get_context("spawn")
        for rank in range(1, config.tensor_parallel_size):
            event = ctx.Event()
            process = ctx.Process(target=ModelRunner, args=(config, rank, port, shm_name, event), daemon=True)
            process.start()
            self.ps.append(process)
            self.events.append(event)
        try:
            self.model_runner = ModelRunner(config, 0, port, shm_name, self.events)
        except BaseException:  # workers would block forever waiting for rank 0
            self._kill_workers()
            if dist.is_initialized():  # let a later engine in this process initialise again
                dist.destroy_process_group()
            raise
        self.tokenizer = load_tokenizer(config.model)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            config.eos = self.tokenizer.eos_token_id
        stop_checker = StopStringChecker(self.tokenizer) if self.tokenizer is not None else None
        self.scheduler = Scheduler(config, self.model_runner.num_kvcache_blocks, stop_checker)
        self._exited = False
        atexit.register(self.exit)

    def exit(self) -> None:
        if self._exited:
            return
        self._exited = True
        atexit.unregister(self.exit)
        if all(p.is_alive() for p in self.ps):
            self.model_runner.call("exit")
        else:  # a dead worker never reaches the exit barrier: stop the rest and clean up locally
            self._kill_workers()
            self.model_runner.exit(collective=False)
        del self.model_runner
        for p in self.ps:
            p.join(WORKER_JOIN_TIMEOUT_S)
        self._kill_workers()

    def _kill_workers(self) -> None:
        for p in self.ps:
            if p.is_alive():
                p.terminate()
                p.join()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.exit()

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams) -> int:
        self.check_sampling_params(sampling_params)
        return self._add(self.encode(prompt), sampling_params).seq_id

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
        finished, num_tokens = self._step()
        return [(seq.seq_id, seq.completion_token_ids) for seq in finished], num_tokens

    def _step(self) -> tuple[list[Sequence], int]:
        """One step; returns the sequences that finished and the token count (as step())."""
        if self._exited:
            raise RuntimeError("this engine has exited; create a new LLM")
        seqs, is_prefill = self.scheduler.schedule()
        num_tokens = sum(seq.num_scheduled_tokens for seq in seqs) if is_prefill else -len(seqs)
        token_ids = self.model_runner.call("run", seqs, is_prefill)
        return self.scheduler.postprocess(seqs, token_ids), num_tokens

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
        for i, sp in enumerate(sampling_params):  # validate everything before queueing anything
            self.check_sampling_params(sp, f"sampling_params[{i}]")
        token_ids = [self.encode(p, f"prompt {i}") for i, p in enumerate(prompts)]
        seq_ids = [self._add(ids, sp).seq_id for ids, sp in zip(token_ids, sampling_params)]
        outputs = {}
        pbar = tqdm(total=len(prompts), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
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
        pbar.close()
        return [self.make_output(outputs[i]) for i in seq_ids]

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
