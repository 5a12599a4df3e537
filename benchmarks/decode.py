"""Decoding: fastattn's split-KV decode vs torch SDPA (flash, cuDNN) and FlexAttention, same run.

bf16, Hq=32, Hkv=8, D=128, one query token, (B, L) in {(1,16k), (1,64k),
(1,128k), (8,8k), (32,4k), (64,2k), (16,32k)}; every sequence has L cached
tokens. Each step is timed under CUDA graphs (as a serving loop replays a
captured decode step), inputs rotated past L2, every implementation in
interleaved rounds (--rounds, default 3; best per-round median, as in the
prefill benchmark). Reports microseconds and the achieved bandwidth of the K
and V bytes read, against the read bandwidth a plain streaming kernel reaches
(benchmarks.common.read_bandwidth_gbs: the ceiling of a read-only stream).

"fastattn-fp8" reads the same K/V quantized to an e4m3 cache (per-KV-head
scales amax / 448) and dequantized in the kernel: half the bytes. Its output's
max / mean difference from the bf16-cache output is reported (fp8 err).

    python -m benchmarks.decode [--out DIR] [--rounds N] [--no-fp8] [--configs B:L,...]
Writes DIR/decode.json.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastattn  # noqa: E402
from benchmarks.common import (Result, copies_to_exceed_l2, copy_bandwidth_gbs, device_name,  # noqa: E402
                               format_table, read_bandwidth_gbs, save_json, time_cuda_graph)

CONFIGS = [(1, 16384), (1, 65536), (1, 131072), (8, 8192), (32, 4096), (64, 2048), (16, 32768)]
HQ, HKV, D = 32, 8, 128


def quantize_e4m3(x):
    """x (B, L, Hkv, D) -> e4m3 codes and per-KV-head float32 scales amax / 448."""
    scale = (x.float().abs().amax(dim=(0, 1, 3)) / 448).clamp_min(1e-12)
    return (x.float() / scale.view(1, 1, -1, 1)).to(torch.float8_e4m3fn), scale


def make_inputs(B, L, n, fp8):
    sets = []
    for _ in range(n):
        q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, L, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, L, HKV, D, device="cuda", dtype=torch.bfloat16)
        sets.append((q, k, v) + ((*quantize_e4m3(k), *quantize_e4m3(v)) if fp8 else ()))
    return sets


def impls(flex_ok=True, fp8=True):
    def ours(q, k, v, *_):
        return fastattn.flash_attn_with_kvcache(q, k, v)

    def ours_fp8(q, k, v, kq, ks, vq, vs):
        return fastattn.flash_attn_with_kvcache(q, kq, vq, k_descale=ks, v_descale=vs)

    def sdpa(backend):
        def run(q, k, v, *_):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2), enable_gqa=True)
        return run

    out = {"fastattn": ours, "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
           "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    if fp8:
        out["fastattn-fp8"] = ours_fp8
    if flex_ok:
        from torch.nn.attention.flex_attention import flex_attention
        torch._dynamo.config.recompile_limit = 256
        flex = torch.compile(flex_attention, dynamic=False)
        out["flex"] = lambda q, k, v, *_: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               enable_gqa=True)
    return out


def bench_config(B, L, fns, rounds):
    """Every implementation on the same inputs in `rounds` interleaved rounds
    (A, B, ..., then A, B, ... again); each reported time is the best of its
    per-round medians, so a slow phase of the GPU (clocks, power) that hits
    one implementation's turn does not decide a ratio. The outputs are
    compared with fastattn's (extra["max_diff_vs_fastattn"])."""
    cfg = dict(B=B, L=L, Hq=HQ, Hkv=HKV, D=D)
    kv_bytes = 2 * B * L * HKV * D * 2
    n = copies_to_exceed_l2(kv_bytes, cap=4)
    sets = make_inputs(B, L, n, "fastattn-fp8" in fns)
    times = {name: [] for name in fns}
    extra, errors = {}, {}
    ref = None
    with torch.no_grad():
        for name, fn in fns.items():  # outputs first (and every backend warmed up)
            try:
                out = fn(*sets[0]).reshape(B, HQ, D) if name.startswith("fastattn") else \
                    fn(*sets[0]).transpose(1, 2).reshape(B, HQ, D)
                ref = out if ref is None else ref
                diff = (out.float() - ref.float()).abs()
                extra[name] = {"max_diff_vs_fastattn": diff.max().item(),
                               "mean_diff_vs_fastattn": diff.mean().item()}
            except Exception as e:  # a backend that does not run a config is reported, not fatal
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        for _ in range(rounds):
            for name, fn in fns.items():
                if name in errors:
                    continue
                try:
                    ms, mode = time_cuda_graph(lambda i: fn(*sets[i]), n)
                    times[name].append(ms)
                    extra[name]["timing"] = mode
                except Exception as e:
                    errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    results = []
    for name in fns:
        ts = times[name]
        if name in errors or not ts:
            results.append(Result(cfg, name, "decode", None, error=errors.get(name, "no time")))
            continue
        ms = min(ts)
        read = kv_bytes // 2 if name == "fastattn-fp8" else kv_bytes
        results.append(Result(cfg, name, "decode", ms, gbps=read / ms / 1e6,
                              extra={**extra[name], "round_ms": ts, "round_spread": max(ts) / ms - 1}))
    return results


def per_round_speedup(ours, others):
    """Best other's time / ours within each round, e.g. "1.02 / 1.03 / 1.02"."""
    rounds = ours.extra.get("round_ms") if ours.ms else None
    other_rounds = [r.extra["round_ms"] for r in others if r.ms and len(r.extra.get("round_ms", [])) == len(rounds or [])]
    if not rounds or not other_rounds:
        return "n/a"
    return " / ".join(f"{min(o[i] for o in other_rounds) / t:.2f}" for i, t in enumerate(rounds))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds per config")
    ap.add_argument("--no-fp8", action="store_true", help="skip the FP8-cache column")
    ap.add_argument("--configs", default=None, help="B:L,... instead of the default list")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks need a CUDA GPU")
    configs = CONFIGS if not args.configs else [tuple(int(x) for x in c.split(":"))
                                                for c in args.configs.split(",")]
    read_bw, copy_bw = read_bandwidth_gbs(), copy_bandwidth_gbs()
    fns = impls(flex_ok=not args.no_flex, fp8=not args.no_fp8)
    results = []
    for B, L in configs:
        results += bench_config(B, L, fns, max(1, args.rounds))
        torch.cuda.empty_cache()  # this config's inputs are gone
        print(".", end="", flush=True)
    print()
    meta = {"device": device_name(), "torch": torch.__version__, "dtype": "bf16",
            "read_bandwidth_gbs": read_bw, "copy_bandwidth_gbs": copy_bw, "rounds": max(1, args.rounds)}
    save_json(os.path.join(args.out, "decode.json"), results, meta)
    print(f"device: {meta['device']}, torch {meta['torch']}, bf16; read stream {read_bw:.0f} GB/s, "
          f"SM copy {copy_bw:.0f} GB/s (read+write)")
    names = list(fns)
    others = [n for n in names if not n.startswith("fastattn")]
    rows = []
    for B, L in configs:
        by = {r.impl: r for r in results if r.config["B"] == B and r.config["L"] == L}
        ours = by["fastattn"]
        best = min((by[n].ms for n in others if by[n].ms), default=None)
        row = [B, L, B * L]
        row += ["n/a" if by[n].ms is None else f"{by[n].ms * 1e3:.1f}" for n in names]
        row += [f"{ours.gbps:.0f}" if ours.gbps else "n/a",
                f"{100 * ours.gbps / read_bw:.0f}%" if ours.gbps else "n/a",
                f"{best / ours.ms:.2f}" if best and ours.ms else "n/a",
                per_round_speedup(ours, [by[n] for n in others])]
        f8 = by.get("fastattn-fp8")
        if f8 is not None:
            ok = f8.ms and ours.ms
            row += [f"{100 * f8.gbps / read_bw:.0f}%" if ok else "n/a",
                    f"{ours.ms / f8.ms:.2f}" if ok else "n/a",
                    (f"{f8.extra['max_diff_vs_fastattn']:.1e} / {f8.extra['mean_diff_vs_fastattn']:.1e}"
                     if ok else "n/a")]
        rows.append(row)
    headers = (["B", "L", "tokens"] + [f"{n} us" for n in names] +
               ["ours GB/s", "of read BW", "speedup vs best other", "per round"])
    if "fastattn-fp8" in fns:
        headers += ["fp8 of read BW", "fp8 vs bf16 cache", "fp8 err max / mean"]
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
