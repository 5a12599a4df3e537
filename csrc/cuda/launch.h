// Host-side launcher declarations of the CUDA kernels. Torch-free: the glue
// (csrc/torch_cuda*.cpp) fills the params structs of cuda/params.h and calls
// these. Launchers never synchronize, launch on the given stream, and return
// cudaSuccess or the launch error (cudaGetLastError) for the glue to raise.
#pragma once
#include <cuda_runtime.h>

#include "cuda/params.h"

namespace fastattn {
namespace gpu {

// ----------------------------------------------------------------- forward
// Smallest compiled forward kernel head dim >= head_dim for this dtype, or 0
// when this build has none (narrowed builds: FASTATTN_HDIMS / FASTATTN_DTYPES).
int fwd_kernel_head_dim(int head_dim, ElemType dtype);

// Runs the forward (FwdParams documents the layout). head_dim may be any value
// <= the chosen kernel's head dim, but must be a multiple of 8 and every
// pointer / row, head and batch stride 16-byte aligned (the glue pads or
// copies otherwise). Requires scale >= 0 (the glue folds a negative scale into
// q). Batch/sequence sizes of 0 launch nothing.
cudaError_t run_fwd(const FwdParams& params, cudaStream_t stream);

// One instantiation per (head dim, dtype), in flash_fwd_hdim<D>_<fp16|bf16>.cu.
template <int kHeadDim, ElemType kDtype>
cudaError_t run_fwd_hdim(const FwdParams& params, cudaStream_t stream);

// ----------------------------------------------------------------- backward
// (declarations added below by the backward kernel's owner)

}  // namespace gpu
}  // namespace fastattn
