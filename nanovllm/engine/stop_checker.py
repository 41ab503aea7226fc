"""Stop strings, checked on rank 0 against the completion's text, detokenised incrementally: each step
decodes only the tokens since the last emitted text (plus any still-incomplete characters), and searches only
the new text plus the previous len(stop) - 1 characters, so a stop string spanning tokens is found in O(1)
work per step."""
from dataclasses import dataclass, field

from nanovllm.engine.sequence import Sequence


@dataclass
class DetokState:
    prefix_offset: int         # start of the tokens decoded for context
    read_offset: int           # first token whose text is not yet emitted
    pieces: list[str] = field(default_factory=list)  # emitted completion text, in pieces
    length: int = 0            # total length of the pieces
    tail: str = ""             # the last (longest stop - 1) emitted characters


class StopStringChecker:
    """Callable for the scheduler: True when seq's newest token completed one of its stop strings; it then
    sets seq.output_text to the completion text before the stop string."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, seq: Sequence) -> bool:
        sp = seq.sampling_params
        if seq.stop_state is None:
            seq.stop_state = DetokState(seq.num_prompt_tokens, seq.num_prompt_tokens)
        state = seq.stop_state
        delta = self.new_text(seq.token_ids, state)
        if not delta:
            return False
        window, window_start = state.tail + delta, state.length - len(state.tail)
        state.pieces.append(delta)
        state.length += len(delta)
        keep = max(len(s) for s in sp.stop) - 1
        state.tail = window[-keep:] if keep else ""
        if seq.num_completion_tokens < sp.min_tokens:
            return False
        # only occurrences that end in the new text: earlier ones were checked (or fell before min_tokens)
        starts = (window.find(s, max(len(window) - len(delta) - len(s) + 1, 0)) for s in sp.stop)
        hits = [i for i in starts if i >= 0]
        if not hits:
            return False
        seq.output_text = "".join(state.pieces)[:window_start + min(hits)]
        return True

    def new_text(self, token_ids: list[int], state: DetokState) -> str:
        """Text the tokens since read_offset add, decoded after a few context tokens; empty while the newest
        token ends mid-character (a byte-level BPE token may hold part of a UTF-8 sequence)."""
        decode = self.tokenizer.decode
        prefix = decode(token_ids[state.prefix_offset:state.read_offset])
        full = decode(token_ids[state.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        state.prefix_offset, state.read_offset = state.read_offset, len(token_ids)
        return full[len(prefix):]
