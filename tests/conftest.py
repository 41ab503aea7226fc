import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from checkpoints import make_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A float32 random Qwen3 with a tokenizer (untied embeddings, no attention bias)."""
    return make_checkpoint(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Build (once per argument set) tiny checkpoints with other settings."""
    cache = {}

    def build(**kwargs) -> str:
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = make_checkpoint(str(tmp_path_factory.mktemp("ckpt")), **kwargs)
        return cache[key]
    return build
