// Registration of the C++ CPU backend's two passes as torch operators (torch.ops.tokpo_cpp.*).
// The Python side (tokpo_kernels/backends/cpp.py) validates everything user-facing before calling
// these; the checks here only guard the layout the kernels assume.
#include "tile_common.h"

#include <torch/library.h>

#include <string>

// The build passes -DTOKPO_TORCH_VERSION=<torch.__version__> unquoted (a quoted define does not
// survive the build file's quoting); it is turned into a string here.
#define TOKPO_STRINGIFY_(x) #x
#define TOKPO_STRINGIFY(x) TOKPO_STRINGIFY_(x)
#ifdef TOKPO_TORCH_VERSION
#define TOKPO_TORCH_VERSION_STRING TOKPO_STRINGIFY(TOKPO_TORCH_VERSION)
#else
#define TOKPO_TORCH_VERSION_STRING "unknown"
#endif

namespace tokpo_cpp {

namespace {

void check_head(const char* name, const at::Tensor& hidden, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), name, ": expected CPU tensors");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), name,
              ": expected hidden (N, D) and weight (V, D), got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), name, ": expected contiguous hidden and weight");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), name, ": hidden and weight must share a dtype");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == weight.size(0), name,
                ": expected a contiguous float32 bias of ", weight.size(0), " entries");
  }
}

void check_rows(const at::Tensor& hidden, const at::Tensor& rows, const at::Tensor& ids) {
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(),
              "rows: expected a contiguous int64 vector");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == hidden.size(0) && ids.is_contiguous(),
              "ids: expected contiguous int64 (N, J) ids");
}

void check_blocks(int64_t block_rows, int64_t block_cols) {
  TORCH_CHECK(block_rows > 0 && block_cols > 0, "block sizes must be positive, got ", block_rows, " x ", block_cols);
}

std::vector<at::Tensor> forward_checked(const at::Tensor& hidden, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& ref_hidden,
                                        const std::optional<at::Tensor>& ref_weight,
                                        const std::optional<at::Tensor>& ref_bias, const at::Tensor& rows,
                                        const at::Tensor& ids, double temperature, std::optional<double> softcap,
                                        bool kl, bool entropy, bool max_logit, bool logit_sum, int64_t block_rows,
                                        int64_t block_cols) {
  check_head("policy", hidden, weight, bias);
  const bool has_ref = ref_hidden.has_value() && ref_hidden->defined();
  if (has_ref) {
    check_head("reference", *ref_hidden, *ref_weight, ref_bias);
    TORCH_CHECK(ref_hidden->size(0) == hidden.size(0) && ref_weight->size(0) == weight.size(0),
                "reference: expected the policy's N and V");
  }
  TORCH_CHECK(!kl || has_ref, "kl needs a reference head");
  check_rows(hidden, rows, ids);
  check_blocks(block_rows, block_cols);
  return forward_stats(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows, ids, temperature, softcap, kl,
                       entropy, max_logit, logit_sum, block_rows, block_cols);
}

std::vector<at::Tensor> backward_checked(const at::Tensor& hidden, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& ref_hidden,
                                         const std::optional<at::Tensor>& ref_weight,
                                         const std::optional<at::Tensor>& ref_bias, const at::Tensor& rows,
                                         const at::Tensor& ids, const at::Tensor& lse,
                                         const std::optional<at::Tensor>& ref_lse,
                                         const std::optional<at::Tensor>& entropy, const at::Tensor& g_lse,
                                         const at::Tensor& g_tgt, const std::optional<at::Tensor>& g_kl,
                                         const std::optional<at::Tensor>& g_entropy,
                                         const std::optional<at::Tensor>& g_logit_sum, double temperature,
                                         std::optional<double> softcap, bool need_dh, bool need_dw, bool need_db,
                                         int64_t block_rows, int64_t block_cols, int64_t partial_bytes) {
  check_head("policy", hidden, weight, bias);
  const bool has_kl = g_kl.has_value() && g_kl->defined();
  if (has_kl) {
    TORCH_CHECK(ref_hidden.has_value() && ref_lse.has_value(), "g_kl needs the reference head and its lse");
    check_head("reference", *ref_hidden, *ref_weight, ref_bias);
  }
  TORCH_CHECK(!(g_entropy.has_value() && g_entropy->defined()) || entropy.has_value(), "g_entropy needs the entropy");
  for (const at::Tensor* t : {&lse, &g_lse, &g_tgt}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "saved statistics and cotangents: expected "
                "contiguous float32 tensors");
  }
  check_rows(hidden, rows, ids);
  check_blocks(block_rows, block_cols);
  TORCH_CHECK(partial_bytes > 0, "partial_bytes must be positive");
  return backward_grads(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows, ids, lse, ref_lse, entropy,
                        g_lse, g_tgt, g_kl, g_entropy, g_logit_sum, temperature, softcap, need_dh, need_dw, need_db,
                        block_rows, block_cols, partial_bytes);
}

// What the library was compiled against and for: the loader compares the torch version with the
// running one (a prebuilt library from another torch is rebuilt), and the vector width is reported
// by `python -m tokpo_kernels.build`.
std::string build_info() {
  return std::string("torch=") + TOKPO_TORCH_VERSION_STRING + ";vector_floats=" + std::to_string(Vec::size());
}

}  // namespace

TORCH_LIBRARY(tokpo_cpp, m) {
  m.def(
      "forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor? ref_hidden, Tensor? ref_weight, Tensor? ref_bias, "
      "Tensor rows, Tensor ids, float temperature, float? softcap, bool kl, bool entropy, bool max_logit, "
      "bool logit_sum, int block_rows, int block_cols) -> Tensor[]");
  m.def(
      "backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor? ref_hidden, Tensor? ref_weight, Tensor? ref_bias, "
      "Tensor rows, Tensor ids, Tensor lse, Tensor? ref_lse, Tensor? entropy, Tensor g_lse, Tensor g_tgt, "
      "Tensor? g_kl, Tensor? g_entropy, Tensor? g_logit_sum, float temperature, float? softcap, bool need_dh, "
      "bool need_dw, bool need_db, int block_rows, int block_cols, int partial_bytes) -> Tensor[]");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(tokpo_cpp, CPU, m) {
  m.impl("forward", &forward_checked);
  m.impl("backward", &backward_checked);
}

}  // namespace tokpo_cpp
