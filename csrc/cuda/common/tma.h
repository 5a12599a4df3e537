// sm90 tensor-copy (TMA engine) and mbarrier wrappers.
//
// A tensor copy moves a whole box of a tensor global -> shared with a single
// instruction, issued by one thread; completion is counted in bytes on an
// mbarrier ("complete_tx"), so the threads that consume a ring stage wait on
// that stage's barrier instead of every copying thread waiting on its own
// cp.async groups. Measured on the H100 (scripts/dev/stream_ceiling.cu) the
// copy engine streams a decode KV cache about 3.5% faster than cp.async.
//
// Ordering rules the users of these wrappers follow:
//   - A ring stage's barrier is armed (arrive_expect_tx with the bytes the
//     stage will receive) by one thread before that stage's copies are issued,
//     and each use of the barrier completes one phase; waiters track the
//     phase parity themselves.
//   - Shared memory written by ordinary stores (or cp.async) that a later
//     tensor copy overwrites needs fence_proxy_async() in the writing thread
//     before the barrier that orders the two.
//   - Every wrapper is a no-op below sm90 (callers never launch those paths
//     there: the host checks the kernel's binaryVersion).
#pragma once
#include <cstdint>

namespace fastattn {
namespace ptx {

__device__ __forceinline__ void mbar_init(uint32_t bar, int arrivals) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
#endif
}

// Makes barrier initializations visible to the async proxy (the copy engine).
__device__ __forceinline__ void mbar_init_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// One arrival that also announces `bytes` of copies still to land.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
#endif
}

// One plain arrival (a consumer handing a ring stage back to its producer).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}

// Blocks until the phase with the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}

// One box of a tensor map (a CUtensorMap in kernel-parameter or global
// memory) at coordinates c0..c3 (innermost first) into shared memory at dst,
// counted on bar when it lands. Box parts outside the tensor are zero-filled
// and still count.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* tensor_map, int c0, int c1,
                                            int c2, int c3, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(tensor_map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
#endif
}

// Starts fetching a tensor map into the copy engine's descriptor cache, so
// that the first tma_load with it does not wait for that fetch as well.
__device__ __forceinline__ void tma_prefetch_descriptor(const void* tensor_map) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(tensor_map) : "memory");
#endif
}

// Orders this thread's earlier generic-proxy shared-memory writes before
// later async-proxy (tensor copy) accesses of the same memory.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

}  // namespace ptx
}  // namespace fastattn
