#include <torch/library.h>

#include "cpu/flash_cpu.h"

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("fwd", &fastattn::cpu::fwd_cpu);
  m.impl("bwd", &fastattn::cpu::bwd_cpu);
}
