from copy import copy
from enum import Enum, auto
from itertools import count

from nanovllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens, where it stands in the KV cache, and what to compute next.

    num_cached_tokens: leading tokens whose K/V are in the cache (prefix hits plus earlier steps).
    num_scheduled_tokens: tokens computed by the current step, starting at num_cached_tokens.
    """
    counter = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams = SamplingParams(),
                 block_size: int = 256) -> None:
        self.seq_id = next(Sequence.counter)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.token_offset = 0  # index of token_ids[0] in the sequence (non-zero in a worker's copy)
        self.last_token = self.token_ids[-1]
        self.num_tokens = len(self.token_ids)
        self.num_prompt_tokens = self.num_tokens
        self.num_cached_tokens = 0
        self.num_prefix_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.num_scheduled_tokens = 0
        self.block_size = block_size
        self.block_table: list[int] = []
        self.sampling_params = sampling_params
        self.temperature = sampling_params.temperature
        self.max_tokens = sampling_params.max_tokens
        self.ignore_eos = sampling_params.ignore_eos
        self.finish_reason: str | None = None  # "stop" or "length" once finished (rank 0)
        self.output_text: str | None = None    # completion text cut before a matched stop string (rank 0)
        self.stop_state = None                 # incremental detokenisation for stop strings (rank 0)

    def __len__(self) -> int:
        return self.num_tokens

    def __getitem__(self, key):
        return self.token_ids[key]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_blocks(self) -> int:
        return (self.num_tokens + self.block_size - 1) // self.block_size

    @property
    def last_block_num_tokens(self) -> int:
        return self.num_tokens - (self.num_blocks - 1) * self.block_size

    @property
    def is_prefill(self) -> bool:
        """True while the step computes more than the last token (prompt, or recompute after preemption)."""
        return self.num_cached_tokens < self.num_tokens - 1 or self.num_scheduled_tokens > 1

    @property
    def samples_this_step(self) -> bool:
        """True when this step reaches the end of the sequence, so its last position yields a new token."""
        return self.num_cached_tokens + self.num_scheduled_tokens == self.num_tokens

    def block(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def scheduled_token_ids(self) -> list[int]:
        start = self.num_cached_tokens - self.token_offset
        return self.token_ids[start:start + self.num_scheduled_tokens]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.last_token = token_id
        self.num_tokens += 1

    def __getstate__(self):
        # Workers need only the tokens this step computes: the whole prompt for a prefill, the last
        # token for a decode — judged from the cache state, so a preempted sequence is re-sent whole.
        state = copy(self.__dict__)
        start = self.num_cached_tokens
        state["token_ids"] = self.token_ids[start:start + self.num_scheduled_tokens]
        state["token_offset"] = start
        del state["sampling_params"]
        state.pop("stop_state", None)  # rank 0 bookkeeping, not needed by workers
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
