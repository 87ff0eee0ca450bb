// C++ CPU kernels of flythinker.kernels.latent_fuse, registered as torch custom ops
// (torch.ops.flythinker.latent_fuse_fwd / latent_fuse_bwd). Semantics: kernels/latent_fuse_naive.py.
//
//   e_t = E[x_t] + lam * m_{t-1} * (c / max(||h_{t-1}||, eps)) * P(h_{t-1})
//
// One pass per output row (at::parallel_for over B*T rows): gather E[x_t], take h_{t-1} (or prev_latent at
// t = 0), its L2 norm, rescale, pad (or add the precomputed P(h) of the "linear" projection), store.
// Accumulation in at::opmath_type (fp32 for fp16/bf16/fp32, fp64 for fp64 so gradcheck can run).
// Inner loops use at::vec::Vectorized (map2 / map_reduce_all), which compile to AVX2/AVX512 with -march=native.
// Rows whose mask is 0 skip the latent entirely (a plain copy of the embedding row).
//
// Contract with the Python wrapper (kernels/latent_fuse_cpp.py): input_ids int64 [B, T]; weight [V, H_g],
// latent [B, T, H_r], prev_latent [B, H_r] all of one floating dtype with unit stride on the last dim;
// mask float32 [B, T]; proj_* / grad_proj_src / row_scale in the accumulation dtype, contiguous.
// Values (ids in range, finite latents) are validated in Python before the call.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace flythinker {
namespace {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// A row as acc_t: the tensor's own memory when no conversion is needed, else converted into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

template <typename acc_t>
inline acc_t sumsq(const acc_t* x, int64_t n) {
  return at::vec::map_reduce_all<acc_t>([](Vec<acc_t> v) { return v * v; },
                                        [](Vec<acc_t> a, Vec<acc_t> b) { return a + b; }, x, n);
}

template <typename acc_t>
inline acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  return at::vec::map2_reduce_all<acc_t>([](Vec<acc_t> a, Vec<acc_t> b) { return a * b; },
                                         [](Vec<acc_t> a, Vec<acc_t> b) { return a + b; }, x, y, n);
}

// o[:n] = a[:n] + k * b[:n], written in scalar_t (through tmp when scalar_t != acc_t).
template <typename scalar_t, typename acc_t>
inline void axpy_store(scalar_t* o, const acc_t* a, acc_t k, const acc_t* b, int64_t n, acc_t* tmp) {
  const Vec<acc_t> kv(k);
  acc_t* dst = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(o) : tmp;
  at::vec::map2([kv](Vec<acc_t> x, Vec<acc_t> y) { return at::vec::fmadd(kv, y, x); }, dst, a, b, n);
  if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(tmp, o, n);
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> fwd_impl(const Tensor& ids, const Tensor& weight, const Tensor& latent,
                                    const c10::optional<Tensor>& mask, const c10::optional<Tensor>& prev,
                                    const c10::optional<Tensor>& plat, const c10::optional<Tensor>& pprev,
                                    double lam, int64_t norm_mode, double norm_const, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = ids.size(0), T = ids.size(1), Hg = weight.size(1), Hr = latent.size(2);
  Tensor out = at::empty({B, T, Hg}, weight.options());  // [B, T, H_g]
  Tensor rs = at::empty({B, T}, weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));  // [B, T]
  if (B * T == 0) return {out, rs};

  const int64_t* ids_p = ids.data_ptr<int64_t>();
  const int64_t is_b = ids.stride(0), is_t = ids.stride(1);
  const scalar_t* w_p = weight.data_ptr<scalar_t>();
  const int64_t ws_v = weight.stride(0);
  const scalar_t* l_p = latent.data_ptr<scalar_t>();
  const int64_t ls_b = latent.stride(0), ls_t = latent.stride(1);
  const bool has_mask = mask.has_value() && mask->defined();
  const float* m_p = has_mask ? mask->data_ptr<float>() : nullptr;
  const int64_t ms_b = has_mask ? mask->stride(0) : 0, ms_t = has_mask ? mask->stride(1) : 0;
  const bool has_prev = prev.has_value() && prev->defined();
  const scalar_t* p_p = has_prev ? prev->data_ptr<scalar_t>() : nullptr;
  const int64_t ps_b = has_prev ? prev->stride(0) : 0;
  const bool linear = plat.has_value() && plat->defined();
  const acc_t* q_p = linear ? plat->data_ptr<acc_t>() : nullptr;     // P(h) [B, T, H_g], contiguous
  const acc_t* qp_p = linear && has_prev ? pprev->data_ptr<acc_t>() : nullptr;  // P(prev) [B, H_g]
  scalar_t* o_p = out.data_ptr<scalar_t>();
  acc_t* rs_p = rs.data_ptr<acc_t>();
  const acc_t lam_a = static_cast<acc_t>(lam), c_const = static_cast<acc_t>(norm_const);
  const acc_t eps_a = static_cast<acc_t>(eps);

  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ebuf(Hg), sbuf(Hr), obuf(Hg);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T, t = row % T;
      const scalar_t* e_raw = w_p + ids_p[b * is_b + t * is_t] * ws_v;
      scalar_t* o = o_p + row * Hg;
      const scalar_t* s_raw = nullptr;  // h_{t-1}
      const acc_t* q = nullptr;         // P(h_{t-1}) for "linear"
      acc_t m = 0;
      if (t > 0) {
        s_raw = l_p + b * ls_b + (t - 1) * ls_t;
        m = has_mask ? static_cast<acc_t>(m_p[b * ms_b + (t - 1) * ms_t]) : acc_t(1);
        if (linear) q = q_p + (b * T + t - 1) * Hg;
      } else if (has_prev) {
        s_raw = p_p + b * ps_b;
        m = 1;
        if (linear) q = qp_p + b * Hg;
      }
      acc_t coef = 0;
      const acc_t* s = nullptr;
      const acc_t* e = nullptr;
      if (s_raw != nullptr && m != acc_t(0) && lam_a != acc_t(0)) {
        s = as_acc(s_raw, Hr, sbuf.data());
        e = as_acc(e_raw, Hg, ebuf.data());
        const acc_t n = std::sqrt(sumsq(s, Hr));
        const acc_t c = norm_mode == 1 ? std::sqrt(sumsq(e, Hg)) : c_const;
        coef = lam_a * m * c / std::max(n, eps_a);
      }
      rs_p[row] = coef;
      if (coef == acc_t(0)) {  // lam = 0, masked, or nothing to fuse: exactly E[x_t]
        std::memcpy(o, e_raw, Hg * sizeof(scalar_t));
      } else if (linear) {
        axpy_store<scalar_t, acc_t>(o, e, coef, q, Hg, obuf.data());
      } else {  // "pad": the latent lands in the first H_r channels, the rest is E[x_t]
        axpy_store<scalar_t, acc_t>(o, e, coef, s, Hr, obuf.data());
        std::memcpy(o + Hr, e_raw + Hr, (Hg - Hr) * sizeof(scalar_t));
      }
    }
  });
  return {out, rs};
}

// Backward. Per slot t with row scale k = lam * m * c / max(n, eps) and gp = P^T g (g[:H_r] for "pad"):
//   dL/dh_{t-1} = k * gp                                    (detach_norm)
//               = k * (gp - (gp . s) / n^2 * s)             (full: d(1/n)/ds = -s / n^3; none when n < eps)
//   dL/dE[x_t]  = g (+ k * (gp . s) / c^2 * E[x_t] for norm "token" without detach: dc/de = e / c)
// The weight gradient is a scatter-add over rows; threads own disjoint column ranges, so no atomics and
// the result is deterministic.
template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> bwd_impl(const Tensor& g_in, const Tensor& ids, const Tensor& weight,
                                            const Tensor& latent, const c10::optional<Tensor>& prev,
                                            const c10::optional<Tensor>& gproj, const Tensor& rs,
                                            int64_t norm_mode, double eps, bool detach_norm, bool need_latent,
                                            bool need_prev, bool need_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tensor g = g_in.contiguous();  // [B, T, H_g]
  const int64_t B = ids.size(0), T = ids.size(1), V = weight.size(0), Hg = weight.size(1);
  const int64_t Hr = latent.size(2);
  const bool has_prev = prev.has_value() && prev->defined();
  const bool linear = gproj.has_value() && gproj->defined();
  const bool token_full = norm_mode == 1 && !detach_norm && need_weight;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  // Outputs not asked for are empty (not undefined) tensors, so the fake kernel can mirror them.
  Tensor glat = at::empty({need_latent ? B : 0, T, Hr}, latent.options());
  Tensor gprev = at::empty({need_prev && has_prev ? B : 0, Hr}, latent.options());
  Tensor gw = need_weight ? at::zeros({V, Hg}, weight.options().dtype(acc_dtype))
                          : at::empty({0, Hg}, weight.options().dtype(acc_dtype));
  Tensor gcoef = token_full ? at::zeros({B * T}, weight.options().dtype(acc_dtype)) : Tensor();
  if (B * T == 0) return {glat, gprev, gw};

  const scalar_t* g_p = g.data_ptr<scalar_t>();
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  const int64_t is_b = ids.stride(0), is_t = ids.stride(1);
  const scalar_t* w_p = weight.data_ptr<scalar_t>();
  const int64_t ws_v = weight.stride(0);
  const scalar_t* l_p = latent.data_ptr<scalar_t>();
  const int64_t ls_b = latent.stride(0), ls_t = latent.stride(1);
  const scalar_t* p_p = has_prev ? prev->data_ptr<scalar_t>() : nullptr;
  const int64_t ps_b = has_prev ? prev->stride(0) : 0;
  const acc_t* gq_p = linear ? gproj->data_ptr<acc_t>() : nullptr;  // P^T g [B, T, H_r]
  const acc_t* rs_p = rs.data_ptr<acc_t>();
  scalar_t* gl_p = need_latent ? glat.data_ptr<scalar_t>() : nullptr;
  scalar_t* gp_p = gprev.numel() > 0 ? gprev.data_ptr<scalar_t>() : nullptr;
  acc_t* gc_p = token_full ? gcoef.data_ptr<acc_t>() : nullptr;
  const acc_t eps_a = static_cast<acc_t>(eps);

  if (need_latent || gp_p != nullptr || token_full) {
    at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> gbuf(Hr), sbuf(Hr), ebuf(Hg), obuf(Hr);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / T, t = row % T;
        if (need_latent && t == T - 1) std::fill_n(gl_p + row * Hr, Hr, scalar_t(0));  // h_{T-1}: unused
        scalar_t* dst = nullptr;  // where dL/dh_{t-1} goes
        const scalar_t* s_raw = nullptr;
        if (t > 0) {
          s_raw = l_p + b * ls_b + (t - 1) * ls_t;
          if (need_latent) dst = gl_p + row * Hr - Hr;
        } else if (has_prev) {
          s_raw = p_p + b * ps_b;
          dst = gp_p;
          if (dst != nullptr) dst += b * Hr;
        }
        const acc_t k = rs_p[row];
        if (k == acc_t(0) || s_raw == nullptr) {
          if (dst != nullptr) std::fill_n(dst, Hr, scalar_t(0));
          continue;
        }
        const acc_t* gp = linear ? gq_p + row * Hr : as_acc(g_p + row * Hg, Hr, gbuf.data());
        const acc_t* s = nullptr;  // h_{t-1}: only the norm gradient needs it (detach_norm skips the read)
        acc_t proj_dot = 0, shrink = 0;
        if (!detach_norm) {
          s = as_acc(s_raw, Hr, sbuf.data());
          proj_dot = dot(gp, s, Hr);
          const acc_t n = std::sqrt(sumsq(s, Hr));
          if (n >= eps_a && n > acc_t(0)) shrink = -k * proj_dot / (n * n);
        }
        if (dst != nullptr) {
          const Vec<acc_t> kv(k), sv(shrink);
          acc_t* o = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(dst) : obuf.data();
          if (s == nullptr) {
            at::vec::map([kv](Vec<acc_t> x) { return kv * x; }, o, gp, Hr);
          } else {
            at::vec::map2([kv, sv](Vec<acc_t> x, Vec<acc_t> y) { return at::vec::fmadd(sv, y, kv * x); }, o, gp,
                          s, Hr);
          }
          if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(obuf.data(), dst, Hr);
        }
        if (token_full) {
          const acc_t* e = as_acc(w_p + ids_p[b * is_b + t * is_t] * ws_v, Hg, ebuf.data());
          const acc_t c2 = sumsq(e, Hg);
          gc_p[row] = c2 > acc_t(0) ? k * proj_dot / c2 : acc_t(0);
        }
      }
    });
  }

  if (need_weight) {
    acc_t* gw_p = gw.data_ptr<acc_t>();
    const int64_t N = B * T;
    at::parallel_for(0, Hg, 256, [&](int64_t h0, int64_t h1) {
      const int64_t w = h1 - h0;
      for (int64_t row = 0; row < N; ++row) {
        const int64_t b = row / T, t = row % T;
        const int64_t id = ids_p[b * is_b + t * is_t];
        acc_t* dst = gw_p + id * Hg + h0;
        const scalar_t* src = g_p + row * Hg + h0;
        for (int64_t h = 0; h < w; ++h) dst[h] += static_cast<acc_t>(src[h]);
        if (token_full && gc_p[row] != acc_t(0)) {
          const acc_t k = gc_p[row];
          const scalar_t* e = w_p + id * ws_v + h0;
          for (int64_t h = 0; h < w; ++h) dst[h] += k * static_cast<acc_t>(e[h]);
        }
      }
    });
  }
  return {glat, gprev, gw};
}

std::tuple<Tensor, Tensor> latent_fuse_fwd(const Tensor& ids, const Tensor& weight, const Tensor& latent,
                                           const c10::optional<Tensor>& mask, const c10::optional<Tensor>& prev,
                                           const c10::optional<Tensor>& plat, const c10::optional<Tensor>& pprev,
                                           double lam, int64_t norm_mode, double norm_const, double eps) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "latent_fuse_fwd: input_ids must be int64 [B, T]");
  TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1, "latent_fuse_fwd: weight must be [V, H_g], unit inner stride");
  TORCH_CHECK(latent.dim() == 3 && latent.stride(2) == 1 && latent.scalar_type() == weight.scalar_type(),
              "latent_fuse_fwd: latent must be [B, T, H_r] in weight's dtype, unit inner stride");
  TORCH_CHECK(latent.size(0) == ids.size(0) && latent.size(1) == ids.size(1), "latent_fuse_fwd: latent shape");
  TORCH_CHECK(plat.has_value() || latent.size(2) <= weight.size(1), "latent_fuse_fwd: pad needs H_r <= H_g");
  TORCH_CHECK(!mask.has_value() || mask->scalar_type() == at::kFloat, "latent_fuse_fwd: mask must be float32");
  TORCH_CHECK(!prev.has_value() || (prev->stride(1) == 1 && prev->scalar_type() == weight.scalar_type()),
              "latent_fuse_fwd: prev_latent layout");
  TORCH_CHECK(!plat.has_value() || plat->is_contiguous(), "latent_fuse_fwd: proj_latent must be contiguous");
  TORCH_CHECK(!pprev.has_value() || pprev->is_contiguous(), "latent_fuse_fwd: proj_prev must be contiguous");
  TORCH_CHECK(!plat.has_value() || !prev.has_value() || pprev.has_value(), "latent_fuse_fwd: proj_prev missing");
  std::tuple<Tensor, Tensor> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "latent_fuse_fwd", [&] {
    res = fwd_impl<scalar_t>(ids, weight, latent, mask, prev, plat, pprev, lam, norm_mode, norm_const, eps);
  });
  return res;
}

std::tuple<Tensor, Tensor, Tensor> latent_fuse_bwd(const Tensor& g, const Tensor& ids, const Tensor& weight,
                                                   const Tensor& latent, const c10::optional<Tensor>& prev,
                                                   const c10::optional<Tensor>& gproj, const Tensor& rs,
                                                   int64_t norm_mode, double eps, bool detach_norm,
                                                   bool need_latent, bool need_prev, bool need_weight) {
  TORCH_CHECK(g.dim() == 3 && g.scalar_type() == weight.scalar_type(), "latent_fuse_bwd: grad_out dtype/rank");
  TORCH_CHECK(rs.is_contiguous(), "latent_fuse_bwd: row_scale must be contiguous");
  TORCH_CHECK(!gproj.has_value() || gproj->is_contiguous(), "latent_fuse_bwd: grad_proj_src must be contiguous");
  std::tuple<Tensor, Tensor, Tensor> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "latent_fuse_bwd", [&] {
    res = bwd_impl<scalar_t>(g, ids, weight, latent, prev, gproj, rs, norm_mode, eps, detach_norm, need_latent,
                             need_prev, need_weight);
  });
  return res;
}

}  // namespace
}  // namespace flythinker

// FRAGMENT: other flythinker ops may register into the same namespace from other translation units.
TORCH_LIBRARY_FRAGMENT(flythinker, m) {
  m.def(
      "latent_fuse_fwd(Tensor input_ids, Tensor weight, Tensor latent, Tensor? mask, Tensor? prev_latent, "
      "Tensor? proj_latent, Tensor? proj_prev, float lam, int norm_mode, float norm_const, float eps) "
      "-> (Tensor, Tensor)");
  m.def(
      "latent_fuse_bwd(Tensor grad_out, Tensor input_ids, Tensor weight, Tensor latent, Tensor? prev_latent, "
      "Tensor? grad_proj_src, Tensor row_scale, int norm_mode, float eps, bool detach_norm, bool need_latent, "
      "bool need_prev, bool need_weight) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flythinker, CPU, m) {
  m.impl("latent_fuse_fwd", &flythinker::latent_fuse_fwd);
  m.impl("latent_fuse_bwd", &flythinker::latent_fuse_bwd);
}

// An (empty) Python module so the same source builds as `flythinker._C` (setup.py) or a JIT extension.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "flythinker C++ CPU ops (registered in torch.ops.flythinker)"; }
