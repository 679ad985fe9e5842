// Forward pass of the C++ CPU backend: per-token statistics of softmax(z) without the N x V logits.
//
// Each thread takes blocks of token rows; for each block it walks the vocabulary in tiles
// (tile_common.h), computes the tile's logits by one GEMM with fp32 output, and folds them into
// running per-token statistics, one vector of tokens at a time. With c the running shift (the
// running max m, or 0 while m = -inf), d = max(z - c, lowest) and e = exp(d):
//
//   s = sum e                          -> lse = c + log s
//   t = sum e * d                      -> H   = log s - t / s
//   u = sum e_r * (d_r - d)            -> KL(ref || policy) = u / s_r + log s - log s_r
//
// When a tile raises the max from c to c' every running sum is rescaled by a = exp(c - c') and
// the shifted terms move by the change of shift:  s' = a s,  t' = a (t + s (c - c')),
// u' = a_r (u + s_r ((c_r - c_r') - (c - c'))). Nothing is formed as log(softmax), so a
// probability that underflows gives no NaN, and bitwise-equal policy and reference give KL = 0.
#include "tile_common.h"

#include <ATen/Parallel.h>

namespace tokpo_cpp {
namespace {

struct ForwardOut {
  float *tgt, *lse, *ref_tgt, *ref_lse, *kl, *ent, *zmax, *zsum;
};

// The running statistics of one block of tokens, one entry per lane.
struct Running {
  std::vector<float> m, c, s, t, zsum, cr, sr, u;
  explicit Running(int64_t ld)
      : m(ld, kNegInf), c(ld, 0.f), s(ld, 0.f), t(ld, 0.f), zsum(ld, 0.f), cr(ld, 0.f), sr(ld, 0.f), u(ld, 0.f) {}
};

// The new shift of a lane whose max is now m: m itself, or 0 while no finite logit was seen.
inline Vec shift_of(const Vec& m) { return Vec::blendv(m, Vec(0.f), m == Vec(kNegInf)); }

// exp(c_old - c_new) where the lane has mass, 0 where it has none (its old shift was a stand-in).
inline Vec rescale(const Vec& c_old, const Vec& c_new, const Vec& s_old) {
  return Vec::blendv((c_old - c_new).exp(), Vec(0.f), s_old == Vec(0.f));
}

// Folds one policy tile P (and reference tile R when non-null) of bv rows into the running state.
void fold_tile(const float* P, const float* R, int64_t bv, int64_t ld, bool entropy, bool kl, bool finite,
               bool logit_sum, Running& st) {
  const Vec lowest(kLowest);
  const bool finite_r = kl;
  for (int64_t r = 0; r < ld; r += Vec::size()) {
    // Pass 1: the tile's max per lane, and the new shifts.
    Vec mt(kNegInf), mtr(kNegInf);
    for (int64_t v = 0; v < bv; ++v) {
      mt = at::vec::maximum(mt, Vec::loadu(P + v * ld + r));
      if (R) mtr = at::vec::maximum(mtr, Vec::loadu(R + v * ld + r));
    }
    const Vec m_new = at::vec::maximum(Vec::loadu(&st.m[r]), mt);
    const Vec c_old = Vec::loadu(&st.c[r]), c_new = shift_of(m_new);
    const Vec s_old = Vec::loadu(&st.s[r]);
    const Vec a = rescale(c_old, c_new, s_old);
    Vec cr_old(0.f), cr_new(0.f), sr_old(0.f), ar(0.f);
    if (R) {
      cr_old = Vec::loadu(&st.cr[r]);
      sr_old = Vec::loadu(&st.sr[r]);
      // A lane without mass has seen only -inf (its shift 0 is a stand-in): its max is the tile's.
      cr_new = shift_of(Vec::blendv(at::vec::maximum(cr_old, mtr), mtr, sr_old == Vec(0.f)));
      ar = rescale(cr_old, cr_new, sr_old);
    }
    // Pass 2: exponentials and the running sums.
    Vec es(0.f), ets(0.f), zs(0.f), esr(0.f), eu(0.f);
    for (int64_t v = 0; v < bv; ++v) {
      const Vec z = Vec::loadu(P + v * ld + r);
      Vec d = z - c_new;
      if (finite) d = at::vec::maximum(d, lowest);
      const Vec e = d.exp();
      es = es + e;
      if (entropy) ets = at::vec::fmadd(e, d, ets);
      if (logit_sum) zs = zs + z;
      if (R) {
        Vec dr = Vec::loadu(R + v * ld + r) - cr_new;
        if (finite_r) dr = at::vec::maximum(dr, lowest);
        const Vec er = dr.exp();
        esr = esr + er;
        if (kl) eu = at::vec::fmadd(er, dr - d, eu);
      }
    }
    at::vec::maximum(Vec::loadu(&st.m[r]), mt).store(&st.m[r]);
    c_new.store(&st.c[r]);
    (a * s_old + es).store(&st.s[r]);
    if (entropy) (a * (Vec::loadu(&st.t[r]) + s_old * (c_old - c_new)) + ets).store(&st.t[r]);
    if (logit_sum) (Vec::loadu(&st.zsum[r]) + zs).store(&st.zsum[r]);
    if (R) {
      if (kl) {
        const Vec shift_change = (cr_old - cr_new) - (c_old - c_new);
        (ar * (Vec::loadu(&st.u[r]) + sr_old * shift_change) + eu).store(&st.u[r]);
      }
      cr_new.store(&st.cr[r]);
      (ar * sr_old + esr).store(&st.sr[r]);
    }
  }
}

// tgt[row, j] = tile[y - v0, lane] for every owned target y in [v0, v0 + bv).
void gather_targets(const float* tile, int64_t v0, int64_t bv, int64_t ld, const int64_t* rows, int64_t br,
                    const int64_t* ids, int64_t J, float* tgt) {
  for (int64_t r = 0; r < br; ++r) {
    const int64_t row = rows[r];
    for (int64_t j = 0; j < J; ++j) {
      const int64_t y = ids[row * J + j];
      if (y >= v0 && y < v0 + bv) tgt[row * J + j] = tile[(y - v0) * ld + r];
    }
  }
}

}  // namespace

std::vector<at::Tensor> forward_stats(const at::Tensor& hidden, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& ref_hidden,
                                      const std::optional<at::Tensor>& ref_weight,
                                      const std::optional<at::Tensor>& ref_bias, const at::Tensor& rows,
                                      const at::Tensor& ids, double temperature, std::optional<double> softcap,
                                      bool kl, bool entropy, bool max_logit, bool logit_sum, int64_t block_rows,
                                      int64_t block_cols) {
  const int64_t N = hidden.size(0), V = weight.size(0), J = ids.size(1), nv = rows.size(0);
  const bool has_ref = ref_hidden.has_value() && ref_hidden->defined();
  Options o;
  o.inv_temperature = static_cast<float>(1.0 / temperature);
  o.has_softcap = softcap.has_value();
  o.softcap = o.has_softcap ? static_cast<float>(*softcap) : 0.f;
  const Head pol = make_head(hidden, weight, bias);
  Head ref;
  if (has_ref) ref = make_head(*ref_hidden, *ref_weight, ref_bias);

  const auto f32 = hidden.options().dtype(at::kFloat);
  auto empty = at::empty({0}, f32);
  auto tgt = at::zeros({N, J}, f32), lse = at::zeros({N}, f32);
  auto ref_tgt = has_ref ? at::zeros({N, J}, f32) : empty, ref_lse = has_ref ? at::zeros({N}, f32) : empty;
  auto kl_t = kl ? at::zeros({N}, f32) : empty, ent_t = entropy ? at::zeros({N}, f32) : empty;
  auto zmax_t = max_logit ? at::zeros({N}, f32) : empty, zsum_t = logit_sum ? at::zeros({N}, f32) : empty;
  ForwardOut out{tgt.data_ptr<float>(), lse.data_ptr<float>(), has_ref ? ref_tgt.data_ptr<float>() : nullptr,
                 has_ref ? ref_lse.data_ptr<float>() : nullptr, kl ? kl_t.data_ptr<float>() : nullptr,
                 entropy ? ent_t.data_ptr<float>() : nullptr, max_logit ? zmax_t.data_ptr<float>() : nullptr,
                 logit_sum ? zsum_t.data_ptr<float>() : nullptr};
  if (nv == 0) return {tgt, lse, ref_tgt, ref_lse, kl_t, ent_t, zmax_t, zsum_t};

  // Blocks of at most block_rows tokens, and at least one block per thread when there are enough rows.
  const int64_t W = Vec::size();
  const int64_t threads = at::get_num_threads();
  const int64_t br_max = std::max<int64_t>(W, std::min(block_rows, round_up((nv + threads - 1) / threads, W)));
  const int64_t nblocks = (nv + br_max - 1) / br_max;
  const int64_t bv_max = std::min(block_cols, V);
  const int64_t ld = round_up(br_max, W);
  const int64_t* rows_p = rows.data_ptr<int64_t>();
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  const bool finite = entropy || kl;

  at::parallel_for(0, nblocks, 1, [&](int64_t b_begin, int64_t b_end) {
    // Thread-local buffers: the gathered hidden rows (D x ld) of each head and one tile per head.
    std::vector<char> hT(pol.D * ld * elem_size(hidden.scalar_type()));
    std::vector<char> rhT(has_ref ? ref.D * ld * elem_size(ref.hidden.scalar_type()) : 0);
    std::vector<float> P(bv_max * ld, 0.f), R(has_ref ? bv_max * ld : 0, 0.f);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t k0 = b * br_max, br = std::min(br_max, nv - k0);
      const int64_t* brows = rows_p + k0;
      gather_rows_any(pol, brows, br, ld, hT.data(), nullptr);
      if (has_ref) gather_rows_any(ref, brows, br, ld, rhT.data(), nullptr);
      Running st(ld);
      for (int64_t v0 = 0; v0 < V; v0 += bv_max) {
        const int64_t bv = std::min(bv_max, V - v0);
        transformed_tile(pol, hT.data(), v0, bv, br, ld, o, P.data(), nullptr);
        gather_targets(P.data(), v0, bv, ld, brows, br, ids_p, J, out.tgt);
        if (has_ref) {
          transformed_tile(ref, rhT.data(), v0, bv, br, ld, o, R.data(), nullptr);
          gather_targets(R.data(), v0, bv, ld, brows, br, ids_p, J, out.ref_tgt);
        }
        fold_tile(P.data(), has_ref ? R.data() : nullptr, bv, ld, entropy, kl, finite, logit_sum, st);
      }
      for (int64_t r = 0; r < br; ++r) {
        const int64_t row = brows[r];
        const float log_s = std::log(st.s[r]);
        out.lse[row] = st.c[r] + log_s;
        if (entropy) out.ent[row] = log_s - st.t[r] / st.s[r];
        if (max_logit) out.zmax[row] = st.m[r];
        if (logit_sum) out.zsum[row] = st.zsum[r];
        if (has_ref) {
          const float log_sr = std::log(st.sr[r]);
          out.ref_lse[row] = st.cr[r] + log_sr;
          if (kl) out.kl[row] = std::max(st.u[r] / st.sr[r] + log_s - log_sr, 0.f);
        }
      }
    }
  });
  return {tgt, lse, ref_tgt, ref_lse, kl_t, ent_t, zmax_t, zsum_t};
}

}  // namespace tokpo_cpp
