// AVX2 + FMA kernels: for x86 CPUs without AVX-512 (Haswell .. Alder Lake, Zen 1-3).
//
// AVX2 has no expand instruction, so expansion is table-driven: each mask byte indexes a pshufb
// control (int8) or a vpermps index + keep mask (fp32) built once in init_tables(). int8 products use
// sign-extended int16 activations and vpmaddwd (exact; the u8 x s8 vpmaddubsw would saturate).
// Everything here has internal linkage (see common.h for why).
#include <cstring>

#include "common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,popcnt,bmi,bmi2")

namespace sparsec {
namespace {

__attribute__((always_inline)) inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

__attribute__((always_inline)) inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 packed int8 values at p expanded under the 16 mask bits m16 into 16 int16 lanes; advances p.
__attribute__((always_inline)) inline __m256i expand16_i8(const int8_t*& p, unsigned m16) {
  const unsigned b0 = m16 & 0xffu, b1 = m16 >> 8;
  const int c0 = _mm_popcnt_u32(b0);
  const __m128i ctl = _mm_set_epi64x((long long)(expand8_idx[b1] + (uint64_t)c0 * 0x0101010101010101ull),
                                     (long long)expand8_idx[b0]);
  const __m128i v = _mm_loadu_si128((const __m128i*)p);
  p += c0 + _mm_popcnt_u32(b1);
  return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(v, ctl));
}

// One tile of 4 rows x T tokens; the tile's masks and values are one sequential stream.
template <int T>
__attribute__((always_inline)) inline void si8_tile(const SparseI8& w, const ActI8& a, int64_t tile, int64_t t,
                                                   int32_t* acc) {
  __m256i s[kTile][T];
#pragma GCC unroll 8
  for (int r = 0; r < kTile; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) s[r][u] = _mm256_setzero_si256();
  const int8_t* p = w.values + w.tile_ptr[tile];
  const uint64_t* mk = w.masks + tile * w.kc * kTile;
  const int16_t* x = a.xs + t * a.kp;
  for (int64_t c = 0; c < w.kc; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < kTile; ++r) {
      const uint64_t m = mk[c * kTile + r];
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const __m256i wv = expand16_i8(p, (unsigned)(m >> (16 * g)) & 0xffffu);
#pragma GCC unroll 8
        for (int u = 0; u < T; ++u) {
          const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + u * a.kp + c * 64 + 16 * g));
          s[r][u] = _mm256_add_epi32(s[r][u], _mm256_madd_epi16(wv, xv));
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kTile; ++r) {
    const int64_t n = tile * kTile + r;
    if (n >= w.n) break;
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) acc[(t + u) * w.n + n] = hsum_epi32(s[r][u]);
  }
}

// 32 bytes of packed int4 codes -> 64 int8 levels u - z stored to out[0..63], in order.
__attribute__((always_inline)) inline void i4_levels(const uint8_t* p, uint8_t z, int8_t* out) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);  // per 128-bit lane
  const __m256i zb = _mm256_set1_epi8((char)z);
  const __m256i c0 = _mm256_permute2x128_si256(a, b, 0x20), c1 = _mm256_permute2x128_si256(a, b, 0x31);
  _mm256_storeu_si256((__m256i*)out, _mm256_sub_epi8(c0, zb));
  _mm256_storeu_si256((__m256i*)(out + 32), _mm256_sub_epi8(c1, zb));
}

__attribute__((always_inline)) inline void scales_f32(const uint16_t* h, int64_t count, float* buf) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
  for (; i < count; ++i) {
    const __m128i one = _mm_cvtsi32_si128(h[i]);
    buf[i] = _mm_cvtss_f32(_mm_cvtph_ps(one));
  }
}

// Sparse int4, one tile of 4 rows x T tokens: codes unpacked to a 64-byte buffer, then the int8
// table-driven expansion (expand16_i8) and vpmaddwd per 16 columns; fp32 += cvt(dot) * group scale.
template <int T>
__attribute__((always_inline)) inline void si4_tile(const SparseI4& w, const ActI8& a, int64_t tile, int64_t t,
                                                   float* acc) {
  __m256 s[kTile][T];
#pragma GCC unroll 8
  for (int r = 0; r < kTile; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) s[r][u] = _mm256_setzero_ps();
  float sc[kTile * kMaxI4Chunks];
  scales_f32(w.scales + tile * w.kc * kTile, w.kc * kTile, sc);
  alignas(32) int8_t lv[64 + 16];
  const uint8_t* p = w.values + w.tile_ptr[tile];
  const uint64_t* mk = w.masks + tile * w.kc * kTile;
  const int16_t* x = a.xs + t * a.kp;
  for (int64_t c = 0; c < w.kc; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < kTile; ++r) {
      const uint64_t m = mk[c * kTile + r];
      i4_levels(p, w.zeros[(tile * w.kc + c) * kTile + r], lv);
      p += (_mm_popcnt_u64(m) + 1) >> 1;
      const int8_t* lp = lv;
      __m256i d[T];
#pragma GCC unroll 8
      for (int u = 0; u < T; ++u) d[u] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const __m256i wv = expand16_i8(lp, (unsigned)(m >> (16 * g)) & 0xffffu);
#pragma GCC unroll 8
        for (int u = 0; u < T; ++u) {
          const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + u * a.kp + c * 64 + 16 * g));
          d[u] = _mm256_add_epi32(d[u], _mm256_madd_epi16(wv, xv));
        }
      }
      const __m256 sv = _mm256_set1_ps(sc[c * kTile + r]);
#pragma GCC unroll 8
      for (int u = 0; u < T; ++u) s[r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[u]), sv, s[r][u]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kTile; ++r) {
    const int64_t n = tile * kTile + r;
    if (n >= w.n) break;
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) acc[(t + u) * w.n + n] = hsum_ps(s[r][u]);
  }
}

template <int R, int T>
__attribute__((always_inline)) inline void di4_tile(const DenseI4& w, const ActI8& a, int64_t n, int64_t t,
                                                   float* acc) {
  __m256 s[R][T];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) s[r][u] = _mm256_setzero_ps();
  float sc[4 * kMaxI4Chunks];
  scales_f32(w.scales + n * w.kc, R * w.kc, sc);
  alignas(32) int8_t lv[R][64];
  const int16_t* x = a.xs + t * a.kp;
  const uint8_t* q = w.q + n * w.kc * 32;
  for (int64_t c = 0; c < w.kc; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) i4_levels(q + (r * w.kc + c) * 32, w.zeros[(n + r) * w.kc + c], lv[r]);
    __m256i d[R][T];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int u = 0; u < T; ++u) d[r][u] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      __m256i wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i*)(lv[r] + 16 * g)));
#pragma GCC unroll 8
      for (int u = 0; u < T; ++u) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + u * a.kp + c * 64 + 16 * g));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) d[r][u] = _mm256_add_epi32(d[r][u], _mm256_madd_epi16(wv[r], xv));
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_set1_ps(sc[r * w.kc + c]);
#pragma GCC unroll 8
      for (int u = 0; u < T; ++u) s[r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[r][u]), sv, s[r][u]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) acc[(t + u) * w.n + n + r] = hsum_ps(s[r][u]);
}

template <int R, int T>
__attribute__((always_inline)) inline void di8_tile(const DenseI8& w, const ActI8& a, int64_t n, int64_t t,
                                                   int32_t* acc) {
  __m256i s[R][T];
  const int64_t kp = w.kc * 64;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) s[r][u] = _mm256_setzero_si256();
  const int16_t* x = a.xs + t * a.kp;
  const int8_t* q = w.q + n * kp;
  for (int64_t k = 0; k < kp; k += 16) {
    __m256i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(q + r * kp + k)));
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) {
      const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + u * a.kp + k));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) s[r][u] = _mm256_add_epi32(s[r][u], _mm256_madd_epi16(wv[r], xv));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) acc[(t + u) * w.n + n + r] = hsum_epi32(s[r][u]);
}

// The next 8 packed values as fp32: fp32 as stored, bf16 widened (zero-extend to 32 bits, shift up: exact).
__attribute__((always_inline)) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((always_inline)) inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// 8 packed values (fp32 / bf16) expanded under mask byte b: vpermps by the table, zeros where b is clear.
template <class V>
__attribute__((always_inline)) inline __m256 expand8(const V* p, unsigned b) {
  const __m256i perm = _mm256_loadu_si256((const __m256i*)expand8_perm[b]);
  const __m256 keep = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i*)expand8_keep[b]));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(load8(p), perm), keep);
}

// One tile of 4 rows x T tokens of a sparse fp32 or bf16 weight (W = SparseF32 / SparseBF16).
template <int T, class W>
__attribute__((always_inline)) inline void sfv_tile(const W& w, const ActF32& a, int64_t tile, int64_t t, float* y) {
  __m256 s[kTile][T];
#pragma GCC unroll 8
  for (int r = 0; r < kTile; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) s[r][u] = _mm256_setzero_ps();
  auto p = w.values + w.tile_ptr[tile];
  const uint64_t* mk = w.masks + tile * w.kc * kTile;
  const float* x = a.x + t * a.kp;
  for (int64_t c = 0; c < w.kc; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < kTile; ++r) {
      const uint64_t m = mk[c * kTile + r];
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g) {
        const unsigned b = (unsigned)(m >> (8 * g)) & 0xffu;
        const __m256 wv = expand8(p, b);
        p += _mm_popcnt_u32(b);
#pragma GCC unroll 8
        for (int u = 0; u < T; ++u)
          s[r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + u * a.kp + c * 64 + 8 * g), s[r][u]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kTile; ++r) {
    const int64_t n = tile * kTile + r;
    if (n >= w.n) break;
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) y[(t + u) * w.n + n] = hsum_ps(s[r][u]);
  }
}

template <int R, int T>
__attribute__((always_inline)) inline void dbf16_tile(const DenseBF16& w, const ActF32& a, int64_t n, int64_t t,
                                                     float* y) {
  __m256 s[R][T];
  const int64_t kp = w.kc * 64;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) s[r][u] = _mm256_setzero_ps();
  const float* x = a.x + t * a.kp;
  const uint16_t* q = w.q + n * kp;
  for (int64_t j = 0; j < kp; j += 8) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = load8(q + r * kp + j);
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) {
      const __m256 xv = _mm256_loadu_ps(x + u * a.kp + j);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) s[r][u] = _mm256_fmadd_ps(wv[r], xv, s[r][u]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) y[(t + u) * w.n + n + r] = hsum_ps(s[r][u]);
}

#define SPARSEC_SPARSE_DRIVER(NAME, TILE, WT, AT, OT)                              \
  void NAME(const WT& w, const AT& a, int64_t n0, int64_t n1, OT* out) {           \
    const int64_t t0 = n0 / kTile, t1 = (n1 + kTile - 1) / kTile;                  \
    for (int64_t t = 0; t < a.m; t += 2) {                                         \
      const int64_t cnt = a.m - t < 2 ? a.m - t : 2;                               \
      for (int64_t tile = t0; tile < t1; ++tile) {                                 \
        if (cnt == 1) TILE<1>(w, a, tile, t, out); else TILE<2>(w, a, tile, t, out); \
      }                                                                            \
    }                                                                              \
  }

#define SPARSEC_TOKEN_SWITCH(TILE, R, W, A, N, T, OUT, COUNT) \
  switch (COUNT) {                                           \
    case 1: TILE<R, 1>(W, A, N, T, OUT); break;              \
    case 2: TILE<R, 2>(W, A, N, T, OUT); break;              \
    case 3: TILE<R, 3>(W, A, N, T, OUT); break;              \
    default: TILE<R, 4>(W, A, N, T, OUT); break;             \
  }

#define SPARSEC_DRIVER(NAME, TILE, WT, AT, OT)                                           \
  void NAME(const WT& w, const AT& a, int64_t n0, int64_t n1, OT* out) {                 \
    if (a.m == 1) {                                                                      \
      int64_t n = n0;                                                                    \
      for (; n + 4 <= n1; n += 4) TILE<4, 1>(w, a, n, 0, out);                           \
      for (; n < n1; ++n) TILE<1, 1>(w, a, n, 0, out);                                   \
      return;                                                                            \
    }                                                                                    \
    for (int64_t t = 0; t < a.m; t += 4) {                                               \
      const int64_t cnt = a.m - t < 4 ? a.m - t : 4;                                     \
      int64_t n = n0;                                                                    \
      for (; n + 2 <= n1; n += 2) SPARSEC_TOKEN_SWITCH(TILE, 2, w, a, n, t, out, cnt)    \
      for (; n < n1; ++n) SPARSEC_TOKEN_SWITCH(TILE, 1, w, a, n, t, out, cnt)            \
    }                                                                                    \
  }

SPARSEC_SPARSE_DRIVER(sparse_i8_avx2, si8_tile, SparseI8, ActI8, int32_t)
SPARSEC_SPARSE_DRIVER(sparse_f32_avx2, sfv_tile, SparseF32, ActF32, float)
SPARSEC_SPARSE_DRIVER(sparse_bf16_avx2, sfv_tile, SparseBF16, ActF32, float)
SPARSEC_DRIVER(dense_bf16_avx2, dbf16_tile, DenseBF16, ActF32, float)
SPARSEC_DRIVER(dense_i8_avx2, di8_tile, DenseI8, ActI8, int32_t)
SPARSEC_SPARSE_DRIVER(sparse_i4_avx2, si4_tile, SparseI4, ActI8, float)
SPARSEC_DRIVER(dense_i4_avx2, di4_tile, DenseI4, ActI8, float)

// Rows [r0, r1) of a packed fp32 or bf16 weight written dense in fp32 (every element, zeros included).
template <class W>
void densify_fv_avx2(const W& w, int64_t r0, int64_t r1, float* buf) {
  const int64_t kp = w.kc * 64;
  for (int64_t tile = r0 / kTile; tile * kTile < r1; ++tile) {
    auto p = w.values + w.tile_ptr[tile];
    for (int64_t c = 0; c < w.kc; ++c)
      for (int r = 0; r < kTile; ++r) {
        const int64_t row = tile * kTile + r;
        const uint64_t m = w.masks[(tile * w.kc + c) * kTile + r];
        float* o = buf + (row - r0) * kp + c * 64;
        for (int g = 0; g < 8; ++g) {
          const unsigned b = (unsigned)(m >> (8 * g)) & 0xffu;
          const __m256 v = expand8(p, b);
          if (row < r1) _mm256_storeu_ps(o + 8 * g, v);
          p += _mm_popcnt_u32(b);
        }
      }
  }
}

void densify_f32_avx2(const SparseF32& w, int64_t r0, int64_t r1, float* buf) { densify_fv_avx2(w, r0, r1, buf); }
void densify_bf16_avx2(const SparseBF16& w, int64_t r0, int64_t r1, float* buf) { densify_fv_avx2(w, r0, r1, buf); }

#include "row_math.h"  // quantize_row, rms_norm, silu_mul, attend for this ISA (internal linkage)

}  // namespace
}  // namespace sparsec

#pragma GCC pop_options

namespace sparsec {
KernelTable avx2_kernels() {
  return KernelTable{"avx2", sparse_i8_avx2, sparse_f32_avx2, dense_i8_avx2, densify_f32_avx2, densify_i8_reference, sparse_i4_avx2, dense_i4_avx2,
                     rm_quantize_row, rm_quantize_row_s8, rm_rms_norm, rm_silu_mul, rm_attend,
                     sparse_bf16_avx2, dense_bf16_avx2, densify_bf16_avx2, /*bf16_pairs=*/false};
}
}  // namespace sparsec

#else  // not x86: the table is never selected (cpu_has is false); keep the symbol for the linker
namespace sparsec {
KernelTable avx2_kernels() { return portable_kernels(); }
}  // namespace sparsec
#endif
