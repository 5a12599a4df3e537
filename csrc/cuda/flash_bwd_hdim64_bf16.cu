// Backward kernel instantiation: head dim 64, bf16 (dropped by narrowed builds).
#include "cuda/flash_bwd_launch.cuh"

FASTATTN_INSTANTIATE_BWD(64, kBFloat16)
