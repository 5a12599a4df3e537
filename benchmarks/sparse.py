"""Block-sparse attention: fastattn vs torch's FlexAttention (the same BlockMask,
same run) and vs fastattn's dense kernel; forward and backward, bf16.

Masks: random full 128x128 blocks at densities 100/50/25/12.5/6.25/3 %
(B4 H16 S8192 D128), causal sliding window 1024 and causal document masks
(packed sequences of 1k-4k) at S 8k/16k/32k (B x S = 32k tokens, H16 D128).
TFLOP/s count visited pairs only: 4·D·(visible (q, k) pairs)·B·H, backward 2.5x.
Also times building the masks: fastattn.create_block_mask vs torch's
create_block_mask (eager and compiled). Interleaved rounds, best per-round median.

    python -m benchmarks.sparse [--quick] [--rounds 3] [--masks random] [--score-mod alibi]
Writes benchmarks/results/sparse.json and sparse.png.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastattn  # noqa: E402
from fastattn import sparse  # noqa: E402
from benchmarks.common import (Result, copies_to_exceed_l2, device_name, format_table, median,  # noqa: E402
                               save_json, time_cuda)

DENSITIES = [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03]


def document_ids(S, seed):
    g = torch.Generator().manual_seed(seed)
    lens, total = [], 0
    while total < S:
        n = int(torch.randint(1024, 4097, (1,), generator=g))
        lens.append(min(n, S - total))
        total += lens[-1]
    return torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).cuda()


def make_masks(quick, kinds):
    """(name, cfg, fastattn BlockMask, torch BlockMask, visible pairs per (b, h))."""
    from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
    from torch.nn.attention.flex_attention import create_block_mask as t_cbm
    out = []
    S = 8192
    for d in (DENSITIES if not quick else [1.0, 0.25, 0.0625, 0.03]) if "random" in kinds else ():
        bm = sparse.random_blocks(S, density=d, B=4, H=16, seed=0, device="cuda")
        z = torch.zeros_like(bm.kv_num_blocks)
        tbm = TorchBlockMask.from_kv_blocks(z, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                            BLOCK_SIZE=128, seq_lengths=(S, S))
        pairs = float(bm.full_kv_num_blocks.sum()) * 128 * 128 / (4 * 16)
        out.append((f"random {100 * d:g}%", dict(B=4, H=16, S=S, D=128), bm, tbm, pairs))
    for S in ((8192, 16384, 32768) if not quick else (8192, 32768)) if kinds & {"window", "document"} else ():
        B = max(1, 32768 // S)
        win = lambda b, h, q, kv: (kv <= q) & (q - kv < 1024)
        tbm = t_cbm(win, None, None, S, S, device="cuda", _compile=True)
        bm = sparse.sliding_window(S, window=1023, device="cuda")  # structured: no bits
        i = torch.arange(S, device="cuda")
        pairs = float(torch.clamp(i + 1, max=1024).sum())
        if "window" in kinds:
            out.append((f"window 1024 S{S // 1024}k", dict(B=B, H=16, S=S, D=128), bm, tbm, pairs))
        doc = document_ids(S, seed=S)
        docm = lambda b, h, q, kv, doc=doc: (doc[q] == doc[kv]) & (kv <= q)
        tbm = t_cbm(docm, None, None, S, S, device="cuda", _compile=True)
        bm = sparse.BlockMask.from_torch(tbm)
        counts = torch.bincount(doc).double()
        pairs = float((counts * (counts + 1) / 2).sum())
        if "document" in kinds:
            out.append((f"document S{S // 1024}k", dict(B=B, H=16, S=S, D=128), bm, tbm, pairs))
    return out


def bench(name, cfg, bm, tbm, pairs, flex, rounds, modes, score_mod=None):
    B, H, S, D = cfg["B"], cfg["H"], cfg["S"], cfg["D"]
    ours_mod = flex_mod = None
    if score_mod == "alibi":  # the same ALiBi for both: ours as a built-in, FlexAttention as a callable
        slopes = sparse.alibi_slopes(H).cuda()
        ours_mod = sparse.alibi(slopes)
        flex_mod = lambda score, b, h, q_idx, kv_idx: score + slopes[h] * (kv_idx - q_idx)
    n = copies_to_exceed_l2(4 * B * H * S * D * 2, cap=3)
    sets = [[torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
             for _ in range(3)] for _ in range(n)]
    dout = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    impls = {
        "fastattn": lambda q, k, v: fastattn.flex_attention(q, k, v, score_mod=ours_mod, block_mask=bm),
        "flex": lambda q, k, v: flex(q, k, v, score_mod=flex_mod, block_mask=tbm),
        "fastattn-dense": lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v),
    }
    times = {(i, m): [] for i in impls for m in modes}
    errors = {}
    for _ in range(rounds):
        for mode in modes:
            for iname, fn in impls.items():
                if (iname, mode) in errors:
                    continue
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            ms = median(time_cuda(lambda i: fn(*sets[i]), n, min_ms=100))
                    else:
                        outs = [fn(*sets[i]) for i in range(n)]
                        ms = median(time_cuda(lambda i: torch.autograd.grad(outs[i], sets[i], dout,
                                                                            retain_graph=True), n, min_ms=100))
                        del outs
                    times[(iname, mode)].append(ms)
                except Exception as e:
                    errors[(iname, mode)] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    res = []
    for (iname, mode), ts in times.items():
        c = dict(cfg, mask=name + (f" +{score_mod}" if score_mod else ""), density=bm.density())
        if not ts:
            res.append(Result(c, iname, mode, None, error=errors.get((iname, mode))))
            continue
        ms = min(ts)
        vis = float(S) * S if iname == "fastattn-dense" else pairs
        flops = 4.0 * B * H * D * vis * (1.0 if mode == "fwd" else 2.5)
        res.append(Result(c, iname, mode, ms, flops / ms / 1e9, extra={"round_ms": ts}))
    del sets
    torch.cuda.empty_cache()
    return res


def build_times():
    """Mask build: fastattn.create_block_mask vs torch's (eager, compiled), document mask S=32k."""
    from torch.nn.attention.flex_attention import create_block_mask as t_cbm
    S = 32768
    doc = document_ids(S, 7)
    mod = lambda b, h, q, kv: (doc[q] == doc[kv]) & (kv <= q)
    out = {}
    for name, fn in (("fastattn", lambda: fastattn.create_block_mask(mod, None, None, S, S, device="cuda")),
                     ("torch-eager", lambda: t_cbm(mod, None, None, S, S, device="cuda")),
                     ("torch-compiled", lambda: t_cbm(mod, None, None, S, S, device="cuda", _compile=True))):
        try:
            fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                ts.append(1e3 * (time.perf_counter() - t0))
            out[name] = median(ts)
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return out


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "bwd")):
        for impl in ("fastattn", "flex"):
            pts = sorted((r.config["density"], r.ms) for r in results
                         if r.mode == mode and r.impl == impl and r.ms and r.config["mask"].startswith("random"))
            if pts:
                ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
        dense = [r.ms for r in results if r.mode == mode and r.impl == "fastattn-dense"
                 and r.config["mask"].startswith("random") and r.ms]
        if dense:
            ax.axhline(min(dense), ls="--", c="grey", label="fastattn dense")
        ax.set_xscale("log")
        ax.set_xlabel("density (% of 128x128 blocks)")
        ax.set_ylabel("ms")
        ax.set_title(f"block-sparse {mode}, B4 H16 S8192 D128 bf16")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="fwd,bwd")
    ap.add_argument("--masks", default="random,window,document", help="which mask families to run")
    ap.add_argument("--no-build-times", action="store_true")
    ap.add_argument("--score-mod", choices=["alibi"], default=None,
                    help="apply a score_mod in ours and FlexAttention (the dense anchor runs without)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks need a CUDA GPU")
    from torch.nn.attention.flex_attention import flex_attention
    torch._dynamo.config.cache_size_limit = 256
    # The timing loop re-runs one backward graph (retain_graph=True), which
    # compiled backwards with donated buffers refuse.
    torch._functorch.config.donated_buffer = False
    torch._dynamo.config.recompile_limit = 256
    flex = torch.compile(flex_attention, dynamic=False)
    modes = args.modes.split(",")
    results = []
    for name, cfg, bm, tbm, pairs in make_masks(args.quick, set(args.masks.split(","))):
        results += bench(name, cfg, bm, tbm, pairs, flex, args.rounds, modes, args.score_mod)
        print(".", end="", flush=True)
    print()
    builds = {} if args.no_build_times else build_times()
    meta = {"device": device_name(), "torch": torch.__version__, "dtype": "bf16", "build_ms": builds}
    tag = "" if args.masks == "random,window,document" else "_" + args.masks.replace(",", "_")
    tag += f"_{args.score_mod}" if args.score_mod else ""
    save_json(os.path.join(args.out, f"sparse{tag}.json"), results, meta)
    plot(results, os.path.join(args.out, f"sparse{tag}.png"))
    rows = []
    keyed = {}
    for r in results:
        keyed.setdefault((r.config["mask"], r.mode, r.config["B"], r.config["S"]), {})[r.impl] = r
    for (mask, mode, B, S), by in keyed.items():
        f, t, d = by.get("fastattn"), by.get("flex"), by.get("fastattn-dense")
        tf = lambda r: f"{r.tflops:.0f}" if r and r.tflops else (r.error[:30] if r and r.error else "-")
        ms = lambda r: f"{r.ms:.3f}" if r and r.ms else "-"
        ratio = lambda a, b: f"{a.tflops / b.tflops:.2f}" if a and b and a.tflops and b.tflops else "-"
        rows.append([mode, mask, f"{B}x16x{S}x128", ms(f), tf(f), ms(t), tf(t), tf(d), ratio(f, t), ratio(f, d)])
    print(f"device: {meta['device']}, torch {meta['torch']}, bf16; TFLOP/s on visited pairs")
    print(format_table(["mode", "mask", "BxHxSxD", "ours ms", "ours TF", "flex ms", "flex TF", "dense TF",
                        "vs flex", "vs dense"], rows))
    print("mask build ms (document S32k):", {k: (round(v, 2) if isinstance(v, float) else v)
                                              for k, v in builds.items()})


if __name__ == "__main__":
    main()
