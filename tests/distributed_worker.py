"""One rank of the context-parallel tests (spawned by tests/test_distributed.py).

Every rank builds the same whole-sequence inputs, runs the distributed call on
its shard, and compares its shard of out, lse and the gradients with the same
shard of the float64 reference (and of the same-precision baseline, for the
2x / 3x rule). Results go to <out_dir>/rank<r>.json.
"""
import datetime
import json
import os
import sys
import traceback
import zlib

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import attention_math, attention_math_varlen, max_err  # noqa: E402

import fastattn.distributed as fd  # noqa: E402

D = 16


def _case(kind, layout="contiguous", causal=False, window=(-1, -1), S=None, lengths=None, heads=(4, 2),
          dtype=torch.float64, ring2d=False, deterministic=False):
    return dict(kind=kind, layout=layout, causal=causal, window=window, S=S, lengths=lengths,
                heads=heads, dtype=dtype, ring2d=ring2d, deterministic=deterministic)


def cases(world, device):
    lp = torch.bfloat16 if device == "cpu" else torch.float16
    z = 2 * world
    c = {
        "ring-contiguous-uneven": _case("ring", S=37),
        "ring-contiguous-uneven-causal": _case("ring", S=37, causal=True),
        "ring-zigzag-causal": _case("ring", "zigzag", True, S=z * 5),
        "ring-zigzag-full": _case("ring", "zigzag", False, S=z * 3),
        "ring-contiguous-window-causal": _case("ring", S=41, causal=True, window=(7, 0)),
        "ring-contiguous-window-both": _case("ring", S=41, window=(9, 4)),
        "ring-zigzag-window-causal": _case("ring", "zigzag", True, window=(6, 0), S=z * 4),
        "ring-zigzag-window-both": _case("ring", "zigzag", False, window=(5, 11), S=z * 4),
        "ring-mqa-deterministic": _case("ring", "zigzag", True, S=z * 3, heads=(3, 1), deterministic=True),
        "ring-varlen-causal": _case("ring", causal=True, lengths=[world * 3, world, world * 7]),
        "ring-varlen-zigzag-causal": _case("ring", "zigzag", True, lengths=[z * 2, z, z * 3]),
        "ring-varlen-full": _case("ring", lengths=[world * 5, world * 2]),
        "ring-zigzag-causal-lowp": _case("ring", "zigzag", True, S=z * 16, dtype=lp),
        "ring-contiguous-window-lowp": _case("ring", S=131, window=(33, 0), causal=True, dtype=lp),
        "ulysses-causal": _case("ulysses", causal=True, S=world * 9, heads=(2 * world, world)),
        "ulysses-gqa-repeat": _case("ulysses", causal=True, S=world * 7, heads=(2 * world, 1)),
        "ulysses-window": _case("ulysses", window=(5, 2), S=world * 8, heads=(world, world)),
        "ulysses-varlen-causal": _case("ulysses", causal=True, lengths=[13, 2 * world + 1, 26 - 2 * world],
                                       heads=(2 * world, world)),
        "ulysses-causal-lowp": _case("ulysses", causal=True, S=world * 40, heads=(2 * world, world), dtype=lp),
    }
    if world == 4:
        c["ulysses-x-ring-zigzag-causal"] = _case("ulysses", "zigzag", True, S=16 * 3, heads=(4, 2),
                                                  ring2d=True)
        c["ulysses-x-ring-contiguous-window"] = _case("ulysses", "contiguous", False, window=(6, 3),
                                                      S=16 * 2, heads=(4, 2), ring2d=True)
    if device == "cuda":  # the GPU kernels take fp16 / bf16 only: every case in fp16
        c = {n: dict(x, dtype=lp) for n, x in c.items()}
        c["ring-varlen-zigzag-causal-lowp"] = _case("ring", "zigzag", True, lengths=[z * 9, z * 4], dtype=lp)
        c["ring-contiguous-uneven-causal-lowp"] = _case("ring", S=301, causal=True, dtype=lp)
    return c


def _inputs(case, device, gen):
    Hq, Hkv = case["heads"]
    total = case["S"] if case["lengths"] is None else sum(case["lengths"])
    shape = (total,) if case["lengths"] is not None else (1, total)
    mk = lambda h: torch.randn(*shape, h, D, generator=gen, dtype=torch.float64)
    q, k, v, do = mk(Hq), mk(Hkv), mk(Hkv), mk(Hq)
    cu = None
    if case["lengths"] is not None:
        cu = torch.tensor([0] + case["lengths"]).cumsum(0).to(torch.int32)
    return q, k, v, do, cu


def _reference(q, k, v, do, cu, case, dtype):
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    scale = D ** -0.5
    mask = dict(causal=case["causal"], window=case["window"])
    if cu is None:
        out, lse = attention_math(*leaves, scale, dtype=dtype, **mask)
    else:
        out, lse = attention_math_varlen(*leaves, cu.tolist(), cu.tolist(), scale, dtype=dtype, **mask)
    grads = torch.autograd.grad((out * do.to(out.dtype)).sum(), leaves)
    return out.detach(), lse.detach(), grads


def _groups_2d(rank, world):
    """Ulysses groups {0,1}, {2,3} and ring groups {0,2}, {1,3}: rank = 2 * ring + ulysses."""
    u_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    r_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return u_groups[rank // 2], r_groups[rank % 2], rank // 2, rank % 2


def run_case(name, case, rank, world, device, groups_2d):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q, k, v, do, cu = _inputs(case, device, gen)
    layout, dtype = case["layout"], case["dtype"]
    # The references start from the very inputs ours gets: rounded to dtype, then widened.
    q, k, v, do = (t.to(dtype).double() for t in (q, k, v, do))
    kw = dict(causal=case["causal"], window_size=case["window"], deterministic=case["deterministic"],
              return_lse=True)
    ring2d = case["ring2d"]
    if ring2d:
        ugroup, rgroup, rrank, urank = groups_2d
        shard = lambda x: fd.shard_sequence(fd.shard_sequence(x, rrank, 2, layout), urank, 2)
    elif case["kind"] == "ring" and cu is not None:
        shard = lambda x: fd.shard_varlen(x, cu, rank, world, layout)[0]
    elif case["kind"] == "ring":
        shard = lambda x: fd.shard_sequence(x, rank, world, layout)
    elif cu is not None:  # ulysses varlen: a contiguous slice of the packed tokens
        shard = lambda x: x.tensor_split(world, dim=0)[rank]
    else:
        shard = lambda x: fd.shard_sequence(x, rank, world)
    local = [shard(t).to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    if case["kind"] == "ring":
        cu_local = fd.shard_varlen(q, cu, rank, world, layout)[1].to(device) if cu is not None else None
        out, lse = fd.ring_attention(*local, cu_seqlens=cu_local, layout=layout, **kw)
    elif ring2d:
        out, lse = fd.ulysses_attention(*local, group=ugroup, ring_group=rgroup, layout=layout, **kw)
    else:
        cu_d = cu.to(device) if cu is not None else None
        out, lse = fd.ulysses_attention(*local, cu_seqlens=cu_d, **kw)
    grads = torch.autograd.grad((out * shard(do).to(device=device, dtype=dtype)).sum(), local)

    ref = _reference(q, k, v, do, cu, case, torch.float64)
    base = _reference(q, k, v, do, cu, case, dtype) if dtype != torch.float64 else None
    lse_shard = lambda l: shard(l.transpose(-1, -2)).transpose(-1, -2)  # positions are lse's last dim
    res = {}
    for key, ours_t, ref_t, base_t, take in (
            ("out", out, ref[0], base[0] if base else None, shard),
            ("lse", lse, ref[1], base[1] if base else None, lse_shard),
            ("dq", grads[0], ref[2][0], base[2][0] if base else None, shard),
            ("dk", grads[1], ref[2][1], base[2][1] if base else None, shard),
            ("dv", grads[2], ref[2][2], base[2][2] if base else None, shard)):
        e_ours = max_err(ours_t.detach().cpu(), take(ref_t))
        e_base = max_err(take(base_t), take(ref_t)) if base_t is not None else 0.0
        res[key] = [e_ours, e_base]
    # A second run on the same input must give the same bits (no races, fixed merge order).
    if case["deterministic"]:
        again = fd.ring_attention(*local, cu_seqlens=None, layout=layout, **kw)[0]
        res["repeat_equal"] = bool(torch.equal(again, out))
    return res


def worker(rank, world, init_file, out_dir, device, names):
    backend = "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    if device == "cuda":
        torch.cuda.set_device(0)
    torch.manual_seed(0)
    results = {}
    all_cases = cases(world, device)
    groups_2d = _groups_2d(rank, world) if world == 4 else None
    for name in names or list(all_cases):
        try:
            results[name] = run_case(name, all_cases[name], rank, world, device, groups_2d)
        except Exception:
            results[name] = {"error": traceback.format_exc()[-2000:]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
