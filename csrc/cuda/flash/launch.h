// Host-side launcher declarations of the CUDA kernels. Torch-free: the glue
// (csrc/torch/*_cuda.cpp) fills the params structs of cuda/common/params.h and calls
// these. Launchers never synchronize, launch on the given stream, and return
// cudaSuccess or the launch error (cudaGetLastError) for the glue to raise.
#pragma once
#include <cuda_runtime.h>

#include "cuda/common/params.h"

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
// Work decomposition and workspace sizes of one backward call, from the
// sizes, head_dim, dtype, deterministic and num_sms fields of the params.
struct BwdPlan {
  int kernel_head_dim = 0;  // compiled kernel that runs it; 0: none in this build
  int block_n = 0;          // keys per CTA
  int smem_bytes = 0;       // dynamic shared memory of the main kernel
  int heads_per_cta = 1;    // q heads of one GQA group per CTA
  int dq_splits = 1;        // dq_accum slices (deterministic: grid columns)
  int dkv_copies = 0;       // dk/dv fp32 accumulator copies; 0: dk/dv written directly
  int64_t dq_accum_elems = 0;   // floats of dq_accum
  int64_t dkv_accum_elems = 0;  // floats of dk_accum and of dv_accum (each)
};

// Smallest compiled backward kernel head dim >= head_dim for this dtype, or 0.
int bwd_kernel_head_dim(int head_dim, ElemType dtype);

BwdPlan plan_bwd(const BwdParams& params);

// Runs the backward: preprocess (D = rowsum(dO * O), zero dq_accum), the main
// kernel, convert (dq, and dk/dv when accumulated in fp32). params must carry
// the plan's heads_per_cta / dq_splits / dkv_copies and its workspaces (see
// BwdParams). Same alignment rules as run_fwd; any finite scale.
cudaError_t run_bwd(const BwdParams& params, cudaStream_t stream);

// Main kernel only; one instantiation per (head dim, dtype), in
// flash_bwd_hdim<D>_<fp16|bf16>.cu.
template <int kHeadDim, ElemType kDtype>
cudaError_t run_bwd_hdim(const BwdParams& params, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastattn
