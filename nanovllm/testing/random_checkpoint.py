"""A random-weight checkpoint with Qwen3-0.6B's exact configuration, for benchmarks on machines with nothing
downloaded. Throughput does not depend on the weights' values, only on their shapes and dtype."""
import os
import shutil
import sys
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "nanovllm", "random-qwen3-0.6b")
QWEN3_0_6B_PARAMS = 596_049_920
# Qwen3's special tokens keep their real ids, so the config's bos/eos ids exist in the tokenizer.
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen3_0_6b_config() -> Qwen3Config:
    """Qwen3-0.6B's config.json, field for field (transformers 5 spells rope_theta as rope_parameters)."""
    config = Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=40960, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        attention_bias=False, attention_dropout=0.0, use_sliding_window=False, sliding_window=None,
        max_window_layers=28, bos_token_id=SPECIAL_TOKENS["<|endoftext|>"],
        eos_token_id=SPECIAL_TOKENS["<|im_end|>"], pad_token_id=None)
    config.architectures = ["Qwen3ForCausalLM"]
    config.dtype = torch.bfloat16
    return config


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges) plus Qwen3's special tokens at their real ids.
    Ids the model samples outside this vocabulary decode to nothing, which is fine for a random model."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | SPECIAL_TOKENS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def save_random_model(path: str) -> int:
    """Initialise (on the GPU when there is one: much faster) and save the model; returns its parameter count."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(qwen3_0_6b_config(), dtype=torch.bfloat16)
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == QWEN3_0_6B_PARAMS, f"built {num_params:,} parameters, expected {QWEN3_0_6B_PARAMS:,}"
    model.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return num_params


def build_qwen3_0_6b(path: str) -> str:
    """Save a random bf16 Qwen3-0.6B (normal init, std 0.02) with a tokenizer to path; reuse it if already built.
    Returns the expanded path."""
    path = os.path.expanduser(path)
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    if os.path.exists(path):
        raise FileExistsError(f"{path!r} exists but holds no model.safetensors; remove it or pick another path")
    start = time.perf_counter()
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    num_params = save_random_model(tmp)
    build_tokenizer().save_pretrained(tmp)
    try:
        os.replace(tmp, path)  # atomic: a half-written checkpoint is never reused
    except OSError:  # another process finished first: keep its checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            raise
    print(f"built a random-weight Qwen3-0.6B ({num_params:,} parameters) at {path} "
          f"in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return path


def resolve_model(model: str, cache_dir: str = DEFAULT_CACHE_DIR) -> tuple[str, bool]:
    """(model dir to use, whether it has random weights): model if it exists, else the cached random checkpoint."""
    model = os.path.expanduser(model)
    if os.path.isdir(model):
        return model, False
    print(f"model directory {model!r} not found: BENCHMARKING RANDOM WEIGHTS (Qwen3-0.6B's exact configuration "
          f"and shapes; throughput does not depend on the weights' values)", file=sys.stderr)
    return build_qwen3_0_6b(cache_dir), True


if __name__ == "__main__":
    print(build_qwen3_0_6b(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CACHE_DIR))
