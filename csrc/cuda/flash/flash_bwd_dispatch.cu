// Backward: work plan, the preprocess and convert kernels, and the dispatch
// (runtime head dim, dtype) -> compiled main-kernel instantiation. Only what
// this build compiled (FASTATTN_ENABLE_HDIM<D>, FASTATTN_ENABLE_FP16/BF16) is
// referenced; a head dim that is not compiled runs through the next larger one.
#include <cstdint>

#include "cuda/common/compiled_variants.h"
#include "cuda/common/bwd_dq_layout.h"
#include "cuda/common/types.h"
#include "cuda/flash/flash_bwd_launch.cuh"
#include "cuda/flash/launch.h"

// Instantiated in flash_bwd_hdim<D>_<dtype>.cu.
FASTATTN_EXTERN_BWD(32, kFloat16)
FASTATTN_EXTERN_BWD(64, kFloat16)
FASTATTN_EXTERN_BWD(96, kFloat16)
FASTATTN_EXTERN_BWD(128, kFloat16)
FASTATTN_EXTERN_BWD(192, kFloat16)
FASTATTN_EXTERN_BWD(256, kFloat16)
FASTATTN_EXTERN_BWD(32, kBFloat16)
FASTATTN_EXTERN_BWD(64, kBFloat16)
FASTATTN_EXTERN_BWD(96, kBFloat16)
FASTATTN_EXTERN_BWD(128, kBFloat16)
FASTATTN_EXTERN_BWD(192, kBFloat16)
FASTATTN_EXTERN_BWD(256, kBFloat16)

namespace fastattn {
namespace gpu {
namespace {


template <int kHeadDim>
void config_of(int& block_n, int& smem) {
  block_n = BwdConfig<kHeadDim>::Traits::kBlockN;
  smem = BwdConfig<kHeadDim>::Traits::kSmemBytes;
}

void config_of(int kernel_hdim, int& block_n, int& smem) {
  switch (kernel_hdim) {
    case 32: return config_of<32>(block_n, smem);
    case 64: return config_of<64>(block_n, smem);
    case 96: return config_of<96>(block_n, smem);
    case 128: return config_of<128>(block_n, smem);
    case 192: return config_of<192>(block_n, smem);
    case 256: return config_of<256>(block_n, smem);
    default: block_n = smem = 0;
  }
}

// ------------------------------------------------------------ preprocess
// D[row, h] = sum_d dO * O in fp32 (stored like lse) and lse * log2(e) (+inf
// for rows with lse = -inf, whose P is then exactly 0): one 8-lane group per
// (row, head); a warp takes 4 consecutive items so that the loop and the
// shuffles stay warp-uniform. Then zeroes dq_accum.
template <typename Elem>
__global__ void __launch_bounds__(256)
    flash_bwd_preprocess_kernel(const __grid_constant__ BwdParams p) {
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t rows = varlen ? p.total_q : int64_t(p.batch) * p.seqlen_q;
  const int64_t items = rows * p.heads_q;
  const int lane = threadIdx.x & 31;
  const int lane8 = lane & 7;
  const int chunks = p.head_dim / 8;
  const int64_t warp_global = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warp_count = int64_t(gridDim.x) * blockDim.x / 32;
  const Elem* out = static_cast<const Elem*>(p.out);
  const Elem* dout = static_cast<const Elem*>(p.dout);
  for (int64_t base = warp_global * 4; base < items; base += warp_count * 4) {
    const int64_t item = base + (lane >> 3);
    const bool valid = item < items;
    float acc = 0.f;
    int64_t row = 0, b = 0, i = 0;
    int h = 0;
    if (valid) {
      row = item / p.heads_q;
      h = static_cast<int>(item - row * p.heads_q);
      b = varlen ? 0 : row / p.seqlen_q;
      i = varlen ? row : row - b * p.seqlen_q;
      const Elem* o = out + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
      const Elem* d = dout + b * p.do_batch_stride + i * p.do_row_stride + h * p.do_head_stride;
      for (int c = lane8; c < chunks; c += 8) {
        const uint4 ov = *reinterpret_cast<const uint4*>(o + c * 8);
        const uint4 dv = *reinterpret_cast<const uint4*>(d + c * 8);
        const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w};
        const uint32_t dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float o0, o1, d0, d1;
          unpack2<Elem>(ow[e], o0, o1);
          unpack2<Elem>(dw[e], d0, d1);
          acc = fmaf(o0, d0, acc);
          acc = fmaf(o1, d1, acc);
        }
      }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    acc += __shfl_xor_sync(0xffffffffu, acc, 4);
    if (valid) {
      if (lane8 == 0) {
        const int64_t off = b * p.lse_batch_stride + h * p.lse_head_stride + i;
        p.dsoftmax_sum[off] = p.dlse != nullptr ? acc - p.dlse[off] : acc;
        const float l = p.lse[off];
        p.lse_log2[off] = l == neg_inf() ? -neg_inf() : l * 1.4426950408889634f;
      }
    }
  }
  // Zero every dq_accum slice (padding rows included: the layout is in
  // common/bwd_dq_layout.h), 16 bytes per store.
  const int64_t dq_vec4 =
      int64_t(p.dq_splits) * dq_pad_rows(varlen, p.batch, p.seqlen_q, p.total_q) *
      p.heads_q * p.head_dim / 4;
  const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < dq_vec4;
       i += int64_t(gridDim.x) * blockDim.x) {
    reinterpret_cast<float4*>(p.dq_accum)[i] = z;
  }
}

// ------------------------------------------------------------ convert
// out[row, h, :] = scale * sum_{c < copies} acc[c, row, h, :] (fixed order),
// cast to Elem (or kept fp32: bwd_partial) and stored with out's strides. One
// thread per 8 elements.
struct ConvertJob {
  const float* acc = nullptr;
  int copies = 0;
  int64_t copy_stride = 0;  // floats between copies
  int64_t rows = 0;
  int heads = 0;
  int seqlen = 0;  // dense: rows per sequence; 0: varlen (batch stride unused)
  void* out = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
  float scale = 1.f;
  // dq_accum's tiled layout (common/bwd_dq_layout.h) instead of (row, head, d);
  // varlen: the sequences' cu_seqlens, count and max length locate a row's padded row.
  bool dq_tiled = false;
  const int* cu_seqlens = nullptr;
  int batch = 0;
  int max_len = 0;
  bool out_f32 = false;
};

template <typename Elem>
__global__ void __launch_bounds__(256)
    flash_bwd_convert_kernel(const __grid_constant__ ConvertJob j0,
                             const __grid_constant__ ConvertJob j1,
                             const __grid_constant__ ConvertJob j2, int head_dim) {
  const ConvertJob& j = blockIdx.y == 0 ? j0 : (blockIdx.y == 1 ? j1 : j2);
  const int chunks = head_dim / 8;
  const int64_t items = j.rows * j.heads * chunks;
  for (int64_t it = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; it < items;
       it += int64_t(gridDim.x) * blockDim.x) {
    const int64_t rh = it / chunks;
    const int c = static_cast<int>(it - rh * chunks);
    const int64_t row = rh / j.heads;
    const int h = static_cast<int>(rh - row * j.heads);
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = 0.f;
    const int64_t bb = j.seqlen > 0 ? row / j.seqlen : 0;
    const int64_t i = j.seqlen > 0 ? row - bb * j.seqlen : row;
    if (!j.dq_tiled) {
      const float* src = j.acc + rh * head_dim + c * 8;
      for (int k = 0; k < j.copies; ++k) {
        const float4 a = reinterpret_cast<const float4*>(src + k * j.copy_stride)[0];
        const float4 b = reinterpret_cast<const float4*>(src + k * j.copy_stride)[1];
        v[0] += a.x; v[1] += a.y; v[2] += a.z; v[3] += a.w;
        v[4] += b.x; v[5] += b.y; v[6] += b.z; v[7] += b.w;
      }
    } else {
      // Padded row of this row; -1 (output 0) for varlen rows that no sequence
      // covers (or past a sequence's max length), which the main kernel never wrote.
      int64_t prow = -1;
      if (j.cu_seqlens == nullptr) {
        prow = bb * dq_round16(j.seqlen) + i;
      } else {
        int lo = 0, hi = j.batch - 1;  // last sequence whose (clamped) start is <= row
        while (lo < hi) {
          const int mid = (lo + hi + 1) >> 1;
          if (seq_bounds(j.cu_seqlens, mid, 0, j.max_len, j.rows).start <= row) {
            lo = mid;
          } else {
            hi = mid - 1;
          }
        }
        const SeqBounds sb = seq_bounds(j.cu_seqlens, lo, 0, j.max_len, j.rows);
        if (row >= sb.start && row < sb.start + sb.len) {
          prow = dq_pad_start(true, lo, 0, sb.start) + (row - sb.start);
        }
      }
      if (prow >= 0) {
        // Row prow % 16 of its group, columns 8c .. 8c + 7: lanes 4 (prow % 8) + t.
        const float* src = j.acc + (prow >> 4) * 16 * j.heads * int64_t(head_dim) +
                           int64_t(h) * 16 * head_dim + c * 128 + (prow & 7) * 16 +
                           ((prow >> 3) & 1) * 2;
        for (int k = 0; k < j.copies; ++k) {
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            const float2 a = *reinterpret_cast<const float2*>(src + k * j.copy_stride + t * 4);
            v[2 * t] += a.x;
            v[2 * t + 1] += a.y;
          }
        }
      }
    }
    const int64_t dst_off = bb * j.batch_stride + i * j.row_stride + h * j.head_stride + c * 8;
    if (j.out_f32) {
      float4* dst = reinterpret_cast<float4*>(static_cast<float*>(j.out) + dst_off);
      dst[0] = make_float4(v[0] * j.scale, v[1] * j.scale, v[2] * j.scale, v[3] * j.scale);
      dst[1] = make_float4(v[4] * j.scale, v[5] * j.scale, v[6] * j.scale, v[7] * j.scale);
      continue;
    }
    uint4 o;
    o.x = pack2<Elem>(v[0] * j.scale, v[1] * j.scale);
    o.y = pack2<Elem>(v[2] * j.scale, v[3] * j.scale);
    o.z = pack2<Elem>(v[4] * j.scale, v[5] * j.scale);
    o.w = pack2<Elem>(v[6] * j.scale, v[7] * j.scale);
    *reinterpret_cast<uint4*>(static_cast<Elem*>(j.out) + dst_off) = o;
  }
}

int grid_for(int64_t work_items, int per_block, int num_sms) {
  const int64_t cap = int64_t(num_sms > 0 ? num_sms : 108) * 32;
  int64_t blocks = (work_items + per_block - 1) / per_block;
  if (blocks > cap) blocks = cap;
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

template <ElemType kDtype>
cudaError_t run_main_kernel(int kernel_hdim, const BwdParams& p, cudaStream_t stream) {
  switch (kernel_hdim) {
#ifdef FASTATTN_ENABLE_HDIM32
    case 32: return run_bwd_hdim<32, kDtype>(p, stream);
#endif
#ifdef FASTATTN_ENABLE_HDIM64
    case 64: return run_bwd_hdim<64, kDtype>(p, stream);
#endif
#ifdef FASTATTN_ENABLE_HDIM96
    case 96: return run_bwd_hdim<96, kDtype>(p, stream);
#endif
#ifdef FASTATTN_ENABLE_HDIM128
    case 128: return run_bwd_hdim<128, kDtype>(p, stream);
#endif
#ifdef FASTATTN_ENABLE_HDIM192
    case 192: return run_bwd_hdim<192, kDtype>(p, stream);
#endif
#ifdef FASTATTN_ENABLE_HDIM256
    case 256: return run_bwd_hdim<256, kDtype>(p, stream);
#endif
    default: return cudaErrorNotSupported;
  }
}

template <ElemType kDtype>
cudaError_t run_bwd_dtype(int kernel_hdim, const BwdParams& p, cudaStream_t stream) {
  using Elem = typename ElemOf<kDtype>::type;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t rows_q = varlen ? p.total_q : int64_t(p.batch) * p.seqlen_q;
  const int64_t rows_k = varlen ? p.total_k : int64_t(p.batch) * p.seqlen_k;
  if (rows_q <= 0 || p.heads_q <= 0) return cudaSuccess;

  // 1. D = rowsum(dO * O), zero dq_accum.
  {
    const int64_t items = rows_q * p.heads_q;
    flash_bwd_preprocess_kernel<Elem>
        <<<grid_for(items, 32, p.num_sms), 256, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // 2. main kernel
  if (rows_k > 0) {
    cudaError_t err = run_main_kernel<kDtype>(kernel_hdim, p, stream);
    if (err != cudaSuccess) return err;
  }
  // 3. dq (and dk/dv from their fp32 copies) -> input dtype
  {
    ConvertJob jq;
    jq.acc = p.dq_accum;
    jq.copies = p.dq_splits;
    jq.rows = rows_q;
    jq.heads = p.heads_q;
    jq.seqlen = varlen ? 0 : p.seqlen_q;
    jq.out = p.dq;
    jq.batch_stride = p.dq_batch_stride;
    jq.row_stride = p.dq_row_stride;
    jq.head_stride = p.dq_head_stride;
    jq.scale = p.scale;
    jq.dq_tiled = true;
    jq.copy_stride = dq_pad_rows(varlen, p.batch, p.seqlen_q, p.total_q) * p.heads_q * p.head_dim;
    jq.cu_seqlens = p.cu_seqlens_q;
    jq.batch = p.batch;
    jq.max_len = p.seqlen_q;
    jq.out_f32 = p.grads_f32;
    ConvertJob jk, jv;
    int n_jobs = 1;
    int64_t items = rows_q * p.heads_q * (p.head_dim / 8);
    if (p.dk_accum != nullptr && rows_k > 0) {
      jk.acc = p.dk_accum;
      jk.copies = p.dkv_copies;
      jk.copy_stride = rows_k * p.heads_kv * p.head_dim;
      jk.rows = rows_k;
      jk.heads = p.heads_kv;
      jk.seqlen = varlen ? 0 : p.seqlen_k;
      jk.out = p.dk;
      jk.batch_stride = p.dk_batch_stride;
      jk.row_stride = p.dk_row_stride;
      jk.head_stride = p.dk_head_stride;
      jk.scale = p.scale;
      jk.out_f32 = p.grads_f32;
      jv = jk;
      jv.acc = p.dv_accum;
      jv.out = p.dv;
      jv.batch_stride = p.dv_batch_stride;
      jv.row_stride = p.dv_row_stride;
      jv.head_stride = p.dv_head_stride;
      jv.scale = 1.f;
      n_jobs = 3;
      const int64_t kv_items = rows_k * p.heads_kv * (p.head_dim / 8);
      if (kv_items > items) items = kv_items;
    }
    const dim3 grid(grid_for(items, 256, p.num_sms), n_jobs);
    flash_bwd_convert_kernel<Elem><<<grid, 256, 0, stream>>>(jq, jk, jv, p.head_dim);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

int bwd_kernel_head_dim(int head_dim, ElemType dtype) {
  return compiled_kernel_head_dim(head_dim, dtype);
}

BwdPlan plan_bwd(const BwdParams& p) {
  BwdPlan plan;
  plan.kernel_head_dim = bwd_kernel_head_dim(p.head_dim, p.dtype);
  if (plan.kernel_head_dim == 0) return plan;
  config_of(plan.kernel_head_dim, plan.block_n, plan.smem_bytes);
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t rows_k = varlen ? p.total_k : int64_t(p.batch) * p.seqlen_k;
  const int group = p.heads_kv > 0 ? p.heads_q / p.heads_kv : 1;
  const int64_t n_blocks = (int64_t(p.seqlen_k) + plan.block_n - 1) / plan.block_n;
  const int64_t target = 2 * int64_t(p.num_sms > 0 ? p.num_sms : 108);

  // heads_per_cta: the largest divisor of the group that still gives ~2 CTAs
  // per SM. Whole groups keep dK/dV in registers (no fp32 workspace, no
  // atomics); splitting the group only pays when the grid would be too small
  // (MQA / GQA with few kv heads, short sequences, small batch).
  plan.heads_per_cta = 1;
  // A CTA's q heads share one schedule: block masks with per-head lists take
  // one head per CTA.
  const int max_hpc = (p.sparse.num != nullptr && p.sparse.hm > 1) ? 1 : group;
  for (int d = max_hpc; d >= 1; --d) {
    if (group % d != 0) continue;
    if (d == 1 || n_blocks * p.batch * (p.heads_q / d) >= target) {
      plan.heads_per_cta = d;
      break;
    }
  }
  const int64_t slots = p.heads_q / plan.heads_per_cta;
  const int64_t dq_elems =
      dq_pad_rows(varlen, p.batch, p.seqlen_q, p.total_q) * p.heads_q * p.head_dim;

  // Deterministic: grid column x walks KV blocks x, x + dq_splits, ... and owns
  // dq_accum slice x. Enough columns for ~2 CTAs per SM, at most one per KV
  // block, and at most 1 GiB of fp32 slices (beyond one).
  plan.dq_splits = 1;
  if (p.deterministic) {
    int64_t want = (target + p.batch * slots - 1) / (p.batch * slots);
    if (want > n_blocks) want = n_blocks;
    const int64_t cap = dq_elems > 0 ? (int64_t(1) << 28) / dq_elems : want;
    if (want > cap) want = cap;
    plan.dq_splits = static_cast<int>(want < 1 ? 1 : want);
  }
  plan.dq_accum_elems = plan.dq_splits * dq_elems;

  // fp32 gradients (bwd_partial) take the fp32 dK/dV sums even for whole
  // groups: the main kernels store dK/dV directly only in the input dtype.
  if (plan.heads_per_cta < group || p.grads_f32) {
    plan.dkv_copies = p.deterministic ? group / plan.heads_per_cta : 1;
    plan.dkv_accum_elems = plan.dkv_copies * rows_k * p.heads_kv * p.head_dim;
  }
  return plan;
}

cudaError_t run_bwd(const BwdParams& p, cudaStream_t stream) {
  const int d = bwd_kernel_head_dim(p.head_dim, p.dtype);
  if (d == 0) return cudaErrorNotSupported;
#ifdef FASTATTN_ENABLE_FP16
  if (p.dtype == ElemType::kFloat16) return run_bwd_dtype<ElemType::kFloat16>(d, p, stream);
#endif
#ifdef FASTATTN_ENABLE_BF16
  if (p.dtype == ElemType::kBFloat16) return run_bwd_dtype<ElemType::kBFloat16>(d, p, stream);
#endif
  return cudaErrorNotSupported;
}

}  // namespace gpu
}  // namespace fastattn
