"""Dev: decode A/B probe on a GPU machine (run from the repository root).

For each benchmarks/decode config: cuDNN's time, ours with the heuristic and
with forced split counts x ring depths (FASTATTN_DECODE_STAGES), best six
first, and the largest difference to cuDNN's output. PROFILE=1 adds a
torch.profiler kernel-time breakdown of B=1 x 16k (ours: split kernel +
combine; cuDNN). Env: ONLY="0,3" (config indices), SPLITS="8,16,32",
STAGES="3,4". Build variants with FASTATTN_NVCC_EXTRA (setup.py), e.g.
"-DFASTATTN_DECODE_BLOCK_N=128".

    SPLITS=8,16,32 STAGES=3,4 python scripts/dev_decode_probe.py
"""
import os, sys, torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
sys.path.insert(0, os.getcwd())
import fastattn
from benchmarks.common import time_cuda_graph, copies_to_exceed_l2
HQ, HKV, D = 32, 8, 128
CONFIGS = [(1, 16384), (1, 65536), (1, 131072), (8, 8192), (32, 4096), (64, 2048), (16, 32768)]
only = os.environ.get("ONLY")
if only:
    CONFIGS = [CONFIGS[int(i)] for i in only.split(",")]
splits_env = os.environ.get("SPLITS")

def cudnn(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)

for B, L in CONFIGS:
    kvb = 2 * B * L * HKV * D * 2
    n = copies_to_exceed_l2(kvb, cap=4)
    sets = [(torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16),
             torch.randn(B, L, HKV, D, device="cuda", dtype=torch.bfloat16),
             torch.randn(B, L, HKV, D, device="cuda", dtype=torch.bfloat16)) for _ in range(n)]
    ref = cudnn(*sets[0]).transpose(1, 2).float()
    t_c, _ = time_cuda_graph(lambda i: cudnn(*sets[i]), n)
    res = []
    cand = [0] + [s for s in ([int(x) for x in splits_env.split(",")] if splits_env else
                              [1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 48, 64])
                  if 8 * B * s <= 1100 and (L // 64) >= 2 * s]
    for stages in os.environ.get("STAGES", "3,4").split(","):
        os.environ["FASTATTN_DECODE_STAGES"] = stages
        for s in cand:
            out = fastattn.flash_attn_with_kvcache(*sets[0], num_splits=s)
            err = (out.float() - ref).abs().max().item()
            t, _ = time_cuda_graph(lambda i: fastattn.flash_attn_with_kvcache(*sets[i], num_splits=s), n)
            res.append((t, stages, s, err))
    os.environ.pop("FASTATTN_DECODE_STAGES")
    res.sort()
    heur = [r for r in res if r[2] == 0]
    line = " ".join(f"st{st}/s{s}:{t*1e3:.1f}" for t, st, s, e in res[:6])
    print(f"B={B:3d} L={L:6d} cudnn {t_c*1e3:6.1f}us  heur " +
          " ".join(f"st{st}:{t*1e3:.1f}" for t, st, s, e in heur) +
          f" | best {line} | maxerr {max(r[3] for r in res):.3g}", flush=True)
    del sets
    torch.cuda.empty_cache()

if os.environ.get("PROFILE"):
    from torch.profiler import profile, ProfilerActivity
    B, L = 1, 16384
    q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, L, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for f, name in ((lambda: fastattn.flash_attn_with_kvcache(q, k, v), "ours"), (lambda: cudnn(q, k, v), "cudnn")):
        for _ in range(5): f()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20): f()
            torch.cuda.synchronize()
        print(name)
        for e in prof.key_averages():
            if e.device_type.name == "CUDA" or "CUDA" in str(e.device_type):
                print(f"   {e.key[:90]:90s} n={e.count:3d} avg={e.device_time_total / max(e.count,1):.1f}us")
