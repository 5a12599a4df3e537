// Launch template of the FlashAttention-2 backward main kernels (mma.sync,
// and wgmma on sm90 at head dims 64 / 128): tile configuration per head dim
// and the host-side launcher. Included by the
// per-(hdim, dtype) instantiation files flash_bwd_hdim<D>_<fp16|bf16>.cu and
// (for the block sizes only) by flash_bwd_dispatch.cu.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cuda/common/types.h"
#include "cuda/flash/flash_bwd_kernel.cuh"
#include "cuda/flash/flash_bwd_sm90_kernel.cuh"
#include "cuda/flash/flash_bwd_ws_kernel.cuh"
#include "cuda/common/tma_map.h"
#include "cuda/flash/kernel_select.h"
#include "cuda/flash/launch.h"

namespace fastattn {
namespace gpu {

// BwdTraits<kHeadDim, kBlockM, kNWarps, kDSplit, kQWarpsM, kPipelineDQ>: 8 warps
// each. Up to hdim 128 every warp owns 16 keys x the full head dim (kBlockN =
// 128 keys per CTA); dK + dV then take kHeadDim fp32 registers per thread (128
// at hdim 128). hdim 64 uses 128-row query blocks (S^T / dP^T take 128
// registers, dK / dV 64), which halves the per-query-block overhead and the
// ldmatrix traffic of K / V per FLOP; the other head dims use 64-row query
// blocks (hdim 128 has no registers left for 128). hdim 64 and 128 pipeline dQ
// (a second dS^T buffer, one barrier per iteration) where the device has the
// shared memory (H100 class; sm80 runs them unpipelined). hdim 192/256 split
// the head dim over warp pairs (kBlockN = 64) and use 32-row query blocks so
// that K, V, 2 x Q, dO, dS^T and the partial-sum exchange fit the 163 KB of
// shared memory an sm80 block may have. Shared memory (KB) for hdim 32 ... 256:
// 59 / 144 (178 pipelined) / 123 / 155 (173 pipelined) / 125 / 153.
// hdim 64 and 128 also have the paired warp layout (Paired: pairs of warps own
// 32 keys, P^T through shared memory; see BwdTraits), which takes the place of
// Traits where the device has its shared memory (hdim 64: 212 KB, hdim 128:
// 191 KB; H100 class), with the same kBlockN. Elsewhere Paired == Traits.
// PairedSkew: Paired with the skewed dQ (BwdTraits kSkewDQ), taken for long
// query loops (at least kSkewMinQueryBlocks query blocks per q head). Measured
// on H200 (bf16, same run): hdim 64 at 4k / 16k +6 / +7% non-causal, +1 / +4%
// causal; its register pressure (ptxas reloads loop invariants) cost 1k causal
// 7% in an earlier build that used it everywhere, and at hdim 128 it gained
// only ~1%, within noise, so hdim 128 keeps Paired (PairedSkew == Paired).
template <int kHeadDim>
struct BwdConfig;
template <> struct BwdConfig<32> {
  using Traits = BwdTraits<32, 64, 8, 1, 4>;
  using Paired = Traits;
  using PairedSkew = Paired;
};
template <> struct BwdConfig<64> {
  using Traits = BwdTraits<64, 128, 8, 1, 4, true>;
  using Paired = BwdTraits<64, 128, 8, 1, 4, true, true>;
  using PairedSkew = BwdTraits<64, 128, 8, 1, 4, true, true, true>;
};
template <> struct BwdConfig<96> {
  using Traits = BwdTraits<96, 64, 8, 1, 4>;
  using Paired = Traits;
  using PairedSkew = Paired;
};
template <> struct BwdConfig<128> {
  using Traits = BwdTraits<128, 64, 8, 1, 2, true>;
  using Paired = BwdTraits<128, 64, 8, 1, 2, true, true>;
  using PairedSkew = Paired;
};
template <> struct BwdConfig<192> {
  using Traits = BwdTraits<192, 32, 8, 2, 2>;
  using Paired = Traits;
  using PairedSkew = Paired;
};
template <> struct BwdConfig<256> {
  using Traits = BwdTraits<256, 32, 8, 2, 2>;
  using Paired = Traits;
  using PairedSkew = Paired;
};
constexpr int kSkewMinQueryBlocks = 32;

// The sm90 (wgmma) kernel per head dim (flash_bwd_sm90_kernel.cuh), or void
// where only the mma.sync kernels exist. It takes the place of the mma.sync
// kernels wherever the device runs its sm_90a body (same work plan: kBlockN
// matches); FASTATTN_BWD_SM90=0 forces the mma.sync kernels.
template <int kHeadDim>
struct BwdSm90Config {
  using Traits = void;
};
template <>
struct BwdSm90Config<64> {
  using Traits = BwdSm90Traits<64, 128>;
};
template <>
struct BwdSm90Config<128> {
  using Traits = BwdSm90Traits<128, 64>;
};

// The warp-specialized sm90 kernel per head dim (flash_bwd_ws_kernel.cuh),
// or void: same work plan and CTAs as the sm90 kernel, which it replaces
// wherever the copy engine can address the tensors (block-sparse schedules:
// see launch_bwd_ws); FASTATTN_BWD_WS=0 keeps the sm90 kernel.
template <int kHeadDim>
struct BwdWsConfig {
  using Traits = void;
};
// Q / dO ring depth per head dim: a tuning hook (-DFASTATTN_BWD_WS_STAGES_128=3
// through FASTATTN_NVCC_EXTRA) for A/B builds.
#ifndef FASTATTN_BWD_WS_STAGES_64
#define FASTATTN_BWD_WS_STAGES_64 2
#endif
#ifndef FASTATTN_BWD_WS_STAGES_128
#define FASTATTN_BWD_WS_STAGES_128 2
#endif
template <>
struct BwdWsConfig<64> {
  using Traits = BwdWsTraits<64, 128, FASTATTN_BWD_WS_STAGES_64>;
};
template <>
struct BwdWsConfig<128> {
  using Traits = BwdWsTraits<128, 64, FASTATTN_BWD_WS_STAGES_128>;
};

// Launches the warp-specialized backward where the device runs it and the
// copy engine can address q, k, v and dout; false (nothing launched) otherwise.
template <typename Traits, typename Elem>
bool launch_bwd_ws(const BwdParams& p, int cta_group, const dim3& grid, cudaStream_t stream,
                   cudaError_t* err) {
  auto kernel = flash_bwd_ws_kernel<Traits, Elem>;
  const void* kfn = reinterpret_cast<const void*>(kernel);
  const char* sm90_env = std::getenv("FASTATTN_BWD_SM90");
  // FASTATTN_BWD_WS=0: never; =1: also block-sparse schedules, which otherwise
  // stay on the sm90 kernel: at 6.25% and 3% density (a few query blocks per
  // CTA) this kernel's per-CTA setup made it 5-6% slower there (H100), while
  // dense and denser masks gain up to 9%.
  const char* ws_env = std::getenv("FASTATTN_BWD_WS");
  if (p.sparse.num != nullptr && (ws_env == nullptr || ws_env[0] != '1')) return false;
  if ((sm90_env != nullptr && sm90_env[0] == '0') || p.smem_optin < Traits::kSmemBytes ||
      !sm90_body_runnable<Traits, Elem>(kfn, Traits::kThreads, "FASTATTN_BWD_WS")) {
    return false;
  }
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t rows_q = varlen ? p.total_q : p.seqlen_q;
  const int64_t rows_k = varlen ? p.total_k : p.seqlen_k;
  constexpr int64_t kMaxRows = (int64_t{1} << 31) - 2 * 256;  // tile rows are int32
  if (rows_q <= 0 || rows_k <= 0 || rows_q > kMaxRows || rows_k > kMaxRows) return false;
  const int cb = varlen ? 1 : p.batch;
  BwdWsArgs a;
  a.cta_group = cta_group;
  a.grid_x = static_cast<int>(grid.x);
  a.grid_y = static_cast<int>(grid.y);
  a.grid_z = p.batch;  // CTA numbers go past the launch grid's 65535 limit
  const int64_t ctas = int64_t(a.grid_x) * a.grid_y * a.grid_z;
  if (ctas > INT_MAX) return false;
  // FASTATTN_BWD_WS_PERSISTENT=1: one CTA per SM walking the CTA numbers (dev
  // A/B switch; no faster dense, and 10-15% slower on sparse masks below 10%
  // density on the H100: the static round robin balances the CTAs' unequal
  // query lists worse than the hardware's CTA scheduler).
  const char* persistent_env = std::getenv("FASTATTN_BWD_WS_PERSISTENT");
  const int sms = p.num_sms > 0 ? p.num_sms : 132;
  const bool persistent = persistent_env != nullptr && persistent_env[0] == '1';
  const int launch = persistent && ctas > sms ? sms : static_cast<int>(ctas);
  if (!encode_head_rows_map(a.q_tma, p.q, p.head_dim, p.heads_q, rows_q, cb, p.q_batch_stride,
                            p.q_row_stride, p.q_head_stride, Traits::kBlockM) ||
      !encode_head_rows_map(a.do_tma, p.dout, p.head_dim, p.heads_q, rows_q, cb,
                            p.do_batch_stride, p.do_row_stride, p.do_head_stride,
                            Traits::kBlockM) ||
      !encode_head_rows_map(a.k_tma, p.k, p.head_dim, p.heads_kv, rows_k, cb, p.k_batch_stride,
                            p.k_row_stride, p.k_head_stride, Traits::kBlockN) ||
      !encode_head_rows_map(a.v_tma, p.v, p.head_dim, p.heads_kv, rows_k, cb, p.v_batch_stride,
                            p.v_row_stride, p.v_head_stride, Traits::kBlockN)) {
    return false;
  }
  *err = ensure_smem_cap<Traits, Elem>(kfn, Traits::kSmemBytes);
  if (*err != cudaSuccess) return true;
  kernel<<<launch, Traits::kThreads, Traits::kSmemBytes, stream>>>(p, a);
  *err = cudaGetLastError();
  return true;
}

// Developer switches for A/B timings, from the environment variable
// FASTATTN_BWD_DEV (read once; a comma list): "classic" never takes the paired
// layout, "x_order" keeps the plain launch order (cta_group 1), "no_skew"
// never takes PairedSkew. Unset: none of these.
enum : int { kBwdDevClassic = 1, kBwdDevXOrder = 2, kBwdDevNoSkew = 4 };
inline int bwd_dev_flags() {
  static const int flags = [] {
    const char* e = std::getenv("FASTATTN_BWD_DEV");
    int f = 0;
    if (e != nullptr) {
      if (std::strstr(e, "classic") != nullptr) f |= kBwdDevClassic;
      if (std::strstr(e, "x_order") != nullptr) f |= kBwdDevXOrder;
      if (std::strstr(e, "no_skew") != nullptr) f |= kBwdDevNoSkew;
    }
    return f;
  }();
  return flags;
}

// CTA order (the kernel's cta_group): for masks that make the KV blocks'
// work unequal (causal, windows), group the (head slot, batch) units so that a
// group holds at least ~one wave of CTAs (power of two >= num_sms / KV
// blocks), at most as many units as keep the group's Q + dO (2 B) and
// dq_accum (4 B) within 16 MiB of L2; 1 (plain order) for deterministic runs,
// unmasked runs and grids with a wave of KV blocks per unit.
inline int bwd_cta_group(const BwdParams& p, int num_n_blocks, int units) {
  if (p.deterministic || (p.mask.window_left < 0 && p.mask.window_right < 0)) return 1;
  if (bwd_dev_flags() & kBwdDevXOrder) return 1;
  const int sms = p.num_sms > 0 ? p.num_sms : 108;
  if (num_n_blocks >= sms || units <= 1) return 1;
  if (int64_t(num_n_blocks) * units > INT_MAX) return 1;
  int want = 1;
  while (want * num_n_blocks < sms) want *= 2;
  const int64_t unit_bytes = int64_t(p.seqlen_q) * p.head_dim * p.heads_per_cta * 8;
  int cap = 1;
  while (cap < want && int64_t(cap) * 2 * unit_bytes <= (int64_t(16) << 20)) cap *= 2;
  return want < cap ? want : cap;
}

template <typename Traits, typename Elem>
cudaError_t launch_bwd_kernel(const BwdParams& p, bool pipelined, int cta_group,
                              const dim3& grid, cudaStream_t stream) {
  auto kernel = flash_bwd_kernel<Traits, Elem>;
  BwdParams kp = p;
  kp.dq_pipelined = pipelined;
  const int smem = pipelined ? Traits::kSmemBytesPipelined : Traits::kSmemBytes;
  if (smem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, Traits::kThreads, smem, stream>>>(kp, cta_group);
  return cudaGetLastError();
}

template <int kHeadDim, ElemType kDtype>
cudaError_t run_bwd_hdim(const BwdParams& p, cudaStream_t stream) {
  using Elem = typename ElemOf<kDtype>::type;
  using Traits = typename BwdConfig<kHeadDim>::Traits;
  using Paired = typename BwdConfig<kHeadDim>::Paired;
  using PairedSkew = typename BwdConfig<kHeadDim>::PairedSkew;
  static_assert(Paired::kBlockN == Traits::kBlockN, "the work plan assumes one kBlockN");
  if (p.batch <= 0 || p.seqlen_k <= 0 || p.heads_q <= 0) return cudaSuccess;
  if (p.head_dim > kHeadDim || p.heads_per_cta <= 0 ||
      (p.heads_q / p.heads_kv) % p.heads_per_cta != 0) {
    return cudaErrorInvalidValue;
  }
  const int num_n_blocks = (p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  const int grid_x = p.deterministic ? p.dq_splits : num_n_blocks;
  if (grid_x <= 0) return cudaErrorInvalidValue;
  // KV blocks on x (fastest: neighbouring CTAs share the same Q/dO in L2),
  // then head slots, then sequences (the kernel loops past 65535).
  const dim3 grid(grid_x, p.heads_q / p.heads_per_cta, p.batch < 65535 ? p.batch : 65535);
  const int cta_group = bwd_cta_group(p, grid.x, grid.y * grid.z);
  using WsTraits = typename BwdWsConfig<kHeadDim>::Traits;
  if constexpr (!std::is_void<WsTraits>::value) {
    static_assert(WsTraits::kBlockN == Traits::kBlockN, "the work plan assumes one kBlockN");
    cudaError_t err = cudaSuccess;
    if (launch_bwd_ws<WsTraits, Elem>(p, cta_group, grid, stream, &err)) return err;
  }
  using Sm90Traits = typename BwdSm90Config<kHeadDim>::Traits;
  if constexpr (!std::is_void<Sm90Traits>::value) {
    static_assert(Sm90Traits::kBlockN == Traits::kBlockN, "the work plan assumes one kBlockN");
    auto kernel = flash_bwd_sm90_kernel<Sm90Traits, Elem>;
    if (p.smem_optin >= Sm90Traits::kSmemBytes &&
        sm90_body_runnable<Sm90Traits, Elem>(reinterpret_cast<const void*>(kernel),
                                             Sm90Traits::kThreads, "FASTATTN_BWD_SM90")) {
      cudaError_t err = ensure_smem_cap<Sm90Traits, Elem>(reinterpret_cast<const void*>(kernel),
                                                          Sm90Traits::kSmemBytes);
      if (err != cudaSuccess) return err;
      kernel<<<grid, Sm90Traits::kThreads, Sm90Traits::kSmemBytes, stream>>>(p, cta_group);
      return cudaGetLastError();
    }
  }
  if constexpr (Paired::kPaired) {
    if (p.smem_optin >= Paired::kSmemBytes && !(bwd_dev_flags() & kBwdDevClassic)) {
      if constexpr (PairedSkew::kSkewDQ) {
        const int q_blocks = (p.seqlen_q + Paired::kBlockM - 1) / Paired::kBlockM;
        if (q_blocks >= kSkewMinQueryBlocks && p.smem_optin >= PairedSkew::kSmemBytes &&
            !(bwd_dev_flags() & kBwdDevNoSkew)) {
          return launch_bwd_kernel<PairedSkew, Elem>(p, true, cta_group, grid, stream);
        }
      }
      return launch_bwd_kernel<Paired, Elem>(p, true, cta_group, grid, stream);
    }
  }
  // The pipelined dQ (one barrier per iteration) needs a second dS^T buffer.
  const bool pipelined = Traits::kPipelineDQ && p.smem_optin >= Traits::kSmemBytesPipelined;
  return launch_bwd_kernel<Traits, Elem>(p, pipelined, cta_group, grid, stream);
}

}  // namespace gpu
}  // namespace fastattn

// Explicit instantiation for one (head dim, dtype); used by the .cu files.
#define FASTATTN_INSTANTIATE_BWD(HDIM, DTYPE)                                              \
  template cudaError_t fastattn::gpu::run_bwd_hdim<HDIM, fastattn::ElemType::DTYPE>(       \
      const fastattn::BwdParams&, cudaStream_t);

// Suppresses implicit instantiation where the dispatch refers to them.
#define FASTATTN_EXTERN_BWD(HDIM, DTYPE)                                                   \
  extern template cudaError_t fastattn::gpu::run_bwd_hdim<HDIM, fastattn::ElemType::DTYPE>( \
      const fastattn::BwdParams&, cudaStream_t);
