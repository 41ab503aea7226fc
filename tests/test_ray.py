"""nanovllm.integrations.ray on a local 2-CPU Ray: 2 CPU engine replicas over 50 rows give each row exactly the
output one engine gives it, in input order, also when a replica's actor dies mid-run and Ray restarts it."""
import os

import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pytest.importorskip("ray.data")

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.integrations.ray import LLMPredictor, build_processor  # noqa: E402

ENGINE = {"device": "cpu", "dtype": "float32", "kvcache_block_size": 16, "max_model_len": 256,
          "num_kvcache_blocks": 64}
DEFAULTS = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
NUM_ROWS = 50
KILL_ID = 23  # the first actor to get this row's batch dies (after generating, before returning it)


def make_rows(n: int = NUM_ROWS) -> list[dict]:
    """Even rows: text prompts; odd rows: token ids; every third row asks for fewer tokens."""
    rows = []
    for i in range(n):
        text = f"hello world, the quick brown fox {i}" if i % 2 == 0 else None
        token_ids = None if i % 2 == 0 else [3 + (7 * i + 5 * j) % 300 for j in range(1 + i % 13)]
        params = {"max_tokens": 3 + i % 4} if i % 3 == 0 else None
        rows.append({"id": i, "prompt": text, "prompt_token_ids": token_ids, "sampling_params": params})
    return rows


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    yield
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model) -> list[dict]:
    """One engine's outputs for make_rows(), plus each prompt's token count."""
    rows = make_rows()
    with LLM(tiny_model, **ENGINE) as llm:
        prompts = [r["prompt_token_ids"] or r["prompt"] for r in rows]
        params = [SamplingParams(**{**DEFAULTS, **(r["sampling_params"] or {})}) for r in rows]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        for prompt, out in zip(prompts, outputs, strict=True):
            out["num_prompt_tokens"] = len(prompt) if isinstance(prompt, list) else len(llm.tokenizer.encode(prompt))
    return outputs


def run_replicas(model: str, predictor: type[LLMPredictor] = LLMPredictor) -> list[dict]:
    ds = ray.data.from_items(make_rows(), override_num_blocks=5)
    process = build_processor(model, ENGINE, sampling_params=DEFAULTS, concurrency=2, batch_size=5, num_cpus=1,
                              predictor=predictor)
    return process(ds).take_all()


def assert_matches(rows: list[dict], reference: list[dict]) -> None:
    assert [r["id"] for r in rows] == list(range(NUM_ROWS))  # every row once, in input order
    inputs = make_rows()
    for row, want, given in zip(rows, reference, inputs, strict=True):
        assert row["generated_token_ids"] == want["token_ids"], f"row {row['id']}"
        assert row["generated_text"] == want["text"], f"row {row['id']}"
        assert row["finish_reason"] == want["finish_reason"] == "length", f"row {row['id']}"
        assert row["num_generated_tokens"] == len(want["token_ids"]), f"row {row['id']}"
        assert row["num_prompt_tokens"] == want["num_prompt_tokens"], f"row {row['id']}"
        assert (row["prompt"], row["prompt_token_ids"]) == (given["prompt"], given["prompt_token_ids"])


def test_two_replicas_match_one_engine(ray_local, tiny_model, reference):
    rows = run_replicas(tiny_model)
    assert_matches(rows, reference)
    assert {len(r["generated_token_ids"]) for r in rows} == {3, 4, 5, 6, 8}  # per-row max_tokens were applied


def test_tensor_parallel_replica(ray_local, tiny_model, reference):
    """A TP=2 engine inside one actor (its worker process spawned from the actor) gives the same rows."""
    n = 10
    ds = ray.data.from_items(make_rows(n), override_num_blocks=2)
    process = build_processor(tiny_model, {**ENGINE, "tensor_parallel_size": 2}, sampling_params=DEFAULTS,
                              batch_size=5, num_cpus=1)
    rows = process(ds).take_all()
    assert [r["id"] for r in rows] == list(range(n))
    assert [r["generated_token_ids"] for r in rows] == [r["token_ids"] for r in reference[:n]]


def dying_predictor(marker: str) -> type[LLMPredictor]:
    """An LLMPredictor whose first call on KILL_ID's batch (over all actors, once) exits the actor process after
    generating; rows record the pid that produced them. Defined in a function so Ray pickles it by value."""
    class DyingPredictor(LLMPredictor):
        def __call__(self, batch: pa.Table) -> pa.Table:
            out = super().__call__(batch)
            if KILL_ID in batch.column("id").to_pylist():
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:  # the fault already happened: this is the retry
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    os._exit(1)
            return out.append_column("worker_pid", pa.array([os.getpid()] * out.num_rows, pa.int64()))
    return DyingPredictor


def test_actor_death_loses_and_duplicates_no_row(ray_local, tiny_model, reference, tmp_path):
    marker = str(tmp_path / "killed")
    rows = run_replicas(tiny_model, dying_predictor(marker))
    with open(marker) as f:  # the fault fired
        dead_pid = int(f.read())
    assert_matches(rows, reference)
    assert rows[KILL_ID]["worker_pid"] != dead_pid  # a restarted actor redid the lost batch


# -- input errors: the predictor in this process, no Ray cluster needed ----------------------------------------
@pytest.fixture(scope="module")
def predictor(tiny_model):
    p = LLMPredictor(tiny_model, ENGINE, sampling_params=DEFAULTS)
    yield p
    p.shutdown()


def test_predictor_call_in_process(predictor, reference):
    table = pa.Table.from_pylist(make_rows()[:6])
    out = predictor(table).to_pylist()
    assert [r["id"] for r in out] == list(range(6))
    for row, want in zip(out, reference[:6], strict=True):
        assert row["generated_token_ids"] == want["token_ids"]
        assert row["num_prompt_tokens"] == want["num_prompt_tokens"]
    empty = predictor(table.slice(0, 0))
    assert empty.num_rows == 0 and empty.schema.field("generated_token_ids").type == pa.list_(pa.int64())


@pytest.mark.parametrize("rows, match", [
    ([{"id": 1, "text": "hi"}], r"rows need a 'prompt' \(text\) or 'prompt_token_ids'"),
    ([{"id": 7, "prompt": None, "prompt_token_ids": None}], r"row id=7 has no prompt"),
    ([{"prompt": "hi", "sampling_params": {"max_token": 3}}], r"batch row 0: sampling_params has unknown key\(s\) "
                                                              r"\['max_token'\]"),
    ([{"prompt": "hi", "sampling_params": {"temperature": -1.0}}], r"batch row 0: sampling_params: temperature must"),
    ([{"prompt": "hi", "generated_text": "x"}], r"already have output column\(s\) \['generated_text'\]"),
])
def test_predictor_row_errors(predictor, rows, match):
    with pytest.raises(ValueError, match=match):
        predictor(pa.Table.from_pylist(rows))


@pytest.mark.parametrize("kwargs, match", [
    ({"engine_kwargs": {"tensor_parallel": 2}}, r"unknown engine argument\(s\) \['tensor_parallel'\]"),
    ({"sampling_params": {"temprature": 0}}, r"unknown key\(s\) \['temprature'\]"),
    ({"sampling_params": {"max_tokens": 0}}, r"max_tokens must be an integer >= 1"),
    ({"sampling_params": "greedy"}, r"sampling_params must be a SamplingParams"),
    ({"concurrency": 0}, r"concurrency .* must be a positive integer, got 0"),
    ({"concurrency": (3, 2)}, r"needs min <= max"),
    ({"batch_size": 0}, r"batch_size must be a positive integer"),
    ({"predictor": dict}, r"predictor must be LLMPredictor or a subclass"),
    ({"compute": None}, r"sets map_batches' \['compute'\] itself"),
])
def test_build_processor_errors(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_processor(tiny_model, **kwargs)
