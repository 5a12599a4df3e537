#!/usr/bin/env python3
"""Dev check of the CUDA decode / merge_states / append_kv kernels (issue 4).

  python scripts/dev/decode_check.py [--lib path.so] [--quick] [--no-bench] [--no-sanitizer]
                                     [--device cpu]

Sections (a summary table is printed last; exit status 1 on any failure):
  decode    vs a float64 reference: B in {1,3,17}, cache lengths 1..128k incl.
            uneven per-sequence lengths, Sq in {1,2,7,16}, MHA / GQA group 4, 8 / MQA,
            num_splits in {1,2,7,0}, causal + windows, cache_batch_idx, strided
            caches, every head dim (+ padded ones), clamped bad index values,
            determinism. Rule: max|ours - ref64| <= 2 * max|same-precision torch
            math - ref64| + 1e-5 for out and lse; -inf lse rows must match, no NaN.
  merge     merge_states / merge_states_n vs attention over the union of the
            parts' key sets (float64), with empty parts (lse -inf, out = NaN
            garbage that must never be read), all-empty rows, strided inputs,
            fp16/bf16/fp32, varlen (T, H, D) layouts.
  append    append_kv writes exactly the intended slots (everything else
            bitwise unchanged), skips negative and out-of-range slots.
  graph     a decode step (append_kv + decode, split-KV) captured in a CUDA graph
            and replayed with new seqlens_k / q / slot values == eager, == ref.
  bench     bf16 Hq=32 Hkv=8 D=128, q length 1: GB/s of K+V bytes read, ours vs
            torch SDPA flash / cudnn (enable_gqa=True) and vs a measured
            device-to-device copy bandwidth; a num_splits sweep vs the heuristic.
  sanitizer compute-sanitizer memcheck + racecheck over --quick (when available).

--lib loads a standalone build of the ops (any library registering them) instead of
importing fastattn. --device cpu dry-runs the correctness sections on the
CPU backend (checks this script's own logic; no bench/graph/sanitizer).
"""
import argparse
import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import copy_bandwidth_gbs, time_cuda_graph  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--lib", default=None)
ap.add_argument("--device", default="cuda")
ap.add_argument("--quick", action="store_true", help="a few small cases (sanitizer runs)")
ap.add_argument("--no-bench", action="store_true")
ap.add_argument("--no-sanitizer", action="store_true")
ap.add_argument("--bench-only", action="store_true")
args = ap.parse_args()

T_START = time.time()
if args.lib:
    torch.ops.load_library(args.lib)
    fastattn = None
else:
    import fastattn  # noqa: F401
ops = torch.ops.fastattn
dev = args.device
IS_CUDA = dev == "cuda"
gen = torch.Generator(device=dev)
gen.manual_seed(1234)
hgen = torch.Generator()
hgen.manual_seed(4321)

SUMMARY = []  # (section, passed, failed, skipped, note)
COUNTS = {}


def count(section, ok, skipped=False):
    c = COUNTS.setdefault(section, [0, 0, 0])
    c[2 if skipped else (0 if ok else 1)] += 1


def rnd(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=dev, dtype=torch.float32, generator=gen).to(dtype)


def hrand(lo, hi):
    return int(torch.randint(lo, hi + 1, (1,), generator=hgen).item())


def sync():
    if IS_CUDA:
        torch.cuda.synchronize()


DTYPES = [torch.bfloat16, torch.float16]
DN = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# ============================================================================ reference


def attn_ref(q, k, v, scale, wl, wr, lowp):
    """One sequence, bottom-right aligned mask. q (Sq, Hq, D), k/v (sk, Hkv, D).
    lowp=False: float64. lowp=True: torch math in the input precision (matmul outputs
    in fp16/bf16, softmax in fp32, P rounded to the input dtype). Returns out (Sq, Hq, D)
    and lse (Hq, Sq); rows that see no key give out 0, lse -inf."""
    Sq, Hq, D = q.shape
    sk, Hkv = k.shape[0], k.shape[1]
    g = Hq // Hkv
    qq = q.permute(1, 0, 2).reshape(Hkv, g * Sq, D)  # (Hkv, g*Sq, D), row = h_in_group*Sq + i
    kk = k.permute(1, 0, 2)                          # (Hkv, sk, D)
    vv = v.permute(1, 0, 2)
    if lowp:
        s = (qq @ kk.transpose(-1, -2)).float() * scale
    else:
        s = (qq.double() @ kk.double().transpose(-1, -2)) * scale
    i = torch.arange(Sq, device=q.device).repeat(g)[:, None]   # query of each row
    j = torch.arange(sk, device=q.device)[None, :]
    d = i + (sk - Sq)
    ok = torch.ones(g * Sq, sk, dtype=torch.bool, device=q.device)
    if wl >= 0:
        ok &= j >= d - wl
    if wr >= 0:
        ok &= j <= d + wr
    s = s.masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(nan=0.0)
    if lowp:
        o = (p.to(q.dtype) @ vv).float()
    else:
        o = p @ vv.double()
    out = o.reshape(Hkv, g, Sq, D).reshape(Hq, Sq, D).permute(1, 0, 2)
    return out, lse.reshape(Hq, Sq)


def decode_ref(q, kc, vc, lens, idx, scale, wl, wr, lowp):
    """Whole decode reference; lens / idx are host lists (or None)."""
    B, Sq, Hq, D = q.shape
    S_max, B_cache = kc.shape[1], kc.shape[0]
    fdt = torch.float32 if lowp else torch.float64
    out = torch.zeros(B, Sq, Hq, D, dtype=fdt, device=q.device)
    lse = torch.full((B, Hq, Sq), -math.inf, dtype=fdt, device=q.device)
    for b in range(B):
        sk = S_max if lens is None else max(0, min(int(lens[b]), S_max))
        cb = b if idx is None else int(idx[b])
        if not (0 <= cb < B_cache) or sk == 0:
            continue
        o, l = attn_ref(q[b], kc[cb, :sk], vc[cb, :sk], scale, wl, wr, lowp)
        out[b], lse[b] = o, l
    return out, lse


def max_err(x, ref):
    x, ref = x.double(), ref.double()
    same_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    d = (x - ref).abs().masked_fill(same_inf, 0.0)
    return d.nan_to_num(nan=math.inf).max().item() if d.numel() else 0.0


WORST = []


def judge(section, name, out, lse, ref, base):
    """The 2x rule on out and lse, -inf pattern of lse, NaN-freeness."""
    ro, rl = ref
    bo, bl = base
    nan = bool(torch.isnan(out).any()) or bool(torch.isnan(lse).any()) or bool(torch.isinf(out).any())
    fin = torch.isfinite(rl)
    inf_ok = bool((lse[~fin] == -math.inf).all()) and bool(torch.isfinite(lse[fin]).all())
    eo, ebo = max_err(out, ro), max_err(bo, ro)
    el, ebl = max_err(lse[fin], rl[fin]), max_err(bl[fin], rl[fin])
    ok = (not nan) and inf_ok and eo <= 2 * ebo + 1e-5 and el <= 2 * ebl + 1e-5
    count(section, ok)
    WORST.append((eo / (2 * ebo + 1e-5), el / (2 * ebl + 1e-5), name))
    if not ok:
        print(f"FAIL {section} {name}: out err {eo:.3e} (bound {2 * ebo + 1e-5:.3e}) lse err {el:.3e} "
              f"(bound {2 * ebl + 1e-5:.3e}) nan/inf={nan} inf_pattern_ok={inf_ok}", flush=True)
    return ok


# ============================================================================ decode


def kernel_available(D, dtype):
    """False when a narrowed build has no decode kernel for this head dim / dtype."""
    q = torch.zeros(1, 1, 1, D, device=dev, dtype=dtype)
    kc = torch.zeros(1, 1, 1, D, device=dev, dtype=dtype)
    try:
        ops.decode(q, kc, kc, None, None, None, 1.0, False, -1, -1, 1)
        return True
    except RuntimeError as e:
        if "no CUDA decode kernel" in str(e):
            return False
        raise


_AVAIL = {}


def available(D, dtype):
    kd = next((d for d in (32, 64, 96, 128, 192, 256) if d >= (D + 7) // 8 * 8), None)
    key = (kd, dtype)
    if key not in _AVAIL:
        _AVAIL[key] = kernel_available(D, dtype)
    return _AVAIL[key]


def make_cache(B_cache, S_max, Hkv, D, dtype, layout):
    """(B_cache, S_max, Hkv, D) k/v caches: 'bshd' contiguous, 'bhsd' a transposed view of
    (B, H, S, D) storage, 'padded' a view into a larger buffer (odd row / batch strides)."""
    def one():
        if layout == "bhsd":
            return rnd(B_cache, Hkv, S_max, D, dtype=dtype).transpose(1, 2)
        if layout == "padded":
            return rnd(B_cache + 1, S_max + 3, Hkv + 1, D + 8, dtype=dtype)[1:, 2:S_max + 2, :Hkv, 8:]
        return rnd(B_cache, S_max, Hkv, D, dtype=dtype)
    return one(), one()


STICKY = []  # a CUDA error that poisons the context: later CUDA sections are skipped


def is_sticky(e):
    m = str(e)
    return IS_CUDA and ("CUDA error" in m or "illegal" in m or "CUBLAS" in m or "unspecified launch" in m)


def check_decode(name, *a, **kw):
    if STICKY:
        return
    try:
        return _check_decode(name, *a, **kw)
    except Exception as e:  # noqa: BLE001  (reported, the run goes on)
        count(kw.get("section", "decode"), False)
        print(f"FAIL decode {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
        if is_sticky(e):
            STICKY.append(f"{name}: {str(e).splitlines()[0][:200]}")


def _check_decode(name, B, Sq, Hq, Hkv, D, dtype, lens, splits, causal=False, wl=-1, wr=-1,
                  idx=None, B_cache=None, layout="bshd", scale=None, q_layout="bshd", S_max=None,
                  section="decode"):
    if IS_CUDA and not available(D, dtype):
        count(section, True, skipped=True)
        return
    lens_list = None if lens is None else list(lens)
    S_max = S_max or (max(max(lens_list), 1) if lens_list else 64)
    B_cache = B_cache or B
    kc, vc = make_cache(B_cache, S_max, Hkv, D, dtype, layout)
    if q_layout == "bhsd":
        q = rnd(B, Hq, Sq, D, dtype=dtype).transpose(1, 2)
    elif q_layout == "misaligned":
        q = rnd(B * Sq * Hq * D + 1, dtype=dtype)[1:].view(B, Sq, Hq, D)
    else:
        q = rnd(B, Sq, Hq, D, dtype=dtype)
    scale = D ** -0.5 if scale is None else scale
    sl = None if lens_list is None else torch.tensor(lens_list, dtype=torch.int32, device=dev)
    it = None if idx is None else torch.tensor(idx, dtype=torch.int32, device=dev)
    out, lse = ops.decode(q, kc, vc, sl, it, None, scale, causal, wl, wr, splits)
    sync()
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous(), name
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32 and lse.is_contiguous(), name
    wr_eff = 0 if causal else wr
    # Negative scale: the reference uses it as is (softmax(s * q.k)).
    ref = decode_ref(q, kc, vc, lens_list, idx, scale, wl, wr_eff, False)
    base = decode_ref(q, kc, vc, lens_list, idx, scale, wl, wr_eff, True)
    return judge(section, name, out, lse, ref, base)


def lens_uneven(B, hi, lo=1):
    return [hrand(lo, hi) for _ in range(B)]


def decode_cases(quick):
    t0 = time.time()
    dts = DTYPES if not quick else [torch.bfloat16]
    if quick:
        check_decode("quick B3 Sq2 8/2 D128 splits3", 3, 2, 8, 2, 128, torch.bfloat16, [1, 300, 129], 3, True)
        check_decode("quick B2 Sq16 8/1 D64 splits2", 2, 16, 8, 1, 64, torch.float16, [140, 20], 2, True,
                     idx=[1, 5 if IS_CUDA else 2], B_cache=3)  # 5: out of range -> empty on CUDA
        check_decode("quick B1 Sq1 32/8 D128 heur", 1, 1, 32, 8, 128, torch.bfloat16, [3000], 0)
        check_decode("quick B2 Sq3 6/2 D256 window", 2, 3, 6, 2, 256, torch.bfloat16, [190, 77], 0, False, 20, 0)
        check_decode("quick B2 Sq1 4/1 D32 bhsd", 2, 1, 4, 1, 32, torch.float16, [100, 1], 2, layout="bhsd")
        return
    # A. Sq x grouping x splits (D = 128), B cycling through {1, 3, 17}, uneven lengths.
    groups = [(8, 8), (8, 2), (16, 2), (8, 1), (32, 8)]
    n = 0
    for Sq in (1, 2, 7, 16):
        for Hq, Hkv in groups:
            for splits in (1, 2, 7, 0):
                B = (1, 3, 17)[n % 3]
                dtype = dts[n % len(dts)]
                hi = {1: 20000, 3: 6000, 17: 1500}[B]
                lens = lens_uneven(B, hi)
                causal = n % 2 == 1
                check_decode(f"A {DN[dtype]} B{B} Sq{Sq} {Hq}/{Hkv} splits{splits} causal={causal} "
                             f"lens<={max(lens)}", B, Sq, Hq, Hkv, 128, dtype, lens, splits, causal)
                n += 1
    # B. cache lengths from 1 to 128k (block boundaries of 64 keys, long single sequences).
    for lens, B in [([1], 1), ([2], 1), ([63], 1), ([64], 1), ([65], 1), ([127], 1), ([4097], 1),
                    ([65537], 1), ([131072], 1), ([1, 70001, 131072], 3), ([131071, 64, 5000], 3)]:
        for Sq, splits, causal in [(1, 0, True), (16, 7, True), (1, 1, False)]:
            if max(lens) >= 65536 and splits == 1 and Sq == 1 and B == 3:
                continue
            check_decode(f"B len={lens} Sq{Sq} splits{splits} causal={causal}", B, Sq, 32, 8, 128,
                         torch.bfloat16, lens, splits, causal)
    # C. head dims (compiled ones and padded ones: 8 -> 32, 40 -> 64, 80 -> 96, 100 -> copy path).
    for dtype in dts:
        for D in (32, 64, 96, 128, 192, 256, 8, 40, 80, 100):
            for Sq, causal, wl, wr, splits in [(1, False, -1, -1, 0), (3, True, -1, -1, 2),
                                               (7, False, 33, 4, 0)]:
                check_decode(f"C {DN[dtype]} D{D} Sq{Sq} causal={causal} w=({wl},{wr}) splits{splits}",
                             3, Sq, 8, 2, D, dtype, [700, 1, 333], splits, causal, wl, wr)
    # D. masks: windows, Sq > sk (rows that see nothing), zero-length sequences.
    for wl, wr, causal in [(16, 0, False), (100, -1, False), (-1, 2, False), (0, 0, False), (5, 5, False),
                           (7, -1, True), (1000000, -1, False)]:
        for splits in (1, 7, 0):
            check_decode(f"D w=({wl},{wr}) causal={causal} splits{splits}", 3, 7, 16, 2, 128,
                         torch.bfloat16, [3000, 5, 0], splits, causal, wl, wr)
    check_decode("D Sq16 > sk causal", 2, 16, 8, 2, 64, torch.float16, [3, 9], 0, True)
    check_decode("D all empty", 2, 2, 8, 2, 64, torch.float16, [0, 0], 2, True)
    # E. cache_batch_idx, layouts, scales, clamped bad index values.
    check_decode("E idx perm", 3, 2, 8, 2, 128, torch.bfloat16, [400, 100, 2000], 0, True,
                 idx=[4, 0, 2], B_cache=5)
    check_decode("E idx perm splits7", 17, 1, 32, 8, 128, torch.float16, lens_uneven(17, 900), 7,
                 idx=[int(x) for x in torch.randperm(20, generator=hgen)[:17]], B_cache=20)
    if IS_CUDA:  # device index values are made harmless on CUDA (the CPU backend raises instead)
        check_decode("E idx out of range -> empty", 3, 1, 8, 2, 128, torch.bfloat16, [300, 300, 300], 0,
                     idx=[7, -1, 1], B_cache=3)
        check_decode("E seqlens clamped (> S_max, < 0)", 3, 2, 8, 2, 128, torch.bfloat16, [900, -5, 100],
                     2, True, S_max=500)
    check_decode("E cache bhsd view", 3, 4, 8, 2, 128, torch.bfloat16, [1000, 17, 640], 0, True,
                 layout="bhsd")
    check_decode("E cache padded view", 3, 1, 8, 2, 128, torch.float16, [1000, 17, 640], 3,
                 layout="padded")
    check_decode("E q bhsd view", 2, 5, 8, 2, 64, torch.bfloat16, [100, 64], 0, True, q_layout="bhsd")
    check_decode("E q misaligned (copy)", 2, 1, 8, 2, 128, torch.bfloat16, [100, 64], 0,
                 q_layout="misaligned")
    check_decode("E negative scale", 2, 2, 8, 2, 128, torch.bfloat16, [500, 64], 0, True, scale=-0.07)
    check_decode("E zero scale", 2, 2, 8, 2, 128, torch.bfloat16, [500, 64], 2, True, scale=0.0)
    check_decode("E no seqlens (all S_max)", 2, 3, 8, 2, 128, torch.float16, None, 0, True, S_max=777)
    # F. determinism (split path: combine without atomics).
    q = rnd(2, 4, 32, 128)
    kc, vc = make_cache(2, 9000, 8, 128, torch.bfloat16, "bshd")
    sl = torch.tensor([9000, 4321], dtype=torch.int32, device=dev)
    o0, l0 = ops.decode(q, kc, vc, sl, None, None, 0.088, True, -1, -1, 0)
    same = True
    for _ in range(10):
        o, l = ops.decode(q, kc, vc, sl, None, None, 0.088, True, -1, -1, 0)
        same &= torch.equal(o, o0) and torch.equal(l, l0)
    count("decode", same)
    if not same:
        print("FAIL decode determinism", flush=True)
    # G. public API (if the package is loaded): append + attend through flash_attn_with_kvcache.
    if fastattn is not None:
        B, S_max, Hkv, Hq, D = 3, 600, 2, 8, 128
        kc, vc = make_cache(B, S_max, Hkv, D, torch.bfloat16, "bshd")
        kc0, vc0 = kc.clone(), vc.clone()
        q = rnd(B, 2, Hq, D)
        kn, vn = rnd(B, 2, Hkv, D), rnd(B, 2, Hkv, D)
        cs = torch.tensor([10, 300, 598], dtype=torch.int32, device=dev)
        out, lse = fastattn.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=cs, causal=True,
                                                    return_softmax_lse=True)
        for b, s in enumerate([10, 300, 598]):
            kc0[b, s:s + 2], vc0[b, s:s + 2] = kn[b], vn[b]
        lens = [12, 302, 600]
        ok_cache = torch.equal(kc, kc0) and torch.equal(vc, vc0)
        count("decode", ok_cache)
        if not ok_cache:
            print("FAIL flash_attn_with_kvcache append", flush=True)
        judge("decode", "G flash_attn_with_kvcache", out, lse,
              decode_ref(q, kc0, vc0, lens, None, D ** -0.5, -1, 0, False),
              decode_ref(q, kc0, vc0, lens, None, D ** -0.5, -1, 0, True))
    print(f"decode: {COUNTS.get('decode')} (pass, fail, skipped) in {time.time() - t0:.1f}s", flush=True)


# ============================================================================ merge


def merge_parts(q, k, v, scale, cuts):
    """Float64 attention of q (S, H, D) over each key set k[cuts[i]:cuts[i+1]] (one key head
    per query head) -> outs (N, S, H, D), lses (N, H, S); the union reference too."""
    parts_o, parts_l = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b > a:
            o, l = attn_ref(q, k[a:b], v[a:b], scale, -1, -1, False)
        else:
            o = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
            l = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float64, device=q.device)
        parts_o.append(o)
        parts_l.append(l)
    uo, ul = attn_ref(q, k, v, scale, -1, -1, False)
    return torch.stack(parts_o), torch.stack(parts_l), uo, ul


def torch_merge(outs, lses, dtype):
    """Same-precision baseline: fp32 math on the rounded parts, out rounded to dtype."""
    lse = torch.logsumexp(lses.float(), dim=0)
    w = torch.exp(lses.float() - lse.unsqueeze(0)).nan_to_num(nan=0.0)  # (N, H, S)
    w = w.transpose(-1, -2).unsqueeze(-1)                                 # (N, S, H, 1)
    o = (w * outs.float().nan_to_num(nan=0.0)).sum(0)
    return o.to(dtype).float(), lse


def merge_cases(quick):
    t0 = time.time()
    dts = [torch.bfloat16, torch.float16, torch.float32] if not quick else [torch.bfloat16]
    for dtype in dts:
        for (S, H, D, cuts_frac, extra) in [
            (7, 4, 128, [0, 0.5, 1.0], ""),
            (33, 8, 64, [0, 0.0, 1.0], "empty a"),
            (5, 2, 256, [0, 0.3, 0.31, 0.9, 1.0], "n=4"),
            (16, 32, 128, [0, 0.1, 0.1, 0.1, 0.6, 1.0], "n=5 empty middles"),
            (3, 3, 40, [0, 0.5, 1.0], "D40"),
            (4, 2, 12, [0, 0.25, 1.0], "D12 (scalar path)"),
        ]:
            Sk = 600
            q = rnd(S, H, D, dtype=torch.float64)
            k = rnd(Sk, H, D, dtype=torch.float64)
            v = rnd(Sk, H, D, dtype=torch.float64)
            cuts = [int(round(f * Sk)) for f in cuts_frac]
            po, pl, uo, ul = merge_parts(q, k, v, D ** -0.5, cuts)
            pl = pl.float()
            po_r = po.to(dtype)
            # empty parts: garbage out (NaN) that must never be read
            for n in range(po_r.shape[0]):
                if cuts[n + 1] == cuts[n]:
                    po_r[n] = float("nan")
            base = torch_merge(po_r, pl, dtype)
            if po_r.shape[0] == 2:
                out, lse = ops.merge_states(po_r[0], pl[0], po_r[1], pl[1])
                judge("merge", f"{DN[dtype]} S{S} H{H} D{D} {extra} (2-way)", out, lse, (uo, ul), base)
                # strided views: (S, H, D) out of (H, S, D) storage, lse transposed storage
                a_o = po_r[0].transpose(0, 1).contiguous().transpose(0, 1)
                a_l = pl[0].t().contiguous().t()
                out2, lse2 = ops.merge_states(a_o, a_l, po_r[1], pl[1])
                judge("merge", f"{DN[dtype]} S{S} H{H} D{D} {extra} (2-way strided)", out2, lse2, (uo, ul),
                      base)
                count("merge", out2.is_contiguous() and lse2.is_contiguous() and out2.dtype == dtype)
            out, lse = ops.merge_states_n(po_r, pl)
            judge("merge", f"{DN[dtype]} S{S} H{H} D{D} {extra} (n-way)", out, lse, (uo, ul), base)
            # leading dims (B1, B2, S, H, D): same data tiled, lse (B1, B2, H, S)
            po5 = po_r[:, None, None].expand(-1, 2, 3, -1, -1, -1)
            pl5 = pl[:, None, None].expand(-1, 2, 3, -1, -1)
            out5, lse5 = ops.merge_states_n(po5, pl5)
            judge("merge", f"{DN[dtype]} S{S} H{H} D{D} {extra} (n-way 2x3 leading)", out5,
                  lse5, (uo.expand(2, 3, -1, -1, -1), ul.expand(2, 3, -1, -1)),
                  (base[0].expand(2, 3, -1, -1, -1), base[1].expand(2, 3, -1, -1)))
    # all parts empty: out 0, lse -inf, no NaN
    for dtype in dts:
        o = torch.full((3, 5, 4, 64), float("nan"), device=dev, dtype=dtype)
        l = torch.full((3, 4, 5), -math.inf, device=dev)
        out, lse = ops.merge_states_n(o, l)
        ok = bool((out == 0).all()) and bool((lse == -math.inf).all())
        out2, lse2 = ops.merge_states(o[0], l[0], o[1], l[1])
        ok &= bool((out2 == 0).all()) and bool((lse2 == -math.inf).all())
        count("merge", ok)
        if not ok:
            print(f"FAIL merge all-empty {DN[dtype]}", flush=True)
    # varlen layout: out (T, H, D), lse (H, T) from the forward
    q = rnd(50, 4, 64, dtype=torch.float64)
    k = rnd(300, 4, 64, dtype=torch.float64)
    v = rnd(300, 4, 64, dtype=torch.float64)
    po, pl, uo, ul = merge_parts(q, k, v, 0.125, [0, 120, 300])
    po_r, pl_f = po.to(torch.bfloat16), pl.float()
    out, lse = ops.merge_states(po_r[0], pl_f[0], po_r[1], pl_f[1])
    judge("merge", "varlen (T,H,D)/(H,T)", out, lse, (uo, ul), torch_merge(po_r, pl_f, torch.bfloat16))
    print(f"merge: {COUNTS.get('merge')} (pass, fail, skipped) in {time.time() - t0:.1f}s", flush=True)


# ============================================================================ append


def append_cases(quick):
    t0 = time.time()
    for dtype in ([torch.bfloat16, torch.float16, torch.float32] if not quick else [torch.bfloat16]):
        for (rows, S, Hkv, D, layout) in [(3, 50, 2, 128, "bshd"), (10, 16, 4, 64, "bshd"),
                                          (2, 40, 2, 128, "padded"), (4, 33, 3, 40, "bshd"),
                                          (3, 20, 2, 12, "bshd")]:
            N = 37
            kc, vc = make_cache(rows, S, Hkv, D, dtype, layout)
            kc0, vc0 = kc.clone(), vc.clone()
            k, v = rnd(N, Hkv, D, dtype=dtype), rnd(N, Hkv, D, dtype=dtype)
            if layout == "padded":
                k = rnd(N, Hkv + 1, D + 8, dtype=dtype)[:, 1:, 8:]
            slots = torch.randperm(rows * S, generator=hgen)[:N].tolist()
            slots[0] = -1                 # padding
            slots[3] = -(2 ** 40)
            if IS_CUDA:  # out-of-range slots are skipped on CUDA (no host check without a sync)
                slots[1] = rows * S           # just past the end
                slots[2] = rows * S + 12345   # far out of range
            sm = torch.tensor(slots, dtype=torch.int64, device=dev)
            ops.append_kv(k, v, sm, kc, vc)
            sync()
            for n, s in enumerate(slots):
                if 0 <= s < rows * S:
                    kc0[s // S, s % S] = k[n]
                    vc0[s // S, s % S] = v[n]
            # bitwise: byte views (NaN payloads and -0.0 compare exactly)
            ok = torch.equal(kc.view(torch.uint8), kc0.view(torch.uint8))
            ok &= torch.equal(vc.view(torch.uint8), vc0.view(torch.uint8))
            count("append", ok)
            if not ok:
                print(f"FAIL append {DN[dtype]} rows{rows} S{S} H{Hkv} D{D} {layout}", flush=True)
    print(f"append: {COUNTS.get('append')} (pass, fail, skipped) in {time.time() - t0:.1f}s", flush=True)


# ============================================================================ graph


def graph_case(pdl=True):
    t0 = time.time()
    if not pdl:
        os.environ["FASTATTN_DECODE_PDL"] = "0"
    try:
        _graph_case(pdl)
    finally:
        os.environ.pop("FASTATTN_DECODE_PDL", None)
    print(f"graph (combine PDL {'on' if pdl else 'off'}): {COUNTS.get('graph')} (pass, fail, skipped) "
          f"in {time.time() - t0:.1f}s", flush=True)


def _graph_case(pdl):
    B, S_max, Hq, Hkv, D = 3, 8192, 32, 8, 128
    kc, vc = make_cache(B, S_max, Hkv, D, torch.bfloat16, "bshd")
    q = rnd(B, 1, Hq, D)
    kn, vn = rnd(B, Hkv, D), rnd(B, Hkv, D)
    seqlens = torch.tensor([100, 5000, 8000], dtype=torch.int32, device=dev)
    slots = (torch.arange(B, device=dev) * S_max + seqlens - 1).long()

    def step():
        ops.append_kv(kn, vn, slots, kc, vc)
        return ops.decode(q, kc, vc, seqlens, None, None, D ** -0.5, True, -1, -1, 0)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        og, lg = step()
    ok_all = True
    for new_lens in ([1, 8192, 64], [8192, 0, 3000], [4097, 4096, 65], [2, 3, 1]):
        seqlens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        slots.copy_((torch.arange(B, device=dev) * S_max + (seqlens - 1).clamp(min=0)).long()
                    - (seqlens == 0).long() * (10 ** 9))  # empty sequence: no append
        q.copy_(rnd(B, 1, Hq, D))
        kn.copy_(rnd(B, Hkv, D))
        vn.copy_(rnd(B, Hkv, D))
        g.replay()
        sync()
        oe, le = step()  # eager on the same inputs (append is idempotent)
        sync()
        same = torch.equal(og, oe) and torch.equal(lg, le)
        ref = decode_ref(q, kc, vc, new_lens, None, D ** -0.5, -1, 0, False)
        base = decode_ref(q, kc, vc, new_lens, None, D ** -0.5, -1, 0, True)
        okr = judge("graph", f"replay lens={new_lens} pdl={int(pdl)}", og, lg, ref, base)
        count("graph", same)
        if not same:
            print(f"FAIL graph replay != eager for lens={new_lens}", flush=True)
        ok_all &= same and okr


# ============================================================================ bench

BENCH_ROWS = []


def l2_bytes():
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2 ** 20))


TIMING_MODE = {}


def time_ms(fn, n_sets, reps=15, inner=None):
    """Median per-call GPU ms of fn(set_index) under CUDA-graph replay (see
    benchmarks.common.time_cuda_graph); TIMING_MODE records graph vs eager."""
    ms, mode = time_cuda_graph(fn, n_sets, reps=reps, inner=inner)
    key = "graph" if mode == "graph" else "eager"
    TIMING_MODE[key] = TIMING_MODE.get(key, 0) + 1
    if key == "eager":
        TIMING_MODE.setdefault("eager_why", mode[len("eager: "):])
    return ms


def copy_bandwidth():
    return copy_bandwidth_gbs()  # GB/s (read + write)


@contextlib.contextmanager
def capture_fd2():
    """Captures C-level stderr (the decode plan log) into a string list."""
    buf = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield buf
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.append(tmp.read().decode(errors="replace"))


def heuristic_plan(call):
    os.environ["FASTATTN_DECODE_LOG"] = "1"
    try:
        with capture_fd2() as buf:
            call()
            sync()
    finally:
        os.environ.pop("FASTATTN_DECODE_LOG", None)
    line = [x for x in "".join(buf).splitlines() if "fastattn decode" in x]
    return line[-1].split("-> ")[-1] if line else "?"


def bench():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    t0 = time.time()
    copy_bw = copy_bandwidth()
    print(f"bench: device-to-device copy bandwidth {copy_bw:.0f} GB/s (read+write)", flush=True)
    Hq, Hkv, D = 32, 8, 128
    configs = [(1, 16384), (1, 65536), (1, 131072), (8, 8192), (32, 4096), (64, 2048), (16, 32768)]
    sweep_rows = []
    for B, L in configs:
        kv_bytes = 2 * B * L * Hkv * D * 2
        n_sets = max(1, min(8, math.ceil(4 * l2_bytes() / kv_bytes)))
        caches = [make_cache(B, L, Hkv, D, torch.bfloat16, "bshd") for _ in range(n_sets)]
        qs = [rnd(B, 1, Hq, D) for _ in range(n_sets)]
        sl = torch.full((B,), L, dtype=torch.int32, device=dev)
        sc = D ** -0.5

        def ours(i, splits=0):
            kc, vc = caches[i]
            return ops.decode(qs[i], kc, vc, sl, None, None, sc, True, -1, -1, splits)

        t_ours = time_ms(ours, n_sets)
        os.environ["FASTATTN_DECODE_PDL"] = "0"
        t_nopdl = time_ms(ours, n_sets)
        os.environ.pop("FASTATTN_DECODE_PDL", None)
        plan = heuristic_plan(lambda: ours(0))
        # correctness spot check of this config
        o, l = ours(0)
        ro, rl = decode_ref(qs[0], caches[0][0], caches[0][1], [L] * B, None, sc, -1, 0, False)
        err = (o.double() - ro).abs().max().item()
        res = {"ours": t_ours}
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            qt = [x.transpose(1, 2) for x in qs]                       # (B, Hq, 1, D)
            kt = [(kc.transpose(1, 2), vc.transpose(1, 2)) for kc, vc in caches]  # (B, Hkv, L, D) views

            def sdpa(i, be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(qt[i], kt[i][0], kt[i][1], enable_gqa=True)
            try:
                sdpa(0)
                sync()
                res[name] = time_ms(sdpa, n_sets)
            except Exception as e:  # backend refuses this shape / layout
                res[name] = None
                print(f"bench: SDPA {name} unavailable for B={B} L={L}: {str(e).splitlines()[0][:120]}",
                      flush=True)
        # split sweep (tuning data for the heuristic)
        sweep = {}
        for s in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128):
            if s > L // 64:
                continue
            sweep[s] = time_ms(lambda i, s=s: ours(i, s), n_sets, reps=7)
        best_s = min(sweep, key=sweep.get)
        sweep_rows.append((B, L, plan, sweep, best_s))
        gbs = lambda ms: kv_bytes / ms / 1e6 if ms else None
        BENCH_ROWS.append(dict(B=B, L=L, tokens=B * L, ms=t_ours, gbs=gbs(t_ours), flash=res["flash"],
                               cudnn=res["cudnn"], copy=copy_bw, err=err, plan=plan, nopdl=t_nopdl,
                               best_sweep=(best_s, sweep[best_s])))
        del caches, qs
        torch.cuda.empty_cache()
    # Sq > 1 (speculative decoding) on one config: bandwidth only
    spec = []
    B, L = 8, 8192
    kc, vc = make_cache(B, L, Hkv, D, torch.bfloat16, "bshd")
    sl = torch.full((B,), L, dtype=torch.int32, device=dev)
    for Sq in (1, 2, 4, 8, 16):
        q = rnd(B, Sq, Hq, D)
        ms = time_ms(lambda i: ops.decode(q, kc, vc, sl, None, None, 0.088, True, -1, -1, 0), 1)
        spec.append((Sq, ms, 2 * B * L * Hkv * D * 2 / ms / 1e6))
    del kc, vc
    print(f"\nsplit sweep (ms per call; heuristic plan in brackets):", flush=True)
    for B, L, plan, sweep, best_s in sweep_rows:
        cells = " ".join(f"{s}:{t * 1e3:.0f}us" for s, t in sweep.items())
        print(f"  B={B:2d} L={L:6d} [{plan}] best={best_s} | {cells}")
    print("\nSq sweep (B=8 L=8k, causal): " + ", ".join(f"Sq={s}: {ms * 1e3:.1f}us {bw:.0f}GB/s"
                                                     for s, ms, bw in spec))
    print(f"bench done in {time.time() - t0:.1f}s; timing modes {TIMING_MODE}", flush=True)


# ============================================================================ sanitizer


SAN = []


def sanitizer():
    exe = shutil.which("compute-sanitizer") or (
        "/usr/local/cuda/bin/compute-sanitizer" if os.path.exists("/usr/local/cuda/bin/compute-sanitizer")
        else None)
    if exe is None:
        SAN.append(("compute-sanitizer", None, "not found"))
        return
    base = [sys.executable, os.path.abspath(__file__), "--quick", "--no-bench", "--no-sanitizer"]
    if args.lib:
        base += ["--lib", args.lib]
    for tool in ("memcheck", "racecheck"):
        t0 = time.time()
        cmd = [exe, "--tool", tool, "--error-exitcode", "9"] + (["--racecheck-report", "hazard"]
                                                                  if tool == "racecheck" else []) + base
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=100)
            tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
            ok = r.returncode == 0
            SAN.append((tool, ok, f"rc={r.returncode} {time.time() - t0:.0f}s: " + " | ".join(tail)[-300:]))
        except subprocess.TimeoutExpired:
            SAN.append((tool, None, "timeout (100s)"))


# ============================================================================ main


def summary():
    print("\n" + "=" * 100)
    print(f"SUMMARY  {torch.cuda.get_device_name() if IS_CUDA else 'cpu'}  torch {torch.__version__}  "
          f"total {time.time() - T_START:.0f}s")
    print("-" * 100)
    failed = False
    if STICKY:
        failed = True
        print(f"  CUDA ERROR (later CUDA sections skipped): {STICKY[0]}")
    for sec in ("decode", "merge", "append", "graph", "bench"):
        if sec in COUNTS:
            p_, f_, s_ = COUNTS[sec]
            failed |= f_ > 0
            print(f"  {sec:8s} {'PASS' if f_ == 0 else 'FAIL'}  {p_} passed, {f_} failed, {s_} skipped (not in build)")
    if WORST:
        w = sorted(WORST, reverse=True)[:3]
        print("  worst out err / bound: " + "; ".join(f"{a:.2f} (lse {b:.2f}) [{n}]" for a, b, n in w))
    for tool, ok, note in SAN:
        status = "PASS" if ok else ("SKIP" if ok is None else "FAIL")
        failed |= ok is False
        print(f"  {tool:9s} {status}  {note}")
    if BENCH_ROWS:
        print("-" * 100)
        print("  bench bf16 Hq=32 Hkv=8 D=128 Sq=1, CUDA-graph timing (GB/s = K+V bytes read / median time; "
              "%copy vs the d2d copy BW; target >= 80% where B*L >= 128k)")
        print(f"  {'B':>3} {'L':>7} {'tokens':>8} | {'ours us':>8} {'GB/s':>6} {'%copy':>6} | {'flash us':>8} "
              f"{'cudnn us':>8} | {'vs best':>7} | {'plan':<28} | sweep best | no-PDL us")
        for r in BENCH_ROWS:
            best_t = min([t for t in (r["flash"], r["cudnn"]) if t] or [float("inf")])
            speed = best_t / r["ms"]
            pct = r["gbs"] / r["copy"] * 100
            need_bw = r["tokens"] >= 131072
            flag = []
            if speed < 1.0:
                flag.append("SLOWER")
            if need_bw and pct < 80:
                flag.append("<80%")
            fl = f"{r['flash'] * 1e3:8.1f}" if r["flash"] else "     n/a"
            cu = f"{r['cudnn'] * 1e3:8.1f}" if r["cudnn"] else "     n/a"
            plan = r["plan"].replace("kernel_d=", "d").replace("splits=", "s=").replace(" m_blocks=1 warps_m=1", "")
            print(f"  {r['B']:3d} {r['L']:7d} {r['tokens']:8d} | {r['ms'] * 1e3:8.1f} {r['gbs']:6.0f} {pct:5.0f}% | "
                  f"{fl} {cu} | {speed:6.2f}x | {plan[:28]:<28} | s={r['best_sweep'][0]} "
                  f"{r['best_sweep'][1] * 1e3:.1f}us | {r['nopdl'] * 1e3:.1f} {' '.join(flag)} (err {r['err']:.1e})")
        n_fast = sum(1 for r in BENCH_ROWS
                     if r["ms"] <= min([t for t in (r["flash"], r["cudnn"]) if t] or [float("inf")]))
        bw_rows = [r for r in BENCH_ROWS if r["tokens"] >= 131072]
        n_bw = sum(1 for r in bw_rows if r["gbs"] >= 0.8 * r["copy"])
        print(f"  perf     faster than the best SDPA backend on {n_fast}/{len(BENCH_ROWS)} configs; "
              f">= 80% of copy BW on {n_bw}/{len(bw_rows)} configs with B*L >= 128k "
              f"(perf does not change the exit status)")
    print("=" * 100)
    return failed


def run_section(section, fn, *a):
    if STICKY:
        print(f"skip {section}: earlier CUDA error ({STICKY[0]})", flush=True)
        return
    try:
        fn(*a)
    except Exception as e:  # noqa: BLE001  (reported in the summary, the run goes on)
        count(section, False)
        print(f"FAIL {section}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
        if is_sticky(e):
            STICKY.append(f"{section}: {str(e).splitlines()[0][:200]}")


def main():
    print(f"{torch.cuda.get_device_name() if IS_CUDA else 'cpu'} torch {torch.__version__}", flush=True)
    if not args.bench_only:
        run_section("decode", decode_cases, args.quick)
        run_section("merge", merge_cases, args.quick)
        run_section("append", append_cases, args.quick)
        if IS_CUDA and not args.quick:
            run_section("graph", graph_case, True)
            run_section("graph", graph_case, False)
    if IS_CUDA and not args.quick and not args.no_bench:
        run_section("bench", bench)
    if IS_CUDA and not args.quick and not args.no_sanitizer:
        sanitizer()  # fresh processes: runs even after a CUDA error here
    failed = summary()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
