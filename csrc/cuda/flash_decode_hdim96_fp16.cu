// Decode kernel instantiation: head dim 96, fp16 (dropped by narrowed builds).
#include "cuda/flash_decode_launch.cuh"

FASTATTN_INSTANTIATE_DECODE(96, kFloat16)
