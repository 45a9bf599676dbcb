// The lean decoder host's ops (runtimes/kernels/lean_decoder.py): the work of a Llama-family decoder
// step that is not a matrix product, as three torch ops instead of the ~160 small torch ops Hugging
// Face's eager modules run per block (docs/kernels.md, "The lean decoder host").
//
//   add_rms_norm(x, delta, w, eps)   x += delta (in place: x is the residual stream), returns RMSNorm(x) * w
//   silu_mul(gu)                     [.., 2n] -> [.., n]: silu(gate) * up of a fused gate/up output
//   rope_attention(qkv, cache_k, cache_v, starts, cos, sin, heads, kv_heads, scale)
//       qkv [B, T, (heads + 2 kv_heads) * D] of a fused q/k/v projection; token t of row b sits at position
//       starts[b] + t. Rotates q and k (non-interleaved rotary, Hugging Face's rotate_half, tables (P, D/2)),
//       writes k and v into the caches [B, kv_heads, capacity, D] at that position (in place), and returns
//       causal grouped-query attention over positions [0, position] of the row: [B, T, heads * D].
// The per-row start makes a batch of requests of different lengths one call (each row attends to its own
// prefix), and each prompt can be prefilled alone into its row's view of the cache.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstring>
#include <vector>

#include "common.h"

namespace sparsec {
namespace {

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "sparsec decoder op: ", what, " must be a contiguous fp32 CPU tensor");
}

at::Tensor add_rms_norm(at::Tensor x, const c10::optional<at::Tensor>& delta, const at::Tensor& w, double eps) {
  check_f32(x, "x");
  check_f32(w, "w");
  const int64_t n = x.size(-1);
  TORCH_CHECK(w.numel() == n, "sparsec add_rms_norm: weight of ", w.numel(), " for rows of ", n);
  const int64_t rows = x.numel() / n;
  float* xp = x.data_ptr<float>();
  if (delta.has_value()) {
    check_f32(*delta, "delta");
    TORCH_CHECK(delta->numel() == x.numel(), "sparsec add_rms_norm: delta and x differ in size");
    const float* dp = delta->data_ptr<float>();
    for (int64_t i = 0; i < x.numel(); ++i) xp[i] += dp[i];
  }
  at::Tensor out = at::empty_like(x);
  const KernelTable& kt = active_kernels();
  for (int64_t r = 0; r < rows; ++r)
    kt.rms_norm(xp + r * n, w.data_ptr<float>(), n, (float)eps, out.data_ptr<float>() + r * n);
  return out;
}

at::Tensor silu_mul(const at::Tensor& gu) {
  check_f32(gu, "gu");
  const int64_t n2 = gu.size(-1);
  TORCH_CHECK(n2 % 2 == 0, "sparsec silu_mul: last dimension ", n2, " is odd");
  const int64_t n = n2 / 2, rows = gu.numel() / n2;
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, gu.options());
  const KernelTable& kt = active_kernels();
  const float* g = gu.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) kt.silu_mul(g + r * n2, n, o + r * n);
  });
  return out;
}

// rotate one head of D values at table row p (cos/sin of D/2 columns), x -> out (may alias)
void rotate(const float* x, const float* cos, const float* sin, int64_t half, float* out) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    out[i] = a * cos[i] - b * sin[i];
    out[i + half] = b * cos[i] + a * sin[i];
  }
}

at::Tensor rope_attention(const at::Tensor& qkv, at::Tensor cache_k, at::Tensor cache_v, const at::Tensor& starts,
                          const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t kv_heads,
                          double scale) {
  check_f32(qkv, "qkv");
  check_f32(cache_k, "cache_k");
  check_f32(cache_v, "cache_v");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(qkv.dim() == 3 && cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes(),
              "sparsec rope_attention: qkv [B, T, (H + 2G) D] and caches [B, G, capacity, D] expected");
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.is_contiguous() && starts.numel() == qkv.size(0),
              "sparsec rope_attention: starts must be int64 [B]");
  const int64_t B = qkv.size(0), T = qkv.size(1), G = kv_heads, H = heads;
  const int64_t D = cache_k.size(3), cap = cache_k.size(2), half = D / 2;
  TORCH_CHECK(H % G == 0 && D % 2 == 0 && qkv.size(2) == (H + 2 * G) * D && cache_k.size(0) == B &&
                  cache_k.size(1) == G && cos.size(1) == half && sin.sizes() == cos.sizes(),
              "sparsec rope_attention: shapes do not agree (qkv ", qkv.sizes(), ", cache ", cache_k.sizes(),
              ", cos ", cos.sizes(), ")");
  const int64_t* st = starts.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(st[b] >= 0 && st[b] + T <= cap && st[b] + T <= cos.size(0), "sparsec rope_attention: row ", b,
                " ends at position ", st[b] + T, " beyond the cache (", cap, ") or the rotary table (", cos.size(0),
                ")");
  const float* src = qkv.data_ptr<float>();
  float* ck = cache_k.data_ptr<float>();
  float* cv = cache_v.data_ptr<float>();
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const int64_t width = (H + 2 * G) * D;
  at::Tensor q = at::empty({B, T, H, D}, qkv.options());
  float* qp = q.data_ptr<float>();
  // rotate q into its own buffer; rotate k and copy v into the caches at each token's position
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pos = st[b] + t;
      const float* row = src + (b * T + t) * width;
      const float* c = cs + pos * half;
      const float* s = sn + pos * half;
      for (int64_t h = 0; h < H; ++h) rotate(row + h * D, c, s, half, qp + ((b * T + t) * H + h) * D);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t slot = ((b * G + g) * cap + pos) * D;
        rotate(row + (H + g) * D, c, s, half, ck + slot);
        std::memcpy(cv + slot, row + (H + G + g) * D, D * sizeof(float));
      }
    }
  at::Tensor out = at::empty({B, T, H * D}, qkv.options());
  float* op = out.data_ptr<float>();
  const KernelTable& kt = active_kernels();
  const int64_t group = H / G, units = B * T * H;
  // one unit = one (row, token, head); small steps stay on the calling thread (a parallel region's
  // wake-up costs more than a few hundred keys)
  const int64_t keys_hint = st[0] + T;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, keys_hint * D));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    std::vector<float> scores(cap);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t h = u % H, t = (u / H) % T, b = u / (H * T);
      const int64_t g = h / group, n_keys = st[b] + t + 1;
      const int64_t base = (b * G + g) * cap * D;
      kt.attend(qp + u * D, ck + base, cv + base, n_keys, D, D, (float)scale, scores.data(), op + u * D);
    }
  });
  return out;
}

}  // namespace
}  // namespace sparsec

TORCH_LIBRARY_FRAGMENT(sparsec, m) {
  m.def("add_rms_norm(Tensor(a!) x, Tensor? delta, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("rope_attention(Tensor qkv, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor starts, Tensor cos, Tensor sin, "
        "int heads, int kv_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsec, CPU, m) {
  m.impl("add_rms_norm", &sparsec::add_rms_norm);
  m.impl("silu_mul", &sparsec::silu_mul);
  m.impl("rope_attention", &sparsec::rope_attention);
}
