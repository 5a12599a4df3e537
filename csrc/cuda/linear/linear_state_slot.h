// Slot of sequence n on one side of a state reference (LinearStateRef,
// linear_params.h), shared by the recurrence and the chunked scan kernels.
#pragma once
#include <cstdint>

#include "cuda/linear/linear_params.h"

namespace fastattn {

// -1: no state on this side (ptr nullptr), or an indexed slot outside
// [0, num_slots) (a padding sequence).
__device__ __forceinline__ int64_t linear_state_slot(const LinearStateRef& s, const void* indices,
                                                     bool indices_int64, int64_t num_slots, int n) {
  if (s.ptr == nullptr) return -1;
  if (!s.indexed) return n;
  const int64_t i = indices_int64 ? static_cast<const int64_t*>(indices)[n]
                                  : static_cast<const int32_t*>(indices)[n];
  return (i >= 0 && i < num_slots) ? i : -1;
}

}  // namespace fastattn
