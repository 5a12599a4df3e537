// How a decode CTA leaves its result: 16-byte output stores and the split
// combine inside a thread-block cluster (bitwise the merge kernel's math).
#pragma once
#include <cstdint>

#include "cuda/common/cluster.h"
#include "cuda/common/fragment.h"
#include "cuda/common/mask.h"
#include "cuda/common/ptx.h"
#include "cuda/common/softmax.h"
#include "cuda/common/tile_io.h"
#include "cuda/common/tma.h"
#include "cuda/common/types.h"
#include "cuda/decode/decode_params.h"

namespace fastattn {
namespace gpu {

// out[b, i, h, col .. col + 7] = v (one 16-byte store; col % 8 == 0; ragged
// queries: i is the row in the packed out, whose batch stride is 0).
template <typename Elem>
__device__ __forceinline__ void store_out8(const DecodeParams& p, int b, int i, int h, int col,
                                           const float (&v)[8]) {
  Elem* dst = static_cast<Elem*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride +
              h * p.o_head_stride + col;
  uint4 u;
  u.x = pack2<Elem>(v[0], v[1]);
  u.y = pack2<Elem>(v[2], v[3]);
  u.z = pack2<Elem>(v[4], v[5]);
  u.w = pack2<Elem>(v[6], v[7]);
  *reinterpret_cast<uint4*>(dst) = u;
}

// Split combine inside a thread-block cluster (DecodeParams::combine_in_cluster):
// the num_splits CTAs of one (m-block, KV head, sequence) form the cluster
// (cluster rank = split). Each left its merged O rows (fp32, normalized) in its
// own o_slab, in the first warp's slot of each row tile, and their LSEs in
// lse_fin. Output chunk u = (row, 8 columns) is merged by one thread of the
// CTA of rank u % num_splits, which reads every split's LSE and chunk from
// that split's shared memory (all loads issued before any is used) and
// merges them exactly as the merge kernel merges one batch of <= 8 parts
// (merge_states.cu: same operations in the same order), so a decode gives
// bitwise the same result whichever combine runs. An empty split
// (lse = -inf) weighs 0; all empty gives out = 0 and lse = -inf.
template <typename Traits, typename Elem>
__device__ __forceinline__ void decode_cluster_combine(const DecodeParams& p, const float* o_slab,
                                                       const float* lse_fin, int b, int q0, int hk, int m0,
                                                       int m_end, int warps_n, int rank) {
  constexpr int kOStride = Traits::kOStride;
  constexpr int kMaxParts = kMaxClusterSplits;
  constexpr float kLog2e = 1.4426950408889634f;
  ptx::cluster_sync();  // every split's rows and LSEs are written
  const int num_splits = p.num_splits;  // <= kMaxClusterSplits (host)
  const int chunks = p.head_dim / 8;
  const int units = (m_end - m0) * chunks;
  const uint32_t slab = ptx::smem_u32(o_slab);
  const uint32_t lses = ptx::smem_u32(lse_fin);
  for (int u = rank + static_cast<int>(threadIdx.x) * num_splits; u < units;
       u += Traits::kThreads * num_splits) {
    const int rr = u / chunks;
    const int col = (u % chunks) * 8;
    const int row = (rr >> 4) * warps_n * 16 + (rr & 15);
    const uint32_t o_addr = slab + 4 * (row * kOStride + col);
    float l[kMaxParts];
    float4 x[kMaxParts][2];
#pragma unroll
    for (int s = 0; s < kMaxParts; ++s) {
      l[s] = neg_inf();
      x[s][0] = x[s][1] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (s < num_splits) {
        l[s] = ptx::ld_cluster_f32(ptx::cluster_map(lses + 4 * rr, s));
        const uint32_t a = ptx::cluster_map(o_addr, s);
        x[s][0] = ptx::ld_cluster_f32x4(a);
        x[s][1] = ptx::ld_cluster_f32x4(a + 16);
      }
    }
    float m = l[0];
#pragma unroll
    for (int s = 1; s < kMaxParts; ++s) m = fmaxf(m, l[s]);
    float sum = 0.f;
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
    if (m != neg_inf()) {
#pragma unroll
      for (int s = 0; s < kMaxParts; ++s) {
        const bool live = l[s] != neg_inf();
        const float w = live ? ptx::ex2_approx((l[s] - m) * kLog2e) : 0.f;
        sum += w;
        const float xs[8] = {x[s][0].x, x[s][0].y, x[s][0].z, x[s][0].w,
                             x[s][1].x, x[s][1].y, x[s][1].z, x[s][1].w};
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = live ? fmaf(w, xs[e], acc[e]) : acc[e];
      }
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] *= inv;
    const int r = m0 + rr;
    const int i = fast_div(p.group_div, r);
    const int h = hk * static_cast<int>(p.group_div.d) + fast_mod(p.group_div, r, i);
    if (col == 0)
      p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + q0 + i] =
          sum > 0.f ? m + __logf(sum) : neg_inf();
    store_out8<Elem>(p, b, q0 + i, h, col, acc);
  }
  ptx::cluster_sync();  // no CTA leaves, or reuses its shared memory, while a peer reads it
}

}  // namespace gpu
}  // namespace fastattn
