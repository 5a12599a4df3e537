// Forward dispatch: runtime (head dim, dtype) -> the compiled instantiation.
// Only instantiations this build compiled (FASTATTN_ENABLE_HDIM<D>,
// FASTATTN_ENABLE_FP16/BF16 from setup.py) are referenced; a head dim that is
// not compiled runs through the next larger compiled one.
#include "cuda/common/compiled_variants.h"
#include "cuda/flash/launch.h"

namespace fastattn {
namespace gpu {
namespace {


template <ElemType kDtype>
cudaError_t run_fwd_dtype(int kernel_hdim, const FwdParams& p, cudaStream_t stream) {
  switch (kernel_hdim) {
#ifdef FASTATTN_ENABLE_HDIM32
    case 32: return run_fwd_hdim<32, kDtype>(p, stream);
#endif
#ifdef FASTATTN_ENABLE_HDIM64
    case 64: return run_fwd_hdim<64, kDtype>(p, stream);
#endif
#ifdef FASTATTN_ENABLE_HDIM96
    case 96: return run_fwd_hdim<96, kDtype>(p, stream);
#endif
#ifdef FASTATTN_ENABLE_HDIM128
    case 128: return run_fwd_hdim<128, kDtype>(p, stream);
#endif
#ifdef FASTATTN_ENABLE_HDIM192
    case 192: return run_fwd_hdim<192, kDtype>(p, stream);
#endif
#ifdef FASTATTN_ENABLE_HDIM256
    case 256: return run_fwd_hdim<256, kDtype>(p, stream);
#endif
    default: return cudaErrorNotSupported;
  }
}

}  // namespace

int fwd_kernel_head_dim(int head_dim, ElemType dtype) {
  return compiled_kernel_head_dim(head_dim, dtype);
}

cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream) {
  const int d = fwd_kernel_head_dim(p.head_dim, p.dtype);
  if (d == 0) return cudaErrorNotSupported;
#ifdef FASTATTN_ENABLE_FP16
  if (p.dtype == ElemType::kFloat16) return run_fwd_dtype<ElemType::kFloat16>(d, p, stream);
#endif
#ifdef FASTATTN_ENABLE_BF16
  if (p.dtype == ElemType::kBFloat16) return run_fwd_dtype<ElemType::kBFloat16>(d, p, stream);
#endif
  return cudaErrorNotSupported;
}

}  // namespace gpu
}  // namespace fastattn
