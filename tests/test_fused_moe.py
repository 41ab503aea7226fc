"""Fused MoE: the Triton kernel vs its torch reference, the alignment plan, and routing vs HF Qwen3-MoE.

Without CUDA the kernels run in the Triton CPU interpreter (tiny shapes, fp32/fp16); tests marked `gpu` run
bf16 at Qwen3-30B-A3B shapes (E=128, K=8, hidden 2048, I=768 and a TP=2 shard of 384) plus CUDA-graph replay.
"""

import pytest
import torch
from kernel_harness import DEV, assert_close, gpu, interp, needs_cuda, only_if_interp_missed, rerun_in_fresh_process

import nanovllm.kernels.fused_moe as fm
from nanovllm.kernels.fused_moe import fused_moe, fused_moe_torch, route_topk

INT_POISON = -7  # what poisoned int scratch holds; never a slot, pad or expert id


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def poisoned_scratch(monkeypatch):
    """Kernel scratch starts as NaN (floats) / INT_POISON (ints): every element read must have been written."""
    def alloc(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else INT_POISON
        return torch.full(shape, fill, dtype=dtype, device=device)
    monkeypatch.setattr(fm, "_alloc", alloc)


def make_experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, gen: torch.Generator,
                 device: str = DEV) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H], w2 [E, H, I] scaled so activations stay O(1)."""
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    return w13.to(device=device, dtype=dtype), w2.to(device=device, dtype=dtype)


def make_routing(num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator,
                 device: str = DEV) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random experts per token (int32) and positive float32 weights."""
    ids = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :top_k].to(torch.int32)
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return weights.to(device), ids.to(device)


TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 2e-3), torch.bfloat16: (5e-2, 1e-2)}


def check_moe(hidden_states, w13, w2, topk_weights, topk_ids, config=None) -> None:
    """fused_moe into a NaN-filled out vs the reference."""
    out = torch.full_like(hidden_states, float("nan"))
    res = fused_moe(hidden_states, w13, w2, topk_weights, topk_ids, out=out, config=config)
    assert res is out
    ref = fused_moe_torch(hidden_states, w13, w2, topk_weights, topk_ids)
    assert_close(out, ref, *TOL[hidden_states.dtype])


# ----------------------------------------------------------------------------------------------
# Interpreter (CPU) tests
# ----------------------------------------------------------------------------------------------

@interp
@pytest.mark.parametrize("num_tokens", [0, 1, 5, 33])
@pytest.mark.parametrize("num_experts,top_k,hidden,inter,dtype", [
    (1, 1, 40, 20, torch.float32),
    (4, 2, 36, 28, torch.float16),
    (7, 3, 40, 20, torch.float32),
    (7, 2, 24, 18, torch.float16),
    (4, 3, 48, 32, torch.float32),  # sizes that are multiples of the tiles (no K masks)
])
def test_fused_moe_matches_reference(poisoned_scratch, num_tokens, num_experts, top_k, hidden, inter, dtype):
    gen = torch.Generator().manual_seed(num_tokens * 100 + num_experts * 10 + top_k)
    x = torch.randn(num_tokens, hidden, generator=gen).to(DEV, dtype)
    w13, w2 = make_experts(num_experts, hidden, inter, dtype, gen)
    weights, ids = make_routing(num_tokens, num_experts, top_k, gen)
    check_moe(x, w13, w2, weights, ids)


@interp
def test_fused_moe_idle_experts_foreign_ids_int64(poisoned_scratch):
    """Experts with no tokens, one expert spanning several blocks, ids outside [0, E) contributing nothing;
    hidden states as a strided view."""
    gen = torch.Generator().manual_seed(1)
    num_tokens, num_experts, hidden, inter = 40, 7, 40, 20
    x = torch.randn(num_tokens, hidden + 8, generator=gen).to(DEV)[:, 3:3 + hidden]
    w13, w2 = make_experts(num_experts, hidden, inter, torch.float32, gen)
    ids = torch.tensor([0, 3, 6], dtype=torch.int64)[torch.randint(0, 3, (num_tokens, 3), generator=gen)]
    ids[:, 0] = 3  # expert 3 gets >= 40 slots: three 16-row blocks
    ids[5, 1], ids[9, 2], ids[11] = -1, num_experts, -1  # token 11 has no expert of ours at all
    weights = torch.rand(num_tokens, 3, generator=gen)
    assert x.stride(0) == hidden + 8
    check_moe(x, w13, w2, weights.to(DEV), ids.to(DEV))
    ref = fused_moe_torch(x, w13, w2, weights.to(DEV), ids.to(DEV))
    assert ref[11].abs().max().item() == 0.0


@interp
def test_fused_moe_multi_program_alignment(poisoned_scratch, monkeypatch):
    """The large-T alignment path (count / plan / scatter launches) end to end."""
    monkeypatch.setattr(fm, "ALIGN_ONE_PROGRAM_MAX", 0)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(33, 40, generator=gen).to(DEV)
    w13, w2 = make_experts(5, 40, 20, torch.float32, gen)
    check_moe(x, w13, w2, *make_routing(33, 5, 2, gen))


@interp
@pytest.mark.parametrize("num_tokens", [1, 64, 256, 512, 2048])
def test_gpu_tile_configs_in_interpreter(num_tokens):
    """Each tile config the GPU picks (keyed on T for E=128, K=8) on a small odd-sized problem."""
    cfg = fm.moe_config(num_tokens, 8, 128)
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(21, 72, generator=gen).to(DEV)
    w13, w2 = make_experts(6, 72, 40, torch.float32, gen)
    check_moe(x, w13, w2, *make_routing(21, 6, 3, gen), config=cfg)


@interp
@pytest.mark.parametrize("one_program_max", [1 << 30, 0])
@pytest.mark.parametrize("num_slots,num_experts,block_m", [(1, 1, 16), (7, 4, 16), (99, 7, 16), (300, 33, 32),
                                                           (2500, 5, 64)])
def test_align_block_size_plan(poisoned_scratch, one_program_max, num_slots, num_experts, block_m):
    gen = torch.Generator().manual_seed(num_slots + num_experts)
    ids = torch.randint(-1, num_experts + 1, (num_slots,), generator=gen)  # includes foreign ids -1 and E
    ids[torch.rand(num_slots, generator=gen) < 0.7] = 0  # expert 0 crowded, some experts likely idle
    sorted_ids, block_expert, num_post = fm.moe_align_block_size(ids.to(DEV), num_experts, block_m,
                                                              one_program_max=one_program_max)
    sorted_ids, block_expert, num_post = sorted_ids.cpu(), block_expert.cpu(), int(num_post.item())
    valid = (ids >= 0) & (ids < num_experts)
    counts = torch.bincount(ids[valid], minlength=num_experts)
    blocks = (counts + block_m - 1) // block_m
    assert num_post == int(blocks.sum()) * block_m
    assert num_post <= sorted_ids.numel()
    want_experts = torch.repeat_interleave(torch.arange(num_experts), blocks)
    assert torch.equal(block_expert[:len(want_experts)].long(), want_experts)
    used = sorted_ids[:num_post].long()
    pads = used == num_slots
    assert int(pads.sum()) == num_post - int(counts.sum())
    slots = used[~pads]
    assert torch.equal(slots.sort().values, torch.nonzero(valid).flatten())  # every slot of ours exactly once
    row_expert = torch.repeat_interleave(block_expert[:num_post // block_m].long(), block_m)
    assert torch.equal(ids[slots], row_expert[~pads])  # each slot sits in a block of its own expert


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_route_topk_matches_hf_router(dtype, norm_topk_prob):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    config = Qwen3MoeConfig(hidden_size=32, num_experts=9, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob)
    router = Qwen3MoeTopKRouter(config).to(dtype)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.weight.copy_(torch.randn(9, 32, generator=gen))
        x = torch.randn(17, 32, generator=gen).to(dtype)
        logits, hf_weights, hf_ids = router(x)
        weights, ids = route_topk(torch.nn.functional.linear(x, router.weight), 3, norm_topk_prob)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.long(), hf_ids.long())
    assert torch.equal(weights, hf_weights.float())


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=interp)])
def test_moe_block_matches_hf(norm_topk_prob, use_kernel):
    """route_topk + fused_moe_torch (and the kernel) vs HF's Qwen3MoeSparseMoeBlock, weights copied as w13/w2."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    hidden, inter, num_experts, top_k = 40, 20, 7, 3
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts,
                            num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob)
    config._experts_implementation = "eager"
    block = Qwen3MoeSparseMoeBlock(config).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        x = torch.randn(2, 13, hidden, generator=gen)
        ref = block(x).reshape(-1, hidden)
        flat = x.reshape(-1, hidden)  # [T, H]
        weights, ids = route_topk(torch.nn.functional.linear(flat, block.gate.weight), top_k, norm_topk_prob)
        moe = fused_moe if use_kernel else fused_moe_torch
        out = moe(flat.to(DEV), block.experts.gate_up_proj.to(DEV), block.experts.down_proj.to(DEV),
                  weights.to(DEV), ids.to(DEV))
    assert_close(out.cpu(), ref, 1e-5, 1e-6)


def test_input_errors():
    x = torch.zeros(3, 8)
    w13, w2 = torch.zeros(2, 6, 8), torch.zeros(2, 8, 3)
    w, ids = torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int32)
    for moe in (fused_moe, fused_moe_torch):
        with pytest.raises(ValueError, match="w13"):
            moe(x, torch.zeros(2, 5, 8), w2, w, ids)
        with pytest.raises(ValueError, match="w2"):
            moe(x, w13, torch.zeros(2, 8, 4), w, ids)
        with pytest.raises(ValueError, match="dtype"):
            moe(x, w13.half(), w2, w, ids)
        with pytest.raises(ValueError, match="topk_ids"):
            moe(x, w13, w2, w, ids[:2])
        with pytest.raises(ValueError, match="int32 or int64"):
            moe(x, w13, w2, w, ids.float())
        with pytest.raises(ValueError, match="out"):
            moe(x, w13, w2, w, ids, out=torch.zeros(3, 7))
    with pytest.raises(ValueError, match="top_k 4"):
        route_topk(torch.zeros(3, 2), 4, True)
    with pytest.raises(ValueError, match="router_logits"):
        route_topk(torch.zeros(3), 1, True)
    with pytest.raises(ValueError, match="power of two"):
        fm.moe_align_block_size(ids, 2, 24)


@only_if_interp_missed
def test_fused_moe_in_fresh_process():
    rerun_in_fresh_process(__file__)


# ----------------------------------------------------------------------------------------------
# GPU tests: bf16 at Qwen3-30B-A3B shapes
# ----------------------------------------------------------------------------------------------

HIDDEN_30B, EXPERTS_30B, TOPK_30B = 2048, 128, 8


def experts_30b(inter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 w13 [128, 2I, 2048], w2 [128, 2048, I], drawn on the GPU (1.2 GB at I=768)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    w13 = torch.randn(EXPERTS_30B, 2 * inter, HIDDEN_30B, device=DEV, generator=gen) / HIDDEN_30B ** 0.5
    w2 = torch.randn(EXPERTS_30B, HIDDEN_30B, inter, device=DEV, generator=gen) / inter ** 0.5
    return w13.to(torch.bfloat16), w2.to(torch.bfloat16)


def routed_inputs(num_tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 hidden states and routing from random router logits (softmax top-8, renormalised)."""
    x = torch.randn(num_tokens, HIDDEN_30B, generator=gen).to(DEV, torch.bfloat16)
    logits = torch.randn(num_tokens, EXPERTS_30B, generator=gen).to(DEV, torch.bfloat16)
    return (x, *route_topk(logits, TOPK_30B, True))


@gpu
@needs_cuda
@pytest.mark.parametrize("inter", [768, 384])
@pytest.mark.parametrize("num_tokens", [1, 64, 1024])
def test_gpu_fused_moe_bf16_30b_shapes(inter, num_tokens):
    gen = torch.Generator().manual_seed(num_tokens + inter)
    w13, w2 = experts_30b(inter, num_tokens + inter)
    x, weights, ids = routed_inputs(num_tokens, gen)
    torch.cuda.set_sync_debug_mode("error")  # the kernel path must not sync with the host
    try:
        out = fused_moe(x, w13, w2, weights, ids, out=torch.full_like(x, float("nan")))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = fused_moe_torch(x, w13, w2, weights, ids)
    assert_close(out, ref, 5e-2 * ref.abs().max().item(), 1e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 64, 1024])  # 1024 x 8 slots: the multi-program alignment
def test_gpu_fused_moe_cuda_graph_replay(num_tokens):
    """Capture once for a fixed T; replay with new hidden states and routing (incl. foreign ids)."""
    gen = torch.Generator().manual_seed(7000 + num_tokens)
    w13, w2 = experts_30b(384, 7000 + num_tokens)
    x, weights, ids = routed_inputs(num_tokens, gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile + warm up outside the capture
        fused_moe(x, w13, w2, weights, ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    for step in range(3):
        new_x, new_weights, new_ids = routed_inputs(num_tokens, gen)
        if step == 2:
            new_ids[0, :2] = -1  # experts this rank does not hold
        x.copy_(new_x)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        ref = fused_moe_torch(x, w13, w2, weights, ids)
        assert_close(out, ref, 5e-2 * ref.abs().max().item(), 1e-2)
