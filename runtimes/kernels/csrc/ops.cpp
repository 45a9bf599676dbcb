// Torch glue: registers the sparsec::* operators (TORCH_LIBRARY, so they are ordinary torch ops that
// torch.compile can see), chooses the kernel ISA at run time, quantizes activations, threads over
// output rows with at::parallel_for (torch's own intra-op pool) and applies the fp32 epilogue.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

namespace sparsec {
namespace {

// Rows per parallel work item: a multiple of every kernel's row tile (4 at batch 1, 2 for M > 1).
constexpr int64_t kRowBlock = 16;
// Above this many tokens the fp32 path densifies the weight once per call and calls torch's GEMM:
// compute-bound there, and MKL's sgemm beats expand + FMA (docs/kernels.md).
constexpr int64_t kDensifyM = 16;

bool cpu_has(const std::string& isa) {
  if (isa == "portable") return true;
#if !(defined(__x86_64__) || defined(__i386__))
  return false;  // only the portable kernels exist off x86
#else
  __builtin_cpu_init();
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512dq");
  return false;
#endif
}

KernelTable table_for(const std::string& isa) {
  if (isa == "avx512") return avx512_kernels();
  if (isa == "avx2") return avx2_kernels();
  return portable_kernels();
}

std::vector<std::string> available() {
  std::vector<std::string> out;
  for (const char* name : {"avx512", "avx2", "portable"})
    if (cpu_has(name)) out.emplace_back(name);
  return out;
}

std::mutex g_mu;
bool g_ready = false;
KernelTable g_table;

void select(const std::string& isa) {
  TORCH_CHECK(isa == "portable" || isa == "avx2" || isa == "avx512",
              "error: unknown kernel ISA '", isa, "' (known: avx512, avx2, portable)");
  TORCH_CHECK(cpu_has(isa), "error: this CPU cannot run the '", isa, "' kernels (available: ",
              c10::Join(", ", available()), ")");
  g_table = table_for(isa);
  g_ready = true;
}

const KernelTable& kernels() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_ready) {
    init_tables();
    const char* env = std::getenv("SPARSEC_KERNEL_ISA");
    if (env && *env) {
      select(std::string(env));
    } else {
      select(available().front());
    }
  }
  return g_table;
}

// Software prefetch distance along a tile stream. Single thread, 11008x4096 70 % int8 rotating over
// 24 copies (460 MB), fastest of 72 calls: 0 B 2.40 ms, 1024 B 1.74-1.79 ms, 2048-4096 B 1.39-1.77 ms,
// 3072 B best in each pass; dense int8 2.7-3.3 ms (docs/kernels.md).
int64_t prefetch_bytes() {
  static const int64_t pf = [] {
    const char* env = std::getenv("SPARSEC_PREFETCH_BYTES");
    return env && *env ? std::atoll(env) : (int64_t)3072;
  }();
  return pf;
}

std::string current_isa() { return kernels().name; }

void set_isa(std::string isa) {
  kernels();
  std::lock_guard<std::mutex> lock(g_mu);
  select(isa);
}

std::vector<std::string> available_isas() { return available(); }

// ---- activations ------------------------------------------------------------------------------

// Quantized activations live in per-thread scratch (no allocation per call at batch 1) and only in
// the form the active ISA reads: u8 (x + 128) for VNNI, int16 for AVX2 / portable.
struct I8Acts {
  const uint8_t* xu = nullptr;
  const int16_t* xs = nullptr;
  std::vector<float> scale;  // [m]
};

bool wants_u8(const KernelTable& kt) { return kt.name[0] == 'a' && kt.name[3] == '5'; }  // "avx512"

template <class T>
T* scratch(std::vector<T>& buf, size_t count, T fill) {
  buf.assign(count, fill);
  return buf.data();
}

thread_local std::vector<uint8_t> t_xu;
thread_local std::vector<int16_t> t_xs;

// Per-token symmetric int8: scale = max|x| / 127, xq = round-half-even(x / scale) clamped to +-127.
I8Acts quantize_rows(const KernelTable& kt, const at::Tensor& x2, int64_t kp) {
  const int64_t m = x2.size(0), k = x2.size(1);
  auto xf = x2.to(at::kFloat).contiguous();
  I8Acts a;
  a.scale.assign((size_t)m, 0.f);
  const bool u8 = wants_u8(kt);
  uint8_t* xu = u8 ? scratch<uint8_t>(t_xu, (size_t)(m * kp), 128) : nullptr;
  int16_t* xs = u8 ? nullptr : scratch<int16_t>(t_xs, (size_t)(m * kp), 0);
  a.xu = xu;
  a.xs = xs;
  const float* src = xf.data_ptr<float>();
  for (int64_t t = 0; t < m; ++t)
    a.scale[t] = kt.quantize_row(src + t * k, k, u8 ? xu + t * kp : nullptr, u8 ? nullptr : xs + t * kp);
  return a;
}

// Already-quantized int8 activations (the exact-accumulation test ops).
I8Acts widen_rows(const KernelTable& kt, const at::Tensor& xq, int64_t kp) {
  TORCH_CHECK(xq.scalar_type() == at::kChar, "error: quantized activations must be int8");
  const int64_t m = xq.size(0), k = xq.size(1);
  auto xc = xq.contiguous();
  I8Acts a;
  a.scale.assign((size_t)m, 1.f);
  uint8_t* xu = scratch<uint8_t>(t_xu, (size_t)(m * kp), 128);
  int16_t* xs = scratch<int16_t>(t_xs, (size_t)(m * kp), 0);
  a.xu = xu;
  a.xs = xs;
  const int8_t* src = xc.data_ptr<int8_t>();
  for (int64_t t = 0; t < m; ++t)
    for (int64_t j = 0; j < k; ++j) {
      xu[t * kp + j] = (uint8_t)((int)src[t * k + j] + 128);
      xs[t * kp + j] = src[t * k + j];
    }
  (void)kt;
  return a;
}

at::Tensor pad_f32(const at::Tensor& x2, int64_t kp) {
  auto xf = x2.to(at::kFloat).contiguous();
  if (xf.size(1) == kp) return xf;
  auto out = at::zeros({xf.size(0), kp}, xf.options());
  out.narrow(1, 0, xf.size(1)).copy_(xf);
  return out;
}

// ---- argument checks ------------------------------------------------------------------------------

int64_t check_sparse(const at::Tensor& masks, const at::Tensor& tile_ptr, const at::Tensor& values, int64_t n,
                     int64_t k, at::ScalarType vdtype) {
  TORCH_CHECK(n > 0, "error: out_features must be > 0");
  const int64_t kc = (k + 63) / 64, tiles = (n + kTile - 1) / kTile;
  TORCH_CHECK(masks.scalar_type() == at::kLong && masks.is_contiguous() && masks.numel() == tiles * kc * kTile,
              "error: masks must be contiguous int64 [", tiles, " x ", kc, " x ", kTile, "], got ", masks.sizes());
  TORCH_CHECK(tile_ptr.scalar_type() == at::kLong && tile_ptr.is_contiguous() && tile_ptr.numel() == tiles + 1,
              "error: tile_ptr must be contiguous int64 [", tiles + 1, "]");
  TORCH_CHECK(values.scalar_type() == vdtype && values.is_contiguous(), "error: values must be contiguous ",
              c10::toString(vdtype));
  const int64_t pad = vdtype == at::kChar ? 64 : vdtype == at::kBFloat16 ? 32 : 16;
  const int64_t nnz = tile_ptr.data_ptr<int64_t>()[tiles];
  TORCH_CHECK(values.numel() >= nnz + pad, "error: values must hold nnz + ", pad, " padding elements (",
              values.numel(), " < ", nnz + pad, ")");
  return kc;
}

void check_vec(const at::Tensor& t, int64_t n, at::ScalarType dt, const char* what) {
  TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous() && t.numel() == n, "error: ", what, " must be contiguous ",
              c10::toString(dt), " [", n, "]");
}

// Below this many (row, chunk, token) steps a call runs on the calling thread: waking the pool costs
// more than it saves on a 64 x 64 layer (docs/kernels.md, per-op overhead).
constexpr int64_t kMinParallelWork = 4096;

template <class F>
void over_rows(int64_t n, const F& f, int64_t work = 1 << 30) {
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  if (work < kMinParallelWork) {
    f(0, n);
    return;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    f(b0 * kRowBlock, std::min(n, b1 * kRowBlock));
  });
}

at::Tensor epilogue_shape(const at::Tensor& x, at::Tensor y2, int64_t n) {
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  return y2.view(sizes);
}

// ---- int8 ---------------------------------------------------------------------------------------

at::Tensor sparse_i8_acc(const at::Tensor& xq, const at::Tensor& masks, const at::Tensor& tile_ptr,
                         const at::Tensor& values, const at::Tensor& rowsum, int64_t n) {
  TORCH_CHECK(xq.dim() == 2, "error: xq must be [tokens, in_features]");
  const int64_t k = xq.size(1), kc = check_sparse(masks, tile_ptr, values, n, k, at::kChar);
  check_vec(rowsum, n, at::kInt, "rowsum");
  const auto& kt = kernels();
  I8Acts a = widen_rows(kt, xq, kc * 64);
  SparseI8 w{(const uint64_t*)masks.data_ptr<int64_t>(), tile_ptr.data_ptr<int64_t>(), values.data_ptr<int8_t>(),
             rowsum.data_ptr<int32_t>(), n, k, kc, prefetch_bytes()};
  ActI8 act{a.xu, a.xs, xq.size(0), kc * 64};
  auto acc = at::empty({xq.size(0), n}, xq.options().dtype(at::kInt));
  int32_t* out = acc.data_ptr<int32_t>();
  over_rows(n, [&](int64_t n0, int64_t n1) { kt.sparse_i8(w, act, n0, n1, out); });
  return acc;
}

at::Tensor dense_i8_acc(const at::Tensor& xq, const at::Tensor& q, const at::Tensor& rowsum, int64_t n) {
  TORCH_CHECK(xq.dim() == 2, "error: xq must be [tokens, in_features]");
  const int64_t k = xq.size(1), kc = (k + 63) / 64;
  check_vec(q, n * kc * 64, at::kChar, "q (padded to 64 columns)");
  check_vec(rowsum, n, at::kInt, "rowsum");
  const auto& kt = kernels();
  I8Acts a = widen_rows(kt, xq, kc * 64);
  DenseI8 w{q.data_ptr<int8_t>(), rowsum.data_ptr<int32_t>(), n, k, kc};
  ActI8 act{a.xu, a.xs, xq.size(0), kc * 64};
  auto acc = at::empty({xq.size(0), n}, xq.options().dtype(at::kInt));
  int32_t* out = acc.data_ptr<int32_t>();
  over_rows(n, [&](int64_t n0, int64_t n1) { kt.dense_i8(w, act, n0, n1, out); });
  return acc;
}

// y[t, n] = acc[t, n] * sx[t] * sw[n] + bias[n], for the rows [n0, n1) a worker just computed.
void i8_epilogue(const int32_t* acc, const float* sx, const float* sw, const float* bias, int64_t m, int64_t n,
                 int64_t n0, int64_t n1, float* y) {
  for (int64_t t = 0; t < m; ++t)
    for (int64_t j = n0; j < n1; ++j)
      y[t * n + j] = (float)acc[t * n + j] * (sx[t] * sw[j]) + (bias ? bias[j] : 0.f);
}

thread_local std::vector<int32_t> t_acc;

template <class RunRows>
at::Tensor i8_linear(const KernelTable& kt, const at::Tensor& x, int64_t k, int64_t kc, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias, int64_t n, const RunRows& run) {
  check_vec(scales, n, at::kFloat, "scales");
  if (bias) check_vec(*bias, n, at::kFloat, "bias");
  auto x2 = x.reshape({-1, k});
  const int64_t m = x2.size(0);
  I8Acts a = quantize_rows(kt, x2, kc * 64);
  ActI8 act{a.xu, a.xs, m, kc * 64};
  t_acc.resize((size_t)(m * n));
  auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
  int32_t* accp = t_acc.data();
  float* yp = y.data_ptr<float>();
  const float* sx = a.scale.data();
  const float* sw = scales.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  over_rows(n, [&](int64_t n0, int64_t n1) {
    run(act, n0, n1, accp);
    i8_epilogue(accp, sx, sw, bp, m, n, n0, n1, yp);
  }, n * kc * m);
  return epilogue_shape(x, y, n);
}

// From this many tokens an int8 layer runs as int8 GEMMs (at::_int_mm: oneDNN, VNNI / AMX on the CPUs that
// have them) on row tiles of the weight's dense form — densified into a per-thread buffer (sparse) or read
// as stored (dense-int8) — instead of the per-token kernels: the compute-bound regime (prefill, encoders)
// where expanding each chunk once per 4 tokens lost to a GEMM library (SmolLM2 prefill at 128 tokens was
// 0.75x torch's fp32 GEMM). Same quantized activations, exact int32 products, same epilogue: the output
// is identical to the per-token path's.
constexpr int64_t kInt8GemmM = 16;

template <class DenseRows>
at::Tensor i8_gemm_linear(const KernelTable& kt, const at::Tensor& x, int64_t k, int64_t kc, const at::Tensor& scales,
                          const c10::optional<at::Tensor>& bias, int64_t n, const DenseRows& dense_rows) {
  check_vec(scales, n, at::kFloat, "scales");
  if (bias) check_vec(*bias, n, at::kFloat, "bias");
  const int64_t kp = kc * 64;
  auto x2 = x.reshape({-1, k});
  const int64_t m = x2.size(0);
  auto xf = x2.to(at::kFloat).contiguous();
  // symmetric int8 activations, zero padded to kp, rows quantized in parallel
  auto xq = at::empty({m, kp}, x.options().dtype(at::kChar));
  std::vector<float> sx((size_t)m);
  {
    int8_t* q = xq.data_ptr<int8_t>();
    const float* src = xf.data_ptr<float>();
    at::parallel_for(0, m, std::max<int64_t>(1, 16384 / kp), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        sx[t] = kt.quantize_row_s8(src + t * k, k, q + t * kp);
        if (kp > k) std::memset(q + t * kp + k, 0, (size_t)(kp - k));
      }
    });
  }
  auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const float* sw = scales.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  // Row tiles one after another, each GEMM threaded by oneDNN itself (torch's pool): splitting tiles over
  // threads left one thread waiting at the barrier for the other's last GEMM. 512-row tiles: a buffer of
  // 512 x kp bytes (2 MiB at K = 4096) and few calls per layer.
  const int64_t TR = 512;
  std::vector<int8_t> buf((size_t)(std::min(TR, n) * kp));
  for (int64_t r0 = 0; r0 < n; r0 += TR) {
    const int64_t r1 = std::min(n, r0 + TR), w_rows = r1 - r0;
    const int8_t* rows = dense_rows(r0, r1, buf.data());
    auto w = at::from_blob((void*)rows, {w_rows, kp}, xq.options());
    auto acc = at::_int_mm(xq, w.t()).contiguous();  // [m, w_rows] int32
    const int32_t* ap = acc.data_ptr<int32_t>();
    at::parallel_for(0, m, std::max<int64_t>(1, 16384 / w_rows), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float st = sx[t];
        const int32_t* at_ = ap + t * w_rows;
        float* yt = yp + t * n + r0;
        if (bp)
          for (int64_t j = 0; j < w_rows; ++j) yt[j] = (float)at_[j] * (st * sw[r0 + j]) + bp[r0 + j];
        else
          for (int64_t j = 0; j < w_rows; ++j) yt[j] = (float)at_[j] * (st * sw[r0 + j]);
      }
    });
  }
  return epilogue_shape(x, y, n);
}

at::Tensor sparse_linear_i8(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& tile_ptr,
                            const at::Tensor& values, const at::Tensor& scales, const at::Tensor& rowsum,
                            const c10::optional<at::Tensor>& bias, int64_t n) {
  const int64_t k = x.size(-1), kc = check_sparse(masks, tile_ptr, values, n, k, at::kChar);
  check_vec(rowsum, n, at::kInt, "rowsum");
  const auto& kt = kernels();
  SparseI8 w{(const uint64_t*)masks.data_ptr<int64_t>(), tile_ptr.data_ptr<int64_t>(), values.data_ptr<int8_t>(),
             rowsum.data_ptr<int32_t>(), n, k, kc, prefetch_bytes()};
  if (x.numel() / k >= kInt8GemmM)
    return i8_gemm_linear(kt, x, k, kc, scales, bias, n, [&](int64_t r0, int64_t r1, int8_t* buf) -> const int8_t* {
      kt.densify_i8(w, r0, r1, buf);
      return buf;
    });
  return i8_linear(kt, x, k, kc, scales, bias, n,
                   [&](const ActI8& act, int64_t n0, int64_t n1, int32_t* acc) { kt.sparse_i8(w, act, n0, n1, acc); });
}

at::Tensor dense_linear_i8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                           const at::Tensor& rowsum, const c10::optional<at::Tensor>& bias, int64_t n) {
  const int64_t k = x.size(-1), kc = (k + 63) / 64;
  check_vec(q, n * kc * 64, at::kChar, "q (padded to 64 columns)");
  check_vec(rowsum, n, at::kInt, "rowsum");
  const auto& kt = kernels();
  DenseI8 w{q.data_ptr<int8_t>(), rowsum.data_ptr<int32_t>(), n, k, kc};
  if (x.numel() / k >= kInt8GemmM)
    return i8_gemm_linear(kt, x, k, kc, scales, bias, n,
                          [&](int64_t r0, int64_t, int8_t*) -> const int8_t* { return w.q + r0 * kc * 64; });
  return i8_linear(kt, x, k, kc, scales, bias, n,
                   [&](const ActI8& act, int64_t n0, int64_t n1, int32_t* acc) { kt.dense_i8(w, act, n0, n1, acc); });
}

// ---- int4 ---------------------------------------------------------------------------------------

int64_t check_i4(const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& comp, int64_t scale_count,
                 int64_t n, int64_t kc) {
  TORCH_CHECK(kc <= kMaxI4Chunks, "error: int4 kernels take in_features <= ", kMaxI4Chunks * 64, ", got ", kc * 64);
  check_vec(scales, scale_count, at::kHalf, "scales (fp16, one per row and 64-column chunk)");
  check_vec(zeros, scale_count, at::kByte, "zeros (uint8, one per row and 64-column chunk)");
  check_vec(comp, n, at::kFloat, "comp");
  return kc;
}

SparseI4 sparse_i4_args(const at::Tensor& masks, const at::Tensor& tile_ptr, const at::Tensor& values,
                        const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& comp, int64_t n,
                        int64_t k) {
  TORCH_CHECK(n > 0, "error: out_features must be > 0");
  const int64_t kc = (k + 63) / 64, tiles = (n + kTile - 1) / kTile;
  TORCH_CHECK(masks.scalar_type() == at::kLong && masks.is_contiguous() && masks.numel() == tiles * kc * kTile,
              "error: masks must be contiguous int64 [", tiles, " x ", kc, " x ", kTile, "], got ", masks.sizes());
  TORCH_CHECK(tile_ptr.scalar_type() == at::kLong && tile_ptr.is_contiguous() && tile_ptr.numel() == tiles + 1,
              "error: tile_ptr must be contiguous int64 [", tiles + 1, "]");
  TORCH_CHECK(values.scalar_type() == at::kByte && values.is_contiguous(), "error: values must be contiguous uint8");
  const int64_t bytes = tile_ptr.data_ptr<int64_t>()[tiles];
  TORCH_CHECK(values.numel() >= bytes + 32, "error: values must hold the packed codes + 32 padding bytes (",
              values.numel(), " < ", bytes + 32, ")");
  check_i4(scales, zeros, comp, tiles * kc * kTile, n, kc);
  return SparseI4{(const uint64_t*)masks.data_ptr<int64_t>(), tile_ptr.data_ptr<int64_t>(), values.data_ptr<uint8_t>(),
                  (const uint16_t*)scales.data_ptr<at::Half>(), zeros.data_ptr<uint8_t>(), comp.data_ptr<float>(), n, k,
                  kc, prefetch_bytes()};
}

DenseI4 dense_i4_args(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& comp,
                      int64_t n, int64_t k) {
  TORCH_CHECK(n > 0, "error: out_features must be > 0");
  const int64_t kc = (k + 63) / 64;
  check_vec(q, n * kc * 32, at::kByte, "q (uint8, two codes per byte, padded to 64 columns)");
  check_i4(scales, zeros, comp, n * kc, n, kc);
  return DenseI4{q.data_ptr<uint8_t>(), (const uint16_t*)scales.data_ptr<at::Half>(), zeros.data_ptr<uint8_t>(),
                 comp.data_ptr<float>(), n, k, kc};
}

// Test ops: already-quantized int8 activations in, sum_chunks s * dot out (fp32; exact with unit scales).
template <class W, class Run>
at::Tensor i4_acc(const at::Tensor& xq, const W& w, const Run& run) {
  TORCH_CHECK(xq.dim() == 2 && xq.size(1) == w.k, "error: xq must be [tokens, in_features]");
  const auto& kt = kernels();
  I8Acts a = widen_rows(kt, xq, w.kc * 64);
  ActI8 act{a.xu, a.xs, xq.size(0), w.kc * 64};
  at::Tensor acc = at::empty({xq.size(0), w.n}, xq.options().dtype(at::kFloat));
  float* out = acc.template data_ptr<float>();
  over_rows(w.n, [&](int64_t n0, int64_t n1) { run(kt, act, n0, n1, out); });
  return acc;
}

at::Tensor sparse_i4_acc(const at::Tensor& xq, const at::Tensor& masks, const at::Tensor& tile_ptr,
                         const at::Tensor& values, const at::Tensor& scales, const at::Tensor& zeros,
                         const at::Tensor& comp, int64_t n) {
  const SparseI4 w = sparse_i4_args(masks, tile_ptr, values, scales, zeros, comp, n, xq.size(-1));
  return i4_acc(xq, w, [&](const KernelTable& kt, const ActI8& act, int64_t n0, int64_t n1, float* out) {
    kt.sparse_i4(w, act, n0, n1, out);
  });
}

at::Tensor dense_i4_acc(const at::Tensor& xq, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros,
                        const at::Tensor& comp, int64_t n) {
  const DenseI4 w = dense_i4_args(q, scales, zeros, comp, n, xq.size(-1));
  return i4_acc(xq, w, [&](const KernelTable& kt, const ActI8& act, int64_t n0, int64_t n1, float* out) {
    kt.dense_i4(w, act, n0, n1, out);
  });
}

thread_local std::vector<float> t_facc;

// y[t, n] = acc[t, n] * sx[t] + bias[n]: the group scales are applied inside the int4 kernels.
template <class RunRows>
at::Tensor i4_linear(const KernelTable& kt, const at::Tensor& x, int64_t k, int64_t kc,
                     const c10::optional<at::Tensor>& bias, int64_t n, const RunRows& run) {
  if (bias) check_vec(*bias, n, at::kFloat, "bias");
  auto x2 = x.reshape({-1, k});
  const int64_t m = x2.size(0);
  I8Acts a = quantize_rows(kt, x2, kc * 64);
  ActI8 act{a.xu, a.xs, m, kc * 64};
  t_facc.resize((size_t)(m * n));
  auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
  float* accp = t_facc.data();
  float* yp = y.data_ptr<float>();
  const float* sx = a.scale.data();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  over_rows(n, [&](int64_t n0, int64_t n1) {
    run(act, n0, n1, accp);
    for (int64_t t = 0; t < m; ++t)
      for (int64_t j = n0; j < n1; ++j) yp[t * n + j] = accp[t * n + j] * sx[t] + (bp ? bp[j] : 0.f);
  }, n * kc * m);
  return epilogue_shape(x, y, n);
}

at::Tensor sparse_linear_i4(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& tile_ptr,
                            const at::Tensor& values, const at::Tensor& scales, const at::Tensor& zeros,
                            const at::Tensor& comp, const c10::optional<at::Tensor>& bias, int64_t n) {
  const int64_t k = x.size(-1);
  const SparseI4 w = sparse_i4_args(masks, tile_ptr, values, scales, zeros, comp, n, k);
  const auto& kt = kernels();
  return i4_linear(kt, x, k, w.kc, bias, n,
                   [&](const ActI8& act, int64_t n0, int64_t n1, float* acc) { kt.sparse_i4(w, act, n0, n1, acc); });
}

at::Tensor dense_linear_i4(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros,
                           const at::Tensor& comp, const c10::optional<at::Tensor>& bias, int64_t n) {
  const int64_t k = x.size(-1);
  const DenseI4 w = dense_i4_args(q, scales, zeros, comp, n, k);
  const auto& kt = kernels();
  return i4_linear(kt, x, k, w.kc, bias, n,
                   [&](const ActI8& act, int64_t n0, int64_t n1, float* acc) { kt.dense_i4(w, act, n0, n1, acc); });
}

// ---- fp32 ---------------------------------------------------------------------------------------

// The dense [n, k] matrix of a packed fp32 weight (tests and debugging; the GEMM path densifies tiles).
at::Tensor densify_f32(const at::Tensor& masks, const at::Tensor& tile_ptr, const at::Tensor& values, int64_t n,
                       int64_t k) {
  const int64_t kc = check_sparse(masks, tile_ptr, values, n, k, at::kFloat);
  auto out = at::zeros({n, k}, values.options());
  float* o = out.data_ptr<float>();
  const uint64_t* mk = (const uint64_t*)masks.data_ptr<int64_t>();
  const int64_t* rp = tile_ptr.data_ptr<int64_t>();
  const float* v = values.data_ptr<float>();
  over_rows(n, [&](int64_t n0, int64_t n1) {
    for (int64_t tile = n0 / kTile; tile * kTile < n1; ++tile) {
      const float* p = v + rp[tile];
      for (int64_t c = 0; c < kc; ++c)
        for (int r = 0; r < kTile; ++r) {
          uint64_t m = mk[(tile * kc + c) * kTile + r];
          float* orow = o + (tile * kTile + r) * k + c * 64;
          while (m) {
            orow[__builtin_ctzll(m)] = *p++;  // padded rows (>= n) have empty masks
            m &= m - 1;
          }
        }
    }
  });
  return out;
}

// M > kDensifyM: each worker densifies row tiles (~4 MiB) into a cache-resident buffer (vector expansion,
// the ISA's densify kernel) and runs torch's GEMM on it: the compute-bound regime, where MKL's sgemm
// beats expand + FMA per token; no dense copy of the whole W ever exists. `dense_rows(r0, r1, buf)` writes
// rows [r0, r1) of W as fp32 [r1 - r0, kp] into buf (fp32 and bf16 weights, sparse or dense).
template <class DenseRows>
at::Tensor tiled_dense_gemm(int64_t n, int64_t k, int64_t kp, const at::Tensor& x2, const DenseRows& dense_rows) {
  // ~4 MiB tiles: 64-row tiles left MKL with narrow GEMMs (11008x4096, M = 64, one thread: 180 ms vs
  // 128 ms dense); 256 rows at K = 4096 measured 79 ms vs 76 ms dense (docs/kernels.md).
  const int64_t TR = std::max<int64_t>(kTile, std::min<int64_t>(512, (1 << 20) / kp / kTile * kTile));
  auto xf = x2.to(at::kFloat).contiguous();
  auto y = at::empty({xf.size(0), n}, xf.options());
  // InferenceMode is thread-local: the pool's threads must run torch ops in the caller's mode, or
  // writing into `y` (an inference tensor when the caller is in inference mode) is refused.
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, (n + TR - 1) / TR, 1, [&](int64_t b0, int64_t b1) {
    c10::InferenceMode guard(inference);
    auto buf = at::empty({TR, kp}, xf.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * TR, r1 = std::min(n, r0 + TR);
      dense_rows(r0, r1, buf.data_ptr<float>());
      y.narrow(1, r0, r1 - r0).copy_(at::mm(xf, buf.narrow(0, 0, r1 - r0).narrow(1, 0, k).t()));
    }
  });
  return y;
}

// The batch-1 / small-M fp32-activation path shared by fp32 and bf16 weights: pad x to kp, run the kernel
// over row blocks, add the bias.
// Each 32-column block of x as its 16 even columns, then its 16 odd ones (KernelTable::bf16_pairs).
at::Tensor pair_permuted(const at::Tensor& xp) {
  auto out = at::empty_like(xp);
  const float* src = xp.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t total = xp.numel();
  for (int64_t b = 0; b < total; b += 32)
    for (int64_t i = 0; i < 16; ++i) {
      dst[b + i] = src[b + 2 * i];
      dst[b + 16 + i] = src[b + 2 * i + 1];
    }
  return out;
}

template <class RunRows>
at::Tensor f32_act_linear(const at::Tensor& x2, int64_t kp, int64_t n, const c10::optional<at::Tensor>& bias,
                          const RunRows& run, bool pairs = false) {
  const int64_t m = x2.size(0);
  auto xp = pad_f32(x2, kp);
  if (pairs) xp = pair_permuted(xp);
  ActF32 act{xp.data_ptr<float>(), m, kp};
  auto y = at::empty({m, n}, x2.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  over_rows(n, [&](int64_t n0, int64_t n1) {
    run(act, n0, n1, yp);
    if (bp)
      for (int64_t t = 0; t < m; ++t)
        for (int64_t j = n0; j < n1; ++j) yp[t * n + j] += bp[j];
  }, n * (kp / 64) * m);
  return y;
}

// The fp32-output layers (fp32 and bf16 weights): above kDensifyM tokens densified row tiles + torch's GEMM
// (`dense_rows`), else the tile kernel on fp32 activations (`run`); bias added either way.
template <class DenseRows, class RunRows>
at::Tensor f32_out_linear(const at::Tensor& x, int64_t n, int64_t kp, const c10::optional<at::Tensor>& bias,
                          const DenseRows& dense_rows, const RunRows& run, bool pairs = false) {
  const int64_t k = x.size(-1);
  auto x2 = x.reshape({-1, k});
  at::Tensor y;
  if (x2.size(0) > kDensifyM) {
    y = tiled_dense_gemm(n, k, kp, x2, dense_rows);
    if (bias) y.add_(*bias);
  } else {
    y = f32_act_linear(x2, kp, n, bias, run, pairs);
  }
  return epilogue_shape(x, y, n);
}

at::Tensor sparse_linear_f32(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& tile_ptr,
                             const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t n) {
  const int64_t k = x.size(-1), kc = check_sparse(masks, tile_ptr, values, n, k, at::kFloat);
  if (bias) check_vec(*bias, n, at::kFloat, "bias");
  const auto& kt = kernels();
  SparseF32 w{(const uint64_t*)masks.data_ptr<int64_t>(), tile_ptr.data_ptr<int64_t>(), values.data_ptr<float>(), n,
              k, kc, prefetch_bytes()};
  return f32_out_linear(
      x, n, kc * 64, bias, [&](int64_t r0, int64_t r1, float* buf) { kt.densify_f32(w, r0, r1, buf); },
      [&](const ActF32& act, int64_t n0, int64_t n1, float* yp) { kt.sparse_f32(w, act, n0, n1, yp); });
}

// ---- bf16 (weights bf16, activations and sums fp32) -------------------------------------------------

at::Tensor sparse_linear_bf16(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& tile_ptr,
                              const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t n) {
  const int64_t k = x.size(-1), kc = check_sparse(masks, tile_ptr, values, n, k, at::kBFloat16);
  if (bias) check_vec(*bias, n, at::kFloat, "bias");
  const auto& kt = kernels();
  SparseBF16 w{(const uint64_t*)masks.data_ptr<int64_t>(), tile_ptr.data_ptr<int64_t>(),
               (const uint16_t*)values.data_ptr<at::BFloat16>(), n, k, kc, prefetch_bytes()};
  return f32_out_linear(
      x, n, kc * 64, bias, [&](int64_t r0, int64_t r1, float* buf) { kt.densify_bf16(w, r0, r1, buf); },
      [&](const ActF32& act, int64_t n0, int64_t n1, float* yp) { kt.sparse_bf16(w, act, n0, n1, yp); }, kt.bf16_pairs);
}

at::Tensor dense_linear_bf16(const at::Tensor& x, const at::Tensor& q, const c10::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(n > 0, "error: out_features must be > 0");
  const int64_t k = x.size(-1), kc = (k + 63) / 64, kp = kc * 64;
  check_vec(q, n * kp, at::kBFloat16, "q (bf16, padded to 64 columns)");
  if (bias) check_vec(*bias, n, at::kFloat, "bias");
  const auto& kt = kernels();
  DenseBF16 w{(const uint16_t*)q.data_ptr<at::BFloat16>(), n, k, kc};
  return f32_out_linear(
      x, n, kp, bias,
      [&](int64_t r0, int64_t r1, float* buf) {
        const uint16_t* src = w.q + r0 * kp;
        uint32_t* dst = (uint32_t*)buf;
        for (int64_t i = 0; i < (r1 - r0) * kp; ++i) dst[i] = (uint32_t)src[i] << 16;  // bf16 -> fp32, exact
      },
      [&](const ActF32& act, int64_t n0, int64_t n1, float* yp) { kt.dense_bf16(w, act, n0, n1, yp); }, kt.bf16_pairs);
}

// A no-op with the same argument handling, to measure per-call overhead at batch 1.
at::Tensor noop(const at::Tensor& x) { return x; }

}  // namespace

const KernelTable& active_kernels() { return kernels(); }

}  // namespace sparsec

TORCH_LIBRARY(sparsec, m) {
  m.def("isa() -> str", &sparsec::current_isa);
  m.def("set_isa(str isa) -> ()", &sparsec::set_isa);
  m.def("available_isas() -> str[]", &sparsec::available_isas);
  m.def("sparse_i8_acc(Tensor xq, Tensor masks, Tensor tile_ptr, Tensor values, Tensor rowsum, int n) -> Tensor");
  m.def("dense_i8_acc(Tensor xq, Tensor q, Tensor rowsum, int n) -> Tensor");
  m.def("sparse_linear_i8(Tensor x, Tensor masks, Tensor tile_ptr, Tensor values, Tensor scales, Tensor rowsum, "
        "Tensor? bias, int n) -> Tensor");
  m.def("dense_linear_i8(Tensor x, Tensor q, Tensor scales, Tensor rowsum, Tensor? bias, int n) -> Tensor");
  m.def("sparse_linear_f32(Tensor x, Tensor masks, Tensor tile_ptr, Tensor values, Tensor? bias, int n) -> Tensor");
  m.def("densify_f32(Tensor masks, Tensor tile_ptr, Tensor values, int n, int k) -> Tensor");
  m.def("sparse_linear_bf16(Tensor x, Tensor masks, Tensor tile_ptr, Tensor values, Tensor? bias, int n) -> Tensor");
  m.def("dense_linear_bf16(Tensor x, Tensor q, Tensor? bias, int n) -> Tensor");
  m.def("sparse_i4_acc(Tensor xq, Tensor masks, Tensor tile_ptr, Tensor values, Tensor scales, Tensor zeros, "
        "Tensor comp, int n) -> Tensor");
  m.def("dense_i4_acc(Tensor xq, Tensor q, Tensor scales, Tensor zeros, Tensor comp, int n) -> Tensor");
  m.def("sparse_linear_i4(Tensor x, Tensor masks, Tensor tile_ptr, Tensor values, Tensor scales, Tensor zeros, "
        "Tensor comp, Tensor? bias, int n) -> Tensor");
  m.def("dense_linear_i4(Tensor x, Tensor q, Tensor scales, Tensor zeros, Tensor comp, Tensor? bias, int n) -> Tensor");
  m.def("noop(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsec, CPU, m) {
  m.impl("sparse_i8_acc", &sparsec::sparse_i8_acc);
  m.impl("dense_i8_acc", &sparsec::dense_i8_acc);
  m.impl("sparse_linear_i8", &sparsec::sparse_linear_i8);
  m.impl("dense_linear_i8", &sparsec::dense_linear_i8);
  m.impl("sparse_linear_f32", &sparsec::sparse_linear_f32);
  m.impl("densify_f32", &sparsec::densify_f32);
  m.impl("sparse_linear_bf16", &sparsec::sparse_linear_bf16);
  m.impl("dense_linear_bf16", &sparsec::dense_linear_bf16);
  m.impl("sparse_i4_acc", &sparsec::sparse_i4_acc);
  m.impl("dense_i4_acc", &sparsec::dense_i4_acc);
  m.impl("sparse_linear_i4", &sparsec::sparse_linear_i4);
  m.impl("dense_linear_i4", &sparsec::dense_linear_i4);
  m.impl("noop", &sparsec::noop);
}
