"""bench.py, example.py and the benchmark helpers: workload, messages, a smoke run (CPU, fast)."""
import os
import re
import subprocess
import sys

import torch
from transformers import Qwen3ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402
from benchmarks import hf_compare  # noqa: E402
from benchmarks.random_checkpoint import QWEN3_0_6B_PARAMS, build_tokenizer, qwen3_0_6b_config  # noqa: E402

TOTAL_LINE = re.compile(r"^Total: (\d+)tok, Time: \d+\.\d\ds, Throughput: \d+\.\d\dtok/s$", re.M)


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_bench_workload_matches_upstream_totals():
    prompts, params = bench.make_workload(256, 1024, 1024)
    assert len(prompts) == len(params) == 256
    assert sum(map(len, prompts)) == 142_827
    assert sum(sp.max_tokens for sp in params) == 133_966
    assert all(0 <= t <= 10000 for p in prompts for t in p)
    assert all(sp.temperature == 0.6 and sp.ignore_eos for sp in params)


def test_bench_workload_is_reproducible():
    a, b = bench.make_workload(8, 200, 200), bench.make_workload(8, 200, 200)
    assert a[0] == b[0] and [sp.max_tokens for sp in a[1]] == [sp.max_tokens for sp in b[1]]


def test_bench_defaults_follow_upstream():
    args = bench.parse_args([])
    assert (args.num_seqs, args.max_input_len, args.max_output_len) == (256, 1024, 1024)
    assert args.tensor_parallel_size == 1 and not args.enforce_eager
    assert args.model == os.path.expanduser("~/huggingface/Qwen3-0.6B/")


def test_bench_smoke_run(tiny_model_factory):
    model = tiny_model_factory(vocab_size=10240)  # prompt ids go up to 10000
    proc = run_script("bench.py", "--model", model, "--num-seqs", "2", "--max-input-len", "120",
                      "--max-output-len", "110")
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = TOTAL_LINE.search(proc.stdout)
    assert match, proc.stdout
    _, params = bench.make_workload(2, 120, 110)
    assert int(match.group(1)) == sum(sp.max_tokens for sp in params)


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


def test_hf_compare_quick_workload_options():
    args = hf_compare.parse_args(["--quick"])
    assert (args.num_seqs, args.max_input_len, args.max_output_len) == (64, 512, 512)
    args = hf_compare.parse_args(["--quick", "--num-seqs", "8"])
    assert (args.num_seqs, args.max_input_len) == (8, 512)
