"""Context parallelism over torch.distributed: attention over a sequence that is
sharded across ranks (NCCL on GPUs, gloo on CPUs; CUDA tensors on a gloo
group are staged through host memory).

    ring_attention(q, k, v, group, causal, ..., layout="zigzag")  K/V blocks travel a ring
    ulysses_attention(q, k, v, group, ..., ring_group=None)       all-to-all to head shards
    shard_sequence / unshard_sequence / shard_varlen / unshard_varlen  layouts
"""
from .layout import shard_sequence, shard_varlen, unshard_sequence, unshard_varlen
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "shard_sequence", "unshard_sequence",
           "shard_varlen", "unshard_varlen"]
