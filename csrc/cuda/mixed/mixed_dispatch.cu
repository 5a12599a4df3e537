// Mixed-batch dispatch: runtime (head dim, dtype) -> the compiled
// instantiation (narrowed builds reference only what they compiled).
#include <cuda_runtime.h>

#include "cuda/common/compiled_variants.h"
#include "cuda/mixed/mixed_launch.h"

namespace fastattn {
namespace gpu {

bool mixed_supported(int head_dim, ElemType dtype) {
  // The paged forward runs 8 warps per CTA above head dim 128, the decode
  // kernel always 4 (flash_fwd_launch.cuh FwdConfig, decode_traits.h).
  const int d = compiled_kernel_head_dim(head_dim, dtype);
  return d != 0 && d <= 128;
}

cudaError_t run_mixed(const MixedParams& p, cudaStream_t stream) {
  const int d = compiled_kernel_head_dim(p.fwd.head_dim, p.fwd.dtype);
  if (d == 0 || !mixed_supported(p.fwd.head_dim, p.fwd.dtype)) return cudaErrorNotSupported;
  if (p.dec.num_splits > 1) {
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        major < 9) {
      return cudaErrorNotSupported;  // the splits merge in a cluster
    }
  }
  return visit_compiled_variant(d, p.fwd.dtype, cudaErrorNotSupported, [&](auto hd, auto dt) {
    return run_mixed_hdim<decltype(hd)::value, decltype(dt)::value>(p, stream);
  });
}

}  // namespace gpu
}  // namespace fastattn
