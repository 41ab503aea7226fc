"""Random-weight checkpoints with real models' exact configurations, for benchmarks on machines with nothing
downloaded: Qwen3-0.6B (the default), Llama-3.2-1B and Qwen3-30B-A3B (optionally with fewer layers, so it fits a
GPU). Throughput does not depend on the weights' values, only on their shapes and dtype.

    python3 -m nanovllm.testing.random_checkpoint [PATH]                                   # Qwen3-0.6B
    python3 -m nanovllm.testing.random_checkpoint --arch llama-3.2-1b PATH
    python3 -m nanovllm.testing.random_checkpoint --arch qwen3-30b-a3b --layers 8 PATH     # 8 of its 48 layers
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from nanovllm.testing.checkpoints import CHAT_TEMPLATE

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "nanovllm", "random-qwen3-0.6b")
QWEN3_0_6B_PARAMS = 596_049_920
LLAMA_3_2_1B_PARAMS = 1_235_814_400
QWEN3_30B_A3B_PARAMS = 30_532_122_624
# Qwen3's special tokens keep their real ids, so the config's bos/eos ids exist in the tokenizer.
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
LLAMA3_SPECIAL_TOKENS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|eot_id|>": 128009}


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


def llama_3_2_1b_config(num_layers: int = 16) -> LlamaConfig:
    """meta-llama/Llama-3.2-1B's config.json (tied embeddings, llama3 RoPE factor 32, theta 5e5); num_layers of
    its 16 layers."""
    config = LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=num_layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
        max_position_embeddings=131072, initializer_range=0.02, rms_norm_eps=1e-5, use_cache=True,
        tie_word_embeddings=True, attention_bias=False, attention_dropout=0.0, mlp_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=LLAMA3_SPECIAL_TOKENS["<|begin_of_text|>"],
        eos_token_id=LLAMA3_SPECIAL_TOKENS["<|end_of_text|>"], pad_token_id=None)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    return config


def qwen3_30b_a3b_config(num_layers: int = 48) -> Qwen3MoeConfig:
    """Qwen/Qwen3-30B-A3B's config.json (128 experts, top-8, moe_intermediate 768, untied); num_layers of its 48."""
    config = Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=num_layers,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, hidden_act="silu",
        max_position_embeddings=40960, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        attention_bias=False, attention_dropout=0.0, use_sliding_window=False, sliding_window=None,
        decoder_sparse_step=1, moe_intermediate_size=768, num_experts_per_tok=8, num_experts=128,
        norm_topk_prob=True, output_router_logits=False, router_aux_loss_coef=0.001, mlp_only_layers=[],
        bos_token_id=SPECIAL_TOKENS["<|endoftext|>"], eos_token_id=SPECIAL_TOKENS["<|im_end|>"], pad_token_id=None)
    config.architectures = ["Qwen3MoeForCausalLM"]
    config.dtype = torch.bfloat16
    return config


@dataclass(frozen=True)
class RandomArch:
    """One buildable architecture: its config (at a layer count), HF class, full depth and parameter count there,
    and its special tokens (name -> real id) with the eos and pad among them."""
    config: Callable[[int], PretrainedConfig]
    model_cls: type
    num_layers: int
    num_params: int
    special_tokens: dict[str, int]
    eos: str
    pad: str


ARCHS = {
    "qwen3-0.6b": RandomArch(lambda n: qwen3_0_6b_config(), Qwen3ForCausalLM, 28, QWEN3_0_6B_PARAMS,
                             SPECIAL_TOKENS, "<|im_end|>", "<|endoftext|>"),
    "llama-3.2-1b": RandomArch(llama_3_2_1b_config, LlamaForCausalLM, 16, LLAMA_3_2_1B_PARAMS,
                               LLAMA3_SPECIAL_TOKENS, "<|end_of_text|>", "<|end_of_text|>"),
    "qwen3-30b-a3b": RandomArch(qwen3_30b_a3b_config, Qwen3MoeForCausalLM, 48, QWEN3_30B_A3B_PARAMS,
                                SPECIAL_TOKENS, "<|im_end|>", "<|endoftext|>"),
}


def arch_config(arch: str, num_layers: int | None = None) -> PretrainedConfig:
    """The config of ARCHS[arch] with num_layers layers (None: the real model's depth)."""
    spec = _arch(arch)
    num_layers = spec.num_layers if num_layers is None else num_layers
    if not 1 <= num_layers <= spec.num_layers:
        raise ValueError(f"--layers {num_layers} must be in 1..{spec.num_layers} for {arch}")
    if arch == "qwen3-0.6b" and num_layers != spec.num_layers:
        raise ValueError("qwen3-0.6b is built at its full depth only (drop --layers)")
    return spec.config(num_layers)


def build_tokenizer(special_tokens: dict[str, int] = SPECIAL_TOKENS, eos: str = "<|im_end|>",
                    pad: str = "<|endoftext|>") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges) plus the model's special tokens at their real ids.
    Ids the model samples outside this vocabulary decode to nothing, which is fine for a random model."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | special_tokens
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special_tokens))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, chat_template=CHAT_TEMPLATE)


def save_random_model(path: str, arch: str = "qwen3-0.6b", num_layers: int | None = None) -> int:
    """Initialise (on the GPU when there is one: much faster) and save the model in bf16; returns its parameter
    count (checked against the real model's at full depth)."""
    spec = _arch(arch)
    config = arch_config(arch, num_layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = spec.model_cls._from_config(config, dtype=torch.bfloat16)
    num_params = sum(p.numel() for p in model.parameters())
    if config.num_hidden_layers == spec.num_layers and num_params != spec.num_params:
        raise RuntimeError(f"built {num_params:,} parameters for {arch}, expected {spec.num_params:,}")
    model.save_pretrained(path)  # experts as per-expert tensors (HF's default format, as published checkpoints)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return num_params


def build_random_checkpoint(path: str, arch: str = "qwen3-0.6b", num_layers: int | None = None) -> str:
    """Save a random bf16 model of ARCHS[arch] (normal init, std 0.02) with a tokenizer to path; reuse it if
    already built with the same architecture and depth. Returns the expanded path."""
    spec = _arch(arch)
    path = os.path.expanduser(path)
    want_layers = arch_config(arch, num_layers).num_hidden_layers
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            found = json.load(f)
        if found.get("architectures") == [spec.model_cls.__name__] and found.get("num_hidden_layers") == want_layers:
            return path
        raise FileExistsError(f"{path!r} holds a {found.get('architectures')} checkpoint with "
                              f"{found.get('num_hidden_layers')} layers, not {arch} with {want_layers}; remove it or "
                              "pick another path")
    if os.path.exists(path):
        raise FileExistsError(f"{path!r} exists but holds no config.json; remove it or pick another path")
    start = time.perf_counter()
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    num_params = save_random_model(tmp, arch, num_layers)
    build_tokenizer(spec.special_tokens, spec.eos, spec.pad).save_pretrained(tmp)
    try:
        os.replace(tmp, path)  # atomic: a half-written checkpoint is never reused
    except OSError:  # another process finished first: keep its checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise
    print(f"built a random-weight {arch} with {want_layers} layers ({num_params:,} parameters) at {path} "
          f"in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return path


def build_qwen3_0_6b(path: str) -> str:
    """Save a random bf16 Qwen3-0.6B with a tokenizer to path (reused if already built); returns the path."""
    return build_random_checkpoint(path, "qwen3-0.6b")


def resolve_model(model: str, cache_dir: str = DEFAULT_CACHE_DIR, in_child_process: bool = False
                  ) -> tuple[str, bool]:
    """(model dir to use, whether it has random weights): model if it exists, else the cached random checkpoint.
    in_child_process: build it in a child process, so the caller never touches a GPU (benchmark drivers whose
    replicas or server need all of it)."""
    model = os.path.expanduser(model)
    if os.path.isdir(model):
        return model, False
    print(f"model directory {model!r} not found: BENCHMARKING RANDOM WEIGHTS (Qwen3-0.6B's exact configuration "
          f"and shapes; throughput does not depend on the weights' values)", file=sys.stderr)
    if not in_child_process:
        return build_qwen3_0_6b(cache_dir), True
    path = os.path.expanduser(cache_dir)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-m", "nanovllm.testing.random_checkpoint", path], cwd=package_root, check=True)
    return path, True


def _arch(arch: str) -> RandomArch:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
    return ARCHS[arch]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help=f"where to save (default for qwen3-0.6b: {DEFAULT_CACHE_DIR}; "
                        "other archs: ~/.cache/nanovllm/random-<arch>[-<N>l])")
    parser.add_argument("--arch", default="qwen3-0.6b", choices=list(ARCHS), help="(default: %(default)s)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    args = parser.parse_args(argv)
    path = args.path
    if path is None:
        suffix = f"-{args.layers}l" if args.layers is not None else ""
        path = DEFAULT_CACHE_DIR if args.arch == "qwen3-0.6b" else \
            os.path.join("~", ".cache", "nanovllm", f"random-{args.arch}{suffix}")
    try:
        print(build_random_checkpoint(path, args.arch, args.layers))
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
