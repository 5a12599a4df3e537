"""Block-sparse attention: FlexAttention-compatible block masks, the kernels that
visit only their blocks, a pattern library and content-based selection.

    fastattn.sparse.BlockMask, create_block_mask, flex_attention
    patterns: causal, sliding_window, dilated_sliding_window, global_tokens, block_local,
              longformer, bigbird, star, random_blocks, document, prefix_lm; and_masks, or_masks
    content-based: topk_block_mask, topk_attention, lsh_attention, routing_attention
    score_mods (in-kernel): alibi, relative_position_bias, t5_relative_position_bias, additive_bias
"""
from .attention import flex_attention
from .block_mask import BlockMask, MaskParams, pack_bits, unpack_bits
from .bucketed import lsh_attention, lsh_buckets, routing_attention
from .build import create_block_mask, from_block_states
from .patterns import (
    and_masks,
    bigbird,
    block_local,
    causal,
    dilated_sliding_window,
    document,
    global_tokens,
    longformer,
    or_masks,
    prefix_lm,
    random_blocks,
    sliding_window,
    star,
)
from .score_mods import (
    ScoreMod,
    additive_bias,
    alibi,
    alibi_slopes,
    relative_position_bias,
    t5_bucket,
    t5_relative_position_bias,
)
from .topk import topk_attention, topk_block_mask

__all__ = [
    "BlockMask", "MaskParams", "ScoreMod", "additive_bias", "alibi", "alibi_slopes", "and_masks", "bigbird", "block_local", "causal", "create_block_mask",
    "dilated_sliding_window", "document", "flex_attention", "from_block_states", "global_tokens",
    "longformer", "lsh_attention", "lsh_buckets", "or_masks", "pack_bits", "prefix_lm", "routing_attention", "random_blocks",
    "relative_position_bias", "sliding_window", "star", "t5_bucket", "t5_relative_position_bias", "topk_attention",
    "topk_block_mask", "unpack_bits",
]
