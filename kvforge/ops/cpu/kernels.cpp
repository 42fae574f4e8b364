// Native CPU kernels of kvforge (float32), each the fast twin of a torch reference in kvforge.ops with
// the same contract. Built at first use by kvforge/ops/cpu/__init__.py and registered as
// torch.ops.kvforge_cpu.*. Vector math is ATen's Vectorized<float> (the ISA chosen at build time);
// threads are ATen's intra-op pool (at::parallel_for), as torch's own CPU ops use.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// Elements per parallel task of the row-wise ops: small steps (a decode) stay on one thread.
constexpr int64_t kGrainElements = 1 << 15;

int64_t row_grain(int64_t row_elements) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements)); }

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {  // y += a * x
  const Vec va(a);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += a * x[i];
}

inline void scale_inplace(float* y, float a, int64_t n) {
  const Vec va(a);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) (Vec::loadu(y + i) * va).store(y + i);
  for (; i < n; ++i) y[i] *= a;
}

// out[g * out_stride] = dot(q + g * n, k) for the G query heads of one KV head: k is read once and
// each head keeps its own vector accumulator (in registers for a fixed G).
template <int64_t G>
inline void group_dot_fixed(const float* q, const float* k, int64_t n, float* out, int64_t out_stride) {
  Vec acc[G];
  for (int64_t g = 0; g < G; ++g) acc[g] = Vec(0.f);
  for (int64_t i = 0; i < n; i += kLanes) {
    const Vec vk = Vec::loadu(k + i);
    for (int64_t g = 0; g < G; ++g) acc[g] = at::vec::fmadd(Vec::loadu(q + g * n + i), vk, acc[g]);
  }
  for (int64_t g = 0; g < G; ++g) out[g * out_stride] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc[g]);
}

constexpr int64_t kMaxGroup = 16;  // query heads per KV head that decode_attention takes

inline void group_dot(const float* q, const float* k, int64_t n, int64_t group, float* out, int64_t out_stride) {
  switch (group) {  // n % kLanes == 0
    case 1: return group_dot_fixed<1>(q, k, n, out, out_stride);
    case 2: return group_dot_fixed<2>(q, k, n, out, out_stride);
    case 3: return group_dot_fixed<3>(q, k, n, out, out_stride);
    case 4: return group_dot_fixed<4>(q, k, n, out, out_stride);
    case 5: return group_dot_fixed<5>(q, k, n, out, out_stride);
    case 6: return group_dot_fixed<6>(q, k, n, out, out_stride);
    case 7: return group_dot_fixed<7>(q, k, n, out, out_stride);
    case 8: return group_dot_fixed<8>(q, k, n, out, out_stride);
    default:
      for (int64_t g = 0; g < group; ++g) out[g * out_stride] = dot(q + g * n, k, n);
  }
}

// max(s[0..n)), -inf for n == 0.
inline float max_of(const float* s, int64_t n) {
  Vec vmax(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
  float top = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vmax);
  for (; j < n; ++j) top = std::max(top, s[j]);
  return top;
}

// s[j] = exp(s[j] * scale - max) for j < n; returns their sum.
inline float scaled_exp(float* s, int64_t n, float scale, float max) {
  const Vec vscale(scale), vmax(max);
  Vec vsum(0.f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Vec e = (Vec::loadu(s + j) * vscale - vmax).exp();
    e.store(s + j);
    vsum = vsum + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vsum);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] * scale - max);
    sum += s[j];
  }
  return sum;
}

constexpr int64_t kPrefetch = 4;  // key rows ahead
inline void prefetch_row(const float* row, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / sizeof(float)) __builtin_prefetch(row + i);
}

// acc = acc * correction + sum_j p[j] * v[j] over n value rows of dim floats (dim % kLanes == 0),
// four vector accumulators at a time held in registers across the rows.
inline void accumulate_values(float* acc, float correction, const float* p, const float* const* v, int64_t n,
                              int64_t dim) {
  const Vec c(correction);
  int64_t d = 0;
  for (; d + 4 * kLanes <= dim; d += 4 * kLanes) {
    Vec a0 = Vec::loadu(acc + d) * c, a1 = Vec::loadu(acc + d + kLanes) * c;
    Vec a2 = Vec::loadu(acc + d + 2 * kLanes) * c, a3 = Vec::loadu(acc + d + 3 * kLanes) * c;
    for (int64_t j = 0; j < n; ++j) {
      const Vec w(p[j]);
      const float* x = v[j] + d;
      a0 = at::vec::fmadd(w, Vec::loadu(x), a0);
      a1 = at::vec::fmadd(w, Vec::loadu(x + kLanes), a1);
      a2 = at::vec::fmadd(w, Vec::loadu(x + 2 * kLanes), a2);
      a3 = at::vec::fmadd(w, Vec::loadu(x + 3 * kLanes), a3);
    }
    a0.store(acc + d);
    a1.store(acc + d + kLanes);
    a2.store(acc + d + 2 * kLanes);
    a3.store(acc + d + 3 * kLanes);
  }
  for (; d < dim; d += kLanes) {
    Vec a = Vec::loadu(acc + d) * c;
    for (int64_t j = 0; j < n; ++j) a = at::vec::fmadd(Vec(p[j]), Vec::loadu(v[j] + d), a);
    a.store(acc + d);
  }
}

void check_float32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
}

// ---------------------------------------------------------------------------------------- norms

// out = weight * (x * rsqrt(mean(x^2) + eps)), one row of n.
inline void rms_row(const float* x, const float* w, float* out, int64_t n, double eps) {
  const float inv = 1.f / std::sqrt(static_cast<float>(dot(x, x, n) / n + eps));
  const Vec vinv(inv);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) (Vec::loadu(w + i) * (Vec::loadu(x + i) * vinv)).store(out + i);
  for (; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float32(x, "x");
  check_float32(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous() && weight.numel() == x.size(1),
              "rms_norm: x [T, hidden] with unit stride in hidden, weight [hidden]");
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  auto out = at::empty({rows, n}, x.options());
  const float *px = x.data_ptr<float>(), *pw = weight.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_row(px + r * stride, pw, po + r * n, n, eps);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_float32(x, "x");
  check_float32(residual, "residual");
  check_float32(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.sizes() == residual.sizes() && x.stride(1) == 1 && residual.stride(1) == 1 &&
                  weight.is_contiguous() && weight.numel() == x.size(1),
              "add_rms_norm: x, residual [T, hidden] with unit stride in hidden, weight [hidden]");
  const int64_t rows = x.size(0), n = x.size(1), sx = x.stride(0), sr = residual.stride(0);
  auto normed = at::empty({rows, n}, x.options());
  auto total = at::empty({rows, n}, x.options());
  const float *px = x.data_ptr<float>(), *pr = residual.data_ptr<float>(), *pw = weight.data_ptr<float>();
  float *pn = normed.data_ptr<float>(), *pt = total.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *a = px + r * sx, *b = pr + r * sr;
      float* t = pt + r * n;
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) (Vec::loadu(a + i) + Vec::loadu(b + i)).store(t + i);
      for (; i < n; ++i) t[i] = a[i] + b[i];
      rms_row(t, pw, pn + r * n, n, eps);
    }
  });
  return {normed, total};
}

// ---------------------------------------------------------------------------------------- MLP

// x [T, 2I] (gate | up) -> silu(gate) * up [T, I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_float32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0 && x.stride(1) == 1, "silu_and_mul: x [T, 2I] with unit stride");
  const int64_t rows = x.size(0), inter = x.size(1) / 2, stride = x.stride(0);
  auto out = at::empty({rows, inter}, x.options());
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(2 * inter), [&](int64_t begin, int64_t end) {
    const Vec one(1.f);
    for (int64_t r = begin; r < end; ++r) {
      const float *g = px + r * stride, *u = g + inter;
      float* o = po + r * inter;
      int64_t i = 0;
      for (; i + kLanes <= inter; i += kLanes) {
        const Vec vg = Vec::loadu(g + i);
        (vg / (one + vg.neg().exp()) * Vec::loadu(u + i)).store(o + i);
      }
      for (; i < inter; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------- RoPE

// x [T, heads, D] (unit stride in D), cos/sin [T, D/2] -> the "rotate half" rotation, a new tensor.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_float32(x, "x");
  check_float32(cos, "cos");
  check_float32(sin, "sin");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "apply_rope: x [T, heads, D], unit stride in D");
  const int64_t rows = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == rows &&
                  cos.size(1) == half && sin.sizes() == cos.sizes(),
              "apply_rope: cos, sin [T, D/2] contiguous");
  auto out = at::empty({rows, heads, dim}, x.options());
  const float *px = x.data_ptr<float>(), *pc = cos.data_ptr<float>(), *ps = sin.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t st = x.stride(0), sh = x.stride(1);
  at::parallel_for(0, rows, row_grain(heads * dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *c = pc + r * half, *s = ps + r * half;
      for (int64_t h = 0; h < heads; ++h) {
        const float *x1 = px + r * st + h * sh, *x2 = x1 + half;
        float *o1 = po + (r * heads + h) * dim, *o2 = o1 + half;
        int64_t i = 0;
        for (; i + kLanes <= half; i += kLanes) {
          const Vec a = Vec::loadu(x1 + i), b = Vec::loadu(x2 + i), vc = Vec::loadu(c + i), vs = Vec::loadu(s + i);
          (a * vc - b * vs).store(o1 + i);
          (b * vc + a * vs).store(o2 + i);
        }
        for (; i < half; ++i) {
          o1[i] = x1[i] * c[i] - x2[i] * s[i];
          o2[i] = x2[i] * c[i] + x1[i] * s[i];
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------- KV store

// k, v [T, K, D] (unit stride in D) into float32 pages [num_blocks, block_size, K, D] at slot_mapping [T]
// (int64; a negative slot is skipped). In place.
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  check_float32(k, "k");
  check_float32(v, "v");
  check_float32(k_cache, "k_cache");
  check_float32(v_cache, "v_cache");
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.stride(2) == 1 && v.stride(2) == 1 &&
                  k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2),
              "store_kv: k, v [T, kv_heads, D]; contiguous pages [num_blocks, block_size, kv_heads, D]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == k.size(0),
              "store_kv: slot_mapping [T] int64, contiguous");
  const int64_t rows = k.size(0), heads = k.size(1), dim = k.size(2);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1), width = heads * dim;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < rows; ++t)
    TORCH_CHECK(slots[t] < num_slots, "store_kv: slot ", slots[t], " past the arena's ", num_slots);
  const float *pk = k.data_ptr<float>(), *pv = v.data_ptr<float>();
  float *ck = k_cache.data_ptr<float>(), *cv = v_cache.data_ptr<float>();
  const int64_t sk0 = k.stride(0), sk1 = k.stride(1), sv0 = v.stride(0), sv1 = v.stride(1);
  at::parallel_for(0, rows, row_grain(2 * width), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      for (int64_t h = 0; h < heads; ++h) {
        std::copy_n(pk + t * sk0 + h * sk1, dim, ck + slots[t] * width + h * dim);
        std::copy_n(pv + t * sv0 + h * sv1, dim, cv + slots[t] * width + h * dim);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------- decode attention

// Keys per task of one (sequence, KV head): a long sequence is split so both cores share it, and the
// splits are merged by their log-sum-exp.
constexpr int64_t kSplitTokens = 512;
// Keys scored together: one rescale of the accumulators per tile.
constexpr int64_t kTile = 32;

// One query token per sequence attends to its K/V read in place from the paged arena.
// q [B, H, D]; k_cache, v_cache [num_blocks, block_size, K, D] contiguous; block_tables [B, nb] int64;
// seq_lens [B] int64 (>= 1, <= nb * block_size). Returns [B, H, D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  check_float32(q, "q");
  check_float32(k_cache, "k_cache");
  check_float32(v_cache, "v_cache");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "decode_attention: q [B, H, D], contiguous pages [num_blocks, block_size, kv_heads, D]");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                  block_tables.dim() == 2 && block_tables.is_contiguous() && seq_lens.is_contiguous(),
              "decode_attention: block_tables [B, nb] and seq_lens [B], int64, contiguous");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), num_blocks = k_cache.size(0);
  const int64_t nb = block_tables.size(1);
  TORCH_CHECK(k_cache.size(3) == dim && dim % kLanes == 0, "decode_attention: head_dim must match and be a multiple of ",
              kLanes);
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup,
              "decode_attention: the GQA ratio must be a whole number up to ", kMaxGroup);
  TORCH_CHECK(block_tables.size(0) == batch && seq_lens.numel() == batch, "decode_attention: batch mismatch");
  const int64_t group = heads / kv_heads;
  const at::Tensor qc = q.contiguous();
  const float *pq = qc.data_ptr<float>(), *pk = k_cache.data_ptr<float>(), *pv = v_cache.data_ptr<float>();
  const int64_t *tables = block_tables.data_ptr<int64_t>(), *lens = seq_lens.data_ptr<int64_t>();

  // Tasks: (sequence, split) x KV head.
  std::vector<int64_t> task_seq, task_split;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = lens[b];
    TORCH_CHECK(len >= 1 && len <= nb * block_size, "decode_attention: seq_lens[", b, "] = ", len,
                " outside 1..", nb * block_size);
    for (int64_t s = 0; s * kSplitTokens < len; ++s) {
      task_seq.push_back(b);
      task_split.push_back(s);
    }
  }
  for (int64_t i = 0; i < batch * nb; ++i)
    TORCH_CHECK(tables[i] >= 0 && tables[i] < num_blocks, "decode_attention: block id ", tables[i], " out of range");
  const int64_t num_parts = static_cast<int64_t>(task_seq.size());
  const int64_t num_tasks = num_parts * kv_heads;
  // Per task and query head of its group: running max, sum of exponentials, and the weighted V sum.
  std::vector<float> part_max(num_tasks * group), part_sum(num_tasks * group), part_acc(num_tasks * group * dim);
  const int64_t token_stride = kv_heads * dim, block_stride = block_size * token_stride;
  TORCH_CHECK(scale > 0, "decode_attention: scale must be positive");
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    float sc[kTile * kMaxGroup];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t part = task / kv_heads, kvh = task % kv_heads, b = task_seq[part];
      const int64_t first = task_split[part] * kSplitTokens, last = std::min(lens[b], first + kSplitTokens);
      const float* qg = pq + (b * heads + kvh * group) * dim;
      float* m = part_max.data() + task * group;
      float* l = part_sum.data() + task * group;
      float* acc = part_acc.data() + task * group * dim;
      std::fill(m, m + group, -std::numeric_limits<float>::infinity());
      std::fill(l, l + group, 0.f);
      std::fill(acc, acc + group * dim, 0.f);
      const int64_t* table = tables + b * nb;
      const float* kp[kTile];
      const float* vp[kTile];
      for (int64_t t0 = first; t0 < last; t0 += kTile) {
        const int64_t n = std::min(kTile, last - t0);
        int64_t blk = t0 / block_size, off = t0 % block_size;
        for (int64_t j = 0; j < n; ++j) {  // the tile's key and value rows, read in place
          const int64_t row = table[blk] * block_stride + off * token_stride + kvh * dim;
          kp[j] = pk + row;
          vp[j] = pv + row;
          if (++off == block_size) {
            off = 0;
            ++blk;
          }
        }
        for (int64_t j = 0; j < std::min(kPrefetch, n); ++j) prefetch_row(kp[j], dim);
        for (int64_t j = 0; j < n; ++j) {  // each key read once; the rows ahead are fetched meanwhile
          if (j + kPrefetch < n) prefetch_row(kp[j + kPrefetch], dim);
          prefetch_row(vp[j], dim);
          group_dot(qg, kp[j], dim, group, sc + j, kTile);
        }
        for (int64_t g = 0; g < group; ++g) {
          float* s = sc + g * kTile;
          const float new_max = std::max(m[g], max_of(s, n) * fscale);  // scale > 0
          const float correction = std::exp(m[g] - new_max);  // 0 on the first tile (m = -inf)
          m[g] = new_max;
          l[g] = l[g] * correction + scaled_exp(s, n, fscale, new_max);
          accumulate_values(acc + g * dim, correction, s, vp, n, dim);
        }
      }
    }
  });

  // Merge each sequence's splits (usually one) into the output.
  auto out = at::empty({batch, heads, dim}, q.options());
  float* po = out.data_ptr<float>();
  std::vector<int64_t> first_part(batch + 1, num_parts);
  for (int64_t p = num_parts - 1; p >= 0; --p) first_part[task_seq[p]] = p;
  for (int64_t b = batch - 1; b >= 0; --b) first_part[b] = std::min(first_part[b], first_part[b + 1]);
  at::parallel_for(0, batch * kv_heads, row_grain(group * dim * 4), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / kv_heads, kvh = i % kv_heads;
      for (int64_t g = 0; g < group; ++g) {
        float* o = po + (b * heads + kvh * group + g) * dim;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t p = first_part[b]; p < first_part[b + 1]; ++p)
          top = std::max(top, part_max[(p * kv_heads + kvh) * group + g]);
        float total = 0.f;
        std::fill(o, o + dim, 0.f);
        for (int64_t p = first_part[b]; p < first_part[b + 1]; ++p) {
          const int64_t idx = (p * kv_heads + kvh) * group + g;
          const float w = std::exp(part_max[idx] - top);
          total += part_sum[idx] * w;
          axpy(o, w, part_acc.data() + idx * dim, dim);
        }
        scale_inplace(o, 1.f / total, dim);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(kvforge_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("apply_rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvforge_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("apply_rope", &apply_rope);
  m.impl("decode_attention", &decode_attention);
  m.impl("store_kv", &store_kv);
}
