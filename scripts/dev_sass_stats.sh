#!/usr/bin/env bash
# Dev: SASS instruction mix of the hdim-128 bf16 decode kernels (contiguous vs
# paged), to see what a loader change costs per kernel. Needs cuobjdump.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc -gencode arch=compute_90,code=sm_90 -std=c++17 -O3 -Icsrc -cubin \
  -DFASTATTN_ENABLE_HDIM128 -DFASTATTN_ENABLE_BF16 csrc/cuda/flash_decode_hdim128_bf16.cu -o /tmp/dec.cubin
cuobjdump -sass /tmp/dec.cubin > /tmp/dec.sass
awk '/Function :/{name=($0 ~ /Lb1E/) ? "paged" : "contiguous"} /^\s+\/\*[0-9a-f]{4}\*\//{n[name]++; split($0,a," "); op=a[2]; if (op ~ /^@/) op=a[3]; sub(/\..*/,"",op); c[name" "op]++} END{for (k in n) print k, "total", n[k]; for (k in c) if (c[k] >= 20) print k, c[k]}' /tmp/dec.sass | sort
