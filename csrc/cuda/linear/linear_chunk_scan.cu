// Scan kernel of the chunked linear-attention forward (the math:
// linear_chunk_params.h): one CTA of 4 warps per (value slice of kVt columns,
// value head, sequence) walks the chunks in order. The state slice S
// (K x kVt, fp32) lives in registers as mma accumulators, warp w owning key
// rows K/4 w .. K/4 (w + 1) - 1. Per chunk:
//     S -> shared (input dtype)                       the B operand of the products
//     X = Qt S, Y = W S                               warp w: chunk rows 16w..16w+15
//     O = O_intra + X (to global); u = U - Y (to shared)
//     S = e^{b_last} S + Kt^T u                       Kt^T through ldmatrix.trans
// The next chunk's Qt / W / Kt / U / O_intra tiles stream in (cp.async,
// two stages) while the current chunk computes. With per-key decays (kPerKey,
// GLA: no delta rule) e^{b_last} is a vector over the key rows:
// S = diag(e^{b_last}) S + Kt^T V.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/linear/linear_chunk_launch.h"
#include "cuda/linear/linear_chunk_tiles.h"
#include "cuda/linear/linear_state_slot.h"

namespace fastattn {
namespace gpu {
namespace {

using namespace linear_tiles;
constexpr int C = LinearChunkParams::kChunk;

template <int kK, int kVt, bool kDelta>
struct ScanSmem {
  using TileK = SmemTile<C, kK>;
  using TileVt = SmemTile<C, kVt>;
  using TileS = SmemTile<kK, kVt>;
  // One stage: Qt, W (delta rule), Kt, U, O_intra.
  static constexpr int kQt = 0;
  static constexpr int kW = kQt + TileK::kBytes;
  static constexpr int kKt = kW + (kDelta ? TileK::kBytes : 0);
  static constexpr int kU = kKt + TileK::kBytes;
  static constexpr int kOi = kU + TileVt::kBytes;
  static constexpr int kStage = kOi + TileVt::kBytes;
  static constexpr int kS = 2 * kStage;             // S in the input dtype
  static constexpr int kUpd = kS + TileS::kBytes;   // u = U - W S (delta rule)
  static constexpr int kTotal = kUpd + (kDelta ? TileVt::kBytes : 0);
};

template <typename Elem, int kK, int kVt, bool kDelta, bool kPerKey>
__global__ void __launch_bounds__(kThreads, 1)
    linear_chunk_scan_kernel(const __grid_constant__ LinearChunkParams p) {
  static_assert(!(kDelta && kPerKey), "per-key decays take no delta rule here");
  using L = ScanSmem<kK, kVt, kDelta>;
  using TileK = typename L::TileK;
  using TileVt = typename L::TileVt;
  using TileS = typename L::TileS;
  constexpr int kN = kVt / 8;   // n8 tiles of the value slice
  constexpr int kMT = kK / 64;  // m16 tiles of key rows per warp
  extern __shared__ __align__(128) char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int v0 = blockIdx.x * kVt, hv = blockIdx.y, n = blockIdx.z;  // n: sequence
  const bool varlen = p.cu_seqlens != nullptr;
  const int b = varlen ? 0 : n;
  // Clamped: a bad cu_seqlens reads nothing outside the tensors / workspace.
  const int c_end = varlen ? min(max(p.chunk_offsets[n + 1], 0), p.chunks) : p.chunks;
  const int c_begin = varlen ? min(max(p.chunk_offsets[n], 0), c_end) : 0;
  const int t_end = varlen ? min(max(p.cu_seqlens[n + 1], 0), p.T) : p.T;
  const int t_begin = varlen ? min(max(p.cu_seqlens[n], 0), t_end) : 0;
  const int64_t head_row0 = (static_cast<int64_t>(b) * p.HV + hv) * p.chunks * C;  // workspace row of chunk 0

  const Elem* qt = static_cast<const Elem*>(p.qt) + head_row0 * kK;
  const Elem* w = kDelta ? static_cast<const Elem*>(p.w) + head_row0 * kK : nullptr;
  const Elem* kt = static_cast<const Elem*>(p.kt) + head_row0 * kK;
  const Elem* oi = static_cast<const Elem*>(p.o_intra) + head_row0 * p.V + v0;
  const Elem* u_ws = kDelta ? static_cast<const Elem*>(p.u) + head_row0 * p.V + v0 : nullptr;
  const Elem* v_in = static_cast<const Elem*>(p.v) + b * p.v_stride_b + hv * p.v_stride_h + v0;
  // Chunk c (workspace index) starts at token t_begin + (c - c_begin) * C.
  auto load_chunk = [&](int c, int stage) {
    const uint32_t base = ptx::smem_u32(smem + stage * L::kStage);
    const int64_t r0 = static_cast<int64_t>(c) * C;
    const int tok = t_begin + (c - c_begin) * C;
    load_rows_async<TileK>(base + L::kQt, qt + r0 * kK, kK, C);
    if (kDelta) load_rows_async<TileK>(base + L::kW, w + r0 * kK, kK, C);
    load_rows_async<TileK>(base + L::kKt, kt + r0 * kK, kK, C);
    if (kDelta) {
      load_rows_async<TileVt>(base + L::kU, u_ws + r0 * p.V, p.V, C);
    } else {  // U = V: read v itself, rows past the sequence zero-filled
      load_rows_async<TileVt>(base + L::kU, v_in + static_cast<int64_t>(tok) * p.v_stride_t, p.v_stride_t,
                              min(C, t_end - tok));
    }
    load_rows_async<TileVt>(base + L::kOi, oi + r0 * p.V, p.V, C);
    ptx::cp_async_commit();
  };

  // S: m16 tiles mt of warp w's key rows x kN n8 tiles.
  float S[kMT][kN][4];
  {
    const int64_t slot = linear_state_slot(p.state_in, p.indices, p.indices_int64, p.num_slots, n);
    const LinearStateRef& in = p.state_in;
    const float* h0 = slot >= 0 ? in.ptr + slot * in.stride_slot + hv * in.stride_head +
                                      static_cast<int64_t>(v0) * in.stride_v
                                : nullptr;
    state_from_global(S, h0, in.stride_k, in.stride_v, lane, warp);
  }

  char* s_s = smem + L::kS;
  char* s_u = smem + L::kUpd;
  // e^{b_last} per chunk (per key row and chunk with kPerKey).
  const float* decay_last = p.decay_last + (static_cast<int64_t>(b) * p.HV + hv) * p.chunks * (kPerKey ? kK : 1);
  Elem* out = static_cast<Elem*>(p.out) + b * p.out_stride_b + hv * p.out_stride_h + v0;  // token 0
  const int64_t out_row_stride = p.out_stride_t;
  // Training outputs (dense only): the state at each chunk start, the updates u.
  float* chunk_states = p.chunk_states != nullptr
                            ? p.chunk_states + (static_cast<int64_t>(b) * p.HV + hv) * p.chunks * kK * p.V + v0
                            : nullptr;
  Elem* u_out = kDelta && p.u_out != nullptr ? static_cast<Elem*>(p.u_out) + head_row0 * p.V + v0 : nullptr;
  const int a_off = a_lane_offset<TileK>(lane);
  const int a_tr_off = a_trans_lane_offset<TileK>(lane);
  const int s_off = b_trans_lane_offset<TileS>(lane);
  const int u_off = b_trans_lane_offset<TileVt>(lane);

  if (c_begin < c_end) load_chunk(c_begin, 0);
#pragma unroll 1
  for (int c = c_begin; c < c_end; ++c) {
    const int stage = (c - c_begin) & 1;
    const int tok = t_begin + (c - c_begin) * C;
    char* st = smem + stage * L::kStage;
    // This chunk's per-row decays, loaded early: they are needed only after two barriers.
    float row_decay[kPerKey ? kMT : 1][2];
    if constexpr (kPerKey) acc_row_factors(row_decay, decay_last + static_cast<int64_t>(c) * kK, lane, warp);
    if (c + 1 < c_end) {
      load_chunk(c + 1, stage ^ 1);
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    if (chunk_states != nullptr) {
      state_to_global(chunk_states + static_cast<int64_t>(c) * kK * p.V, p.V, 1, S, lane, warp);
    }
    // S (input dtype) for the products with the chunk's rows.
    state_to_smem<Elem, TileS>(s_s, S, lane, warp);
    __syncthreads();

    // xy[0] = Qt S (the outputs' inter-chunk part), xy[1] = W S (delta rule).
    constexpr int kA = kDelta ? 2 : 1;
    float xy[kA][kN][4];
    acc_zero(xy);
    uint32_t a_tiles[kA];
    a_tiles[0] = ptx::smem_u32(st + L::kQt);
    if constexpr (kDelta) a_tiles[kA - 1] = ptx::smem_u32(st + L::kW);
    rows_times_state<Elem, TileK, TileS>(xy, a_tiles, ptx::smem_u32(s_s), a_off, s_off, warp);
    const auto& x = xy[0];
    const auto& y = xy[kA - 1];
    const int valid = min(C, t_end - tok);
#pragma unroll
    for (int nt = 0; nt < kN; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = acc_row(lane, 16 * warp, 2 * half), col = acc_col(lane, 8 * nt, 0);
        float o0, o1;
        load_pair<Elem>(st + L::kOi, TileVt::offset(r, col), o0, o1);
        if (r < valid) {
          store_pair_global<Elem>(out + (static_cast<int64_t>(tok) + r) * out_row_stride + col,
                                  o0 + x[nt][2 * half], o1 + x[nt][2 * half + 1]);
        }
        if (kDelta) {
          float u0, u1;
          load_pair<Elem>(st + L::kU, TileVt::offset(r, col), u0, u1);
          store_pair<Elem>(s_u, TileVt::offset(r, col), u0 - y[nt][2 * half], u1 - y[nt][2 * half + 1]);
          if (u_out != nullptr) {
            store_pair_global<Elem>(u_out + (static_cast<int64_t>(c) * C + r) * p.V + col, u0 - y[nt][2 * half],
                                    u1 - y[nt][2 * half + 1]);
          }
        }
      }
    }
    __syncthreads();

    // S = e^{b_last} S + Kt^T u.
    const uint32_t u_tile = kDelta ? ptx::smem_u32(s_u) : ptx::smem_u32(st + L::kU);
    if constexpr (kPerKey) {
      acc_scale_rows(S, row_decay);
    } else {
      acc_scale(S, decay_last[c]);
    }
    state_add_trans_product<Elem, TileK, TileVt>(S, ptx::smem_u32(st + L::kKt), u_tile, a_tr_off, u_off, warp);
    __syncthreads();  // this stage and s_s / s_u are rewritten next
  }

  const int64_t slot = linear_state_slot(p.state_out, p.indices, p.indices_int64, p.num_slots, n);
  if (slot >= 0) {
    const LinearStateRef& o = p.state_out;
    float* fs = o.ptr + slot * o.stride_slot + hv * o.stride_head + static_cast<int64_t>(v0) * o.stride_v;
    state_to_global(fs, o.stride_k, o.stride_v, S, lane, warp);
  }
}

}  // namespace

template <typename Elem, int kK, int kVt, bool kDelta, bool kPerKey>
cudaError_t launch_linear_chunk_scan(const LinearChunkParams& p, cudaStream_t stream) {
  using L = ScanSmem<kK, kVt, kDelta>;
  auto kernel = linear_chunk_scan_kernel<Elem, kK, kVt, kDelta, kPerKey>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kTotal);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.V / kVt), static_cast<unsigned>(p.HV), static_cast<unsigned>(p.N));
  kernel<<<grid, kThreads, L::kTotal, stream>>>(p);
  return cudaGetLastError();
}

int linear_scan_cols_for(const LinearChunkParams& p, int sms, int smem_per_sm) {
  if (p.g_per_key || p.V % kLinearScanColsWide != 0 || sms <= 0) return 0;
  const int wide_bytes = p.K == 64 ? (p.delta ? ScanSmem<64, kLinearScanColsWide, true>::kTotal
                                              : ScanSmem<64, kLinearScanColsWide, false>::kTotal)
                                   : (p.delta ? ScanSmem<128, kLinearScanColsWide, true>::kTotal
                                              : ScanSmem<128, kLinearScanColsWide, false>::kTotal);
  const int narrow_bytes = p.K == 64 ? (p.delta ? ScanSmem<64, kLinearScanCols, true>::kTotal
                                                : ScanSmem<64, kLinearScanCols, false>::kTotal)
                                     : (p.delta ? ScanSmem<128, kLinearScanCols, true>::kTotal
                                                : ScanSmem<128, kLinearScanCols, false>::kTotal);
  // CTAs per SM by shared memory (1 KB per CTA reserved by the runtime); registers allow
  // more than shared memory does for both slices (<= 228 registers x 128 threads).
  auto per_sm = [&](int bytes) { return std::max(1, smem_per_sm / (bytes + 1024)); };
  const int64_t rows = static_cast<int64_t>(p.HV) * p.N;
  const int64_t narrow = rows * (p.V / kLinearScanCols), wide = rows * (p.V / kLinearScanColsWide);
  const int64_t narrow_waves = (narrow + int64_t{sms} * per_sm(narrow_bytes) - 1) / (int64_t{sms} * per_sm(narrow_bytes));
  const int64_t wide_waves = (wide + int64_t{sms} * per_sm(wide_bytes) - 1) / (int64_t{sms} * per_sm(wide_bytes));
  return 3 * wide_waves < 2 * narrow_waves ? kLinearScanColsWide : 0;
}

#define FASTATTN_LINEAR_SCAN(E, K)                                                                        \
  template cudaError_t launch_linear_chunk_scan<E, K, kLinearScanCols, true, false>(                      \
      const LinearChunkParams&, cudaStream_t);                                                            \
  template cudaError_t launch_linear_chunk_scan<E, K, kLinearScanCols, false, false>(                     \
      const LinearChunkParams&, cudaStream_t);                                                            \
  template cudaError_t launch_linear_chunk_scan<E, K, kLinearScanCols, false, true>(                      \
      const LinearChunkParams&, cudaStream_t);                                                            \
  template cudaError_t launch_linear_chunk_scan<E, K, kLinearScanColsWide, true, false>(                  \
      const LinearChunkParams&, cudaStream_t);                                                            \
  template cudaError_t launch_linear_chunk_scan<E, K, kLinearScanColsWide, false, false>(                 \
      const LinearChunkParams&, cudaStream_t);
FASTATTN_LINEAR_SCAN(__half, 64)
FASTATTN_LINEAR_SCAN(__half, 128)
FASTATTN_LINEAR_SCAN(__nv_bfloat16, 64)
FASTATTN_LINEAR_SCAN(__nv_bfloat16, 128)
#undef FASTATTN_LINEAR_SCAN

}  // namespace gpu
}  // namespace fastattn
