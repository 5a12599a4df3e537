// Forward kernel instantiation: head dim 32, bf16 (dropped by narrowed builds).
#include "cuda/flash_fwd_launch.cuh"

FASTATTN_INSTANTIATE_FWD(32, kBFloat16)
