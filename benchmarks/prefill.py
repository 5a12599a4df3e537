"""Prefill/training attention: fastattn vs torch SDPA backends and FlexAttention, same run.

bf16, hidden 2048 (hdim 64 x 32 heads, hdim 128 x 16 heads), S in {1k, 4k, 16k},
batch = 16k / S, causal and not; forward and backward TFLOP/s, ratios vs the
best torch backend. All implementations get the same (B, H, S, D) tensors and
are measured in interleaved rounds (--rounds, default 3; best per-round median).

    python -m benchmarks.prefill            # full matrix
    python -m benchmarks.prefill --quick    # a few minutes on an H100
Writes benchmarks/results/prefill.json and prefill.png.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastattn  # noqa: E402
from benchmarks.common import (Result, attention_flops, copies_to_exceed_l2, device_name,  # noqa: E402
                               format_table, median, save_json, time_cuda)

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def configs(quick):
    seqlens = [1024, 4096, 16384]
    heads = [(64, 32), (128, 16)]
    out = []
    for D, H in heads:
        for S in seqlens:
            for causal in (False, True):
                if quick and S == 16384 and not causal:
                    continue
                out.append(dict(B=16384 // S, H=H, S=S, D=D, causal=causal))
    return out


def make_impls(flex_ok):
    impls = {"fastattn": lambda q, k, v, c: fastattn.scaled_dot_product_attention(q, k, v, is_causal=c)}
    for name, backend in SDPA_BACKENDS.items():
        def run(q, k, v, c, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=c)
        impls[name] = run
    if flex_ok:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        # One compiled graph per (shape, mask, grad mode): lift dynamo's limit so
        # that no config falls back to the unfused implementation.
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.cache_size_limit = 256
        flex = torch.compile(flex_attention, dynamic=False)
        masks = {}

        def run_flex(q, k, v, c):
            if not c:
                return flex(q, k, v)
            key = (q.shape[-2], k.shape[-2])
            if key not in masks:
                masks[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, *key,
                                               device=q.device)
            return flex(q, k, v, block_mask=masks[key])
        impls["flex"] = run_flex
    return impls


def add_score_mods(impls, softcap, alibi, flex_ok, dropout=0.0):
    """--softcap C / --alibi / --dropout P: flash_attn_func on the same tensors (as (B, S, H, D)
    views) without and with softcap=C / ALiBi (the standard slopes) / dropout_p=P, so their
    cost is read off one run; FlexAttention with the same cap as a score_mod when it runs,
    torch's flash backend with the same dropout."""
    slopes = {}

    def flash(q, k, v, c, cap=0.0, with_alibi=False, p=0.0):  # (B, H, S, D) in and out, as every impl
        h = q.shape[1]
        if with_alibi and h not in slopes:
            slopes[h] = fastattn.sparse.alibi_slopes(h).to(q.device)
        out = fastattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       causal=c, softcap=cap, dropout_p=p,
                                       alibi_slopes=slopes[h] if with_alibi else None)
        return out.transpose(1, 2)
    impls["fastattn-flash"] = lambda q, k, v, c: flash(q, k, v, c)
    if alibi:
        impls["fastattn-alibi"] = lambda q, k, v, c: flash(q, k, v, c, with_alibi=True)
    if dropout:
        impls["fastattn-dropout"] = lambda q, k, v, c: flash(q, k, v, c, p=dropout)

        def sdpa_flash_dropout(q, k, v, c):
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=c,
                                                                        dropout_p=dropout)
        impls["sdpa-flash-dropout"] = sdpa_flash_dropout
    if not softcap:
        return impls
    impls["fastattn-softcap"] = lambda q, k, v, c: flash(q, k, v, c, softcap)
    if flex_ok:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        masks = {}

        def cap(score, b, h, qi, ki):
            return softcap * torch.tanh(score / softcap)

        def run_flex(q, k, v, c):
            key = (q.shape[-2], k.shape[-2])
            if c and key not in masks:
                masks[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, *key,
                                               device=q.device)
            return flex(q, k, v, score_mod=cap, block_mask=masks[key] if c else None)
        impls["flex-softcap"] = run_flex
    return impls


def add_variants(impls, specs):
    """--variant NAME:VAR=VALUE[,VAR=VALUE]: fastattn run with those environment
    switches (read by the launchers per call), e.g. "sm90:FASTATTN_FWD_WS=0",
    measured in the same interleaved rounds as everything else."""
    base = impls["fastattn"]
    for spec in specs:
        name, _, assigns = spec.partition(":")
        env = dict(a.split("=", 1) for a in assigns.split(",") if a)

        def run(q, k, v, c, env=env):
            saved = {key: os.environ.get(key) for key in env}
            os.environ.update(env)
            try:
                return base(q, k, v, c)
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
        impls[f"fastattn-{name}"] = run
    return impls


def _time_fwd(impl, sets, causal, n):
    with torch.no_grad():
        return median(time_cuda(lambda i: impl(*sets[i], causal), n))


def _time_bwd(impl, sets, douts, causal, n):
    outs = [impl(*sets[i], causal) for i in range(n)]
    try:
        return median(time_cuda(
            lambda i: torch.autograd.grad(outs[i], sets[i], douts[i], retain_graph=True), n))
    finally:
        del outs


def bench_config(cfg, impls, modes, rounds, dtype=torch.bfloat16):
    """Every implementation on the same input tensors, measured in `rounds`
    interleaved rounds (impl A, B, ..., then A, B, ... again): each reported
    time is the best of its per-round medians, so a slow phase of the GPU
    (clocks, power, another process) that hits one implementation's turn does
    not decide a ratio. extra["round_spread"] = slowest / fastest round - 1."""
    B, H, S, D, causal = cfg["B"], cfg["H"], cfg["S"], cfg["D"], cfg["causal"]
    set_bytes = 4 * B * H * S * D * 2
    n = copies_to_exceed_l2(set_bytes, cap=4)
    sets = [[torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
            for _ in range(n)]
    douts = [torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(n)]
    times = {(name, mode): [] for name in impls for mode in modes}
    errors = {}
    for _ in range(rounds):
        for mode in modes:
            for name, impl in impls.items():
                if (name, mode) in errors:
                    continue
                try:
                    ms = (_time_fwd(impl, sets, causal, n) if mode == "fwd"
                          else _time_bwd(impl, sets, douts, causal, n))
                    times[(name, mode)].append(ms)
                except Exception as e:  # a backend that does not run a config is reported, not fatal
                    errors[(name, mode)] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    results = []
    for name in impls:
        for mode in modes:
            ts = times[(name, mode)]
            if (name, mode) in errors or not ts:
                results.append(Result(cfg, name, mode, None, error=errors.get((name, mode), "no time")))
                continue
            ms = min(ts)
            flops = attention_flops(B, H, S, S, D, causal, mode)
            results.append(Result(cfg, name, mode, ms, flops / ms / 1e9,
                                  extra={"round_ms": ts, "round_spread": max(ts) / ms - 1}))
    del sets, douts
    torch.cuda.empty_cache()
    return results


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    modes = sorted({r.mode for r in results})
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.5), squeeze=False)
    cfg_key = lambda c: f"D{c['D']} S{c['S'] // 1024}k{' c' if c['causal'] else ''}"
    for ax, mode in zip(axes[0], modes):
        rs = [r for r in results if r.mode == mode]
        cfgs = list(dict.fromkeys(cfg_key(r.config) for r in rs))
        impls = list(dict.fromkeys(r.impl for r in rs))
        w = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            vals = [next((r.tflops or 0 for r in rs if r.impl == impl and cfg_key(r.config) == c), 0)
                    for c in cfgs]
            ax.bar([i + j * w for i in range(len(cfgs))], vals, w, label=impl)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cfgs))])
        ax.set_xticklabels(cfgs, rotation=30, fontsize=8)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"attention {mode}, bf16")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer configs, no FlexAttention compile")
    ap.add_argument("--modes", default="fwd,bwd")
    ap.add_argument("--impls", default="", help="comma list to restrict (fastattn,sdpa-flash,...)")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--softcap", type=float, default=0.0,
                    help="also time flash_attn_func without / with this softcap (and flex with it)")
    ap.add_argument("--alibi", action="store_true", help="also time flash_attn_func with ALiBi")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="also time flash_attn_func and torch's flash backend with this dropout_p")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds per config")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:VAR=VALUE,...: also time fastattn under these environment switches")
    ap.add_argument("--configs", default="", help="comma list of DxS[c] to restrict, e.g. 128x16384c")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks need a CUDA GPU")
    modes = args.modes.split(",")
    flex_ok = not (args.no_flex or args.quick)
    impls = add_variants(make_impls(flex_ok), args.variant)
    if args.softcap or args.alibi or args.dropout:
        impls = add_score_mods(impls, args.softcap, args.alibi, flex_ok, args.dropout)
    if args.impls:
        keep = args.impls.split(",") + [f"fastattn-{v.partition(':')[0]}" for v in args.variant]
        keep += [k for k in impls if "softcap" in k or "dropout" in k
                 or k in ("fastattn-flash", "fastattn-alibi")]
        impls = {k: v for k, v in impls.items() if k in keep}
    cfgs = configs(args.quick)
    if args.configs:
        want = set(args.configs.split(","))
        cfgs = [c for c in cfgs if f"{c['D']}x{c['S']}{'c' if c['causal'] else ''}" in want]
    results = []
    for cfg in cfgs:
        results += bench_config(cfg, impls, modes, max(1, args.rounds))
        print(".", end="", flush=True)
    print()
    meta = {"device": device_name(), "torch": torch.__version__, "dtype": "bf16",
            "rounds": max(1, args.rounds)}
    save_json(os.path.join(args.out, "prefill.json"), results, meta)
    plot(results, os.path.join(args.out, "prefill.png"))
    print(f"device: {meta['device']}, torch {meta['torch']}, bf16")
    print(summary_table(results, list(impls)))
    combined = combined_table(results, list(impls))
    if combined:
        print("forward + backward time with the score mod / without (same run):")
        print(combined)
    spreads = [(r.extra["round_spread"], r.impl, r.mode, r.config) for r in results
               if r.extra.get("round_spread") is not None]
    if spreads:
        w = max(spreads, key=lambda x: x[0])
        c = w[3]
        print(f"largest spread between rounds: {100 * w[0]:.1f}% ({w[1]} {w[2]} "
              f"{c['B']}x{c['H']}x{c['S']}x{c['D']} causal={c['causal']}); "
              f"median {100 * median([x[0] for x in spreads]):.1f}%")


def summary_table(results, impl_names):
    rows = []
    keyed = {}
    for r in results:
        c = r.config
        keyed.setdefault((c["D"], c["H"], c["S"], c["B"], c["causal"], r.mode), {})[r.impl] = r
    for (D, H, S, B, causal, mode), by_impl in keyed.items():
        row = [mode, f"{B}x{H}x{S}x{D}", "yes" if causal else "no"]
        for name in impl_names:
            r = by_impl.get(name)
            row.append("n/a" if r is None or r.tflops is None else f"{r.tflops:.0f}")
        ours = by_impl.get("fastattn")
        torch_best = max((r.tflops or 0 for n, r in by_impl.items() if n.startswith("sdpa")), default=0)
        flash = by_impl.get("sdpa-flash")
        ratio = lambda a, b: "n/a" if not a or not b else f"{a / b:.2f}"
        row.append(ratio(ours and ours.tflops, flash and flash.tflops))
        row.append(ratio(ours and ours.tflops, torch_best))
        mods = [m for m in ("softcap", "alibi", "dropout") if f"fastattn-{m}" in impl_names]
        for m in mods:  # time with the score mod / time without (same run)
            plain, modded = by_impl.get("fastattn-flash"), by_impl.get(f"fastattn-{m}")
            row.append(ratio(plain and plain.tflops, modded and modded.tflops))
        rows.append(row)
    headers = ["mode", "BxHxSxD", "causal"] + [f"{n} TF/s" for n in impl_names] + ["vs flash", "vs best sdpa"]
    headers += [f"{m} time x" for m in ("softcap", "alibi", "dropout") if f"fastattn-{m}" in impl_names]
    return format_table(headers, rows)


def combined_table(results, impl_names):
    """(fwd + bwd time with softcap / ALiBi / dropout) / (the same without), per config: the
    cost a training step sees."""
    mods = [m for m in ("softcap", "alibi", "dropout") if f"fastattn-{m}" in impl_names]
    if not mods:
        return ""
    ms = {}
    for r in results:
        if r.tflops:
            c = r.config
            ms[(c["B"], c["H"], c["S"], c["D"], c["causal"], r.impl, r.mode)] = r.ms
    rows = []
    for key in sorted({k[:5] for k in ms}):
        def total(name):
            parts = [ms.get(key + (name, m)) for m in ("fwd", "bwd")]
            return None if None in parts else sum(parts)
        plain = total("fastattn-flash")
        if plain is None:
            continue
        row = [f"{key[0]}x{key[1]}x{key[2]}x{key[3]}", "yes" if key[4] else "no"]
        for m in mods:
            t = total(f"fastattn-{m}")
            row.append("n/a" if t is None else f"{t / plain:.3f}")
        rows.append(row)
    return format_table(["BxHxSxD", "causal"] + [f"{m} fwd+bwd x" for m in mods], rows)


if __name__ == "__main__":
    main()
