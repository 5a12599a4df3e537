// Launch order of the backward main kernels' CTAs (sm80 and sm90 share it).
//
// grid = (KV blocks [deterministic: dq_splits, each CTA strides over KV blocks],
//         heads_q / heads_per_cta, batch [looped past 65535])
// cta_group > 1 reorders the CTAs (a bijection of the grid): call a (head slot,
// batch) pair a unit; the launch order (x fastest, then y, then z) is cut into
// groups of cta_group units, and inside a group the KV block is the slow index.
// Under a causal mask the first KV blocks of a sequence see the most queries, so
// the longest CTAs of every unit start first instead of the last units' longest
// CTAs starting at the end of the grid (tail imbalance); a group is kept small
// enough for its Q / dO / dq_accum to stay in L2 (launcher: bwd_cta_group).
#pragma once

namespace fastattn {
namespace gpu {

struct BwdCtaStart {
  int n_first;  // first KV block (grid column)
  int slot;     // head slot: q heads [slot * heads_per_cta, + heads_per_cta)
  int b_first;  // first sequence
};

// CTA number lin (in launch order: x fastest) of an (nb, ny, nz) grid; a
// bijection onto the grid (cpp_test/smoke.cpp checks it on the host).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline BwdCtaStart bwd_cta_coords(int lin, int nb, int ny, int nz, int cta_group) {
  if (cta_group > 1) {
    const int units = ny * nz;
    const int g0 = lin / (cta_group * nb) * cta_group;  // first unit of this group
    const int gs = cta_group < units - g0 ? cta_group : units - g0;  // units in this group
    const int r = lin - g0 * nb;
    const int u = g0 + r % gs;
    return {r / gs, u % ny, u / ny};
  }
  return {lin % nb, (lin / nb) % ny, lin / (nb * ny)};
}

#if defined(__CUDACC__)
__device__ __forceinline__ BwdCtaStart bwd_cta_start(int cta_group) {
  if (cta_group > 1) {
    const int lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    return bwd_cta_coords(lin, gridDim.x, gridDim.y, gridDim.z, cta_group);
  }
  return {static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y),
          static_cast<int>(blockIdx.z)};
}
#endif

}  // namespace gpu
}  // namespace fastattn
