// One launch for a mixed batch (chunked prefill + decode rows, POD-style):
// every CTA reads its work item and runs either a query tile of the paged
// forward kernel or a CTA of the split-KV decode kernel, the same device
// functions the paged_fwd and decode ops launch alone, so each row gets
// bitwise the result of the split launches with the same split count.
// Why one grid: a prefill tile is compute-bound and a decode CTA streams the
// cache; co-resident on one SM they use both the tensor cores and HBM, and
// neither launch's tail idles the GPU waiting for the other.
#pragma once
#include <cstdint>

#include "cuda/decode/flash_decode_kernel.cuh"
#include "cuda/flash/flash_fwd_kernel.cuh"
#include "cuda/mixed/mixed_params.h"

namespace fastattn {
namespace gpu {

template <typename FwdTraits, typename DecTraits, typename Elem>
__global__ void __launch_bounds__(DecTraits::kThreads)
    flash_mixed_kernel(const __grid_constant__ MixedParams p) {
  static_assert(FwdTraits::kThreads == DecTraits::kThreads, "one block shape for both roles");
  extern __shared__ __align__(128) char smem[];
  const int4 w = __ldg(reinterpret_cast<const int4*>(p.work) + blockIdx.x);
  if (w.x == kMixedPrefill) {
    flash_fwd_block<FwdTraits, Elem, true>(p.fwd, smem, w.y, w.z, w.w);
  } else if (w.x == kMixedDecode) {
    const int m_block = fast_div(p.dec.split_div, w.w);
    const int split = fast_mod(p.dec.split_div, w.w, m_block);
    uint32_t phases = 0;  // (TMA variant only; paged decode loads with cp.async)
    flash_decode_block<DecTraits, Elem, true>(p.dec, smem, w.y, w.z, m_block, split, phases);
  }
}

}  // namespace gpu
}  // namespace fastattn
