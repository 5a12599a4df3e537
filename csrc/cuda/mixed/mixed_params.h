// Plain parameters of the one-launch mixed kernel (flash_mixed_kernel.cuh):
// a batch of prefill chunks and decode rows over one paged KV cache.
// Torch-free, like params.h.
#pragma once
#include <cstdint>

#include "cuda/common/params.h"
#include "cuda/decode/decode_params.h"

namespace fastattn {

// What one CTA of the mixed grid does: work[blockIdx.x] = {kind, b, head, block}.
//   kMixedPrefill: a query tile of the paged forward kernel: sequence b, query
//                  head `head`, m-block `block` (kBlockM rows of its queries).
//   kMixedDecode:  a CTA of the split-KV decode kernel: sequence b, KV head
//                  `head`, block = m_block * num_splits + split. The
//                  num_splits CTAs of one (m-block, head, sequence) sit at
//                  consecutive positions starting at a multiple of num_splits,
//                  split s at position start + s: that is the thread-block
//                  cluster whose rank is the split (the splits merge through
//                  distributed shared memory).
//   kMixedIdle:    nothing (pads a group of prefill tiles to a cluster).
enum MixedWorkKind : int { kMixedIdle = -1, kMixedPrefill = 0, kMixedDecode = 1 };

// Both roles read the same tensors: q / out packed by cu_seqlens_q, lse
// (heads_q, total_q), the page pools through one block table. fwd is the
// paged_fwd op's FwdParams (batch = every sequence); dec is a paged decode
// with ragged queries (DecodeParams::cu_seqlens_q; batch strides 0) whose
// seqlen_q is the most queries a decode-role sequence has, and whose
// num_splits / warps_m the plan chose (stages 0: the launcher picks).
struct MixedParams {
  FwdParams fwd;
  DecodeParams dec;
  const int* work = nullptr;  // (num_work, 4) int32, device
  int num_work = 0;           // a multiple of dec.num_splits
};

}  // namespace fastattn
