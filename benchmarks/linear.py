"""Linear attention: fastattn.linear vs flash-linear-attention (fla, when importable)
and vs fastattn's causal softmax attention on the same shapes, same run.

Shapes (B, T, H, D): (4, 4096, 16, 128), (1, 32768, 16, 128), (2, 16384, 32, 128),
(8, 2048, 32, 64), plus Qwen3-Next's gated delta rule (16 q/k heads, 32 value
heads, d 128, B 1, T 8k and 32k). Ops: chunk_gated_delta_rule, chunk_simple_gla
(--ops gdn,simple_gla,gla adds chunk_gla, per-key decays). Forward and forward+backward ms (median of interleaved
rounds, inputs rotated past the L2), the first call's latency (fla autotunes and
compiles there), and the decode step (fused_recurrent_gated_delta_rule, T = 1,
states in a pool) in microseconds for B = 1..256 with its state traffic
against the measured copy bandwidth.

    python -m benchmarks.linear [--quick] [--rounds 3] [--ops gdn,simple_gla]
    python -m benchmarks.linear --smoke        # tiny shapes on the CPU: checks the plumbing
Carry fla's wheel (fla-core) to the GPU machine as the device README says.
fastattn's CUDA kernels (forward without gradients, decode) are switched on
(the default; FASTATTN_LINEAR_CUDA=0 times the torch form instead). Forward +
backward runs the chunked form (fastattn/linear/chunked.py) in torch ops with its
scans as Python loops ("fastattn", the library's default until the training
kernels have run on a GPU) and through the training kernels ("fastattn opt-in
kernels", FASTATTN_LINEAR_CUDA_TRAIN=1, which also switches on chunk_gla's
chunked forward kernels, the forward scan's wide slice and, with
FASTATTN_LINEAR_SEQ_SPLIT=auto, the sequence split; --no-train-kernels leaves
those rows out).
"""
import argparse
import os
import sys
import time

import torch

os.environ.setdefault("FASTATTN_LINEAR_CUDA", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastattn  # noqa: E402
from fastattn import linear as ours  # noqa: E402
from benchmarks.common import (Result, copies_to_exceed_l2, copy_bandwidth_gbs, device_name,  # noqa: E402
                               format_table, median, save_json, time_cuda)

SHAPES = [  # (B, T, H, HV, D)
    (4, 4096, 16, 16, 128), (1, 32768, 16, 16, 128), (2, 16384, 32, 32, 128), (8, 2048, 32, 32, 64),
    (1, 8192, 16, 32, 128), (1, 32768, 16, 32, 128),
]
QUICK = [(4, 4096, 16, 16, 128), (1, 8192, 16, 32, 128)]
SMOKE = [(1, 200, 2, 4, 16)]


def fla_ops():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla
        from fla.ops.gla import chunk_gla
    except Exception as e:  # not installed here
        return None, str(e).splitlines()[0][:80]
    return {"gdn": chunk_gated_delta_rule, "simple_gla": chunk_simple_gla, "gla": chunk_gla,
            "gdn_step": fused_recurrent_gated_delta_rule}, None


def make_inputs(op, B, T, H, HV, D, device, dtype, requires_grad):
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)
    q, k = rnd(B, T, H, D), rnd(B, T, H, D)
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(dtype)
    v = rnd(B, T, HV, D)
    gate = -torch.rand(B, T, HV, device=device, generator=g) * 0.2
    beta = torch.rand(B, T, HV, device=device, generator=g)
    t = dict(q=q, k=k, v=v, g=gate)
    if op == "gdn":
        t["beta"] = beta
    if op == "simple_gla":
        t["v"] = rnd(B, T, H, D)
        t["g"] = t["g"][..., :H].contiguous()
    if op == "gla":  # a log decay per key channel
        t["v"] = rnd(B, T, H, D)
        t["g"] = -torch.rand(B, T, H, D, device=device, generator=g) * 0.2
    for x in t.values():
        x.requires_grad_(requires_grad)
    return t


def call(impl_ops, op, t):
    # An implementation may carry environment switches (impl_ops["env"]) set around its calls.
    env = impl_ops.get("env", {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if op == "gdn":
            return impl_ops["gdn"](t["q"], t["k"], t["v"], t["g"], t["beta"])[0]
        if op == "gla":
            return impl_ops["gla"](t["q"], t["k"], t["v"], t["g"])[0]
        return impl_ops["simple_gla"](t["q"], t["k"], t["v"], g=t["g"])[0]
    finally:
        for k, val in saved.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val


def timer(device):
    if device == "cuda":
        return lambda fn, n: median(time_cuda(fn, n, warmup=2, repeat=10, min_ms=100))

    def cpu_time(fn, n):
        ts = []
        for i in range(3):
            t0 = time.perf_counter()
            fn(i % n)
            ts.append(1e3 * (time.perf_counter() - t0))
        return median(ts)
    return cpu_time


def bench_chunk(shapes, op_names, impls, rounds, device, dtype, modes=("fwd", "fwd_bwd")):
    results = []
    tm = timer(device)
    for (B, T, H, HV, D) in shapes:
        for op in op_names:
            if op in ("simple_gla", "gla") and HV != H:
                continue
            cfg = dict(op=op, B=B, T=T, H=H, HV=HV, D=D)
            per_set = 4 * B * T * HV * D * 2
            n = copies_to_exceed_l2(per_set, cap=3) if device == "cuda" else 1
            sets = [make_inputs(op, B, T, H, HV, D, device, dtype, True) for _ in range(n)]
            live, first = {}, {}
            for name, ops_ in impls.items():
                try:
                    # The first call (fla: autotuning and JIT; the backward's only when timed).
                    t0 = time.perf_counter()
                    if "fwd_bwd" in modes:
                        call(ops_, op, sets[0]).float().sum().backward()
                    else:
                        with torch.no_grad():
                            call(ops_, op, sets[0])
                    if device == "cuda":
                        torch.cuda.synchronize()
                    first[name] = 1e3 * (time.perf_counter() - t0)
                    live[name] = ops_
                except Exception as e:  # an implementation that cannot run this shape
                    results.append(Result(cfg, name, "fwd", None, error=str(e).splitlines()[0][:60]))
            # Interleaved rounds: every implementation once per round, medians over rounds.
            times = {(name, m): [] for name, ops_ in live.items() for m in ops_.get("modes", modes)
                     if m in modes}
            for _ in range(rounds):
                for name, ops_ in live.items():
                    if (name, "fwd") in times:
                        with torch.no_grad():
                            times[name, "fwd"].append(tm(lambda i: call(ops_, op, sets[i]), n))
                    if (name, "fwd_bwd") in times:
                        times[name, "fwd_bwd"].append(
                            tm(lambda i: call(ops_, op, sets[i]).float().sum().backward(), n))
            for (name, mode), ts in times.items():
                first_mode = "fwd" if (name, "fwd") in times else mode
                r = Result(cfg, name, mode, median(ts), extra=dict(first_ms=first[name]) if mode == first_mode else {})
                results.append(r)
                print(f"  {op} {B}x{T}x{H}/{HV}x{D} {mode} {name}: {r.ms:.3f} ms", flush=True)
            # Anchor: causal softmax attention on the same (B, T, H, D).
            q = torch.randn(B, T, HV, D, device=device, dtype=dtype, requires_grad=True)
            try:
                ms = tm(lambda i: fastattn.flash_attn_func(q, q, q, causal=True), 1)
                results.append(Result(cfg, "softmax-causal", "fwd", ms))
            except Exception as e:
                results.append(Result(cfg, "softmax-causal", "fwd", None, error=str(e)[:60]))
    return results


def bench_decode(batches, impls, device, dtype, H=16, HV=32, D=128):
    """One decode step (T = 1) over a pool of 2 * B states: microseconds and the state's
    read + write traffic in GB/s."""
    results = []
    tm = timer(device)
    for B in batches:
        pool = torch.zeros(2 * B, HV, D, D, device=device, dtype=torch.float32)
        idx = torch.arange(0, 2 * B, 2, device=device)
        t = make_inputs("gdn", B, 1, H, HV, D, device, dtype, False)
        cfg = dict(op="gdn_step", B=B, H=H, HV=HV, D=D)
        state_bytes = 2 * B * HV * D * D * 4
        for name, ops_ in impls.items():
            if name != "fastattn" and "gdn_step" not in ops_:
                continue  # a variant of ours that changes only the chunked path
            try:
                if name == "fastattn":
                    fn = lambda i: ours.fused_recurrent_gated_delta_rule(
                        t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=pool,
                        ssm_state_indices=idx, inplace_final_state=True)
                else:
                    h0 = pool[idx]
                    fn = lambda i: ops_["gdn_step"](t["q"], t["k"], t["v"], t["g"], t["beta"],
                                                    initial_state=h0, output_final_state=True)
                with torch.no_grad():
                    ms = tm(fn, 1)
                results.append(Result(cfg, name, "step", ms, gbps=state_bytes / ms / 1e6))
                print(f"  gdn_step B={B} {name}: {1e3 * ms:.1f} us", flush=True)
            except Exception as e:
                results.append(Result(cfg, name, "step", None, error=str(e).splitlines()[0][:60]))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ops", default="gdn,simple_gla")
    ap.add_argument("--modes", default="fwd,fwd_bwd", help="chunked modes: fwd, fwd_bwd")
    ap.add_argument("--decode", default="1,8,64,256", help="decode batch sizes ('' for none)")
    ap.add_argument("--no-train-kernels", dest="train_kernels", action="store_false",
                    help="leave out the 'fastattn opt-in kernels' rows (FASTATTN_LINEAR_CUDA_TRAIN=1)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks need a CUDA GPU (or --smoke)")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    impls = {"fastattn": {"gdn": ours.chunk_gated_delta_rule, "simple_gla": ours.chunk_simple_gla,
                          "gla": ours.chunk_gla}}
    if args.train_kernels:
        # The kernels still opt-in in the library: the training path's, chunk_gla's chunked
        # forward, the forward scan's wide slice and the sequence split.
        impls["fastattn opt-in kernels"] = dict(impls["fastattn"], env={"FASTATTN_LINEAR_CUDA_TRAIN": "1",
                                                                        "FASTATTN_LINEAR_SEQ_SPLIT": "auto"})
    fla, why = fla_ops() if not args.smoke else (None, "smoke run")
    if fla is not None:
        impls["fla"] = fla
    shapes = SMOKE if args.smoke else (QUICK if args.quick else SHAPES)
    results = bench_chunk(shapes, [o for o in args.ops.split(",") if o], impls,
                          1 if args.smoke else args.rounds, device, dtype, args.modes.split(","))
    batches = [1, 4] if args.smoke else [int(b) for b in args.decode.split(",") if b]
    results += bench_decode(batches, impls, device, dtype,
                            **(dict(H=2, HV=4, D=16) if args.smoke else {}))
    copy = copy_bandwidth_gbs() if device == "cuda" else None
    meta = {"device": device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "fla": why or "yes", "copy_gbs": copy}
    save_json(os.path.join(args.out, "linear_smoke.json" if args.smoke else "linear.json"), results, meta)
    rows = []
    for r in results:
        c = r.config
        shape = f"{c['B']}x{c.get('T', 1)}x{c['H']}/{c['HV']}x{c['D']}"
        val = f"{r.ms:.3f}" if r.ms else (r.error or "-")
        extra = f"{r.extra['first_ms']:.0f}" if r.extra.get("first_ms") else ""
        bw = f"{r.gbps:.0f}" + (f" ({100 * r.gbps / copy:.0f}%)" if copy else "") if r.gbps else ""
        rows.append([c["op"], shape, r.mode, r.impl, val, extra, bw])
    print(f"device: {meta['device']}, torch {meta['torch']}, fla: {meta['fla']}")
    print(format_table(["op", "BxTxH/HVxD", "mode", "impl", "ms", "first call ms", "state GB/s"], rows))


if __name__ == "__main__":
    main()
