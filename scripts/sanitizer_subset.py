"""A representative subset for compute-sanitizer (memcheck / racecheck):
forward and backward, causal and not, GQA, varlen, odd sizes.

    compute-sanitizer --tool memcheck  python scripts/sanitizer_subset.py
    compute-sanitizer --tool racecheck python scripts/sanitizer_subset.py
"""
import torch

import fastattn


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    for (B, Sq, Sk, Hq, Hkv, D, causal) in [(1, 113, 257, 4, 1, 64, True), (2, 17, 130, 2, 2, 128, False),
                                           (1, 65, 33, 2, 1, 96, True)]:
        q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dt, requires_grad=True)
        out = fastattn.flash_attn_func(q, k, v, causal=causal)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    cu_q = torch.tensor([0, 1, 18, 18, 131], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 40, 57, 60, 173], dtype=torch.int32, device="cuda")
    q = torch.randn(131, 4, 64, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(173, 2, 64, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn(173, 2, 64, device="cuda", dtype=dt, requires_grad=True)
    out = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 113, 113, causal=True)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    torch.cuda.synchronize()
    print("sanitizer subset: done")


if __name__ == "__main__":
    main()
