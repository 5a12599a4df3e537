// Decode kernel instantiation: head dim 192, bf16 (dropped by narrowed builds).
#include "cuda/flash_decode_launch.cuh"

FASTATTN_INSTANTIATE_DECODE(192, kBFloat16)
