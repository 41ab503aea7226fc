"""Load every *.safetensors in a model directory through per-parameter weight_loaders."""
import glob
import os
from collections import defaultdict

import torch
from safetensors import safe_open
from torch import nn

from nanovllm.engine.errors import CheckpointError

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit parameter "
                         f"of shape {tuple(param.shape)}")
    param.data.copy_(loaded_weight)


def expected_shards(model: nn.Module) -> dict[str, set]:
    """Packed parameter name part -> the shard ids it must receive (e.g. qkv_proj -> {q, k, v})."""
    shards = defaultdict(set)
    for target, shard_id in getattr(model, "packed_modules_mapping", {}).values():
        shards[target].add(shard_id)
    return shards


def resolve(model: nn.Module, name: str) -> tuple[str, object]:
    """Checkpoint name -> (our parameter name, shard id or None)."""
    for source, (target, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        if source in name:
            return name.replace(source, target), shard_id
    return name, None


def load_model(model: nn.Module, path: str) -> None:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in model directory {path!r}")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded, homeless = defaultdict(set), []
    for file in files:
        try:
            load_file(model, params, file, loaded, homeless)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            raise CheckpointError(f"cannot read checkpoint file {file!r} ({type(e).__name__}: {e}); the file is "
                                  "corrupt or incomplete: download it again") from e
    if homeless:
        raise CheckpointError(f"checkpoint tensors in {path!r} with no matching model parameter: {homeless[:8]}"
                              f"{' ...' if len(homeless) > 8 else ''}")
    check_all_loaded(model, params, loaded, path)


def load_file(model: nn.Module, params: dict, file: str, loaded: dict[str, set], homeless: list[str]) -> None:
    tied = getattr(model, "tie_word_embeddings", False)
    with safe_open(file, "pt", "cpu") as f:
        for name in f.keys():
            if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            param_name, shard_id = resolve(model, name)
            param = params.get(param_name)
            if param is None:
                homeless.append(name)
                continue
            loader = getattr(param, "weight_loader", default_weight_loader)
            tensor = f.get_tensor(name)
            try:
                covered = loader(param, tensor) if shard_id is None else loader(param, tensor, shard_id)
            except ValueError as e:  # name the tensor: the layer's message only has shapes
                raise CheckpointError(f"checkpoint tensor {name!r} in {file!r}: {e}") from e
            # a loader may return the shard ids it filled (one fused tensor holding every expert's parts)
            loaded[param_name].update(covered if isinstance(covered, set) else {shard_id})


def check_all_loaded(model: nn.Module, params: dict, loaded: dict[str, set], path: str) -> None:
    shards = expected_shards(model)
    missing = []
    for name in params:
        if name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False):
            name = "model.embed_tokens.weight"
        part = next((p for p in shards if f".{p}." in name), None)
        want = shards[part] if part else {None}
        if not want <= loaded.get(name, set()):
            missing.append(name)
    if missing:
        raise CheckpointError(f"model parameters not found in the checkpoint {path!r}: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
