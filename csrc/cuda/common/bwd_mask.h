// Mask helpers for kernels that hold scores transposed, keys as fragment rows
// and queries as columns (the backward's S^T = K Q^T). Same semantics as
// MaskPolicy in common/mask.h, which they build on:
//   visible_query_range(m, j)             queries [begin, end) that see key j (empty if j >= sk)
//   zero_invisible_c_transposed<NT>(p, m, key0, q0)
//       p[NT][4]: mma C fragments of one m16 tile of keys (this thread's keys key0 and
//       key0 + 8, key0 = tile key + lane / 4) by NT n8 tiles of queries (this thread's
//       first query q0 = tile query + 2 * (lane % 4), n-tile nt adds 8 * nt). Entries
//       whose (query, key) is invisible, or whose query >= sq, are set to 0.
#pragma once

#include "cuda/common/mask.h"

namespace fastattn {

struct QueryRange {
  int begin;
  int end;
};

__host__ __device__ __forceinline__ QueryRange visible_query_range(const MaskPolicy& m, int j) {
  if (j < 0 || j >= m.sk) return {0, 0};
  return {m.q_row_begin(j, j + 1), m.q_row_end(j, j + 1)};
}

template <int NT>
__device__ __forceinline__ void zero_invisible_c_transposed(float (&p)[NT][4], const MaskPolicy& m,
                                                            int key0, int q0) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const QueryRange r = visible_query_range(m, key0 + h * 8);
    const int lo = r.begin - q0;
    const int hi = r.end - q0;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = nt * 8 + e;
        if (c < lo || c >= hi) p[nt][h * 2 + e] = 0.f;
      }
    }
  }
}

}  // namespace fastattn
