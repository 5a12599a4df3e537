// Host side of the sm90 tensor copies: encoding a tensor map (the descriptor
// a kernel's cp.async.bulk.tensor reads, passed by value as a kernel
// parameter blob). Torch-free; kernels include cuda/common/tma.h instead.
//
//   TmaDesc map;
//   if (!encode_tma_map_2byte(map.bytes, base, dims, strides_bytes, box)) -> fall back to another path
//
// cuTensorMapEncodeTiled is reached through the runtime's driver entry point,
// so the extension has no link dependency on libcuda.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cuda/common/tma.h"

namespace fastattn {
namespace gpu {

using TensorMapEncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                       const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                       const cuuint32_t*, CUtensorMapInterleave,
                                       CUtensorMapSwizzle, CUtensorMapL2promotion,
                                       CUtensorMapFloatOOBfill);

inline TensorMapEncodeFn tensor_map_encoder() {
  static TensorMapEncodeFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<TensorMapEncodeFn>(nullptr);
    }
    return reinterpret_cast<TensorMapEncodeFn>(f);
  }();
  return fn;
}

// A 4-D tensor of 2-byte elements (dims innermost first; strides in bytes of
// dims 1..3) read in boxes of `box` elements with the 128-byte swizzle (box[0]
// must be 64: one 128-byte row per box row, the SwizzledTile128 layout).
// Box parts outside the tensor read as zeros. False when the driver refuses
// the tensor (alignment, a stride of 0 or >= 2^40): the caller falls back.
inline bool encode_tma_map_2byte(unsigned char (&out)[128], const void* base, const uint64_t (&dims)[4],
                                 const uint64_t (&strides_bytes)[3], const uint32_t (&box)[4]) {
  static_assert(sizeof(CUtensorMap) == 128, "tensor map blob size");
  const TensorMapEncodeFn enc = tensor_map_encoder();
  if (enc == nullptr) return false;
  cuuint64_t d[4], s[3];
  cuuint32_t b[4];
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  for (int i = 0; i < 4; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t{1} << 32)) return false;
    d[i] = dims[i];
    b[i] = box[i];
  }
  for (int i = 0; i < 3; ++i) {
    // A dimension of size 1 is never stepped along: any legal stride will do.
    s[i] = dims[i + 1] == 1 && (strides_bytes[i] == 0 || strides_bytes[i] % 16 != 0)
               ? 16
               : strides_bytes[i];
  }
  CUtensorMap map;
  const CUresult r = enc(&map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(base), d, s, b,
                         elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                         CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return false;
  std::memcpy(out, &map, sizeof(map));
  return true;
}

// A (batch, rows, heads, head_dim) tensor of 2-byte elements with element
// strides (q/k/v, K/V caches) as the 4-D map (head_dim, heads, rows, batch),
// read in boxes of 64 columns x box_rows rows of one head.
inline bool encode_head_rows_map(unsigned char (&blob)[128], const void* base, int head_dim,
                                 int heads, int64_t rows, int64_t batch, int64_t batch_stride,
                                 int64_t row_stride, int64_t head_stride, int box_rows) {
  const uint64_t dims[4] = {static_cast<uint64_t>(head_dim), static_cast<uint64_t>(heads),
                            static_cast<uint64_t>(rows), static_cast<uint64_t>(batch)};
  const uint64_t strides[3] = {static_cast<uint64_t>(head_stride) * 2,
                               static_cast<uint64_t>(row_stride) * 2,
                               static_cast<uint64_t>(batch_stride) * 2};
  const uint32_t box[4] = {64, 1, static_cast<uint32_t>(box_rows), 1};
  return encode_tma_map_2byte(blob, base, dims, strides, box);
}

}  // namespace gpu
}  // namespace fastattn
