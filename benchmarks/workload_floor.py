"""The physical floor of bench.py's workload for a model, as GPU.md derives it for Qwen3-0.6B: the bytes decode
must read at least once (every earlier token's K/V at every step, plus the weights once per step) over the GPU's
memory bandwidth, and, as a second bound, the matmul + attention FLOPs over its bf16 throughput. No GPU needed.

Decode step s runs the sequences that still have tokens to generate (all 256 fit in the KV cache at once); a
sequence with n output tokens takes n - 1 decode steps (its first token comes from prefill), step j attending over
prompt_len + j tokens. For MoE layers a step reads only the experts its tokens select: with B tokens and uniform,
independent top-K routing, E * (1 - (1 - K/E)^B) of the E experts (trained routers are skewed, so fewer).

    python3 -m benchmarks.workload_floor                                    # the three built-in shapes
    python3 -m benchmarks.workload_floor --arch qwen3-30b-a3b --layers 8    # one, at reduced depth
    python3 -m benchmarks.workload_floor --model DIR                        # any checkpoint's config.json
"""
import argparse
from dataclasses import dataclass

import numpy as np
from transformers import AutoConfig, PretrainedConfig

from nanovllm.models.qwen3_moe import is_sparse_layer
from nanovllm.models.utils import head_dim_of
from nanovllm.testing.random_checkpoint import ARCHS, arch_config
from nanovllm.testing.workload import make_workload

H100_BYTES_PER_S = 3.00e12  # GPU.md: measured device-to-device copy
H100_FLOPS = 786e12  # GPU.md: measured bf16 GEMM
DTYPE_BYTES = 2  # bf16 weights and KV cache


@dataclass
class Shape:
    """Per-token sizes of one model (bf16): weights split into always-read and per-expert parts."""
    num_layers: int
    kv_bytes_per_token: int
    dense_params: int        # every step reads these (attention, dense MLPs, norms, routers, LM head)
    expert_params: int       # one expert's gate, up and down
    num_experts: int         # per MoE layer (0: dense model)
    top_k: int
    moe_layers: int
    attn_flops_per_ctx: int  # FLOPs of one query token against one earlier token, all layers (QK^T and PV)


def model_shape(c: PretrainedConfig) -> Shape:
    head_dim = head_dim_of(c)
    hidden, heads, kv_heads, layers = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers
    attn = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 2 * hidden
    num_experts = getattr(c, "num_experts", 0) or 0
    moe_layers = sum(is_sparse_layer(c, i) for i in range(layers)) if num_experts else 0
    expert = 3 * hidden * getattr(c, "moe_intermediate_size", 0) if num_experts else 0
    dense_mlp = 3 * hidden * c.intermediate_size
    router = num_experts * hidden
    lm_head = c.vocab_size * hidden  # tied or not, one vocab x hidden matrix is read per step
    dense = layers * attn + (layers - moe_layers) * dense_mlp + moe_layers * router + lm_head + hidden
    return Shape(layers, 2 * layers * kv_heads * head_dim * DTYPE_BYTES, dense, expert, num_experts,
                 getattr(c, "num_experts_per_tok", 0) or 0, moe_layers, 4 * layers * heads * head_dim)


def active_experts(num_experts: int, top_k: int, batch: np.ndarray) -> np.ndarray:
    """Expected distinct experts hit by `batch` tokens with uniform independent top-k routing."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


@dataclass
class Floor:
    kv_tb: float
    weights_tb: float
    memory_s: float
    compute_s: float
    output_tokens: int

    @property
    def floor_s(self) -> float:
        return max(self.memory_s, self.compute_s)


def workload_floor(c: PretrainedConfig, bytes_per_s: float, flops: float, num_seqs: int = 256,
                   max_input_len: int = 1024, max_output_len: int = 1024) -> Floor:
    shape = model_shape(c)
    prompts, params = make_workload(num_seqs, max_input_len, max_output_len)
    prompt_len = np.array([len(p) for p in prompts], dtype=np.float64)
    out_len = np.array([sp.max_tokens for sp in params], dtype=np.float64)
    steps = out_len - 1  # decode steps per sequence
    # KV read: sum over sequences of sum_{j=1}^{n-1} (P + j)
    ctx_tokens = (steps * prompt_len + steps * (steps + 1) / 2).sum()
    kv_bytes = ctx_tokens * shape.kv_bytes_per_token
    # Weights: step s runs the sequences with more than s decode steps left.
    batch = (steps[None, :] > np.arange(int(steps.max()))[:, None]).sum(1)  # [num_steps]
    experts = active_experts(shape.num_experts, shape.top_k, batch) if shape.num_experts else np.zeros_like(batch)
    weight_params = shape.dense_params + shape.moe_layers * shape.expert_params * experts
    weight_bytes = weight_params.sum() * DTYPE_BYTES
    # Compute: 2 FLOPs per active parameter per token (prefill and decode), plus attention over the context.
    tokens = prompt_len.sum() + out_len.sum()
    active = shape.dense_params + shape.moe_layers * shape.top_k * shape.expert_params
    prefill_ctx = (prompt_len * (prompt_len + 1) / 2).sum()  # causal
    matmul_flops = 2 * active * tokens + shape.attn_flops_per_ctx * (prefill_ctx + ctx_tokens)
    return Floor(kv_bytes / 1e12, weight_bytes / 1e12, (kv_bytes + weight_bytes) / bytes_per_s,
                 matmul_flops / flops, int(out_len.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (its config.json)")
    parser.add_argument("--arch", choices=list(ARCHS), help="a built-in shape (default: all three)")
    parser.add_argument("--layers", type=int, help="with --arch: decoder layers")
    parser.add_argument("--bandwidth", type=float, default=H100_BYTES_PER_S, help="bytes/s (default: %(default)g, "
                        "H100; H200 ~4.3e12)")
    parser.add_argument("--flops", type=float, default=H100_FLOPS, help="bf16 FLOP/s (default: %(default)g)")
    args = parser.parse_args()
    if args.model:
        configs = {args.model: AutoConfig.from_pretrained(args.model)}
    elif args.arch:
        configs = {f"{args.arch} ({args.layers or 'all'} layers)": arch_config(args.arch, args.layers)}
    else:
        configs = {"qwen3-0.6b": arch_config("qwen3-0.6b"), "llama-3.2-1b": arch_config("llama-3.2-1b"),
                   "qwen3-30b-a3b (8 layers)": arch_config("qwen3-30b-a3b", 8)}
    rows = []
    for name, c in configs.items():
        shape, f = model_shape(c), workload_floor(c, args.bandwidth, args.flops)
        weights_gb = (shape.dense_params + shape.moe_layers * shape.num_experts * shape.expert_params) * 2 / 1e9
        rows.append((name, f"{shape.kv_bytes_per_token:,}", f"{weights_gb:.2f}", f"{f.kv_tb:.2f}",
                     f"{f.weights_tb:.2f}", f"{f.memory_s:.2f}", f"{f.compute_s:.2f}",
                     f"{f.output_tokens / f.floor_s:,.0f}"))
    header = ("model", "KV B/token", "weights GB", "KV read TB", "weights read TB", "memory floor s",
              "compute floor s", "max output tok/s")
    print(f"bench.py workload (256 seqs, prompts/outputs U[100,1024]); {args.bandwidth / 1e12:.2f} TB/s, "
          f"{args.flops / 1e12:.0f} TFLOP/s bf16")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print(" | ".join(str(v).rjust(w) for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
