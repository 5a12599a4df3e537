// Backward kernel instantiation: head dim 128, fp16 (dropped by narrowed builds).
#include "cuda/flash_bwd_launch.cuh"

FASTATTN_INSTANTIATE_BWD(128, kFloat16)
