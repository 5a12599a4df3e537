// Host-side launchers of the chunked linear-attention forward (torch-free;
// the math and the workspace: linear_chunk_params.h). Never synchronize and
// never read device data.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/linear/linear_chunk_params.h"

namespace fastattn {
namespace gpu {

// Value columns per scan CTA, and the wide slice (LinearChunkParams::scan_cols).
constexpr int kLinearScanCols = 32;
constexpr int kLinearScanColsWide = 64;

// Whether the chunked kernels serve these sizes: K and V each 64 or 128
// (other head dims take the other paths of fastattn.linear).
inline bool linear_chunk_supported(int K, int V) {
  return (K == 64 || K == 128) && (V == 64 || V == 128);
}
// The scans alone (the training path's ops) take any V that is a multiple of
// their value slice: the slice is the only V-shaped tile.
inline bool linear_scan_supported(int K, int V) {
  return (K == 64 || K == 128) && V > 0 && V % kLinearScanCols == 0 && V / kLinearScanCols <= 65535;
}

// Workspace elements (input dtype) and floats the forward needs.
inline int64_t linear_chunk_workspace_elems(const LinearChunkParams& p) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.HV * p.chunks * LinearChunkParams::kChunk;
  // Qt, Kt (+ W) rows of K; O_intra (+ U) rows of V.
  return rows * ((p.delta ? 3 : 2) * p.K + (p.delta ? 2 : 1) * p.V);
}
inline int64_t linear_chunk_workspace_floats(const LinearChunkParams& p) {  // e^{b_last}
  return static_cast<int64_t>(p.B) * p.HV * p.chunks * (p.g_per_key ? p.K : 1);
}

// The scan's value slice for p's grid on a GPU of `sms` multiprocessors with
// `smem_per_sm` bytes of shared memory each: kLinearScanColsWide when the
// default slice's CTAs would need more waves than half as many wide CTAs
// (each of which does about 1.5x the work of a default one), else 0 (the
// default). Scalar decays only.
int linear_scan_cols_for(const LinearChunkParams& p, int sms, int smem_per_sm);

// Runs the chunk-local kernel, then the scan; p carries the workspace
// pointers. cudaErrorInvalidValue for sizes linear_chunk_supported rejects.
cudaError_t run_linear_chunk_fwd(const LinearChunkParams& p, cudaStream_t stream);

// The scan alone, over a workspace the caller filled (op linear_state_scan;
// p.chunk_states / p.u_out as it asks), and the reverse scan of the backward
// (linear_chunk_params.h). cudaErrorInvalidValue for sizes
// linear_chunk_supported rejects.
cudaError_t run_linear_state_scan(const LinearChunkParams& p, cudaStream_t stream);
// The chunk-local kernel alone (op linear_chunk_prepare: the training path's
// chunk operands, with p.m_out / p.b_out).
cudaError_t run_linear_chunk_local(const LinearChunkParams& p, cudaStream_t stream);
cudaError_t run_linear_state_scan_bwd(const LinearScanBwdParams& p, cudaStream_t stream);
// The chunk-local gradients without the delta rule (linear_chunk_bwd_local.cu):
// K and V each 64 or 128, else cudaErrorInvalidValue.
cudaError_t run_linear_chunk_bwd_local(const LinearChunkBwdLocalParams& p, cudaStream_t stream);

// The (dtype, K, V) triples the chunk-local kernels are instantiated for:
// FASTATTN_LINEAR_CHUNK_TYPES(M) expands to M(Elem, K, V) for each.
#define FASTATTN_LINEAR_CHUNK_TYPES(M)                                                         \
  M(__half, 64, 64) M(__half, 64, 128) M(__half, 128, 64) M(__half, 128, 128)                  \
  M(__nv_bfloat16, 64, 64) M(__nv_bfloat16, 64, 128) M(__nv_bfloat16, 128, 64)                 \
  M(__nv_bfloat16, 128, 128)

template <typename Elem, int kK, int kV, bool kDelta>
cudaError_t launch_linear_chunk_local(const LinearChunkParams& p, cudaStream_t stream);
template <typename Elem, int kK, int kVt, bool kDelta, bool kPerKey = false>
cudaError_t launch_linear_chunk_scan(const LinearChunkParams& p, cudaStream_t stream);
// Per-key decays (GLA, no delta rule): the chunk-local kernel of
// linear_chunk_local_gla.cu; the scan then runs with kPerKey.
template <typename Elem, int kK, int kV>
cudaError_t launch_linear_chunk_local_gla(const LinearChunkParams& p, cudaStream_t stream);
template <typename Elem, int kK, int kVt, bool kDelta>
cudaError_t launch_linear_chunk_scan_bwd(const LinearScanBwdParams& p, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastattn
