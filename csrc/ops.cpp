// Every op schema of the fastattn library, in one place. Implementations
// register per dispatch key next to their kernels (cpu/register_cpu.cpp, torch/*_cuda.cpp);
// fake kernels and autograd are added from Python (python/fastattn/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  // Attention forward over q (B, Sq, Hq, D) and k, v (B, Sk, Hkv, D); with
  // cu_seqlens the batch is ragged: q (total_q, Hq, D), k, v (total_k, Hkv, D).
  // Returns out (q's shape, contiguous) and the natural-log logsumexp of the
  // scaled scores, (B, Hq, Sq) or (Hq, total_q), float32 (float64 for
  // float64 inputs). window_* < 0 means unbounded; causal sets window_right = 0;
  // bottom_right aligns the mask diagonal to the last query/key (flash-attn),
  // otherwise to the first (torch SDPA). `deterministic` is not used by the
  // forward itself: autograd saves it for the bwd call it makes. softcap > 0
  // caps the scaled scores, x -> softcap * tanh(x / softcap) (Gemma 2), before
  // the mask; 0 = off. alibi_slopes (Hq) or (B, Hq) float32: flash-attn's
  // ALiBi, -slope * |i + sk - sq - j| added after the cap (no gradient). Both
  // arguments also in bwd, bwd_into, decode, paged_fwd.
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, bool causal, int window_left, "
      "int window_right, bool bottom_right, bool deterministic, float softcap=0.0, "
      "Tensor? alibi_slopes=None, float dropout_p=0.0, Tensor? rng_state=None) "
      "-> (Tensor out, Tensor lse)");
  // Gradients of fwd given dout, recomputing the probabilities from lse.
  // deterministic=True makes dq bitwise reproducible (no float atomics).
  // dlse: the gradient of the returned lse (None: zero), folded in as
  // dS = P * (dP - D + dlse) since d lse_i / d s_ij = P_ij.
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float scale, bool causal, int window_left, int window_right, bool bottom_right, "
      "bool deterministic, float softcap=0.0, Tensor? dlse=None, Tensor? alibi_slopes=None, "
      "float dropout_p=0.0, Tensor? rng_state=None) -> (Tensor dq, Tensor dk, Tensor dv)");
  // The same gradients written into caller-provided dq, dk, dv (q's, k's and
  // v's shapes and dtype, any strides with a contiguous last dim), e.g. the
  // three slices of one packed dqkv, so packed inputs get their gradient
  // without a copy. Varlen: rows outside every sequence are zeroed.
  m.def(
      "bwd_into(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float scale, bool causal, int window_left, int window_right, bool bottom_right, "
      "bool deterministic, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, float softcap=0.0, "
      "Tensor? dlse=None, Tensor? alibi_slopes=None, float dropout_p=0.0, "
      "Tensor? rng_state=None) -> ()");

  // Attention dropout. dropout_p > 0 in fwd / bwd / bwd_into drops each
  // probability of P with that probability (quantized to a multiple of
  // 1/256) and scales the kept ones by the inverse of the keep probability
  // used; which pairs are dropped is a pure function of rng_state (seed,
  // offset) and the pair's (batch, head, row, column): the backward given the
  // forward's rng_state regenerates the same mask, nothing is stored
  // (csrc/cuda/common/dropout.h has the exact rule). dropout_seed draws a
  // fresh (seed, offset) int64 (2,) tensor on like's device from torch's
  // default generator, reserving `increment` Philox offsets (batch * heads_q
  // for one attention call); on CUDA a kernel writes it, so a captured graph
  // draws new values at every replay.
  m.def("dropout_seed(Tensor like, int increment) -> Tensor",
        {at::Tag::nondeterministic_seeded});
  // The keep mask of one call as a bool (batch, heads, seqlen_q, seqlen_k)
  // tensor (row i, column j of sequence b; varlen sequences use the top-left
  // corner): a testing aid and the source of return_attn_probs' dropped entries.
  m.def("dropout_mask(Tensor rng_state, int batch, int heads, int seqlen_q, int seqlen_k, "
        "float dropout_p) -> Tensor");

  // fwd and bwd for one part of the keys whose results are merged or summed
  // later (ring attention): the same arguments, but out and the gradients come
  // back in float32 (float64 for float64 inputs), so N parts are rounded to
  // the input dtype once, after the merge, not N times. bwd_partial's out and
  // lse are the merged (final) ones. No autograd: callers own the chain rule.
  m.def(
      "fwd_partial(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, bool causal, int window_left, "
      "int window_right, bool bottom_right) -> (Tensor out, Tensor lse)");
  m.def(
      "bwd_partial(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float scale, bool causal, int window_left, int window_right, bool bottom_right, "
      "bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)");

  // Recursive attention: attention over the union of disjoint key sets is the
  // LSE-weighted merge of the parts. out_* are (..., S, H, D), lse_* are
  // (..., H, S) float32 (the layouts fwd returns, dense or varlen). Parts with
  // lse = -inf (empty key sets) get weight 0; all parts empty gives out = 0,
  // lse = -inf. Returns a fresh contiguous out (out_a's dtype) and fp32 lse.
  m.def("merge_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor out, Tensor lse)");
  // The same over a stacked leading dim: outs (N, ..., S, H, D), lses (N, ..., H, S).
  m.def("merge_states_n(Tensor outs, Tensor lses) -> (Tensor out, Tensor lse)");
  // Attention of a few new query tokens over a KV cache (flash-decoding).
  // q (B, Sq, Hq, D); k_cache/v_cache (B_cache, S_max, Hkv, D), or paged
  // (num_blocks, block_size, Hkv, D) addressed through block_table (B, max_blocks) int32.
  // seqlens_k (B) int32: keys per sequence (None: all S_max); cache_batch_idx (B) int32:
  // which cache row sequence b reads (None: b). Causal/window align bottom-right
  // (query Sq-1 sits at key seqlens_k-1). num_splits: KV splits (0 = heuristic).
  // cache_leftpad (B) int32, contiguous caches only: sequence b's keys are
  // cache rows [cache_leftpad[b], seqlens_k[b]) (flash-attn's left padding).
  // FP8 caches: k_cache / v_cache float8_e4m3fn or float8_e5m2 (head_dim a
  // multiple of 16) hold codes; element values are code * k_descale (v_descale),
  // float32 of shape (1) (per tensor), (Hkv) (per KV head) or (B, Hkv) (per
  // sequence and KV head, FlashAttention-3's layout), default 1. The descales
  // apply to FP8 caches only. tree_mask (B, Sq, Sq) bool, Sq <= 64 (speculative
  // verification of a token tree): the last Sq keys of sequence b are its draft
  // tokens, and query i sees draft token j only where tree_mask[b, i, j], on top
  // of the causal / window mask; the keys before them stay visible.
  // Returns out (B, Sq, Hq, D) and lse (B, Hq, Sq) float32.
  // A seqlens_k entry past what the cache addresses (S_max, or max_blocks *
  // block_size) raises, naming k_cache / block_table; on CUDA that check reads
  // max(seqlens_k) on the host, so under CUDA-graph capture it is skipped and
  // the kernels clamp the lengths instead (paged_fwd alike).
  m.def(
      "decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? seqlens_k, Tensor? cache_batch_idx, "
      "Tensor? block_table, float scale, bool causal, int window_left, int window_right, "
      "int num_splits, float softcap=0.0, Tensor? alibi_slopes=None, Tensor? cache_leftpad=None, "
      "Tensor? k_descale=None, Tensor? v_descale=None, Tensor? tree_mask=None) "
      "-> (Tensor out, Tensor lse)");
  // Chunked prefill over a paged KV cache (forward only, inference): q
  // (total_q, Hq, D) packed by cu_seqlens_q (B + 1) int32, sequence b's rows
  // attending to its seqlens_k[b] keys in k_cache/v_cache (num_blocks,
  // block_size, Hkv, D) through block_table (B, max_blocks) int32 (append the
  // new chunk's K/V with append_kv first). Causal/window align bottom-right
  // (a chunk's last query sits at key seqlens_k[b] - 1), so prefill chunks and
  // decode rows (1 query) mix in one call. Returns out (total_q, Hq, D) and lse
  // (Hq, total_q) float32 (float64 for float64 q). dropout_p / rng_state as
  // in fwd (flash-attn takes dropout on this path too; no backward here).
  m.def(
      "paged_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens_q, "
      "Tensor seqlens_k, Tensor block_table, int max_seqlen_q, float scale, bool causal, "
      "int window_left, int window_right, float softcap=0.0, Tensor? alibi_slopes=None, "
      "float dropout_p=0.0, Tensor? rng_state=None) -> (Tensor out, Tensor lse)");
  // paged_fwd's result for a mixed batch (prefill chunks and decode rows) in
  // one launch that follows a plan (fastattn.BatchAttention): work is its
  // int32 (num_work, 4) table of CTAs (cuda/mixed/mixed_params.h: prefill
  // tiles of the paged forward kernel, and CTAs of the split-KV paged decode
  // kernel for sequences of at most decode_max_q queries, num_splits splits
  // merged in a cluster, warps_m warps along the GQA-packed rows). Sequences
  // or tiles the table leaves out are not written. CPU: the paged forward
  // (the table only schedules GPU work). No dropout; head dims <= 128 on GPU.
  m.def(
      "mixed_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens_q, "
      "Tensor seqlens_k, Tensor block_table, Tensor work, int max_seqlen_q, int decode_max_q, "
      "int num_splits, int warps_m, float scale, bool causal, int window_left, "
      "int window_right, float softcap=0.0, Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  // Writes new tokens into a cache in place: k, v (N, Hkv, D); slot_mapping (N) int64,
  // slot = row * S (contiguous cache (B_cache, S, Hkv, D): row = cache batch, S = S_max;
  // paged (num_blocks, block_size, Hkv, D): row = block, S = block_size) + position.
  // Negative slots are padding and skipped. FP8 caches (float8_e4m3fn /
  // float8_e5m2) quantize: element (n, h, d) is stored as the code nearest to
  // x / k_scale (v_scale), saturated to the largest finite code; the scales are
  // float32 of shape (1), (Hkv) or (N, Hkv), default 1 (the descales decode
  // reads the cache with). The scales apply to FP8 caches only.
  m.def(
      "append_kv(Tensor k, Tensor v, Tensor slot_mapping, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor? k_scale=None, Tensor? v_scale=None) -> ()");

  // Block-sparse attention (FlexAttention-style block masks) over q (B, Sq, Hq, D),
  // k, v (B, Sk, Hkv, D). The mask has block_q x block_kv blocks; per (batch,
  // head, query block) kv_num_blocks / kv_indices list its *partial* KV blocks
  // and full_kv_num_blocks / full_kv_indices its *full* ones (every pair
  // visible), all int32 of shapes (Bm, Hm, QB) / (Bm, Hm, QB, n) with Bm in
  // {1, B}, Hm in {1, Hq} (broadcast), QB = ceil(Sq / block_q), KV block ids in
  // [0, ceil(Sk / block_kv)). A partial block's pairs are visible where its bits
  // say so: kv_bits_index (aligned with kv_indices) names its slot in
  // partial_bits (NP, block_q, ceil(block_kv / 32)) int32, bit c % 32 of word
  // c / 32 of row r = pair (r, c) of the block; slot -1 (or no bits at all)
  // means every pair of the block. Pairs must also pass the causal / window
  // mask of fwd (top-left or bottom-right). bias: optional additive float
  // mask broadcastable as (B|1, Hq|1, Sq, Sk) added to the scaled scores; with
  // bias_relative a relative-position table (Hq|1, Sq + Sk - 1) instead:
  // query i, key j get bias[h, j - i + Sq - 1] (T5-style buckets). alibi_slopes
  // (Hq|1) float32 adds slopes[h] * (j - i), computed in the kernel (no
  // gradient: sparse_bwd returns none for it). dropout_p / rng_state: as in
  // fwd (the dropped output's gradient in sparse_bwd given the same state).
  // Rows with no visible key: out = 0, lse = -inf.
  m.def(
      "sparse_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, "
      "Tensor full_kv_num_blocks, Tensor full_kv_indices, Tensor? kv_bits_index, "
      "Tensor? partial_bits, int block_q, int block_kv, float scale, bool causal, "
      "int window_left, int window_right, bool bottom_right, Tensor? bias, "
      "bool bias_relative=False, Tensor? alibi_slopes=None, float dropout_p=0.0, "
      "Tensor? rng_state=None) -> (Tensor out, Tensor lse)");
  // Gradients of sparse_fwd. The backward walks the transposed lists: per
  // (batch, head, KV block) q_num_blocks / q_indices (partial, with
  // q_bits_index into the same partial_bits) and full_q_num_blocks /
  // full_q_indices, shapes (Bm, Hm, KB) / (Bm, Hm, KB, n). With bias_grad
  // dlse: the gradient of the returned lse (None: zero), folded in exactly as
  // dS = P * (dP - D + dlse). dbias is dL/dbias expanded to (B, Hq, Sq, Sk)
  // (bias_relative: to (Hq, Sq + Sk - 1)), float32 (float64 for float64
  // inputs; the caller sums broadcast dims), else an empty tensor.
  m.def(
      "sparse_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor q_num_blocks, Tensor q_indices, Tensor full_q_num_blocks, Tensor full_q_indices, "
      "Tensor? q_bits_index, Tensor? partial_bits, int block_q, int block_kv, float scale, "
      "bool causal, int window_left, int window_right, bool bottom_right, Tensor? bias, "
      "bool bias_grad, bool deterministic, Tensor? dlse=None, bool bias_relative=False, "
      "Tensor? alibi_slopes=None, float dropout_p=0.0, Tensor? rng_state=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");

  // Linear attention (fastattn.linear): one recurrence per (sequence, value
  // head hv), qk head hv / (HV / H), state S (K x V, fp32; fp64 for fp64):
  //   S' = diag(exp(g_t)) S_{t-1}; S_t = S' + k_t v_t^T, or with delta
  //   S_t = S' + beta_t k_t (v_t - S'^T k_t)^T; o_t = scale S_t^T q_t.
  // q, k (B, T, H, K), v (B, T, HV, V) contiguous, one dtype; g (B, T, HV) or
  // (B, T, HV, K) log decays, beta (B, T, HV), initial_state (N, HV, K, V):
  // contiguous fp32 (fp64 for fp64 inputs); cu_seqlens int32 (N + 1) with B 1.
  // checkpoints: the states at every chunk start (slots: linear_cpu.h) that
  // linear_bwd replays from.
  m.def(
      "linear_fwd(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? beta, Tensor? initial_state, "
      "Tensor? cu_seqlens, float scale, bool delta, int chunk) "
      "-> (Tensor out, Tensor final_state, Tensor checkpoints)");
  // Gradients of linear_fwd (dfinal: of the final state, None: zero); dg,
  // dbeta, dinitial_state in the state dtype, empty where the input was None.
  m.def(
      "linear_bwd(Tensor dout, Tensor? dfinal, Tensor q, Tensor k, Tensor v, Tensor? g, "
      "Tensor? beta, Tensor? initial_state, Tensor? cu_seqlens, Tensor checkpoints, float scale, "
      "bool delta, int chunk) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dg, Tensor dbeta, Tensor dinitial_state)");
  // The same recurrence for inference and decoding (no checkpoints, no
  // autograd): initial_state (N, HV, K, V), or a pool (P, HV, K, V) read at
  // slot state_indices[n] (int32/int64; a negative slot marks a padding
  // sequence: zero state, nothing written back); state_v_first: states are
  // (.., V, K). q, k, v need only a contiguous last dim; qk_l2norm normalizes
  // q and k (x / sqrt(|x|^2 + 1e-6)) in fp32. final_state (N, HV, K, V) (or
  // (N, HV, V, K)) when output_final_state, else empty.
  m.def(
      "linear_recurrent(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? beta, "
      "Tensor? initial_state, Tensor? state_indices, Tensor? cu_seqlens, float scale, bool delta, "
      "bool qk_l2norm, bool state_v_first, bool output_final_state) "
      "-> (Tensor out, Tensor final_state)");
  // linear_recurrent that updates the states in place: sequence n starts from
  // state[state_indices[n]] (or state[n]) and writes its final state there.
  m.def(
      "linear_recurrent_update(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? beta, "
      "Tensor(a!) state, Tensor? state_indices, Tensor? cu_seqlens, float scale, bool delta, "
      "bool qk_l2norm, bool state_v_first) -> Tensor out");
  // The two scans over chunks of the chunked training path
  // (python/fastattn/linear/chunked.py computes every chunk's own part).
  // Chunk layout (B, HV, N, 64, .): rows of K columns qt, kt, w, qs; rows of V
  // columns u, o_intra, x, dout; one floating dtype. States (B, HV, K, V) and
  // decay_last (B, HV, N) (e^{b_last} per chunk) fp32, fp64 for fp64 inputs.
  // Forward, from S = initial_state (None: zeros), for every chunk c in order:
  //   chunk_states[c] = S;  u_c = u_c - w_c S (w None: u_c as given);
  //   out_c = o_intra_c + qt_c S;  S = decay_last_c S + kt_c^T u_c
  // -> final S; u_out the updates used (like u; empty without w).
  m.def(
      "linear_state_scan(Tensor qt, Tensor kt, Tensor u, Tensor? w, Tensor o_intra, "
      "Tensor decay_last, Tensor? initial_state) "
      "-> (Tensor out, Tensor final_state, Tensor chunk_states, Tensor u_out)");
  // Backward, from dS = dfinal (None: zeros), chunks in reverse:
  //   chunk_dstates[c] = dS;  du_c = x_c + kt_c dS;
  //   dS = decay_last_c dS + qs_c^T dout_c - w_c^T du_c  (no w term without w)
  // -> du (B, HV, N, 64, V) and the states' gradients in the state dtype, dinitial = the last dS.
  m.def(
      "linear_state_scan_bwd(Tensor qs, Tensor kt, Tensor? w, Tensor x, Tensor dout, "
      "Tensor decay_last, Tensor? dfinal) -> (Tensor du, Tensor chunk_dstates, Tensor dinitial)");
  // Every chunk's own part of the forward (what the chunk-local kernel of the
  // chunked forward computes), for the training path: q, k (B, HV, N, 64, K),
  // v (B, HV, N, 64, V) one floating dtype, rows past a sequence's end zero;
  // g, beta (B, HV, N, 64) log decays and betas in the state dtype. With
  // b = cumsum(g) per chunk, e = e^b, Gamma_ij = e^{b_i - b_j} (j <= i):
  //   m = q k^T o Gamma (lower);  kt = e^{b_last - b} o k;  decay_last = e^{b_last};
  //   delta rule: T = (I + A)^{-1}, A = strict_lower(diag(beta) (k k^T o Gamma)),
  //     w = T diag(beta) (e o k), u = T diag(beta) v;  without it w = 0, u = v;
  //   qt = scale (e o q - m w);  o_intra = scale m u.
  // -> (qt, kt, w, u (w, u empty without the delta rule), o_intra, decay_last (B, HV, N), m, b);
  //    rows in q's dtype, decay_last and b in the state dtype.
  m.def(
      "linear_chunk_prepare(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, bool delta) "
      "-> (Tensor qt, Tensor kt, Tensor w, Tensor u, Tensor o_intra, Tensor decay_last, Tensor m, Tensor b)");
  // The chunk-local gradients, every chunk at once: q, k (B, HV, N, 64, K),
  // v, dout (B, HV, N, 64, V) one floating dtype; b (B, HV, N, 64) the
  // chunk-local cumulative log decays, chunk_states / chunk_dstates
  // (B, HV, N, K, V) the states at the chunk starts and the gradients of the
  // states at the chunk ends (linear_state_scan[_bwd]), in the state dtype.
  // With e = e^b, Gamma_ij = e^{b_i - b_j} (j <= i), U the updates (u with the
  // delta rule, else v), dM = tril(scale dout U^T), Mg = dM o Gamma,
  // Kt = e^{b_last - b} o k:
  //   dq = scale e o (dout S0^T) + Mg k;  dk = e^{b_last - b} o (U dS1^T) + Mg^T q;
  //   db = rowsum(G) - colsum(G) + scale e o rowsum(q o dout S0^T) - rowsum(Kt o U dS1^T),
  //   G = dM o (q k^T) o Gamma; the last row also gets sum(rowsum(Kt o U dS1^T)) + <S0, dS1> e^{b_last}.
  // Delta rule (beta (B, HV, N, 64) in the state dtype, u and du (the
  // gradients of u, from linear_state_scan_bwd) like v): with T = (I + A)^{-1},
  // A = strict_lower(diag(beta) (k k^T o Gamma)), dW = -du S0^T,
  // dT = du (beta v)^T + dW (beta e k)^T, dA = strict_lower(-T^T dT T^T),
  // X = diag(beta) dA o Gamma:
  //   dv = beta o T^T du;  dk += beta e o T^T dW + (X + X^T) k;
  //   db += beta e o rowsum(k o T^T dW) + rowsum(G') - colsum(G'), G' = X o k k^T;
  //   dbeta = rowsum(v o T^T du) + e o rowsum(k o T^T dW) + rowsum(dA o k k^T o Gamma).
  // -> (dq, dk, db (its reversed cumulative sum per chunk is dg), dv, dbeta) in the state dtype;
  //    dv and dbeta empty without the delta rule (dv is then du of the scan).
  m.def(
      "linear_chunk_bwd_local(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor b, Tensor chunk_states, "
      "Tensor chunk_dstates, float scale, Tensor? beta=None, Tensor? u=None, Tensor? du=None) "
      "-> (Tensor dq, Tensor dk, Tensor db, Tensor dv, Tensor dbeta)");
}
