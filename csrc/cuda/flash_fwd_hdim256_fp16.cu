// Forward kernel instantiation: head dim 256, fp16 (dropped by narrowed builds).
#include "cuda/flash_fwd_launch.cuh"

FASTATTN_INSTANTIATE_FWD(256, kFloat16)
