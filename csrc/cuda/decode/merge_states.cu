// LSE-weighted merge of partial attention results (MergeParams): serves the
// merge_states / merge_states_n ops and the split-KV decode combine (fp32
// partials in, fp16/bf16 out). Memory-bound: each thread owns 8 columns of one
// row and reads its parts' 8 values with 16-byte loads (two for fp32), kBatch
// parts in flight at a time; with many parts, several part lanes share a
// chunk and merge their states with shuffles (merge_part_lanes). A part with
// lse = -inf (empty key set, or an empty decode split that wrote nothing)
// never contributes.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/softmax.h"
#include "cuda/common/types.h"
#include "cuda/decode/decode_launch.h"

namespace fastattn {
namespace gpu {
namespace {

constexpr int kMergeThreads = 128;
constexpr int kBatch = 8;  // parts whose loads are in flight together

// Threads per row: a power of two covering ceil(head_dim / 8) chunks, at most
// the block (wider rows loop over their chunks).
__host__ __device__ __forceinline__ int merge_threads_per_row(int head_dim) {
  const int chunks = (head_dim + 7) / 8;
  int t = 1;
  while (t < chunks && t < kMergeThreads) t *= 2;
  return t;
}

// Part lanes: threads that share one 8-column chunk and split the parts among
// them (lane j takes parts j, j + P, ...), so that a many-part merge costs one
// memory round trip per kBatch parts per lane instead of per kBatch parts:
// 1 up to kBatch parts (the single-lane order, which the decode cluster
// combine repeats bit for bit), else enough lanes for one batch each, at most
// 8 and at most the block. H100, 32 rows x 128 columns: 16 parts 3.8 -> 2.8 us,
// 32 parts 5.7 -> 2.8 us.
int merge_part_lanes(int num_parts, int head_dim) {
  if (num_parts <= kBatch) return 1;
  const int tpr = merge_threads_per_row(head_dim);
  int lanes = 1;
  while (lanes < 8 && lanes * kBatch < num_parts && tpr * lanes * 2 <= kMergeThreads) lanes *= 2;
  return lanes;
}

// 8 consecutive values <-> fp32, vectorized (16-byte aligned) or scalar (n valid).
template <typename T>
struct Io8;

template <>
struct Io8<float> {
  static __device__ __forceinline__ void load(const float* p, float (&v)[8]) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&v)[8]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
  }
  static __device__ __forceinline__ float get(const float* p) { return *p; }
  static __device__ __forceinline__ void put(float* p, float x) { *p = x; }
};

template <typename Half>
struct Io8Half {
  static __device__ __forceinline__ void load(const Half* p, float (&v)[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    unpack2<Half>(u.x, v[0], v[1]);
    unpack2<Half>(u.y, v[2], v[3]);
    unpack2<Half>(u.z, v[4], v[5]);
    unpack2<Half>(u.w, v[6], v[7]);
  }
  static __device__ __forceinline__ void store(Half* p, const float (&v)[8]) {
    uint4 u;
    u.x = pack2<Half>(v[0], v[1]);
    u.y = pack2<Half>(v[2], v[3]);
    u.z = pack2<Half>(v[4], v[5]);
    u.w = pack2<Half>(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = u;
  }
  static __device__ __forceinline__ float get(const Half* p) { return to_float(*p); }
  static __device__ __forceinline__ void put(Half* p, float x) { *p = from_float(x); }
  static __device__ __forceinline__ Half from_float(float x);
};
template <>
__device__ __forceinline__ __half Io8Half<__half>::from_float(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 Io8Half<__nv_bfloat16>::from_float(float x) {
  return __float2bfloat16_rn(x);
}
template <>
struct Io8<__half> : Io8Half<__half> {};
template <>
struct Io8<__nv_bfloat16> : Io8Half<__nv_bfloat16> {};

// Where one row (o, s, h) of a merge lives: its out and LSE in view 0 (part 0
// of a stacked tensor, or out_a) and view 1 (out_b), and its LSE output slot.
template <typename In>
struct MergeRow {
  const In* in0;
  const In* in1;
  const float* lse0;
  const float* lse1;
  int64_t lse_out;  // index into p.lse_out
};

template <typename In>
__device__ __forceinline__ MergeRow<In> merge_row(const MergeParams& p, int64_t row, bool narrow) {
  int h, s;
  int64_t o;
  if (narrow) {  // rows < 2^31: 32-bit divisions (a 64-bit one is a long subroutine)
    const int r = static_cast<int>(row);
    h = r % p.heads;
    const int os = r / p.heads;
    s = os % p.seqlen;
    o = os / p.seqlen;
  } else {
    h = static_cast<int>(row % p.heads);
    const int64_t os = row / p.heads;
    s = static_cast<int>(os % p.seqlen);
    o = os / p.seqlen;
  }
  MergeRow<In> w;
  w.in0 = static_cast<const In*>(p.in[0]) + o * p.in_outer_stride[0] + s * p.in_seq_stride[0] +
          h * p.in_head_stride[0];
  w.lse0 = p.lse_in[0] + o * p.lse_outer_stride[0] + h * p.lse_head_stride[0] +
           s * p.lse_seq_stride[0];
  w.in1 = w.in0;
  w.lse1 = w.lse0;
  if (p.two_views) {
    w.in1 = static_cast<const In*>(p.in[1]) + o * p.in_outer_stride[1] + s * p.in_seq_stride[1] +
            h * p.in_head_stride[1];
    w.lse1 = p.lse_in[1] + o * p.lse_outer_stride[1] + h * p.lse_head_stride[1] +
             s * p.lse_seq_stride[1];
  }
  w.lse_out = (o * p.heads + h) * p.seqlen + s;
  return w;
}

template <typename In, typename Out, bool kVec>
__global__ void __launch_bounds__(kMergeThreads, 4)
    merge_states_kernel(const __grid_constant__ MergeParams p, int part_lanes) {
  const int tpr = merge_threads_per_row(p.head_dim);
  const int lanes = part_lanes;  // power of 2, tpr * lanes <= kMergeThreads
  const int per_row = tpr * lanes;
  const int rows_per_block = kMergeThreads / per_row;
  const int j = threadIdx.x % lanes;          // part lane
  const int t = threadIdx.x % per_row / lanes;  // chunk
  // The lanes of one chunk: adjacent lanes of one warp, always in one row.
  const int warp_lane = threadIdx.x % 32;
  const unsigned lane_mask =
      lanes >= 32 ? 0xffffffffu : ((1u << lanes) - 1u) << (warp_lane & ~(lanes - 1));
  const int64_t rows = p.outer * p.seqlen * p.heads;
  const int n = p.num_parts;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  const bool narrow = rows <= 0x7fffffff;
  int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / per_row;
  // The first row's addresses (index math only) before the wait below.
  MergeRow<In> w = merge_row<In>(p, row < rows ? row : 0, narrow);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The next decode step may be a programmatic dependent of this kernel
  // (run_decode): let it be scheduled now (it waits for our completion).
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  // Launched as a programmatic dependent of the decode kernel (run_decode):
  // wait until that grid has completed and its partials are visible. A no-op
  // for an ordinary launch. Everything above runs while the decode finishes.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  for (bool first = true; row < rows; row += stride, first = false) {
    if (!first) w = merge_row<In>(p, row, narrow);
    const In* in0 = w.in0;
    const In* in1 = w.in1;
    const float* lse0 = w.lse0;
    const float* lse1 = w.lse1;
    auto lse_of = [&](int part) -> float {
      return p.two_views ? (part == 0 ? *lse0 : *lse1) : lse0[part * p.lse_part_stride];
    };
    auto in_of = [&](int part) -> const In* {
      return p.two_views ? (part == 0 ? in0 : in1) : in0 + part * p.in_part_stride;
    };

    // One pass over the parts in batches of kBatch, rescaling online like the
    // attention softmax (running max m, running sum of exp(lse_i - m), O
    // accumulated at the running max): every load of a batch (its LSEs and its
    // 8 values of each part) is issued before any is used, so a merge of n
    // parts costs about n / kBatch memory round trips, not n (the split-KV
    // combine of a long single sequence merges 16-64 parts per row).
    float lse = neg_inf();
    constexpr float kLog2e = 1.4426950408889634f;
    for (int c = t * 8; c < p.head_dim; c += tpr * 8) {
      float m = neg_inf(), sum = 0.f;
      float acc[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = 0.f;
      // This lane's parts j + lanes * k, kBatch values of k at a time.
      for (int k0 = 0; j + lanes * k0 < n; k0 += kBatch) {
        float l[kBatch];
        float x[kBatch][8];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int part = j + lanes * (k0 + u);
          const bool valid = part < n;
          l[u] = valid ? lse_of(part) : neg_inf();
          // Read even when the part's LSE may be -inf: its memory is valid (an
          // unwritten decode partial at worst) and the select below never lets
          // its value reach acc, so no load waits on the LSE.
          const In* src = in_of(valid ? part : 0) + c;
          if constexpr (kVec) {
            Io8<In>::load(src, x[u]);
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) x[u][e] = c + e < p.head_dim ? Io8<In>::get(src + e) : 0.f;
          }
        }
        float bm = l[0];
#pragma unroll
        for (int u = 1; u < kBatch; ++u) bm = fmaxf(bm, l[u]);
        if (bm == neg_inf()) continue;  // only empty parts in this batch
        const float m_new = fmaxf(m, bm);
        const float r = m == neg_inf() ? 0.f : ptx::ex2_approx((m - m_new) * kLog2e);
        sum *= r;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] *= r;
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const bool live = l[u] != neg_inf();
          const float w = live ? ptx::ex2_approx((l[u] - m_new) * kLog2e) : 0.f;
          sum += w;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[e] = live ? fmaf(w, x[u][e], acc[e]) : acc[e];
        }
        m = m_new;
      }
      // Merge the lanes' states (m, sum, acc at m) pairwise: rescale both to
      // the larger max and add. Every lane ends with the whole merge.
      for (int o = 1; o < lanes; o *= 2) {
        const float m_o = __shfl_xor_sync(lane_mask, m, o);
        const float sum_o = __shfl_xor_sync(lane_mask, sum, o);
        const float m_new = fmaxf(m, m_o);
        const float r = m == neg_inf() ? 0.f : ptx::ex2_approx((m - m_new) * kLog2e);
        const float r_o = m_o == neg_inf() ? 0.f : ptx::ex2_approx((m_o - m_new) * kLog2e);
        sum = sum * r + sum_o * r_o;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float a_o = __shfl_xor_sync(lane_mask, acc[e], o);
          acc[e] = acc[e] * r + a_o * r_o;
        }
        m = m_new;
      }
      // No live part: lse = -inf and out = 0 (the merge of empty key sets).
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] *= inv;
      lse = sum > 0.f ? m + __logf(sum) : neg_inf();
      if (j != 0) continue;
      Out* dst = static_cast<Out*>(p.out) + row * p.head_dim + c;
      if constexpr (kVec) {
        Io8<Out>::store(dst, acc);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (c + e < p.head_dim) Io8<Out>::put(dst + e, acc[e]);
      }
    }
    if (t == 0 && j == 0 && p.head_dim == 0) {  // no columns: the LSE alone
      LseMerge merge;
      for (int q = 0; q < n; ++q) merge.add(lse_of(q));
      lse = merge.result();
    }
    if (t == 0 && j == 0) p.lse_out[w.lse_out] = lse;
  }
}

int type_bytes(MergeType t) { return t == MergeType::kFloat32 ? 4 : 2; }

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// 16-byte vector path: head_dim % 8 == 0 and every pointer / stride of a dim
// that can advance (size > 1) keeps 16-byte alignment.
bool merge_vectorizable(const MergeParams& p) {
  if (p.head_dim % 8 != 0 || !aligned16(p.out)) return false;
  const int eb = type_bytes(p.in_type);
  auto ok = [eb](int64_t stride, int64_t size) { return size <= 1 || (stride * eb) % 16 == 0; };
  const int views = p.two_views ? 2 : 1;
  for (int v = 0; v < views; ++v) {
    if (!aligned16(p.in[v])) return false;
    if (!ok(p.in_outer_stride[v], p.outer) || !ok(p.in_seq_stride[v], p.seqlen) ||
        !ok(p.in_head_stride[v], p.heads))
      return false;
  }
  if (!p.two_views && !ok(p.in_part_stride, p.num_parts)) return false;
  return true;
}

template <typename In, typename Out, bool kVec>
cudaError_t launch_merge_kernel(const MergeParams& p, unsigned blocks, int lanes,
                                cudaStream_t stream, bool programmatic) {
  if (!programmatic) {
    merge_states_kernel<In, Out, kVec><<<blocks, kMergeThreads, 0, stream>>>(p, lanes);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kMergeThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, merge_states_kernel<In, Out, kVec>, p, lanes);
}

template <typename In, typename Out>
cudaError_t launch_merge(const MergeParams& p, cudaStream_t stream, bool programmatic) {
  const int64_t rows = p.outer * p.seqlen * p.heads;
  const int lanes = merge_part_lanes(p.num_parts, p.head_dim);
  const int rows_per_block = kMergeThreads / (merge_threads_per_row(p.head_dim) * lanes);
  int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffff) blocks = 0x7fffffff;  // the kernel loops over the rest
  const unsigned nb = static_cast<unsigned>(blocks);
  return merge_vectorizable(p)
             ? launch_merge_kernel<In, Out, true>(p, nb, lanes, stream, programmatic)
             : launch_merge_kernel<In, Out, false>(p, nb, lanes, stream, programmatic);
}

}  // namespace

cudaError_t run_merge(const MergeParams& p, cudaStream_t stream, bool programmatic) {
  if (p.outer <= 0 || p.seqlen <= 0 || p.heads <= 0) return cudaSuccess;
  if (p.num_parts < 1 || (p.two_views && p.num_parts != 2) || p.head_dim < 0) {
    return cudaErrorInvalidValue;
  }
  using MT = MergeType;
  if (p.in_type == MT::kFloat16 && p.out_type == MT::kFloat16)
    return launch_merge<__half, __half>(p, stream, programmatic);
  if (p.in_type == MT::kBFloat16 && p.out_type == MT::kBFloat16)
    return launch_merge<__nv_bfloat16, __nv_bfloat16>(p, stream, programmatic);
  if (p.in_type == MT::kFloat32 && p.out_type == MT::kFloat32)
    return launch_merge<float, float>(p, stream, programmatic);
  if (p.in_type == MT::kFloat32 && p.out_type == MT::kFloat16)
    return launch_merge<float, __half>(p, stream, programmatic);
  if (p.in_type == MT::kFloat32 && p.out_type == MT::kBFloat16)
    return launch_merge<float, __nv_bfloat16>(p, stream, programmatic);
  return cudaErrorNotSupported;
}

}  // namespace gpu
}  // namespace fastattn
