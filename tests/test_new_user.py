"""Issue 13: twelve ways a new user broke the engine, each pinned by a test that failed before the fix (CPU; the
tensor-parallel cases over gloo, bounded in time), plus the smaller items (special tokens, numpy integers, corrupted
checkpoints, an impossible num_kvcache_blocks, a generator of prompts)."""
import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from nanovllm import LLM, CheckpointError, SamplingParams
from nanovllm.testing import make_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = dict(device="cpu", dtype="float32", kvcache_block_size=16, max_model_len=256)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(20, 60)), [9] * 17]


def run_child(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def token_ids(outputs: list[dict]) -> list[list[int]]:
    return [o["token_ids"] for o in outputs]


@pytest.fixture(scope="module")
def reference(tiny_model) -> list[list[int]]:
    with LLM(tiny_model, **CPU) as llm:
        return token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))


# -- 1. tensor-parallel start-up: a dead worker or Ctrl-C ends it within seconds ---------------------------------
def test_missing_main_guard_fails_fast_and_names_the_cause(tiny_model, tmp_path):
    """The quick start run as a script with tensor_parallel_size=2 and no `if __name__ == "__main__":`: the spawned
    worker dies while Python bootstraps it; rank 0 says so within seconds (it used to wait ~180 s)."""
    script = tmp_path / "no_guard.py"
    script.write_text(f"from nanovllm import LLM\nllm = LLM({tiny_model!r}, tensor_parallel_size=2, device='cpu')\n")
    start = time.monotonic()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    assert "before it started" in proc.stderr and 'if __name__ == "__main__":' in proc.stderr, proc.stderr[-3000:]


def test_ctrl_c_during_tensor_parallel_start_up_stops_everything(tiny_model):
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import multiprocessing, sys
            from nanovllm import LLM
            if __name__ == "__main__":
                print("starting", flush=True)
                try:
                    LLM({tiny_model!r}, tensor_parallel_size=2, device="cpu")
                    print("started", flush=True)
                except KeyboardInterrupt:
                    print("interrupted; live children:", multiprocessing.active_children(), flush=True)
        """)], env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "starting"
    time.sleep(0.5)  # the worker is still importing torch: rank 0 is waiting for it to attach
    start = time.monotonic()
    proc.send_signal(2)  # SIGINT
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert "interrupted; live children: []" in out, (out, err[-2000:])


# -- 2, 3. engines beside a tensor-parallel engine ----------------------------------------------------------------
def test_tp1_engine_beside_a_tp2_engine_and_a_second_tp_engine_refused(tiny_model, reference):
    """A TP=1 engine next to a live TP=2 engine builds the whole model (TP size from its own config, not the
    process-wide group); a second TP=2 engine is refused before anything is spawned, and the first keeps working."""
    with LLM(tiny_model, tensor_parallel_size=2, **CPU) as tp2:
        assert token_ids(tp2.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
        with LLM(tiny_model, **CPU) as tp1:
            assert token_ids(tp1.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
        with pytest.raises(RuntimeError, match="one tensor-parallel engine per process.*exit\\(\\) it first"):
            LLM(tiny_model, tensor_parallel_size=2, **CPU)
        assert dist.is_initialized()
        assert token_ids(tp2.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert not dist.is_initialized()


# -- 4. threads ---------------------------------------------------------------------------------------------------
def test_two_engines_in_two_threads_at_once(tiny_model, reference):
    engines = [LLM(tiny_model, **CPU) for _ in range(2)]
    results, errors = {}, []

    def work(i: int) -> None:
        try:
            results[i] = [token_ids(engines[i].generate(PROMPTS, GREEDY, use_tqdm=False)) for _ in range(3)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for engine in engines:
        engine.exit()
    assert not errors and all(r == [reference] * 3 for r in results.values())


def test_one_engine_used_from_two_threads_raises_clearly(tiny_model, reference):
    with LLM(tiny_model, **CPU) as llm:
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        worker = threading.Thread(target=llm.generate, args=([[5] * 10] * 4, long), kwargs=dict(use_tqdm=False))
        worker.start()
        deadline = time.monotonic() + 30
        while not llm._lock.locked() and time.monotonic() < deadline:
            time.sleep(0.001)
        with pytest.raises(RuntimeError, match="being used by another thread"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        worker.join(120)
        assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference  # still usable


# -- 5. dropping an engine frees it -----------------------------------------------------------------------------
@pytest.mark.parametrize("tp", [1, 2])
def test_dropped_engine_is_freed(tiny_model, tp):
    llm = LLM(tiny_model, tensor_parallel_size=tp, **CPU)
    llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    runner, ref = llm.model_runner, weakref.ref(llm)
    group = runner.workers
    workers, shm = (list(group.processes), group.channel.name) if group else ([], None)
    del llm
    gc.collect()
    assert ref() is None, "something still holds the engine"
    assert runner.model is None and runner.kv_cache is None  # weights and cache released
    assert not any(p.is_alive() for p in workers)
    assert shm is None or not os.path.exists(os.path.join("/dev/shm", shm))
    assert not dist.is_initialized()


# -- 6, 7. prompts and temperatures -----------------------------------------------------------------------------
def test_a_single_prompt_is_one_request(tiny_model):
    with LLM(tiny_model, **CPU) as llm:
        assert len(llm.generate("hello world", GREEDY, use_tqdm=False)) == 1
        one = llm.generate([5, 6, 7], GREEDY, use_tqdm=False)
        assert len(one) == 1 and one == llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
        assert len(llm.generate({"prompt": "hello"}, GREEDY, use_tqdm=False)) == 1
        assert len(llm.generate((p for p in PROMPTS), GREEDY, use_tqdm=False)) == len(PROMPTS)  # any iterable
        assert llm.generate([], GREEDY, use_tqdm=False) == []
        numpy_ids = llm.generate([np.array([5, 6, 7]).tolist(), list(np.arange(5, 8))], use_tqdm=False,
                                 sampling_params=SamplingParams(temperature=0, max_tokens=np.int64(8), ignore_eos=True))
        assert token_ids(numpy_ids) == token_ids(one) * 2


def test_tiny_temperatures_are_greedy(tiny_model, reference):
    with LLM(tiny_model, **CPU) as llm:
        for t in (1e-40, 1e-6):
            out = llm.generate(PROMPTS, SamplingParams(temperature=t, max_tokens=8, ignore_eos=True), use_tqdm=False)
            assert token_ids(out) == reference, t


# -- 8. every EOS id of the checkpoint --------------------------------------------------------------------------
def test_eos_ids_from_generation_config_stop(tmp_path):
    """Chat checkpoints list several EOS ids in generation_config.json (Qwen3: [151645, 151643]); HF stops at any."""
    src = make_checkpoint(str(tmp_path / "src"), tokenizer=False, seed=5)
    with LLM(src, **CPU) as llm:
        free = llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)[0]["token_ids"]
    stop_at = free[3]
    assert stop_at not in free[:3]
    dst = shutil.copytree(src, tmp_path / "dst")
    with open(dst / "generation_config.json") as f:
        gen = json.load(f)
    gen["eos_token_id"] = [gen["eos_token_id"], stop_at]
    (dst / "generation_config.json").write_text(json.dumps(gen))
    with LLM(str(dst), **CPU) as llm:
        out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert out["token_ids"] == free[:4] and out["finish_reason"] == "stop"


# -- 9. sliding windows ----------------------------------------------------------------------------------------
def test_sliding_window_config_is_refused(tiny_model, tmp_path):
    dst = shutil.copytree(tiny_model, tmp_path / "sw")
    config = json.loads((dst / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=64, max_window_layers=1)
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sliding-window attention.*sliding_window=64"):
        LLM(str(dst), **CPU)


# -- 10, 11. add_request with generate, idle steps ----------------------------------------------------------------
def test_generate_refuses_while_added_requests_are_unfinished(tiny_model, reference):
    with LLM(tiny_model, **CPU) as llm:
        rid = llm.add_request(PROMPTS[0], GREEDY)
        with pytest.raises(RuntimeError, match="cannot run while 1 request\\(s\\) added with add_request"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        finished = []
        while not llm.is_finished():
            finished += llm.step()[0]
        assert finished == [(rid, reference[0])]  # the queued request's output is not lost
        assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference


def test_step_on_an_idle_engine_returns_nothing(tiny_model):
    with LLM(tiny_model, **CPU) as llm:
        assert llm.step() == ([], 0) and llm.step_stream() == [] and llm.is_finished()


# -- smaller items ---------------------------------------------------------------------------------------------
def test_text_leaves_out_special_tokens_and_the_stop_token(trained_model):
    """Like vLLM: skip_special_tokens=True by default; the text never holds the EOS / stop id that ended it."""
    tok = AutoTokenizer.from_pretrained(trained_model)
    chat = tok.apply_chat_template([{"role": "user", "content": "What does `os.path.join(a, *p)` do?"}],
                                   tokenize=False, add_generation_prompt=True)
    with LLM(trained_model, **dict(CPU, max_model_len=512)) as llm:
        for skip in (True, False):
            out = llm.generate(chat, SamplingParams(temperature=0, max_tokens=60, skip_special_tokens=skip),
                               use_tqdm=False)[0]
            assert out["finish_reason"] == "stop" and out["token_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
            assert "<|im_end|>" not in out["text"] and out["text"] == tok.decode(out["token_ids"][:-1])
        kept = llm.generate(chat, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True,
                                                 skip_special_tokens=False), use_tqdm=False)[0]
        assert "<|im_end|>" in kept["text"]  # past EOS (ignored) special tokens show when asked


@pytest.mark.parametrize("tp", [1, 2])
def test_corrupted_checkpoint_names_the_file_whatever_the_tp_size(tiny_model, tmp_path, tp):
    dst = shutil.copytree(tiny_model, tmp_path / f"bad{tp}")
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])  # truncated download
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt or incomplete"):
        LLM(str(dst), tensor_parallel_size=tp, **CPU)
    assert time.monotonic() - start < 60
    assert not dist.is_initialized()


def test_impossible_num_kvcache_blocks_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="num_kvcache_blocks=1000000000 needs .* GiB .* lower num_kvcache_blocks"):
        LLM(tiny_model, num_kvcache_blocks=10**9, **CPU)


def test_engine_errors_name_hf_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download Qwen/Qwen3-0.6B.*huggingface-cli download"):
        LLM("Qwen/Qwen3-0.6B", **CPU)
    assert torch.get_default_dtype() == torch.float32
