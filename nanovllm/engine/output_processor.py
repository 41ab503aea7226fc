"""When a request stops and what it returns: EOS and stop ids (with min_tokens bans), stop strings, the length
limit, detokenisation, logprobs, the streamed deltas and the final output dict. The scheduler only hears "finish
this sequence"."""
import os
from dataclasses import dataclass

from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from nanovllm.engine.detokenizer import IncrementalDetokenizer, byte_level_table
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


def eos_token_ids(model_dir: str, hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None
                  ) -> frozenset[int]:
    """Every EOS id the checkpoint names: config.json, generation_config.json (chat checkpoints list several, e.g.
    Qwen3's [151645, 151643]) and the tokenizer's."""
    found = [getattr(hf_config, "eos_token_id", None)]
    if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        found.append(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    if tokenizer is not None:
        found.append(tokenizer.eos_token_id)
    ids = set()
    for value in found:
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return frozenset(int(i) for i in ids)


def stop_holdback(sp: SamplingParams) -> int:
    """Characters a stream holds back until more text arrives: a stop string may end up starting in them."""
    return max((len(stop) for stop in sp.stop), default=1) - 1


@dataclass
class RequestOutput:
    """What one sample of a request produced since its last output (streaming), or, with finished, its end. The
    sample's last one has finished=True and finish_reason "stop", "length" or "abort"."""
    request_id: int | str           # the engine's id (AsyncLLM: the caller's str id)
    index: int                      # which of the request's n samples
    token_ids: list[int]            # new token ids
    text: str                       # new text
    logprobs: list[dict[int, float]] | None  # per new token {token id: logprob}, when the request asked
    finished: bool
    finish_reason: str | None       # "stop", "length" or "abort" once finished
    num_prompt_tokens: int
    num_cached_tokens: int          # prompt tokens served from the prefix cache


@dataclass
class SeqOutputState:
    detok: IncrementalDetokenizer | None = None  # streaming requests and stop strings
    logprobs: list[dict[int, float]] | None = None
    sent_tokens: int = 0  # completion tokens already streamed
    sent_text: int = 0    # characters of text already streamed


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.states: dict[int, SeqOutputState] = {}
        self.tables: dict[bool, list[bytes] | None] = {}  # skip_special_tokens -> byte-level table, built once

    def add(self, seq: Sequence, stream: bool = False) -> None:
        sp = seq.sampling_params
        state = SeqOutputState(logprobs=[] if sp.logprobs is not None else None)
        if (sp.stop or stream) and self.tokenizer is not None:
            skip = sp.skip_special_tokens
            if skip not in self.tables:
                self.tables[skip] = byte_level_table(self.tokenizer, skip)
            state.detok = IncrementalDetokenizer(self.tokenizer, sp.stop, skip, self.tables[skip])
        self.states[seq.seq_id] = state

    def remove(self, seq: Sequence) -> None:
        self.states.pop(seq.seq_id, None)

    def stop_token_ids(self, seq: Sequence) -> list[int]:
        sp = seq.sampling_params
        eos = [] if sp.ignore_eos else sorted(self.eos_token_ids)
        return sp.stop_token_ids + eos

    def banned_tokens(self, seq: Sequence, completion_index: int) -> list[int]:
        """Token ids seq may not sample as its completion_index-th token: EOS (unless ignore_eos) and stop ids
        before min_tokens."""
        return self.stop_token_ids(seq) if completion_index < seq.sampling_params.min_tokens else []

    def add_token(self, seq: Sequence, logprobs: dict[int, float] | None) -> str | None:
        """seq's newest known token arrived (with its logprobs, when asked): why seq stops now, or None. "stop" for
        EOS (unless ignore_eos), a stop id or a stop string once min_tokens are generated (a stop wins over the length
        limit in the same step); "length" at max_tokens."""
        sp = seq.sampling_params
        state = self.states[seq.seq_id]
        if state.logprobs is not None:
            state.logprobs.append(logprobs or {})
        known = seq.num_known_tokens
        n = known - seq.num_prompt_tokens  # completion tokens so far
        allowed = n >= sp.min_tokens
        token_id = seq.token_ids[known - 1]
        if allowed and (token_id in sp.stop_token_ids or (not sp.ignore_eos and token_id in self.eos_token_ids)):
            return "stop"  # the stop token's text is never emitted
        if state.detok is not None:  # reads the completion in place: no copy per token
            state.detok.update(seq.token_ids, allowed and bool(sp.stop), seq.num_prompt_tokens, known)
            if state.detok.stop_at is not None:
                return "stop"
        return "length" if n >= sp.max_tokens else None

    def delta(self, seq: Sequence) -> RequestOutput:
        """The tokens, text and logprobs seq produced since its last delta (all that remains once finished)."""
        state = self.states[seq.seq_id]
        completion = seq.completion_token_ids
        new_tokens = completion[state.sent_tokens:]
        logprobs = None if state.logprobs is None else state.logprobs[state.sent_tokens:len(completion)]
        state.sent_tokens = len(completion)
        text = ""
        if state.detok is not None:
            if seq.is_finished:
                full = self.final_text(seq)
            else:  # hold back what may be the start of a stop string: a stop string's text is never streamed
                full = state.detok.text
                full = full[:max(len(full) - stop_holdback(seq.sampling_params), state.sent_text)]
            text, state.sent_text = full[state.sent_text:], len(full)
        return RequestOutput(seq.request_id, seq.index, new_tokens, text, logprobs, seq.is_finished,
                             seq.finish_reason, seq.num_prompt_tokens, seq.num_cached_prompt_tokens)

    def final_text(self, seq: Sequence) -> str:
        """The completion's text: up to a matched stop string, without the text of a stop token that ended it."""
        state = self.states[seq.seq_id]
        if state.detok is not None and state.detok.stop_at is not None:
            return state.detok.text
        if self.tokenizer is None:
            return ""
        token_ids = seq.completion_token_ids
        stopped_by_token = seq.finish_reason == "stop" and token_ids and token_ids[-1] in self.stop_token_ids(seq)
        shown = token_ids[:-1] if stopped_by_token else token_ids
        return self.tokenizer.decode(shown, skip_special_tokens=seq.sampling_params.skip_special_tokens)

    def make_output(self, seq: Sequence) -> dict:
        """The finished completion: text, token_ids (every generated token, through the one that completed a stop
        string or the stop token), finish_reason, prompt tokens served from the prefix cache, and logprobs (per token
        {token id: logprob}) when asked. Forgets seq's state."""
        out = {"text": self.final_text(seq), "token_ids": seq.completion_token_ids,
               "finish_reason": seq.finish_reason, "num_cached_tokens": seq.num_cached_prompt_tokens}
        state = self.states.pop(seq.seq_id)
        if state.logprobs is not None:
            out["logprobs"] = state.logprobs
        return out
