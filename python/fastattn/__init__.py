"""fastattn: IO-aware attention kernels for PyTorch.

    fastattn.scaled_dot_product_attention(...)   drop-in for torch SDPA
    fastattn.patch_sdpa() / unpatch_sdpa()       route torch's SDPA through fastattn
    fastattn.flash_attn_func(...)                flash-attn 2.x compatible API
    fastattn.flash_attn_varlen_func(...)         ragged batches (cu_seqlens)
    fastattn.flash_attn_with_kvcache(...)        decoding over a KV cache (split-KV)
    fastattn.flash_attn_(varlen_)(qkv|kv)packed_func(...)  packed q/k/v, gradients in place
    fastattn.unpad_input(...) / pad_input(...)   padded batch <-> varlen rows
    fastattn.merge_attention_states(...)         merge partial (out, lse) over disjoint key sets
    fastattn.PagedKVCache(...)                   paged KV cache: block pool, tables, fork/COW
    fastattn.BatchAttention().plan(...).run(...)  a mixed prefill + decode step in one launch
    fastattn.cascade_attention(...), cascade_tables(...)  shared-prefix attention over paged caches
    fastattn.quest_decode(...)                   query-aware sparse decode over a paged cache
    fastattn.explain(...)                        which path an SDPA call takes
    fastattn.flex_attention(...), BlockMask, create_block_mask   block-sparse attention
    fastattn.sparse                              sparse patterns, top-k block selection
    fastattn.linear                              linear attention (fla-compatible API)
    fastattn.distributed                         context parallelism: ring / Ulysses attention
Low-level ops: torch.ops.fastattn.* (schemas in csrc/ops.cpp).
"""
from ._ops import has_cuda_kernels, ops
from .decode import flash_attn_with_kvcache, merge_attention_states, merge_attention_states_n
from .functional import (
    Route,
    explain,
    flash_attn_func,
    flash_attn_varlen_func,
    scaled_dot_product_attention,
)
from .packed import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .padding import pad_input, unpad_input
from .paged import OutOfBlocks, PagedKVCache
from .batch_attention import BatchAttention
from .cascade import CascadeTables, cascade_attention, cascade_tables
from .quest import quest_decode, quest_page_table
from . import distributed, linear, sparse
from .sparse import BlockMask, create_block_mask, flex_attention
from .patch import is_sdpa_patched, patch_sdpa, unpatch_sdpa

__version__ = "0.1.0"

__all__ = [
    "BatchAttention",
    "BlockMask",
    "CascadeTables",
    "Route",
    "cascade_attention",
    "cascade_tables",
    "create_block_mask",
    "distributed",
    "flex_attention",
    "linear",
    "sparse",
    "explain",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "has_cuda_kernels",
    "is_sdpa_patched",
    "merge_attention_states",
    "merge_attention_states_n",
    "OutOfBlocks",
    "pad_input",
    "PagedKVCache",
    "ops",
    "patch_sdpa",
    "quest_decode",
    "quest_page_table",
    "scaled_dot_product_attention",
    "unpad_input",
    "unpatch_sdpa",
]
