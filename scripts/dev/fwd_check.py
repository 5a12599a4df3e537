"""Dev check of the CUDA forward (torch.ops.fastattn.fwd): correctness against a
float64 reference, determinism, and a timing comparison with SDPA's FLASH backend.

  python scripts/dev/fwd_check.py [--lib path/to/lib.so] [--bench] [--bench-only]
                                  [--hdims 64,128] [--dtypes bf16,fp16] [--tag NAME]

Error rule: max |ours - ref64| <= 2 * max |torch same-precision math - ref64| + 1e-5,
for out and for lse (where finite; -inf rows must match exactly). Inputs are
random normal (never zeros); outputs are checked for NaN/inf everywhere.
"""
import argparse
import itertools
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import median, time_cuda  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--lib", default=None, help="load this shared library instead of importing fastattn")
p.add_argument("--bench", action="store_true")
p.add_argument("--bench-only", action="store_true")
p.add_argument("--hdims", default="32,64,96,128,192,256")
p.add_argument("--dtypes", default="bf16,fp16")
p.add_argument("--bench-hdims", default="64,128")
p.add_argument("--tag", default="")
p.add_argument("--quick", action="store_true", help="a few small cases (for compute-sanitizer)")
p.add_argument("--diag", action="store_true", help="graph-replay diagnostics")
args = p.parse_args()

if args.lib:
    torch.ops.load_library(args.lib)
else:
    import fastattn  # noqa: F401

fwd = torch.ops.fastattn.fwd
dev = "cuda"
DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
HDIMS = [int(x) for x in args.hdims.split(",")]
DTYPES = [DT[x] for x in args.dtypes.split(",")]
gen = torch.Generator(device=dev)
gen.manual_seed(1234)


def rnd(*shape, dtype):
    return torch.randn(*shape, device=dev, dtype=torch.float32, generator=gen).to(dtype)


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


def attn_ref(q, k, v, scale, wl, wr, br, lowp):
    """q (Sq, Hq, D), k/v (Sk, Hkv, D). lowp=False: float64. lowp=True: torch math in the
    input precision (matmuls in fp16/bf16, softmax in fp32, P rounded to the input dtype)."""
    Sq, Hq, D = q.shape
    Sk, Hkv, _ = k.shape
    g = Hq // Hkv
    kk = k.repeat_interleave(g, dim=1).transpose(0, 1)
    vv = v.repeat_interleave(g, dim=1).transpose(0, 1)
    qq = q.transpose(0, 1)
    if not lowp:
        qq, kk, vv = qq.double(), kk.double(), vv.double()
        s = (qq @ kk.transpose(-1, -2)) * scale
    else:
        s = (qq @ kk.transpose(-1, -2)).float() * scale
    ok = visible(Sq, Sk, wl, wr, br)
    s = s.masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(s, dim=-1) if Sk > 0 else torch.full((Hq, Sq), -math.inf, device=dev,
                                                                dtype=s.dtype)
    pm = torch.exp(s - lse[..., None])
    pm = torch.nan_to_num(pm, nan=0.0)
    if Sk == 0:
        out = torch.zeros(Hq, Sq, D, device=dev, dtype=s.dtype)
    elif lowp:
        out = (pm.to(q.dtype) @ vv).float()
    else:
        out = pm @ vv
    return out.transpose(0, 1), lse


results = {"pass": 0, "fail": 0}
worst = []


def compare(name, out, lse, refs, lps):
    """refs/lps: lists of (out (S,H,D), lse (H,S)) per sequence, concatenated by caller."""
    ro, rl = refs
    lo, ll = lps
    o = out.double()
    bad_nan = (~torch.isfinite(o)).any().item() or torch.isnan(lse).any().item()
    eo = (o - ro).abs().max().item() if o.numel() else 0.0
    elo = (lo.double() - ro).abs().max().item() if o.numel() else 0.0
    fin = torch.isfinite(rl)
    inf_ok = bool((lse[~fin] == -math.inf).all().item()) and bool(torch.isfinite(lse[fin]).all().item())
    el = (lse[fin].double() - rl[fin]).abs().max().item() if fin.any() else 0.0
    ell = (ll[fin].double() - rl[fin]).abs().max().item() if fin.any() else 0.0
    ok = (not bad_nan) and inf_ok and eo <= 2 * elo + 1e-5 and el <= 2 * ell + 1e-5
    results["pass" if ok else "fail"] += 1
    worst.append((eo / (2 * elo + 1e-5), name))
    if not ok:
        print(f"FAIL {name}: out err {eo:.3e} (bound {2*elo+1e-5:.3e}) lse err {el:.3e} "
              f"(bound {2*ell+1e-5:.3e}) nan/inf={bad_nan} inf_rows_ok={inf_ok}", flush=True)


def check_dense(name, q, k, v, scale, causal=False, wl=-1, wr=-1, br=False):
    out, lse = fwd(q, k, v, None, None, 0, 0, scale, causal, wl, wr, br, False)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    B, Sq, Hq, D = q.shape
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32 and lse.is_contiguous()
    wr_eff = 0 if causal else wr
    R, L = [], []
    for b in range(B):
        R.append(attn_ref(q[b], k[b], v[b], scale, wl, wr_eff, br, False))
        L.append(attn_ref(q[b], k[b], v[b], scale, wl, wr_eff, br, True))
    ro = torch.stack([r[0] for r in R]); rl = torch.stack([r[1] for r in R])
    lo = torch.stack([r[0] for r in L]); ll = torch.stack([r[1] for r in L])
    compare(name, out, lse, (ro, rl), (lo, ll))
    return out, lse


def check_varlen(name, lens_q, lens_k, Hq, Hkv, D, dtype, scale, causal=False, wl=-1, wr=-1,
                 br=False):
    tq, tk = sum(lens_q), sum(lens_k)
    q = rnd(tq, Hq, D, dtype=dtype)
    k = rnd(tk, Hkv, D, dtype=dtype)
    v = rnd(tk, Hkv, D, dtype=dtype)
    cq = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device=dev)
    ck = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device=dev)
    out, lse = fwd(q, k, v, cq, ck, max(lens_q), max(lens_k), scale, causal, wl, wr, br, False)
    torch.cuda.synchronize()
    assert out.shape == q.shape and lse.shape == (Hq, tq)
    wr_eff = 0 if causal else wr
    ro, rl, lo, ll = [], [], [], []
    for b in range(len(lens_q)):
        qs, ks = int(cq[b]), int(ck[b])
        qb, kb, vb = q[qs:qs + lens_q[b]], k[ks:ks + lens_k[b]], v[ks:ks + lens_k[b]]
        a = attn_ref(qb, kb, vb, scale, wl, wr_eff, br, False)
        c = attn_ref(qb, kb, vb, scale, wl, wr_eff, br, True)
        ro.append(a[0]); rl.append(a[1]); lo.append(c[0]); ll.append(c[1])
    compare(name, out, lse, (torch.cat(ro), torch.cat(rl, 1)), (torch.cat(lo), torch.cat(ll, 1)))


def diag():
    for D in [64, HDIMS[-1]]:
        for varlen in [False, True]:
            dtype = DTYPES[0]
            qg = rnd(2, 300, 4, D, dtype=dtype)
            kg = rnd(2, 260, 2, D, dtype=dtype)
            vg = rnd(2, 260, 2, D, dtype=dtype)
            if varlen:
                cq = torch.tensor([0, 100, 600], dtype=torch.int32, device=dev)
                ck = torch.tensor([0, 60, 520], dtype=torch.int32, device=dev)
                qf, kf, vf = qg.view(600, 4, D), kg.view(520, 2, D), vg.view(520, 2, D)
                call = lambda: fwd(qf, kf, vf, cq, ck, 500, 460, 0.1, True, -1, -1, True, False)
            else:
                qf, kf, vf = qg, kg, vg
                call = lambda: fwd(qf, kf, vf, None, None, 0, 0, 0.1, True, -1, -1, True, False)
            e1 = call()
            e2 = call()
            det = torch.equal(e1[0], e2[0]) and torch.equal(e1[1], e2[1])
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    call()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                og, lg = call()
            g.replay()
            torch.cuda.synchronize()
            same_old = torch.equal(og, e1[0])
            qf.copy_(rnd(*qf.shape, dtype=dtype))
            g.replay()
            torch.cuda.synchronize()
            oe, le = call()
            print(f"diag D={D} varlen={varlen}: eager det={det} replay(old q)==eager {same_old}; "
                  f"new q: out maxdiff {(og.float() - oe.float()).abs().max().item():.3e} "
                  f"nan og {og.isnan().sum().item()} oe {oe.isnan().sum().item()} "
                  f"lse eq {torch.equal(lg, le)} lse nan {lg.isnan().sum().item()}/{le.isnan().sum().item()}"
                  f" og==old {torch.equal(og, e1[0])}", flush=True)


def quick():
    dtype = DTYPES[0]
    for D in HDIMS + [40]:
        if D > max(HDIMS):
            continue
        q = rnd(2, 113, 4, D, dtype=dtype)
        k = rnd(2, 177, 2, D, dtype=dtype)
        check_dense(f"quick D{D}", q, k, k.clone(), D ** -0.5, True, -1, -1, True)
        check_varlen(f"quick varlen D{D}", [0, 1, 17, 130], [5, 0, 33, 200], 4, 2, D, dtype,
                     D ** -0.5, True, -1, -1, True)
    print(f"quick: {results['pass']} pass, {results['fail']} fail", flush=True)


def correctness():
    t0 = time.time()
    for dtype in DTYPES:
        dn = "bf16" if dtype == torch.bfloat16 else "fp16"
        # every compiled head dim, plus odd ones routed to the next larger kernel
        for D in HDIMS + [8, 40, 72, 100, 5, 33]:
            if D > max(HDIMS):
                continue
            for causal, br in [(False, False), (True, False), (True, True)]:
                q = rnd(2, 113, 4, D, dtype=dtype)
                k = rnd(2, 177, 4, D, dtype=dtype)
                v = rnd(2, 177, 4, D, dtype=dtype)
                check_dense(f"{dn} D{D} 113x177 causal={causal} br={br}", q, k, v,
                            D ** -0.5, causal=causal, br=br)
        D = 64 if 64 in HDIMS else HDIMS[0]
        sc = D ** -0.5
        # ragged lengths, masks
        for Sq, Sk in [(1, 1), (1, 17), (17, 1), (113, 4097), (4097, 113), (128, 128), (129, 63),
                       (256, 1000)]:
            for (causal, wl, wr, br) in [(False, -1, -1, False), (True, -1, -1, False),
                                         (True, -1, -1, True), (False, 32, 0, False),
                                         (False, 7, 5, True), (False, -1, 3, False),
                                         (False, 20, -1, True)]:
                q = rnd(1, Sq, 2, D, dtype=dtype)
                k = rnd(1, Sk, 2, D, dtype=dtype)
                v = rnd(1, Sk, 2, D, dtype=dtype)
                check_dense(f"{dn} {Sq}x{Sk} c={causal} w=({wl},{wr}) br={br}", q, k, v, sc,
                            causal, wl, wr, br)
        # GQA / MQA
        for Hq, Hkv in [(8, 2), (6, 1), (4, 4)]:
            q = rnd(2, 200, Hq, D, dtype=dtype)
            k = rnd(2, 300, Hkv, D, dtype=dtype)
            v = rnd(2, 300, Hkv, D, dtype=dtype)
            check_dense(f"{dn} gqa {Hq}/{Hkv}", q, k, v, sc, True, -1, -1, True)
        # (B, H, S, D) storage viewed as (B, S, H, D); packed qkv; no copies taken
        base = rnd(2, 4, 3 * 150, D, dtype=dtype)  # (B, H, S*3, D)
        qv = base[:, :, :150].transpose(1, 2)
        kv = base[:, :, 150:300].transpose(1, 2)
        vv = base[:, :, 300:].transpose(1, 2)
        check_dense(f"{dn} BHSD views", qv, kv, vv, sc, True)
        qkv = rnd(2, 150, 3, 4, D, dtype=dtype)
        check_dense(f"{dn} packed qkv", qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], sc, False, 16, 16)
        # misaligned view (storage offset 1 element) -> padded copy path
        flat = rnd(2 * 70 * 2 * D + 1, dtype=dtype)
        qm = flat[1:].view(2, 70, 2, D)
        km = rnd(2, 90, 2, D, dtype=dtype)
        check_dense(f"{dn} misaligned q", qm, km, km.clone(), sc, True, -1, -1, True)
        # empty keys (dense Sk = 0), negative and zero scale
        q = rnd(2, 33, 2, D, dtype=dtype)
        k0 = rnd(2, 0, 2, D, dtype=dtype)
        check_dense(f"{dn} Sk=0", q, k0, k0, sc)
        k = rnd(2, 45, 2, D, dtype=dtype)
        v = rnd(2, 45, 2, D, dtype=dtype)
        check_dense(f"{dn} scale<0", q, k, v, -sc, True)
        check_dense(f"{dn} scale=0", q, k, v, 0.0, True)
        # varlen with lengths 0 and 1
        check_varlen(f"{dn} varlen", [0, 1, 17, 130, 0, 64, 300], [5, 0, 33, 200, 1, 64, 290],
                     4, 2, D, dtype, sc)
        check_varlen(f"{dn} varlen causal br", [0, 1, 17, 130, 0, 64, 300],
                     [5, 0, 33, 200, 1, 64, 290], 4, 2, D, dtype, sc, True, -1, -1, True)
        check_varlen(f"{dn} varlen window", [3, 129, 77], [200, 129, 64], 2, 1, D, dtype, sc,
                     False, 10, 4, False)
    # determinism: 20 runs bitwise identical
    dtype = DTYPES[0]
    D = 128 if 128 in HDIMS else HDIMS[-1]
    q = rnd(2, 1000, 8, D, dtype=dtype)
    k = rnd(2, 1000, 2, D, dtype=dtype)
    v = rnd(2, 1000, 2, D, dtype=dtype)
    o0, l0 = fwd(q, k, v, None, None, 0, 0, D ** -0.5, True, -1, -1, False, False)
    same = True
    for _ in range(19):
        o, l = fwd(q, k, v, None, None, 0, 0, D ** -0.5, True, -1, -1, False, False)
        same &= bool(torch.equal(o, o0)) and bool(torch.equal(l, l0))
    results["pass" if same else "fail"] += 1
    if not same:
        print("FAIL determinism")
    # CUDA graph capture + replay on fresh inputs
    dtype = DTYPES[0]
    D = HDIMS[-1]
    qg = rnd(2, 300, 4, D, dtype=dtype)
    kg = rnd(2, 260, 2, D, dtype=dtype)
    vg = rnd(2, 260, 2, D, dtype=dtype)
    # (cu_seqlens must cover every row: rows past cu_seqlens_q[-1] are never written)
    cq = torch.tensor([0, 100, 600], dtype=torch.int32, device=dev)
    ck = torch.tensor([0, 60, 520], dtype=torch.int32, device=dev)
    qf, kf, vf = qg.view(600, 4, D), kg.view(520, 2, D), vg.view(520, 2, D)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fwd(qf, kf, vf, cq, ck, 500, 460, 0.1, True, -1, -1, True, False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        og, lg = fwd(qf, kf, vf, cq, ck, 500, 460, 0.1, True, -1, -1, True, False)
    qf.copy_(rnd(600, 4, D, dtype=dtype))
    g.replay()
    torch.cuda.synchronize()
    oe, le = fwd(qf, kf, vf, cq, ck, 500, 460, 0.1, True, -1, -1, True, False)
    gok = bool(torch.equal(og, oe)) and bool(torch.equal(lg, le))
    results["pass" if gok else "fail"] += 1
    if not gok:
        print("FAIL graph replay")
    # error messages
    for bad, why in [(lambda: fwd(q.float(), k.float(), v.float(), None, None, 0, 0, 1.0, False,
                                  -1, -1, False, False), "float32")]:
        try:
            bad()
            print("FAIL no error for", why)
            results["fail"] += 1
        except RuntimeError as e:
            ok = "float16" in str(e) and "bfloat16" in str(e)
            results["pass" if ok else "fail"] += 1
            if not ok:
                print("FAIL message", e)
    worst.sort(reverse=True)
    print(f"correctness: {results['pass']} pass, {results['fail']} fail, "
          f"{time.time() - t0:.1f}s; worst out err/bound: "
          + ", ".join(f"{w:.2f} [{n}]" for w, n in worst[:3]), flush=True)


def bench_one(fn, iters=20):
    return median(time_cuda(lambda i: fn(), 1, repeat=iters))


def bench():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    rows = []
    for D in [int(x) for x in args.bench_hdims.split(",")]:
        H = 2048 // D
        for S in [1024, 4096, 16384]:
            B = 16384 // S
            for causal in [False, True]:
                q = rnd(B, S, H, D, dtype=torch.bfloat16)
                k = rnd(B, S, H, D, dtype=torch.bfloat16)
                v = rnd(B, S, H, D, dtype=torch.bfloat16)
                sc = D ** -0.5
                ours = bench_one(lambda: fwd(q, k, v, None, None, 0, 0, sc, causal, -1, -1, False,
                                             False))
                qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    ref = bench_one(lambda: F.scaled_dot_product_attention(qt, kt, vt,
                                                                           is_causal=causal))
                fl = 4 * B * H * S * S * D / (2 if causal else 1)
                rows.append((D, S, B, causal, fl / ours / 1e9, fl / ref / 1e9))
                del q, k, v
    print(f"bench {args.tag} (bf16, TFLOP/s, median of 20): D S B causal | ours | sdpa-flash | ratio")
    for D, S, B, c, a, b in rows:
        print(f"  {D:3d} {S:5d} {B:2d} {int(c)} | {a:6.1f} | {b:6.1f} | {a / b:.2f}")


print(torch.cuda.get_device_name(), torch.__version__, flush=True)
if args.diag:
    diag()
elif args.quick:
    quick()
elif not args.bench_only:
    correctness()
if args.bench or args.bench_only:
    bench()
if results["fail"]:
    sys.exit(1)
