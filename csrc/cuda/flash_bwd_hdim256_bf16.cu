// Backward kernel instantiation: head dim 256, bf16 (dropped by narrowed builds).
#include "cuda/flash_bwd_launch.cuh"

FASTATTN_INSTANTIATE_BWD(256, kBFloat16)
