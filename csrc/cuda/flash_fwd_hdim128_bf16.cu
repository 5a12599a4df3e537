// Forward kernel instantiation: head dim 128, bf16 (dropped by narrowed builds).
#include "cuda/flash_fwd_launch.cuh"

FASTATTN_INSTANTIATE_FWD(128, kBFloat16)
