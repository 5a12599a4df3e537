"""Ring attention: each rank keeps its queries and passes its K/V block around
the ring, attending to every block as it arrives and merging the partial
(out, lse) results (recursive attention: attention over a union of disjoint
key sets is the LSE-weighted merge of the parts).

Backward runs the ring again with the merged out and lse: the fwd's P for a
block recomputed from the *global* lse is the global probability, and
D = rowsum(dO * O) uses the global O, so each block's bwd call yields exact
partial gradients. dQ accumulates locally; each block's dK/dV accumulator
travels with it and arrives home after N hops.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from .._ops import ops
from .comm import Ring, all_gather_ints
from .layout import Call, contiguous_segments, plan_step, zigzag_segments

LAYOUTS = ("contiguous", "zigzag")
_ABSTRACT_CHUNK = 4  # varlen plans in chunk units; any length >= 2 keeps causal != full


@dataclass
class _Config:
    group: object
    scale: float
    left: Optional[int]
    right: Optional[int]
    layout: str
    deterministic: bool
    cu_seqlens: Optional[torch.Tensor]
    plans: List[List[Call]]        # plans[s]: the calls of ring step s
    varlen_rows: Optional[object]  # _VarlenRows for cu_seqlens inputs
    kv_lengths: List[int]          # local K/V rows of every rank (dense layouts)
    k_shape: tuple
    v_shape: tuple
    rank: int

    def block_shapes(self, step):
        """Shapes of the K and V blocks a rank holds at ring step `step`."""
        if self.cu_seqlens is not None:
            return [self.k_shape, self.v_shape]
        n = self.kv_lengths[(self.rank - step) % len(self.kv_lengths)]
        return [self.k_shape[:1] + (n,) + self.k_shape[2:], self.v_shape[:1] + (n,) + self.v_shape[2:]]


class _DenseRows:
    """Rows of (B, S, H, D) tensors (dim 1) and their (B, H, S) lse (dim 2)."""
    cu = None
    max_len = 0

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def take(self, x):
        return x[:, self.lo:self.hi]

    def take_lse(self, lse):
        return lse[..., self.lo:self.hi].contiguous()

    def add_into(self, acc, val):
        acc[:, self.lo:self.hi] += val


class _VarlenSel:
    """Rows of packed (T, H, D) tensors (dim 0) and their (H, T) lse (dim 1):
    per sequence the same run of its local chunks, gathered unless it is all rows."""

    def __init__(self, index, cu, max_len, everything):
        self.index, self.cu, self.max_len, self.everything = index, cu, max_len, everything

    def take(self, x):
        return x if self.everything else x.index_select(0, self.index)

    def take_lse(self, lse):
        return lse if self.everything else lse.index_select(1, self.index).contiguous()

    def add_into(self, acc, val):
        if self.everything:
            acc += val
        else:
            acc.index_add_(0, self.index, val.to(acc.dtype))


class _VarlenRows:
    """Maps a plan's chunk-unit row ranges onto a packed batch whose every
    sequence holds `chunks` equal local chunks (1 contiguous, 2 zigzag)."""

    def __init__(self, cu_seqlens: torch.Tensor, chunks: int):
        self.cu = cu_seqlens
        self.host = cu_seqlens.tolist()
        self.lens = [b - a for a, b in zip(self.host[:-1], self.host[1:])]
        self.chunks = chunks
        self._cache = {}
        if any(n % chunks for n in self.lens):
            raise ValueError(f"fastattn: ring_attention layout='zigzag' needs every local sequence "
                             f"length even (two chunks per rank), got {self.lens}")

    def rows(self, lo, hi):
        a, b = lo // _ABSTRACT_CHUNK, hi // _ABSTRACT_CHUNK
        key = (a, b)
        if key not in self._cache:
            if a == 0 and b == self.chunks:
                sel = _VarlenSel(None, self.cu, max(self.lens, default=0), True)
            else:
                idx, counts = [], []
                for start, n in zip(self.host[:-1], self.lens):
                    c = n // self.chunks
                    idx.append(torch.arange(start + a * c, start + b * c))
                    counts.append((b - a) * c)
                dev = self.cu.device
                index = torch.cat(idx).to(dev) if idx else torch.empty(0, dtype=torch.long, device=dev)
                cu = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
                sel = _VarlenSel(index, cu, max(counts, default=0), False)
            self._cache[key] = sel
        return self._cache[key]


def _rows(cfg, lo, hi):
    return _DenseRows(lo, hi) if cfg.varlen_rows is None else cfg.varlen_rows.rows(lo, hi)


def _mask_args(c: Call):
    if c.causal:
        return True, -1, -1
    return False, -1 if c.left is None else c.left, -1 if c.right is None else c.right


def _merge_into(acc_out, acc_lse, qrows, out, lse):
    """acc <- merge(acc, (out, lse)) on the rows `qrows` selects (the merge op
    treats an lse of -inf, a row no block has reached yet, as weight 0)."""
    o_old, l_old = qrows.take(acc_out), qrows.take_lse(acc_lse)
    o_new, l_new = ops.merge_states(o_old.contiguous(), l_old, out.to(acc_out.dtype),
                                    lse.to(acc_lse.dtype))
    if isinstance(qrows, _DenseRows):
        o_old.copy_(o_new)
        acc_lse[..., qrows.lo:qrows.hi] = l_new
    elif qrows.everything:
        acc_out.copy_(o_new)
        acc_lse.copy_(l_new)
    else:
        acc_out.index_copy_(0, qrows.index, o_new)
        acc_lse.index_copy_(1, qrows.index, l_new)


def _attend_block(cfg, calls, q, k_blk, v_blk, acc_out, acc_lse):
    for c in calls:
        qr, kr = _rows(cfg, c.q0, c.q1), _rows(cfg, c.k0, c.k1)
        causal, wl, wr = _mask_args(c)
        # fp32 parts: each is rounded to the input dtype only once, after the merge.
        out, lse = ops.fwd_partial(qr.take(q), kr.take(k_blk), kr.take(v_blk), qr.cu, kr.cu,
                                   qr.max_len, kr.max_len, cfg.scale, causal, wl, wr, False)
        _merge_into(acc_out, acc_lse, qr, out, lse)


def _grad_block(cfg, calls, dout, q, k_blk, v_blk, out, lse, dq_acc, dk_acc, dv_acc):
    for c in calls:
        qr, kr = _rows(cfg, c.q0, c.q1), _rows(cfg, c.k0, c.k1)
        causal, wl, wr = _mask_args(c)
        dq, dk, dv = ops.bwd_partial(qr.take(dout), qr.take(q), kr.take(k_blk), kr.take(v_blk),
                                     qr.take(out), qr.take_lse(lse), qr.cu, kr.cu, qr.max_len,
                                     kr.max_len, cfg.scale, causal, wl, wr, False, cfg.deterministic)
        qr.add_into(dq_acc, dq)
        kr.add_into(dk_acc, dk)
        kr.add_into(dv_acc, dv)


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg: _Config):
        ring = Ring(cfg.group)
        acc = _acc_dtype(q)
        acc_out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse_shape = (q.shape[1], q.shape[0]) if cfg.cu_seqlens is not None else (q.shape[0], q.shape[2], q.shape[1])
        acc_lse = torch.full(lse_shape, float("-inf"), dtype=acc, device=q.device)
        k_blk, v_blk = k, v
        for s, calls in enumerate(cfg.plans):
            pending = ring.exchange([k_blk, v_blk], cfg.block_shapes(s + 1)) if s + 1 < ring.world else None
            _attend_block(cfg, calls, q, k_blk, v_blk, acc_out, acc_lse)
            if pending is not None:
                k_blk, v_blk = pending.wait()
        out = acc_out.to(q.dtype)
        lse = acc_lse if q.dtype == torch.float64 else acc_lse.float()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dlse is not None:
            raise NotImplementedError("fastattn: ring_attention has no gradient through the returned "
                                      "lse (return_lse=True is for inspection and merging in no-grad code)")
        q, k, v, out, lse = ctx.saved_tensors
        cfg = ctx.cfg
        if dout is None:
            return None, None, None, None
        dout = dout.contiguous() if dout.stride(-1) != 1 else dout
        ring = Ring(cfg.group)
        acc = _acc_dtype(q)
        dq_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
        k_blk, v_blk = k, v
        grads_in_flight = None
        for s, calls in enumerate(cfg.plans):
            last = s + 1 == ring.world
            kv_pending = None if last else ring.exchange([k_blk, v_blk], cfg.block_shapes(s + 1))
            # This block's own contribution, computed while its accumulator (from
            # the ranks it visited before) is still in flight.
            dk_loc = torch.zeros(k_blk.shape, dtype=acc, device=k.device)
            dv_loc = torch.zeros(v_blk.shape, dtype=acc, device=v.device)
            _grad_block(cfg, calls, dout, q, k_blk, v_blk, out, lse, dq_acc, dk_loc, dv_loc)
            if grads_in_flight is not None:
                dk_prev, dv_prev = grads_in_flight.wait()
                dk_loc += dk_prev
                dv_loc += dv_prev
            if ring.world > 1:
                grads_in_flight = ring.exchange([dk_loc, dv_loc], cfg.block_shapes(s + 1))
            else:
                grads_in_flight = None
                dk_home, dv_home = dk_loc, dv_loc
            if kv_pending is not None:
                k_blk, v_blk = kv_pending.wait()
        if grads_in_flight is not None:
            dk_home, dv_home = grads_in_flight.wait()
        return dq_acc.to(q.dtype), dk_home.to(k.dtype), dv_home.to(v.dtype), None


def _window_bounds(causal, window_size):
    left, right = (int(w) for w in window_size)
    left = None if left < 0 else left
    right = 0 if causal else (None if right < 0 else right)
    return left, right


def ring_attention(q, k, v, group=None, causal=False, scale=None, window_size=(-1, -1),
                   layout="contiguous", cu_seqlens=None, deterministic=False,
                   return_lse=False):
    """Attention over a sequence sharded across the ranks of `group`.

    q (B, S_local, Hq, D) and k, v (B, S_local, Hkv, D) are this rank's shard
    (flash-attn layout; GQA: only the Hkv heads travel). layout="contiguous":
    rank r holds the r-th run of positions (runs may differ in length, e.g. a
    shorter last shard); layout="zigzag": the sequence is cut into 2N equal
    chunks and rank r holds chunks r and 2N-1-r (zigzag_shard builds it), which
    balances causal work. Masks are those of the whole sequence (causal,
    window_size=(left, right) as in flash_attn_func; Sq = Sk, so both diagonal
    alignments agree). Varlen: q (T_local, Hq, D) with cu_seqlens (B + 1) int32
    over this rank's part of each sequence, every rank holding the same local
    lengths (each sequence split the same way: contiguous runs of 1/N, or
    zigzag chunks; windows are not supported there).

    Returns out (q's shape), or (out, lse) with lse (B, Hq, S_local) /
    (Hq, T_local) float32 over this rank's queries. Differentiable in q, k, v.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastattn: ring_attention needs an initialized torch.distributed "
                           "process group (torch.distributed.init_process_group)")
    if layout not in LAYOUTS:
        raise ValueError(f"fastattn: ring_attention layout must be one of {LAYOUTS}, got {layout!r}")
    varlen = cu_seqlens is not None
    want = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != want:
            raise ValueError(f"fastattn: ring_attention {name} must be a {want}-D tensor "
                             f"({'(total, heads, head_dim) with cu_seqlens' if varlen else '(batch, seqlen, heads, head_dim)'})"
                             f", got {getattr(t, 'shape', type(t).__name__)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"fastattn: ring_attention k and v must agree in every dim but the last, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    row_dim = 0 if varlen else 1
    if q.shape[row_dim] != k.shape[row_dim] or (not varlen and q.shape[0] != k.shape[0]):
        raise ValueError("fastattn: ring_attention is self-attention over one sharded sequence: "
                         f"q and k must hold the same local positions, got {tuple(q.shape)} and {tuple(k.shape)}")
    left, right = _window_bounds(causal, window_size)
    if varlen and (left is not None or (right is not None and not causal)):
        raise NotImplementedError("fastattn: ring_attention window_size with cu_seqlens (varlen "
                                  "shards) is not supported; use the dense layout")
    scale = q.size(-1) ** -0.5 if scale is None else float(scale)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    chunks = 2 if layout == "zigzag" else 1

    if varlen:
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise TypeError("fastattn: ring_attention cu_seqlens must be a 1-D int32 tensor")
        host = cu_seqlens.tolist()
        if world > 1 and any(other != host for other in all_gather_ints(host, group)):
            raise ValueError("fastattn: ring_attention with cu_seqlens needs the same local lengths "
                             "on every rank (split each sequence into equal shards: shard_varlen)")
        rows = _VarlenRows(cu_seqlens, chunks)
        segs = (contiguous_segments([_ABSTRACT_CHUNK] * world) if chunks == 1
                else zigzag_segments(_ABSTRACT_CHUNK, world))
        kv_lengths = [q.shape[0]] * world
    else:
        rows = None
        kv_lengths = [q.shape[1]] * world
        if world > 1:
            kv_lengths = [n for (n,) in all_gather_ints([q.shape[1]], group)]
        if chunks == 2:
            if len(set(kv_lengths)) != 1 or kv_lengths[0] % 2:
                raise ValueError("fastattn: ring_attention layout='zigzag' needs the same even local "
                                 f"length on every rank, got {kv_lengths}")
            segs = zigzag_segments(kv_lengths[0] // 2, world)
        else:
            segs = contiguous_segments(kv_lengths)
    plans = [plan_step(segs[rank], segs[(rank - s) % world], left, right) for s in range(world)]
    cfg = _Config(group=group, scale=scale, left=left, right=right, layout=layout,
                  deterministic=bool(deterministic), cu_seqlens=cu_seqlens, plans=plans,
                  varlen_rows=rows, kv_lengths=kv_lengths, k_shape=tuple(k.shape),
                  v_shape=tuple(v.shape), rank=rank)
    out, lse = _RingAttention.apply(q, k, v, cfg)
    return (out, lse) if return_lse else out
