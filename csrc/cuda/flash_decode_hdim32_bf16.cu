// Decode kernel instantiation: head dim 32, bf16 (dropped by narrowed builds).
#include "cuda/flash_decode_launch.cuh"

FASTATTN_INSTANTIATE_DECODE(32, kBFloat16)
