// Decode kernel instantiation: head dim 64, bf16 (dropped by narrowed builds).
#include "cuda/flash_decode_launch.cuh"

FASTATTN_INSTANTIATE_DECODE(64, kBFloat16)
