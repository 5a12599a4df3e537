// Host-side launcher of the linear-attention recurrent kernel (torch-free).
// Never synchronizes and never reads device data: the launch shape depends
// only on sizes, so a captured CUDA graph replays with new indices / inputs.
#pragma once
#include <cuda_runtime.h>

#include "cuda/linear/linear_params.h"

namespace fastattn {
namespace gpu {

// Largest key head dim K the recurrent kernel takes (V is unbounded: value
// columns are spread over CTAs).
constexpr int kLinearRecurrentMaxK = 256;

// Runs the recurrence of LinearRecurrentParams on `stream`: one CTA per
// (sequence, value head, 32 value columns) walks the sequence's steps with
// its state slice in registers. cudaErrorInvalidValue when K is outside
// [1, kLinearRecurrentMaxK].
cudaError_t run_linear_recurrent(const LinearRecurrentParams& p, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastattn
