#include <torch/library.h>

#include "cpu/decode_cpu.h"
#include "cpu/dropout_cpu.h"
#include "cpu/flash_cpu.h"
#include "cpu/linear_cpu.h"
#include "cpu/sparse_cpu.h"

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("fwd", &fastattn::cpu::fwd_cpu);
  m.impl("paged_fwd", &fastattn::cpu::paged_fwd_cpu);
  m.impl("mixed_fwd", &fastattn::cpu::mixed_fwd_cpu);
  m.impl("bwd", &fastattn::cpu::bwd_cpu);
  m.impl("bwd_into", &fastattn::cpu::bwd_into_cpu);
  m.impl("fwd_partial", &fastattn::cpu::fwd_partial_cpu);
  m.impl("bwd_partial", &fastattn::cpu::bwd_partial_cpu);
  m.impl("decode", &fastattn::cpu::decode_cpu);
  m.impl("dropout_seed", &fastattn::cpu::dropout_seed_cpu);
  m.impl("dropout_mask", &fastattn::cpu::dropout_mask_cpu);
  m.impl("merge_states", &fastattn::cpu::merge_states_cpu);
  m.impl("merge_states_n", &fastattn::cpu::merge_states_n_cpu);
  m.impl("append_kv", &fastattn::cpu::append_kv_cpu);
  m.impl("sparse_fwd", &fastattn::cpu::sparse_fwd_cpu);
  m.impl("sparse_bwd", &fastattn::cpu::sparse_bwd_cpu);
  m.impl("linear_fwd", &fastattn::cpu::linear_fwd_cpu);
  m.impl("linear_bwd", &fastattn::cpu::linear_bwd_cpu);
  m.impl("linear_recurrent", &fastattn::cpu::linear_recurrent_cpu);
  m.impl("linear_recurrent_update", &fastattn::cpu::linear_recurrent_update_cpu);
  m.impl("linear_chunk_prepare", &fastattn::cpu::linear_chunk_prepare_cpu);
  m.impl("linear_state_scan", &fastattn::cpu::linear_state_scan_cpu);
  m.impl("linear_state_scan_bwd", &fastattn::cpu::linear_state_scan_bwd_cpu);
  m.impl("linear_chunk_bwd_local", &fastattn::cpu::linear_chunk_bwd_local_cpu);
}
