// Which kernel instantiations this build compiled. setup.py defines
// FASTATTN_ENABLE_HDIM<D> and FASTATTN_ENABLE_FP16/BF16 for what a (possibly
// narrowed) build compiles; every dispatcher (forward, backward, decode) asks
// here so that none references an instantiation that does not exist. A head
// dim without its own kernel runs through the next larger compiled one.
#pragma once
#include "cuda/common/params.h"

namespace fastattn {
namespace gpu {

inline constexpr int kKernelHeadDims[] = {32, 64, 96, 128, 192, 256};

inline bool hdim_compiled(int d) {
  switch (d) {
#ifdef FASTATTN_ENABLE_HDIM32
    case 32: return true;
#endif
#ifdef FASTATTN_ENABLE_HDIM64
    case 64: return true;
#endif
#ifdef FASTATTN_ENABLE_HDIM96
    case 96: return true;
#endif
#ifdef FASTATTN_ENABLE_HDIM128
    case 128: return true;
#endif
#ifdef FASTATTN_ENABLE_HDIM192
    case 192: return true;
#endif
#ifdef FASTATTN_ENABLE_HDIM256
    case 256: return true;
#endif
    default: return false;
  }
}

inline bool dtype_compiled(ElemType t) {
#ifdef FASTATTN_ENABLE_FP16
  if (t == ElemType::kFloat16) return true;
#endif
#ifdef FASTATTN_ENABLE_BF16
  if (t == ElemType::kBFloat16) return true;
#endif
  (void)t;
  return false;
}

// Head dim of the compiled kernel serving `head_dim` (the smallest compiled
// one >= it), or 0 when this build has none for (head_dim, dtype).
inline int compiled_kernel_head_dim(int head_dim, ElemType dtype) {
  if (!dtype_compiled(dtype)) return 0;
  for (int d : kKernelHeadDims) {
    if (head_dim <= d && hdim_compiled(d)) return d;
  }
  return 0;
}

}  // namespace gpu
}  // namespace fastattn
