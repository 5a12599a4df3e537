"""flash-attn's padding helpers: a padded batch to the packed rows varlen kernels take, and back.

    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, attention_mask)
    out = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens,
                                 max_seqlen, max_seqlen, causal=True)
    out = pad_input(out, indices, batch, seqlen)   # padding rows are 0

Both are differentiable (a gather and a scatter).
"""
import torch
import torch.nn.functional as F


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """Rows of hidden_states (batch, seqlen, ...) where attention_mask (batch, seqlen) is set.

    attention_mask: bool or 0/1 integers, 1 for tokens to keep. unused_mask
    (optional, same shape): tokens that are kept in the packed rows (counted
    in cu_seqlens) but not used (not counted in seqused), as flash-attn 2.8.
    Returns (hidden_states_unpad (total, ...), indices (total,) int64 into the
    flattened batch*seqlen rows, cu_seqlens (batch + 1,) int32,
    max_seqlen (int), seqused (batch,) int32).
    """
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"fastattn: attention_mask must be (batch, seqlen) = "
                         f"{tuple(hidden_states.shape[:2])}, got {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    if unused_mask is not None:
        keep = keep | unused_mask.bool()
    seqlens = keep.sum(dim=-1, dtype=torch.int32)
    seqused = attention_mask.bool().sum(dim=-1, dtype=torch.int32)
    indices = keep.flatten().nonzero().flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    rows = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return rows[indices], indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states, indices, batch, seqlen):
    """Inverse of unpad_input: rows (total, ...) back to (batch, seqlen, ...), zeros elsewhere."""
    out = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
    out = out.index_put((indices,), hidden_states)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])


def pad_head_dims(q, k, v):
    """One head dim for q, k and v, as the kernels take: the narrower side zero-padded in its
    last dim. Zero key channels add nothing to q.k (callers fix the softmax scale from q's own
    head dim first); zero value channels give output channels that the caller cuts off.
    Multi-head latent attention (DeepSeek V2 / V3: q, k 192 = 128 + 64 rotary, v 128) is the
    common case. Returns (q, k, v, the value head dim to keep)."""
    dqk, dv = q.shape[-1], v.shape[-1]
    if dv < dqk:
        v = F.pad(v, (0, dqk - dv))
    elif dv > dqk:
        q, k = F.pad(q, (0, dv - dqk)), F.pad(k, (0, dv - dqk))
    return q, k, v, dv
