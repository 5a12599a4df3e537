// Layout of the backward's fp32 dq workspace (dq_accum), shared by the main
// kernel (which adds into it), the preprocess kernel (which zeroes it), the
// convert kernel (which reads it) and the work plan (which sizes it).
//
// The main kernel's dQ leaves the tensor cores as mma.m16n8k16 C fragments:
// lane l = 4g + t of a warp holds rows g and g + 8, columns 2t and 2t + 1 of
// a 16 x 8 tile. Stored row-major, one fragment touches 8 rows (8 cache lines)
// per 64 floats. dq_accum therefore stores every 16 x 8 tile as 128 floats in
// fragment order, element (r, c) of the tile at
//     ((r % 8) * 4 + c / 2) * 4 + (r / 8) * 2 + c % 2,
// so that a warp adds one whole tile with one 16-byte reduction per lane
// (512 contiguous bytes, 4 full lines).
//
// Tiles need 16-row groups aligned to the start of every sequence, so rows are
// "padded rows": sequence b starts at padded row dq_pad_start(b), a multiple of
// 16, and owns the ceil(len / 16) groups from there (dense: b * round16(seqlen);
// varlen: round16(cu_seqlens[b]) + 16 b, which never overlaps the next
// sequence for non-decreasing cu_seqlens and stays below dq_pad_rows for any
// clamped cu_seqlens). Per slice (deterministic runs have dq_splits):
//     [padded row group][q head][head_dim / 8 tiles][128 floats]
// i.e. padded row p of q head h starts its group at
//     (p / 16) * 16 * heads_q * head_dim + h * 16 * head_dim.
// Padding rows and rows past a sequence's end hold zeros (or exact-zero adds);
// nothing reads them back.
#pragma once
#include <cstdint>

namespace fastattn {

__host__ __device__ __forceinline__ int64_t dq_round16(int64_t x) { return (x + 15) & ~int64_t(15); }

// Padded rows of one dq_accum slice.
__host__ __device__ __forceinline__ int64_t dq_pad_rows(bool varlen, int batch, int seqlen_q,
                                                        int64_t total_q) {
  return varlen ? dq_round16(total_q) + 16 * int64_t(batch) + 16
                : int64_t(batch) * dq_round16(seqlen_q);
}

// First padded row of sequence b (start: its first row in the q tensor, varlen).
__host__ __device__ __forceinline__ int64_t dq_pad_start(bool varlen, int b, int seqlen_q,
                                                         int64_t start) {
  return varlen ? dq_round16(start) + 16 * int64_t(b) : int64_t(b) * dq_round16(seqlen_q);
}

// Float offset, within a 16-row group of one head, of element (r, c), r < 16, c < head_dim.
__host__ __device__ __forceinline__ int dq_tile_offset(int r, int c) {
  return (c >> 3) * 128 + ((r & 7) * 4 + ((c & 7) >> 1)) * 4 + (r >> 3) * 2 + (c & 1);
}

}  // namespace fastattn
