"""Quick block-sparse timing probe (no FlexAttention compile): ours at a few
random-block densities vs our dense kernel, B4 H16 S8192 D128 bf16, fwd and bwd."""
import torch

import fastattn
from fastattn import sparse
from benchmarks.common import median, time_cuda

B, H, S, D = 4, 16, 8192, 128
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
dout = torch.randn_like(q)
dense_flops = 4.0 * B * H * S * S * D
rows = []
for name, fn, frac in [("dense", lambda: fastattn.scaled_dot_product_attention(q, k, v), 1.0)] + [
        (f"random {100 * d:g}%", (lambda bm: (lambda: fastattn.flex_attention(q, k, v, block_mask=bm)))(
            sparse.random_blocks(S, density=d, B=B, H=H, device="cuda")), None) for d in (1.0, 0.25, 0.0625, 0.03)]:
    with torch.no_grad():
        f_ms = median(time_cuda(lambda i: fn(), 1, min_ms=100))
    out = fn()
    b_ms = median(time_cuda(lambda i: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), 1, min_ms=100))
    rows.append((name, f_ms, b_ms))
for name, f, b in rows:
    print(f"{name:14s} fwd {f:.3f} ms  bwd {b:.3f} ms")
