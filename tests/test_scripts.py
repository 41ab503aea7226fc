"""bench.py, example.py and the benchmark helpers: workload, messages, a smoke run (CPU, fast)."""
import ast
import os
import re
import subprocess
import sys

import torch
from transformers import Qwen3ForCausalLM

from nanovllm.testing.random_checkpoint import QWEN3_0_6B_PARAMS, build_tokenizer, qwen3_0_6b_config
from nanovllm.testing.workload import make_workload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_LINE = re.compile(r"^Total: (\d+)tok, Time: \d+\.\d\ds, Throughput: \d+\.\d\dtok/s$", re.M)


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_bench_workload_matches_upstream_totals():
    prompts, params = make_workload(256, 1024, 1024)
    assert len(prompts) == len(params) == 256
    assert sum(map(len, prompts)) == 142_827
    assert sum(sp.max_tokens for sp in params) == 133_966
    assert all(0 <= t <= 10000 for p in prompts for t in p)
    assert all(sp.temperature == 0.6 and sp.ignore_eos for sp in params)


def test_bench_workload_is_reproducible():
    a, b = make_workload(8, 200, 200), make_workload(8, 200, 200)
    assert a[0] == b[0] and [sp.max_tokens for sp in a[1]] == [sp.max_tokens for sp in b[1]]


def test_bench_help_states_defaults_and_the_vocabulary_it_needs():
    proc = run_script("bench.py", "--help", timeout=60)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "more than 10,000 ids" in text and "--latency" in text
    for flag, default in (("--num-seqs", 256), ("--max-input-len", 1024), ("--max-output-len", 1024),
                          ("--max-model-len", 4096), ("--tensor-parallel-size", 1)):
        assert re.search(rf"{flag} \S+ .*?\(default: {default}\)", text), flag
    assert "~/huggingface/Qwen3-0.6B" in text or os.path.expanduser("~/huggingface/Qwen3-0.6B") in text


def test_bench_smoke_run(tiny_model_factory):
    model = tiny_model_factory(vocab_size=10240)  # prompt ids go up to 10000
    proc = run_script("bench.py", "--model", model, "--num-seqs", "2", "--max-input-len", "120",
                      "--max-output-len", "110")
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = TOTAL_LINE.search(proc.stdout)
    assert match, proc.stdout
    _, params = make_workload(2, 120, 110)
    assert int(match.group(1)) == sum(sp.max_tokens for sp in params)


def test_bench_latency_smoke_run(tiny_model_factory):
    model = tiny_model_factory(vocab_size=10240)
    proc = run_script("bench.py", "--model", model, "--latency", "--latency-output-len", "8", "--max-model-len", "1024")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"^Latency: batch (\d+), prompt 128, 8 tokens: (\d+\.\d+) ms/step", proc.stdout, re.M)
    assert [b for b, _ in lines] == ["1", "8"] and all(float(ms) > 0 for _, ms in lines)


def test_bench_small_vocabulary_is_a_clear_error(tiny_model):
    proc = run_script("bench.py", "--model", tiny_model, "--num-seqs", "1", timeout=120)
    assert proc.returncode != 0
    assert "needs a model with more than 10000 token ids" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_max_model_len_too_small_is_an_argparse_error():
    proc = run_script("bench.py", "--max-model-len", "1000", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--max-model-len 1000 cannot hold the workload's longest request (2048 tokens)" in proc.stderr


def test_bench_explicit_missing_model_is_an_error(tmp_path):
    proc = run_script("bench.py", "--model", str(tmp_path / "missing"), timeout=120)
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_example_missing_model_prints_download_hint(tmp_path):
    proc = run_script("example.py", "--model", str(tmp_path / "missing"), timeout=120)
    assert proc.returncode != 0
    assert "huggingface-cli download Qwen/Qwen3-0.6B --local-dir ~/huggingface/Qwen3-0.6B/" in proc.stderr
    assert "--model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_example_without_qwen_runs_the_shipped_model_on_cpu(tmp_path):
    """A fresh machine (no ~/huggingface/Qwen3-0.6B): example.py says it uses the small trained model, prints the
    download hint, and prints real completions (Python-flavoured text, each ended by the model's EOS)."""
    env = dict(os.environ, HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "example.py"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMALL TRAINED MODEL" in proc.stderr and "huggingface-cli download Qwen/Qwen3-0.6B" in proc.stderr
    # repr() quotes with " when the text holds a ' (Python source often does); sampling is unseeded
    completions = [ast.literal_eval(c) for c in re.findall(r"^Completion: (.*)$", proc.stdout, re.M)]
    assert len(completions) == 3 and all(c.strip() for c in completions), proc.stdout


def test_random_checkpoint_config_is_qwen3_0_6b():
    c = qwen3_0_6b_config()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (1024, 28, 16, 8, 128, 3072, 151936)
    assert c.tie_word_embeddings and not c.attention_bias and c.hidden_act == "silu"
    assert c.rope_parameters["rope_theta"] == 1e6 and c.rms_norm_eps == 1e-6
    assert c.max_position_embeddings == 40960 and c.dtype == torch.bfloat16
    assert c.architectures == ["Qwen3ForCausalLM"] and c.eos_token_id == 151645
    with torch.device("meta"):  # shapes only, no memory
        model = Qwen3ForCausalLM(c)
    assert sum(p.numel() for p in model.parameters()) == QWEN3_0_6B_PARAMS == 596_049_920


def test_random_checkpoint_tokenizer_round_trips_with_qwen_special_ids():
    tok = build_tokenizer()
    ids = tok.encode("Benchmark: héllo")
    assert tok.decode(ids) == "Benchmark: héllo"
    assert tok.eos_token_id == qwen3_0_6b_config().eos_token_id == 151645
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert max(ids) < 151936
    tok.decode([5, 100_000, 151_935])  # ids outside its vocabulary decode without error


def test_benchmark_scripts_run_as_modules_without_path_edits():
    proc = run_script("-m", "benchmarks.hf_compare", "--help", timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout, proc.stderr[-2000:]
    proc = run_script("-m", "benchmarks.cold_start", "--help", timeout=60)  # passes bench.py's arguments through
    assert proc.returncode == 0 and "--kv-cache-dtype" in proc.stdout, proc.stderr[-2000:]
