// Linear-attention recurrence on the GPU (LinearRecurrentParams has the math):
// the decode step of a serving engine (T = 1..4 per sequence over a state
// pool, updated in place) and the token-by-token fused_recurrent_* ops.
//
// Work split: one CTA of 4 warps per (sequence, value head, 32 value columns).
// Lane l owns column j = 32 * blockIdx + l; warp w owns key rows w, w + 4, ...
// so the CTA's state slice (K x 32 fp32) sits in registers, K / 4 values per
// thread, and every state row is read and written as one 128-byte line.
// The step is memory-bound on the state at decode sizes: the state is read
// once and written once, whatever T.
//
// One step needs two reductions over the key rows, S'^T k (delta rule) and
// S'^T q (output). Both are taken from the decayed state S' in one pass: since
// S_t = S' + k u^T, the output is S_t^T q = S'^T q + (k . q) u, so a single
// cross-warp exchange per step suffices. q and k of a step are staged in
// shared memory (double-buffered by step parity, so one barrier orders the
// stores and another the partial sums), and the next step's inputs are loaded
// into registers while the current step computes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/linear/linear_launch.h"
#include "cuda/linear/linear_params.h"
#include "cuda/linear/linear_state_slot.h"

namespace fastattn {
namespace gpu {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kCols = 32;  // value columns per CTA: one per lane

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_f(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// What one thread reads for one step: the q / k entries (and per-key decay
// factors) of the rows it stages, its column of v, the step's scalar decay
// factor and beta. Rows >= K read as zeros, so they never touch the sums.
template <int kLoadRows>
struct StepInputs {
  float q[kLoadRows], k[kLoadRows], decay_row[kLoadRows];
  float v, decay, beta;
};

template <typename Elem, int kLoadRows>
__device__ __forceinline__ void load_step(StepInputs<kLoadRows>& in, const LinearRecurrentParams& p,
                                          int64_t b, int64_t t, int h, int hv, int j) {
  const Elem* qrow = static_cast<const Elem*>(p.q) + b * p.q_stride_b + t * p.q_stride_t +
                     h * p.q_stride_h;
  const Elem* krow = static_cast<const Elem*>(p.k) + b * p.k_stride_b + t * p.k_stride_t +
                     h * p.k_stride_h;
  const int64_t gate = (b * p.T + t) * p.HV + hv;  // (B, T, HV) index of g / beta
#pragma unroll
  for (int i = 0; i < kLoadRows; ++i) {
    const int row = threadIdx.x + i * kThreads;
    const bool ok = row < p.K;
    in.q[i] = ok ? load_f(qrow + row) : 0.f;
    in.k[i] = ok ? load_f(krow + row) : 0.f;
    in.decay_row[i] = (ok && p.g != nullptr && p.g_per_key) ? expf(p.g[gate * p.K + row]) : 1.f;
  }
  const Elem* vrow = static_cast<const Elem*>(p.v) + b * p.v_stride_b + t * p.v_stride_t +
                     hv * p.v_stride_h;
  in.v = j < p.V ? load_f(vrow + j) : 0.f;
  in.decay = (p.g != nullptr && !p.g_per_key) ? expf(p.g[gate]) : 1.f;
  in.beta = p.beta != nullptr ? p.beta[gate] : 1.f;
}

// kRows: state rows per thread (K <= kRows * kWarps).
template <typename Elem, int kRows>
__global__ void __launch_bounds__(kThreads)
    linear_recurrent_kernel(const __grid_constant__ LinearRecurrentParams p) {
  constexpr int kRowsAll = kRows * kWarps;
  constexpr int kLoadRows = (kRowsAll + kThreads - 1) / kThreads;
  __shared__ float q_s[2][kRowsAll], k_s[2][kRowsAll], decay_s[2][kRowsAll];
  __shared__ float partial_s[2][2][kWarps][kCols];  // [step parity][S'^T k, S'^T q][warp][lane]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int col_tiles = (p.V + kCols - 1) / kCols;
  const int n = blockIdx.x / col_tiles;
  const int j = (blockIdx.x - n * col_tiles) * kCols + lane;
  const int hv = blockIdx.y;
  const int h = hv / (p.HV / p.H);
  const bool col_ok = j < p.V;
  const int64_t b = p.cu_seqlens != nullptr ? 0 : n;
  // Clamped into [0, T]: a bad cu_seqlens reads nothing out of range.
  const int64_t t_end = p.cu_seqlens != nullptr ? min(max(p.cu_seqlens[n + 1], 0), p.T) : p.T;
  const int64_t t_begin = p.cu_seqlens != nullptr ? min(max(p.cu_seqlens[n], 0), static_cast<int>(t_end)) : 0;

  float S[kRows];
  {
    const int64_t slot = linear_state_slot(p.state_in, p.indices, p.indices_int64, p.num_slots, n);
    const LinearStateRef& in = p.state_in;
    const float* base = slot >= 0 ? in.ptr + slot * in.stride_slot + hv * in.stride_head +
                                        static_cast<int64_t>(j) * in.stride_v
                                  : nullptr;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = warp + kWarps * r;
      S[r] = (base != nullptr && col_ok && row < p.K) ? base[row * in.stride_k] : 0.f;
    }
  }

  StepInputs<kLoadRows> next;
  if (t_begin < t_end) load_step<Elem, kLoadRows>(next, p, b, t_begin, h, hv, j);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int buf = static_cast<int>((t - t_begin) & 1);
#pragma unroll
    for (int i = 0; i < kLoadRows; ++i) {
      const int row = threadIdx.x + i * kThreads;
      if (row < kRowsAll) {
        q_s[buf][row] = next.q[i];
        k_s[buf][row] = next.k[i];
        decay_s[buf][row] = next.decay_row[i];
      }
    }
    const float v_j = next.v, decay = next.decay, beta = next.beta;
    if (t + 1 < t_end) load_step<Elem, kLoadRows>(next, p, b, t + 1, h, hv, j);
    __syncthreads();

    // k . q and, for the in-kernel l2norm, |q|^2 and |k|^2: every warp takes
    // them from shared memory itself rather than waiting for another barrier.
    float kq = 0.f, qq = 0.f, kk = 0.f;
    for (int x = lane; x < p.K; x += 32) {
      const float qx = q_s[buf][x], kx = k_s[buf][x];
      kq += qx * kx;
      qq += qx * qx;
      kk += kx * kx;
    }
    kq = warp_sum(kq);
    float q_norm = 1.f, k_norm = 1.f;
    if (p.qk_l2norm) {
      q_norm = rsqrtf(warp_sum(qq) + 1e-6f);
      k_norm = rsqrtf(warp_sum(kk) + 1e-6f);
      kq *= q_norm * k_norm;
    }

    float part_k = 0.f, part_q = 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = warp + kWarps * r;
      S[r] *= decay * decay_s[buf][row];
      part_k += S[r] * k_s[buf][row];
      part_q += S[r] * q_s[buf][row];
    }
    partial_s[buf][0][warp][lane] = part_k;
    partial_s[buf][1][warp][lane] = part_q;
    __syncthreads();
    float sk = 0.f, sq = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sk += partial_s[buf][0][w][lane];
      sq += partial_s[buf][1][w][lane];
    }
    sk *= k_norm;
    sq *= q_norm;
    // u: what the step adds along k (the value, or the delta rule's correction).
    const float u = p.delta ? beta * (v_j - sk) : v_j;
#pragma unroll
    for (int r = 0; r < kRows; ++r) S[r] += (k_s[buf][warp + kWarps * r] * k_norm) * u;
    if (warp == 0 && col_ok) {
      Elem* orow = static_cast<Elem*>(p.out) + b * p.o_stride_b + t * p.o_stride_t +
                   hv * p.o_stride_h;
      store_f(orow + j, p.scale * (sq + kq * u));
    }
  }

  const int64_t slot = linear_state_slot(p.state_out, p.indices, p.indices_int64, p.num_slots, n);
  if (slot >= 0 && col_ok) {
    const LinearStateRef& out = p.state_out;
    float* base = out.ptr + slot * out.stride_slot + hv * out.stride_head +
                  static_cast<int64_t>(j) * out.stride_v;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = warp + kWarps * r;
      if (row < p.K) base[row * out.stride_k] = S[r];
    }
  }
}

template <typename Elem>
cudaError_t launch_for_elem(const LinearRecurrentParams& p, cudaStream_t stream) {
  const int col_tiles = (p.V + kCols - 1) / kCols;
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(p.N) * col_tiles),
                  static_cast<unsigned>(p.HV));
  if (p.K <= 16 * kWarps) {
    linear_recurrent_kernel<Elem, 16><<<grid, kThreads, 0, stream>>>(p);
  } else if (p.K <= 32 * kWarps) {
    linear_recurrent_kernel<Elem, 32><<<grid, kThreads, 0, stream>>>(p);
  } else {
    linear_recurrent_kernel<Elem, 64><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t run_linear_recurrent(const LinearRecurrentParams& p, cudaStream_t stream) {
  if (p.K < 1 || p.K > kLinearRecurrentMaxK || p.H < 1 || p.HV % p.H != 0 || p.HV > 65535) {
    return cudaErrorInvalidValue;
  }
  if (p.N == 0 || p.HV == 0 || p.V == 0) return cudaSuccess;
  switch (p.dtype) {
    case LinearElem::kFloat16: return launch_for_elem<__half>(p, stream);
    case LinearElem::kBFloat16: return launch_for_elem<__nv_bfloat16>(p, stream);
    case LinearElem::kFloat32: return launch_for_elem<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace fastattn
