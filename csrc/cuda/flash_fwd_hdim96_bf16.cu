// Forward kernel instantiation: head dim 96, bf16 (dropped by narrowed builds).
#include "cuda/flash_fwd_launch.cuh"

FASTATTN_INSTANTIATE_FWD(96, kBFloat16)
