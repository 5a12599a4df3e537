// Forward kernel instantiation: head dim 64, bf16 (dropped by narrowed builds).
#include "cuda/flash_fwd_launch.cuh"

FASTATTN_INSTANTIATE_FWD(64, kBFloat16)
