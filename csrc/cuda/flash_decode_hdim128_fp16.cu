// Decode kernel instantiation: head dim 128, fp16 (dropped by narrowed builds).
#include "cuda/flash_decode_launch.cuh"

FASTATTN_INSTANTIATE_DECODE(128, kFloat16)
