// AVX-512 kernels (F/BW/VL/VBMI2/VNNI): the fast path on Zen 4 and Intel Ice Lake and later.
//
// One 64-weight chunk of one row costs: a 64-byte load of the packed values, `vpexpandb` in its
// register form (the memory form is slower on Zen 4, see issue 12), one `vpdpbusd` per token, and a
// popcount to advance the row's pointer. Several rows share each activation load (R rows per pass)
// and several tokens share each expanded chunk (T tokens, the small-M GEMM), so the expansion is paid
// once per chunk per T tokens. Everything here has internal linkage (see common.h for why).
#include <cstring>

#include "common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512vnni,avx512dq,popcnt,bmi,bmi2,fma,avx2")

namespace sparsec {
namespace {

// Keep v in a register: stops the compiler from folding the load into vpexpandb's (slower) memory form.
#define SPARSEC_IN_REG(v) __asm__("" : "+v"(v))

// One tile of 4 rows x T tokens. The tile's masks and values are one sequential stream; the pointer
// advances row by row within a chunk by the popcounts (the masks are loaded independently of it).
template <int T>
__attribute__((always_inline)) inline void si8_tile(const SparseI8& w, const ActI8& a, int64_t tile, int64_t t,
                                                   int32_t* acc) {
  __m512i s[kTile][T];
#pragma GCC unroll 8
  for (int r = 0; r < kTile; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) s[r][u] = _mm512_setzero_si512();
  const int8_t* p = w.values + w.tile_ptr[tile];
  const uint64_t* mk = w.masks + tile * w.kc * kTile;
  const uint8_t* x = a.xu + t * a.kp;
  for (int64_t c = 0; c < w.kc; ++c) {
    // ~77 bytes of values per chunk at 70 %: two lines per chunk keep the prefetch ahead of the loads
    _mm_prefetch((const char*)(p + w.pf), _MM_HINT_T0);
    _mm_prefetch((const char*)(p + w.pf + 64), _MM_HINT_T0);
    if ((c & 1) == 0) _mm_prefetch((const char*)(mk + c * kTile) + w.pf, _MM_HINT_T0);
    __m512i wv[kTile];
#pragma GCC unroll 8
    for (int r = 0; r < kTile; ++r) {
      const uint64_t m = mk[c * kTile + r];
      __m512i v = _mm512_loadu_si512((const void*)p);
      SPARSEC_IN_REG(v);
      wv[r] = _mm512_maskz_expand_epi8((__mmask64)m, v);
      p += _mm_popcnt_u64(m);
    }
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) {
      const __m512i xv = _mm512_loadu_si512((const void*)(x + u * a.kp + c * 64));
#pragma GCC unroll 8
      for (int r = 0; r < kTile; ++r) s[r][u] = _mm512_dpbusd_epi32(s[r][u], xv, wv[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kTile; ++r) {
    const int64_t n = tile * kTile + r;
    if (n >= w.n) break;
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) acc[(t + u) * w.n + n] = _mm512_reduce_add_epi32(s[r][u]) - 128 * w.rowsum[n];
  }
}

// 32 bytes of packed int4 codes (2 per byte, low nibble first) -> 64 int8 levels u - z, in order.
// Zero-extend bytes to words, then (w | w << 4) & 0x0f0f puts the low nibble in the even byte and the
// high nibble in the odd byte of each word (one vpternlogd), minus the group's zero point.
__attribute__((always_inline)) inline __m512i i4_levels(const uint8_t* p, uint8_t z) {
  const __m512i wz = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
  const __m512i u = _mm512_ternarylogic_epi32(wz, _mm512_slli_epi16(wz, 4), _mm512_set1_epi16(0x0f0f), 0xa8);
  return _mm512_sub_epi8(u, _mm512_set1_epi8((char)z));
}

// fp16 scales -> fp32 into buf (count values; the tail read is masked, so nothing past the array is read).
__attribute__((always_inline)) inline void scales_f32(const uint16_t* h, int64_t count, float* buf) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + i))));
  if (i < count) {
    const __mmask16 k = (__mmask16)((1u << (count - i)) - 1);
    _mm512_mask_storeu_ps(buf + i, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, h + i)));
  }
}

// One tile of 4 rows x T tokens of sparse int4: per (row, chunk) unpack the codes, vpexpandb them under
// the mask, one vpdpbusd per token into a fresh int32 vector, then fp32 += cvt(dot) * group scale.
template <int T>
__attribute__((always_inline)) inline void si4_tile(const SparseI4& w, const ActI8& a, int64_t tile, int64_t t,
                                                   float* acc) {
  __m512 s[kTile][T];
#pragma GCC unroll 8
  for (int r = 0; r < kTile; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) s[r][u] = _mm512_setzero_ps();
  float sc[kTile * kMaxI4Chunks];
  scales_f32(w.scales + tile * w.kc * kTile, w.kc * kTile, sc);
  const uint8_t* p = w.values + w.tile_ptr[tile];
  const uint64_t* mk = w.masks + tile * w.kc * kTile;
  const uint8_t* zp = w.zeros + tile * w.kc * kTile;
  const uint8_t* x = a.xu + t * a.kp;
  for (int64_t c = 0; c < w.kc; ++c) {
    _mm_prefetch((const char*)(p + w.pf), _MM_HINT_T0);
    if ((c & 1) == 0) _mm_prefetch((const char*)(mk + c * kTile) + w.pf, _MM_HINT_T0);
    __m512i wv[kTile];
#pragma GCC unroll 8
    for (int r = 0; r < kTile; ++r) {
      const uint64_t m = mk[c * kTile + r];
      wv[r] = _mm512_maskz_expand_epi8((__mmask64)m, i4_levels(p, zp[c * kTile + r]));
      p += (_mm_popcnt_u64(m) + 1) >> 1;
    }
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) {
      const __m512i xv = _mm512_loadu_si512((const void*)(x + u * a.kp + c * 64));
#pragma GCC unroll 8
      for (int r = 0; r < kTile; ++r) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xv, wv[r]);
        s[r][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sc[c * kTile + r]), s[r][u]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kTile; ++r) {
    const int64_t n = tile * kTile + r;
    if (n >= w.n) break;
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) acc[(t + u) * w.n + n] = _mm512_reduce_add_ps(s[r][u]) - w.comp[n];
  }
}

template <int R, int T>
__attribute__((always_inline)) inline void di4_tile(const DenseI4& w, const ActI8& a, int64_t n, int64_t t,
                                                   float* acc) {
  __m512 s[R][T];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) s[r][u] = _mm512_setzero_ps();
  float sc[4 * kMaxI4Chunks];
  scales_f32(w.scales + n * w.kc, R * w.kc, sc);
  const uint8_t* x = a.xu + t * a.kp;
  const uint8_t* q = w.q + n * w.kc * 32;
  for (int64_t c = 0; c < w.kc; ++c) {
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = i4_levels(q + (r * w.kc + c) * 32, w.zeros[(n + r) * w.kc + c]);
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) {
      const __m512i xv = _mm512_loadu_si512((const void*)(x + u * a.kp + c * 64));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xv, wv[r]);
        s[r][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sc[r * w.kc + c]), s[r][u]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) acc[(t + u) * w.n + n + r] = _mm512_reduce_add_ps(s[r][u]) - w.comp[n + r];
}

template <int R, int T>
__attribute__((always_inline)) inline void di8_tile(const DenseI8& w, const ActI8& a, int64_t n, int64_t t,
                                                   int32_t* acc) {
  __m512i s[R][T];
  const int64_t kp = w.kc * 64;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) s[r][u] = _mm512_setzero_si512();
  const uint8_t* x = a.xu + t * a.kp;
  const int8_t* q = w.q + n * kp;
  for (int64_t c = 0; c < w.kc; ++c) {
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512((const void*)(q + r * kp + c * 64));
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) {
      const __m512i xv = _mm512_loadu_si512((const void*)(x + u * a.kp + c * 64));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) s[r][u] = _mm512_dpbusd_epi32(s[r][u], xv, wv[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u)
      acc[(t + u) * w.n + n + r] = _mm512_reduce_add_epi32(s[r][u]) - 128 * w.rowsum[n + r];
}

// bf16 bits -> fp32: zero-extend each 16-bit lane to 32 bits and shift it into the top half (exact).
__attribute__((always_inline)) inline __m512 bf16_to_ps(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 32 bf16 values (natural column order) as two fp32 vectors without crossing 128-bit lanes: each dword holds
// columns (2j, 2j+1); shifting it up 16 gives column 2j as fp32, masking the low half gives column 2j+1. The
// activations come permuted to match (even columns of each 32-block, then odd: KernelTable::bf16_pairs).
__attribute__((always_inline)) inline void bf16_pairs(__m512i v, __m512& even, __m512& odd) {
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}

// The next 16 packed values expanded to their columns under a 16-bit mask, as fp32: vexpandps for fp32
// values, vpexpandw (VBMI2) + widening for bf16 (a 32-byte load instead of 64).
__attribute__((always_inline)) inline __m512 expand16(const float* p, unsigned mm) {
  __m512 v = _mm512_loadu_ps(p);
  SPARSEC_IN_REG(v);
  return _mm512_maskz_expand_ps((__mmask16)mm, v);
}
__attribute__((always_inline)) inline __m512 expand16(const uint16_t* p, unsigned mm) {
  __m256i v = _mm256_loadu_si256((const __m256i*)p);
  SPARSEC_IN_REG(v);
  return bf16_to_ps(_mm256_maskz_expand_epi16((__mmask16)mm, v));
}

// One tile of 4 rows x T tokens of a sparse fp32 or bf16 weight (W = SparseF32 / SparseBF16).
template <int T, class W>
__attribute__((always_inline)) inline void sfv_tile(const W& w, const ActF32& a, int64_t tile, int64_t t, float* y) {
  __m512 s[kTile][T];
#pragma GCC unroll 8
  for (int r = 0; r < kTile; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) s[r][u] = _mm512_setzero_ps();
  auto p = w.values + w.tile_ptr[tile];
  constexpr int vbytes = sizeof(*p);  // 4 (fp32) or 2 (bf16): the stream is 2x longer in fp32
  const uint64_t* mk = w.masks + tile * w.kc * kTile;
  const float* x = a.x + t * a.kp;
  for (int64_t c = 0; c < w.kc; ++c) {
#pragma GCC unroll 4
    for (int line = 0; line < vbytes; ++line)
      _mm_prefetch((const char*)p + vbytes / 2 * w.pf + 64 * line, _MM_HINT_T0);
    if ((c & 1) == 0) _mm_prefetch((const char*)(mk + c * kTile) + w.pf, _MM_HINT_T0);
#pragma GCC unroll 8
    for (int r = 0; r < kTile; ++r) {
      const uint64_t m = mk[c * kTile + r];
      if constexpr (vbytes == 2) {
        // bf16: one vpexpandw per 32 values (half the pointer-chain steps of 16-wide), widened in two halves
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const uint32_t mm = (uint32_t)(m >> (32 * h));
          __m512i v = _mm512_loadu_si512((const void*)p);
          SPARSEC_IN_REG(v);
          __m512 w0, w1;  // even / odd columns of this 32-block (activations permuted to match)
          bf16_pairs(_mm512_maskz_expand_epi16((__mmask32)mm, v), w0, w1);
          p += _mm_popcnt_u32(mm);
#pragma GCC unroll 8
          for (int u = 0; u < T; ++u) {
            const float* xc = x + u * a.kp + c * 64 + 32 * h;
            s[r][u] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xc), s[r][u]);
            s[r][u] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xc + 16), s[r][u]);
          }
        }
      } else {
#pragma GCC unroll 4
        for (int h = 0; h < 4; ++h) {
          const unsigned mm = (unsigned)(m >> (16 * h)) & 0xffffu;
          const __m512 wv = expand16(p, mm);
          p += _mm_popcnt_u32(mm);
#pragma GCC unroll 8
          for (int u = 0; u < T; ++u)
            s[r][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + u * a.kp + c * 64 + 16 * h), s[r][u]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kTile; ++r) {
    const int64_t n = tile * kTile + r;
    if (n >= w.n) break;
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) y[(t + u) * w.n + n] = _mm512_reduce_add_ps(s[r][u]);
  }
}

template <int R, int T>
__attribute__((always_inline)) inline void dbf16_tile(const DenseBF16& w, const ActF32& a, int64_t n, int64_t t,
                                                     float* y) {
  __m512 s[R][T];
  const int64_t kp = w.kc * 64;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) s[r][u] = _mm512_setzero_ps();
  const float* x = a.x + t * a.kp;
  const uint16_t* q = w.q + n * kp;
  for (int64_t j = 0; j < kp; j += 32) {  // one 64-byte load per row per 32 weights (kp is a multiple of 64)
    __m512 w0[R], w1[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm_prefetch((const char*)(q + r * kp + j) + 1024, _MM_HINT_T0);
      bf16_pairs(_mm512_loadu_si512((const void*)(q + r * kp + j)), w0[r], w1[r]);
    }
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) {
      const __m512 x0 = _mm512_loadu_ps(x + u * a.kp + j), x1 = _mm512_loadu_ps(x + u * a.kp + j + 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) s[r][u] = _mm512_fmadd_ps(w1[r], x1, _mm512_fmadd_ps(w0[r], x0, s[r][u]));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < T; ++u) y[(t + u) * w.n + n + r] = _mm512_reduce_add_ps(s[r][u]);
}

// Sparse drivers: whole tiles; T = 1 at batch 1, up to 4 tokens share each expanded chunk for M > 1.
#define SPARSEC_SPARSE_DRIVER(NAME, TILE, WT, AT, OT)                              \
  void NAME(const WT& w, const AT& a, int64_t n0, int64_t n1, OT* out) {           \
    const int64_t t0 = n0 / kTile, t1 = (n1 + kTile - 1) / kTile;                  \
    for (int64_t t = 0; t < a.m; t += 4) {                                         \
      const int64_t cnt = a.m - t < 4 ? a.m - t : 4;                               \
      for (int64_t tile = t0; tile < t1; ++tile) {                                 \
        switch (cnt) {                                                             \
          case 1: TILE<1>(w, a, tile, t, out); break;                              \
          case 2: TILE<2>(w, a, tile, t, out); break;                              \
          case 3: TILE<3>(w, a, tile, t, out); break;                              \
          default: TILE<4>(w, a, tile, t, out); break;                             \
        }                                                                          \
      }                                                                            \
    }                                                                              \
  }

// Row/token tiling shared by the three kernels: R rows per pass at batch 1 (activation loads shared),
// R2 rows x up to 8 tokens per pass for M > 1 (each expanded chunk reused by 8 tokens).
#define SPARSEC_TOKEN_SWITCH(TILE, R, W, A, N, T, OUT, COUNT) \
  switch (COUNT) {                                           \
    case 1: TILE<R, 1>(W, A, N, T, OUT); break;              \
    case 2: TILE<R, 2>(W, A, N, T, OUT); break;              \
    case 3: TILE<R, 3>(W, A, N, T, OUT); break;              \
    case 4: TILE<R, 4>(W, A, N, T, OUT); break;              \
    case 5: TILE<R, 5>(W, A, N, T, OUT); break;              \
    case 6: TILE<R, 6>(W, A, N, T, OUT); break;              \
    case 7: TILE<R, 7>(W, A, N, T, OUT); break;              \
    default: TILE<R, 8>(W, A, N, T, OUT); break;             \
  }

#define SPARSEC_DRIVER(NAME, TILE, WT, AT, OT)                                           \
  void NAME(const WT& w, const AT& a, int64_t n0, int64_t n1, OT* out) {                 \
    if (a.m == 1) {                                                                      \
      int64_t n = n0;                                                                    \
      for (; n + 4 <= n1; n += 4) TILE<4, 1>(w, a, n, 0, out);                           \
      for (; n < n1; ++n) TILE<1, 1>(w, a, n, 0, out);                                   \
      return;                                                                            \
    }                                                                                    \
    for (int64_t t = 0; t < a.m; t += 8) {                                               \
      const int64_t cnt = a.m - t < 8 ? a.m - t : 8;                                     \
      int64_t n = n0;                                                                    \
      for (; n + 2 <= n1; n += 2) SPARSEC_TOKEN_SWITCH(TILE, 2, w, a, n, t, out, cnt)    \
      for (; n < n1; ++n) SPARSEC_TOKEN_SWITCH(TILE, 1, w, a, n, t, out, cnt)            \
    }                                                                                    \
  }

SPARSEC_SPARSE_DRIVER(sparse_i8_avx512, si8_tile, SparseI8, ActI8, int32_t)
SPARSEC_SPARSE_DRIVER(sparse_f32_avx512, sfv_tile, SparseF32, ActF32, float)
SPARSEC_SPARSE_DRIVER(sparse_bf16_avx512, sfv_tile, SparseBF16, ActF32, float)
SPARSEC_DRIVER(dense_bf16_avx512, dbf16_tile, DenseBF16, ActF32, float)
SPARSEC_DRIVER(dense_i8_avx512, di8_tile, DenseI8, ActI8, int32_t)
SPARSEC_SPARSE_DRIVER(sparse_i4_avx512, si4_tile, SparseI4, ActI8, float)
SPARSEC_DRIVER(dense_i4_avx512, di4_tile, DenseI4, ActI8, float)

// Rows [r0, r1) of a packed int8 weight written dense: one vpexpandb (register form) and a 64-byte store per
// (row, chunk) — every byte of the row tile is written, zeros included.
void densify_i8_avx512(const SparseI8& w, int64_t r0, int64_t r1, int8_t* buf) {
  const int64_t kp = w.kc * 64;
  for (int64_t tile = r0 / kTile; tile * kTile < r1; ++tile) {
    const int8_t* p = w.values + w.tile_ptr[tile];
    for (int64_t c = 0; c < w.kc; ++c)
      for (int r = 0; r < kTile; ++r) {
        const int64_t row = tile * kTile + r;
        const uint64_t m = w.masks[(tile * w.kc + c) * kTile + r];
        __m512i v = _mm512_loadu_si512((const void*)p);
        SPARSEC_IN_REG(v);
        if (row < r1) _mm512_storeu_si512((void*)(buf + (row - r0) * kp + c * 64), _mm512_maskz_expand_epi8((__mmask64)m, v));
        p += _mm_popcnt_u64(m);
      }
  }
}

// Rows [r0, r1) of a packed fp32 or bf16 weight written dense in fp32 (every element, zeros included).
template <class W>
void densify_fv_avx512(const W& w, int64_t r0, int64_t r1, float* buf) {
  const int64_t kp = w.kc * 64;
  for (int64_t tile = r0 / kTile; tile * kTile < r1; ++tile) {
    auto p = w.values + w.tile_ptr[tile];
    for (int64_t c = 0; c < w.kc; ++c)
      for (int r = 0; r < kTile; ++r) {
        const int64_t row = tile * kTile + r;
        const uint64_t m = w.masks[(tile * w.kc + c) * kTile + r];
        float* o = buf + (row - r0) * kp + c * 64;
        for (int h = 0; h < 4; ++h) {
          const unsigned mm = (unsigned)(m >> (16 * h)) & 0xffffu;
          const __m512 v = expand16(p, mm);
          if (row < r1) _mm512_storeu_ps(o + 16 * h, v);
          p += _mm_popcnt_u32(mm);
        }
      }
  }
}

void densify_f32_avx512(const SparseF32& w, int64_t r0, int64_t r1, float* buf) { densify_fv_avx512(w, r0, r1, buf); }
void densify_bf16_avx512(const SparseBF16& w, int64_t r0, int64_t r1, float* buf) { densify_fv_avx512(w, r0, r1, buf); }

#include "row_math.h"  // quantize_row, rms_norm, silu_mul, attend for this ISA (internal linkage)

}  // namespace
}  // namespace sparsec

#pragma GCC pop_options

namespace sparsec {
// Compiled for the baseline ISA: callable (and called) on every CPU; only the kernels need AVX-512.
KernelTable avx512_kernels() {
  return KernelTable{"avx512", sparse_i8_avx512, sparse_f32_avx512, dense_i8_avx512, densify_f32_avx512, densify_i8_avx512,
                     sparse_i4_avx512, dense_i4_avx512,
                     rm_quantize_row, rm_quantize_row_s8, rm_rms_norm, rm_silu_mul, rm_attend,
                     sparse_bf16_avx512, dense_bf16_avx512, densify_bf16_avx512, /*bf16_pairs=*/true};
}
}  // namespace sparsec

#else  // not x86: the table is never selected (cpu_has is false); keep the symbol for the linker
namespace sparsec {
KernelTable avx512_kernels() { return portable_kernels(); }
}  // namespace sparsec
#endif
