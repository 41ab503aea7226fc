"""Engine settings: what the user passed, validated, with the values derived from it resolved once.

`Config` is frozen. `__post_init__` checks every field (a ValueError names the field, the value and the fix),
reads the checkpoint's config.json, and replaces "auto" choices (device, dtype, attention backend, KV-cache dtype)
and an over-long max_model_len with what will actually be used; nothing changes it afterwards.
"""
import importlib.util
import numbers
import os
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from nanovllm.models import check_model_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # "auto": the model's dtype; fp8: float8 e4m3 with per-token scales
ATTENTION_BACKENDS = ("flash_attn", "triton", "torch")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Config:
    """`LLM(model, **kwargs)` matches kwargs against these fields; unknown ones are refused."""
    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096            # clamped (with a warning) to the model's max_position_embeddings
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False          # no CUDA graphs
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1         # -1: as many as fit in memory
    device: str = "auto"                 # "auto" = cuda when available, else cpu
    dtype: str = "auto"                  # "auto" = the checkpoint's dtype
    attention_backend: str = "auto"      # "auto", "flash_attn", "triton" or "torch"
    async_scheduling: bool = True        # schedule step N+1 while step N runs (False: the plain serial loop)
    kv_cache_dtype: str = "auto"         # "auto" (the model's dtype), "fp8" / "fp8_e4m3" (half the bytes)
    # Advanced knobs, all in one place.
    max_cuda_graph_batch_size: int = 512  # decode batches up to this replay CUDA graphs
    cpu_kvcache_bytes: int = 512 << 20   # KV-cache budget on CPU when num_kvcache_blocks is -1
    dist_timeout_s: float = 180.0        # a collective waiting on a dead NCCL peer gives up after this
    worker_start_timeout_s: float = 600.0  # tensor-parallel workers must be up within this
    hf_config: PretrainedConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_types()
        set_ = object.__setattr__  # frozen: derived values are set here, once
        set_(self, "model", checked_model_dir(self.model))
        hf_config = AutoConfig.from_pretrained(self.model)
        check_model_config(hf_config, self.model)
        set_(self, "hf_config", hf_config)
        set_(self, "device", resolve_device(self.device))
        set_(self, "dtype", resolve_dtype(self.dtype, hf_config))
        self._check_parallelism()
        set_(self, "kv_cache_dtype", "fp8" if self.kv_cache_dtype == "fp8_e4m3" else self.kv_cache_dtype)
        set_(self, "attention_backend", resolve_attention_backend(self.attention_backend, self.device,
                                                                  self.kv_cache_dtype))
        self._check_block_size()
        limit = hf_config.max_position_embeddings
        if self.max_model_len > limit:
            if self.max_model_len != Config.max_model_len:  # the default is clamped silently
                warnings.warn(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                              f"{limit}; using {limit}", stacklevel=4)
            set_(self, "max_model_len", limit)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "Config":
        valid = [f.name for f in fields(cls) if f.init and f.name != "model"]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(f"unknown engine argument(s) {unknown}; valid ones are {valid}")
        return cls(model, **kwargs)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8" else self.torch_dtype

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.kvcache_block_size)

    # -- checks -----------------------------------------------------------------------------------------------
    def _check_types(self) -> None:
        positive = ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "max_cuda_graph_batch_size",
                    "cpu_kvcache_bytes")
        for name in positive:
            set_int(self, name, minimum=1)
        set_int(self, "tensor_parallel_size", minimum=1, maximum=8)
        set_int(self, "kvcache_block_size", minimum=1)
        set_int(self, "num_kvcache_blocks", minimum=-1)
        if self.num_kvcache_blocks == 0:
            raise ValueError("num_kvcache_blocks must be -1 (size from memory) or >= 1, got 0")
        utilization = real_number(self, "gpu_memory_utilization")
        if not 0 < utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization!r}")
        for name in ("dist_timeout_s", "worker_start_timeout_s"):
            if real_number(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("enforce_eager", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("model", "device", "dtype", "attention_backend", "kv_cache_dtype"):
            if not isinstance(getattr(self, name), (str, os.PathLike)):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")

    def _check_parallelism(self) -> None:
        tp = self.tensor_parallel_size
        heads, kv_heads = self.hf_config.num_attention_heads, self.hf_config.num_key_value_heads
        if heads % tp or kv_heads % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide num_attention_heads={heads} "
                             f"and num_key_value_heads={kv_heads}")
        if self.device == "cuda" and tp > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={tp} exceeds the {torch.cuda.device_count()} visible GPU(s)")

    def _check_block_size(self) -> None:
        bs = self.kvcache_block_size
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"kvcache_block_size must be a power of two >= 16, got {bs!r}")
        if self.attention_backend == "flash_attn" and bs % 256:
            raise ValueError(f"kvcache_block_size={bs} must be a multiple of 256 with the flash_attn backend "
                             "(a flash-attn paged-KV requirement); use 256 or attention_backend='triton'")


def set_int(config: Config, name: str, minimum: int, maximum: int | None = None) -> None:
    """Check an integer field (numpy integers accepted, bools refused) and store it as a plain int."""
    value = getattr(config, name)
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        bound = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    object.__setattr__(config, name, int(value))


def real_number(config: Config, name: str) -> float:
    value = getattr(config, name)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def checked_model_dir(model: str | os.PathLike) -> str:
    """The checkpoint directory as an absolute path; FileNotFoundError saying what is wrong and what to do."""
    path = os.path.abspath(os.path.expanduser(os.fspath(model)))
    if os.path.isfile(path):
        raise FileNotFoundError(f"model {model!r} is a file, not a directory; pass the checkpoint directory that "
                                f"holds it ({os.path.dirname(path)!r})")
    if not os.path.isdir(path):
        hint = ""
        if HUB_ID.match(str(model)):
            hint = (f" It looks like a Hugging Face hub id; download it first with `hf download {model} --local-dir "
                    f"<dir>` (or `huggingface-cli download {model} --local-dir <dir>`) and pass <dir>.")
        raise FileNotFoundError(f"model directory {model!r} does not exist.{hint}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model directory {model!r} has no config.json; pass a Hugging Face checkpoint "
                                "directory")
    return path


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; use device='cpu'")
    return device


def resolve_dtype(dtype: str, hf_config: PretrainedConfig) -> str:
    if dtype == "auto":
        found = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        dtype = str(found).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention_backend(requested: str, device: str, kv_cache_dtype: str = "auto") -> str:
    if requested == "auto":
        if device != "cuda":
            return "torch"
        return "flash_attn" if flash_attn_available() and kv_cache_dtype == "auto" else "triton"
    if requested == "flash_attn" and kv_cache_dtype != "auto":
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs our kernels: flash-attn cannot read the fp8 cache "
                         "with per-token scales; use attention_backend='triton' (or 'auto')")
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be 'auto' or one of {list(ATTENTION_BACKENDS)}, got {requested!r}")
    if requested != "torch" and device != "cuda":
        raise ValueError(f"attention_backend={requested!r} needs device='cuda'; use 'torch' on {device}")
    if requested == "flash_attn" and not flash_attn_available():
        raise ValueError("attention_backend='flash_attn' but flash_attn is not installed; "
                         "`pip install nano-vllm[flash-attn]` or use attention_backend='triton'")
    return requested
