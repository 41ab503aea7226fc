"""Triton kernels, each beside its torch reference: paged attention and the KV-cache store with an optional fp8
(e4m3) cache (triton_attention / torch_attention), fused sampling (sampling), RMSNorm (norm), q/k-norm + RoPE +
K/V store (rope_store) and SiLU-and-mul (activation)."""
