"""Plan/run attention for one serving step: prefill chunks and decode rows over
a paged KV cache in one kernel launch.

A continuous-batching step mixes sequences with many new queries (prefill
chunks) and sequences with a few (decode rows, speculative drafts). They want
different kernels: a prefill chunk fills 128-row query tiles of the paged
forward kernel and is compute-bound; a decode row packs a KV head's query heads
into one tile, splits long contexts over several CTAs and streams the cache.
``BatchAttention.plan`` assigns each sequence its role from host-side lengths
(what the scheduler already knows; nothing is read from the device), lays out
one grid of both kinds of CTA in longest-first order, and uploads that table
once; ``run`` launches it for every layer of the step. The same table replays
inside a CUDA graph with new cache contents and shorter (never longer) lengths.

Each row gets bitwise the result that the split launches (``paged_fwd`` over
the prefill chunks, ``decode`` with the plan's split count over the decode
rows) give it: the one launch runs the same device code per CTA.
"""
from __future__ import annotations

import heapq
from typing import NamedTuple, Optional, Sequence

import torch

from ._ops import ops
from .kv_quant import dequantized_pages, is_fp8_kv, kv_scale_tensor

__all__ = ["BatchAttention", "MixedSchedule", "paged_varlen_attention", "schedule_mixed"]

# Sequences with at most this many new queries run as decode CTAs (the
# decode kernel's row budget: 16 queries x the GQA group, in 64-row m-blocks).
DECODE_MAX_Q = 16
_FWD_BLOCK_M = 128       # query rows per tile of the paged forward kernel (head dims <= 128)
_DECODE_BLOCK_N = 64     # keys per decode pipeline stage
_MAX_SPLITS = 8          # splits merge inside one thread-block cluster
_MIN_SPLIT_KEYS = 512    # a split keeps at least this many keys
# Rough per-CTA rates for the schedule's cost model (two CTAs share an SM):
# a prefill tile's tensor-core FLOP/s and a decode CTA's share of HBM.
_TILE_FLOPS = 1.5e12
_SM_BYTES = 2.4e10
_KIND_IDLE, _KIND_PREFILL, _KIND_DECODE = -1, 0, 1


def _host_ints(x, name) -> list:
    if isinstance(x, torch.Tensor):
        if x.is_cuda:
            raise ValueError(f"fastattn: BatchAttention.plan takes host-side {name} (a list or a CPU "
                             "tensor: the lengths the scheduler already has), got a CUDA tensor")
        x = x.tolist()
    out = [int(v) for v in x]
    if any(v < 0 for v in out):
        raise ValueError(f"fastattn: BatchAttention.plan: {name} must be >= 0")
    return out


def _visible_keys(i_lo, i_hi, sq, sk, causal, left, right):
    """Keys [begin, end) that query rows i_lo..i_hi of a sequence see
    (bottom-right alignment: query i sits at key i + sk - sq)."""
    shift = sk - sq
    end = sk
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if causal or right >= 0:
        end = min(sk, i_hi + shift + right + 1)
    begin = max(0, i_lo + shift - left) if left >= 0 else 0
    return begin, max(begin, end)


def _makespan(costs: Sequence[float], slots: int) -> float:
    """Longest-first list scheduling of `costs` onto `slots` equal workers."""
    loads = [0.0] * min(slots, max(1, len(costs)))
    heapq.heapify(loads)
    for c in sorted(costs, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + c)
    return max(loads)


class MixedSchedule(NamedTuple):
    table: list          # rows (kind, b, head, block) of the mixed kernel's work table
    num_splits: int      # KV splits of each decode unit (one cluster)
    warps_m: int         # decode CTAs' warps along the GQA-packed rows
    decode_max_q: int    # most new queries of a decode-role sequence
    estimated_us: float  # the cost model's makespan


def schedule_mixed(q_lens, k_lens, heads_q, heads_kv, head_dim, causal, window, clusters: bool,
                   sms: int, forced_splits=None) -> MixedSchedule:
    """The work table of one mixed launch (cuda/mixed/mixed_params.h): prefill
    tiles for sequences of more than DECODE_MAX_Q new queries, decode units
    (one CTA per split, a cluster) for the others, in longest-first order.

    The split count minimizes the makespan of a longest-first list schedule
    over two CTAs per SM under a coarse cost model (a prefill tile's FLOPs at
    a tensor-core rate, a decode CTA's bytes at its SM's share of HBM); splits
    above 1 need clusters (sm90)."""
    group = heads_q // heads_kv
    left, right = window
    d = head_dim
    decode_rows = [b for b, q in enumerate(q_lens) if 1 <= q <= DECODE_MAX_Q]
    if not decode_rows:
        raise ValueError("fastattn: schedule_mixed: no decode-role sequence")
    dq = max(q_lens[b] for b in decode_rows)
    m_tiles = -(-group * dq // 16)
    warps_m = 1 if m_tiles <= 1 else (2 if m_tiles == 2 else 4)
    rows_cta = 16 * warps_m
    is_decode = set(decode_rows)

    # Prefill tiles (sequence, q head, m-block) and their cost.
    tiles = []
    for b, (sq, sk) in enumerate(zip(q_lens, k_lens)):
        if b in is_decode or sq == 0:
            continue
        for m in range(-(-sq // _FWD_BLOCK_M)):
            i_lo, i_hi = m * _FWD_BLOCK_M, min(sq, (m + 1) * _FWD_BLOCK_M) - 1
            lo, hi = _visible_keys(i_lo, i_hi, sq, sk, causal, left, right)
            cost = _FWD_BLOCK_M * (hi - lo) * d * 4 / _TILE_FLOPS
            tiles += [(cost, b, h, m) for h in range(heads_q)]
    # Decode units (keys seen, sequence, KV head, m-block).
    units = []
    for b in decode_rows:
        sq, sk = q_lens[b], k_lens[b]
        lo, hi = _visible_keys(0, sq - 1, sq, sk, causal, left, right)
        for mb in range(-(-group * sq // rows_cta)):
            units += [(hi - lo, b, hk, mb) for hk in range(heads_kv)]

    def decode_cost(keys, splits):
        per = -(-keys // (splits * _DECODE_BLOCK_N)) * _DECODE_BLOCK_N
        return max(per * d * 4 / _SM_BYTES, rows_cta * per * d * 4 / _TILE_FLOPS) + 2e-6

    max_keys = max(u[0] for u in units)
    if forced_splits is not None:
        choices = [int(forced_splits)]
        if choices[0] > 1 and not clusters:
            raise ValueError("fastattn: BatchAttention.plan: num_splits > 1 needs thread-block "
                             "clusters (sm90+)")
    elif not clusters:
        choices = [1]
    else:
        choices = [s for s in (1, 2, 4, 8) if s == 1 or max_keys >= s * _MIN_SPLIT_KEYS]
    best = None
    for s in choices:
        costs = [t[0] for t in tiles] + [decode_cost(u[0], s) for u in units for _ in range(s)]
        span = _makespan(costs, 2 * sms)
        if best is None or span < best[0] * 0.98:
            best = (span, s)
    splits = best[1]

    # Cluster-sized groups (splits CTAs each), longest first: a decode unit is
    # one group (split s at rank s); prefill tiles fill groups of their own.
    groups = [(decode_cost(k, splits), [(_KIND_DECODE, b, hk, mb * splits + s) for s in range(splits)])
              for k, b, hk, mb in units]
    tiles.sort(key=lambda t: -t[0])
    for i in range(0, len(tiles), splits):
        chunk = tiles[i:i + splits]
        items = [(_KIND_PREFILL, b, h, m) for _, b, h, m in chunk]
        items += [(_KIND_IDLE, 0, 0, 0)] * (splits - len(items))
        groups.append((chunk[0][0], items))
    groups.sort(key=lambda g: -g[0])
    table = [item for _, items in groups for item in items]
    return MixedSchedule(table, splits, warps_m, dq, best[0] * 1e6)


class BatchAttention:
    """One serving step's attention over a paged KV cache, planned once and run
    for every layer (FlashInfer's plan/run split).

    plan(seqlens_q, seqlens_k, ...) takes the new queries and the keys (cached
    context plus the new tokens, already appended) of each sequence as host
    ints; run(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table) takes
    the device tensors that describe the same batch (cu_seqlens_q = prefix sums
    of seqlens_q; masks align bottom-right, so a chunk's last query sees its
    sequence's last key) and returns flash_attn_varlen_func's result.

    How it runs (``self.mode``; ``launch=`` in plan forces one):
      "mixed"   one launch of prefill tiles and decode CTAs (CUDA, 16-bit
                cache, head dims <= 128; splits merge in a cluster on sm90).
      "decode"  every sequence has the same number (<= 16) of new queries: the
                split-KV decode kernel alone.
      "split"   the paged forward kernel over the prefill chunks, then the
                split-KV decode kernel over the decode rows (one launch per
                distinct query count), into one output: CUDA with an FP8 cache
                (decode rows read the codes in the kernel; only the chunks'
                pages are dequantized) or head dims > 128.
      "paged"   the paged forward kernel over every row, one launch (CPU, no
                decode rows).
    A captured CUDA graph may replay a plan with new cache contents and
    lengths no larger than the planned ones.
    """

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else None
        self.mode = None

    def plan(self, seqlens_q, seqlens_k, *, num_heads_q: int, num_heads_kv: int, head_dim: int,
             page_size: int, dtype=torch.bfloat16, kv_dtype=None, causal: bool = True,
             window_size=(-1, -1), num_splits: Optional[int] = None,
             launch: str = "auto") -> "BatchAttention":
        q_lens = _host_ints(seqlens_q, "seqlens_q")
        k_lens = _host_ints(seqlens_k, "seqlens_k")
        if len(q_lens) != len(k_lens) or not q_lens:
            raise ValueError("fastattn: BatchAttention.plan: seqlens_q and seqlens_k must be "
                             f"non-empty and of one length, got {len(q_lens)} and {len(k_lens)}")
        if any(q > k for q, k in zip(q_lens, k_lens)):
            raise ValueError("fastattn: BatchAttention.plan: a sequence has more new queries than "
                             "keys (seqlens_k counts the cached context plus the new tokens)")
        if num_heads_q <= 0 or num_heads_kv <= 0 or num_heads_q % num_heads_kv:
            raise ValueError("fastattn: BatchAttention.plan: num_heads_q must be a positive "
                             f"multiple of num_heads_kv, got {num_heads_q} and {num_heads_kv}")
        if num_splits is not None and not 1 <= int(num_splits) <= _MAX_SPLITS:
            raise ValueError(f"fastattn: BatchAttention.plan: num_splits must be in [1, {_MAX_SPLITS}]")
        left, right = (-1 if w is None or w < 0 else int(w) for w in window_size)
        device = self.device if self.device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
            else torch.device("cpu"))
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.device = device
        self.batch = len(q_lens)
        self.heads_q, self.heads_kv, self.head_dim = num_heads_q, num_heads_kv, head_dim
        self.page_size, self.dtype, self.kv_dtype = page_size, dtype, kv_dtype
        self.causal, self.window = bool(causal), (left, right)
        self.total_q = sum(q_lens)
        self.max_seqlen_q = max(q_lens)
        self.seqlens_q, self.seqlens_k = q_lens, k_lens
        self.num_splits, self.warps_m, self.decode_max_q = 1, 1, 0
        self.work = None

        if launch not in ("auto", "mixed", "decode", "split", "paged"):
            raise ValueError(f"fastattn: BatchAttention.plan: launch must be auto, mixed, decode, "
                             f"split or paged, got {launch!r}")
        decode_rows = [b for b, q in enumerate(q_lens) if 1 <= q <= DECODE_MAX_Q]
        uniform = 1 <= self.max_seqlen_q <= DECODE_MAX_Q and all(q == self.max_seqlen_q for q in q_lens)
        one_launch = (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
                      and kv_dtype == dtype and head_dim <= 128 and bool(decode_rows))
        if launch == "auto":
            if uniform:
                launch = "decode"
            elif not decode_rows or device.type != "cuda":
                launch = "paged"
            else:
                launch = "mixed" if one_launch else "split"
        if launch == "decode" and not uniform:
            raise ValueError("fastattn: BatchAttention.plan: launch='decode' needs every sequence to "
                             f"have the same number (<= {DECODE_MAX_Q}) of new queries")
        if launch == "mixed" and not one_launch:
            raise ValueError("fastattn: BatchAttention.plan: launch='mixed' needs a CUDA device, a "
                             "16-bit cache of q's dtype, head_dim <= 128 and a sequence of <= "
                             f"{DECODE_MAX_Q} new queries")
        self.mode = launch
        if launch == "mixed":
            clusters = torch.cuda.get_device_capability(device)[0] >= 9
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            self._plan_mixed(decode_rows, clusters, sms, num_splits)
        elif launch == "split":
            self._plan_split(decode_rows)
        return self

    def _plan_split(self, decode_rows):
        """Index tensors of the two launches: the prefill sequences (those
        with more new queries) and their rows, and per distinct query count
        the decode sequences and their rows."""
        cu = [0]
        for n in self.seqlens_q:
            cu.append(cu[-1] + n)
        dev = self.device
        as_index = lambda xs: torch.tensor(xs, dtype=torch.int64).to(dev)  # noqa: E731
        is_decode = set(decode_rows)
        prefill = [b for b, n in enumerate(self.seqlens_q) if n > 0 and b not in is_decode]
        self.prefill_seqs = as_index(prefill)
        self.prefill_rows = as_index([r for b in prefill for r in range(cu[b], cu[b + 1])])
        pcu = [0]
        for b in prefill:
            pcu.append(pcu[-1] + self.seqlens_q[b])
        self.prefill_cu = torch.tensor(pcu, dtype=torch.int32).to(dev)
        self.prefill_max_q = max((self.seqlens_q[b] for b in prefill), default=0)
        self.decode_groups = []
        for n in sorted({self.seqlens_q[b] for b in decode_rows}):
            seqs = [b for b in decode_rows if self.seqlens_q[b] == n]
            self.decode_groups.append((n, as_index(seqs),
                                       as_index([r for b in seqs for r in range(cu[b], cu[b + 1])])))

    def _plan_mixed(self, decode_rows, clusters: bool, sms: int, forced_splits):
        sched = schedule_mixed(self.seqlens_q, self.seqlens_k, self.heads_q, self.heads_kv,
                               self.head_dim, self.causal, self.window, clusters, sms, forced_splits)
        self.num_splits, self.warps_m, self.decode_max_q = sched.num_splits, sched.warps_m, sched.decode_max_q
        self.estimated_us = sched.estimated_us
        self.work = torch.tensor(sched.table, dtype=torch.int32).to(self.device)

    def check_batch(self, q, cu_seqlens_q, seqlens_k, k_cache):
        """Raises unless q / the lengths / the cache describe the planned batch
        (its shapes: the lengths themselves are device data)."""
        if self.mode is None:
            raise RuntimeError("fastattn: BatchAttention used before plan()")
        if q.dim() != 3 or tuple(q.shape) != (self.total_q, self.heads_q, self.head_dim):
            raise ValueError(f"fastattn: BatchAttention: q must be (total_q, Hq, D) = "
                             f"({self.total_q}, {self.heads_q}, {self.head_dim}) as planned, got "
                             f"{tuple(q.shape)}")
        if cu_seqlens_q.numel() != self.batch + 1 or seqlens_k.numel() != self.batch:
            raise ValueError(f"fastattn: BatchAttention: the plan has {self.batch} sequences; got "
                             f"cu_seqlens_q of {cu_seqlens_q.numel()} and seqlens_k of "
                             f"{seqlens_k.numel()} entries")
        if k_cache.dim() != 4 or k_cache.shape[2] != self.heads_kv or k_cache.dtype != self.kv_dtype:
            raise ValueError(f"fastattn: BatchAttention: the plan is for a {self.kv_dtype} cache with "
                             f"{self.heads_kv} KV heads, got {k_cache.dtype} {tuple(k_cache.shape)}")
        if q.device.type != self.device.type:
            raise ValueError(f"fastattn: BatchAttention: planned for {self.device}, got q on {q.device}")

    # -- run ------------------------------------------------------------------------
    def run(self, q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, *, softmax_scale=None,
            softcap: float = 0.0, alibi_slopes=None, k_descale=None, v_descale=None,
            return_lse: bool = False):
        """out (total_q, Hq, D), and lse (Hq, total_q) float32 with return_lse."""
        if self.mode is None:
            raise RuntimeError("fastattn: BatchAttention.run before plan()")
        scale = self.head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)
        out, lse = paged_varlen_attention(
            q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, self.max_seqlen_q, scale,
            self.causal, self.window[0], self.window[1], float(softcap or 0.0), alibi_slopes,
            k_descale=k_descale, v_descale=v_descale, plan=self)
        return (out, lse) if return_lse else out


def _check_paged_block_size(k_cache):
    bs = k_cache.shape[1] if k_cache.dim() == 4 else 0
    if k_cache.is_cuda and bs & (bs - 1):
        raise NotImplementedError(f"fastattn: the CUDA paged kernels take power-of-two block sizes "
                                  f"(1, 2, 4, ..., 256, ...), got block_size={bs} (the CPU backend "
                                  f"takes any)")


def _power_of_two_pages(k_cache, v_cache, block_table):
    """The paged kernels address a page's rows with shifts and masks. A block size that
    is not a power of two (flash-attn takes any multiple of 256, e.g. 768) is served as
    pages of its largest power-of-two divisor: with block_size = m * 2^j, page p becomes
    pages m p .. m p + m - 1 of 2^j rows, a view of the same pool (appends through it land
    in the caller's cache), and the block table expands to match (a small device op, no
    sync). Returns (k_cache, v_cache, block_table) unchanged for power-of-two sizes."""
    bs = k_cache.shape[1] if k_cache.dim() == 4 else 0
    if bs == 0 or bs & (bs - 1) == 0 or v_cache.dim() != 4 or v_cache.shape[1] != bs:
        return k_cache, v_cache, block_table
    sub = bs & -bs
    m = bs // sub
    if any(c.stride(0) != bs * c.stride(1) for c in (k_cache, v_cache)):
        _check_paged_block_size(k_cache)  # the CPU backend takes the pages as they are
        return k_cache, v_cache, block_table
    split = lambda c: c.view(c.shape[0] * m, sub, *c.shape[2:])  # noqa: E731
    sub_pages = torch.arange(m, device=block_table.device, dtype=torch.int32)
    table = (block_table.to(torch.int32)[..., None] * m + sub_pages).flatten(-2)
    return split(k_cache), split(v_cache), table


def paged_varlen_attention(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, max_seqlen_q,
                           scale, causal, left, right, softcap, slopes, dropout_p=0.0, rng_state=None,
                           k_descale=None, v_descale=None, plan: Optional[BatchAttention] = None):
    """flash_attn_varlen_func's paged path: (out, lse (Hq, total_q)). With a
    plan, its mode picks the kernels; without one, a uniform batch of <= 16 new
    queries per sequence is a decode step and anything else one paged forward
    launch."""
    batch, sq = cu_seqlens_q.numel() - 1, int(max_seqlen_q)
    k_cache, v_cache, block_table = _power_of_two_pages(k_cache, v_cache, block_table)
    fp8 = is_fp8_kv(k_cache)
    k_descale = kv_scale_tensor(k_descale, "k_descale", q.device, fp8)
    v_descale = kv_scale_tensor(v_descale, "v_descale", q.device, fp8)
    if plan is not None:
        plan.check_batch(q, cu_seqlens_q, seqlens_k, k_cache)
    if plan is not None and rng_state is None:
        mode = plan.mode
    else:
        uniform = 1 <= sq <= DECODE_MAX_Q and q.shape[0] == batch * sq
        mode = "decode" if rng_state is None and q.dim() == 3 and uniform else "paged"
    if mode == "mixed" and (fp8 or q.device.type != "cuda"):
        mode = "paged"
    if mode == "decode":
        # The split-KV decode kernel packs a KV head's query heads into one
        # tile and splits long contexts; the forward kernel would spend a
        # 128-row tile per decode row (2-4x slower, benchmarks/paged.py).
        out, lse = ops.decode(q.reshape(batch, sq, *q.shape[1:]), k_cache, v_cache, seqlens_k, None,
                              block_table, scale, bool(causal), left, right, 0, softcap, slopes, None,
                              k_descale, v_descale)
        return out.reshape(q.shape), lse.permute(1, 0, 2).reshape(q.shape[1], batch * sq)
    if mode == "split":
        return _split_launches(q, k_cache, v_cache, seqlens_k, block_table, scale, causal, left, right,
                               softcap, slopes, k_descale, v_descale, plan)
    if mode == "mixed":
        return ops.mixed_fwd(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, plan.work,
                             sq, plan.decode_max_q, plan.num_splits, plan.warps_m, scale,
                             bool(causal), left, right, softcap, slopes)
    if fp8:
        k_cache, v_cache, block_table = dequantized_pages(k_cache, v_cache, block_table, k_descale,
                                                          v_descale, q.dtype)
    return ops.paged_fwd(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, sq, scale,
                         bool(causal), left, right, softcap, slopes, dropout_p, rng_state)


def _split_launches(q, k_cache, v_cache, seqlens_k, block_table, scale, causal, left, right, softcap,
                    slopes, k_descale, v_descale, plan):
    """A "split" plan: the prefill chunks through the paged forward kernel and
    the decode rows through the split-KV decode kernel, into one (out, lse)."""
    heads = q.shape[1]
    out = q.new_empty(q.shape)
    lse = torch.empty(heads, q.shape[0], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)

    def per_seq(x, seqs):  # an (Hkv,) / (1,) descale or alibi row applies to all; (B, ...) is indexed
        return x[seqs] if x is not None and x.dim() == 2 else x

    if plan.prefill_rows.numel():
        seqs = plan.prefill_seqs
        kc, vc, table = k_cache, v_cache, block_table[seqs]
        if is_fp8_kv(k_cache):
            kc, vc, table = dequantized_pages(kc, vc, table, per_seq(k_descale, seqs),
                                              per_seq(v_descale, seqs), q.dtype)
        o, l = ops.paged_fwd(q[plan.prefill_rows], kc, vc, plan.prefill_cu, seqlens_k[seqs], table,
                             plan.prefill_max_q, scale, bool(causal), left, right, softcap,
                             per_seq(slopes, seqs))
        out[plan.prefill_rows] = o
        lse[:, plan.prefill_rows] = l
    for n, seqs, rows in plan.decode_groups:
        o, l = ops.decode(q[rows].reshape(-1, n, *q.shape[1:]), k_cache, v_cache, seqlens_k[seqs], None,
                          block_table[seqs], scale, bool(causal), left, right, 0, softcap,
                          per_seq(slopes, seqs), None, per_seq(k_descale, seqs), per_seq(v_descale, seqs))
        out[rows] = o.reshape(-1, *q.shape[1:])
        lse[:, rows] = l.permute(1, 0, 2).reshape(heads, -1)
    return out, lse
