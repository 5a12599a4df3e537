// Warp-specialized kernels (a producer warpgroup feeding consumer
// warpgroups): register reallocation between the roles and named barriers
// that synchronize a subset of the CTA.
//
//   set_max_registers_dec<24>() / set_max_registers_inc<240>()
//       setmaxnreg (sm_90a): a warpgroup gives registers back to, or takes
//       them from, the CTA's pool. Every warp of the warpgroup executes it;
//       it only takes effect in a kernel whose register count is capped at
//       entry (__launch_bounds__(threads, 1)), and the roles must be the two
//       sides of one branch.
//   named_barrier_sync(id, threads) / named_barrier_arrive(id, threads)
//       bar.sync / bar.arrive on hardware barrier id (1..15; 0 is
//       __syncthreads): completes when `threads` threads (a multiple of 32)
//       have arrived, arrive-only threads not waiting for it.
#pragma once
#include <cstdint>

#include "cuda/common/wgmma.h"

namespace fastattn {
namespace ptx {

template <int kRegs>
__device__ __forceinline__ void set_max_registers_dec() {
#if FASTATTN_WGMMA_AVAILABLE
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

template <int kRegs>
__device__ __forceinline__ void set_max_registers_inc() {
#if FASTATTN_WGMMA_AVAILABLE
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace ptx
}  // namespace fastattn
