// Backward pass of the C++ CPU backend: input gradients from per-token cotangents, recomputing the
// logit tiles instead of storing them.
//
// Gradient (docs/methods.md, section 1). With l = log p = z - lse, p = exp(l), q = exp(z_r - lse_r):
//
//   dL/dz = (g_lse + g_kl) p - g_kl q + sum_j g_j e_{y_j} - g_H p (l + H) + g_sum
//
// because d lse/dz = p, d z_y/dz = e_y, d KL(q || p)/dz = p - q (q is constant), dH/dz = -p (l + H)
// and d(sum_v z_v)/dz = 1. Through the transform z = c tanh(r / c) / T: dz/dr = (1 - tanh^2(r/c)) / T.
// Then dh = dL/dr . W, dW = (dL/dr)^T . h, db = sum over tokens of dL/dr.
//
// Parallel layout, with no atomics: the vocabulary is split into one contiguous range of tiles per
// task; a task owns dW and db of its range outright (each row written by one task), and adds its
// share of dh into a private (tokens x D) partial. The partials are summed in task order at the
// end, so the result is bitwise reproducible for a given thread count. When the partials would
// exceed `partial_bytes`, the tokens are processed in groups that fit.
#include "tile_common.h"

#include <ATen/Parallel.h>

namespace tokpo_cpp {
namespace {

// Per-token cotangents and saved statistics of one block, one entry per lane (0 past the block).
struct RowTerms {
  std::vector<float> lse, gp, gk, gh, h, rlse, gsum;
  explicit RowTerms(int64_t ld) : lse(ld, 0.f), gp(ld, 0.f), gk(ld, 0.f), gh(ld, 0.f), h(ld, 0.f), rlse(ld, 0.f), gsum(ld, 0.f) {}
};

struct Cotangents {
  const float *lse, *ref_lse, *entropy, *g_lse, *g_tgt, *g_kl, *g_ent, *g_sum;
};

// dL/draw in place of the policy logits P (bv x ld); R holds the reference logits when g_kl flows,
// TH the tanh of the softcap.
void dz_tile(float* P, const float* R, const float* TH, int64_t bv, int64_t ld, const RowTerms& t, const Cotangents& c,
             const Options& o) {
  const Vec zero(0.f), one(1.f), invt(o.inv_temperature);
  for (int64_t r = 0; r < ld; r += Vec::size()) {
    const Vec lse = Vec::loadu(&t.lse[r]), gp = Vec::loadu(&t.gp[r]);
    const Vec gk = Vec::loadu(&t.gk[r]), gh = Vec::loadu(&t.gh[r]), H = Vec::loadu(&t.h[r]);
    const Vec rlse = Vec::loadu(&t.rlse[r]), gsum = Vec::loadu(&t.gsum[r]);
    for (int64_t v = 0; v < bv; ++v) {
      float* at = P + v * ld + r;
      const Vec l = Vec::loadu(at) - lse;
      const Vec p = l.exp();
      Vec dz;
      if (c.g_ent) {
        dz = p * (gp - gh * (l + H));
        dz = Vec::blendv(dz, zero, p == zero);  // a masked logit (l = -inf) contributes 0, not 0 * inf
      } else {
        dz = p * gp;
      }
      if (c.g_kl) dz = dz - gk * (Vec::loadu(R + v * ld + r) - rlse).exp();
      if (c.g_sum) dz = dz + gsum;
      if (o.has_softcap) {
        const Vec th = Vec::loadu(TH + v * ld + r);
        dz = dz * (one - th * th) * invt;
      } else if (o.inv_temperature != 1.f) {
        dz = dz * invt;
      }
      dz.store(at);
    }
  }
}

// The d z_y / d raw factor at one element (1 without a transform).
inline float transform_factor(const float* TH, int64_t idx, const Options& o) {
  if (o.has_softcap) return (1.f - TH[idx] * TH[idx]) * o.inv_temperature;
  return o.inv_temperature;
}

template <typename T>
struct Worker {
  const Head& pol;
  const Head* ref;  // non-null when g_kl flows
  const Options& o;
  const Cotangents& c;
  const int64_t* rows;
  const int64_t* ids;
  int64_t J, ld, br_max, bv_max;
  float* dw;  // (V x D) or null
  float* db;  // (V) or null

  // Tiles [t_begin, t_end) of the vocabulary, tokens [k_begin, k_end) of `rows`; dh partial (k x D) or null.
  void run(int64_t t_begin, int64_t t_end, int64_t k_begin, int64_t k_end, float* dh_part) const {
    const int64_t D = pol.D, V = pol.weight.size(0);
    const T* w = pol.weight.template data_ptr<T>();
    std::vector<T> hT(D * ld), h_rows(br_max * D), dz_vr(std::is_same_v<T, float> ? 0 : bv_max * ld);
    std::vector<T> dz_rv(br_max * bv_max);
    std::vector<char> rhT(ref ? ref->D * ld * elem_size(ref->hidden.scalar_type()) : 0);
    std::vector<float> P(bv_max * ld, 0.f), R(ref ? bv_max * ld : 0, 0.f), TH(o.has_softcap ? bv_max * ld : 0, 0.f);
    const bool need_dw = dw != nullptr, need_dh = dh_part != nullptr;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += br_max) {
      const int64_t br = std::min(br_max, k_end - k0);
      const int64_t* brows = rows + k0;
      gather_rows<T>(pol.hidden.template data_ptr<T>(), D, brows, br, ld, hT.data(), need_dw ? h_rows.data() : nullptr);
      if (ref) gather_rows_any(*ref, brows, br, ld, rhT.data(), nullptr);
      RowTerms t(ld);
      for (int64_t r = 0; r < br; ++r) {
        const int64_t row = brows[r];
        t.lse[r] = c.lse[row];
        t.gp[r] = c.g_lse[row] + (c.g_kl ? c.g_kl[row] : 0.f);
        if (c.g_kl) { t.gk[r] = c.g_kl[row]; t.rlse[r] = c.ref_lse[row]; }
        if (c.g_ent) { t.gh[r] = c.g_ent[row]; t.h[r] = c.entropy[row]; }
        if (c.g_sum) t.gsum[r] = c.g_sum[row];
      }
      for (int64_t tile = t_begin; tile < t_end; ++tile) {
        const int64_t v0 = tile * bv_max, bv = std::min(bv_max, V - v0);
        transformed_tile(pol, hT.data(), v0, bv, br, ld, o, P.data(), o.has_softcap ? TH.data() : nullptr);
        if (ref) transformed_tile(*ref, rhT.data(), v0, bv, br, ld, o, R.data(), nullptr);
        dz_tile(P.data(), ref ? R.data() : nullptr, TH.data(), bv, ld, t, c, o);
        // The target terms sum_j g_j e_{y_j}, through the transform at the target element.
        for (int64_t r = 0; r < br; ++r) {
          const int64_t row = brows[r];
          for (int64_t j = 0; j < J; ++j) {
            const int64_t y = ids[row * J + j];
            if (y >= v0 && y < v0 + bv) {
              const int64_t idx = (y - v0) * ld + r;
              P[idx] += c.g_tgt[row * J + j] * transform_factor(TH.data(), idx, o);
            }
          }
        }
        if (db) {
          for (int64_t v = 0; v < bv; ++v) {
            float acc = 0.f;
            for (int64_t r = 0; r < br; ++r) acc += P[v * ld + r];
            db[v0 + v] += acc;
          }
        }
        // The GEMM operands in the input dtype: dz as (bv x ld) for dW, and transposed (br x bv) for dh.
        const T* a_vr;
        if constexpr (std::is_same_v<T, float>) {
          a_vr = P.data();
        } else {
          for (int64_t v = 0; v < bv; ++v)
            for (int64_t r = 0; r < br; ++r) dz_vr[v * ld + r] = static_cast<T>(P[v * ld + r]);
          a_vr = dz_vr.data();
        }
        if (need_dw) {
          // (bv x br) . (br x D) -> dW rows [v0, v0 + bv), accumulated over the token blocks
          gemm_nn<T>(bv, D, br, a_vr, ld, h_rows.data(), D, dw + v0 * D, D, /*accumulate=*/true);
        }
        if (need_dh) {
          for (int64_t r = 0; r < br; ++r)
            for (int64_t v = 0; v < bv; ++v) dz_rv[r * bv + v] = static_cast<T>(P[v * ld + r]);
          // (br x bv) . (bv x D) -> this task's dh partial of the block's tokens
          gemm_nn<T>(br, D, bv, dz_rv.data(), bv, w + v0 * D, D, dh_part + (k0 - k_begin) * D, D, /*accumulate=*/true);
        }
      }
    }
  }
};

}  // namespace

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
                                       int64_t block_rows, int64_t block_cols, int64_t partial_bytes) {
  const int64_t N = hidden.size(0), V = weight.size(0), D = hidden.size(1), J = ids.size(1), nv = rows.size(0);
  auto opt = [](const std::optional<at::Tensor>& t) -> const float* {
    return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
  };
  Options o;
  o.inv_temperature = static_cast<float>(1.0 / temperature);
  o.has_softcap = softcap.has_value();
  o.softcap = o.has_softcap ? static_cast<float>(*softcap) : 0.f;
  const Cotangents c{lse.data_ptr<float>(), opt(ref_lse), opt(entropy), g_lse.data_ptr<float>(),
                     g_tgt.data_ptr<float>(), opt(g_kl), opt(g_entropy), opt(g_logit_sum)};
  const Head pol = make_head(hidden, weight, bias);
  Head ref;
  if (c.g_kl) ref = make_head(*ref_hidden, *ref_weight, ref_bias);

  const auto f32 = hidden.options().dtype(at::kFloat);
  auto empty = at::empty({0}, f32);
  auto dh = need_dh ? at::zeros({N, D}, f32) : empty;
  auto dw = need_dw ? at::zeros({V, D}, f32) : empty;
  auto db = need_db ? at::zeros({V}, f32) : empty;
  if (nv == 0 || !(need_dh || need_dw || need_db)) return {dh, dw, db};

  const int64_t W = Vec::size();
  const int64_t br_max = std::max<int64_t>(W, std::min(block_rows, round_up(nv, W)));
  const int64_t ld = round_up(br_max, W);
  const int64_t bv_max = std::min(block_cols, V);
  const int64_t ntiles = (V + bv_max - 1) / bv_max;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntiles));
  // Tokens per group: every task's dh partial of a group within partial_bytes (at least one block).
  int64_t group = nv;
  if (need_dh && tasks * nv * D * 4 > partial_bytes) {
    group = std::max(br_max, partial_bytes / (tasks * D * 4) / br_max * br_max);
  }
  auto parts = need_dh ? at::empty({tasks, std::min(group, nv), D}, f32) : empty;

  auto run_all = [&](auto tag) {
    using T = decltype(tag);
    const Worker<T> worker{pol, c.g_kl ? &ref : nullptr, o, c, rows.data_ptr<int64_t>(), ids.data_ptr<int64_t>(),
                           J, ld, br_max, bv_max, need_dw ? dw.data_ptr<float>() : nullptr,
                           need_db ? db.data_ptr<float>() : nullptr};
    for (int64_t g0 = 0; g0 < nv; g0 += group) {
      const int64_t g1 = std::min(nv, g0 + group);
      if (need_dh) parts.zero_();
      at::parallel_for(0, tasks, 1, [&](int64_t i_begin, int64_t i_end) {
        for (int64_t i = i_begin; i < i_end; ++i) {
          float* part = need_dh ? parts[i].data_ptr<float>() : nullptr;
          worker.run(i * ntiles / tasks, (i + 1) * ntiles / tasks, g0, g1, part);
        }
      });
      if (need_dh) {
        // dh[row] = sum of the task partials, in task order.
        const float* pp = parts.data_ptr<float>();
        float* out = dh.data_ptr<float>();
        const int64_t* rows_p = rows.data_ptr<int64_t>();
        const int64_t gsize = parts.size(1);
        at::parallel_for(g0, g1, 16, [&](int64_t k_begin, int64_t k_end) {
          for (int64_t k = k_begin; k < k_end; ++k) {
            float* dst = out + rows_p[k] * D;
            for (int64_t i = 0; i < tasks; ++i) {
              const float* src = pp + (i * gsize + (k - g0)) * D;
              for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
            }
          }
        });
      }
    }
  };
  switch (hidden.scalar_type()) {
    case at::kFloat: run_all(float{}); break;
    case at::kBFloat16: run_all(at::BFloat16{}); break;
    case at::kHalf: run_all(at::Half{}); break;
    default: TORCH_CHECK(false, "tokpo_cpp: unsupported dtype ", hidden.scalar_type());
  }
  return {dh, dw, db};
}

}  // namespace tokpo_cpp
