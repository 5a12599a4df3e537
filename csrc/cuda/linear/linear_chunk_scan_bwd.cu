// Reverse scan of the chunked linear-attention backward (the math:
// LinearScanBwdParams in linear_chunk_params.h): the forward scan
// (linear_chunk_scan.cu) transposed. One CTA of 4 warps per (value slice of
// kVt columns, value head, batch row) walks the chunks from the last to the
// first with the state gradient slice dS (K x kVt, fp32) in registers as mma
// accumulators, warp w owning key rows K/4 w .. K/4 (w + 1) - 1. Per chunk:
//     dS -> dstates[c] (fp32) and -> shared (input dtype)
//     du = X + Kt dS                       warp w: chunk rows 16w..16w+15; to global (fp32)
//     dS = e^{b_last} dS + Qs^T dO - W^T du  Qs^T, W^T through ldmatrix.trans
// The previous chunk's Kt / Qs / W / X / dO tiles stream in (cp.async, two
// stages) while the current chunk computes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/linear/linear_chunk_launch.h"
#include "cuda/linear/linear_chunk_tiles.h"

namespace fastattn {
namespace gpu {
namespace {

using namespace linear_tiles;
constexpr int C = LinearScanBwdParams::kChunk;

template <int kK, int kVt, bool kDelta>
struct ScanBwdSmem {
  using TileK = SmemTile<C, kK>;
  using TileVt = SmemTile<C, kVt>;
  using TileS = SmemTile<kK, kVt>;
  // One stage: Kt, Qs, W (delta rule), X, dO.
  static constexpr int kKt = 0;
  static constexpr int kQs = kKt + TileK::kBytes;
  static constexpr int kW = kQs + TileK::kBytes;
  static constexpr int kX = kW + (kDelta ? TileK::kBytes : 0);
  static constexpr int kDo = kX + TileVt::kBytes;
  static constexpr int kStage = kDo + TileVt::kBytes;
  static constexpr int kS = 2 * kStage;               // dS in the input dtype
  static constexpr int kDu = kS + TileS::kBytes;      // -du (delta rule): W^T (-du) accumulates
  static constexpr int kTotal = kDu + (kDelta ? TileVt::kBytes : 0);
};

template <typename Elem, int kK, int kVt, bool kDelta>
__global__ void __launch_bounds__(kThreads, 1)
    linear_chunk_scan_bwd_kernel(const __grid_constant__ LinearScanBwdParams p) {
  using L = ScanBwdSmem<kK, kVt, kDelta>;
  using TileK = typename L::TileK;
  using TileVt = typename L::TileVt;
  using TileS = typename L::TileS;
  constexpr int kN = kVt / 8;   // n8 tiles of the value slice
  constexpr int kMT = kK / 64;  // m16 tiles of key rows per warp
  extern __shared__ __align__(128) char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int v0 = blockIdx.x * kVt, hv = blockIdx.y, b = blockIdx.z;
  const int64_t head = static_cast<int64_t>(b) * p.HV + hv;
  const int64_t head_row0 = head * p.chunks * C;  // workspace row of chunk 0
  const int64_t state_elems = static_cast<int64_t>(kK) * p.V;

  const Elem* kt = static_cast<const Elem*>(p.kt) + head_row0 * kK;
  const Elem* qs = static_cast<const Elem*>(p.qs) + head_row0 * kK;
  const Elem* w = kDelta ? static_cast<const Elem*>(p.w) + head_row0 * kK : nullptr;
  const Elem* x = static_cast<const Elem*>(p.x) + head_row0 * p.V + v0;
  const Elem* dout = static_cast<const Elem*>(p.dout) + head_row0 * p.V + v0;
  auto load_chunk = [&](int c, int stage) {
    const uint32_t base = ptx::smem_u32(smem + stage * L::kStage);
    const int64_t r0 = static_cast<int64_t>(c) * C;
    load_rows_async<TileK>(base + L::kKt, kt + r0 * kK, kK, C);
    load_rows_async<TileK>(base + L::kQs, qs + r0 * kK, kK, C);
    if (kDelta) load_rows_async<TileK>(base + L::kW, w + r0 * kK, kK, C);
    load_rows_async<TileVt>(base + L::kX, x + r0 * p.V, p.V, C);
    load_rows_async<TileVt>(base + L::kDo, dout + r0 * p.V, p.V, C);
    ptx::cp_async_commit();
  };

  float dS[kMT][kN][4];
  state_from_global(dS, p.dfinal != nullptr ? p.dfinal + head * state_elems + v0 : nullptr, p.V, 1, lane, warp);

  char* s_s = smem + L::kS;
  char* s_du = smem + L::kDu;
  const float* decay_last = p.decay_last + head * p.chunks;
  float* du_out = p.du + head_row0 * p.V + v0;
  float* dstates = p.dstates + head * p.chunks * state_elems + v0;
  const int a_off = a_lane_offset<TileK>(lane);
  const int a_tr_off = a_trans_lane_offset<TileK>(lane);
  const int s_off = b_trans_lane_offset<TileS>(lane);
  const int v_off = b_trans_lane_offset<TileVt>(lane);

  if (p.chunks > 0) load_chunk(p.chunks - 1, 0);
#pragma unroll 1
  for (int i = 0; i < p.chunks; ++i) {
    const int c = p.chunks - 1 - i, stage = i & 1;
    char* st = smem + stage * L::kStage;
    if (c > 0) {
      load_chunk(c - 1, stage ^ 1);
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    state_to_global(dstates + static_cast<int64_t>(c) * state_elems, p.V, 1, dS, lane, warp);
    state_to_smem<Elem, TileS>(s_s, dS, lane, warp);
    __syncthreads();

    // du = X + Kt dS.
    float y[1][kN][4];
    acc_zero(y);
    const uint32_t kt_tile[1] = {ptx::smem_u32(st + L::kKt)};
    rows_times_state<Elem, TileK, TileS>(y, kt_tile, ptx::smem_u32(s_s), a_off, s_off, warp);
#pragma unroll
    for (int nt = 0; nt < kN; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = acc_row(lane, 16 * warp, 2 * half), col = acc_col(lane, 8 * nt, 0);
        float x0, x1;
        load_pair<Elem>(st + L::kX, TileVt::offset(r, col), x0, x1);
        const float d0 = x0 + y[0][nt][2 * half], d1 = x1 + y[0][nt][2 * half + 1];
        *reinterpret_cast<float2*>(du_out + (static_cast<int64_t>(c) * C + r) * p.V + col) = make_float2(d0, d1);
        if (kDelta) store_pair<Elem>(s_du, TileVt::offset(r, col), -d0, -d1);
      }
    }
    __syncthreads();

    // dS = e^{b_last} dS + Qs^T dO + W^T (-du).
    const float d = decay_last[c];
    acc_scale(dS, d);
    state_add_trans_product<Elem, TileK, TileVt>(dS, ptx::smem_u32(st + L::kQs), ptx::smem_u32(st + L::kDo),
                                                  a_tr_off, v_off, warp);
    if (kDelta) {
      state_add_trans_product<Elem, TileK, TileVt>(dS, ptx::smem_u32(st + L::kW), ptx::smem_u32(s_du), a_tr_off,
                                                    v_off, warp);
    }
    __syncthreads();  // this stage and s_s / s_du are rewritten next
  }
  state_to_global(p.dinitial + head * state_elems + v0, p.V, 1, dS, lane, warp);
}

template <typename Elem, int kK, bool kDelta>
cudaError_t run_typed(const LinearScanBwdParams& p, cudaStream_t stream) {
  return launch_linear_chunk_scan_bwd<Elem, kK, kLinearScanCols, kDelta>(p, stream);
}

template <typename Elem>
cudaError_t run_elem(const LinearScanBwdParams& p, cudaStream_t stream) {
  if (p.K == 64) return p.delta ? run_typed<Elem, 64, true>(p, stream) : run_typed<Elem, 64, false>(p, stream);
  return p.delta ? run_typed<Elem, 128, true>(p, stream) : run_typed<Elem, 128, false>(p, stream);
}

}  // namespace

template <typename Elem, int kK, int kVt, bool kDelta>
cudaError_t launch_linear_chunk_scan_bwd(const LinearScanBwdParams& p, cudaStream_t stream) {
  using L = ScanBwdSmem<kK, kVt, kDelta>;
  auto kernel = linear_chunk_scan_bwd_kernel<Elem, kK, kVt, kDelta>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kTotal);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.V / kVt), static_cast<unsigned>(p.HV), static_cast<unsigned>(p.B));
  kernel<<<grid, kThreads, L::kTotal, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t run_linear_state_scan_bwd(const LinearScanBwdParams& p, cudaStream_t stream) {
  if (!linear_scan_supported(p.K, p.V) || p.HV > 65535 || p.B > 65535 || p.chunks < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.B == 0 || p.HV == 0) return cudaSuccess;
  return p.dtype == ElemType::kFloat16 ? run_elem<__half>(p, stream) : run_elem<__nv_bfloat16>(p, stream);
}

}  // namespace gpu
}  // namespace fastattn
