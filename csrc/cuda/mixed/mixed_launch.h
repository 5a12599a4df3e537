// Host-side launcher of the one-launch mixed kernel (torch-free, like
// launch.h). Reads only host-side sizes, so a captured CUDA graph replays a
// fixed work table with new lengths and cache contents.
#pragma once
#include <cuda_runtime.h>

#include "cuda/mixed/mixed_params.h"

namespace fastattn {
namespace gpu {

// Whether this build has a mixed kernel for (head_dim, dtype): the paged
// forward and the decode kernel of that head dim run the same number of
// threads per CTA (head dims <= 128; 192 / 256 give the forward 8 warps).
bool mixed_supported(int head_dim, ElemType dtype);

// Launches the grid of p.num_work CTAs, clusters of p.dec.num_splits (sm90+
// only when num_splits > 1). cudaErrorNotSupported when there is no kernel
// for the head dim / dtype or the device has no clusters and splits > 1.
cudaError_t run_mixed(const MixedParams& p, cudaStream_t stream);

template <int kHeadDim, ElemType kDtype>
cudaError_t run_mixed_hdim(const MixedParams& p, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastattn
