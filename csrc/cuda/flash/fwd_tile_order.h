// The order in which a persistent forward grid walks its (query block, head,
// batch) tiles: CTA c takes tiles c, c + gridDim.x, ... of this order.
//
// Tiles are grouped in sections of `section` (batch, head) pairs; inside a
// section the query block changes slowest and the pair fastest, so the CTAs
// running at one time read the K/V of few heads (L2 reuse). Without
// longest_first a section is one pair and blocks go in ascending order.
// With longest_first (causal / windows: work grows with the query block) the
// blocks go from the last down, so the longest tiles start first and the
// short ones fill the tail, and sections are sized on the host so that their
// K/V fit in about half the L2.
#pragma once
#include <cstdint>

namespace fastattn {
namespace gpu {

struct FwdTileOrder {
  int num_m = 0;      // query blocks per (batch, head)
  int pairs = 0;      // batch * heads
  int heads = 1;
  int tiles = 0;      // num_m * pairs (< 2^31, checked by make)
  int section = 1;    // (batch, head) pairs per section
  bool longest_first = false;

  // kv_bytes_per_pair: the K/V bytes one (batch, head) reads (shared by a GQA group).
  static bool make(FwdTileOrder& o, int num_m, int heads, int batch, bool longest_first,
                   int64_t kv_bytes_per_pair, int64_t l2_bytes) {
    const int64_t pairs = int64_t(heads) * batch;
    const int64_t tiles = pairs * num_m;
    if (num_m <= 0 || pairs <= 0 || tiles >= (int64_t{1} << 31)) return false;
    o.num_m = num_m;
    o.pairs = static_cast<int>(pairs);
    o.heads = heads;
    o.tiles = static_cast<int>(tiles);
    o.longest_first = longest_first;
    int64_t s = 1;
    if (longest_first && kv_bytes_per_pair > 0) s = (l2_bytes / 2) / kv_bytes_per_pair;
    o.section = static_cast<int>(s < 1 ? 1 : (s > pairs ? pairs : s));
    return true;
  }

  // Tile t in [0, tiles) -> (batch, head, query block); a bijection
  // (cpp_test/smoke.cpp checks it on the host).
#if defined(__CUDACC__)
  __host__ __device__
#endif
  inline void coords(int t, int& b, int& h, int& m) const {
    const int per_section = section * num_m;
    const int sec = t / per_section;
    const int within = t - sec * per_section;
    const int first = sec * section;
    const int width = pairs - first < section ? pairs - first : section;
    const int mi = within / width;
    const int pair = first + (within - mi * width);
    m = longest_first ? num_m - 1 - mi : mi;
    b = pair / heads;
    h = pair - b * heads;
  }
};

}  // namespace gpu
}  // namespace fastattn
