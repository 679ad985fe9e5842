// Shared pieces of the two passes of the C++ CPU backend: the tile GEMM, the row gathers, the logit
// transform, and the per-call options. See docs/architecture.md ("The C++ CPU backend").
//
// Layout. A tile holds logits of `bv` vocabulary rows for a block of `br` token rows, stored
// vocabulary-major: tile[v * ld + r] (ld = br rounded up to the vector width). Every per-token
// statistic is then updated with whole vectors of tokens at a time (at::vec over r), and the
// three GEMMs of the backward are all plain row-major "NN" products, the only form
// at::native::cpublas::brgemm offers:
//   forward/backward  tile(bv x br)  = W[v0:v0+bv] (bv x D) . hT (D x br)
//   backward          dW[v0:v0+bv]  += dz_vr (bv x br) . h (br x D)
//   backward          dh(br x D)    += dz_rv (br x bv) . W[v0:v0+bv] (bv x D)
// with hT / h the block's gathered hidden rows in both orientations and dz_rv a transposed copy.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace tokpo_cpp {

using Vec = at::vec::Vectorized<float>;

// Lowest finite float: shifted logits of -inf are clamped to it where they multiply a
// probability (entropy, KL), so that 0 * (-inf) = NaN never forms (e = exp(lowest) = 0).
constexpr float kLowest = std::numeric_limits<float>::lowest();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Row-major C(M x N) (+)= A(M x K) . B(K x N) with fp32 accumulation and fp32 output.
// cpublas::brgemm with is_vnni = false takes plain row-major operands on every machine: the
// library's BLAS for fp32 (MKL sgemm on x86 builds), and its bf16/fp16 x bf16/fp16 -> fp32 gemm
// (oneDNN on CPUs with AVX-512-BF16/AMX, a vectorised reference loop elsewhere) for 16-bit inputs.
// Called from inside a parallel region, each of them runs on the calling thread only.
template <typename T>
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                    float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

// The non-tensor options of one call (ImplParams on the Python side).
struct Options {
  float inv_temperature = 1.f;
  bool has_softcap = false;
  float softcap = 0.f;
  int64_t block_rows = 128;
  int64_t block_cols = 512;
  bool transformed() const { return has_softcap || inv_temperature != 1.f; }
};

// One lm head: hidden (N x D), weight (V x D), optional bias (V, fp32), all contiguous.
struct Head {
  at::Tensor hidden, weight;
  const float* bias = nullptr;
  int64_t D = 0;
};

inline Head make_head(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  Head h{hidden, weight, nullptr, hidden.size(1)};
  if (bias.has_value() && bias->defined()) h.bias = bias->data_ptr<float>();
  return h;
}

// Gathers `br` token rows (indices rows[0..br)) of a (N x D) matrix into hT (D x ld, token-minor:
// the B operand of the logit GEMM) and, when `h_rows` is given, into h_rows (br x D: the B operand
// of the dW GEMM).
template <typename T>
inline void gather_rows(const T* hidden, int64_t D, const int64_t* rows, int64_t br, int64_t ld, T* hT, T* h_rows) {
  for (int64_t r = 0; r < br; ++r) {
    const T* src = hidden + rows[r] * D;
    for (int64_t d = 0; d < D; ++d) hT[d * ld + r] = src[d];
    if (h_rows != nullptr) std::copy(src, src + D, h_rows + r * D);
  }
}

// tile(bv x ld) = raw logits of vocabulary rows [v0, v0 + bv) for the gathered block (br tokens).
template <typename T>
inline void logit_tile(const Head& head, const T* hT, int64_t v0, int64_t bv, int64_t br, int64_t ld, float* tile) {
  const T* w = head.weight.data_ptr<T>() + v0 * head.D;
  // (bv x D) . (D x br) -> (bv x br) in a tile of leading dimension ld
  gemm_nn<T>(bv, br, head.D, w, head.D, hT, ld, tile, ld, /*accumulate=*/false);
}

// In place over one tile row of `ld` lanes (a multiple of the vector width; lanes past the block's
// tokens hold values nobody reads): raw + bias -> z = softcap * tanh(raw / softcap) / temperature.
// `th` (when non-null) receives tanh(raw / softcap), which the backward needs for
// dz/draw = (1 - th^2) / temperature.
inline void transform_row(float* row, int64_t ld, float bias, const Options& o, float* th) {
  const Vec vb(bias), vcap(o.softcap), vinvcap(o.has_softcap ? 1.f / o.softcap : 0.f), vinvt(o.inv_temperature);
  for (int64_t r = 0; r < ld; r += Vec::size()) {
    Vec z = Vec::loadu(row + r) + vb;
    if (o.has_softcap) {
      Vec t = (z * vinvcap).tanh();
      if (th != nullptr) t.store(th + r);
      z = vcap * t;
    }
    if (o.inv_temperature != 1.f) z = z * vinvt;
    z.store(row + r);
  }
}

// The element type's size, for the type-erased buffers below.
inline int64_t elem_size(at::ScalarType t) { return static_cast<int64_t>(c10::elementSize(t)); }

// gather_rows / logit_tile for a head of any supported dtype (float, bfloat16, half).
#define TOKPO_DISPATCH_HEAD(dtype, ...)                                            \
  switch (dtype) {                                                                  \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__; break; }                \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__; break; }      \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__; break; }              \
    default: TORCH_CHECK(false, "tokpo_cpp: unsupported dtype ", dtype);           \
  }

inline void gather_rows_any(const Head& head, const int64_t* rows, int64_t br, int64_t ld, void* hT, void* h_rows) {
  TOKPO_DISPATCH_HEAD(head.hidden.scalar_type(),
                      gather_rows<scalar_t>(head.hidden.data_ptr<scalar_t>(), head.D, rows, br, ld,
                                            static_cast<scalar_t*>(hT), static_cast<scalar_t*>(h_rows)));
}

inline void logit_tile_any(const Head& head, const void* hT, int64_t v0, int64_t bv, int64_t br, int64_t ld,
                           float* tile) {
  TOKPO_DISPATCH_HEAD(head.hidden.scalar_type(),
                      logit_tile<scalar_t>(head, static_cast<const scalar_t*>(hT), v0, bv, br, ld, tile));
}

// Raw logits of a tile, then the bias and the logit transform, row by row.
inline void transformed_tile(const Head& head, const void* hT, int64_t v0, int64_t bv, int64_t br, int64_t ld,
                             const Options& o, float* tile, float* th) {
  logit_tile_any(head, hT, v0, bv, br, ld, tile);
  if (head.bias == nullptr && !o.transformed()) return;
  for (int64_t v = 0; v < bv; ++v) {
    transform_row(tile + v * ld, ld, head.bias ? head.bias[v0 + v] : 0.f, o, th ? th + v * ld : nullptr);
  }
}

// The two passes (forward.cpp, backward.cpp), declared once for their definitions and ops.cpp.
std::vector<at::Tensor> forward_stats(const at::Tensor& hidden, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& ref_hidden,
                                      const std::optional<at::Tensor>& ref_weight,
                                      const std::optional<at::Tensor>& ref_bias, const at::Tensor& rows,
                                      const at::Tensor& ids, double temperature, std::optional<double> softcap,
                                      bool kl, bool entropy, bool max_logit, bool logit_sum, int64_t block_rows,
                                      int64_t block_cols);

std::vector<at::Tensor> backward_grads(const at::Tensor& hidden, const at::Tensor& weight,
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
                                       int64_t block_rows, int64_t block_cols, int64_t partial_bytes);

}  // namespace tokpo_cpp
