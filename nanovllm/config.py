import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import AutoConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Config:
    """Engine settings. `LLM(model, **kwargs)` matches kwargs against these fields."""
    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
    device: str = "auto"            # "auto" = cuda when available, else cpu
    dtype: str = "auto"             # "auto" = the checkpoint's dtype
    attention_backend: str = "auto"  # "auto", "flash_attn", "triton" or "torch"
    hf_config: Any = field(default=None, init=False)
    eos: int = field(default=-1, init=False)

    def __post_init__(self) -> None:
        self._check_model_dir()
        self._check_numbers()
        self.hf_config = AutoConfig.from_pretrained(self.model)
        self._check_architecture()
        self.device = resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.hf_config)
        self._check_parallelism()
        from nanovllm.layers.attention import select_attention_backend
        self.attention_backend = select_attention_backend(self.attention_backend, self.device)
        self._check_block_size()
        self.max_model_len = min(self.max_model_len, self.hf_config.max_position_embeddings)
        eos = self.hf_config.eos_token_id
        self.eos = (eos[0] if isinstance(eos, list) and eos else eos) if eos is not None else -1

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "Config":
        valid = [f.name for f in fields(cls) if f.init and f.name != "model"]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(f"unknown engine argument(s) {unknown}; valid ones are {valid}")
        return cls(model, **kwargs)

    def _check_model_dir(self) -> None:
        model = os.path.expanduser(str(self.model))
        if not os.path.isdir(model):
            hint = ""
            if HUB_ID.match(str(self.model)):
                hint = (f" It looks like a Hugging Face hub id; download it first with "
                        f"`huggingface-cli download {self.model} --local-dir <dir>` and pass <dir>.")
            raise FileNotFoundError(f"model directory {self.model!r} does not exist.{hint}")
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"model directory {self.model!r} has no config.json; "
                                    "pass a Hugging Face checkpoint directory")
        self.model = model

    def _check_numbers(self) -> None:
        positive = ("max_num_batched_tokens", "max_num_seqs", "max_model_len")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not isinstance(self.tensor_parallel_size, int) or not 1 <= self.tensor_parallel_size <= 8:
            raise ValueError(f"tensor_parallel_size must be an integer in 1..8, got {self.tensor_parallel_size!r}")
        if not isinstance(self.num_kvcache_blocks, int) or (self.num_kvcache_blocks < 1
                                                             and self.num_kvcache_blocks != -1):
            raise ValueError(f"num_kvcache_blocks must be -1 (size from memory) or >= 1, "
                             f"got {self.num_kvcache_blocks!r}")

    def _check_architecture(self) -> None:
        from nanovllm.models import MODEL_REGISTRY
        archs = getattr(self.hf_config, "architectures", None) or []
        if not any(a in MODEL_REGISTRY for a in archs):
            raise ValueError(f"model {self.model!r} has architectures {archs} (model_type "
                             f"{getattr(self.hf_config, 'model_type', None)!r}); supported: {sorted(MODEL_REGISTRY)}")

    def _check_parallelism(self) -> None:
        tp = self.tensor_parallel_size
        heads = self.hf_config.num_attention_heads
        kv_heads = self.hf_config.num_key_value_heads
        if heads % tp or kv_heads % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide num_attention_heads={heads} "
                             f"and num_key_value_heads={kv_heads}")
        if self.device == "cuda" and tp > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={tp} exceeds the {torch.cuda.device_count()} visible GPU(s)")

    def _check_block_size(self) -> None:
        bs = self.kvcache_block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise ValueError(f"kvcache_block_size must be a power of two >= 16, got {bs!r}")
        if self.attention_backend == "flash_attn" and bs % 256:
            raise ValueError(f"kvcache_block_size={bs} must be a multiple of 256 with the flash_attn backend "
                             "(a flash-attn paged-KV requirement); use 256 or attention_backend='triton'")


def head_dim_of(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; use device='cpu'")
    return device


def resolve_dtype(dtype: str, hf_config: Any) -> str:
    if dtype == "auto":
        found = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        dtype = str(found).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype
