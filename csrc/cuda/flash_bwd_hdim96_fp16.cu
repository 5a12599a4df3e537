// Backward kernel instantiation: head dim 96, fp16 (dropped by narrowed builds).
#include "cuda/flash_bwd_launch.cuh"

FASTATTN_INSTANTIATE_BWD(96, kFloat16)
