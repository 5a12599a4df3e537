"""fastattn.linear: linear attention with flash-linear-attention's API.

Swapping `from fla.ops.<family> import ...` for `from fastattn.linear import ...`
is all a model needs: the names, signatures, (B, T, heads, dim) layouts,
float32 states and (o, final_state) returns are fla 0.6's.

    chunk_linear_attn / fused_recurrent_linear_attn          plain (optionally normalized)
    chunk_simple_gla / fused_recurrent_simple_gla            scalar decay per token/head (g), per head (g_gamma)
    chunk_gla / fused_recurrent_gla                          per-key-channel decay
    chunk_delta_rule / fused_recurrent_delta_rule            delta rule
    chunk_gated_delta_rule / fused_recurrent_gated_delta_rule  gated delta rule (Qwen3-Next), GVA

All of them are one recurrence (recurrence.py), forward and backward, for q, k,
v, the gates, beta and the initial state: on the CPU through fastattn's
kernels; on other devices (CUDA, until its hand-written kernels land) through
the chunked form of the same recurrence in torch ops (chunked.py).
"""
from .api import (chunk_delta_rule, chunk_gated_delta_rule, chunk_gla, chunk_linear_attn,
                  chunk_simple_gla, fused_recurrent_delta_rule, fused_recurrent_gated_delta_rule,
                  fused_recurrent_gla, fused_recurrent_linear_attn, fused_recurrent_simple_gla)

__all__ = [
    "chunk_linear_attn", "fused_recurrent_linear_attn", "chunk_simple_gla", "fused_recurrent_simple_gla",
    "chunk_gla", "fused_recurrent_gla", "chunk_delta_rule", "fused_recurrent_delta_rule",
    "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
]
