import os

import torch

# Without a GPU, Triton kernels run in the CPU interpreter; this must be set before anything imports
# triton (transformers does), or triton's builtins bind in compiled mode.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from nanovllm.testing import make_checkpoint  # noqa: E402


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


TRAINED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                             "tiny-qwen3-stdlib")


@pytest.fixture(scope="session")
def trained_model() -> str:
    """The small trained Qwen3 shipped with the project (peaked, real distributions; a chat template)."""
    return TRAINED_MODEL
