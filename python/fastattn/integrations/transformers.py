"""fastattn as a Hugging Face transformers attention backend.

    import fastattn.integrations.transformers  # registers "fastattn"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn")

Importing this module registers an attention function through
`transformers.AttentionInterface` and, for its masks, transformers' own 2-D
padding-mask builder (the one its flash-attention path uses), so a model
hands us the (batch, keys) padding mask or None instead of a dense 4-D mask.
Every attention call then runs on fastattn's kernels:

- no padding: `flash_attn_func` over (batch, seq, heads, dim) views, causal
  aligned bottom-right (decode steps and chunks over a KV cache), GQA as is;
- a padded batch: the rows are unpadded to a ragged batch
  (`flash_attn_varlen_func`) and padded back, padding rows get 0;
- packed sequences (one row holding several sequences, `position_ids`
  restarting at 0, or flash-attn style `cu_seq_lens_q/k` keyword arguments
  from `DataCollatorWithFlattening`): varlen over the packed sequences;
- `sliding_window` (Mistral, Qwen2, ...): window_size=(sliding_window - 1, 0);
- a model's own 4-D mask: fastattn's SDPA, which runs it in the kernels;
- a value head dim other than the query's (DeepSeek V2 / V3's latent attention):
  the narrower side is zero-padded, the output cut back to the value head dim.

Attention sinks (gpt-oss's s_aux) are applied through the LSE (flash_attn_func's
sinks); softcap (Gemma 2's attn_logit_softcapping) and attention dropout (the
config's attention_dropout, which models pass only in training) run in the
kernels. output_attentions=True raises NotImplementedError (the probabilities
are never materialized).
"""
import torch
import transformers
from transformers import AttentionInterface

from ..functional import flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention
from ..padding import pad_head_dims, pad_input, unpad_input

NAME = "fastattn"

def _unsupported(kwargs):
    if kwargs.get("output_attentions"):
        raise NotImplementedError("fastattn: output_attentions=True needs the attention "
                                  "probabilities, which fastattn never materializes; use "
                                  "attn_implementation='eager' for that")


def _compute_dtype(query):
    """fp32 activations under autocast run in the autocast dtype (as transformers' flash path)."""
    if query.dtype == torch.float32 and query.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return query.dtype


def _packed_cu_seqlens(position_ids, total):
    """cu_seqlens of the sequences packed in position_ids (B, S): one starts at every row
    start and wherever the position does not advance by 1. None if each row is one sequence."""
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    starts = starts.flatten()
    if int(starts.sum()) == pos.shape[0]:
        return None, 0
    begin = starts.nonzero().flatten().to(torch.int32)
    cu = torch.cat([begin, begin.new_tensor([total])])
    return cu, int((cu[1:] - cu[:-1]).max())


def fastattn_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               sliding_window=None, softcap=None, is_causal=None, s_aux=None,
                               **kwargs):
    """transformers attention function: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D),
    attention_mask the (B, Sk) bool padding mask or None. Returns ((B, Sq, Hq, D), None)."""
    _unsupported(kwargs)
    sinks = s_aux if s_aux is not None else kwargs.get("sinks")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if sliding_window is not None and sliding_window > 0:
        window = (sliding_window - 1, 0 if causal else sliding_window - 1)
    else:
        window = (-1, -1)
    dtype = _compute_dtype(query)
    # (B, H, S, D) -> (B, S, H, D): strided views, the kernels read them in place.
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (query, key, value))
    q, k, v, dv = pad_head_dims(q, k, v)  # DeepSeek V2 / V3: v narrower than q, k
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    common = dict(softmax_scale=scaling, causal=bool(causal), window_size=window, sinks=sinks,
                  softcap=softcap or 0.0, dropout_p=float(dropout or 0.0))

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and attention_mask is None and kwargs.get("position_ids") is not None and Sq == Sk:
        cu_q, max_q = _packed_cu_seqlens(kwargs["position_ids"], B * Sq)
        cu_k, max_k = cu_q, max_q
    elif cu_q is not None:
        max_q, max_k = int(kwargs["max_length_q"]), int(kwargs["max_length_k"])

    if cu_q is not None:  # packed sequences: rows of one flattened batch
        out = flash_attn_varlen_func(q.reshape(B * Sq, *q.shape[2:]), k.reshape(B * Sk, *k.shape[2:]),
                                     v.reshape(B * Sk, *v.shape[2:]), cu_q.to(torch.int32),
                                     cu_k.to(torch.int32), max_q, max_k, **common)
        out = out.reshape(B, Sq, *out.shape[1:])
    elif attention_mask is not None and attention_mask.dim() == 4:
        out = _custom_mask_attention(q, k, v, attention_mask, common)
    elif attention_mask is not None:  # padded batch: unpad to varlen, pad back
        if attention_mask.dim() != 2:
            raise ValueError(f"fastattn: expected a (batch, keys) padding mask or a 4-D attention mask, "
                             f"got a {attention_mask.dim()}-D one")
        key_mask = attention_mask[:, -Sk:]
        k_rows, k_index, cu_k, max_k, _ = unpad_input(k, key_mask)
        v_rows = v.reshape(B * Sk, *v.shape[2:])[k_index]
        q_rows, q_index, cu_q, max_q, _ = unpad_input(q, key_mask[:, -Sq:])
        out = flash_attn_varlen_func(q_rows, k_rows, v_rows, cu_q, cu_k, max_q, max_k, **common)
        out = pad_input(out, q_index, B, Sq)
    else:
        out = flash_attn_func(q, k, v, **common)
    return out[..., :dv].to(query.dtype), None


def _custom_mask_attention(q, k, v, mask, common):
    """A model's own 4-D mask ((batch|1, heads|1, queries, keys); bool: True attends, float:
    added to the scores; causality and windows are in it) through fastattn's SDPA, which runs
    it in the kernels (a bool mask as a block mask: hidden blocks are skipped)."""
    unsupported = (["sinks"] if common["sinks"] is not None else []) + (["softcap"] if common["softcap"] else [])
    if unsupported:
        raise NotImplementedError(f"fastattn: {' and '.join(unsupported)} with a 4-D attention mask are not "
                                  "supported (the padding-mask path takes them)")
    t = lambda x: x.transpose(1, 2)  # (B, S, H, D) <-> (B, H, S, D)
    out = scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, dropout_p=common["dropout_p"],
                                       scale=common["softmax_scale"], enable_gqa=q.shape[2] != k.shape[2])
    return t(out)


def register(name=NAME):
    """Register the attention function and its mask builder under `name` (done on import)."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError as e:  # transformers < 4.53 builds its masks without this interface
        raise ImportError(f"fastattn.integrations.transformers needs transformers >= 4.53, found "
                          f"{transformers.__version__}") from e
    AttentionInterface.register(name, fastattn_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])


register()
