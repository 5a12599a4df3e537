// Backward kernel instantiation: head dim 96, bf16 (dropped by narrowed builds).
#include "cuda/flash_bwd_launch.cuh"

FASTATTN_INSTANTIATE_BWD(96, kBFloat16)
