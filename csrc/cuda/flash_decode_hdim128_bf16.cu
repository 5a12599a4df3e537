// Decode kernel instantiation: head dim 128, bf16 (dropped by narrowed builds).
#include "cuda/flash_decode_launch.cuh"

FASTATTN_INSTANTIATE_DECODE(128, kBFloat16)
