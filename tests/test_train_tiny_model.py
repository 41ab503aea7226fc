"""tools/train_tiny_model.py: the --tiny CPU run writes a checkpoint that HF transformers loads, with the chat
template, both stop ids and a loss that went down; the same seed gives the same weights; the corpus helpers.

Deterministic (fixed seed, fixed step count, no timing-dependent choices); about 20 s on 2 CPU cores.
"""
import ast
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "train_tiny_model.py")
CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json", "README.md", "train_log.json"}
TINY_ARGS = ["--tiny", "--max-files", "32", "--steps", "40", "--seed", "3"]


def load_script():
    spec = importlib.util.spec_from_file_location("train_tiny_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(out: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, SCRIPT, "--out", out, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tiny-trained"))
    proc = run_script(out, *TINY_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def read_log(path: str) -> dict:
    with open(os.path.join(path, "train_log.json")) as f:
        return json.load(f)


def test_writes_every_file(trained):
    files = set(os.listdir(trained))
    want = CHECKPOINT_FILES | ({"loss_curve.png"} if read_log(trained)["loss_curve_png"] else set())
    assert files == want
    with safe_open(os.path.join(trained, "model.safetensors"), "pt", "cpu") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    card = open(os.path.join(trained, "README.md")).read()
    for needle in ("PSF", "Python " + read_log(trained)["python_version"], "--steps 40", "unigram"):
        assert needle in card


def test_hf_loads_and_generates(trained):
    tok = AutoTokenizer.from_pretrained(trained)
    model = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.tie_word_embeddings and model.config.vocab_size % 64 == 0
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.encode("a<|im_end|>b", add_special_tokens=False).count(2) == 1  # specials are single tokens
    assert tok.decode(tok.encode("def f(x):\n    return x  # 12\n", add_special_tokens=False)) == \
        "def f(x):\n    return x  # 12\n"
    ids = torch.tensor([tok.encode("def main():\n", add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5) or tok.eos_token_id in out[0].tolist()


def test_chat_template_renders(trained):
    tok = AutoTokenizer.from_pretrained(trained)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "What does `f(x)` do?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat does `f(x)` do?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert text == load_script().render_chat(messages, add_generation_prompt=True)


def test_generation_config_has_both_stop_ids(trained):
    with open(os.path.join(trained, "generation_config.json")) as f:
        gen = json.load(f)
    with open(os.path.join(trained, "config.json")) as f:
        config = json.load(f)
    assert gen["eos_token_id"] == [2, 0]
    assert config["eos_token_id"] == 2 and config["head_dim"] >= 16


def test_loss_went_down(trained):
    r = read_log(trained)["results"]
    curve = [loss for _, loss in r["train_curve"]]
    assert r["steps"] == 40 and not r["stopped_early"]
    assert curve[-1] < curve[0] - 0.5
    assert r["held_out_loss"] < r["initial_held_out_loss"] - 0.5
    assert all(0 < r[k] < 10 for k in ("train_loss", "held_out_loss", "unigram_loss"))


def test_same_seed_same_weights(trained, tmp_path):
    proc = run_script(str(tmp_path), *TINY_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_log(str(tmp_path))["results"]["weights_sha256"] == read_log(trained)["results"]["weights_sha256"]
    for name in ("tokenizer.json", "model.safetensors"):
        with open(os.path.join(trained, name), "rb") as a, open(os.path.join(tmp_path, name), "rb") as b:
            assert a.read() == b.read(), name


def test_bad_settings_raise_clear_errors():
    script = load_script()
    with pytest.raises(ValueError, match="power of two"):
        script.parse_args(["--out", "x", "--head-dim", "24"])
    with pytest.raises(ValueError, match="multiple of --num-kv-heads"):
        script.parse_args(["--out", "x", "--num-heads", "6", "--num-kv-heads", "4"])
    with pytest.raises(ValueError, match="--seq-len"):
        script.parse_args(["--out", "x", "--seq-len", "4096"])


def test_split_is_stable_and_covers_every_file():
    script = load_script()
    paths = [f"pkg/mod{i}.py" for i in range(200)]
    train, held = script.split_files(paths, 0.1)
    assert sorted(train + held) == sorted(paths) and not set(train) & set(held)
    assert 5 <= len(held) <= 40
    assert set(script.split_files(list(reversed(paths)), 0.1)[1]) == set(held)  # order-independent
    assert script.split_files(["a.py", "b.py"], 0.01)[1]  # never an empty held-out split


def test_chat_samples_from_docstrings():
    script = load_script()
    source = ('class Box:\n    """A box of things to carry around."""\n'
              '    def put(self, item: int, *, force=False) -> None:\n        """Put item into the box, maybe.\n\n'
              '        Details that are not part of the answer.\n        """\n'
              '    def _hidden(self):\n        """Private methods are skipped entirely."""\n'
              'def short():\n    """Too short."""\n')
    samples = script.chat_samples(source, "pkg/boxes.py")
    users = [s[0]["content"] for s in samples]
    answers = [s[1]["content"] for s in samples]
    assert answers == ["A box of things to carry around.", "Put item into the box, maybe."]
    assert "`pkg.boxes.Box`" in users[0] and "`pkg.boxes.Box.put(item, *, force=False)`" in users[1]
    ast.parse(source)  # the sample source itself is valid Python


def test_plan_steps():
    script = load_script()
    s = script.Settings(batch_size=4, seq_len=10, max_epochs=2.0, max_minutes=1.0)
    assert script.plan_steps(s, 1000, None) == (50, "2 epochs")        # 2 * 1000 / (4 * 10)
    assert script.plan_steps(s, 1000, 0.01)[0] == 50                    # the epoch cap binds
    steps, why = script.plan_steps(s, 1000, 2.0)                        # 1 minute at 2 s/step: about 29 steps
    assert steps == 29 and "time budget" in why
    s.steps = 7
    assert script.plan_steps(s, 1000, 2.0) == (7, "--steps")
