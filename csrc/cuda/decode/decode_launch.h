// Host-side launcher declarations of the decode, merge and append-KV kernels
// (torch-free, like launch.h). Launchers never synchronize, launch on the
// given stream and return cudaSuccess or the launch error; they read only
// host-side sizes (never device data), so every launch shape is fixed by the
// maximum sizes and a captured CUDA graph replays correctly with new
// seqlens_k / cache_batch_idx / slot_mapping contents.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/decode/decode_params.h"

namespace fastattn {
namespace gpu {

// ------------------------------------------------------------------ decode
// Smallest compiled decode kernel head dim >= head_dim for this dtype, or 0
// when this build has none (narrowed builds: FASTATTN_HDIMS / FASTATTN_DTYPES).
int decode_kernel_head_dim(int head_dim, ElemType dtype);

struct DecodePlan {
  int kernel_head_dim = 0;  // 0: no kernel in this build
  int num_splits = 1;
  int num_m_blocks = 1;
  int warps_m = 1;
  int stages = 0;           // 0: the device's shared memory is too small for this head dim
  bool use_tma = false;     // K/V through the sm90 copy engine (DecodeParams::use_tma)
  bool combine_in_cluster = false;  // splits merged in a cluster (DecodeParams)
  int smem_bytes = 0;
  int ctas_per_sm = 0;
  // floats of DecodeParams::o_partial (0 when num_splits == 1 or combine_in_cluster)
  int64_t o_partial_elems = 0;
  int64_t lse_partial_elems = 0;  // floats of DecodeParams::lse_partial
};

// Launch plan from the host-side sizes of p (batch, seqlen_q, heads, head_dim,
// seqlen_k_max, mask window, dtype, num_sms) and the current device's shared
// memory limits. requested_splits > 0 forces the split count (clamped to
// [1, number of key blocks]); 0 picks it from SM count, batch, KV heads and
// length: enough CTAs to fill every SM's resident slots, >= 2 key blocks per split.
DecodePlan plan_decode(const DecodeParams& p, int requested_splits);

// Copies a plan's launch fields into p (num_splits, num_m_blocks, warps_m,
// stages, use_tma, combine_in_cluster).
void apply_decode_plan(DecodeParams& p, const DecodePlan& plan);

// Runs the decode kernel and, when p.num_splits > 1 without
// p.combine_in_cluster, the combine (run_merge over the fp32 partials). p must
// carry a plan (apply_decode_plan) and, when the plan has partials, the
// workspaces. Same alignment rules as run_fwd; scale >= 0.
// On sm90+ both kernels are programmatic dependent launches: the decode grid
// may be scheduled while the previous kernel of the stream finishes, the
// combine while the decode grid's last CTAs run; each waits for its
// predecessor's completion (griddepcontrol.wait) before touching global
// memory, so only launch latency and index math overlap.
// FASTATTN_DECODE_PDL=0 turns both off.
cudaError_t run_decode(const DecodeParams& p, cudaStream_t stream);

// One instantiation per (head dim, dtype), in flash_decode_hdim<D>_<fp16|bf16>.cu.
// programmatic: launch as a programmatic dependent of the previous kernel in
// the stream (sm90+; the kernel waits for it before any global access).
template <int kHeadDim, ElemType kDtype>
cudaError_t run_decode_hdim(const DecodeParams& p, cudaStream_t stream, bool programmatic);
// Resident CTAs per SM of that kernel (its contiguous or paged-KV, cp.async or
// TMA, 16-bit or FP8-cache variant) with a ring of `stages` stages (also raises every variant's
// dynamic shared memory limit, once per device); 0 when there is no such variant.
template <int kHeadDim, ElemType kDtype>
int decode_ctas_per_sm(int stages, bool paged, bool tma, KvKind kv);
// Clusters of `cluster` (2..kMaxClusterSplits) CTAs of that variant with a ring
// of `stages` stages that the device can hold at once; 0 when the device or
// the machine code it runs has no clusters (below sm90).
template <int kHeadDim, ElemType kDtype>
int decode_max_clusters(int stages, bool paged, bool tma, KvKind kv, int cluster);
// Whether the current device runs the TMA variant's machine code (a variant
// exists for this head dim, the build has sm90 code and the device is sm90+).
template <int kHeadDim, ElemType kDtype>
bool decode_tma_runnable();

// ------------------------------------------------------------------ merge
// Runs the merge kernel (MergeParams documents it). Any strides; 16-byte
// vector loads when every pointer / stride / head_dim allows, else scalar.
// programmatic (sm90+ only): launch as a programmatic dependent of the
// previous kernel in the stream (PDL), which must trigger it
// (griddepcontrol.launch_dependents); the merge waits for that kernel's
// completion (griddepcontrol.wait) before reading anything.
cudaError_t run_merge(const MergeParams& p, cudaStream_t stream, bool programmatic = false);

// ------------------------------------------------------------------ append
cudaError_t run_append_kv(const AppendKvParams& p, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastattn
