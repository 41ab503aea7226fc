"""Many engine replicas over a Ray Dataset: one LLM per Ray actor, fed by `Dataset.map_batches`.

    import ray
    from nanovllm.integrations.ray import build_processor

    ray.init()                                  # a local Ray; on a cluster: ray.init(address="auto")
    ray.data.DataContext.get_current().execution_options.preserve_order = True   # output rows in input order
    ds = ray.data.read_json("prompts.jsonl")    # rows: {"prompt": "..."} or {"prompt_token_ids": [...]}
    process = build_processor("/models/Qwen3-0.6B", {"max_model_len": 4096}, concurrency=2,
                              sampling_params={"temperature": 0.6, "max_tokens": 256})
    process(ds).write_parquet("results/")

Each row keeps its columns and gains generated_text, generated_token_ids, finish_reason, num_prompt_tokens and
num_generated_tokens. A row's prompt is its `prompt_token_ids` when not null, else its `prompt` text. An optional
`sampling_params` column (a dict per row) overrides the processor's defaults key by key; null values keep the
default. Fault tolerance is Ray Data's own: it creates the actors with max_restarts=-1 and max_task_retries=-1, so an
actor that dies is restarted and its unfinished batches are retried; every row gets exactly one output.
"""
import math
from dataclasses import fields
from typing import Any, Callable

try:
    import pyarrow as pa
    import ray.data
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('nanovllm.integrations.ray needs Ray Data: pip install -e ".[ray]" '
                      '(or pip install "ray[data]")') from e

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config

PROMPT = "prompt"
PROMPT_TOKEN_IDS = "prompt_token_ids"
SAMPLING_PARAMS = "sampling_params"
OUTPUT_SCHEMA = pa.schema([
    ("generated_text", pa.string()),
    ("generated_token_ids", pa.list_(pa.int64())),
    ("finish_reason", pa.string()),
    ("num_prompt_tokens", pa.int64()),
    ("num_generated_tokens", pa.int64()),
])
SamplingParamsLike = SamplingParams | dict[str, Any] | None


# -- sampling parameters --------------------------------------------------------------------------------------
def is_null(value: Any) -> bool:
    """None, or the NaN that pandas puts in a missing object cell."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def sampling_param_names() -> list[str]:
    return [f.name for f in fields(SamplingParams) if f.init]


def make_sampling_params(defaults: dict[str, Any], overrides: Any, where: str) -> SamplingParams:
    """SamplingParams(**defaults) with overrides' non-null entries on top; ValueError naming where and the bad key
    or value."""
    if is_null(overrides):
        overrides = {}
    elif isinstance(overrides, list):  # an Arrow map column reads back as [(key, value), ...]
        overrides = dict(overrides)
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must be a dict of SamplingParams fields or null, got {type(overrides).__name__}")
    overrides = {k: v for k, v in overrides.items() if not is_null(v)}  # Arrow structs fill missing keys with null
    unknown = sorted(set(overrides) - set(sampling_param_names()))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; SamplingParams fields are {sampling_param_names()}")
    try:
        return SamplingParams(**{**defaults, **overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def as_kwargs(sampling_params: SamplingParamsLike) -> dict[str, Any]:
    """Default sampling parameters as SamplingParams keyword arguments, checked by building them once."""
    if isinstance(sampling_params, SamplingParams):
        return {name: getattr(sampling_params, name) for name in sampling_param_names()}
    if sampling_params is not None and not isinstance(sampling_params, dict):
        raise ValueError(f"sampling_params must be a SamplingParams, a dict of its fields or None, "
                         f"got {type(sampling_params).__name__}")
    kwargs = dict(sampling_params or {})
    make_sampling_params({}, kwargs, "sampling_params")
    return kwargs


# -- rows -----------------------------------------------------------------------------------------------------
def describe_row(batch: pa.Table, i: int) -> str:
    """'row id=7' when the batch has an id column, else 'batch row 3'."""
    if "id" in batch.column_names:
        return f"row id={batch.column('id')[i].as_py()!r}"
    return f"batch row {i}"


def column_values(batch: pa.Table, name: str) -> list:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


def batch_prompts(batch: pa.Table) -> list[str | list[int]]:
    """Each row's prompt: its prompt_token_ids when not null, else its prompt text."""
    if PROMPT not in batch.column_names and PROMPT_TOKEN_IDS not in batch.column_names:
        raise ValueError(f"rows need a {PROMPT!r} (text) or {PROMPT_TOKEN_IDS!r} (list of ints) column; "
                         f"got columns {batch.column_names}")
    prompts = []
    rows = zip(column_values(batch, PROMPT), column_values(batch, PROMPT_TOKEN_IDS), strict=True)
    for i, (text, token_ids) in enumerate(rows):
        if not is_null(token_ids):
            prompts.append(token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids))
        elif isinstance(text, str):
            prompts.append(text)
        else:
            raise ValueError(f"{describe_row(batch, i)} has no prompt: {PROMPT_TOKEN_IDS!r} is null and {PROMPT!r} "
                             f"is {text!r}; give each row a text prompt or a list of token ids")
    return prompts


# -- the Ray Data UDF -----------------------------------------------------------------------------------------
class LLMPredictor:
    """A callable class for `Dataset.map_batches(..., batch_format="pyarrow")`: Ray Data builds one per actor (one
    engine replica, using the GPUs Ray gave the actor) and calls it with each batch of rows."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any] | None = None,
                 sampling_params: SamplingParamsLike = None) -> None:
        self.default_params = as_kwargs(sampling_params)
        self.llm = LLM(model, **(engine_kwargs or {}))

    def __call__(self, batch: pa.Table) -> pa.Table:
        clash = [name for name in OUTPUT_SCHEMA.names if name in batch.column_names]
        if clash:
            raise ValueError(f"input rows already have output column(s) {clash}; drop or rename them first")
        prompts = batch_prompts(batch)
        params = [make_sampling_params(self.default_params, overrides, f"{describe_row(batch, i)}: sampling_params")
                  for i, overrides in enumerate(column_values(batch, SAMPLING_PARAMS))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        columns = self.output_columns(prompts, outputs)
        for field in OUTPUT_SCHEMA:
            batch = batch.append_column(field, pa.array(columns[field.name], type=field.type))
        return batch

    def output_columns(self, prompts: list[str | list[int]], outputs: list[dict]) -> dict[str, list]:
        return {
            "generated_text": [o["text"] for o in outputs],
            "generated_token_ids": [o["token_ids"] for o in outputs],
            "finish_reason": [o["finish_reason"] for o in outputs],
            "num_prompt_tokens": [self.num_prompt_tokens(p, o) for p, o in zip(prompts, outputs, strict=True)],
            "num_generated_tokens": [len(o["token_ids"]) for o in outputs],
        }

    def num_prompt_tokens(self, prompt: str | list[int], output: dict) -> int:
        """The engine's own count when its output carries one, else the prompt's length in tokens."""
        if "num_prompt_tokens" in output:
            return output["num_prompt_tokens"]
        return len(prompt) if isinstance(prompt, list) else len(self.llm.tokenizer.encode(prompt))

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)  # absent when __init__ failed
        if llm is not None:
            llm.exit()

    def __del__(self) -> None:  # Ray Data drops the UDF when its actor exits gracefully
        self.shutdown()


# -- the processing step --------------------------------------------------------------------------------------
def check_engine_kwargs(engine_kwargs: dict[str, Any]) -> None:
    """Catch misspelt engine arguments on the driver, before any actor starts (the engine checks values)."""
    valid = [f.name for f in fields(Config) if f.init and f.name != "model"]
    unknown = sorted(set(engine_kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown engine argument(s) {unknown}; valid ones are {valid}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_concurrency(concurrency: int | tuple[int, int]) -> None:
    if isinstance(concurrency, tuple) and len(concurrency) == 2:
        for bound in concurrency:
            check_positive_int("concurrency's (min, max) bounds", bound)
        if concurrency[0] > concurrency[1]:
            raise ValueError(f"concurrency=(min, max) needs min <= max, got {concurrency!r}")
    else:
        check_positive_int("concurrency (the number of engine replicas, or a (min, max) tuple)", concurrency)


def actor_pool(concurrency: int | tuple[int, int], max_tasks_in_flight_per_actor: int | None
               ) -> ray.data.ActorPoolStrategy:
    if isinstance(concurrency, int):
        return ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=max_tasks_in_flight_per_actor)
    return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1],
                                      max_tasks_in_flight_per_actor=max_tasks_in_flight_per_actor)


def build_processor(model: str, engine_kwargs: dict[str, Any] | None = None, *,
                    sampling_params: SamplingParamsLike = None, concurrency: int | tuple[int, int] = 1,
                    batch_size: int = 256, num_gpus: float | None = None, num_cpus: float | None = None,
                    max_tasks_in_flight_per_actor: int | None = None, predictor: type[LLMPredictor] = LLMPredictor,
                    **map_batches_kwargs: Any) -> Callable[[ray.data.Dataset], ray.data.Dataset]:
    """A step `process(ds) -> ds` that runs engine replicas (Ray actors, one LLM each) over a Dataset's rows.

    model: checkpoint directory, at this path on every node that runs a replica. engine_kwargs: LLM's keyword
    arguments (tensor_parallel_size, max_model_len, ...). sampling_params: the defaults for every row.
    concurrency: the number of replicas, or (min, max) to autoscale between. batch_size: rows per generate call
    (larger batches keep an engine busier; smaller ones spread a small dataset over more replicas). num_gpus per
    replica: tensor_parallel_size by default, 0 with device="cpu". max_tasks_in_flight_per_actor: batches queued
    per replica (Ray Data's default when None). predictor: LLMPredictor or a subclass. map_batches_kwargs go to
    Dataset.map_batches as they are. Ray Data restarts an actor that dies and retries its batches, without limit
    by default.
    """
    engine_kwargs = dict(engine_kwargs or {})
    check_engine_kwargs(engine_kwargs)
    check_concurrency(concurrency)
    check_positive_int("batch_size", batch_size)
    if max_tasks_in_flight_per_actor is not None:
        check_positive_int("max_tasks_in_flight_per_actor", max_tasks_in_flight_per_actor)
    if not (isinstance(predictor, type) and issubclass(predictor, LLMPredictor)):
        raise ValueError(f"predictor must be LLMPredictor or a subclass of it, got {predictor!r}")
    taken = sorted({"compute", "concurrency", "fn_constructor_kwargs", "batch_format"} & set(map_batches_kwargs))
    if taken:
        raise ValueError(f"build_processor sets map_batches' {taken} itself; use its concurrency and "
                         "max_tasks_in_flight_per_actor arguments")
    if num_gpus is None:
        num_gpus = 0 if engine_kwargs.get("device") == "cpu" else engine_kwargs.get("tensor_parallel_size", 1)
    compute = actor_pool(concurrency, max_tasks_in_flight_per_actor)
    constructor_kwargs = {"model": model, "engine_kwargs": engine_kwargs,
                          "sampling_params": as_kwargs(sampling_params)}

    def process(ds: ray.data.Dataset) -> ray.data.Dataset:
        return ds.map_batches(predictor, fn_constructor_kwargs=constructor_kwargs, batch_format="pyarrow",
                              batch_size=batch_size, compute=compute, num_gpus=num_gpus, num_cpus=num_cpus,
                              **map_batches_kwargs)
    return process
