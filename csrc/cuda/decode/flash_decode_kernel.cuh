// Split-KV decode kernel (flash-decoding) for sm80+: a few query tokens per
// sequence against a long KV cache. Memory-bound: the design goal is to keep
// enough K/V bytes in flight per SM and to read each cache byte once.
//
// One CTA (4 warps) handles one (m-block, split, KV head, sequence):
//   - GQA packing: the rows of the tile are (query, q head of this KV head)
//     pairs, r <-> (i = r / group, head hk * group + r % group), so one pass
//     over K/V serves every query head of the group (DecodeParams).
//   - The 4 warps form a warps_m x warps_n grid (runtime; warps_m = 1 for the
//     common <= 16 rows): each warp owns one m16 row tile and, of every
//     kBlockN-key stage, the kWarpKeys-key groups c = wn, wn + warps_n, ...
//     It keeps its own online-softmax state (common/softmax.h) over its keys.
//   - K/V stream through a ring of `stages` (runtime, 2..4) shared-memory
//     stages with cp.async, stages - 1 in flight while one is computed. Q is
//     staged with the first stage in the last ring slot, then held in
//     registers as mma A fragments.
//   - DecodeTmaTraits (sm90, contiguous caches, head dims 64 / 128): the same
//     ring filled by the copy engine instead (one TMA box per 64 columns of
//     K and V per stage, issued by thread 0, an mbarrier per stage, 128-byte
//     swizzled tiles). The math is the same; only the loads and the fragment
//     addressing differ. (The copy engine streams this access pattern ~3.5%
//     faster than cp.async on the H100: scripts/dev/stream_ceiling.cu.) Q
//     goes from global memory straight into mma A fragments (no ring slot
//     waits for it).
//   - Epilogue: the warps of one row tile merge their (O, LSE) partials
//     through shared memory (the LSE-weighted merge of merge_states), then
//     write out/lse directly (num_splits == 1), or merge the splits inside a
//     thread-block cluster (sm90, a few splits: decode_cluster_combine,
//     through distributed shared memory), or write fp32 partials for the
//     combine kernel.
//   - Latency: with one CTA of 4 warps per SM (the usual decode grid), each
//     scheduler runs a single warp, so every dependent instruction of the
//     prologue and epilogue is on the critical path (H100 timeline probe,
//     B=1 x 16k: 1.6 us from CTA start to the first TMA issue, 2 us of
//     epilogue, before this was trimmed): the prologue issues the first K/V
//     stages before anything else, divisions are multiply-highs (FastDiv),
//     and the epilogue merge is branch-free and skips padding rows.
// The key range of a sequence (from its device-side length and the mask) is
// divided evenly among the splits on the device, so the launch shape depends
// only on host-known maxima (CUDA-graph safe). The only place that knows how
// K/V rows are addressed is DecodeKvLoader (decode_block_io.h): contiguous
// cache rows, or pages through a block table (kPaged, common/tile_io.h
// PagedKvTileLoader).
#pragma once
#include <cstdint>

#include "cuda/common/cluster.h"
#include "cuda/common/fp8.h"
#include "cuda/common/fragment.h"
#include "cuda/common/mask.h"
#include "cuda/common/softcap.h"
#include "cuda/common/ptx.h"
#include "cuda/common/softmax.h"
#include "cuda/common/tile_io.h"
#include "cuda/common/tma.h"
#include "cuda/common/types.h"
#include "cuda/decode/decode_params.h"
#include "cuda/decode/decode_block_io.h"
#include "cuda/decode/decode_epilogue.h"
#include "cuda/decode/decode_traits.h"

namespace fastattn {
namespace gpu {

// FP8 caches (kKv != kSame, Traits::kKvBytes == 1): the tiles hold code
// pairs and the MMA operands are made from them in registers (common/fp8.h)
// right after each ldmatrix, which reads them as 16-bit pairs:
//   K (B of Q K^T, k = head dim): a non-transposed ldmatrix gives a lane four
//     consecutive codes, head-dim columns 4c..4c+3 of a 16-column step
//     (c = lane % 4), where the mma wants columns {2c, 2c+1, 2c+8, 2c+9}.
//     The sum over the head dim does not care about order, so Q's A fragments
//     are loaded with the same permutation instead (fp8_q_frags): a[0]/a[1]
//     hold Q columns 4c, 4c+1 and a[2]/a[3] columns 4c+2, 4c+3.
//   V (B of P V, n = head dim): a transposed ldmatrix of 8 keys x 16 codes
//     gives a lane keys 2c, 2c+1 at head-dim columns 2g, 2g+1 (g = lane / 4):
//     the B fragments of two n8 tiles at once, one of the even and one of the
//     odd columns. So in the FP8 variant acc_o tile 4j + t (t = 0..3) holds
//     head-dim columns 32j + 16 (t / 2) + 2n + (t % 2) for its n8 column n,
//     and the epilogue writes them back in order (four consecutive columns
//     per lane and half-chunk).
// `phases` (TMA variant): bit s = the parity ring slot s's barrier completes
// next; carried across the sequences one CTA handles.
template <typename Traits, typename Elem, bool kPaged, KvKind kKv = KvKind::kSame>
__device__ __forceinline__ void flash_decode_block(const DecodeParams& p, char* smem, int b,
                                                   int hk, int m_block, int split,
                                                   uint32_t& phases) {
  constexpr bool kTma = Traits::kTma;
  constexpr bool kFp8 = kKv != KvKind::kSame;
  static_assert(!(kTma && kPaged), "the TMA variant reads contiguous caches");
  static_assert(kFp8 == (Traits::kKvBytes == 1) && !(kFp8 && kTma), "FP8 tiles, cp.async loads");
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kNWarps = Traits::kNWarps;
  constexpr int DT = Traits::kDT;
  constexpr int KS = Traits::kKS;
  constexpr int kWarpKeys = Traits::kWarpKeys;
  constexpr int NT = kWarpKeys / 8;
  constexpr int kOStride = Traits::kOStride;
  using KTile = typename Traits::KTile;
  using VTile = typename Traits::VTile;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // warps_m and kNWarps are powers of two: shifts, not divisions.
  const int wn_bits = (31 - __clz(kNWarps)) - (31 - __clz(p.warps_m));
  const int warps_n = 1 << wn_bits;
  const int wm = warp >> wn_bits;
  const int wn = warp & (warps_n - 1);

  // The prologue runs one warp per scheduler, so its latency is exposed: it
  // issues the loads first (the sequence length, the first K/V stages, Q)
  // and keeps divisions off the way to them (FastDiv).
  const FastDiv& group = p.group_div;
  const DecodeSeq seq = decode_seq(p, b);
  const int m_total = static_cast<int>(group.d) * seq.sq;
  const int rows_cta = 16 * p.warps_m;
  const int m0 = m_block * rows_cta;
  const int m_end = m0 + rows_cta < m_total ? m0 + rows_cta : m_total;
  // > m0 by the host grid, unless the queries are ragged: a sequence with
  // fewer rows leaves this m-block (and every split of it, so a cluster
  // leaves together) without work.
  if (m_end <= m0) return;
  // Score / output scales of this (sequence, KV head). FP8: scores are Q times
  // the codes, so the K scale (and fp16's fold, common/fp8.h) joins the
  // softmax scale, and softcap's raw-score constants with it (softcap.h:
  // in = scale / c, out = c / scale); the V scale multiplies the output.
  float scale = p.scale, scale_log2 = p.scale_log2;
  float cap_in = p.softcap_in, cap_out = p.softcap_out;
  float v_mult = 1.f;
  if constexpr (kFp8) {
    constexpr float kFold = kFp8Fold<Elem, kKv>;
    const float kd = (p.k_descale != nullptr ? __ldg(p.k_descale + b * p.k_descale_batch_stride +
                                                     hk * p.k_descale_head_stride)
                                             : 1.f) * kFold;
    const float vd = (p.v_descale != nullptr ? __ldg(p.v_descale + b * p.v_descale_batch_stride +
                                                     hk * p.v_descale_head_stride)
                                             : 1.f) * kFold;
    scale *= kd;
    scale_log2 *= kd;
    cap_in *= kd;
    cap_out = kd > 0.f ? cap_out / kd : 0.f;
    // A negative factor would flip the softmax's max (the kernels need
    // scale >= 0): poison the output instead of returning a wrong answer.
    v_mult = kd >= 0.f && vd >= 0.f ? vd : __int_as_float(0x7fffffff);
  }

  smem = decode_ring<Traits>(smem);
  const uint32_t smem_base = ptx::smem_u32(smem);
  const int stages = p.stages;
  const int i_lo = fast_div(group, m0);
  const int i_hi = fast_div(group, m_end - 1);
  MaskParams mp = p.mask;
  mp.bottom_right = true;
  const MaskPolicy mask = MaskPolicy::make(mp, seq.sq, seq.sk);
  const KeyBlockRange blocks =
      decode_key_blocks(mask, seq.sq, p.split_div, split, i_lo, i_hi, kBlockN);
  const int n_iters = blocks.end - blocks.begin;
  if constexpr (kTma) {
    if (tid == 0) {
      for (int st = 0; st < stages - 1 && st < n_iters; ++st)
        decode_tma_issue<Traits>(p, smem_base, st, blocks.begin + st, hk, seq.cb, seq.k0);
    }
  }
  // Q rows of this CTA. The TMA variant loads them straight into registers
  // (issued after the first stages, first used by the first MMA): no ring
  // slot holds Q, so every slot streams K/V from the start.
  const GqaQueryRows<Elem> q_rows{static_cast<const Elem*>(p.q) + b * p.q_batch_stride +
                                      static_cast<int64_t>(seq.q0) * p.q_row_stride +
                                      static_cast<int64_t>(hk) * static_cast<int>(group.d) *
                                          p.q_head_stride,
                                  group, p.q_row_stride, p.q_head_stride};

  // This thread's C-fragment rows (g and g + 8 of the warp's m16 tile) and
  // their visible key ranges; padding rows (>= m_end) see nothing.
  // ALiBi (flash-attn's -slope * |i + sk - sq - j|): per row, the slope in
  // raw-score units (its head is r % group) and the key at distance 0.
  int key_lo[2], key_hi[2];
  float alibi_slope[2] = {0.f, 0.f}, alibi_diag[2] = {0.f, 0.f};
  // Tree mask: each row's bits over the draft keys [draft0, sk) (all set: no tree).
  const bool tree = p.tree_mask != nullptr;
  const int draft0 = seq.sk - seq.sq;
  uint64_t tree_bits[2] = {~0ull, ~0ull};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = m0 + wm * 16 + (lane >> 2) + 8 * h;
    if (r < m_end) {
      const int i = fast_div(group, r);
      key_lo[h] = mask.key_begin(i);
      key_hi[h] = mask.key_end(i);
      if (tree) tree_bits[h] = __ldg(p.tree_mask + seq.b * p.tree_mask_batch_stride + i);
      if (p.alibi_slopes != nullptr) {
        const int head = hk * static_cast<int>(group.d) + (r - i * static_cast<int>(group.d));
        alibi_slope[h] = __ldg(p.alibi_slopes + seq.b * p.alibi_batch_stride + head) / scale;
        alibi_diag[h] = float(i + seq.sk - seq.sq);
      }
    } else {
      key_lo[h] = 0;
      key_hi[h] = 0;
    }
  }
  // Keys that every row of the CTA sees: chunks inside need no element mask.
  // (With a tree mask the draft keys always take the element mask.)
  const int full_lo = mask.key_begin(i_hi);
  const int full_hi = tree ? min(mask.key_end(i_lo), draft0) : mask.key_end(i_lo);

  float acc_o[1][DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[0][dt][e] = 0.f;
  OnlineSoftmax<1> softmax;
  softmax.init();

  if (n_iters > 0) {
    // (The TMA variant never uses it: the cp.async loader of the same head dim.)
    // FP8 tiles are copied as 16-bit code pairs.
    using LoadElem = std::conditional_t<kFp8, uint16_t, Elem>;
    DecodeKvLoader<DecodeTraits<Traits::kHeadDim, Traits::kKvBytes>, LoadElem, kPaged> kv;
    uint32_t q_frag[KS][4];
    if constexpr (!kTma) {
      kv.init(p, seq, hk, tid);
      // Prologue: Q into the last ring slot (free until the loop's first
      // refill, which follows a block barrier) with stage 0 in group 0,
      // stages 1..S-2 in their own groups (empty groups past the range keep
      // the count uniform). Not the TMA variant's direct register loads of
      // Q: with them this kernel ran 22% slower on the H100 (ncu, paged,
      // page size 16, B=1 x 64k: 102 -> 124 us, same grid, shared memory
      // and bytes, 1% more instructions, DRAM 78% -> 64% busy; cause not
      // found in the SASS, whose key loop differs only in scheduling).
      using QTile = typename Traits::QTile;
      const uint32_t q_addr = smem_base + (stages - 1) * Traits::kStageBytes;
      load_tile_async<kThreads, QTile>(q_addr, q_rows, m0, m_end, p.head_dim, tid);
      for (int st = 0; st < stages - 1; ++st) {
        if (st < n_iters) kv.load(smem_base + st * Traits::kStageBytes, blocks.begin + st);
        ptx::cp_async_commit();
      }
      cp_async_wait_dyn(stages - 2);
      __syncthreads();  // Q and stage 0 visible
      if constexpr (kFp8) {
        fp8_q_frags<QTile, KS>(q_frag, q_addr, wm * 16, lane);
      } else {
        const int a_off = a_lane_offset<QTile>(lane) + QTile::offset(wm * 16, 0);
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) load_a<QTile>(q_frag[kk], q_addr, a_off, 0, kk * 16);
      }
    } else {
      // (The loop's first block barrier also publishes the ring barriers'
      // initialization, see the kernel.)
      load_q_frags<Elem>(q_frag, q_rows, m0 + wm * 16, m_end, p.head_dim, lane);
    }

    int b_off = 0, v_off = 0;
    SwizzledLane k_sw{0, 0}, v_sw{0, 0};
    if constexpr (kTma) {
      k_sw = sw128_b_lane(lane);
      v_sw = sw128_b_trans_lane(lane);
    } else {
      b_off = b_lane_offset<KTile>(lane);
      v_off = b_trans_lane_offset<VTile>(lane);
    }
    const int col_lane = 2 * (lane & 3);
    // The iteration that issues this CTA's last K/V stage (the prologue
    // issues the first stages - 1): from there on the CTA only computes,
    // so it lets the next kernel of the stream be scheduled.
    const int last_issue_it = n_iters > stages - 1 ? n_iters - stages : 0;
    int slot = 0;
    for (int it = 0; it < n_iters; ++it) {
      const int nxt = it + stages - 1;
      const int ns = slot == 0 ? stages - 1 : slot - 1;  // the slot of iteration it - 1
      if constexpr (kTma) {
        __syncthreads();  // every warp is done with slot it - 1 (and Q)
        if (tid == 0 && nxt < n_iters)
          decode_tma_issue<Traits>(p, smem_base, ns, blocks.begin + nxt, hk, seq.cb, seq.k0);
        if (it == last_issue_it) allow_dependents();
        const uint32_t bar = smem_base + stages * Traits::kStageBytes + 8 * slot;
        ptx::mbar_wait(bar, (phases >> slot) & 1u);  // stage `it` landed
        phases ^= 1u << slot;
        const int rows = seq.sk - (blocks.begin + it) * kBlockN;
        if (rows < kBlockN) {  // CTA-uniform: the sequence ends in this block
          // Rows past the sequence arrived as whatever the cache holds there;
          // zero them (a masked key's V row still meets P = 0, and 0 * NaN
          // would poison P V). Rows are 128 contiguous bytes per box.
          const uint32_t st_addr = smem_base + slot * Traits::kStageBytes;
          constexpr int kChunksPerRow = 8;
          const int n_zero = (kBlockN - rows) * kChunksPerRow * 2 * KTile::kBoxes;
          for (int i = tid; i < n_zero; i += kThreads) {
            const int chunk = i % kChunksPerRow;
            const int rest = i / kChunksPerRow;
            const int row = rows + rest % (kBlockN - rows);
            const int box = rest / (kBlockN - rows);  // over K's boxes, then V's
            const uint32_t a = st_addr + box * KTile::kBoxBytes + row * 128 + chunk * 16;
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(a), "r"(0u) : "memory");
          }
          ptx::fence_proxy_async();  // before the copy engine refills this slot
          __syncthreads();
        }
      } else {
        cp_async_wait_dyn(stages - 2);
        __syncthreads();  // stage `it` visible to all; every warp is done with slot it - 1 (and Q)
        if (nxt < n_iters) kv.load(smem_base + ns * Traits::kStageBytes, blocks.begin + nxt);
        ptx::cp_async_commit();
        if (it == last_issue_it) allow_dependents();
      }
      const uint32_t k_addr = smem_base + slot * Traits::kStageBytes;
      const uint32_t v_addr = k_addr + KTile::kBytes;
      const int key0 = (blocks.begin + it) * kBlockN;

      for (int c = wn; c < Traits::kGroups; c += warps_n) {
        // S = Q K^T for keys key0 + c*kWarpKeys .. (NT n8 tiles, 2 with the
        // default 64-key stages).
        float s[1][NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[0][nt][e] = 0.f;
        const uint32_t kc = k_addr + c * kWarpKeys * KTile::kStrideBytes;
        if constexpr (kFp8) {
          // One ldmatrix: keys np*16 .. +15 x head-dim columns 32j .. 32j+31.
#pragma unroll
          for (int j = 0; j < KS / 2; ++j) {
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
              uint32_t bk[4];
              load_b_pair<KTile>(bk, kc, b_off, np * 16, j * 16);
#pragma unroll
              for (int t = 0; t < 4; ++t) {  // (n-tile 2np + t / 2, k16 step 2j + t % 2)
                ptx::mma_m16n8k16<Elem>(s[0][2 * np + t / 2], q_frag[2 * j + t % 2],
                                        fp8x2_to<Elem, kKv, 0, 1>(bk[t]),
                                        fp8x2_to<Elem, kKv, 2, 3>(bk[t]));
              }
            }
          }
        } else {
#pragma unroll
          for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
              uint32_t bk[4];
              if constexpr (kTma) {
                load_b_pair_sw128<KTile>(bk, kc, k_sw, np * 16, kk * 16);
              } else {
                load_b_pair<KTile>(bk, kc, b_off, np * 16, kk * 16);
              }
              ptx::mma_m16n8k16<Elem>(s[0][2 * np], q_frag[kk], bk[0], bk[1]);
              ptx::mma_m16n8k16<Elem>(s[0][2 * np + 1], q_frag[kk], bk[2], bk[3]);
            }
          }
        }
        const int c0 = key0 + c * kWarpKeys;
        if (cap_in != 0.f) cap_scores(s, cap_in, cap_out);  // before the mask
        if (p.alibi_slopes != nullptr) {
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const float key = float(c0 + nt * 8 + col_lane + e);
                s[0][nt][2 * h + e] = fmaf(-alibi_slope[h], fabsf(key - alibi_diag[h]), s[0][nt][2 * h + e]);
              }
        }
        if (c0 < full_lo || c0 + kWarpKeys > full_hi) {  // warp-uniform
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int key = c0 + nt * 8 + col_lane + e;
                const int t = key - draft0;  // < 64 for every key < sk (seqlen_q <= 64)
                const bool hidden = t >= 0 && !((tree_bits[h] >> (t & 63)) & 1ull);
                if (key < key_lo[h] || key >= key_hi[h] || hidden) s[0][nt][2 * h + e] = neg_inf();
              }
        }
        softmax.update(s, acc_o, scale_log2);

        const uint32_t vc = v_addr + c * kWarpKeys * VTile::kStrideBytes;
#pragma unroll
        for (int ks = 0; ks < NT / 2; ++ks) {
          uint32_t pa[4];
          c_pair_to_a<Elem>(pa, s[0][2 * ks], s[0][2 * ks + 1]);
          if constexpr (kFp8) {
#pragma unroll
            for (int j = 0; j < DT / 4; ++j) {
              uint32_t bv[4];  // keys ks*16 + {0-7, 8-15} x columns 32j + {0-15, 16-31}
              load_b_trans_pair<VTile>(bv, vc, v_off, ks * 16, j * 16);
#pragma unroll
              for (int half = 0; half < 2; ++half) {
                const uint32_t lo = bv[2 * half], hi = bv[2 * half + 1];
                ptx::mma_m16n8k16<Elem>(acc_o[0][4 * j + 2 * half], pa,
                                        fp8x2_to<Elem, kKv, 0, 2>(lo), fp8x2_to<Elem, kKv, 0, 2>(hi));
                ptx::mma_m16n8k16<Elem>(acc_o[0][4 * j + 2 * half + 1], pa,
                                        fp8x2_to<Elem, kKv, 1, 3>(lo), fp8x2_to<Elem, kKv, 1, 3>(hi));
              }
            }
          } else {
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
              uint32_t bv[4];
              if constexpr (kTma) {
                load_b_trans_pair_sw128<VTile>(bv, vc, v_sw, ks * 16, dp * 16);
              } else {
                load_b_trans_pair<VTile>(bv, vc, v_off, ks * 16, dp * 16);
              }
              ptx::mma_m16n8k16<Elem>(acc_o[0][2 * dp], pa, bv[0], bv[1]);
              ptx::mma_m16n8k16<Elem>(acc_o[0][2 * dp + 1], pa, bv[2], bv[3]);
            }
          }
        }
      }
      slot = slot + 1 == stages ? 0 : slot + 1;
    }
    // cp.async: only empty groups can be pending; keep the ring quiet. TMA:
    // every issued stage was waited on.
    if constexpr (!kTma) ptx::cp_async_wait<0>();
  }

  // ---- epilogue: per-warp normalize + LSE into shared memory, then each
  // output thread merges the warps_n partials of its (row, 8 columns):
  // lse = m + log(sum_w exp(lse_w - m)), out = sum_w exp(lse_w - lse) * O_w.
  // Two block barriers in all (this is on the tail of every CTA, one warp
  // per scheduler: each dependent step is exposed); no data-dependent
  // branches. Rows past m_end are padding: nothing writes or reads them.
  float lse_w[2];
  softmax.finalize(acc_o, scale, lse_w);
  if constexpr (kFp8) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[0][dt][e] *= v_mult;
  }
  __syncthreads();  // every warp is done reading the ring

  float* o_slab = reinterpret_cast<float*>(smem);               // [kNWarps][16][kOStride]
  float* lse_slab = o_slab + kNWarps * 16 * kOStride;           // [kNWarps][16]
  float* lse_fin = lse_slab + kNWarps * 16;                     // [kMaxRows]
  {
    const int g = lane >> 2;
    const int live_rows = m_end - m0 - wm * 16;  // rows of this warp's tile that exist
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = g + 8 * h;
      if (row >= live_rows) continue;
      if ((lane & 3) == 0) lse_slab[warp * 16 + row] = lse_w[h];
      if constexpr (kFp8) {  // tile 4j + t: columns 32j + 16 (t / 2) + 4c + {0, 2} + t % 2
        float* orow = o_slab + (warp * 16 + row) * kOStride + 4 * (lane & 3);
#pragma unroll
        for (int j = 0; j < DT / 4; ++j)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const float(&ev)[4] = acc_o[0][4 * j + 2 * half];
            const float(&od)[4] = acc_o[0][4 * j + 2 * half + 1];
            *reinterpret_cast<float4*>(orow + 32 * j + 16 * half) =
                make_float4(ev[2 * h], od[2 * h], ev[2 * h + 1], od[2 * h + 1]);
          }
      } else {
        float* orow = o_slab + (warp * 16 + row) * kOStride + 2 * (lane & 3);
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
          *reinterpret_cast<float2*>(orow + dt * 8) =
              make_float2(acc_o[0][dt][2 * h], acc_o[0][dt][2 * h + 1]);
      }
    }
  }
  __syncthreads();

  // ---- output: rows of the CTA, 8 columns per thread.
  constexpr float kLog2e = 1.4426950408889634f;
  const bool direct = p.num_splits == 1;
  const bool in_cluster = !direct && p.combine_in_cluster;
  const int col = (tid % Traits::kTpr) * 8;
  for (int rr = tid / Traits::kTpr; rr < rows_cta; rr += Traits::kRowsPerPass) {
    const int r = m0 + rr;
    if (r >= m_end) break;
    const int wrow = (rr >> 4) << wn_bits;  // first warp of this row's tile
    float l[kNWarps];
    float l_max = neg_inf();
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) {
      l[w] = w < warps_n ? lse_slab[(wrow + w) * 16 + (rr & 15)] : neg_inf();
      l_max = fmaxf(l_max, l[w]);
    }
    const float base = l_max == neg_inf() ? 0.f : l_max;
    float wt[kNWarps];
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) {
      wt[w] = ptx::ex2_approx((l[w] - base) * kLog2e);  // ex2(-inf) = 0
      sum += wt[w];
    }
    const float lse = sum > 0.f ? base + __logf(sum) : neg_inf();
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int i = fast_div(group, r);
    const int h = hk * static_cast<int>(group.d) + fast_mod(group, r, i);
    if (col == 0) {
      if (direct) {
        p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + seq.q0 + i] = lse;
      } else if (in_cluster) {
        lse_fin[rr] = lse;
      } else {
        p.lse_partial[((static_cast<int64_t>(split) * p.batch + b) * p.heads_q + h) * p.seqlen_q +
                      i] = lse;
      }
    }
    if (col >= p.head_dim) continue;
    if (!direct && lse == neg_inf()) continue;  // the combine never reads empty partials
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = 0.f;
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) {
      if (w >= warps_n) break;
      const float* src = o_slab + ((wrow + w) * 16 + (rr & 15)) * kOStride + col;
      const float4 x0 = *reinterpret_cast<const float4*>(src);
      const float4 x1 = *reinterpret_cast<const float4*>(src + 4);
      const float c = wt[w] * inv;
      v[0] = fmaf(c, x0.x, v[0]); v[1] = fmaf(c, x0.y, v[1]);
      v[2] = fmaf(c, x0.z, v[2]); v[3] = fmaf(c, x0.w, v[3]);
      v[4] = fmaf(c, x1.x, v[4]); v[5] = fmaf(c, x1.y, v[5]);
      v[6] = fmaf(c, x1.z, v[6]); v[7] = fmaf(c, x1.w, v[7]);
    }
    if (direct) {
      store_out8<Elem>(p, b, seq.q0 + i, h, col, v);
    } else if (in_cluster) {
      // In place over the first warp's slot of the row tile (only this thread
      // reads or writes these 8 floats), where the cluster combine reads it.
      float* dst = o_slab + (wrow * 16 + (rr & 15)) * kOStride + col;
      *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      float* dst = p.o_partial +
                   (((static_cast<int64_t>(split) * p.batch + b) * p.seqlen_q + i) * p.heads_q + h) *
                       p.head_dim +
                   col;
      *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
  }
  if (in_cluster)
    decode_cluster_combine<Traits, Elem>(p, o_slab, lse_fin, b, seq.q0, hk, m0, m_end, warps_n,
                                         split);
}

template <typename Traits, typename Elem, bool kPaged, KvKind kKv = KvKind::kSame>
__global__ void __launch_bounds__(Traits::kThreads)
    flash_decode_kernel(const __grid_constant__ DecodeParams p) {
  extern __shared__ __align__(128) char smem[];
#if !(defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  if constexpr (Traits::kTma) {  // never launched below sm90 (the host checks binaryVersion)
    __trap();
  }
#endif
  uint32_t phases = 0;
  if constexpr (Traits::kTma) {
    if (threadIdx.x == 0) {
      ptx::tma_prefetch_descriptor(p.k_tma);
      ptx::tma_prefetch_descriptor(p.v_tma);
      const uint32_t bar = ptx::smem_u32(decode_ring<Traits>(smem)) + p.stages * Traits::kStageBytes;
      for (int s = 0; s < p.stages; ++s) ptx::mbar_init(bar + 8 * s, 1);
      // Visible to the copy engine (thread 0 issues the first stages without
      // a block barrier); the other threads first wait on a barrier after
      // the block barrier that publishes Q (flash_decode_block).
      ptx::mbar_init_fence();
    }
  }
  // Splits vary fastest: the num_splits CTAs of one m-block are one cluster
  // when the combine runs in a cluster.
  const int m_block = fast_div(p.split_div, blockIdx.x);
  const int split = fast_mod(p.split_div, blockIdx.x, m_block);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // A programmatic dependent launch (run_decode) may start while the previous
  // kernel of the stream still runs: everything above touches only this
  // CTA's shared memory and the kernel parameters. Every global read (the
  // lengths, Q, the caches: that kernel may have written them) and write (it
  // may still read our outputs or workspace) comes after its completion.
  // A no-op for an ordinary launch.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const int hk = blockIdx.y;
  for (int b = blockIdx.z; b < p.batch; b += gridDim.z) {
    flash_decode_block<Traits, Elem, kPaged, kKv>(p, smem, b, hk, m_block, split, phases);
    if (b + gridDim.z < p.batch) {
      // smem is reused by the next sequence (TMA: the epilogue's ordinary
      // stores precede the next copies into the ring)
      if constexpr (Traits::kTma) ptx::fence_proxy_async();
      __syncthreads();
    }
  }
}

}  // namespace gpu
}  // namespace fastattn
