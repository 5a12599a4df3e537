// Host helpers shared by the launchers: the dynamic shared memory cap of a
// kernel, and whether the device runs the wgmma body of an sm90 kernel.
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>

namespace fastattn {
namespace gpu {

// Sets the kernel's dynamic shared memory cap once per device and kernel
// (Tag names the kernel: one static flag set per instantiation). Kept out of
// CUDA-graph capture, which follows eager warm-up runs; racing threads would
// only set the same value twice.
template <typename... Tag>
cudaError_t ensure_smem_cap(const void* kernel, int smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  static bool attr_set[64] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 64 && attr_set[device]) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  if (device < 64) attr_set[device] = true;
  return cudaSuccess;
}

// Whether the device runs the wgmma body of an sm90 kernel: only sm_90a
// machine code has it, tagged by the kernel's launch bounds (kThreads there,
// 32 in every other image), so the image the device loads must report
// binaryVersion 90 and `threads`. The environment variable `env_switch` = 0
// forces false (read per call: a dev A/B switch and an escape hatch).
template <typename... Tag>
bool sm90_body_runnable(const void* kernel, int threads, const char* env_switch) {
  const char* env = std::getenv(env_switch);
  if (env != nullptr && env[0] == '0') return false;
  static signed char cache[64] = {};  // 0 unknown, 1 yes, -1 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device < 64 && cache[device] != 0) return cache[device] > 0;
  cudaFuncAttributes attr;
  bool ok = false;
  if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess) {
    ok = attr.binaryVersion == 90 && attr.maxThreadsPerBlock >= threads;
  } else {
    (void)cudaGetLastError();
  }
  if (device < 64) cache[device] = ok ? 1 : -1;
  return ok;
}

}  // namespace gpu
}  // namespace fastattn
