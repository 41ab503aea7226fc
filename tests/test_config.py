"""Config and SamplingParams validation: clear exceptions naming the bad value, upstream defaults kept."""
import dataclasses
import os
import re

import numpy as np
import pytest
import torch

from nanovllm.config import Config
from nanovllm.sampling_params import SamplingParams


# -- model directory -------------------------------------------------------------------------------------
def test_missing_model_dir_raises_file_not_found_with_hub_hint():
    """A hub id instead of a local directory fails loudly and says how to download it (upstream #97)."""
    with pytest.raises(FileNotFoundError) as err:
        Config("Qwen/Qwen3-0.6B-definitely-not-here")
    message = str(err.value)
    assert "Qwen/Qwen3-0.6B-definitely-not-here" in message
    assert "hub id" in message and "download" in message


def test_missing_plain_path_has_no_hub_hint(tmp_path):
    """A missing path that does not look like a hub id names the path without the download hint."""
    missing = str(tmp_path / "nowhere" / "model")
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        Config(missing)
    assert "hub id" not in str(err.value)


def test_dir_without_config_json_raises(tmp_path):
    """An existing directory that is not a checkpoint (no config.json) is rejected."""
    with pytest.raises(FileNotFoundError, match="config.json"):
        Config(str(tmp_path))


def test_valid_model_dir_loads_hf_config(tiny_model):
    """A real checkpoint directory loads its hf_config; the path is stored absolute."""
    config = Config(tiny_model)
    assert config.hf_config.num_hidden_layers == 2
    assert os.path.isabs(config.model)


def test_config_is_frozen_with_derived_values_resolved_once(tiny_model):
    """Nothing changes a Config after construction; "auto" choices are resolved in it."""
    config = Config(tiny_model, device="auto", dtype="auto")
    assert config.device in ("cpu", "cuda") and config.dtype == "float32" and config.attention_backend != "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_model_len = 8


def test_explicit_max_model_len_over_the_model_limit_warns_and_clamps(tiny_model):
    with pytest.warns(UserWarning, match="max_model_len=2048 exceeds the model's max_position_embeddings=1024"):
        assert Config(tiny_model, max_model_len=2048).max_model_len == 1024


def test_model_path_that_is_a_file_says_so(tiny_model):
    with pytest.raises(FileNotFoundError, match="is a file, not a directory; pass the checkpoint directory"):
        Config(os.path.join(tiny_model, "config.json"))


@pytest.mark.parametrize("field,value", [("gpu_memory_utilization", "0.5"), ("gpu_memory_utilization", True),
                                         ("tensor_parallel_size", True), ("tensor_parallel_size", 2.0),
                                         ("max_num_seqs", "8"), ("kvcache_block_size", 16.0),
                                         ("enforce_eager", 1), ("async_scheduling", "yes"), ("device", 0)])
def test_values_of_the_wrong_type_name_the_field_and_value(tiny_model, field, value):
    """Bug 12: a str or bool where a number belongs (and vice versa) is a ValueError naming field and value."""
    with pytest.raises(ValueError, match=rf"{field} must be .*{re.escape(repr(value))}"):
        Config(tiny_model, **{field: value})


def test_numpy_integers_are_accepted_as_integers(tiny_model):
    config = Config(tiny_model, max_num_seqs=np.int64(8), kvcache_block_size=np.int32(16))
    assert config.max_num_seqs == 8 and type(config.max_num_seqs) is int


def test_defaults_match_upstream(tiny_model):
    """Upstream's field defaults are kept (max_model_len is clamped separately)."""
    config = Config(tiny_model)
    assert config.max_num_batched_tokens == 16384
    assert config.max_num_seqs == 512
    assert config.gpu_memory_utilization == 0.9
    assert config.tensor_parallel_size == 1
    assert config.enforce_eager is False
    assert config.kvcache_block_size == 256
    assert config.num_kvcache_blocks == -1


# -- keywords ---------------------------------------------------------------------------------------------
def test_from_kwargs_rejects_unknown_keyword_by_name(tiny_model):
    """Unknown engine keywords were silently ignored upstream; we raise a ValueError naming them."""
    with pytest.raises(ValueError, match="max_num_sequences"):
        Config.from_kwargs(tiny_model, max_num_sequences=4)


def test_from_kwargs_rejects_init_false_fields(tiny_model):
    """hf_config is derived, not a settable keyword."""
    with pytest.raises(ValueError, match="hf_config"):
        Config.from_kwargs(tiny_model, hf_config=3)


def test_from_kwargs_accepts_known_keywords(tiny_model):
    """Known keywords pass through to the dataclass fields."""
    config = Config.from_kwargs(tiny_model, max_num_seqs=7, kvcache_block_size=32, enforce_eager=True)
    assert (config.max_num_seqs, config.kvcache_block_size, config.enforce_eager) == (7, 32, True)


# -- numbers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp", [0, 9, -1])
def test_tensor_parallel_size_outside_1_to_8_rejected(tiny_model, tp):
    """tensor_parallel_size must be in 1..8; the message names the value."""
    with pytest.raises(ValueError, match=rf"tensor_parallel_size.*1\.\.8.*{tp}"):
        Config(tiny_model, tensor_parallel_size=tp)


@pytest.mark.parametrize("block_size", [8, 48, 100, 0, -16])
def test_bad_block_size_rejected(tiny_model, block_size):
    """kvcache_block_size must be a power of two >= 16; the message names the value."""
    with pytest.raises(ValueError, match=f"kvcache_block_size.*{block_size}"):
        Config(tiny_model, kvcache_block_size=block_size)


@pytest.mark.parametrize("block_size", [16, 32, 64, 256])
def test_small_power_of_two_block_sizes_accepted_on_torch_backend(tiny_model, block_size):
    """Without flash-attn any power of two >= 16 works (tests use small blocks)."""
    config = Config(tiny_model, device="cpu", kvcache_block_size=block_size)
    assert config.attention_backend == "torch"
    assert config.kvcache_block_size == block_size


@pytest.mark.parametrize("utilization", [0, 0.0, -0.1, 1.01, 2])
def test_gpu_memory_utilization_outside_unit_interval_rejected(tiny_model, utilization):
    """gpu_memory_utilization must lie in (0, 1]."""
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        Config(tiny_model, gpu_memory_utilization=utilization)


def test_gpu_memory_utilization_one_accepted(tiny_model):
    """The closed upper end 1.0 is allowed."""
    assert Config(tiny_model, gpu_memory_utilization=1.0).gpu_memory_utilization == 1.0


@pytest.mark.parametrize("name", ["max_num_batched_tokens", "max_num_seqs", "max_model_len"])
@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_limits_rejected(tiny_model, name, value):
    """Token, sequence and length limits must be positive; the message names the field."""
    with pytest.raises(ValueError, match=name):
        Config(tiny_model, **{name: value})


@pytest.mark.parametrize("value", [0, -2])
def test_bad_num_kvcache_blocks_rejected(tiny_model, value):
    """num_kvcache_blocks is -1 (size from memory) or a positive count."""
    with pytest.raises(ValueError, match="num_kvcache_blocks"):
        Config(tiny_model, num_kvcache_blocks=value)


def test_max_model_len_clamped_to_max_position_embeddings(tiny_model):
    """max_model_len larger than the model's max_position_embeddings (1024 here) is clamped to it."""
    config = Config(tiny_model, max_model_len=4096)
    assert config.hf_config.max_position_embeddings == 1024
    assert config.max_model_len == 1024


def test_max_model_len_below_limit_kept(tiny_model):
    """A max_model_len within the model's limit is kept as given."""
    assert Config(tiny_model, max_model_len=100).max_model_len == 100


# -- device and dtype -------------------------------------------------------------------------------------
def test_device_auto_resolves_to_available_device(tiny_model):
    """device='auto' is cuda when available, else cpu."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert Config(tiny_model).device == expected


def test_cpu_device_selects_torch_backend(tiny_model):
    """On cpu the 'auto' attention backend is the torch one."""
    assert Config(tiny_model, device="cpu").attention_backend == "torch"


def test_unknown_device_rejected(tiny_model):
    """Only 'auto', 'cpu' and 'cuda' are devices."""
    with pytest.raises(ValueError, match="tpu"):
        Config(tiny_model, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_rejected(tiny_model):
    """Asking for cuda where there is none is a clear error, not a crash later."""
    with pytest.raises(ValueError, match="CUDA is not available"):
        Config(tiny_model, device="cuda")


def test_dtype_auto_takes_checkpoint_dtype(tiny_model, tiny_model_factory):
    """dtype='auto' resolves to the checkpoint's own dtype."""
    assert Config(tiny_model).dtype == "float32"
    assert Config(tiny_model).torch_dtype == torch.float32
    bf16 = tiny_model_factory(dtype=torch.bfloat16, tokenizer=False)
    assert Config(bf16).dtype == "bfloat16"


def test_explicit_dtype_kept(tiny_model):
    """An explicit dtype overrides the checkpoint's."""
    config = Config(tiny_model, dtype="float16")
    assert config.dtype == "float16" and config.torch_dtype == torch.float16


def test_unknown_dtype_rejected(tiny_model):
    """An unknown dtype name is rejected by name."""
    with pytest.raises(ValueError, match="fp8"):
        Config(tiny_model, dtype="fp8")


# -- SamplingParams ---------------------------------------------------------------------------------------
def test_sampling_params_defaults_match_upstream():
    """SamplingParams(temperature=1.0, max_tokens=64, ignore_eos=False)."""
    sp = SamplingParams()
    assert (sp.temperature, sp.max_tokens, sp.ignore_eos) == (1.0, 64, False)


def test_temperature_zero_allowed_as_greedy():
    """Upstream forbade temperature 0; we allow it and it means greedy."""
    assert SamplingParams(temperature=0).temperature == 0
    assert SamplingParams(temperature=0.0).temperature == 0.0


@pytest.mark.parametrize("temperature", [-0.01, -1])
def test_negative_temperature_rejected(temperature):
    """temperature < 0 raises a ValueError naming the value."""
    with pytest.raises(ValueError, match=f"temperature.*{temperature}"):
        SamplingParams(temperature=temperature)


@pytest.mark.parametrize("max_tokens", [0, -1])
def test_max_tokens_below_one_rejected(max_tokens):
    """max_tokens < 1 raises a ValueError naming the value."""
    with pytest.raises(ValueError, match=f"max_tokens.*{max_tokens}"):
        SamplingParams(max_tokens=max_tokens)


def test_max_tokens_one_accepted():
    """max_tokens=1 (a single sampled token) is valid."""
    assert SamplingParams(max_tokens=1).max_tokens == 1
