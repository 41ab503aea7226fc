"""Tiny random Qwen3 checkpoints (config.json + model.safetensors + tokenizer) for tests."""
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

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
    os.makedirs(path, exist_ok=True)
    eos = None
    if tokenizer:
        tok = build_tokenizer(vocab_size)
        tok.save_pretrained(path)
        eos = tok.eos_token_id
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                         intermediate_size=intermediate_size, tie_word_embeddings=tie,
                         attention_bias=attention_bias, max_position_embeddings=max_position_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         initializer_range=initializer_range, eos_token_id=eos if eos is not None else 1,
                         bos_token_id=None, pad_token_id=None)
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(dtype)
    if attention_bias:  # HF initialises biases to zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(path)
    return path
