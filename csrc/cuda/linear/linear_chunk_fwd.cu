// Dispatch of the chunked linear-attention forward over (dtype, head dim,
// delta rule): the chunk-local kernel, then the scan on the same stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/linear/linear_chunk_launch.h"

namespace fastattn {
namespace gpu {
namespace {

template <typename Elem, int kD, bool kDelta>
cudaError_t run_typed(const LinearChunkParams& p, cudaStream_t stream) {
  cudaError_t err = launch_linear_chunk_local<Elem, kD, kD, kDelta>(p, stream);
  if (err != cudaSuccess) return err;
  return launch_linear_chunk_scan<Elem, kD, kLinearScanCols, kDelta>(p, stream);
}

template <typename Elem>
cudaError_t run_elem(const LinearChunkParams& p, cudaStream_t stream) {
  if (p.K == 64) return p.delta ? run_typed<Elem, 64, true>(p, stream) : run_typed<Elem, 64, false>(p, stream);
  return p.delta ? run_typed<Elem, 128, true>(p, stream) : run_typed<Elem, 128, false>(p, stream);
}

}  // namespace

cudaError_t run_linear_chunk_fwd(const LinearChunkParams& p, cudaStream_t stream) {
  if (!linear_chunk_supported(p.K, p.V) || p.H < 1 || p.HV % p.H != 0 || p.HV > 65535 || p.B > 65535 ||
      p.N > 65535) {
    return cudaErrorInvalidValue;
  }
  if (p.N == 0 || p.HV == 0) return cudaSuccess;
  return p.dtype == ElemType::kFloat16 ? run_elem<__half>(p, stream) : run_elem<__nv_bfloat16>(p, stream);
}

}  // namespace gpu
}  // namespace fastattn
