// Every op schema of the fastattn library, in one place. Implementations
// register per dispatch key next to their kernels (cpu/, torch_cuda.cpp);
// fake kernels and autograd are added from Python (python/fastattn/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  // Attention forward over q (B, Sq, Hq, D) and k, v (B, Sk, Hkv, D); with
  // cu_seqlens the batch is ragged: q (total_q, Hq, D), k, v (total_k, Hkv, D).
  // Returns out (q's shape, contiguous) and the natural-log logsumexp of the
  // scaled scores, (B, Hq, Sq) or (Hq, total_q), float32 (float64 for
  // float64 inputs). window_* < 0 means unbounded; causal sets window_right = 0;
  // bottom_right aligns the mask diagonal to the last query/key (flash-attn),
  // otherwise to the first (torch SDPA). `deterministic` is not used by the
  // forward itself: autograd saves it for the bwd call it makes.
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, bool causal, int window_left, "
      "int window_right, bool bottom_right, bool deterministic) -> (Tensor out, Tensor lse)");
  // Gradients of fwd given dout, recomputing the probabilities from lse.
  // deterministic=True makes dq bitwise reproducible (no float atomics).
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float scale, bool causal, int window_left, int window_right, bool bottom_right, "
      "bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)");
}
