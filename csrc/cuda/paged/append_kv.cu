// In-place KV-cache append (AppendKvParams): token n's k/v rows go to slot
// slot_mapping[n] of the cache viewed as (rows, row_len, heads_kv, head_dim).
// Dtype-agnostic byte copy in the widest unit (16, 8, 4 or 2 bytes) that the
// pointers, strides and row size allow; one thread moves one unit of k and the
// same unit of v. Slots < 0 (padding) and >= rows * row_len (out of range)
// are skipped, so bad slot values can never write outside the cache.
// FP8 caches (AppendKvParams::cache_kind) take the quantizing kernel: two
// elements per thread, x / scale rounded to the nearest code and saturated
// (cuda_fp8.h's conversion, which sm80 emulates).
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/types.h"
#include "cuda/decode/decode_launch.h"

namespace fastattn {
namespace gpu {
namespace {

constexpr int kAppendThreads = 256;

// Work item idx of the grid-stride loop over (token, head, unit of the head's row):
// the token n, head h, unit u, and where n's slot lives; false for a slot < 0
// (padding) or past the cache (skipped: the kernels cannot raise).
struct AppendItem {
  int64_t n;
  int h;
  int u;
  int64_t row;
  int64_t pos;
};
__device__ __forceinline__ bool append_item(const AppendKvParams& p, int64_t idx,
                                            int units_per_head, AppendItem& it) {
  const int64_t units_per_token = static_cast<int64_t>(p.heads_kv) * units_per_head;
  it.n = idx / units_per_token;
  const int rem = static_cast<int>(idx - it.n * units_per_token);
  it.h = rem / units_per_head;
  it.u = rem - it.h * units_per_head;
  const int64_t slot = p.slot_mapping[it.n];
  if (slot < 0 || slot >= p.rows * p.row_len) return false;
  it.row = slot / p.row_len;
  it.pos = slot - it.row * p.row_len;
  return true;
}

template <typename Unit>
__global__ void __launch_bounds__(kAppendThreads)
    append_kv_kernel(const __grid_constant__ AppendKvParams p) {
  const int64_t eb = p.elem_bytes;
  const int units_per_head = static_cast<int>(p.head_dim * eb / sizeof(Unit));
  const int64_t total = p.num_tokens * p.heads_kv * units_per_head;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kAppendThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kAppendThreads) {
    AppendItem it;
    if (!append_item(p, idx, units_per_head, it)) continue;
    const int64_t n = it.n, row = it.row, pos = it.pos;
    const int h = it.h;
    const int64_t ub = static_cast<int64_t>(it.u) * sizeof(Unit);
    const char* ks = static_cast<const char*>(p.k) + (n * p.k_token_stride + h * p.k_head_stride) * eb + ub;
    const char* vs = static_cast<const char*>(p.v) + (n * p.v_token_stride + h * p.v_head_stride) * eb + ub;
    char* kd = static_cast<char*>(p.k_cache) +
               (row * p.kc_row_stride + pos * p.kc_pos_stride + h * p.kc_head_stride) * eb + ub;
    char* vd = static_cast<char*>(p.v_cache) +
               (row * p.vc_row_stride + pos * p.vc_pos_stride + h * p.vc_head_stride) * eb + ub;
    const Unit kx = *reinterpret_cast<const Unit*>(ks);
    const Unit vx = *reinterpret_cast<const Unit*>(vs);
    *reinterpret_cast<Unit*>(kd) = kx;
    *reinterpret_cast<Unit*>(vd) = vx;
  }
}

template <typename Src, KvKind kKind>
__global__ void __launch_bounds__(kAppendThreads)
    append_kv_fp8_kernel(const __grid_constant__ AppendKvParams p) {
  constexpr __nv_fp8_interpretation_t kInterp = kKind == KvKind::kE4M3 ? __NV_E4M3 : __NV_E5M2;
  const int pairs_per_head = p.head_dim / 2;
  const int64_t total = p.num_tokens * p.heads_kv * pairs_per_head;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kAppendThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kAppendThreads) {
    AppendItem it;
    if (!append_item(p, idx, pairs_per_head, it)) continue;
    const int64_t n = it.n, row = it.row, pos = it.pos;
    const int h = it.h;
    const int d = 2 * it.u;
    const Src* ks = static_cast<const Src*>(p.k) + n * p.k_token_stride + h * p.k_head_stride + d;
    const Src* vs = static_cast<const Src*>(p.v) + n * p.v_token_stride + h * p.v_head_stride + d;
    // IEEE division (the build uses fast math): the CPU backend's x / scale exactly.
    const float kq = p.k_scale != nullptr
                         ? p.k_scale[n * p.k_scale_token_stride + h * p.k_scale_head_stride] : 1.f;
    const float vq = p.v_scale != nullptr
                         ? p.v_scale[n * p.v_scale_token_stride + h * p.v_scale_head_stride] : 1.f;
    const float2 kx = make_float2(__fdiv_rn(to_float(ks[0]), kq), __fdiv_rn(to_float(ks[1]), kq));
    const float2 vx = make_float2(__fdiv_rn(to_float(vs[0]), vq), __fdiv_rn(to_float(vs[1]), vq));
    auto* kd = reinterpret_cast<__nv_fp8x2_storage_t*>(
        static_cast<char*>(p.k_cache) + row * p.kc_row_stride + pos * p.kc_pos_stride +
        h * p.kc_head_stride + d);
    auto* vd = reinterpret_cast<__nv_fp8x2_storage_t*>(
        static_cast<char*>(p.v_cache) + row * p.vc_row_stride + pos * p.vc_pos_stride +
        h * p.vc_head_stride + d);
    *kd = __nv_cvt_float2_to_fp8x2(kx, __NV_SATFINITE, kInterp);
    *vd = __nv_cvt_float2_to_fp8x2(vx, __NV_SATFINITE, kInterp);
  }
}

template <typename Src, KvKind kKind>
cudaError_t launch_append_fp8(const AppendKvParams& p, cudaStream_t stream) {
  const int64_t pairs = p.num_tokens * p.heads_kv * (p.head_dim / 2);
  int64_t blocks = (pairs + kAppendThreads - 1) / kAppendThreads;
  if (blocks > 65536) blocks = 65536;
  append_kv_fp8_kernel<Src, kKind><<<static_cast<unsigned>(blocks), kAppendThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Src>
cudaError_t launch_append_fp8_src(const AppendKvParams& p, cudaStream_t stream) {
  return p.cache_kind == KvKind::kE4M3 ? launch_append_fp8<Src, KvKind::kE4M3>(p, stream)
                                       : launch_append_fp8<Src, KvKind::kE5M2>(p, stream);
}

// Whether every address the kernel forms is a multiple of `unit` bytes.
bool unit_ok(const AppendKvParams& p, int unit) {
  const int64_t eb = p.elem_bytes;
  if ((p.head_dim * eb) % unit != 0) return false;
  for (const void* ptr : {p.k, p.v, static_cast<const void*>(p.k_cache),
                          static_cast<const void*>(p.v_cache)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % unit != 0) return false;
  }
  for (int64_t s : {p.k_token_stride, p.k_head_stride, p.v_token_stride, p.v_head_stride,
                    p.kc_row_stride, p.kc_pos_stride, p.kc_head_stride, p.vc_row_stride,
                    p.vc_pos_stride, p.vc_head_stride}) {
    if ((s * eb) % unit != 0) return false;
  }
  return true;
}

template <typename Unit>
cudaError_t launch_append(const AppendKvParams& p, cudaStream_t stream) {
  const int64_t units = p.num_tokens * p.heads_kv * (p.head_dim * p.elem_bytes / sizeof(Unit));
  int64_t blocks = (units + kAppendThreads - 1) / kAppendThreads;
  if (blocks > 65536) blocks = 65536;  // grid-stride loop covers the rest
  append_kv_kernel<Unit><<<static_cast<unsigned>(blocks), kAppendThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t run_append_kv(const AppendKvParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0 || p.heads_kv <= 0 || p.head_dim <= 0) return cudaSuccess;
  if (p.cache_kind != KvKind::kSame) {
    // Code pairs: even head dim and cache strides (element = byte units here).
    if (p.head_dim % 2 != 0 || p.kc_head_stride % 2 != 0 || p.vc_head_stride % 2 != 0 ||
        p.kc_pos_stride % 2 != 0 || p.vc_pos_stride % 2 != 0 || p.kc_row_stride % 2 != 0 ||
        p.vc_row_stride % 2 != 0 || reinterpret_cast<uintptr_t>(p.k_cache) % 2 != 0 ||
        reinterpret_cast<uintptr_t>(p.v_cache) % 2 != 0)
      return cudaErrorInvalidValue;
    return p.src_dtype == ElemType::kFloat16 ? launch_append_fp8_src<__half>(p, stream)
                                             : launch_append_fp8_src<__nv_bfloat16>(p, stream);
  }
  if (p.elem_bytes != 2 && p.elem_bytes != 4 && p.elem_bytes != 8) return cudaErrorInvalidValue;
  if (unit_ok(p, 16)) return launch_append<uint4>(p, stream);
  if (unit_ok(p, 8)) return launch_append<uint2>(p, stream);
  if (unit_ok(p, 4)) return launch_append<uint32_t>(p, stream);
  if (unit_ok(p, 2)) return launch_append<uint16_t>(p, stream);
  return cudaErrorInvalidValue;  // misaligned element pointers
}

}  // namespace gpu
}  // namespace fastattn
