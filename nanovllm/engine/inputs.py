"""Requests in: prompts normalised, tokenised and checked, sampling parameters checked, all on rank 0 before anything
is queued (a bad request raises ValueError naming it and leaves the engine as it was)."""
import numbers
import os
from collections.abc import Iterable
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nanovllm.config import Config
from nanovllm.sampling_params import SamplingParams

Prompt = str | list[int] | dict  # dict: vLLM-style {"prompt": str} or {"prompt_token_ids": [...]}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase | None:
    # transformers 5 builds an empty tokenizer for a directory with no tokenizer files: load only what ships.
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError, TypeError):
        return None


def is_token_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_prompt_list(prompts: Any) -> list:
    """A list of prompts from one prompt (str, token-id list, dict) or any iterable of prompts."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(is_token_id(t) for t in prompts):
        return [list(prompts)]  # one prompt of token ids
    if isinstance(prompts, Iterable):
        return list(prompts)
    raise ValueError(f"prompts has type {type(prompts).__name__}; expected a prompt (str, list[int], "
                     "{'prompt': str}, {'prompt_token_ids': list[int]}) or a list of prompts")


def unwrap_prompt(prompt: Prompt, where: str) -> str | list:
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


class InputProcessor:
    def __init__(self, config: Config, tokenizer: PreTrainedTokenizerBase | None, num_kvcache_blocks: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.num_kvcache_blocks = num_kvcache_blocks
        self.vocab_size = config.hf_config.vocab_size

    def process(self, prompt: Prompt, sp: SamplingParams, where: str = "prompt",
                where_sp: str = "sampling_params") -> list[int]:
        """The prompt's token ids after every check of the request."""
        self.check_sampling_params(sp, where_sp)
        token_ids = self.encode(prompt, where)
        self.check_fits(len(token_ids), sp, where)
        return token_ids

    def encode(self, prompt: Prompt, where: str = "prompt") -> list[int]:
        """Token ids of a prompt given as text, token ids, {"prompt": str} or {"prompt_token_ids": [...]}."""
        prompt = unwrap_prompt(prompt, where)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.config.model!r} has no tokenizer; pass prompts as token-id lists")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise ValueError(f"{where} is empty")
        if not all(is_token_id(t) and 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"{where} token ids must be integers in [0, {self.vocab_size})")
        return [int(t) for t in token_ids]

    def check_fits(self, num_prompt_tokens: int, sp: SamplingParams, where: str = "prompt") -> None:
        """ValueError unless the request fits max_model_len and, alone, the KV cache (else it would wait forever)."""
        total, max_len = num_prompt_tokens + sp.max_tokens, self.config.max_model_len
        if total > max_len:
            raise ValueError(f"{where} has {num_prompt_tokens} tokens and max_tokens={sp.max_tokens}: {total} > "
                             f"max_model_len={max_len}; shorten the prompt, lower max_tokens or raise max_model_len")
        block_size, have = self.config.kvcache_block_size, self.num_kvcache_blocks
        need = -(-(total - 1) // block_size)  # the last sampled token is never cached
        if need > have:
            raise ValueError(f"{where} needs {need} KV-cache blocks ({num_prompt_tokens} prompt tokens + "
                             f"max_tokens={sp.max_tokens}, {block_size} tokens per block) but the cache has only "
                             f"{have}; raise num_kvcache_blocks or gpu_memory_utilization, shorten the request, or "
                             f"set max_model_len <= {have * block_size} so longer requests are refused")

    def check_sampling_params(self, sp: SamplingParams, where: str = "sampling_params") -> None:
        if not isinstance(sp, SamplingParams):
            raise ValueError(f"{where} must be a SamplingParams, got {type(sp).__name__}")
        if sp.stop and self.tokenizer is None:
            raise ValueError(f"{where}.stop needs a tokenizer, and model {self.config.model!r} has none; "
                             "use stop_token_ids")
        if any(t >= self.vocab_size for t in sp.stop_token_ids):
            raise ValueError(f"{where}.stop_token_ids must be < vocab_size={self.vocab_size}, got "
                             f"{sp.stop_token_ids}")
