"""When a request stops and what it returns: EOS and stop ids (with min_tokens bans), stop strings, the length
limit, detokenisation and the output dict. The scheduler only hears "finish this sequence"."""
import os

from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.sequence import Sequence


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


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}  # seq_id -> state, for stop strings

    def add(self, seq: Sequence) -> None:
        sp = seq.sampling_params
        if sp.stop and self.tokenizer is not None:
            self.detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, sp.stop, sp.skip_special_tokens)

    def remove(self, seq: Sequence) -> None:
        self.detokenizers.pop(seq.seq_id, None)

    def stop_token_ids(self, seq: Sequence) -> list[int]:
        sp = seq.sampling_params
        eos = [] if sp.ignore_eos else sorted(self.eos_token_ids)
        return sp.stop_token_ids + eos

    def banned_tokens(self, seq: Sequence, completion_index: int) -> list[int]:
        """Token ids seq may not sample as its completion_index-th token: EOS (unless ignore_eos) and stop ids
        before min_tokens."""
        return self.stop_token_ids(seq) if completion_index < seq.sampling_params.min_tokens else []

    def finish_reason(self, seq: Sequence) -> str | None:
        """Why seq stops after its newest known token, or None: "stop" for EOS (unless ignore_eos), a stop id or a
        stop string once min_tokens are generated (a stop wins over the length limit in the same step); "length" at
        max_tokens. Keeps the stop-string search current."""
        sp = seq.sampling_params
        completion = seq.completion_token_ids
        n = len(completion)
        allowed = n >= sp.min_tokens
        token_id = completion[-1]
        if allowed and (token_id in sp.stop_token_ids or (not sp.ignore_eos and token_id in self.eos_token_ids)):
            return "stop"
        detok = self.detokenizers.get(seq.seq_id)
        if detok is not None:
            detok.update(completion, search_stop=allowed)
            if detok.stop_at is not None:
                return "stop"
        return "length" if n >= sp.max_tokens else None

    def make_output(self, seq: Sequence) -> dict:
        """The completion: text (without a stop string or the stop token's text), token_ids (every generated token,
        through the one that completed a stop string or the stop token), finish_reason, and prompt tokens served
        from the prefix cache."""
        token_ids = seq.completion_token_ids
        detok = self.detokenizers.pop(seq.seq_id, None)
        if detok is not None and detok.stop_at is not None:
            text = detok.text
        elif self.tokenizer is None:
            text = ""
        else:
            stopped_by_token = seq.finish_reason == "stop" and token_ids and \
                token_ids[-1] in self.stop_token_ids(seq)
            shown = token_ids[:-1] if stopped_by_token else token_ids
            text = self.tokenizer.decode(shown, skip_special_tokens=seq.sampling_params.skip_special_tokens)
        return {"text": text, "token_ids": token_ids, "finish_reason": seq.finish_reason,
                "num_cached_tokens": seq.num_cached_prompt_tokens}
