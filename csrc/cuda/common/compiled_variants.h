// Which kernel instantiations this build compiled. setup.py defines
// FASTATTN_ENABLE_HDIM<D> and FASTATTN_ENABLE_FP16/BF16 for what a (possibly
// narrowed) build compiles; every dispatcher (forward, backward, decode) asks
// here so that none references an instantiation that does not exist. A head
// dim without its own kernel runs through the next larger compiled one.
#pragma once
#include <type_traits>

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

// Calls f(std::integral_constant<int, D>{}, std::integral_constant<ElemType, T>{})
// with the compiled instantiation of a kernel family (D, T) = (d, t) and returns its
// result; `none` when this build has no such instantiation (narrowed builds).
template <typename R, typename F>
R visit_compiled_variant(int d, ElemType t, R none, F&& f) {
  auto with_dtype = [&](auto dt) -> R {
    switch (d) {
#ifdef FASTATTN_ENABLE_HDIM32
      case 32: return f(std::integral_constant<int, 32>{}, dt);
#endif
#ifdef FASTATTN_ENABLE_HDIM64
      case 64: return f(std::integral_constant<int, 64>{}, dt);
#endif
#ifdef FASTATTN_ENABLE_HDIM96
      case 96: return f(std::integral_constant<int, 96>{}, dt);
#endif
#ifdef FASTATTN_ENABLE_HDIM128
      case 128: return f(std::integral_constant<int, 128>{}, dt);
#endif
#ifdef FASTATTN_ENABLE_HDIM192
      case 192: return f(std::integral_constant<int, 192>{}, dt);
#endif
#ifdef FASTATTN_ENABLE_HDIM256
      case 256: return f(std::integral_constant<int, 256>{}, dt);
#endif
      default: return none;
    }
  };
#ifdef FASTATTN_ENABLE_FP16
  if (t == ElemType::kFloat16)
    return with_dtype(std::integral_constant<ElemType, ElemType::kFloat16>{});
#endif
#ifdef FASTATTN_ENABLE_BF16
  if (t == ElemType::kBFloat16)
    return with_dtype(std::integral_constant<ElemType, ElemType::kBFloat16>{});
#endif
  (void)with_dtype;
  return none;
}

}  // namespace gpu
}  // namespace fastattn
