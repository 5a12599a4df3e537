"""Paged KV cache: paged decode vs our contiguous decode and FlexAttention's
paged attention, and a chunked-prefill mixed batch in one launch vs separate
prefill and decode launches. Same run, CUDA-graph timing.

Decode: bf16, Hq=32, Hkv=8, D=128, one query token, the decode benchmark's
(B, L) configs; every sequence has L cached tokens in pages scattered over
the pool at random (a long-running server's free list is not in order).
Block sizes 16 and 128. FlexAttention runs through torch's experimental
PagedAttention (page size = its 128-key block size) where it runs.
"paged-16-fp8": the block-16 pool quantized to e4m3 (per-KV-head scales
amax / 448), read and dequantized in the kernel (half the bytes).

Mixed batch: a few prompts chunk-prefilled (chunk of C new tokens on top of
a cached context) alongside many decode rows, all over one paged cache:
  BatchAttention  one launch of prefill tiles and decode CTAs (plan outside
                  the timed call, as a serving step plans once for all layers)
  paged_fwd       the paged forward kernel over every row, one launch
  separate        paged_fwd over the chunks + paged decode over the decode rows

    python -m benchmarks.paged [--out DIR] [--no-flex] [--mixed-only]
Writes DIR/paged.json.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastattn  # noqa: E402
from benchmarks.common import (Result, copies_to_exceed_l2, device_name, format_table,  # noqa: E402
                               save_json, time_cuda_graph)

CONFIGS = [(1, 16384), (1, 65536), (1, 131072), (8, 8192), (32, 4096), (64, 2048), (16, 32768)]
HQ, HKV, D = 32, 8, 128
BLOCK_SIZES = (16, 128)
DT = torch.bfloat16


def scattered_table(B, L, bs, device="cuda"):
    """(B, L / bs) int32 block table over a pool of exactly B * L / bs pages, in random order."""
    n = L // bs
    return torch.randperm(B * n, device=device).to(torch.int32).reshape(B, n)


def paged_pool(B, L, bs):
    pages = B * L // bs
    return (torch.randn(pages, bs, HKV, D, device="cuda", dtype=DT),
            torch.randn(pages, bs, HKV, D, device="cuda", dtype=DT))


def fp8_pools(pools):
    """Each (k, v) pool as (k codes, k scales, v codes, v scales): e4m3, per-KV-head scales."""
    from benchmarks.decode import quantize_e4m3
    return [(*quantize_e4m3(kp), *quantize_e4m3(vp)) for kp, vp in pools]


def flex_paged_setup(q, k_pool, v_pool, table, L):
    """FlexAttention over the same pages via torch's experimental PagedAttention
    (its physical cache layout is (1, Hkv, pages * page_size, D)). Setup (block
    mask conversion) is outside the timed call, as a server builds it once per step."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, n = table.shape
    bs = k_pool.shape[1]
    pages = k_pool.shape[0]
    pa = PagedAttention(pages, bs, B, device="cuda")
    pa.page_table[:, :n] = table.long()
    pa.capacity[:] = L
    pa.physical_to_logical.fill_(-1)
    rows = torch.arange(B, device="cuda")[:, None].expand(B, n)
    pa.physical_to_logical[rows, table.long()] = torch.arange(n, device="cuda")[None, :].expand(B, n)
    pa.empty_pages = []
    k_phys = k_pool.permute(2, 0, 1, 3).reshape(1, HKV, pages * bs, D)
    v_phys = v_pool.permute(2, 0, 1, 3).reshape(1, HKV, pages * bs, D)

    def visible(b, h, q_idx, kv_idx):
        return kv_idx >= 0

    logical = create_block_mask(visible, B, None, 1, L, device="cuda", BLOCK_SIZE=bs)
    mask = pa.convert_logical_block_mask(logical)
    flex = torch.compile(flex_attention, dynamic=False)
    qt = q.transpose(1, 2)
    return lambda: flex(qt, k_phys, v_phys, block_mask=mask, enable_gqa=True)


def bench_decode(results, flex_ok):
    for B, L in CONFIGS:
        kv_bytes = 2 * B * L * HKV * D * 2
        n = copies_to_exceed_l2(kv_bytes, cap=3)
        cfg = dict(B=B, L=L, Hq=HQ, Hkv=HKV, D=D)
        qs = [torch.randn(B, 1, HQ, D, device="cuda", dtype=DT) for _ in range(n)]
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")

        def record(name, fn, ref=None, **extra):
            try:
                with torch.no_grad():
                    out = fn(0)
                    err = None if ref is None else (out.float() - ref.float()).abs().max().item()
                    ms, mode = time_cuda_graph(fn, n)
                results.append(Result(dict(cfg, **extra), name, "decode", ms, gbps=kv_bytes / ms / 1e6,
                                      extra={"timing": mode, "max_diff_vs_contiguous": err}))
                return out
            except Exception as e:  # a backend that does not run a config is reported, not fatal
                results.append(Result(dict(cfg, **extra), name, "decode", None,
                                      error=f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
                return None

        # Our contiguous decode over the same keys (the pages' contents in order).
        for bs in BLOCK_SIZES:
            pools = [paged_pool(B, L, bs) for _ in range(n)]
            tables = [scattered_table(B, L, bs) for _ in range(n)]
            if bs == BLOCK_SIZES[0]:
                conts = [(kp[t.long()].reshape(B, L, HKV, D), vp[t.long()].reshape(B, L, HKV, D))
                         for (kp, vp), t in zip(pools, tables)]
                ref = record("contiguous", lambda i: fastattn.flash_attn_with_kvcache(qs[i], *conts[i]))
                del conts
            else:
                ref = None
            got = record(f"paged-{bs}", lambda i: fastattn.flash_attn_with_kvcache(
                qs[i], *pools[i], cache_seqlens=lens, block_table=tables[i]), ref, block_size=bs)
            if bs == 16:
                fp8 = fp8_pools(pools)
                record("paged-16-fp8", lambda i: fastattn.flash_attn_with_kvcache(
                    qs[i], fp8[i][0], fp8[i][2], cache_seqlens=lens, block_table=tables[i],
                    k_descale=fp8[i][1], v_descale=fp8[i][3]), got, block_size=bs)
                del fp8
            if bs == 128 and flex_ok:
                try:
                    fns = [flex_paged_setup(qs[i], *pools[i], tables[i], L) for i in range(n)]
                    record("flex-paged-128", lambda i: fns[i]().transpose(1, 2), got, block_size=bs)
                except Exception as e:
                    results.append(Result(dict(cfg, block_size=bs), "flex-paged-128", "decode", None,
                                          error=f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
            del pools, tables
            torch.cuda.empty_cache()
        print(".", end="", flush=True)
    print()


MIXED = [
    # (prefill chunks: (context, chunk)), (decode rows: count, context)
    ([(0, 2048)], (64, 4096)),
    ([(4096, 512)] * 4, (60, 2048)),
    ([(16384, 1024)], (16, 16384)),
]


def bench_mixed(results, bs=16):
    # A private generator: a graph capture that fell back to eager earlier
    # (e.g. a backend that cannot be captured) must not affect these inputs.
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    for chunks, (n_dec, dec_ctx) in MIXED:
        lens = [c + n for c, n in chunks] + [dec_ctx + 1] * n_dec
        new = [n for _, n in chunks] + [1] * n_dec
        B = len(lens)
        width = max((x + bs - 1) // bs for x in lens)
        pages = sum((x + bs - 1) // bs for x in lens)
        k_pool = torch.randn(pages, bs, HKV, D, device="cuda", dtype=DT, generator=gen)
        v_pool = torch.randn(pages, bs, HKV, D, device="cuda", dtype=DT, generator=gen)
        perm = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32)
        table = torch.zeros(B, width, dtype=torch.int32, device="cuda")
        at = 0
        for b, x in enumerate(lens):
            m = (x + bs - 1) // bs
            table[b, :m] = perm[at:at + m]
            at += m
        seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        cu_q = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        q = torch.randn(int(cu_q[-1]), HQ, D, device="cuda", dtype=DT, generator=gen)
        P = len(chunks)
        cu_p = cu_q[:P + 1]
        q_dec = q[int(cu_q[P]):].reshape(n_dec, 1, HQ, D)
        ops = fastattn.ops
        scale = D ** -0.5

        plan = fastattn.BatchAttention("cuda").plan(new, lens, num_heads_q=HQ, num_heads_kv=HKV,
                                                    head_dim=D, page_size=bs, dtype=DT)

        def planned(i):
            return plan.run(q, k_pool, v_pool, cu_q, seqlens, table)

        def one_launch(i):
            return ops.paged_fwd(q, k_pool, v_pool, cu_q, seqlens, table, max(new), scale, True, -1, -1)[0]

        def separate(i):
            o_p = ops.paged_fwd(q[:int(cu_q[P])], k_pool, v_pool, cu_p, seqlens[:P], table[:P],
                                max(new[:P]), scale, True, -1, -1)[0]
            o_d = ops.decode(q_dec, k_pool, v_pool, seqlens[P:], None, table[P:], scale, True, -1, -1, 0)[0]
            return o_p, o_d

        cfg = dict(chunks=str(chunks[0]) + f"x{P}", decode_rows=n_dec, decode_ctx=dec_ctx, block_size=bs)
        flops = sum(4.0 * HQ * n * (c + n / 2) * D for c, n in chunks) + 4.0 * HQ * n_dec * (dec_ctx + 1) * D
        with torch.no_grad():
            o_p, o_d = separate(0)
            for name, fn in (("BatchAttention", planned), ("paged_fwd", one_launch),
                             ("separate", separate)):
                if name != "separate":
                    a = fn(0)
                    err = max((a[:int(cu_q[P])].float() - o_p.float()).abs().max().item(),
                              (a[int(cu_q[P]):].float() - o_d.reshape(-1, HQ, D).float()).abs().max().item())
                else:
                    err = 0.0
                ms, mode = time_cuda_graph(fn, 1)
                results.append(Result(cfg, name, "mixed", ms, tflops=flops / ms / 1e9,
                                      extra={"timing": mode, "max_diff": err,
                                             "splits": plan.num_splits if name == "BatchAttention" else None}))
        print(".", end="", flush=True)
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--mixed-only", action="store_true", help="only the mixed-batch table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks need a CUDA GPU")
    results = []
    meta = {"device": device_name(), "torch": torch.__version__, "dtype": "bf16"}
    if not args.mixed_only:
        bench_decode(results, flex_ok=not args.no_flex)
        print_decode(results)
    bench_mixed(results)
    save_json(os.path.join(args.out, "paged.json"), results, meta)
    print(f"device: {meta['device']}, torch {meta['torch']}, bf16, Hq={HQ} Hkv={HKV} D={D}")
    if not args.mixed_only:
        print_decode(results)
    print_mixed(results)


def print_decode(results):
    names = ["contiguous"] + [f"paged-{bs}" for bs in BLOCK_SIZES] + ["paged-16-fp8", "flex-paged-128"]
    rows = []
    for B, L in CONFIGS:
        by = {r.impl: r for r in results if r.mode == "decode" and r.config["B"] == B and r.config["L"] == L}
        cont = by.get("contiguous")
        row = [B, L]
        for nme in names:
            r = by.get(nme)
            row.append("n/a" if r is None or r.ms is None else f"{r.ms * 1e3:.1f}")
        for bs in BLOCK_SIZES:
            r = by.get(f"paged-{bs}")
            ok = r is not None and r.ms and cont is not None and cont.ms
            row.append(f"{cont.ms / r.ms:.2f}" if ok else "n/a")
        p16, f8 = by.get("paged-16"), by.get("paged-16-fp8")
        row.append(f"{p16.ms / f8.ms:.2f}" if p16 and f8 and p16.ms and f8.ms else "n/a")
        rows.append(row)
    headers = (["B", "L"] + [f"{n} us" for n in names] + [f"contig/paged-{bs}" for bs in BLOCK_SIZES] +
               ["paged-16 / fp8"])
    print("paged decode (time; ratio >= 0.91 means within 10% of contiguous)")
    print(format_table(headers, rows))
    eager = sorted({r.impl for r in results if r.mode == "decode" and "eager" in str(r.extra.get("timing"))})
    failed = sorted({f"{r.impl}: {r.error}" for r in results if r.mode == "decode" and r.error})
    if eager:
        print("timed eagerly (graph capture failed):", ", ".join(eager))
    for f in failed:
        print("not run:", f)


def print_mixed(results):
    rows = []
    mixed = [r for r in results if r.mode == "mixed"]
    for r in mixed:
        c = r.config
        sep = next(x for x in mixed if x.config == c and x.impl == "separate")
        splits = r.extra.get("splits")
        rows.append([c["chunks"], c["decode_rows"], c["decode_ctx"], r.impl + (f" ({splits} splits)" if splits else ""),
                     f"{r.ms * 1e3:.1f}", f"{r.tflops:.0f}", f"{r.ms / sep.ms:.2f}", f"{r.extra['max_diff']:.1e}"])
    print("mixed chunked-prefill batch (block size 16; time / separate <= 1.05 is the bar)")
    print(format_table(["prefill (ctx, chunk)", "decode rows", "decode ctx", "impl", "us", "TFLOP/s",
                        "time / separate", "max diff"], rows))


if __name__ == "__main__":
    main()
