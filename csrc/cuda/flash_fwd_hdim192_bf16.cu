// Forward kernel instantiation: head dim 192, bf16 (dropped by narrowed builds).
#include "cuda/flash_fwd_launch.cuh"

FASTATTN_INSTANTIATE_FWD(192, kBFloat16)
