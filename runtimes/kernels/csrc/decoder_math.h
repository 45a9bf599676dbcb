// The non-matrix work of a decoder step, in plain loops the compiler vectorizes for the ISA of the file
// that includes this header: RMSNorm of one row, SiLU(gate) * up, and the attention of one query head
// over its cached keys/values (scores, softmax, weighted sum). Each ISA file (kernels_portable.cpp,
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

static inline float dm_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.44269504088896341f + 0.5f;
  int32_t ni = (int32_t)t;
  ni -= (t < (float)ni) ? 1 : 0;  // floor without libm (vectorizes on every ISA)
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
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// out[i] = w[i] * x[i] / sqrt(mean(x^2) + eps)  (Hugging Face's LlamaRMSNorm in fp32)
static void dm_rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / __builtin_sqrtf(ss / (float)n + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// out[i] = silu(g[i]) * u[i] with g = gu[0:n], u = gu[n:2n]
static void dm_silu_mul(const float* gu, int64_t n, float* out) {
  const float* u = gu + n;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = gu[i];
    out[i] = g / (1.0f + dm_exp(-g)) * u[i];
  }
}

// One query head over keys/values [0, n_keys) (rows of d floats, row stride `stride`):
// out = softmax(scale * K q) V. `scores` is scratch of n_keys floats.
static void dm_attend(const float* q, const float* k, const float* v, int64_t n_keys, int64_t d, int64_t stride,
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
    const float e = dm_exp(scores[j] - mx);
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
