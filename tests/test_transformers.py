"""fastattn as a transformers attention backend (attn_implementation="fastattn").

Tiny random-weight Llama (GQA) and Mistral (sliding window) models run
against the same weights under "sdpa": logits of a padded batch, one training
step's gradients, and greedy generation of a left-padded batch. Every
attention call is counted: each must reach fastattn's function, and torch's
SDPA must never run.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import fastattn.integrations.transformers as fx  # noqa: E402
from conftest import DEVICES  # noqa: E402

LAYERS = 2


def _config(kind):
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.2, attention_dropout=0.0)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    # a window shorter than the sequences, so the window really masks
    return transformers.MistralConfig(sliding_window=6, **common)


class Counter:
    def __init__(self):
        self.fastattn = 0
        self.sdpa = 0


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of fastattn's attention function and of torch's SDPA."""
    c = Counter()
    inner = fx.fastattn_attention_forward

    def counting(*args, **kwargs):
        c.fastattn += 1
        return inner(*args, **kwargs)

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        c.sdpa += 1
        return sdpa(*args, **kwargs)

    transformers.AttentionInterface.register(fx.NAME, counting)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    yield c
    transformers.AttentionInterface.register(fx.NAME, inner)


def _models(kind, device, dtype):
    torch.manual_seed(0)
    cfg = _config(kind)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fastattn")
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    ref.load_state_dict(ours.state_dict())
    ours.to(device=device, dtype=dtype)
    ref.to(device=device, dtype=dtype)
    assert ours.config._attn_implementation == "fastattn"
    return ours, ref


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def _tol(dtype):
    return dict(rtol=0, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.1)


def _batch(device, lengths, S, left=False):
    ids = torch.randint(0, 101, (len(lengths), S), device=device)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        if left:
            mask[b, S - n:] = 1
        else:
            mask[b, :n] = 1
    return ids, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_logits_and_training_step_match_sdpa(device, kind, counted):
    dtype = _dtype(device)
    ours, ref = _models(kind, device, dtype)
    ids, mask = _batch(device, [19, 11, 1], 19)
    real = mask.bool()

    out_ours = ours(ids, attention_mask=mask, labels=ids.masked_fill(~real, -100))
    counted_forward = counted.fastattn
    out_ref = ref(ids, attention_mask=mask, labels=ids.masked_fill(~real, -100))
    assert counted_forward == LAYERS
    torch.testing.assert_close(out_ours.logits[real], out_ref.logits[real], **_tol(dtype))

    out_ours.loss.backward()
    out_ref.loss.backward()
    assert counted.fastattn == LAYERS  # the backward reuses the forward's graph
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        scale = p_ref.grad.abs().max().item() + 1e-6
        err = (p.grad.float() - p_ref.grad.float()).abs().max().item()
        assert err <= (1e-4 if dtype == torch.float32 else 0.08) * scale, (name, err, scale)
    sdpa_calls = counted.sdpa
    # the reference model is the only SDPA user
    assert sdpa_calls == LAYERS


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_generate_left_padded_batch_matches_sdpa(device, kind, counted):
    dtype = _dtype(device)
    ours, ref = _models(kind, device, dtype)
    ids, mask = _batch(device, [13, 7, 2], 13, left=True)
    new = 8
    gen = ours.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                        pad_token_id=0)
    assert counted.sdpa == 0
    assert counted.fastattn == LAYERS * new  # a prefill and new - 1 decode steps, every layer
    gen_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(gen, gen_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_sequences_by_position_ids(device, counted):
    """One row holding three sequences (position_ids restart at 0) equals the three run alone."""
    dtype = _dtype(device)
    ours, _ = _models("llama", device, dtype)
    lens = [5, 9, 3]
    seqs = [torch.randint(0, 101, (1, n), device=device) for n in lens]
    packed = torch.cat(seqs, 1)
    pos = torch.cat([torch.arange(n, device=device) for n in lens])[None]
    logits = ours(packed, position_ids=pos).logits[0]
    alone = torch.cat([ours(s).logits[0] for s in seqs])
    torch.testing.assert_close(logits, alone, **_tol(dtype))
    assert counted.sdpa == 0 and counted.fastattn == 4 * LAYERS


def test_unsupported_arguments_raise():
    q = torch.randn(1, 4, 5, 32)
    k = torch.randn(1, 2, 5, 32)

    class M(torch.nn.Module):
        is_causal = True

    for kwargs, what in [({"output_attentions": True}, "output_attentions")]:
        with pytest.raises(NotImplementedError, match=what):
            fx.fastattn_attention_forward(M(), q, k, k, None, **kwargs)
    with pytest.raises(ValueError, match="3-D one"):
        fx.fastattn_attention_forward(M(), q, k, k, torch.ones(1, 5, 5, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="softcap with a 4-D attention mask"):
        fx.fastattn_attention_forward(M(), q, k, k, torch.ones(1, 1, 5, 5, dtype=torch.bool), softcap=5.0)
    with pytest.raises(NotImplementedError, match="sinks with a 4-D attention mask"):
        fx.fastattn_attention_forward(M(), q, k, k, torch.ones(1, 1, 5, 5, dtype=torch.bool), s_aux=torch.zeros(4))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_custom_4d_mask(kind, monkeypatch):
    """A model's own 4-D mask (here block-diagonal causal: two packed sequences, and a
    per-batch pattern) runs in fastattn's kernels: output and gradients match the float64
    masked math, GQA included."""
    class M(torch.nn.Module):
        is_causal = True

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 11, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 11, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 11, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    doc = torch.tensor([0] * 6 + [1] * 5)
    pos = torch.arange(11)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    allowed = torch.stack([allowed, pos[None, :] <= pos[:, None]])[:, None]  # (2, 1, 11, 11)
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(
        ~allowed, torch.finfo(torch.float64).min)
    import fastattn.functional as ff

    def no_fallback(*args, **kwargs):
        raise AssertionError("the 4-D mask went to torch's SDPA")

    monkeypatch.setattr(ff, "_torch_sdpa", no_fallback)
    out, _ = fx.fastattn_attention_forward(M(), q, k, v, mask, scaling=0.3)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    ref = (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * do).sum(), [q, k, v]),
                    torch.autograd.grad((ref * do).sum(), [q, k, v])):
        torch.testing.assert_close(a, b)


def test_model_trains_with_attention_dropout():
    """config.attention_dropout reaches the kernels in training (models pass 0 in eval)."""
    cfg = _config("llama")
    cfg.attention_dropout = 0.3
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn")
    ids = torch.randint(0, 101, (2, 9))
    model.eval()
    ref = model(ids).logits
    assert torch.equal(ref, model(ids).logits)
    model.train()
    torch.manual_seed(11)
    a = model(ids).logits
    torch.manual_seed(11)
    b = model(ids).logits
    assert torch.equal(a, b) and not torch.allclose(a, ref)
    a.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_patched_sdpa_padded_generate_never_falls_back(device, monkeypatch):
    """A padded-batch generate of an "sdpa" model under patch_sdpa(): every attention
    call (bool padding masks included) runs in fastattn, none reaches torch's SDPA."""
    import fastattn
    import fastattn.functional as ff

    dtype = _dtype(device)
    torch.manual_seed(0)
    cfg = _config("llama")
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    model.to(device=device, dtype=dtype)
    ids, mask = _batch(device, [13, 7, 2], 13, left=True)
    new = 6
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    ref_logits = model(ids, attention_mask=mask).logits

    calls = {"torch": 0, "ours": 0}
    torch_sdpa = ff._torch_sdpa
    ours_sdpa = ff.scaled_dot_product_attention

    def counting_torch(*a, **k):
        calls["torch"] += 1
        return torch_sdpa(*a, **k)

    def counting_ours(*a, **k):
        calls["ours"] += 1
        return ours_sdpa(*a, **k)

    # monkeypatch restores torch's function whatever patch / unpatch leave behind
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", torch_sdpa)
    monkeypatch.setattr(ff, "_torch_sdpa", counting_torch)
    monkeypatch.setattr(ff, "scaled_dot_product_attention", counting_ours)
    fastattn.patch_sdpa()
    try:
        logits = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    finally:
        fastattn.unpatch_sdpa()
    assert calls["ours"] >= LAYERS * (new + 1)
    assert calls["torch"] == 0
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], **_tol(dtype))
    assert torch.equal(gen, ref)


def _match_eager(cfg, device, grads_of, prepare=None):
    """A random-weight model of cfg under "fastattn" against the same weights under
    "eager": logits of a padded batch, then the gradients of the parameters whose names
    grads_of accepts. Returns the eager model and the batch."""
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fastattn")
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager")
    if prepare is not None:
        prepare(ours)
    ref.load_state_dict(ours.state_dict())
    dtype = _dtype(device)
    ours.to(device=device, dtype=dtype)
    ref.to(device=device, dtype=dtype)
    ids, mask = _batch(device, [12, 7], 12)
    lo = ours(input_ids=ids, attention_mask=mask).logits
    lr = ref(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(lo[keep].float(), lr[keep].float(), **_tol(dtype))
    lo[keep].float().square().mean().backward()
    lr[keep].float().square().mean().backward()
    checked = 0
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        if grads_of(name):
            torch.testing.assert_close(a.grad.float(), b.grad.float(), **_tol(dtype), msg=name)
            checked += 1
    assert checked > 0
    return ref, ids, mask


@pytest.mark.parametrize("device", DEVICES)
def test_deepseek_v3_latent_attention_matches_eager(device):
    """A tiny random-weight DeepSeek V3 (multi-head latent attention: q/k head dim 48 + 16
    rotary, v head dim 32): the backend pads v to the q/k head dim and cuts the output
    back; logits of a padded batch and the attention weights' gradients match eager."""
    if not hasattr(transformers, "DeepseekV3Config"):
        pytest.skip("this transformers has no DeepSeek V3")
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(vocab_size=101, hidden_size=64, intermediate_size=96,
                                        moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=1,
                                        n_group=1, topk_group=1, first_k_dense_replace=2, kv_lora_rank=32,
                                        q_lora_rank=None, qk_nope_head_dim=48, qk_rope_head_dim=16,
                                        v_head_dim=32, max_position_embeddings=256, initializer_range=0.2)
    _match_eager(cfg, device, lambda name: "self_attn" in name)


@pytest.mark.parametrize("dqk,dv", [(64, 32), (32, 64)])
def test_value_head_dim_other_than_the_query_head_dim(dqk, dv):
    """Either side narrower: the result and the gradients are those of attention with
    the unpadded dims (scale from q's head dim)."""
    class M(torch.nn.Module):
        is_causal = True

    gen = torch.Generator().manual_seed(dqk)
    q = torch.randn(2, 4, 9, dqk, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 9, dqk, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 9, dv, generator=gen, dtype=torch.float64, requires_grad=True)
    out, _ = fx.fastattn_attention_forward(M(), q, k, v, None)
    assert out.shape == (2, 9, 4, dv)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kk.transpose(-1, -2)) * dqk ** -0.5
    s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    ref = (s.softmax(-1) @ vv).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * do).sum(), [q, k, v]),
                    torch.autograd.grad((ref * do).sum(), [q, k, v])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_gpt_oss_attention_sinks_match_eager(device):
    """A tiny random-weight gpt-oss (sinks per head, alternating sliding / full layers):
    logits of a padded batch and the sinks' gradients match the eager implementation.
    One expert: with several, bf16 rounding differences can flip a token's routing
    and move its logits far more than attention's own error."""
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=101, hidden_size=64, intermediate_size=64, head_dim=16,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    num_local_experts=1, num_experts_per_tok=1, sliding_window=6,
                                    layer_types=["sliding_attention", "full_attention"],
                                    max_position_embeddings=256, initializer_range=0.2)
    def random_sinks(model):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.randn_like(layer.self_attn.sinks) * 2)

    _match_eager(cfg, device, lambda name: name.endswith("sinks"), prepare=random_sinks)


@pytest.mark.parametrize("device", DEVICES)
def test_gemma2_softcap_matches_eager(device):
    """A tiny random-weight Gemma 2 (attn_logit_softcapping, alternating sliding / full
    layers): logits of a padded batch and one training step's gradients match eager.
    The cap is small, so it bends the scores of these random weights."""
    if not hasattr(transformers, "Gemma2Config"):
        pytest.skip("this transformers has no Gemma 2")
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=101, hidden_size=64, intermediate_size=96, head_dim=16,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    sliding_window=6, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=None, query_pre_attn_scalar=16,
                                    max_position_embeddings=256, initializer_range=0.5,
                                    attention_dropout=0.0)
    ref, ids, mask = _match_eager(cfg, device, lambda name: "self_attn" in name)
    # The cap matters for these weights: without it the logits move.
    plain = copy.deepcopy(cfg)
    plain.attn_logit_softcapping = None
    uncapped = transformers.AutoModelForCausalLM.from_config(plain, attn_implementation="eager")
    uncapped.load_state_dict(ref.state_dict())
    uncapped.to(device=device, dtype=ref.dtype)
    keep = mask.bool()
    with torch.no_grad():
        lu = uncapped(input_ids=ids, attention_mask=mask).logits
        lr = ref(input_ids=ids, attention_mask=mask).logits
    assert (lu[keep].float() - lr[keep].float()).abs().max() > 0.05
