"""Shared-prefix decode: cascade_attention vs plain paged decode over the same pages.

B requests forked from one prefix (a system prompt of P tokens) each decode one
token with a short suffix of their own. Plain: flash_attn_varlen_func over every
request's full block table, and paged-decode: flash_attn_with_kvcache (the
split-KV paged decode kernel) over the same tables; each request reads the
whole prefix. Cascade: the
prefix once for all queries (GQA-packed), the suffixes, the LSE merge. bf16,
Hq/Hkv 32/8, head dim 128, page size 16; microseconds per call (median of
interleaved rounds; each call replayed from a captured CUDA graph, as a serving
loop runs a step, so host dispatch is not measured) and the K/V bytes each
variant must read at least.

    python -m benchmarks.cascade [--prefixes 2048,8192,32768] [--batches 16,64] [--suffix 256]

The issue's shared-prefix case: --prefixes 8192 --batches 64 --suffix 512.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastattn  # noqa: E402
from benchmarks.common import device_name, format_table, median, time_cuda_graph  # noqa: E402


def bench(P, B, suffix, rounds, Hq=32, Hkv=8, D=128, bs=16, dtype=torch.bfloat16):
    blocks = -(-P // bs) + B * (-(-suffix // bs) + 1) + 1
    cache = fastattn.PagedKVCache(blocks, bs, Hkv, D, dtype=dtype, device="cuda")
    cache.add_sequence("sys")
    cache.append(["sys"], torch.randn(1, P, Hkv, D, device="cuda", dtype=dtype),
                 torch.randn(1, P, Hkv, D, device="cuda", dtype=dtype))
    kids = [f"r{b}" for b in range(B)]
    for s in kids:
        cache.fork("sys", s)
    cache.append(kids, torch.randn(B, suffix, Hkv, D, device="cuda", dtype=dtype),
                 torch.randn(B, suffix, Hkv, D, device="cuda", dtype=dtype))
    tables = fastattn.cascade_tables(cache, kids)
    table = cache.block_table_tensor(kids)
    lens = cache.seq_lens_tensor(kids)
    cu_k = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    cu_q = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(B, Hq, D, device="cuda", dtype=dtype)
    max_k = P + suffix
    runs = {
        "plain": lambda i: fastattn.flash_attn_varlen_func(q, cache.k_cache, cache.v_cache, cu_q, cu_k, 1,
                                                           max_k, causal=True, block_table=table),
        "paged-decode": lambda i: fastattn.flash_attn_with_kvcache(q.unsqueeze(1), cache.k_cache, cache.v_cache,
                                                                   cache_seqlens=lens, block_table=table),
        "cascade": lambda i: fastattn.cascade_attention(q, cache.k_cache, cache.v_cache, cu_q, 1, tables),
    }
    times = {name: [] for name in runs}
    modes = {}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in runs.items():
                ms, modes[name] = time_cuda_graph(fn, 1, reps=10)
                times[name].append(ms)
    bad = {n: m for n, m in modes.items() if m != "graph"}
    if bad:
        print(f"not captured (timed eagerly, host time included): {bad}")
    kv_row = 2 * Hkv * D * 2  # K and V bytes per token
    need = {"plain": B * (P + suffix) * kv_row, "paged-decode": B * (P + suffix) * kv_row, "cascade": (P + B * suffix) * kv_row}
    return [(name, 1e3 * median(ts), need[name]) for name, ts in times.items()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefixes", default="2048,8192,32768")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--suffix", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks need a CUDA GPU")
    rows = []
    for P in (int(x) for x in args.prefixes.split(",")):
        for B in (int(x) for x in args.batches.split(",")):
            res = bench(P, B, args.suffix, args.rounds)
            plain_us = res[1][1]  # speedup against the paged decode kernel
            for name, us, need in res:
                rows.append([str(P), str(B), name, f"{us:.1f}", f"{need / 2**20:.0f}", f"{plain_us / us:.2f}"])
            print(".", end="", flush=True)
    print()
    print(f"device: {device_name()}, torch {torch.__version__}, bf16, Hq/Hkv 32/8, D 128, suffix {args.suffix}")
    print(format_table(["prefix", "requests", "impl", "us", "K/V MiB needed", "vs paged-decode"], rows))


if __name__ == "__main__":
    main()
