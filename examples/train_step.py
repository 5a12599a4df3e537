"""A few training steps of a tiny GQA transformer whose attention is fastattn.

    python examples/train_step.py            # CPU (float32) or CUDA (bfloat16) if available
Checks that the loss goes down and that fastattn matches torch SDPA's gradients.
"""
import torch
import torch.nn.functional as F

import fastattn


class Attention(torch.nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x, attention=fastattn.flash_attn_func):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, -1, self.hd).split([self.heads, self.kv_heads, self.kv_heads], 2)
        return self.out(attention(q, k, v, causal=True).reshape(B, S, -1))


def torch_attention(q, k, v, causal):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, enable_gqa=True)
    return o.transpose(1, 2)


def main():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and fastattn.has_cuda_kernels() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vocab, dim = 256, 128
    emb = torch.nn.Embedding(vocab, dim).to(device, dtype)
    attn = Attention(dim, heads=8, kv_heads=2).to(device, dtype)
    head = torch.nn.Linear(dim, vocab).to(device, dtype)
    params = [*emb.parameters(), *attn.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    tokens = torch.randint(vocab, (4, 129), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    h = emb(x)
    ours = attn(h)
    ref = attn(h, attention=lambda q, k, v, causal: torch_attention(q, k, v, causal))
    g1 = torch.autograd.grad(ours.float().square().sum(), attn.qkv.weight)[0]
    g2 = torch.autograd.grad(ref.float().square().sum(), attn.qkv.weight)[0]
    rel = ((g1 - g2).norm() / g2.norm()).item()
    print(f"device {device}, {dtype}: grad rel. diff vs torch SDPA {rel:.2e}")
    assert rel < (2e-2 if dtype == torch.bfloat16 else 1e-4)

    losses = []
    for step in range(30):
        h = emb(x)
        logits = head(h + attn(h))
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0]


if __name__ == "__main__":
    main()
