"""Context-parallel attention: time per step and TFLOP/s per GPU.

    torchrun --nproc-per-node N -m benchmarks.context_parallel [--seqlens 131072,262144]
    python -m benchmarks.context_parallel            # N = 1 (a one-process group)

For each total sequence length S (bf16, head dim 128, GQA 32/8 by default),
causal (zigzag layout) and not (contiguous), and each method (ring, ulysses,
2-D = ulysses over pairs x ring, when N >= 4): forward and forward+backward
milliseconds per step (CUDA events, warm-up, median of interleaved rounds),
TFLOP/s per GPU (visited pairs only for causal; backward 2.5x forward), and
for ring attention the fraction of its communication hidden behind compute:
(t_compute + t_comm - t_step) / t_comm, with t_compute the same calls on
local blocks and t_comm the same exchanges without attention. The anchor is
our single-GPU kernel at the same per-GPU work: S/N queries against S keys
(non-causal), as one flash_attn_func call.
NCCL with NVLink multicast off (NCCL_NVLS_ENABLE=0); --backend gloo for a
sanity run of several processes on one GPU.
"""
import argparse
import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
import fastattn  # noqa: E402
import fastattn.distributed as fd  # noqa: E402
from fastattn.distributed import ring as ring_mod  # noqa: E402
from fastattn.distributed.comm import Ring  # noqa: E402
from benchmarks.common import attention_flops, format_table, median  # noqa: E402


DEVICE = "cuda"


def init(backend):
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    else:
        f = tempfile.mktemp()
        dist.init_process_group(backend, init_method=f"file://{f}", rank=0, world_size=1)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if DEVICE == "cuda":
        torch.cuda.set_device(local if backend == "nccl" else 0)
    return dist.get_rank(), dist.get_world_size()


def timed(fn, warmup=1, reps=3):
    """Median milliseconds of fn() over reps, all ranks in step (a barrier each)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        dist.barrier()
        if DEVICE != "cuda":  # --smoke: host timing of tiny shapes, only to exercise the script
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
            continue
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    nccl = dist.get_backend() == dist.Backend.NCCL
    t = torch.tensor([median(ts)], device="cuda" if nccl else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
    return t.item()


def groups_2d(rank, world):
    pairs = [dist.new_group([2 * i, 2 * i + 1]) for i in range(world // 2)]
    rings = [dist.new_group(list(range(u, world, 2))) for u in range(2)]
    return pairs[rank // 2], rings[rank % 2], rank // 2, rank % 2


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="32768,131072")
    ap.add_argument("--heads", default="32,8")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--methods", default="ring,ulysses,2d")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--causal", default="1,0")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="nccl")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes (exercises the script)")
    args = ap.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE, args.backend, args.seqlens, args.heads, args.head_dim = "cpu", "gloo", "64", "4,2", 16
    rank, world = init(args.backend)
    Hq, Hkv = (int(x) for x in args.heads.split(","))
    D, dt = args.head_dim, (torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    g2 = groups_2d(rank, world) if world >= 4 and world % 2 == 0 else None
    rows = []
    for S in [int(s) for s in args.seqlens.split(",")]:
        for causal in [c == "1" for c in args.causal.split(",")]:
            layout = "zigzag" if causal else "contiguous"
            gen = torch.Generator(device=DEVICE).manual_seed(0)
            mk = lambda h, n: torch.randn(1, n, h, D, device=DEVICE, dtype=dt, generator=gen)
            S_loc = S // world
            q, k, v = mk(Hq, S_loc), mk(Hkv, S_loc), mk(Hkv, S_loc)
            for t in (q, k, v):
                t.requires_grad_()
            do = torch.randn_like(q)
            methods = {"ring": lambda **kw: fd.ring_attention(q, k, v, causal=causal, layout=layout, **kw)}
            if Hq % world == 0:
                methods["ulysses"] = lambda **kw: fd.ulysses_attention(q, k, v, causal=causal, **kw)
            if g2 is not None:
                methods["2d"] = lambda **kw: fd.ulysses_attention(q, k, v, group=g2[0], ring_group=g2[1],
                                                                  causal=causal, layout=layout, **kw)
            flops = attention_flops(1, Hq, S, S, D, causal)
            for name in [m for m in args.methods.split(",") if m in methods]:
                fn = methods[name]
                for mode in args.modes.split(","):
                    if mode == "fwd":
                        with torch.no_grad():
                            ms = timed(lambda: fn(), reps=args.reps)
                    else:
                        ms = timed(lambda: torch.autograd.backward(fn(), do), reps=args.reps)
                    f = flops * (1.0 if mode == "fwd" else 3.5)
                    hidden = ""
                    if name == "ring" and mode == "fwd" and world > 1:
                        hidden = f"{hidden_fraction(q, k, v, causal, layout, ms, args.reps):.2f}"
                    rows.append([name, world, S, int(causal), mode, f"{ms:.1f}",
                                 f"{f / world / ms / 1e9:.0f}", hidden])
            # Anchor: one GPU, S/N queries x S keys (non-causal), the same per-GPU work.
            qa = torch.randn(1, S_loc, Hq, D, device=DEVICE, dtype=dt, requires_grad=True)
            ka = torch.randn(1, S, Hkv, D, device=DEVICE, dtype=dt, requires_grad=True)
            va = torch.randn_like(ka, requires_grad=True)
            doa = torch.randn_like(qa)
            per_gpu = attention_flops(1, Hq, S_loc, S, D, False)
            for mode in args.modes.split(","):
                if mode == "fwd":
                    with torch.no_grad():
                        ms = timed(lambda: fastattn.flash_attn_func(qa, ka, va), reps=args.reps)
                else:
                    ms = timed(lambda: torch.autograd.backward(fastattn.flash_attn_func(qa, ka, va), doa),
                               reps=args.reps)
                f = per_gpu * (1.0 if mode == "fwd" else 3.5)
                rows.append(["1-GPU kernel", 1, f"{S_loc}x{S}", 0, mode, f"{ms:.1f}", f"{f / ms / 1e9:.0f}", ""])
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    if rank == 0:
        name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
        print(f"device: {name}, N = {world}, backend {args.backend}, {dt}, heads {Hq}/{Hkv}, head dim {D}")
        print(format_table(["method", "N", "S", "causal", "mode", "ms", "TFLOP/s per GPU",
                            "comm hidden"], rows))
    dist.destroy_process_group()


def hidden_fraction(q, k, v, causal, layout, ms_step, reps):
    """(t_compute + t_comm - t_step) / t_comm for the ring forward."""
    world = dist.get_world_size()
    kv_lengths = [q.shape[1]] * world
    from fastattn.distributed.layout import contiguous_segments, plan_step, zigzag_segments
    segs = zigzag_segments(q.shape[1] // 2, world) if layout == "zigzag" else contiguous_segments(kv_lengths)
    rank = dist.get_rank()
    right = 0 if causal else None
    plans = [plan_step(segs[rank], segs[(rank - s) % world], None, right) for s in range(world)]
    cfg = ring_mod._Config(group=None, scale=q.shape[-1] ** -0.5, left=None, right=right, layout=layout,
                           deterministic=False, cu_seqlens=None, plans=plans, varlen_rows=None,
                           kv_lengths=kv_lengths, k_shape=tuple(k.shape), v_shape=tuple(v.shape), rank=rank)
    acc_out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    acc_lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)

    def compute():
        for calls in plans:
            ring_mod._attend_block(cfg, calls, q, k, v, acc_out, acc_lse)

    ring = Ring()

    def comm():
        kb, vb = k.detach(), v.detach()
        for _ in range(world - 1):
            kb, vb = ring.exchange([kb, vb]).wait()

    with torch.no_grad():
        t_compute = timed(compute, reps=reps)
        t_comm = timed(comm, reps=reps)
    return max(0.0, min(1.0, (t_compute + t_comm - ms_step) / max(t_comm, 1e-6)))


if __name__ == "__main__":
    main()
