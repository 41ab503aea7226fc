"""Tiny random checkpoints (config.json + model.safetensors [+ tokenizer]) for tests: Qwen3, Llama, Qwen2 and
Qwen3-MoE."""
import json
import os
from collections.abc import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["hello world, the quick brown fox jumps over the lazy dog.",
          "introduce yourself and list all prime numbers within 100: 2 3 5 7 11 13 17 19 23 29",
          "nano vllm is a small inference engine; it schedules, caches and samples tokens."] * 20


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def make_checkpoint(path: str, *, vocab_size: int = 320, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16, intermediate_size: int = 96,
                    tie: bool = False, attention_bias: bool = False, max_position_embeddings: int = 1024,
                    dtype: torch.dtype = torch.float32, seed: int = 0, tokenizer: bool = True,
                    initializer_range: float = 0.1) -> str:
    """Save a random Qwen3 checkpoint to path and return path."""
    eos = save_tokenizer(path, vocab_size) if tokenizer else None
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                         intermediate_size=intermediate_size, tie_word_embeddings=tie,
                         attention_bias=attention_bias, max_position_embeddings=max_position_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         initializer_range=initializer_range, eos_token_id=eos if eos is not None else 1,
                         bos_token_id=None, pad_token_id=None)
    return save_random_model(path, config, Qwen3ForCausalLM, dtype, seed)


def make_llama_checkpoint(path: str, *, vocab_size: int = 333, hidden_size: int = 72, num_layers: int = 2,
                          num_heads: int = 6, num_kv_heads: int = 2, head_dim: int = 16,
                          intermediate_size: int = 120, tie: bool = False, attention_bias: bool = False,
                          mlp_bias: bool = False, rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                          max_position_embeddings: int = 1024, dtype: torch.dtype = torch.float32, seed: int = 0,
                          tokenizer: bool = False, initializer_range: float = 0.1) -> str:
    """Save a random Llama checkpoint (hidden_size need not be num_heads * head_dim); rope_scaling: e.g.
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64}."""
    eos = save_tokenizer(path, vocab_size) if tokenizer else None
    rope = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                         intermediate_size=intermediate_size, tie_word_embeddings=tie,
                         attention_bias=attention_bias, mlp_bias=mlp_bias, rope_parameters=rope,
                         max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
                         eos_token_id=eos if eos is not None else 1, bos_token_id=None, pad_token_id=None)
    return save_random_model(path, config, LlamaForCausalLM, dtype, seed)


def make_qwen2_checkpoint(path: str, *, vocab_size: int = 301, num_layers: int = 2, num_heads: int = 6,
                          num_kv_heads: int = 2, head_dim: int = 16, intermediate_size: int = 88,
                          tie: bool = False, sliding_window: int | None = 64, max_position_embeddings: int = 1024,
                          dtype: torch.dtype = torch.float32, seed: int = 0, tokenizer: bool = False,
                          initializer_range: float = 0.1) -> str:
    """Save a random Qwen2 checkpoint (hidden_size = num_heads * head_dim, as Qwen2 derives head_dim). Like
    Qwen2.5's configs it carries sliding_window with use_sliding_window=false (full attention)."""
    eos = save_tokenizer(path, vocab_size) if tokenizer else None
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=num_heads * head_dim, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         intermediate_size=intermediate_size, tie_word_embeddings=tie, use_sliding_window=False,
                         sliding_window=sliding_window, max_window_layers=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
                         eos_token_id=eos if eos is not None else 1, bos_token_id=None, pad_token_id=None)
    save_random_model(path, config, Qwen2ForCausalLM, dtype, seed)
    if sliding_window is not None:  # transformers 5 writes null and a layer_types list; write it as Qwen2.5 does
        edit_config_json(path, lambda c: (c.pop("layer_types", None), c.update(sliding_window=sliding_window)))
    return path


def make_qwen3_moe_checkpoint(path: str, *, vocab_size: int = 313, hidden_size: int = 48, num_layers: int = 3,
                              num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16,
                              intermediate_size: int = 72, moe_intermediate_size: int = 40, num_experts: int = 7,
                              top_k: int = 3, norm_topk_prob: bool = True, decoder_sparse_step: int = 1,
                              mlp_only_layers: tuple[int, ...] = (1,), tie: bool = False,
                              attention_bias: bool = False, max_position_embeddings: int = 1024,
                              dtype: torch.dtype = torch.float32, seed: int = 0, tokenizer: bool = False,
                              initializer_range: float = 0.1, router_std: float | None = None,
                              fused_experts: bool = False) -> str:
    """Save a random Qwen3-MoE checkpoint. router_std: the router weights' std (default initializer_range; larger
    makes routing decisive). fused_experts: store experts as fused [E, 2I, H] / [E, H, I] tensors
    (save_original_format=False) instead of HF's default per-expert tensors."""
    eos = save_tokenizer(path, vocab_size) if tokenizer else None
    config = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                            intermediate_size=intermediate_size, moe_intermediate_size=moe_intermediate_size,
                            num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
                            decoder_sparse_step=decoder_sparse_step, mlp_only_layers=list(mlp_only_layers),
                            tie_word_embeddings=tie, attention_bias=attention_bias,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                            max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
                            eos_token_id=eos if eos is not None else 1, bos_token_id=None, pad_token_id=None)

    def scale_router(model: torch.nn.Module) -> None:
        if router_std is not None:
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.normal_(0, router_std)
    return save_random_model(path, config, Qwen3MoeForCausalLM, dtype, seed, adjust=scale_router,
                             save_original_format=not fused_experts)


def edit_config_json(path: str, edit: Callable[[dict], object]) -> None:
    """Apply edit to the saved config.json's dict in place."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    edit(config)
    with open(file, "w") as f:
        json.dump(config, f, indent=2)


def save_tokenizer(path: str, vocab_size: int) -> int:
    """Train and save the test tokenizer; returns its eos id."""
    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    tok.save_pretrained(path)
    return tok.eos_token_id


def save_random_model(path: str, config: PretrainedConfig, model_cls: type, dtype: torch.dtype, seed: int,
                      adjust: Callable[[torch.nn.Module], None] | None = None, **save_kwargs) -> str:
    """Initialise model_cls(config) from `seed` (biases, which HF zeroes, drawn from N(0, 0.5) so they matter),
    let `adjust` edit the weights, and save it to path."""
    os.makedirs(path, exist_ok=True)
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
        if adjust is not None:
            adjust(model)
    model.save_pretrained(path, **save_kwargs)
    return path
