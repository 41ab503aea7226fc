"""utils/loader.py: every checkpoint tensor finds a home and every parameter gets loaded, or a clear
ValueError names the culprit; tied embeddings; attention biases (incl. the row-parallel o_proj bias,
upstream #203) load, and the model's full-sequence hidden states and logits equal HF's."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig
from transformers import Qwen3ForCausalLM as HFQwen3

from nanovllm import LLM
from nanovllm.distributed.tp import TPInfo
from nanovllm.layers.attention import Attention, LayerKVCache, make_backend
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.context import Context, forward_context, get_context
from nanovllm.utils.loader import load_model

BLOCK = 16


def copy_checkpoint(src: str, dst) -> str:
    dst = str(dst)
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), dst)
    return dst


def edit_weights(path: str, edit) -> str:
    """Rewrite path/model.safetensors as edit(tensors)."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def build_model(path: str) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(AutoConfig.from_pretrained(path), TPInfo(), make_backend("torch"))


def loaded_model(path: str) -> Qwen3ForCausalLM:
    model = build_model(path)
    load_model(model, path)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

def test_extra_tensor_raises_naming_it(tiny_model_factory, tmp_path):
    """A checkpoint tensor with no matching parameter is an error naming the tensor (upstream ignores it)."""
    path = copy_checkpoint(tiny_model_factory(tokenizer=False), tmp_path)
    edit_weights(path, lambda t: t.__setitem__("model.layers.0.mlp.extra_proj.weight", torch.zeros(4, 4)))
    with pytest.raises(ValueError, match=r"no matching model parameter.*model\.layers\.0\.mlp\.extra_proj\.weight"):
        load_model(build_model(path), path)


def test_extra_tensor_in_a_second_file_raises_through_llm(tiny_model_factory, tmp_path):
    """Every *.safetensors file is read: a homeless tensor in a second shard makes LLM(...) fail clearly."""
    path = copy_checkpoint(tiny_model_factory(tokenizer=False), tmp_path)
    save_file({"model.bogus.weight": torch.zeros(3)}, os.path.join(path, "extra.safetensors"))
    with pytest.raises(ValueError, match=r"model\.bogus\.weight"):
        LLM(path, kvcache_block_size=BLOCK, num_kvcache_blocks=4)


@pytest.mark.parametrize("tensor, param", [
    ("model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"),
    ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.qkv_proj.weight"),
    ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
])
def test_missing_tensor_raises_naming_the_parameter(tiny_model_factory, tmp_path, tensor, param):
    """A parameter (or one shard of a packed qkv / gate_up parameter) absent from the checkpoint is an
    error naming the parameter, instead of leaving uninitialised memory."""
    path = copy_checkpoint(tiny_model_factory(tokenizer=False), tmp_path)
    edit_weights(path, lambda t: t.pop(tensor))
    with pytest.raises(ValueError, match=r"not found in the checkpoint.*" + param.replace(".", r"\.")):
        load_model(build_model(path), path)


def test_wrong_shape_raises_naming_the_tensor(tiny_model_factory, tmp_path):
    """A tensor of the wrong shape is a ValueError naming the tensor and both shapes."""
    path = copy_checkpoint(tiny_model_factory(tokenizer=False), tmp_path)
    edit_weights(path, lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight", torch.zeros(64, 95)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\(64, 95\)"):
        load_model(build_model(path), path)


def test_directory_without_safetensors_raises(tmp_path, tiny_model_factory):
    """No *.safetensors in the directory is a FileNotFoundError, not a silently random model."""
    path = copy_checkpoint(tiny_model_factory(tokenizer=False), tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(build_model(path), path)


# ----------------------------------------------------------------------------------------------
# Successful loads
# ----------------------------------------------------------------------------------------------

def test_every_parameter_equals_the_checkpoint(tiny_model_factory):
    """Packed qkv / gate_up parameters are the concatenation of their checkpoint shards; others copy."""
    path = tiny_model_factory(tokenizer=False)
    model = loaded_model(path)
    ref = load_file(os.path.join(path, "model.safetensors"))
    params = dict(model.named_parameters())
    for i in range(2):
        pre = f"model.layers.{i}."
        qkv = torch.cat([ref[pre + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(params[pre + "self_attn.qkv_proj.weight"], qkv)
        gate_up = torch.cat([ref[pre + "mlp.gate_proj.weight"], ref[pre + "mlp.up_proj.weight"]])
        assert torch.equal(params[pre + "mlp.gate_up_proj.weight"], gate_up)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.q_norm.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(params[name], ref[name])


@pytest.mark.parametrize("with_lm_head", [False, True])
def test_tied_embeddings_load_with_or_without_lm_head(tiny_model_factory, tmp_path, with_lm_head):
    """Tied embeddings: the LM head shares the embedding whether or not the file holds lm_head.weight."""
    path = copy_checkpoint(tiny_model_factory(tie=True, tokenizer=False), tmp_path)
    embed = load_file(os.path.join(path, "model.safetensors"))["model.embed_tokens.weight"]
    if with_lm_head:
        edit_weights(path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model = loaded_model(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, embed)


def test_attention_biases_load_including_o_proj(tiny_model_factory):
    """attention_bias=True: q/k/v biases land in the packed qkv bias and the row-parallel o_proj bias
    loads too (upstream #203); q/k norms are kept, as in HF."""
    path = tiny_model_factory(attention_bias=True, tokenizer=False)
    model = loaded_model(path)
    ref = load_file(os.path.join(path, "model.safetensors"))
    attn = model.model.layers[1].self_attn
    pre = "model.layers.1.self_attn."
    assert torch.equal(attn.qkv_proj.bias, torch.cat([ref[pre + f"{p}_proj.bias"] for p in "qkv"]))
    assert torch.equal(attn.o_proj.bias, ref[pre + "o_proj.bias"])
    assert ref[pre + "o_proj.bias"].abs().sum() > 0
    assert torch.equal(attn.q_norm.weight, ref[pre + "q_norm.weight"])


# ----------------------------------------------------------------------------------------------
# Forward equals HF
# ----------------------------------------------------------------------------------------------

def bind_kv_cache(model: Qwen3ForCausalLM, num_blocks: int) -> None:
    """Give every attention layer its own NaN-filled paged cache, as ModelRunner does."""
    for attn in (m for m in model.modules() if isinstance(m, Attention)):
        shape = (num_blocks, BLOCK, attn.num_kv_heads, attn.head_dim)
        attn.kv_cache = LayerKVCache(torch.full(shape, float("nan")), torch.full(shape, float("nan")))


def prefill_context(lengths: list[int], num_blocks: int, seed: int = 0) -> dict:
    """Prefill metadata for sequences of the given lengths placed in shuffled, distinct blocks."""
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, slots, cu = [], [], [0]
    for n in lengths:
        blocks = [perm.pop() for _ in range(-(-n // BLOCK))]
        tables.append(blocks)
        slots += [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)]
        cu.append(cu[-1] + n)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    cu = torch.tensor(cu, dtype=torch.int32)
    return dict(is_prefill=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths),
                max_seqlen_k=max(lengths), slot_mapping=torch.tensor(slots, dtype=torch.int32),
                block_tables=block_tables)


@pytest.mark.parametrize("opts", [dict(), dict(attention_bias=True), dict(tie=True),
                                  dict(num_heads=8, num_kv_heads=2)], ids=["plain", "bias", "tied", "gqa4"])
def test_prefill_hidden_states_and_logits_equal_hf(tiny_model_factory, opts):
    """One packed prefill of a random batch: final hidden states and logits at every position equal HF's
    (float32, tight tolerance); compute_logits of each sequence's last position equals HF's."""
    path = tiny_model_factory(tokenizer=False, **opts)
    model = loaded_model(path)
    hf = HFQwen3.from_pretrained(path, dtype=torch.float32).eval()
    lengths = [5, 16, 23, 1]
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 320, (n,), generator=g) for n in lengths]
    num_blocks = 8
    bind_kv_cache(model, num_blocks)
    context = prefill_context(lengths, num_blocks)
    input_ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.inference_mode():
        with forward_context(Context(**context)):
            hidden = model(input_ids, positions)
            last_logits = model.compute_logits(hidden[context["cu_seqlens_q"][1:].long() - 1])
        logits = F.linear(hidden, model.lm_head.weight)
    assert get_context().slot_mapping is None
    with torch.no_grad():
        for i, ids in enumerate(seqs):
            out = hf(ids[None], output_hidden_states=True)
            start, end = context["cu_seqlens_q"][i].item(), context["cu_seqlens_q"][i + 1].item()
            torch.testing.assert_close(hidden[start:end], out.hidden_states[-1][0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(logits[start:end], out.logits[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(last_logits[i], out.logits[0, -1], atol=2e-5, rtol=1e-4)
