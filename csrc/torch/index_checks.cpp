#include "torch/index_checks.h"

#include <algorithm>
#include <string>

namespace fastattn {

namespace {
// Index dtypes by the names users write (torch.int32), not c10's ("Int").
std::string index_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    default: return c10::toString(t);
  }
}
}  // namespace

void check_index_tensor(const at::Tensor& t, const at::Tensor& q, const char* name,
                        at::ScalarType dtype, int64_t rank, int64_t size0) {
  TORCH_CHECK(t.dim() == rank, "fastattn: ", name, " must be ", rank, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.size(0) == size0, "fastattn: ", name, " must have ", size0,
              " rows (one per sequence), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastattn: ", name, " must be ", index_dtype_name(dtype),
              ", got ", index_dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == q.device(), "fastattn: ", name, " is on ", t.device(),
              " but q is on ", q.device());
}

void check_index_values(const at::Tensor& t, const char* name, int64_t lo, int64_t hi,
                        const char* what) {
  if (!t.device().is_cpu()) return;
  const at::Tensor c = t.contiguous();
  const int32_t* v = c.data_ptr<int32_t>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK(v[i] >= lo && v[i] <= hi, "fastattn: ", name, " has value ", v[i],
                " at flat index ", i, ", outside [", lo, ", ", hi, "] (", what, ")");
  }
}

void check_cu_seqlens(const at::Tensor& cu, const at::Tensor& q, const char* name) {
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2, "fastattn: ", name,
              " must be 1-D of length batch + 1 >= 2, got shape ", cu.sizes());
  TORCH_CHECK(cu.scalar_type() == at::kInt, "fastattn: ", name, " must be int32, got ",
              cu.scalar_type());
  TORCH_CHECK(cu.device() == q.device(), "fastattn: ", name, " is on ", cu.device(),
              " but q is on ", q.device());
  TORCH_CHECK(cu.is_contiguous(), "fastattn: ", name, " must be contiguous");
}

void check_cu_seqlens_values(const at::Tensor& cu, const char* name, int64_t total_rows,
                             int64_t max_seqlen) {
  if (!cu.device().is_cpu()) return;
  auto acc = cu.accessor<int32_t, 1>();
  TORCH_CHECK(acc[0] == 0, "fastattn: ", name, "[0] must be 0, got ", acc[0]);
  for (int64_t b = 0; b + 1 < cu.size(0); ++b) {
    int64_t len = static_cast<int64_t>(acc[b + 1]) - acc[b];
    TORCH_CHECK(len >= 0, "fastattn: ", name, " must be non-decreasing, but ", name, "[", b + 1,
                "] = ", acc[b + 1], " < ", name, "[", b, "] = ", acc[b]);
    TORCH_CHECK(len <= max_seqlen, "fastattn: sequence ", b, " has length ", len,
                " per ", name, ", more than the max_seqlen ", max_seqlen, " passed with it");
  }
  TORCH_CHECK(acc[cu.size(0) - 1] == total_rows, "fastattn: ", name, "[-1] = ",
              acc[cu.size(0) - 1], " must equal the number of rows ", total_rows);
}

void check_block_table_values(const at::Tensor& block_table,
                              const std::optional<at::Tensor>& seqlens_k, int64_t block_size,
                              int64_t num_blocks) {
  if (!block_table.device().is_cpu()) return;
  const at::Tensor bt = block_table.contiguous();
  const int32_t* v = bt.data_ptr<int32_t>();
  const int64_t batch = bt.size(0), width = bt.size(1);
  at::Tensor lens;
  if (seqlens_k.has_value() && seqlens_k->device().is_cpu()) lens = seqlens_k->contiguous();
  for (int64_t b = 0; b < batch; ++b) {
    int64_t used = width;
    if (lens.defined()) {
      const int64_t len = std::max<int64_t>(0, lens.data_ptr<int32_t>()[b]);
      used = std::min(width, (len + block_size - 1) / block_size);
    }
    for (int64_t j = 0; j < used; ++j) {
      const int32_t page = v[b * width + j];
      TORCH_CHECK(page >= 0 && page < num_blocks, "fastattn: block_table[", b, ", ", j, "] = ",
                  page, " is not a block of the cache (num_blocks = ", num_blocks,
                  "); sequence ", b, " reads its first ", used, " blocks");
    }
  }
}

}  // namespace fastattn
