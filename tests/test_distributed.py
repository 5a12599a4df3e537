"""Context parallelism (fastattn.distributed): ring and Ulysses attention over
2 and 4 gloo processes (and 1), output, lse and gradients against float64
attention over the whole sequence; on a GPU the same with CUDA tensors (gloo
staging them through host memory), fp16 under the 2x / 3x rule."""
import json
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from conftest import cuda_ready
from distributed_worker import cases, worker
from reference import ATOL, GRAD_FACTOR, OUT_FACTOR

import fastattn.distributed as fd
from fastattn.distributed.layout import contiguous_segments, plan_step, zigzag_segments

WORLDS = [1, 2, 4]


def _spawn(world, device):
    with tempfile.TemporaryDirectory() as d:
        init = os.path.join(d, "init")
        mp.spawn(worker, args=(world, init, d, device, None), nprocs=world, join=True)
        out = []
        for r in range(world):
            with open(os.path.join(d, f"rank{r}.json")) as f:
                out.append(json.load(f))
        return out


_RESULTS = {}


def _results(world, device):
    key = (world, device)
    if key not in _RESULTS:
        _RESULTS[key] = _spawn(world, device)
    return _RESULTS[key]


def _check(per_rank, name):
    for r, res in enumerate(per_rank):
        got = res[name]
        assert "error" not in got, f"rank {r}: {got.get('error')}"
        for key in ("out", "lse", "dq", "dk", "dv"):
            ours, base = got[key]
            factor = OUT_FACTOR if key in ("out", "lse") else GRAD_FACTOR
            assert ours <= factor * base + ATOL, (
                f"rank {r} {name} {key}: error {ours:.3e} exceeds {factor}x the same-precision "
                f"baseline's {base:.3e} + {ATOL}")
        if "repeat_equal" in got:
            assert got["repeat_equal"], f"rank {r} {name}: a second run differs"


CPU_CASES = [(w, n) for w in WORLDS for n in cases(w, "cpu")]
CUDA_CASES = [(w, n) for w in (1, 2) for n in cases(w, "cuda")]


@pytest.mark.parametrize("world,name", CPU_CASES, ids=[f"{w}-{n}" for w, n in CPU_CASES])
def test_matches_whole_sequence_attention_cpu(world, name):
    _check(_results(world, "cpu"), name)


@pytest.mark.cuda
@pytest.mark.parametrize("world,name", CUDA_CASES, ids=[f"{w}-{n}" for w, n in CUDA_CASES])
def test_matches_whole_sequence_attention_cuda(world, name):
    if not cuda_ready():
        pytest.skip("no CUDA")
    _check(_results(world, "cuda"), name)


def _visible(S, left, right):
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    ok = torch.ones(S, S, dtype=torch.bool)
    if left is not None:
        ok &= j >= i - left
    if right is not None:
        ok &= j <= i + right
    return ok


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous-uneven", "zigzag"])
@pytest.mark.parametrize("band", [(None, None), (None, 0), (5, 0), (3, 7), (0, 0), (40, 2), (None, 3)])
def test_ring_plans_visit_every_visible_pair_once(world, layout, band):
    """Every (query, key) pair of the whole sequence that the mask shows is covered by
    exactly one call of exactly one ring step, and no hidden pair by any."""
    if layout == "zigzag":
        segs = zigzag_segments(6, world)
    else:
        segs = contiguous_segments([9 + (r % 2) * 2 - (r == world - 1) for r in range(world)])
    S = sum(s.length for s in segs[0]) * world if layout == "zigzag" else sum(x[0].length for x in segs)
    left, right = band
    hits = torch.zeros(S, S, dtype=torch.int32)
    for r in range(world):
        for s in range(world):
            j = (r - s) % world
            for c in plan_step(segs[r], segs[j], left, right):
                for qs in segs[r]:
                    for ks in segs[j]:
                        for qi in range(max(c.q0, qs.offset), min(c.q1, qs.offset + qs.length)):
                            for kj in range(max(c.k0, ks.offset), min(c.k1, ks.offset + ks.length)):
                                i, jj = qi - c.q0, kj - c.k0
                                if (c.left is None or jj >= i - c.left) and (c.right is None or jj <= i + c.right):
                                    hits[qs.start + qi - qs.offset, ks.start + kj - ks.offset] += 1
    want = _visible(S, left, right).to(torch.int32)
    assert torch.equal(hits, want)


def test_zigzag_causal_work_is_balanced():
    """With zigzag sharding every rank computes the same number of visible pairs."""
    world, chunk = 4, 8
    segs = zigzag_segments(chunk, world)
    work = []
    for r in range(world):
        n = 0
        for s in range(world):
            for c in plan_step(segs[r], segs[(r - s) % world], None, 0):
                n += (c.q1 - c.q0) * (c.k1 - c.k0) / (2 if c.causal else 1)
        work.append(n)
    assert max(work) - min(work) <= 2 * chunk, work


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_unshard_round_trip(layout):
    x = torch.randn(2, 48, 3, 4)
    for world in (1, 2, 3, 4):
        if layout == "zigzag" and 48 % (2 * world):
            continue
        shards = [fd.shard_sequence(x, r, world, layout) for r in range(world)]
        assert torch.equal(fd.unshard_sequence(shards, layout), x)
    cu = torch.tensor([0, 16, 24, 48], dtype=torch.int32)
    xv = torch.randn(48, 3, 4)
    parts = [fd.shard_varlen(xv, cu, r, 2, layout) for r in range(2)]
    assert torch.equal(fd.unshard_varlen([p[0] for p in parts], cu, layout), xv)
    assert parts[0][1].tolist() == [0, 8, 12, 24]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="zigzag"):
        fd.shard_sequence(torch.randn(1, 10, 2, 4), 0, 4, "zigzag")
    with pytest.raises(ValueError, match="layout"):
        fd.shard_sequence(torch.randn(1, 8, 2, 4), 0, 2, "spiral")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.ring_attention(*(torch.randn(1, 8, 2, 16) for _ in range(3)))


def test_context_parallel_benchmark_smoke():
    """benchmarks/context_parallel.py runs end to end (one process, CPU, tiny shapes)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "benchmarks.context_parallel", "--smoke"], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1-GPU kernel" in r.stdout and "ulysses" in r.stdout
