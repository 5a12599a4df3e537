// Checks of the integer index tensors the ops take (cu_seqlens, seqlens_k,
// cache_batch_idx, block_table), shared by every op's argument validation.
// Shapes, dtypes and devices are always checked. VALUES are checked only for
// CPU tensors: reading a CUDA tensor's values would be a host-device sync
// (and break CUDA-graph capture), so the CUDA kernels make bad values
// harmless instead (clamping lengths, skipping bad pages / slots).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace fastattn {

// t is rank-D (1 or 2) of dtype with size(0) == size0, on q's device.
void check_index_tensor(const at::Tensor& t, const at::Tensor& q, const char* name,
                        at::ScalarType dtype, int64_t rank, int64_t size0);

// CPU int32 t: every value in [lo, hi] (inclusive). Other devices: nothing.
void check_index_values(const at::Tensor& t, const char* name, int64_t lo, int64_t hi,
                        const char* what);

// cu_seqlens: 1-D int32, contiguous, length batch + 1 >= 2, on q's device.
void check_cu_seqlens(const at::Tensor& cu, const at::Tensor& q, const char* name);

// CPU cu_seqlens: starts at 0, non-decreasing, each length <= max_seqlen, ends
// at total_rows.
void check_cu_seqlens_values(const at::Tensor& cu, const char* name, int64_t total_rows,
                             int64_t max_seqlen);

// CPU block_table (B, max_blocks): the entries a sequence reads (its first
// ceil(seqlens_k[b] / block_size) blocks; all of them without seqlens_k) are
// page ids in [0, num_blocks). Entries past a sequence's length are never
// read and may hold anything (e.g. -1 padding).
void check_block_table_values(const at::Tensor& block_table,
                              const std::optional<at::Tensor>& seqlens_k, int64_t block_size,
                              int64_t num_blocks);

}  // namespace fastattn
