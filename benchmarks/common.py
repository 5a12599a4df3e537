"""Timing and accounting shared by the benchmarks.

- CUDA events around each call, warm-up first, the median of many repeats.
- Inputs rotate among enough copies to exceed twice the L2 cache, so the
  numbers measure memory, not the cache.
- FLOPs: 4·B·H·Sq·Sk·D for a forward (halved for causal), backward 2.5x.
"""
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch


def attention_flops(B, H, Sq, Sk, D, causal=False, mode="fwd"):
    f = 4.0 * B * H * Sq * Sk * D
    if causal:
        f /= 2
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def l2_bytes(device=None) -> int:
    props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def copies_to_exceed_l2(bytes_per_set: int, cap: int = 16) -> int:
    """How many input sets to rotate so that together they exceed 2x the L2."""
    return max(1, min(cap, math.ceil(2 * l2_bytes() / max(1, bytes_per_set))))


def time_cuda(fn: Callable[[int], object], n_sets: int, warmup: int = 5, repeat: int = 30,
              min_ms: float = 200.0) -> List[float]:
    """Per-call milliseconds of fn(set_index), one CUDA-event pair per call.

    Calls are queued back to back and synchronized only at the end, so the
    host's Python/dispatch time overlaps the previous call's GPU time instead
    of showing up as idle GPU time inside the measurement. Repeats until both
    `repeat` calls and about `min_ms` of GPU time are reached.
    """
    for i in range(warmup):
        fn(i % n_sets)
    torch.cuda.synchronize()
    # Size the run from one timed call.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(0)
    end.record()
    end.synchronize()
    calls = max(repeat, min(10 * repeat, int(min_ms / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(calls)]
    for i, (s, e) in enumerate(events):
        s.record()
        fn(i % n_sets)
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def time_cuda_graph(fn: Callable[[int], object], n_sets: int, reps: int = 15,
                    inner: Optional[int] = None):
    """(median per-call ms of fn(set_index), mode): `inner` calls rotating over the
    n_sets input copies are captured in one CUDA graph and replayed `reps` times
    between two events, so host overhead (Python, dispatch) is not measured, as
    in a serving loop that replays a captured decode step. If fn cannot be
    captured, falls back to queued eager calls (mode "eager: why")."""
    for i in range(3):
        fn(i % n_sets)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if inner is None:
        a.record()
        for i in range(5):
            fn(i % n_sets)
        b.record()
        b.synchronize()
        one = a.elapsed_time(b) / 5  # an upper bound when host-bound
        inner = max(n_sets, min(64, int(1.5 / max(one, 1e-3))))
    mode = "graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(2):
                fn(i % n_sets)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(inner):
                fn(i % n_sets)
        run = g.replay
    except Exception as e:  # not capturable: queued eager calls
        torch.cuda.synchronize()
        mode = "eager: " + str(e).splitlines()[0][:100]

        def run():
            for i in range(inner):
                fn(i % n_sets)
    run()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a.record()
        run()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / inner)
    return statistics.median(ts), mode


def _eager_ms(fn: Callable[[], object], reps: int = 10) -> float:
    """Median ms of fn() between CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth of an SM kernel in GB/s, counting bytes read plus
    written. Timed eagerly: a copy captured in a CUDA graph becomes a memcpy node that the
    driver may give to a copy engine, which streams far slower than the SMs (on an H200
    the graph-captured tensor copy read 2765 GB/s where this reads about 4200)."""
    src = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = _eager_ms(lambda: torch.bitwise_xor(src, 0, out=dst))
    return 2 * nbytes / ms / 1e6


def read_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """What a plain read-only streaming kernel reaches, in GB/s: the best of two
    reductions over nbytes (each byte read once, nothing written but a scalar). The
    ceiling for kernels that stream a cache without writing it (decode); a copy's
    read + write rate is not, since writes cost the memory more than reads."""
    x = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda").random_()
    best = min(_eager_ms(lambda: x.sum()), _eager_ms(lambda: x.view(torch.float32).amax()))
    return nbytes / best / 1e6


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


@dataclass
class Result:
    config: Dict
    impl: str
    mode: str  # fwd / bwd
    ms: Optional[float]
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    error: Optional[str] = None
    extra: Dict = field(default_factory=dict)


def device_name() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} ({p.multi_processor_count} SMs, L2 {l2_bytes() // 2**20} MiB)"


def save_json(path: str, results: List[Result], meta: Dict):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=1)


def format_table(headers: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])
