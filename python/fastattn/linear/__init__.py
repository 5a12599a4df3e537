"""fastattn.linear: linear attention with flash-linear-attention's API.

Swapping `from fla.ops.<family> import ...` for `from fastattn.linear import ...`
is all a model needs: the names, signatures, (B, T, heads, dim) layouts,
float32 states and (o, final_state) returns are fla 0.6's.

    chunk_linear_attn / fused_recurrent_linear_attn          plain (optionally normalized)
    chunk_simple_gla / fused_recurrent_simple_gla            scalar decay per token/head (g), per head (g_gamma)
    chunk_gla / fused_recurrent_gla                          per-key-channel decay
    chunk_delta_rule / fused_recurrent_delta_rule            delta rule
    chunk_gated_delta_rule / fused_recurrent_gated_delta_rule  gated delta rule (Qwen3-Next), GVA

    fused_chunk_linear_attn, fused_chunk_gla                 fla's older names of chunk_linear_attn / chunk_gla

All of them are one recurrence (recurrence.py), forward and backward, for q, k,
v, the gates, beta and the initial state. Without gradients they run the ops
linear_recurrent[_update]: CPU kernels, and on CUDA a token-by-token kernel
(decode, serving state pools) or the chunked kernels (long sequences). With
gradients: on the CPU the checkpointed recurrence kernels; on CUDA the chunked
form in torch ops (chunked.py), its scans over chunks in kernels where they serve.
"""
from .api import (chunk_delta_rule, chunk_gated_delta_rule, chunk_gla, chunk_linear_attn,
                  chunk_simple_gla, fused_recurrent_delta_rule, fused_recurrent_gated_delta_rule,
                  fused_recurrent_gla, fused_recurrent_linear_attn, fused_recurrent_simple_gla)

# fla's older names of the chunked ops (same signatures and results).
fused_chunk_linear_attn = chunk_linear_attn
fused_chunk_gla = chunk_gla

__all__ = [
    "chunk_linear_attn", "fused_recurrent_linear_attn", "chunk_simple_gla", "fused_recurrent_simple_gla",
    "chunk_gla", "fused_recurrent_gla", "chunk_delta_rule", "fused_recurrent_delta_rule",
    "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "fused_chunk_linear_attn", "fused_chunk_gla",
]
