"""A tiny hybrid decoder: gated-delta-rule layers (fastattn.linear) around one
softmax-attention layer (fastattn.flash_attn_func / flash_attn_with_kvcache).

    python examples/hybrid_linear_lm.py      # CPU, float32 (the linear layers run on the CPU for now)

Trains a few steps on sequences of a fixed rule (the loss must go down), then
generates token by token: the linear layers carry their recurrent state
(fused_recurrent_gated_delta_rule, T = 1 per step), the attention layer a KV
cache. Checks that the per-token logits reproduce the chunked forward's.
"""
import torch
import torch.nn.functional as F

import fastattn
from fastattn import linear


class GatedDeltaLayer(torch.nn.Module):
    """Qwen3-Next-style: q, k l2-normalized in the kernel, beta = sigmoid, decay
    -exp(A_log) * softplus(a + dt_bias), value heads twice the q/k heads (GVA)."""

    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.h, self.hv, self.d = heads, 2 * heads, head_dim
        self.qk = torch.nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.v = torch.nn.Linear(dim, self.hv * head_dim, bias=False)
        self.ab = torch.nn.Linear(dim, 2 * self.hv, bias=False)
        self.A_log = torch.nn.Parameter(torch.log(torch.rand(self.hv) * 4 + 1))
        self.dt_bias = torch.nn.Parameter(torch.zeros(self.hv))
        self.out = torch.nn.Linear(self.hv * head_dim, dim, bias=False)

    def forward(self, x, state=None, step=False):
        B, T, _ = x.shape
        q, k = self.qk(x).view(B, T, 2 * self.h, self.d).chunk(2, dim=2)
        v = self.v(x).view(B, T, self.hv, self.d)
        a, b = self.ab(x).chunk(2, dim=-1)
        fn = linear.fused_recurrent_gated_delta_rule if step else linear.chunk_gated_delta_rule
        o, state = fn(q, k, v, a, b, initial_state=state, output_final_state=True,
                      use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                      use_gate_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias)
        return self.out(o.reshape(B, T, -1)), state


class AttentionLayer(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x, cache=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.d).unbind(2)
        if cache is None:
            return self.out(fastattn.flash_attn_func(q, k, v, causal=True).reshape(B, T, -1)), None
        k_cache, v_cache, lens = cache  # appended in place at lens
        o = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=lens,
                                             causal=True)
        return self.out(o.reshape(B, T, -1)), (k_cache, v_cache, lens + T)


class HybridLM(torch.nn.Module):
    def __init__(self, vocab=64, dim=64, heads=2, head_dim=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList([GatedDeltaLayer(dim, heads, head_dim), AttentionLayer(dim, 4),
                                           GatedDeltaLayer(dim, heads, head_dim)])
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(dim) for _ in self.layers])
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, states=None, step=False):
        x = self.emb(tokens)
        states = list(states) if states is not None else [None] * len(self.layers)
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            if isinstance(layer, AttentionLayer):
                y, states[i] = layer(norm(x), states[i])
            else:
                y, states[i] = layer(norm(x), states[i], step=step)
            x = x + y
        return self.head(x), states


def main():
    torch.manual_seed(0)
    model = HybridLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    B, T, vocab = 8, 48, 64
    losses = []
    for _ in range(30):  # sequences of a fixed successor rule from random starts
        tokens = [torch.randint(0, vocab, (B,))]
        for _ in range(T - 1):
            tokens.append((5 * tokens[-1] + 7) % vocab)
        tokens = torch.stack(tokens, 1)
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 0.1, "the loss did not go down"

    # Token-by-token decoding reproduces the chunked forward's logits.
    model.eval()
    tokens = torch.randint(0, vocab, (2, 40))
    with torch.no_grad():
        full, _ = model(tokens)
        attn = model.layers[1]
        cache = (torch.zeros(2, 64, attn.h, attn.d), torch.zeros(2, 64, attn.h, attn.d),
                 torch.zeros(2, dtype=torch.int32))
        states = [None, cache, None]
        steps = []
        for t in range(tokens.shape[1]):
            logits, states = model(tokens[:, t:t + 1], states, step=True)
            steps.append(logits)
        stepped = torch.cat(steps, 1)
    err = (stepped - full).abs().max().item()
    print(f"token-by-token vs chunked logits: max |diff| = {err:.2e}")
    assert err < 1e-4, err
    print("ok")


if __name__ == "__main__":
    main()
