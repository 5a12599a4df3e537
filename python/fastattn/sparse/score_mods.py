"""Built-in score_mods for fastattn.flex_attention, evaluated inside the kernels.

FlexAttention compiles an arbitrary `score_mod(score, b, h, q_idx, kv_idx)`;
fastattn has no code generation, so it offers the score modifications models
actually use as named objects whose data the kernels read:

    alibi(slopes)                      score + slopes[h] * (kv_idx - q_idx)
    relative_position_bias(table)      score + table[h, clamp(kv_idx - q_idx, -R, R) + R]
    t5_relative_position_bias(emb)     score + emb[t5_bucket(kv_idx - q_idx), h]
    additive_bias(bias)                score + bias[b, h, q_idx, kv_idx]   (broadcast dims of size 1)

ALiBi with fixed slopes is computed in the kernel's registers. Relative
tables (and ALiBi whose slopes require grad) become one (H|1, L + S - 1)
table the kernel indexes by kv_idx - q_idx (never an L x S tensor); its
gradient is accumulated per diagonal in the backward, so slopes, tables and
embeddings that require grad are trained through ordinary autograd. Relative mods add: `alibi(s) +
relative_position_bias(t)` is one table. Softcapping belongs to the dense
kernels' training arguments (softcap=...), not to this list.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch


class KernelBias(NamedTuple):
    """What the kernels add to the scores: `bias`, a (H|1, L + S - 1) table if
    `relative` else (B|1, H|1, L, S) (or None), plus ALiBi `slopes` (H|1) float32
    computed in registers (or None)."""
    bias: Optional[torch.Tensor]
    relative: bool = False
    slopes: Optional[torch.Tensor] = None


class ScoreMod:
    """A score modification the kernels evaluate; see the module docstring."""

    def resolve(self, B: int, H: int, L: int, S: int, device):
        """A KernelBias, or (bias, relative) for subclasses that only give a tensor."""
        raise NotImplementedError

    def __add__(self, other):
        if not isinstance(other, ScoreMod):
            return NotImplemented
        return _Sum(self, other)


def _kernel_bias(mod: ScoreMod, B, H, L, S, device) -> KernelBias:
    r = mod.resolve(B, H, L, S, device)
    return r if isinstance(r, KernelBias) else KernelBias(*r)


def _relative_positions(L: int, S: int, device) -> torch.Tensor:
    """kv_idx - q_idx for table column d: d - (L - 1), d in [0, L + S - 1)."""
    return torch.arange(-(L - 1), S, device=device)


class _Relative(ScoreMod):
    def __init__(self, make_table: Callable[[int, int, object], torch.Tensor], heads: int, name: str):
        self._make, self.heads, self.name = make_table, heads, name

    def resolve(self, B, H, L, S, device):
        if self.heads not in (1, H):
            raise ValueError(f"fastattn: {self.name} has {self.heads} heads, the query {H}")
        return self._make(L, S, device), True

    def __repr__(self):
        return f"{self.name}(heads={self.heads})"


class _Dense(ScoreMod):
    def __init__(self, bias: torch.Tensor):
        self.bias = bias

    def resolve(self, B, H, L, S, device):
        b = self.bias
        if b.dim() != 4:
            raise ValueError(f"fastattn: additive_bias must be 4-D (B|1, H|1, L, S), got {tuple(b.shape)}")
        for got, want, n in zip(b.shape, (B, H, L, S), "BHLS"):
            if got not in (1, want):
                raise ValueError(f"fastattn: additive_bias {tuple(b.shape)} does not broadcast to "
                                 f"({B}, {H}, {L}, {S}) (dim {n})")
        if b.device != torch.device(device):
            raise ValueError(f"fastattn: additive_bias is on {b.device}, the query on {device}")
        return b, False

    def __repr__(self):
        return f"additive_bias({tuple(self.bias.shape)})"


class _Sum(ScoreMod):
    def __init__(self, a: ScoreMod, b: ScoreMod):
        self.a, self.b = a, b

    def resolve(self, B, H, L, S, device):
        ra = _kernel_bias(self.a, B, H, L, S, device)
        rb = _kernel_bias(self.b, B, H, L, S, device)
        if ra.bias is not None and rb.bias is not None and ra.relative != rb.relative:
            raise NotImplementedError("fastattn: score_mod = a relative mod + additive_bias is not "
                                      "supported (fold the relative part into the additive bias)")
        add = lambda x, y: x if y is None else (y if x is None else x + y)
        relative = ra.relative if ra.bias is not None else rb.relative
        return KernelBias(add(ra.bias, rb.bias), relative, add(ra.slopes, rb.slopes))

    def __repr__(self):
        return f"{self.a!r} + {self.b!r}"


class _Alibi(ScoreMod):
    def __init__(self, slopes: torch.Tensor):
        self.slopes = slopes

    def resolve(self, B, H, L, S, device):
        s = self.slopes
        if s.shape[0] not in (1, H):
            raise ValueError(f"fastattn: alibi has {s.shape[0]} heads, the query {H}")
        s = s.to(device)
        if s.requires_grad and torch.is_grad_enabled():
            # Trainable slopes: as a relative table, whose gradient the backward accumulates.
            return KernelBias(_float_table(s)[:, None] * _relative_positions(L, S, device).to(
                _float_table(s).dtype)[None, :], True)
        # Fixed slopes: computed in the kernel's registers, no table read.
        return KernelBias(None, False, s.detach().float().contiguous())

    def __repr__(self):
        return f"alibi(heads={self.slopes.shape[0]})"


def _float_table(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """ALiBi (Press et al.): score + slopes[h] * (kv_idx - q_idx); slopes (H,) or a
    float for every head. Constant per query row up to the linear term, so the
    alignment of q and kv positions does not change the output (only lse)."""
    if not isinstance(slopes, torch.Tensor):
        slopes = torch.tensor([float(slopes)])
    if slopes.dim() != 1:
        raise ValueError(f"fastattn: alibi slopes must be (H,), got {tuple(slopes.shape)}")
    return _Alibi(slopes)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes 2^(-8 i / n) (interleaved for non-powers of two)."""
    def powers(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    p2 = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = powers(p2)
    if p2 < n_heads:
        slopes += powers(2 * p2)[0::2][: n_heads - p2]
    return torch.tensor(slopes)


def relative_position_bias(table: torch.Tensor) -> ScoreMod:
    """score + table[h, clamp(kv_idx - q_idx, -R, R) + R] for a learned table
    (H|1, 2R + 1): distances beyond R share the edge entries (Shaw et al. /
    clipped relative positions)."""
    if table.dim() != 2 or table.shape[1] % 2 != 1:
        raise ValueError(f"fastattn: relative_position_bias table must be (H|1, 2R + 1), got "
                         f"{tuple(table.shape)}")
    R = table.shape[1] // 2

    def make(L, S, device):
        d = _relative_positions(L, S, device).clamp(-R, R) + R
        return _float_table(table)[:, d]

    return _Relative(make, table.shape[0], "relative_position_bias")


def t5_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
              max_distance: int = 128) -> torch.Tensor:
    """T5's bucket of each relative position kv_idx - q_idx: exact buckets for
    small distances, logarithmic ones up to max_distance (the rule of Raffel et
    al., as transformers' T5Attention._relative_position_bucket)."""
    rp = relative_position
    bucket = torch.zeros_like(rp)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rp > 0).to(rp.dtype) * num_buckets
        rp = rp.abs()
    else:
        rp = -torch.clamp(rp, max=0)
    max_exact = num_buckets // 2
    is_small = rp < max_exact
    large = max_exact + (torch.log(rp.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(rp.dtype)
    large = torch.clamp(large, max=num_buckets - 1)
    return bucket + torch.where(is_small, rp, large)


def t5_relative_position_bias(embedding: torch.Tensor, bidirectional: bool = True,
                              max_distance: int = 128) -> ScoreMod:
    """T5 relative attention bias: score + embedding[t5_bucket(kv_idx - q_idx), h]
    with embedding (num_buckets, H), e.g. a T5 layer's
    `relative_attention_bias.weight` (trained through this op)."""
    if embedding.dim() != 2:
        raise ValueError(f"fastattn: t5_relative_position_bias embedding must be (num_buckets, H), got "
                         f"{tuple(embedding.shape)}")
    num_buckets = embedding.shape[0]

    def make(L, S, device):
        buckets = t5_bucket(_relative_positions(L, S, device), bidirectional, num_buckets, max_distance)
        return _float_table(embedding)[buckets].t()

    return _Relative(make, embedding.shape[1], "t5_relative_position_bias")


def additive_bias(bias: torch.Tensor) -> ScoreMod:
    """score + bias[b, h, q_idx, kv_idx], bias broadcastable as (B|1, H|1, L, S)
    (a float attn_mask; its gradient is returned when it requires grad)."""
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise ValueError("fastattn: additive_bias takes a floating-point tensor")
    return _Dense(bias)


def resolve_score_mod(score_mod: Optional[object], B, H, L, S, device) -> KernelBias:
    """What the kernels add for score_mod (KernelBias(None) for None)."""
    if score_mod is None:
        return KernelBias(None)
    if not isinstance(score_mod, ScoreMod):
        raise NotImplementedError(
            "fastattn: flex_attention's score_mod must be None or a built-in from fastattn.sparse "
            "(alibi, relative_position_bias, t5_relative_position_bias, additive_bias); an arbitrary "
            f"callable ({type(score_mod).__name__}) needs code generation, which fastattn does not do")
    return _kernel_bias(score_mod, B, H, L, S, device)
