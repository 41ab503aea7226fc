"""OpenAI-compatible request bodies, checked by pydantic, and the response and stream-chunk bodies.

Requests: unknown fields are refused (an unsupported option is a 400 naming it, never silently ignored). vLLM's
extra sampling parameters (top_k, min_p, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens and, for
completions, return_token_ids) go in the body beside the OpenAI ones (the openai client's `extra_body`).
Responses are plain dicts: a stream builds one per delta, so no model objects on that path."""
import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from nanovllm.sampling_params import SamplingParams

MIN_LOGPROB = -9999.0  # -inf (a banned token) is not JSON: reported as this, as vLLM does
TokenText = Callable[[int], str]
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Body):
    include_usage: bool = False


class SamplingRequest(Body):
    """What both endpoints take: the model, n, sampling and streaming settings."""
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling parameters
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: bool = True

    def check_supported(self) -> None:
        """ValueError for options this server takes only at their neutral value."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise ValueError(f"{name}={getattr(self, name)} is not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """SamplingParams for this body (ValueError naming a bad field)."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p, max_tokens=max_tokens, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens, n=self.n, logprobs=logprobs)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = 16  # None: up to max_model_len
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    return_token_ids: bool = False  # vLLM's: each choice (and chunk) carries its new token ids

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} is not supported (only best_of == n)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs needs prompt logprobs, which are not supported")

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string or token-id list, or a list of them."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ValueError("prompt is an empty list")
        return [prompt] if isinstance(prompt[0], int) else list(prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name": handed to the chat template as is
    role: str
    content: str | list[dict[str, Any]] | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template reads it: content as one string (text parts joined by newlines)."""
        content = self.content
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise ValueError("message content parts must be {'type': 'text', 'text': str}; only text is "
                                 "supported")
            content = "\n".join(part["text"] for part in content)
        return {**self.model_dump(exclude={"content"}), "content": content or ""}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # None (and no max_tokens): up to max_model_len
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def max_tokens_asked(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        """The engine's logprobs setting: None, or how many top tokens besides the sampled one."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None


# -- responses ----------------------------------------------------------------------------------------------------
def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else dumps(data)}\n\n"


class ChunkFormat:
    """A stream's chunk events as text: the header (id, object, created, model) serialised once, the choice
    formatted by hand. This is a stream's hot path (one chunk per sample per step), where json.dumps of the whole
    chunk costs several times more."""

    def __init__(self, header: dict, include_usage: bool) -> None:
        self.prefix = f'data: {dumps(header)[:-1]},"choices":['
        self.suffix = '],"usage":null}\n\n' if include_usage else "]}\n\n"

    def __call__(self, choice: str) -> str:
        return self.prefix + choice + self.suffix


def json_or_null(value: Any) -> str:
    return "null" if value is None else dumps(value)


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None,
                      token_ids: list[int] | None = None) -> str:
    """A completions stream choice as JSON (token_ids: vLLM's return_token_ids)."""
    extra = "" if token_ids is None else f',"token_ids":[{",".join(map(str, token_ids))}]'
    return (f'{{"index":{index},"text":{json.dumps(text)},"logprobs":{json_or_null(logprobs)},'
            f'"finish_reason":{json_or_null(finish_reason)}{extra}}}')


def chat_choice(index: int, text: str | None, finish_reason: str | None, logprobs: dict | None = None,
                role: str | None = None) -> str:
    """A chat stream choice as JSON; its delta has the role (first chunk) and the new text (none: empty delta)."""
    delta = ([f'"role":{json.dumps(role)}'] if role else []) + ([f'"content":{json.dumps(text)}'] if text is not None
                                                              else [])
    return (f'{{"index":{index},"delta":{{{",".join(delta)}}},"logprobs":{json_or_null(logprobs)},'
            f'"finish_reason":{json_or_null(finish_reason)}}}')


def error_body(message: str, code: int) -> dict:
    """OpenAI's error body (as vLLM fills it: the type names the HTTP error, code is the status)."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(code, "APIError"), "param": None, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], token_text: TokenText,
                        offset: int) -> tuple[dict, int]:
    """The legacy completions logprobs object for these tokens (top_logprobs: the top k and the sampled token), and
    the text offset after them."""
    tokens = [token_text(t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    body = {"tokens": tokens,
            "token_logprobs": [clamp(entry[t]) for t, entry in zip(token_ids, logprobs, strict=True)],
            "top_logprobs": [{token_text(t): clamp(lp) for t, lp in entry.items()} for entry in logprobs],
            "text_offset": offsets}
    return body, offset


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], top: int, token_text: TokenText,
                  token_bytes: Callable[[int], list[int]]) -> dict:
    """The chat logprobs object: per token its text, UTF-8 bytes and logprob, and the `top` most likely tokens,
    most likely first."""
    def entry_of(token_id: int, logprob: float) -> dict:
        return {"token": token_text(token_id), "logprob": clamp(logprob), "bytes": token_bytes(token_id)}

    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        best = sorted(entry.items(), key=lambda item: (-item[1], item[0]))[:top]
        content.append({**entry_of(token_id, entry[token_id]), "top_logprobs": [entry_of(t, lp) for t, lp in best]})
    return {"content": content}
