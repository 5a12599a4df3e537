"""Query-aware sparse decode (Quest) vs full paged decode: time and accuracy, same run.

bf16, Hq=32, Hkv=8, D=128, page size 16, one query token, contexts of 32k and 128k
tokens in scattered pages; token budgets 1024 / 4096 (selection included in the time:
bounds, top-k, the per-head tables, the decode). CUDA-graph timing, interleaved rounds.

Accuracy is the output's relative L2 error against full attention over the same cache, on
two kinds of data: "random" (i.i.d. keys: attention is spread thin over all keys, the
worst case for any page selection: the full output is an average of ~L values, a subset's
is not, so the relative error exceeds 1) and "peaked" (32 random pages per sequence lean
towards the queries, so a few pages hold most of the attention, as in long-context
retrieval).

    python -m benchmarks.quest [--rounds N] [--configs B:L,...] [--budgets 1024,4096]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastattn  # noqa: E402
from benchmarks.common import device_name, format_table, time_cuda_graph  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16


def make_case(B, L, peaked, gen):
    pages = B * L // BS
    k = torch.randn(pages, BS, HKV, D, device="cuda", generator=gen)
    v = torch.randn(pages, BS, HKV, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    q = torch.randn(B, 1, HQ, D, device="cuda", generator=gen)
    table = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32).view(B, L // BS)
    if peaked:  # 32 pages per sequence whose keys lean towards each KV head's queries:
        # +16 along the group's mean query direction raises their logits by about 8,
        # so those 512 keys hold 90-98% of the attention at 32k-128k
        qg = q[:, 0].view(B, HKV, HQ // HKV, D).mean(2)
        qg = qg / qg.norm(dim=-1, keepdim=True)
        for b in range(B):
            hot = table[b, torch.randperm(L // BS, device="cuda", generator=gen)[:32]].long()
            k[hot] += 16.0 * qg[b][None, None]
    k = k.to(torch.bfloat16)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    k_min = k.float().amin(1)  # (pages, Hkv, D): what PagedKVCache(key_bounds=True) keeps
    k_max = k.float().amax(1)
    return q.to(torch.bfloat16), k, v, table, lens, k_min, k_max


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default="1:32768,1:131072,8:32768")
    ap.add_argument("--budgets", default="1024,4096")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks need a CUDA GPU")
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for B, L in configs:
        cases = {kind: make_case(B, L, kind == "peaked", gen) for kind in ("random", "peaked")}
        q, k, v, table, lens, k_min, k_max = cases["random"]
        fns = {"full": lambda: fastattn.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table)}
        for bud in budgets:
            fns[f"quest-{bud}"] = (lambda bud=bud: fastattn.quest_decode(q, k, v, table, lens, k_min, k_max, bud))
        times = {n: [] for n in fns}
        with torch.no_grad():
            for _ in range(args.rounds):
                for n, fn in fns.items():
                    ms, _ = time_cuda_graph(lambda i: fn(), 1)
                    times[n].append(ms)
            errs = {}
            for kind, (qq, kk, vv, tt, ll, lo, hi) in cases.items():
                full = fastattn.flash_attn_with_kvcache(qq, kk, vv, cache_seqlens=ll, block_table=tt)
                for bud in budgets:
                    errs[(kind, bud)] = rel_err(fastattn.quest_decode(qq, kk, vv, tt, ll, lo, hi, bud), full)
        full_ms = min(times["full"])
        for bud in budgets:
            t = min(times[f"quest-{bud}"])
            rows.append([B, L, bud, f"{full_ms * 1e3:.1f}", f"{t * 1e3:.1f}", f"{full_ms / t:.2f}",
                         f"{errs[('random', bud)]:.3f}", f"{errs[('peaked', bud)]:.3f}"])
        del cases, fns
        torch.cuda.empty_cache()
        print(".", end="", flush=True)
    print()
    print(f"device: {device_name()}, torch {torch.__version__}, bf16, Hq={HQ} Hkv={HKV} D={D}, page {BS}")
    print(format_table(["B", "context", "budget", "full us", "quest us", "speedup", "rel err random",
                        "rel err peaked"], rows))


if __name__ == "__main__":
    main()
