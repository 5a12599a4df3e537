// Backward kernel instantiation: head dim 192, fp16 (dropped by narrowed builds).
#include "cuda/flash_bwd_launch.cuh"

FASTATTN_INSTANTIATE_BWD(192, kFloat16)
