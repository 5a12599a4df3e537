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
