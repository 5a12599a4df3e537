"""Dev check of the CUDA backward (torch.ops.fastattn.bwd): gradients against a
float64 autograd reference, deterministic mode, and timing against the
backward of torch SDPA's FLASH backend.

  python scripts/dev/bwd_check.py [--lib path/to/lib.so] [--bench] [--bench-only]
                                  [--hdims 64,128] [--dtypes bf16,fp16] [--quick]

out/lse come from torch.ops.fastattn.fwd when it runs on CUDA, else from the
float64 reference (out cast to the input dtype, lse float32).
Error rule, for dq, dk and dv separately:
    max |ours - ref64| <= 3 * max |torch same-precision math - ref64| + 1e-5
Inputs are random normal (never zeros); gradients are checked for NaN/inf.
The allocator is poisoned with NaN before each call (unwritten outputs show).
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import median, time_cuda  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--lib", default=None, help="load this shared library instead of importing fastattn")
p.add_argument("--bench", action="store_true")
p.add_argument("--bench-only", action="store_true")
p.add_argument("--quick", action="store_true", help="fewer correctness cases")
p.add_argument("--hdims", default="32,64,96,128,192,256")
p.add_argument("--dtypes", default="bf16,fp16")
p.add_argument("--bench-configs", default="64x32,128x16", help="hdim x heads")
p.add_argument("--bench-seqs", default="1024,4096,16384")
p.add_argument("--det-runs", type=int, default=10)
p.add_argument("--device", default="cuda", help="cpu: dry run of this script against the CPU op")
args = p.parse_args()

if args.lib:
    torch.ops.load_library(args.lib)
else:
    import fastattn  # noqa: F401

ops = torch.ops.fastattn
dev = args.device
DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
HDIMS = [int(x) for x in args.hdims.split(",")]
DTYPES = [DT[x] for x in args.dtypes.split(",")]
gen = torch.Generator(device=dev)
gen.manual_seed(4321)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=dev, dtype=torch.float32, generator=gen).to(dtype)


def poison():
    # Fill freed allocator blocks with NaN so unwritten outputs are caught.
    if dev != "cuda":
        return
    x = torch.empty(64 << 20, device=dev, dtype=torch.float32)
    x.fill_(float("nan"))
    del x


def visible(sq, sk, wl, wr, br):
    i = torch.arange(sq, device=dev)[:, None]
    j = torch.arange(sk, device=dev)[None, :]
    d = i + (sk - sq if br else 0)
    ok = torch.ones(sq, sk, dtype=torch.bool, device=dev)
    if wl >= 0:
        ok &= j >= d - wl
    if wr >= 0:
        ok &= j <= d + wr
    return ok


def attn_seq(q, k, v, scale, wl, wr, br):
    """q (Sq, Hq, D), k/v (Sk, Hkv, D), any float dtype: out (Sq, Hq, D), lse (Hq, Sq)."""
    sq, hq, _ = q.shape
    sk, hkv, _ = k.shape
    g = hq // hkv
    kk = k.repeat_interleave(g, dim=1)
    vv = v.repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    ok = visible(sq, sk, wl, wr, br)
    row_any = ok.any(dim=1)
    s = s.masked_fill(~ok, float("-inf"))
    s = torch.where(row_any[None, :, None], s, torch.zeros_like(s))
    lse = torch.logsumexp(s.float() if s.dtype != torch.float64 else s, dim=-1)
    lse = torch.where(row_any[None, :], lse, torch.full_like(lse, float("-inf")))
    pr = torch.softmax(s, dim=-1) * row_any[None, :, None].to(s.dtype)
    out = torch.einsum("hqk,khd->qhd", pr, vv)
    return out, lse


def ref_grads(q, k, v, dout, scale, wl, wr, br, cu_q=None, cu_k=None, dtype=torch.float64):
    """Gradients of the attention in `dtype` (float64 = the reference; the input
    dtype = torch's same-precision math path). Dense (B, S, H, D) or varlen."""
    qd, kd, vd = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    dd = dout.to(dtype)
    outs, lses = [], []
    if cu_q is None:
        for b in range(q.shape[0]):
            o, l = attn_seq(qd[b], kd[b], vd[b], scale, wl, wr, br)
            outs.append(o)
            lses.append(l)
        out = torch.stack(outs)
        lse = torch.stack(lses)
    else:
        cq, ck = cu_q.tolist(), cu_k.tolist()
        for b in range(len(cq) - 1):
            o, l = attn_seq(qd[cq[b]:cq[b + 1]], kd[ck[b]:ck[b + 1]], vd[ck[b]:ck[b + 1]], scale,
                            wl, wr, br)
            outs.append(o)
            lses.append(l)
        out = torch.cat(outs, 0)
        lse = torch.cat(lses, 1)
    gq, gk, gv = torch.autograd.grad(out, (qd, kd, vd), dd)
    return out.detach(), lse.detach(), (gq, gk, gv)


_fwd_ok = None


def fwd_out_lse(q, k, v, cu_q, cu_k, msq, msk, scale, causal, wl, wr, br, ref_out, ref_lse):
    global _fwd_ok
    if _fwd_ok is not False:
        try:
            out, lse = ops.fwd(q, k, v, cu_q, cu_k, msq, msk, scale, causal, wl, wr, br, False)
            _fwd_ok = True
            return out, lse
        except Exception as e:  # noqa: BLE001
            if _fwd_ok is None:
                print(f"(fastattn.fwd unavailable on CUDA: {str(e).splitlines()[0][:100]}; "
                      "using the float64 reference's out/lse)")
            _fwd_ok = False
    return ref_out.to(q.dtype).contiguous(), ref_lse.float().contiguous()


results = []


def check_case(name, dtype, B, sq, sk, hq, hkv, d, causal=False, wl=-1, wr=-1, br=False,
               layout="bshd", lens=None, scale=None, det=False):
    """lens: list of (len_q, len_k) for varlen (B, sq, sk ignored)."""
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cu_q = cu_k = None
    if lens is None:
        if layout == "bshd":
            q, dout = rnd(B, sq, hq, d, dtype=dtype), rnd(B, sq, hq, d, dtype=dtype)
            k, v = rnd(B, sk, hkv, d, dtype=dtype), rnd(B, sk, hkv, d, dtype=dtype)
        else:  # (B, H, S, D) storage viewed as (B, S, H, D): SDPA's layout
            q = rnd(B, hq, sq, d, dtype=dtype).transpose(1, 2)
            dout = rnd(B, hq, sq, d, dtype=dtype).transpose(1, 2)
            k = rnd(B, hkv, sk, d, dtype=dtype).transpose(1, 2)
            v = rnd(B, hkv, sk, d, dtype=dtype).transpose(1, 2)
        msq, msk = sq, sk
    else:
        lq = [a for a, _ in lens]
        lk = [b for _, b in lens]
        cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32, device=dev)
        tq, tk = sum(lq), sum(lk)
        q, dout = rnd(tq, hq, d, dtype=dtype), rnd(tq, hq, d, dtype=dtype)
        k, v = rnd(tk, hkv, d, dtype=dtype), rnd(tk, hkv, d, dtype=dtype)
        msq, msk = max(lq), max(lk)
    wr_eff = 0 if causal else wr
    ref_out, ref_lse, g64 = ref_grads(q, k, v, dout, scale, wl, wr_eff, br, cu_q, cu_k)
    _, _, glow = ref_grads(q, k, v, dout, scale, wl, wr_eff, br, cu_q, cu_k, dtype=dtype)
    out, lse = fwd_out_lse(q, k, v, cu_q, cu_k, msq, msk, scale, causal, wl, wr, br, ref_out,
                           ref_lse)
    poison()
    g = ops.bwd(dout, q, k, v, out, lse, cu_q, cu_k, msq, msk, scale, causal, wl, wr, br, det)
    if dev == "cuda":
        torch.cuda.synchronize()
    ok = True
    parts = []
    ratio = 0.0
    for nm, a, r, lo, src in zip(("dq", "dk", "dv"), g, g64, glow, (q, k, v)):
        if a.shape != src.shape or a.dtype != src.dtype or not a.is_contiguous():
            ok = False
            parts.append(f"{nm}: bad shape/dtype/layout {tuple(a.shape)} {a.dtype}")
            continue
        if not torch.isfinite(a).all():
            ok = False
            parts.append(f"{nm}: non-finite")
            continue
        e = (a.double() - r).abs().max().item() if a.numel() else 0.0
        eb = (lo.double() - r).abs().max().item() if a.numel() else 0.0
        bound = 3 * eb + 1e-5
        if not e <= bound:
            ok = False
        ratio = max(ratio, e / max(eb, 1e-12) if e > 1e-5 else 0.0)
        parts.append(f"{nm} {e:.2e}/{eb:.2e}" + ("" if e <= bound else " FAIL"))
    if det and ok:
        ref = g
        for _ in range(args.det_runs - 1):
            poison()
            g2 = ops.bwd(dout, q, k, v, out, lse, cu_q, cu_k, msq, msk, scale, causal, wl, wr, br,
                         True)
            if not all(torch.equal(x, y) for x, y in zip(ref, g2)):
                ok = False
                parts.append("NOT bitwise deterministic")
                break
        else:
            parts.append(f"bitwise equal x{args.det_runs}")
    results.append((ok, name, ratio))
    print(f"{'ok  ' if ok else 'FAIL'} {name}: " + ", ".join(parts), flush=True)
    return ok


def run_checks():
    for dtype in DTYPES:
        dn = "bf16" if dtype == torch.bfloat16 else "fp16"
        for d in HDIMS:
            t = f"{dn} d{d}"
            check_case(f"{t} basic B2 S128 H4", dtype, 2, 128, 128, 4, 4, d)
            check_case(f"{t} causal ragged 113x113 GQA 6/2", dtype, 2, 113, 113, 6, 2, d,
                       causal=True)
            if args.quick and d not in (64, 128):
                continue
            check_case(f"{t} 17x1000 causal TL (unseen keys)", dtype, 1, 17, 1000, 2, 1, d,
                       causal=True)
            check_case(f"{t} 1000x17 causal BR (empty rows)", dtype, 1, 1000, 17, 2, 2, d,
                       causal=True, br=True)
            check_case(f"{t} 1x1", dtype, 3, 1, 1, 2, 1, d)
            check_case(f"{t} window(64,16) bhsd 300x257", dtype, 2, 300, 257, 4, 4, d, wl=64, wr=16,
                       layout="bhsd")
            check_case(f"{t} MQA 8/1 causal BR 257x513", dtype, 1, 257, 513, 8, 1, d, causal=True,
                       br=True)
            check_case(f"{t} varlen (0,5),(1,1),(130,77),(77,300),(5,0)", dtype, 0, 0, 0, 4, 2, d,
                       lens=[(0, 5), (1, 1), (130, 77), (77, 300), (5, 0)])
            check_case(f"{t} varlen causal BR", dtype, 0, 0, 0, 4, 4, d, causal=True, br=True,
                       lens=[(200, 333), (64, 64), (1, 129)])
            check_case(f"{t} deterministic GQA 4/2 causal 1000x1000", dtype, 1, 1000, 1000, 4, 2,
                       d, causal=True, det=True)
        if 128 in HDIMS or 96 in HDIMS:
            dd = 128 if 128 in HDIMS else 96
            check_case(f"{dn} d{dd} 4097x1000 window(-1,100)", dtype, 1, 4097, 1000, 2, 1, dd,
                       wr=100)
            check_case(f"{dn} d{dd} deterministic varlen window", dtype, 0, 0, 0, 4, 1, dd,
                       wl=32, wr=8, lens=[(300, 400), (5, 1), (700, 700)], det=True)
        if 64 in HDIMS:
            # hdim 64 takes the skewed-dQ kernel from 32 query blocks (4096 rows) on
            # where the paired layout runs (flash_bwd_launch.cuh).
            check_case(f"{dn} d64 4100x700 causal BR GQA 4/2 (skewed dQ)", dtype, 1, 4100, 700,
                       4, 2, 64, causal=True, br=True)
            check_case(f"{dn} d64 deterministic 4096x300 (skewed dQ)", dtype, 1, 4096, 300, 2, 2,
                       64, det=True)
        for odd in (40, 72, 33):
            if any(h >= odd for h in HDIMS):
                check_case(f"{dn} odd d{odd} causal 200x200", dtype, 2, 200, 200, 2, 2, odd,
                           causal=True)
        check_case(f"{dn} negative scale d{HDIMS[0]}", dtype, 1, 100, 90, 2, 1, HDIMS[0],
                   scale=-0.3)
    if dev != "cuda":
        return
    # bad input: fp32 on CUDA
    try:
        x = rnd(1, 8, 1, 64)
        ops.bwd(x, x, x, x, x, torch.zeros(1, 1, 8, device=dev), None, None, 8, 8, 0.1, False,
                -1, -1, False, False)
        print("FAIL fp32 accepted")
        results.append((False, "fp32 rejected", 0))
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        print(f"ok   fp32 rejected: {msg[:100]}")
        results.append((True, "fp32 rejected", 0))


def bench():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def timeit(fn, reps=20):
        return median(time_cuda(lambda i: fn(), 1, repeat=reps))

    rows = []
    for cfg in args.bench_configs.split(","):
        d, h = (int(x) for x in cfg.split("x"))
        for S in (int(x) for x in args.bench_seqs.split(",")):
            B = max(1, 16384 // S)
            for causal in (False, True):
                dtype = torch.bfloat16
                qh = rnd(B, h, S, d, dtype=dtype).requires_grad_()
                kh = rnd(B, h, S, d, dtype=dtype).requires_grad_()
                vh = rnd(B, h, S, d, dtype=dtype).requires_grad_()
                doh = rnd(B, h, S, d, dtype=dtype)
                scale = 1 / math.sqrt(d)
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    oh = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh,
                                                                          is_causal=causal)
                t_sdpa = timeit(lambda: torch.autograd.grad(oh, (qh, kh, vh), doh,
                                                            retain_graph=True))
                q = qh.detach().transpose(1, 2).contiguous()
                k = kh.detach().transpose(1, 2).contiguous()
                v = vh.detach().transpose(1, 2).contiguous()
                do = doh.transpose(1, 2).contiguous()
                try:
                    out, lse = ops.fwd(q, k, v, None, None, S, S, scale, causal, -1, -1, False,
                                       False)
                except Exception:  # noqa: BLE001
                    res = torch.ops.aten._scaled_dot_product_flash_attention(
                        qh.detach(), kh.detach(), vh.detach(), 0.0, causal, False, scale=scale)
                    out, lse = res[0].transpose(1, 2).contiguous(), res[1].contiguous()
                del oh
                res = {}
                for det in (False, True):
                    res[det] = timeit(lambda: ops.bwd(do, q, k, v, out, lse, None, None, S, S,
                                                      scale, causal, -1, -1, False, det))
                flops = 2.5 * 4 * B * h * S * S * d / (2 if causal else 1)
                rows.append((d, h, S, B, causal, flops / t_sdpa / 1e9, flops / res[False] / 1e9,
                             flops / res[True] / 1e9, t_sdpa, res[False]))
                print(f"bench d{d} h{h} S{S} B{B} causal={int(causal)}: sdpa {t_sdpa:.3f} ms, "
                      f"ours {res[False]:.3f} ms (det {res[True]:.3f} ms)", flush=True)
                del qh, kh, vh, doh, q, k, v, do, out, lse
                torch.cuda.empty_cache()
    print("\n hdim heads     S   B causal | SDPA-flash TF/s | ours TF/s (det) | ours/sdpa")
    for d, h, S, B, c, ts, to, td, _, _ in rows:
        print(f" {d:4d} {h:5d} {S:5d} {B:3d} {int(c):6d} | {ts:15.1f} | {to:9.1f} ({td:5.1f}) | "
              f"{to / ts:8.2f}")


if not args.bench_only:
    run_checks()
if args.bench or args.bench_only:
    bench()
if results:
    n_ok = sum(1 for r in results if r[0])
    worst = max((r[2] for r in results), default=0)
    print(f"\nbwd checks: {n_ok}/{len(results)} passed; worst error ratio ours/torch-lowp = "
          f"{worst:.2f}")
    for ok, name, _ in results:
        if not ok:
            print(f"  FAILED: {name}")
    sys.exit(0 if n_ok == len(results) else 1)
