// Forward kernel instantiation: head dim 192, fp16 (dropped by narrowed builds).
#include "cuda/flash_fwd_launch.cuh"

FASTATTN_INSTANTIATE_FWD(192, kFloat16)
