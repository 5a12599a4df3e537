// Decode kernel instantiation: head dim 256, fp16 (dropped by narrowed builds).
#include "cuda/flash_decode_launch.cuh"

FASTATTN_INSTANTIATE_DECODE(256, kFloat16)
