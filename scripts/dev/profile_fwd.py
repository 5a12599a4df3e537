"""One forward call (after a warm-up) on a given shape, for a profiler to catch:

  ncu --clock-control none -k regex:flash_fwd --launch-skip 1 --launch-count 1 \\
      --section SpeedOfLight --section WarpStateStats python scripts/dev/profile_fwd.py 4 16 4096 128
  args: B H S D [causal]
"""
import sys

import torch

import fastattn

B, H, S, D = (int(x) for x in sys.argv[1:5])
causal = len(sys.argv) > 5 and sys.argv[5] in ("1", "causal", "c")
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for _ in range(2):
    fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)
torch.cuda.synchronize()
