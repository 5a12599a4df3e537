"""Head-parallel (Ulysses) attention: an all-to-all turns sequence shards into
head shards, each rank attends over the whole sequence for H/N heads, and an
all-to-all turns the result back. With `ring_group` the local attention is
itself ring attention over that group (2-D context parallelism), for when the
heads are too few to split N ways.
"""
import torch
import torch.distributed as dist

from .._ops import ops
from .comm import all_gather_ints, all_to_all
from .ring import _window_bounds, ring_attention


class _AllToAll(torch.autograd.Function):
    """Scatter `scatter_dim`, gather `gather_dim`; the gradient goes the other way."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def _kv_heads_for(x, world, name):
    """K/V heads to split N ways: GQA with fewer KV heads than ranks repeats each
    head so every rank gets the one its query heads use."""
    h = x.shape[-2]
    if h % world == 0:
        return x
    if world % h == 0:
        return x.repeat_interleave(world // h, dim=-2)
    raise ValueError(f"fastattn: ulysses_attention needs {name} heads ({h}) divisible by the group "
                     f"size ({world}) or dividing it")


def ulysses_attention(q, k, v, group=None, causal=False, scale=None, window_size=(-1, -1),
                      cu_seqlens=None, max_seqlen=None, ring_group=None, layout="contiguous",
                      deterministic=False, return_lse=False):
    """Attention over a sequence sharded across `group`, by trading sequence
    shards for head shards (all-to-all), attending locally, and trading back.

    Dense: q (B, S_local, Hq, D), k, v (B, S_local, Hkv, D), every rank the same
    S_local, the shards in rank order along the sequence. Hq must divide by
    the group size; Hkv too, or divide it (GQA heads are then repeated).
    Varlen: q (T_local, Hq, D), each rank a contiguous 1/N slice of the packed
    tokens (any cut, sequences may straddle ranks), with cu_seqlens (B + 1)
    int32 and max_seqlen of the *whole* packed batch.
    ring_group: the local attention runs as ring_attention over this group
    (2-D: ulysses within `group`, ring across `ring_group`; the sequence is
    first split over the ring with `layout`, then each ring shard contiguously
    over `group`). Returns out, or (out, lse) with lse (B, Hq, S_local) /
    (Hq, T_local) float32.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastattn: ulysses_attention needs an initialized torch.distributed "
                           "process group (torch.distributed.init_process_group)")
    varlen = cu_seqlens is not None
    want = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != want:
            raise ValueError(f"fastattn: ulysses_attention {name} must be a {want}-D tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if varlen and ring_group is not None:
        raise NotImplementedError("fastattn: ulysses_attention with both cu_seqlens and ring_group "
                                  "(2-D varlen) is not supported")
    world = dist.get_world_size(group)
    if q.shape[-2] % world:
        raise ValueError(f"fastattn: ulysses_attention needs the query heads ({q.shape[-2]}) "
                         f"divisible by the group size ({world})")
    seq_dim = 0 if varlen else 1
    if world > 1:
        lengths = [n for (n,) in all_gather_ints([q.shape[seq_dim]], group)]
        if len(set(lengths)) != 1:
            raise ValueError(f"fastattn: ulysses_attention needs the same local length on every "
                             f"rank, got {lengths}")
    k, v = _kv_heads_for(k, world, "key/value"), _kv_heads_for(v, world, "key/value")
    head_dim = seq_dim + 1
    qh, kh, vh = (_AllToAll.apply(t.contiguous(), head_dim, seq_dim, group) for t in (q, k, v))
    scale = q.size(-1) ** -0.5 if scale is None else float(scale)
    if ring_group is not None:
        out, lse = ring_attention(qh, kh, vh, group=ring_group, causal=causal, scale=scale,
                                  window_size=window_size, layout=layout,
                                  deterministic=deterministic, return_lse=True)
    else:
        left, right = _window_bounds(causal, window_size)
        wl = -1 if left is None else left
        wr = -1 if right is None else right
        if varlen:
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            out, lse = ops.fwd(qh, kh, vh, cu_seqlens, cu_seqlens, int(max_seqlen), int(max_seqlen),
                               scale, False, wl, wr, True, bool(deterministic))
        else:
            out, lse = ops.fwd(qh, kh, vh, None, None, 0, 0, scale, False, wl, wr, True,
                               bool(deterministic))
    out = _AllToAll.apply(out.contiguous(), seq_dim, head_dim, group)
    if not return_lse:
        return out
    # lse (B, H/N, S) / (H/N, T): heads are dim -2, positions dim -1.
    lse = _AllToAll.apply(lse.contiguous(), lse.dim() - 1, lse.dim() - 2, group)
    return out, lse
