// The chunked engine's epilogue on the CPU: the twin of ops/chunk_epilogue.py (Triton) and of
// backends/torch_epilogue.py (PyTorch), over one chunk's float32 logits buffer, rows in parallel.
//
// Per row, with s = logit_scale * softcap * tanh(z / softcap) (identity without a cap):
//   accumulate: fold the row into its online state, five planes of `state` [5, rows]:
//       m = max s,  d = sum e^(s - m),  u = sum e^(s - m) (s - m),  the label's s,  sum s;
//     block by block (kBlock columns that stay in L1 between their maximum and their
//     exponentials), merged with the online logsumexp rule, so each row is read from memory once.
//   gradient: from the row's logsumexp,
//       dl/ds_j = ce_weight (p_j - (1 - eps) [j = y] - eps / V) + 2 z_loss lse p_j,
//       dL/dz_j = row_scale * logit_scale * dl/ds_j * (1 - t_j^2),  t = s / (logit_scale * softcap),
//     written over the buffer (float32) or into a half-precision one.
//   accumulate_and_gradient (whole vocabulary rows): both, row by row while the row is in cache;
//     without a softcap the fold leaves e^(s - block max) in the buffer, so the gradient sweep is
//     p_j = e_j e^(block max - lse): no second exponential.
// Vectorized with ATen's Vectorized<float> (Sleef's tanh, 1 ulp; the exponential of `exp_vec` below),
// rows over ATen's threads.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();

struct Head {
  bool has_softcap;
  float softcap;
  float logit_scale;
};

inline bool transforms(const Head& h) { return h.has_softcap || h.logit_scale != 1.0f; }

inline Vec transform(Vec z, const Head& h) {
  if (h.has_softcap) z = Vec(h.softcap) * (z / Vec(h.softcap)).tanh();
  return z * Vec(h.logit_scale);
}

inline float transform(float z, const Head& h) {
  if (h.has_softcap) z = h.softcap * std::tanh(z / h.softcap);
  return z * h.logit_scale;
}

inline float reduce_max(Vec v) {
  float lanes[kWidth];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t k = 1; k < kWidth; ++k) m = std::max(m, lanes[k]);
  return m;
}

inline float reduce_sum(Vec v) {
  float lanes[kWidth];
  v.store(lanes);
  float s = 0.0f;
  for (int64_t k = 0; k < kWidth; ++k) s += lanes[k];
  return s;
}

// e^x of each lane, the one exponential of every logit. With AVX-512: x = n ln 2 + r (n = round(x log2 e),
// ln 2 in two parts, so r is exact to float rounding, |r| <= ln 2 / 2), e^r by its Taylor series to
// degree 7 (remainder below 0.35^8 / 8! < 6e-9, under a tenth of an ulp), times 2^n by vscalefps, which
// rounds into the subnormals and to 0 or infinity as the true value does. Within 0.92 ulp of e^x on
// [-104, 89] (tests/backends/test_cpu_epilogue.py measures it), at 12 instructions a vector where
// Sleef's 1-ulp exp takes about twice the time: the epilogue's exponentials are most of its arithmetic
// (benchmarks/RESULTS.md, 'Where the CPU fwd+bwd goes'). NaN stays NaN, e^-inf = 0, e^inf = inf (the
// clamps keep NaN: vmaxps and vminps return their second operand when one is NaN). Other instruction
// sets take Sleef's exp.
inline Vec exp_vec(Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), __m512(v)));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2's leading 16 bits: n ln2_hi exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return Vec(_mm512_scalef_ps(p, n));
#else
  return v.exp();
#endif
}

void check_logits(const torch::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "cpu_epilogue: logits must be a CPU float32 [rows, width] tensor with unit column stride");
}

void check_state(const torch::Tensor& state, int64_t rows) {
  TORCH_CHECK(state.is_contiguous() && state.scalar_type() == torch::kFloat32 && state.size(0) == 5 &&
                  state.size(1) == rows,
              "cpu_epilogue: state must be a contiguous float32 [5, rows] tensor");
}

// Columns per block: a block's logits (8 KiB) stay in L1 between its maximum and its exponentials, so
// each row is read from memory once; 2048 rather than 512 makes the per-block reductions and merge a
// quarter as frequent (benchmarks/RESULTS.md, 'Where the CPU fwd+bwd goes').
constexpr int64_t kBlock = 2048;

// The state (m, d, u) of one block of a row, its logit sum, the label's s (0 without the label at
// `label_j`, -1) and, with `keep_exp`, e^(s - m) written over it (the block's maximum returned in
// m); s (transformed where it must be) otherwise. The label's s is read from the very values the
// maximum was taken over: a scalar tanh may differ from the vectorized one by an ulp, and a label
// logit above or below its own row maximum would make `correct` wrong.
struct BlockState {
  float m, d, u, sum, label;
};

inline BlockState fold_block(float* s, int64_t width, int64_t label_j, const Head& h, bool has_smoothing,
                             bool keep_exp) {
  // Two passes over the block, each with independent accumulators (a single one would wait on its own
  // previous add every vector): its maximum (transforming s in place where the head does), then its
  // exponentials and their sums.
  const bool store = transforms(h);
  const Vec ninf(-std::numeric_limits<float>::infinity());
  Vec mx0(ninf), mx1(ninf), mx2(ninf), mx3(ninf), vsum(0.0f);
  int64_t j = 0;
  if (store || has_smoothing) {
    for (; j + kWidth <= width; j += kWidth) {
      Vec v = Vec::loadu(s + j);
      if (store) {
        v = transform(v, h);
        v.store(s + j);
      }
      mx0 = at::vec::maximum(mx0, v);
      if (has_smoothing) vsum = vsum + v;
    }
  } else {
    for (; j + 4 * kWidth <= width; j += 4 * kWidth) {
      mx0 = at::vec::maximum(mx0, Vec::loadu(s + j));
      mx1 = at::vec::maximum(mx1, Vec::loadu(s + j + kWidth));
      mx2 = at::vec::maximum(mx2, Vec::loadu(s + j + 2 * kWidth));
      mx3 = at::vec::maximum(mx3, Vec::loadu(s + j + 3 * kWidth));
    }
    for (; j + kWidth <= width; j += kWidth) mx0 = at::vec::maximum(mx0, Vec::loadu(s + j));
  }
  float m = reduce_max(at::vec::maximum(at::vec::maximum(mx0, mx1), at::vec::maximum(mx2, mx3)));
  float sum = has_smoothing ? reduce_sum(vsum) : 0.0f;
  for (; j < width; ++j) {
    if (store) s[j] = transform(s[j], h);
    m = std::max(m, s[j]);
    sum += has_smoothing ? s[j] : 0.0f;
  }
  const float label = label_j >= 0 ? s[label_j] : 0.0f;
  Vec d0(0.0f), d1(0.0f), u0(0.0f), u1(0.0f);
  const Vec vm(m);
  j = 0;
  for (; j + 2 * kWidth <= width; j += 2 * kWidth) {
    const Vec a = Vec::loadu(s + j) - vm, b = Vec::loadu(s + j + kWidth) - vm;
    const Vec ea = exp_vec(a), eb = exp_vec(b);
    if (keep_exp) {
      ea.store(s + j);
      eb.store(s + j + kWidth);
    }
    d0 = d0 + ea;
    d1 = d1 + eb;
    u0 = at::vec::fmadd(ea, a, u0);
    u1 = at::vec::fmadd(eb, b, u1);
  }
  for (; j + kWidth <= width; j += kWidth) {
    const Vec a = Vec::loadu(s + j) - vm, ea = exp_vec(a);
    if (keep_exp) ea.store(s + j);
    d0 = d0 + ea;
    u0 = at::vec::fmadd(ea, a, u0);
  }
  float d = reduce_sum(d0 + d1), u = reduce_sum(u0 + u1);
  for (; j < width; ++j) {
    const float shifted = s[j] - m, e = std::exp(shifted);
    if (keep_exp) s[j] = e;
    d += e;
    u += e * shifted;
  }
  return {m, d, u, sum, label};
}

// The union of two disjoint column sets' states; an empty state (d = 0) adds nothing.
inline void merge(float& m, float& d, float& u, const BlockState& b) {
  if (d > 0.0f) {
    const float m_new = std::max(m, b.m), x = std::exp(m - m_new), y = std::exp(b.m - m_new);
    u = x * (u + (m - m_new) * d) + y * (b.u + (b.m - m_new) * b.d);
    d = x * d + y * b.d;
    m = m_new;
  } else {
    m = b.m;
    d = b.d;
    u = b.u;
  }
}

// Fold one row into its state (planes `plane` floats apart); `block_max` (keep_exp) receives each
// block's maximum. Returns nothing: the row holds s, or e^(s - block max) with keep_exp.
inline void fold_row(float* s, int64_t width, int64_t label_col, const Head& h, bool has_smoothing, bool keep_exp,
                     float* st, int64_t plane, float* block_max) {
  float m = st[0], d = st[plane], u = st[2 * plane], label = st[3 * plane], sum = st[4 * plane];
  for (int64_t b0 = 0, k = 0; b0 < width; b0 += kBlock, ++k) {
    const int64_t w = std::min(kBlock, width - b0);
    const bool has_label = label_col >= b0 && label_col < b0 + w;
    const BlockState block = fold_block(s + b0, w, has_label ? label_col - b0 : -1, h, has_smoothing, keep_exp);
    label += block.label;
    if (keep_exp) block_max[k] = block.m;
    merge(m, d, u, block);
    sum += block.sum;
  }
  st[0] = m;
  st[plane] = d;
  st[2 * plane] = u;
  st[3 * plane] = label;
  st[4 * plane] = sum;
}

// Fold each row of `logits` (columns col0 .. col0 + width of the vocabulary) into `state`.
void accumulate(torch::Tensor logits, torch::Tensor labels, int64_t col0, torch::Tensor state, bool has_softcap,
                double softcap, double logit_scale, bool has_smoothing) {
  check_logits(logits);
  const int64_t rows = logits.size(0), width = logits.size(1), ld = logits.stride(0);
  check_state(state, rows);
  auto y = labels.contiguous().to(torch::kInt64);
  const Head h{has_softcap, static_cast<float>(softcap), static_cast<float>(logit_scale)};
  float* base = logits.data_ptr<float>();
  float* st = state.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      fold_row(base + r * ld, width, yp[r] - col0, h, has_smoothing, false, st + r, rows, nullptr);
  });
}

// The loss gradient of one row from its logsumexp, dL/dz_j = scale (p_j a - eps / V ... ) as in the
// header: `of_s` from the (transformed) logit s; `of_exp` from e = e^(s - m) and coef = e^(m - lse),
// without a softcap; `label_term` the label's extra -ce_weight (1 - eps), through the same factors.
struct RowGradient {
  float lse, a, eps_term, hit, scale, inv_cap;
  bool has_softcap;

  RowGradient(float lse_, float row_scale, const Head& h, double ce_weight, double smoothing, double inv_vocab,
              double z_loss)
      : lse(lse_), a(static_cast<float>(ce_weight + 2.0 * z_loss * lse_)),
        eps_term(static_cast<float>(ce_weight * smoothing * inv_vocab)),
        hit(static_cast<float>(ce_weight * (1.0 - smoothing))), scale(row_scale * h.logit_scale),
        inv_cap(h.has_softcap ? 1.0f / (h.logit_scale * h.softcap) : 0.0f), has_softcap(h.has_softcap) {}

  Vec of_s(Vec s) const {
    Vec ds = (exp_vec(s - Vec(lse)) * Vec(a) - Vec(eps_term)) * Vec(scale);
    if (has_softcap) {
      const Vec t = s * Vec(inv_cap);
      ds = ds * (Vec(1.0f) - t * t);
    }
    return ds;
  }
  float of_s(float s) const {
    float ds = (std::exp(s - lse) * a - eps_term) * scale;
    return has_softcap ? ds * (1.0f - (s * inv_cap) * (s * inv_cap)) : ds;
  }
  Vec of_exp(Vec e, Vec coef) const { return (e * coef * Vec(a) - Vec(eps_term)) * Vec(scale); }
  float of_exp(float e, float coef) const { return (e * coef * a - eps_term) * scale; }
  float label_term(float s) const {
    const float t = s * inv_cap;
    return -hit * scale * (has_softcap ? 1.0f - t * t : 1.0f);
  }
};

// Where a row's gradient goes: over the float32 buffer itself, or, for a half-precision `out`,
// through a float32 row that `finish` converts.
struct RowOutput {
  torch::Tensor out;
  bool in_place;

  RowOutput(const torch::Tensor& logits, torch::ScalarType dtype)
      : out(dtype == torch::kFloat32 ? logits : torch::empty(logits.sizes(), logits.options().dtype(dtype))),
        in_place(dtype == torch::kFloat32) {}

  void finish(const float* row, int64_t r, int64_t width) const {
    if (in_place) return;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(out.scalar_type(), "cpu_epilogue_store", [&] {
      scalar_t* dst = out.data_ptr<scalar_t>() + r * width;
      for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<scalar_t>(row[j]);
    });
  }
};

// dL/dz of each row of a vocabulary chunk from the rows' logsumexp (the 4-matmul path, after the
// logits are made again); over `logits` itself for float32 `out_dtype`, else a new buffer of that dtype.
torch::Tensor gradient(torch::Tensor logits, torch::Tensor labels, int64_t col0, torch::Tensor lse,
                       torch::Tensor row_scale, bool has_softcap, double softcap,
                       double logit_scale, double ce_weight, double smoothing, double inv_vocab, double z_loss,
                       torch::ScalarType out_dtype) {
  check_logits(logits);
  const int64_t rows = logits.size(0), width = logits.size(1), ld = logits.stride(0);
  auto y = labels.contiguous().to(torch::kInt64);
  auto lse_c = lse.contiguous().to(torch::kFloat32);
  auto g_c = row_scale.contiguous().to(torch::kFloat32);
  const RowOutput output(logits, out_dtype);
  const Head h{has_softcap, static_cast<float>(softcap), static_cast<float>(logit_scale)};
  const bool recompute = transforms(h);
  float* base = logits.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  const float* lp = lse_c.data_ptr<float>();
  const float* gp = g_c.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(output.in_place ? 0 : width);
    for (int64_t r = r0; r < r1; ++r) {
      float* s = base + r * ld;
      float* o = output.in_place ? s : row.data();
      const RowGradient grad(lp[r], gp[r], h, ce_weight, smoothing, inv_vocab, z_loss);
      const int64_t label_col = yp[r] - col0;
      const bool has_label = label_col >= 0 && label_col < width;
      const float label_s = has_label ? (recompute ? transform(s[label_col], h) : s[label_col]) : 0.0f;
      int64_t j = 0;
      for (; j + kWidth <= width; j += kWidth) {
        const Vec v = Vec::loadu(s + j);
        grad.of_s(recompute ? transform(v, h) : v).store(o + j);
      }
      for (; j < width; ++j) o[j] = grad.of_s(recompute ? transform(s[j], h) : s[j]);
      if (has_label) o[label_col] += grad.label_term(label_s);
      output.finish(o, r, width);
    }
  });
  return output.out;
}

// Whole vocabulary rows: fold each row into its state, then write dL/dz from the finished
// logsumexp while the row is still in cache. Without a softcap the fold leaves e^(s - block max)
// in the buffer, so the gradient sweep needs no second exponential: p_j = e_j e^(block max - lse).
torch::Tensor accumulate_and_gradient(torch::Tensor logits, torch::Tensor labels, torch::Tensor state,
                                      torch::Tensor row_scale, bool has_softcap, double softcap, double logit_scale,
                                      bool has_smoothing, double ce_weight, double smoothing, double inv_vocab,
                                      double z_loss, torch::ScalarType out_dtype) {
  check_logits(logits);
  const int64_t rows = logits.size(0), width = logits.size(1), ld = logits.stride(0);
  check_state(state, rows);
  auto y = labels.contiguous().to(torch::kInt64);
  auto g_c = row_scale.contiguous().to(torch::kFloat32);
  const RowOutput output(logits, out_dtype);
  const Head h{has_softcap, static_cast<float>(softcap), static_cast<float>(logit_scale)};
  const bool keep_exp = !has_softcap;
  const int64_t n_blocks = (width + kBlock - 1) / kBlock;
  float* base = logits.data_ptr<float>();
  float* st = state.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  const float* gp = g_c.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> block_max(n_blocks), row(output.in_place ? 0 : width);
    for (int64_t r = r0; r < r1; ++r) {
      float* s = base + r * ld;
      float* o = output.in_place ? s : row.data();
      const int64_t label_col = yp[r];
      const bool has_label = label_col >= 0 && label_col < width;
      fold_row(s, width, label_col, h, has_smoothing, keep_exp, st + r, rows, block_max.data());
      const float label_s = has_label && !keep_exp ? s[label_col] : 0.0f;  // s (a softcap keeps no exp)
      const RowGradient grad(st[r] + std::log(st[rows + r]), gp[r], h, ce_weight, smoothing, inv_vocab, z_loss);
      for (int64_t b0 = 0, k = 0; b0 < width; b0 += kBlock, ++k) {
        const int64_t end = b0 + std::min(kBlock, width - b0);
        const float coef = keep_exp ? std::exp(block_max[k] - grad.lse) : 0.0f;
        int64_t j = b0;
        for (; j + kWidth <= end; j += kWidth) {
          const Vec v = Vec::loadu(s + j);
          (keep_exp ? grad.of_exp(v, Vec(coef)) : grad.of_s(v)).store(o + j);
        }
        for (; j < end; ++j) o[j] = keep_exp ? grad.of_exp(s[j], coef) : grad.of_s(s[j]);
      }
      if (has_label) o[label_col] += grad.label_term(label_s);
      output.finish(o, r, width);
    }
  });
  return output.out;
}

// The epilogue's vector exponential of each element of a float32 tensor (tests measure its error).
torch::Tensor vector_exp(torch::Tensor x) {
  auto in = x.contiguous();
  TORCH_CHECK(in.device().is_cpu() && in.scalar_type() == torch::kFloat32, "vector_exp: a CPU float32 tensor");
  auto out = torch::empty_like(in);
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = in.numel();
  int64_t j = 0;
  for (; j + kWidth <= n; j += kWidth) exp_vec(Vec::loadu(src + j)).store(dst + j);
  if (j < n) exp_vec(Vec::loadu(src + j, n - j)).store(dst + j, n - j);
  return out;
}

}  // namespace

// Every argument is named: Python passes the scalars by these names (backends/cpu_epilogue.py), so a
// renamed, added or reordered parameter fails the call instead of shifting a value into another's place.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using pybind11::arg;
  m.def("vector_exp", &vector_exp, "the epilogue's vector exponential, element by element", arg("x"));
  m.def("accumulate", &accumulate, "fold a chunk's logits into the rows' online softmax state", arg("logits"),
        arg("labels"), arg("col0"), arg("state"), arg("has_softcap"), arg("softcap"), arg("logit_scale"),
        arg("has_smoothing"));
  m.def("gradient", &gradient, "dL/dz of a chunk's logits from the rows' logsumexp", arg("logits"), arg("labels"),
        arg("col0"), arg("lse"), arg("row_scale"), arg("has_softcap"), arg("softcap"), arg("logit_scale"),
        arg("ce_weight"), arg("smoothing"), arg("inv_vocab"), arg("z_loss"), arg("out_dtype"));
  m.def("accumulate_and_gradient", &accumulate_and_gradient,
        "fold whole vocabulary rows into their state, then write dL/dz from the finished logsumexp", arg("logits"),
        arg("labels"), arg("state"), arg("row_scale"), arg("has_softcap"), arg("softcap"), arg("logit_scale"),
        arg("has_smoothing"), arg("ce_weight"), arg("smoothing"), arg("inv_vocab"), arg("z_loss"),
        arg("out_dtype"));
}
