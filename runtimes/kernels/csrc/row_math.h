// Row-wise vector math, in plain loops the compiler vectorizes for the ISA of the file that includes this
// header: the per-token int8 quantization of activations every int8/int4 kernel call starts with, and the
// non-matrix work of a decoder step (ops in decoder_ops.cpp) — RMSNorm of one row, SiLU(gate) * up, and the
// attention of one query head over its cached keys/values (scores, softmax, weighted sum). Each ISA file (kernels_portable.cpp,
// kernels_avx2.cpp under its AVX2 target, kernels_avx512.cpp under its AVX-512 target) includes it
// inside its own anonymous namespace, so every function below has internal linkage there (common.h
// explains why nothing from a shared header may be merged across ISA files) and `#pragma omp simd`
// (the library is built with -fopenmp) vectorizes the reductions without -ffast-math.
//
// exp is a Cephes-style polynomial (|relative error| < 2e-7 on the softmax's and SiLU's ranges) written
// with float arithmetic and integer exponent bits only, so it vectorizes where glibc's expf would not.
// It includes nothing itself (it is included inside a namespace): <cstdint> and <cstring> come first in
// the including file.
#pragma once

static inline float rm_exp(float x) {
  // selects and an integer floor, not fminf/floorf: those do not vectorize without -ffast-math
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f + 0.5f;
  int32_t ni = (int32_t)t;
  ni -= (int32_t)(t < (float)ni);
  const float n = (float)ni;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (ni + 127) << 23);  // 2^n
}

// Per-token symmetric int8 of one row of k activations: scale = max|x| / 127, q = round-half-even(x / scale)
// (a division, as the Python reference does: bit-exact), written as q + 128 into xu (VNNI's u8 form) when
// xu is set, else as int16 into xs. Returns the scale (0: an all-zero row, nothing written). Rounding is
// the add-and-subtract of 1.5 * 2^23 (round to nearest even in the default rounding mode, |q| <= 127 is far
// inside its exact range): libm's nearbyint is a call per element and kept the old loop scalar (~10 ns per
// activation, 15 µs of fixed cost on a 1536-wide layer).
static inline float rm_int8_scale(const float* x, int64_t k) {
  float amax = 0.f;
#pragma omp simd reduction(max : amax)
  for (int64_t j = 0; j < k; ++j) {
    const float a = x[j] < 0.f ? -x[j] : x[j];
    amax = a > amax ? a : amax;
  }
  return amax / 127.f;
}

// round-half-even(v / s) clamped to +-127, as a float holding an integer
static inline float rm_int8_level(float v, float s) {
  float q = (v / s + 12582912.0f) - 12582912.0f;  // + - 1.5 * 2^23
  q = q > 127.f ? 127.f : q;
  return q < -127.f ? -127.f : q;
}

static float rm_quantize_row(const float* x, int64_t k, uint8_t* xu, int16_t* xs) {
  const float s = rm_int8_scale(x, k);
  if (s == 0.f) return s;
  if (xu) {
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) xu[j] = (uint8_t)((int32_t)rm_int8_level(x[j], s) + 128);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) xs[j] = (int16_t)rm_int8_level(x[j], s);
  }
  return s;
}

// The same quantization written as plain int8 (the operand of the int8 GEMM path, ops.cpp); an all-zero
// row is written as zeros.
static float rm_quantize_row_s8(const float* x, int64_t k, int8_t* xq) {
  const float s = rm_int8_scale(x, k);
  const float divisor = s == 0.f ? 1.f : s;  // an all-zero row: every level is 0
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) xq[j] = (int8_t)rm_int8_level(x[j], divisor);
  return s;
}

// out[i] = w[i] * x[i] / sqrt(mean(x^2) + eps)  (Hugging Face's LlamaRMSNorm in fp32)
static void rm_rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / __builtin_sqrtf(ss / (float)n + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// out[i] = silu(g[i]) * u[i] with g = gu[0:n], u = gu[n:2n]
static void rm_silu_mul(const float* gu, int64_t n, float* out) {
  const float* u = gu + n;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = gu[i];
    out[i] = g / (1.0f + rm_exp(-g)) * u[i];
  }
}

// One query head over keys/values [0, n_keys) (rows of d floats, row stride `stride`):
// out = softmax(scale * K q) V. `scores` is scratch of n_keys floats.
static void rm_attend(const float* q, const float* k, const float* v, int64_t n_keys, int64_t d, int64_t stride,
                      float scale, float* scores, float* out) {
  float mx = -3.0e38f;
  for (int64_t j = 0; j < n_keys; ++j) {
    const float* kj = k + j * stride;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; ++i) s += q[i] * kj[i];
    s *= scale;
    scores[j] = s;
    mx = s > mx ? s : mx;
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n_keys; ++j) {
    const float e = rm_exp(scores[j] - mx);
    scores[j] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) out[i] = 0.f;
  for (int64_t j = 0; j < n_keys; ++j) {
    const float p = scores[j] * inv;
    const float* vj = v + j * stride;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] += p * vj[i];
  }
}
