// Where key/value row j of sequence b (KV head hk) lives, for the CPU
// kernels: the one place that knows whether K/V are contiguous tensors
// (dense / varlen) or a paged cache behind a block table. The forward and
// decode loops take any of these, so contiguous and paged attention share
// one main loop (as on the GPU, where only the tile loader differs).
//   kv.keys(b)         number of keys of sequence b
//   kv.k(b, j, hk)     pointer to head_dim elements of K (likewise kv.v)
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "torch/attention_problem.h"
#include "cpu/cpu_common.h"

namespace fastattn::cpu {

// k, v (B, Sk, Hkv, D) or varlen (total_k, Hkv, D) with cu_seqlens_k.
template <typename scalar_t>
struct ContiguousKv {
  RowView<const scalar_t> K, V;
  const int32_t* cu_k;  // nullptr: dense
  int64_t dense_len;

  ContiguousKv(const at::Tensor& k, const at::Tensor& v, const int32_t* cu, int64_t sk)
      : K(k, cu != nullptr), V(v, cu != nullptr), cu_k(cu), dense_len(sk) {}
  int64_t begin(int64_t b) const { return cu_k ? cu_k[b] : 0; }
  int64_t keys(int64_t b) const { return cu_k ? cu_k[b + 1] - cu_k[b] : dense_len; }
  const scalar_t* k(int64_t b, int64_t j, int64_t hk) const { return K.row(b, begin(b) + j, hk); }
  const scalar_t* v(int64_t b, int64_t j, int64_t hk) const { return V.row(b, begin(b) + j, hk); }
};

// Paged cache (num_blocks, block_size, Hkv, D): row j of sequence b is slot
// j % block_size of block block_table[b, j / block_size]. The argument checks
// (check_block_table_values) guarantee every block a sequence reads is valid;
// block_table must be contiguous (the callers pass .contiguous()).
template <typename scalar_t>
struct PagedKv {
  const scalar_t* kp;
  const scalar_t* vp;
  int64_t k_page, k_slot, k_head, v_page, v_slot, v_head;
  const int32_t* table;
  int64_t table_stride;
  int64_t table_head_stride;  // 3-D (B, Hkv, max_blocks) tables: a row per KV head; else 0
  int64_t block_size;
  const int32_t* lens;  // nullptr: every sequence has max_keys keys
  int64_t max_keys;

  PagedKv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
          const int32_t* seqlens, int64_t max_len)
      : kp(static_cast<const scalar_t*>(k_cache.data_ptr())),
        vp(static_cast<const scalar_t*>(v_cache.data_ptr())),
        k_page(k_cache.stride(0)), k_slot(k_cache.stride(1)), k_head(k_cache.stride(2)),
        v_page(v_cache.stride(0)), v_slot(v_cache.stride(1)), v_head(v_cache.stride(2)),
        table(block_table.data_ptr<int32_t>()), table_stride(block_table.stride(0)),
        table_head_stride(block_table.dim() == 3 ? block_table.stride(1) : 0),
        block_size(k_cache.size(1)), lens(seqlens), max_keys(max_len) {}
  int64_t keys(int64_t b) const { return lens ? lens[b] : max_keys; }
  int64_t page(int64_t b, int64_t j, int64_t hk) const {
    return table[b * table_stride + hk * table_head_stride + j / block_size];
  }
  const scalar_t* k(int64_t b, int64_t j, int64_t hk) const {
    return kp + page(b, j, hk) * k_page + (j % block_size) * k_slot + hk * k_head;
  }
  const scalar_t* v(int64_t b, int64_t j, int64_t hk) const {
    return vp + page(b, j, hk) * v_page + (j % block_size) * v_slot + hk * v_head;
  }
};

}  // namespace fastattn::cpu
