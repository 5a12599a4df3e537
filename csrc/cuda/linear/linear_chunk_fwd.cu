// Dispatch of the chunked linear-attention forward over (dtype, head dim,
// delta rule): the chunk-local kernel, then the scan on the same stream; or
// the scan alone (the training path fills its workspace itself).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/linear/linear_chunk_launch.h"

namespace fastattn {
namespace gpu {
namespace {

// The scan with the value slice p.scan_cols asks for (scalar decays).
template <typename Elem, int kK, bool kDelta>
cudaError_t launch_scan(const LinearChunkParams& p, cudaStream_t stream) {
  if (p.scan_cols == kLinearScanColsWide && p.V % kLinearScanColsWide == 0) {
    return launch_linear_chunk_scan<Elem, kK, kLinearScanColsWide, kDelta>(p, stream);
  }
  return launch_linear_chunk_scan<Elem, kK, kLinearScanCols, kDelta>(p, stream);
}

template <typename Elem, int kK, bool kDelta>
cudaError_t run_typed(const LinearChunkParams& p, cudaStream_t stream) {
  if (p.g_per_key) {  // GLA: its own chunk-local kernel, the scan with per-row decays
    if constexpr (kDelta) {
      return cudaErrorInvalidValue;
    } else {
      cudaError_t err = p.V == 64 ? launch_linear_chunk_local_gla<Elem, kK, 64>(p, stream)
                                  : launch_linear_chunk_local_gla<Elem, kK, 128>(p, stream);
      if (err != cudaSuccess) return err;
      return launch_linear_chunk_scan<Elem, kK, kLinearScanCols, false, true>(p, stream);
    }
  }
  cudaError_t err = p.V == 64 ? launch_linear_chunk_local<Elem, kK, 64, kDelta>(p, stream)
                              : launch_linear_chunk_local<Elem, kK, 128, kDelta>(p, stream);
  if (err != cudaSuccess) return err;
  return launch_scan<Elem, kK, kDelta>(p, stream);
}

// Runs Run<Elem, key dim, delta rule> for p's sizes (`supported`: whether
// Run's kernels take K and V); g / beta strides of 0 mean contiguous (B, T, HV).
template <template <typename, int, bool> class Run>
cudaError_t dispatch(const LinearChunkParams& p_in, bool supported, cudaStream_t stream) {
  LinearChunkParams p = p_in;
  if (p.g_stride_b == 0 && p.g_stride_t == 0 && p.g_stride_h == 0) {
    p.g_stride_b = static_cast<int64_t>(p.T) * p.HV, p.g_stride_t = p.HV, p.g_stride_h = 1;
  }
  if (!supported || p.H < 1 || p.HV % p.H != 0 || p.HV > 65535 || p.B > 65535 ||
      p.N > 65535) {
    return cudaErrorInvalidValue;
  }
  if (p.N == 0 || p.HV == 0) return cudaSuccess;
  const bool half = p.dtype == ElemType::kFloat16;
  if (p.K == 64) {
    if (half) return p.delta ? Run<__half, 64, true>::run(p, stream) : Run<__half, 64, false>::run(p, stream);
    return p.delta ? Run<__nv_bfloat16, 64, true>::run(p, stream) : Run<__nv_bfloat16, 64, false>::run(p, stream);
  }
  if (half) return p.delta ? Run<__half, 128, true>::run(p, stream) : Run<__half, 128, false>::run(p, stream);
  return p.delta ? Run<__nv_bfloat16, 128, true>::run(p, stream) : Run<__nv_bfloat16, 128, false>::run(p, stream);
}

template <typename Elem, int kD, bool kDelta>
struct Forward {
  static cudaError_t run(const LinearChunkParams& p, cudaStream_t s) { return run_typed<Elem, kD, kDelta>(p, s); }
};
template <typename Elem, int kD, bool kDelta>
struct LocalOnly {
  static cudaError_t run(const LinearChunkParams& p, cudaStream_t s) {
    return p.V == 64 ? launch_linear_chunk_local<Elem, kD, 64, kDelta>(p, s)
                     : launch_linear_chunk_local<Elem, kD, 128, kDelta>(p, s);
  }
};
template <typename Elem, int kD, bool kDelta>
struct ScanOnly {
  static cudaError_t run(const LinearChunkParams& p, cudaStream_t s) {
    return launch_scan<Elem, kD, kDelta>(p, s);
  }
};

}  // namespace

cudaError_t run_linear_chunk_fwd(const LinearChunkParams& p, cudaStream_t stream) {
  return dispatch<Forward>(p, linear_chunk_supported(p.K, p.V), stream);
}

// The training path's ops take no per-key decays (their kernels have no such variant).
cudaError_t run_linear_chunk_local(const LinearChunkParams& p, cudaStream_t stream) {
  return dispatch<LocalOnly>(p, linear_chunk_supported(p.K, p.V) && !p.g_per_key, stream);
}

cudaError_t run_linear_state_scan(const LinearChunkParams& p, cudaStream_t stream) {
  return dispatch<ScanOnly>(p, linear_scan_supported(p.K, p.V) && !p.g_per_key, stream);
}

}  // namespace gpu
}  // namespace fastattn
