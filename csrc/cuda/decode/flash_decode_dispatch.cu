// Decode dispatch: runtime (head dim, dtype) -> compiled instantiation, the
// launch plan (pipeline depth from the device's shared memory, split count
// from SMs / batch / heads / length), and the split combine through the
// merge kernel. Host-side sizes only: nothing here reads device data.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "cuda/common/compiled_variants.h"
#include "cuda/decode/decode_launch.h"
#include "cuda/decode/flash_decode_kernel.cuh"

namespace fastattn {
namespace gpu {
namespace {

constexpr int kMaxSplits = 128;

// Tile facts of the kernel instantiated for head dim d (0 / 64 for others).
struct DecodeTile {
  int stage_bytes;      // one ring stage: a K and a V tile
  int block_n;          // keys per stage
  int tma_stage_bytes;  // the same for the TMA variant (0: none for this head dim)
  int tma_fixed_bytes;  // its shared memory beside the stages (alignment, barriers)
};

template <int kD>
constexpr DecodeTile tile_of(bool fp8) {
  if (fp8) return {DecodeTraits<kD, 1>::kStageBytes, DecodeTraits<kD, 1>::kBlockN, 0, 0};
  DecodeTile t{DecodeTraits<kD>::kStageBytes, DecodeTraits<kD>::kBlockN, 0, 0};
  if constexpr (decode_has_tma(kD)) {
    t.tma_stage_bytes = DecodeTmaTraits<kD>::kStageBytes;
    t.tma_fixed_bytes = DecodeTmaTraits<kD>::smem_bytes(0);
  }
  return t;
}

DecodeTile decode_tile(int d, KvKind kv) {
  const bool fp8 = kv != KvKind::kSame;
  switch (d) {
    case 32: return tile_of<32>(fp8);
    case 64: return tile_of<64>(fp8);
    case 96: return tile_of<96>(fp8);
    case 128: return tile_of<128>(fp8);
    case 192: return tile_of<192>(fp8);
    case 256: return tile_of<256>(fp8);
    default: return {0, 64, 0, 0};
  }
}

// Dynamic shared memory of a ring of `stages` stages of any variant.
int ring_smem(int d, int stages, bool tma, KvKind kv) {
  const DecodeTile t = decode_tile(d, kv);
  return tma ? stages * t.tma_stage_bytes + t.tma_fixed_bytes : stages * t.stage_bytes;
}

int ctas_per_sm(int d, ElemType t, int stages, bool paged, bool tma, KvKind kv) {
  return visit_compiled_variant(d, t, 0, [&](auto hd, auto dt) {
    return decode_ctas_per_sm<decltype(hd)::value, decltype(dt)::value>(stages, paged, tma, kv);
  });
}

int hdim_index(int d) {
  for (int i = 0; i < 6; ++i)
    if (kKernelHeadDims[i] == d) return i;
  return -1;
}

// Whether decode reads K/V through the sm90 copy engine: contiguous caches,
// a head dim with a TMA variant, a device that runs its sm90 code; not when
// FASTATTN_DECODE_TMA=0 (read per call: a dev A/B switch and an escape hatch).
bool use_tma(int d, ElemType t, bool paged, KvKind kv) {
  if (paged || kv != KvKind::kSame || !decode_has_tma(d)) return false;
  const char* env = std::getenv("FASTATTN_DECODE_TMA");
  if (env != nullptr && env[0] == '0') return false;
  static signed char cache[64][2][2];  // [device][head dim 64 / 128][dtype]: 0 unknown, 1 yes, -1 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  const int di = d == 64 ? 0 : 1;
  const int ti = t == ElemType::kFloat16 ? 0 : 1;
  if (device < 64 && cache[device][di][ti] != 0) return cache[device][di][ti] > 0;
  const bool ok = visit_compiled_variant(d, t, false, [](auto hd, auto dt) {
    return decode_tma_runnable<decltype(hd)::value, decltype(dt)::value>();
  });
  if (device < 64) cache[device][di][ti] = ok ? 1 : -1;
  return ok;
}

// Ring depth and resident CTAs per SM for (device, head dim, dtype), cached:
// the depth that keeps the most K/V bytes in flight per SM
// (resident CTAs x (stages - 1) stages), more resident CTAs on ties.
struct RingChoice {
  int stages = 0;
  int ctas = 0;
};

RingChoice ring_choice(int d, ElemType t, bool paged, bool tma, KvKind kv) {
  static RingChoice cache[64][6][2][2][2][3];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return {};
  const int hi = hdim_index(d);
  const int ti = t == ElemType::kFloat16 ? 0 : 1;
  const int pi = paged ? 1 : 0;
  const int mi = tma ? 1 : 0;
  const int ki = static_cast<int>(kv);
  if (device < 64 && hi >= 0 && cache[device][hi][ti][pi][mi][ki].stages > 0)
    return cache[device][hi][ti][pi][mi][ki];
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess)
    return {};
  const int sb = tma ? decode_tile(d, kv).tma_stage_bytes : decode_tile(d, kv).stage_bytes;
  RingChoice best;
  int64_t best_score = -1;
  for (int s = 2; s <= 4; ++s) {
    if (ring_smem(d, s, tma, kv) > optin) break;
    const int ctas = ctas_per_sm(d, t, s, paged, tma, kv);
    if (ctas <= 0) continue;
    const int64_t score = static_cast<int64_t>(ctas) * (s - 1) * sb;
    if (score > best_score || (score == best_score && ctas > best.ctas)) {
      best_score = score;
      best.stages = s;
      best.ctas = ctas;
    }
  }
  if (device < 64 && hi >= 0 && best.stages > 0) cache[device][hi][ti][pi][mi][ki] = best;
  return best;
}

// Resident clusters of `cluster` CTAs (see decode_max_clusters), cached per
// (device, head dim, dtype, variant, ring depth, cluster size).
int max_clusters(int d, ElemType t, int stages, bool paged, bool tma, KvKind kv, int cluster) {
  // [device][head dim][dtype][paged][tma][16-bit / fp8 cache][stages - 2][cluster]
  static signed char cache[16][6][2][2][2][2][3][kMaxClusterSplits + 1];  // n + 1; 0 unknown
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  const int hi = hdim_index(d);
  if (cluster < 2 || cluster > kMaxClusterSplits || stages < 2 || stages > 4 || hi < 0) return 0;
  signed char* slot = device < 16 ? &cache[device][hi][t == ElemType::kFloat16 ? 0 : 1]
                                          [paged ? 1 : 0][tma ? 1 : 0][kv != KvKind::kSame ? 1 : 0]
                                          [stages - 2][cluster]
                                  : nullptr;
  if (slot != nullptr && *slot != 0) return *slot - 1;
  int n = visit_compiled_variant(d, t, 0, [&](auto hd, auto dt) {
    return decode_max_clusters<decltype(hd)::value, decltype(dt)::value>(stages, paged, tma, kv,
                                                                         cluster);
  });
  if (n > 126) n = 126;
  if (slot != nullptr) *slot = static_cast<signed char>(n + 1);
  return n;
}

// Whether the splits merge inside a cluster instead of through the combine
// kernel: sm90 machine code, 2..kClusterCombineMaxSplits splits, and the
// device holds clusters of that size for at least as many CTAs as would run
// at once without clusters (clusters must not cost occupancy). Measured on the
// H100 (Hkv=8, D=128, bf16): B=8 x 8k, 2 splits, 94.0 -> 92.7 us (no merge
// launch, no fp32 partials in global memory); but 16 splits at B=1 x 64k,
// 94 -> 98-115 us, and 8 splits are too few CTAs there: large clusters
// crowd a GPC's SMs (the CTAs of one cluster share a GPC, two per SM where
// shared memory allows). FASTATTN_DECODE_CLUSTER=0 turns it off (read per
// call: a dev A/B switch and an escape hatch).
constexpr int kClusterCombineMaxSplits = 4;
bool use_cluster_combine(const DecodeParams& p, const DecodePlan& plan) {
  if (plan.num_splits < 2 || plan.num_splits > kMaxClusterSplits) return false;
  const char* env = std::getenv("FASTATTN_DECODE_CLUSTER");
  if (env != nullptr && env[0] == '0') return false;
  if (plan.num_splits > kClusterCombineMaxSplits) return false;
  const bool paged = p.block_table != nullptr;
  const int n = max_clusters(plan.kernel_head_dim, p.dtype, plan.stages, paged, plan.use_tma,
                             p.kv_kind, plan.num_splits);
  if (n <= 0) return false;
  const int64_t grid_ctas = static_cast<int64_t>(plan.num_m_blocks) * plan.num_splits *
                            p.heads_kv * p.batch;
  int64_t resident = static_cast<int64_t>(p.num_sms > 0 ? p.num_sms : 1) * plan.ctas_per_sm;
  if (grid_ctas < resident) resident = grid_ctas;
  return static_cast<int64_t>(n) * plan.num_splits >= resident;
}

// Programmatic dependent launches (the decode kernel after whatever precedes
// it in the stream, the combine after the decode kernel): sm90+ and not
// disabled by FASTATTN_DECODE_PDL=0 (read per call: a dev A/B switch and an
// escape hatch).
bool decode_pdl() {
  const char* env = std::getenv("FASTATTN_DECODE_PDL");
  if (env != nullptr && env[0] == '0') return false;
  static int major[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= 64) return false;
  if (major[device] == 0) {
    int m = 0;
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
      return false;
    major[device] = m;
  }
  return major[device] >= 9;
}

// Fraction of the resident CTA slots used over the waves that `ctas` CTAs take.
double wave_efficiency(int64_t ctas, int64_t slots) {
  const int64_t waves = (ctas + slots - 1) / slots;
  return static_cast<double>(ctas) / static_cast<double>(waves * slots);
}

}  // namespace

int decode_kernel_head_dim(int head_dim, ElemType dtype) {
  return compiled_kernel_head_dim(head_dim, dtype);
}

DecodePlan plan_decode(const DecodeParams& p, int requested_splits) {
  DecodePlan plan;
  plan.kernel_head_dim = decode_kernel_head_dim(p.head_dim, p.dtype);
  if (plan.kernel_head_dim == 0 || p.heads_kv <= 0) return plan;

  // GQA packing: group * seqlen_q rows; warps along M cover up to 64 rows per CTA.
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t m_total = group * p.seqlen_q;
  const int64_t m_tiles = (m_total + 15) / 16;
  plan.warps_m = m_tiles <= 1 ? 1 : (m_tiles == 2 ? 2 : 4);
  const int64_t rows_cta = 16 * plan.warps_m;
  const int64_t m_blocks = (m_total + rows_cta - 1) / rows_cta;
  plan.num_m_blocks = static_cast<int>(m_blocks > 0 ? m_blocks : 1);

  const bool paged = p.block_table != nullptr;
  const KvKind kv = p.kv_kind;
  plan.use_tma = use_tma(plan.kernel_head_dim, p.dtype, paged, kv);
  RingChoice ring = ring_choice(plan.kernel_head_dim, p.dtype, paged, plan.use_tma, kv);
  const char* stages_env = std::getenv("FASTATTN_DECODE_STAGES");
  if (const char* env = stages_env) {
    // Dev A/B switch (benchmarks only): force the ring depth when it fits.
    const int s = std::atoi(env);
    const int ctas =
        s >= 2 && s <= 4 ? ctas_per_sm(plan.kernel_head_dim, p.dtype, s, paged, plan.use_tma, kv)
                         : 0;
    if (ctas > 0) ring = RingChoice{s, ctas};
  }
  plan.stages = ring.stages;
  plan.ctas_per_sm = ring.ctas;
  plan.smem_bytes =
      ring.stages > 0 ? ring_smem(plan.kernel_head_dim, ring.stages, plan.use_tma, kv) : 0;
  if (ring.stages == 0) return plan;  // the glue reports the shared-memory shortfall

  // Keys any query may see: all of S_max, or Sq + window_left with a left window.
  int64_t eff_len = p.seqlen_k_max;
  if (p.mask.window_left >= 0) {
    const int64_t w = static_cast<int64_t>(p.seqlen_q) + p.mask.window_left;
    if (w < eff_len) eff_len = w;
  }
  const int64_t kv_block = decode_tile(plan.kernel_head_dim, kv).block_n;
  const int64_t n_blocks = eff_len > 0 ? (eff_len + kv_block - 1) / kv_block : 1;

  int splits = 1;
  if (requested_splits > 0) {
    splits = requested_splits;
    if (splits > n_blocks) splits = static_cast<int>(n_blocks);
    if (splits > 1024) splits = 1024;
  } else {
    // Enough CTAs to use >= 95% of one CTA per SM, each split keeping >= 2 key
    // blocks; no split once the batch alone fills the GPU. One CTA per SM, not
    // every resident slot: a CTA's cp.async ring already keeps enough bytes in
    // flight to saturate HBM, and each extra split costs combine traffic. On an
    // H200 (132 SMs, Hkv=8, D=128) the measured best split counts were 16 for
    // B=1, 2 for B=8 and 1 for B=16 at 32k: about one CTA per SM in total.
    const int64_t base = static_cast<int64_t>(p.batch) * p.heads_kv * plan.num_m_blocks;
    int64_t slots = static_cast<int64_t>(p.num_sms > 0 ? p.num_sms : 1);
    int64_t max_s = n_blocks / 2;
    if (max_s > kMaxSplits) max_s = kMaxSplits;
    // A paged cache costs more instructions per tile (a table read and an
    // address per row), and decode runs few warps per SM, so it is partly
    // issue-bound: when the batch leaves SMs idle, aim for two CTAs per SM,
    // unless there are so few (sequence, KV head) pairs that one CTA per SM
    // already cuts each into many splits (then the per-CTA costs of more
    // splits win), or a split would keep < 24 key blocks. Measured on H200 at
    // Hkv=8, D=128, page size 16: B=8 x 8k 79 -> 76 us (4 splits instead of
    // 2), B=16 x 32k 717 -> 521 us (2 instead of 1); B=1 x 64k 94 -> 86 us and
    // B=1 x 128k 162 -> 156 us with one CTA per SM (16 splits, not 33).
    // (Measured with 64-key blocks: the limit is kept in keys.)
    // 64-row CTAs (GQA groups times several queries: speculative rows, the
    // prefix part of cascade attention) do 16x the MMA work per key of a
    // single-query CTA and are latency-bound, not bandwidth-bound: two per SM.
    // Measured on H100 (paged, Hkv=8, D=128, 64 queries x group 4 over 8k
    // keys): 4 splits (one CTA per SM) 166 us, 8 splits 62 us, 16 splits 72 us.
    const bool heavy_rows = plan.warps_m == 4 && plan.ctas_per_sm >= 2;
    if (heavy_rows && base < slots && max_s > 1) {
      slots *= 2;
    } else if (p.block_table != nullptr && base < slots && 4 * base >= slots && max_s > 1 &&
               n_blocks * kv_block * base / (2 * slots) >= 24 * 64) {
      slots *= 2;
    }
    if (base < slots && max_s > 1) {
      double best_eff = wave_efficiency(base, slots);
      int best_s = 1;
      // Fill >= 95% of the slots: an idle SM costs more than one more split
      // (H200, B=1 x 16k: 16 splits 25.1 us, 15 splits 26.4 us; paged B=1 x 64k
      // 14 -> 16 splits 94 -> 86 us).
      const double target = 0.95;
      for (int64_t s = 1; s <= max_s; ++s) {
        const double e = wave_efficiency(base * s, slots);
        if (e >= target) {
          best_s = static_cast<int>(s);
          break;
        }
        if (e > best_eff + 1e-9) {
          best_eff = e;
          best_s = static_cast<int>(s);
        }
      }
      splits = best_s;
    }
  }
  plan.num_splits = splits < 1 ? 1 : splits;
  if (plan.use_tma && stages_env == nullptr) {
    // The copy engine needs one stage in flight per CTA, not the most bytes:
    // when the grid is at most two CTAs per SM, a 2-stage ring beats the
    // deeper one (H100, Hkv=8, D=128, bf16: B=16 x 32k 695 -> 683 us,
    // B=1 x 64k 95.7 -> 94.2 us, B=1 x 128k 183.5 -> 179.6 us). Larger grids
    // keep the deeper ring: it fills the SMs in fewer waves (B=64 x 2k, 512
    // CTAs: 180.5 us with 3 stages, 185 with 2).
    const int64_t grid = static_cast<int64_t>(p.batch) * p.heads_kv * plan.num_m_blocks *
                         plan.num_splits;
    const int ctas2 = ctas_per_sm(plan.kernel_head_dim, p.dtype, 2, paged, true, kv);
    if (grid <= 2 * static_cast<int64_t>(p.num_sms > 0 ? p.num_sms : 1) && ctas2 > 0) {
      plan.stages = 2;
      plan.ctas_per_sm = ctas2;
      plan.smem_bytes = ring_smem(plan.kernel_head_dim, 2, true, kv);
    }
  }
  plan.combine_in_cluster = use_cluster_combine(p, plan);
  if (plan.num_splits > 1 && !plan.combine_in_cluster) {
    plan.o_partial_elems = static_cast<int64_t>(plan.num_splits) * p.batch * p.seqlen_q *
                           p.heads_q * p.head_dim;
    plan.lse_partial_elems =
        static_cast<int64_t>(plan.num_splits) * p.batch * p.heads_q * p.seqlen_q;
  }
  return plan;
}

void apply_decode_plan(DecodeParams& p, const DecodePlan& plan) {
  p.num_splits = plan.num_splits;
  p.num_m_blocks = plan.num_m_blocks;
  p.warps_m = plan.warps_m;
  p.stages = plan.stages;
  p.use_tma = plan.use_tma;
  p.combine_in_cluster = plan.combine_in_cluster;
}

cudaError_t run_decode(const DecodeParams& p, cudaStream_t stream) {
  const int d = decode_kernel_head_dim(p.head_dim, p.dtype);
  if (d == 0) return cudaErrorNotSupported;
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.heads_q <= 0) return cudaSuccess;
  const bool combine_kernel = p.num_splits > 1 && !p.combine_in_cluster;
  if (combine_kernel) {
    // The combine writes out (B, Sq, Hq, D) / lse (B, Hq, Sq) contiguous.
    const int64_t hd = p.head_dim;
    if (p.o_head_stride != hd || p.o_row_stride != hd * p.heads_q ||
        p.o_batch_stride != hd * p.heads_q * p.seqlen_q || p.lse_head_stride != p.seqlen_q ||
        p.lse_batch_stride != static_cast<int64_t>(p.heads_q) * p.seqlen_q) {
      return cudaErrorInvalidValue;
    }
  }
  const bool pdl = decode_pdl();
  cudaError_t err = visit_compiled_variant(d, p.dtype, cudaErrorNotSupported, [&](auto hd, auto dt) {
    return run_decode_hdim<decltype(hd)::value, decltype(dt)::value>(p, stream, pdl);
  });
  if (err != cudaSuccess || !combine_kernel) return err;

  // Combine: merge the num_splits fp32 partials (o_partial / lse_partial layouts
  // of DecodeParams) into out / lse with the one merge kernel.
  const int64_t hd = p.head_dim;
  const int64_t hq = p.heads_q, sq = p.seqlen_q, bsz = p.batch;
  MergeParams m;
  m.two_views = false;
  m.num_parts = p.num_splits;
  m.in[0] = p.o_partial;
  m.in_part_stride = bsz * sq * hq * hd;
  m.in_outer_stride[0] = sq * hq * hd;
  m.in_seq_stride[0] = hq * hd;
  m.in_head_stride[0] = hd;
  m.lse_in[0] = p.lse_partial;
  m.lse_part_stride = bsz * hq * sq;
  m.lse_outer_stride[0] = hq * sq;
  m.lse_head_stride[0] = sq;
  m.lse_seq_stride[0] = 1;
  m.out = p.out;
  m.lse_out = p.lse;
  m.outer = bsz;
  m.seqlen = p.seqlen_q;
  m.heads = p.heads_q;
  m.head_dim = p.head_dim;
  m.in_type = MergeType::kFloat32;
  m.out_type = p.dtype == ElemType::kFloat16 ? MergeType::kFloat16 : MergeType::kBFloat16;
  return run_merge(m, stream, pdl);
}

}  // namespace gpu
}  // namespace fastattn
