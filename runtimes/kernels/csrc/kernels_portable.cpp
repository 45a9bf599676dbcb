// Portable C++ kernels: the reference path every CPU runs (and CI forces with SPARSEC_KERNEL_ISA=portable).
// They walk the set bits of each 64-bit mask; results are exact int32 (int8) or fp32 sums in
// column order, against which the vector paths are tested.
#include <cstring>

#include "common.h"

namespace sparsec {

uint64_t expand8_idx[256];
int32_t expand8_perm[256][8];
int32_t expand8_keep[256][8];

void init_tables() {
  for (int m = 0; m < 256; ++m) {
    uint64_t idx = 0;
    int rank = 0;
    for (int i = 0; i < 8; ++i) {
      uint64_t b;
      if (m & (1 << i)) {
        b = (uint64_t)rank;
        expand8_perm[m][i] = rank;
        expand8_keep[m][i] = -1;
        ++rank;
      } else {
        b = 0x80;
        expand8_perm[m][i] = 0;
        expand8_keep[m][i] = 0;
      }
      idx |= b << (8 * i);
    }
    expand8_idx[m] = idx;
  }
}

float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

namespace {

// Code j of a packed int4 stream (low nibble first).
inline int32_t i4_code(const uint8_t* v, int64_t j) { return (j & 1) ? (v[j >> 1] >> 4) : (v[j >> 1] & 0x0f); }

void sparse_i4_portable(const SparseI4& w, const ActI8& a, int64_t n0, int64_t n1, float* acc) {
  for (int64_t tile = n0 / kTile; tile * kTile < n1; ++tile) {
    for (int64_t t = 0; t < a.m; ++t) {
      const int16_t* x = a.xs + t * a.kp;
      const uint8_t* v = w.values + w.tile_ptr[tile];
      float s[kTile] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t c = 0; c < w.kc; ++c) {
        const int16_t* xc = x + c * 64;
        for (int r = 0; r < kTile; ++r) {
          const int64_t idx = (tile * w.kc + c) * kTile + r;
          uint64_t m = w.masks[idx];
          const int32_t z = w.zeros[idx];
          int32_t d = 0;
          int64_t j = 0;
          while (m) {
            d += (int32_t)xc[__builtin_ctzll(m)] * (i4_code(v, j++) - z);
            m &= m - 1;
          }
          v += (j + 1) >> 1;
          s[r] += (float)d * half_to_float(w.scales[idx]);
        }
      }
      for (int r = 0; r < kTile; ++r)
        if (tile * kTile + r < w.n) acc[t * w.n + tile * kTile + r] = s[r];
    }
  }
}

void dense_i4_portable(const DenseI4& w, const ActI8& a, int64_t n0, int64_t n1, float* acc) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t t = 0; t < a.m; ++t) {
      const int16_t* x = a.xs + t * a.kp;
      float s = 0.f;
      for (int64_t c = 0; c < w.kc; ++c) {
        const uint8_t* q = w.q + (n * w.kc + c) * 32;
        const int32_t z = w.zeros[n * w.kc + c];
        int32_t d = 0;
        for (int64_t j = 0; j < 64; ++j) d += (int32_t)x[c * 64 + j] * (i4_code(q, j) - z);
        s += (float)d * half_to_float(w.scales[n * w.kc + c]);
      }
      acc[t * w.n + n] = s;
    }
  }
}

void sparse_i8_portable(const SparseI8& w, const ActI8& a, int64_t n0, int64_t n1, int32_t* acc) {
  for (int64_t tile = n0 / kTile; tile * kTile < n1; ++tile) {
    for (int64_t t = 0; t < a.m; ++t) {
      const int16_t* x = a.xs + t * a.kp;
      const int8_t* v = w.values + w.tile_ptr[tile];
      int32_t s[kTile] = {0, 0, 0, 0};
      for (int64_t c = 0; c < w.kc; ++c) {
        const int16_t* xc = x + c * 64;
        for (int r = 0; r < kTile; ++r) {
          uint64_t m = w.masks[(tile * w.kc + c) * kTile + r];
          while (m) {
            s[r] += (int32_t)xc[__builtin_ctzll(m)] * (int32_t)(*v++);
            m &= m - 1;
          }
        }
      }
      for (int r = 0; r < kTile; ++r)
        if (tile * kTile + r < w.n) acc[t * w.n + tile * kTile + r] = s[r];
    }
  }
}

// A stored value as the kernels multiply it: fp32 and int8 as they are, bf16 bits widened to fp32 (exact).
inline float widen(float v) { return v; }
inline int8_t widen(int8_t v) { return v; }
inline float widen(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// Sparse fp32 / bf16 (W = SparseF32 / SparseBF16): fp32 sums in column order.
template <class W>
void sparse_fv_portable(const W& w, const ActF32& a, int64_t n0, int64_t n1, float* y) {
  for (int64_t tile = n0 / kTile; tile * kTile < n1; ++tile) {
    for (int64_t t = 0; t < a.m; ++t) {
      const float* x = a.x + t * a.kp;
      auto v = w.values + w.tile_ptr[tile];
      float s[kTile] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t c = 0; c < w.kc; ++c) {
        const float* xc = x + c * 64;
        for (int r = 0; r < kTile; ++r) {
          uint64_t m = w.masks[(tile * w.kc + c) * kTile + r];
          while (m) {
            s[r] += xc[__builtin_ctzll(m)] * widen(*v++);
            m &= m - 1;
          }
        }
      }
      for (int r = 0; r < kTile; ++r)
        if (tile * kTile + r < w.n) y[t * w.n + tile * kTile + r] = s[r];
    }
  }
}

void sparse_f32_portable(const SparseF32& w, const ActF32& a, int64_t n0, int64_t n1, float* y) {
  sparse_fv_portable(w, a, n0, n1, y);
}

void sparse_bf16_portable(const SparseBF16& w, const ActF32& a, int64_t n0, int64_t n1, float* y) {
  sparse_fv_portable(w, a, n0, n1, y);
}

void dense_bf16_portable(const DenseBF16& w, const ActF32& a, int64_t n0, int64_t n1, float* y) {
  const int64_t kp = w.kc * 64;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* q = w.q + n * kp;
    for (int64_t t = 0; t < a.m; ++t) {
      const float* x = a.x + t * a.kp;
      float s = 0.f;
      for (int64_t k = 0; k < kp; ++k) s += x[k] * widen(q[k]);
      y[t * w.n + n] = s;
    }
  }
}

void dense_i8_portable(const DenseI8& w, const ActI8& a, int64_t n0, int64_t n1, int32_t* acc) {
  const int64_t kp = w.kc * 64;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = w.q + n * kp;
    for (int64_t t = 0; t < a.m; ++t) {
      const int16_t* x = a.xs + t * a.kp;
      int32_t s = 0;
      for (int64_t k = 0; k < kp; ++k) s += (int32_t)x[k] * (int32_t)q[k];
      acc[t * w.n + n] = s;
    }
  }
}

// Rows [r0, r1) of a packed weight (int8, fp32 or bf16 values) written dense (O: int8, fp32, fp32) by
// walking the mask bits.
template <class W, class T, class O>
void densify_bits(const W& w, const T* values, int64_t r0, int64_t r1, O* buf) {
  const int64_t kp = w.kc * 64;
  for (int64_t i = 0; i < (r1 - r0) * kp; ++i) buf[i] = O(0);
  for (int64_t tile = r0 / kTile; tile * kTile < r1; ++tile) {
    const T* p = values + w.tile_ptr[tile];
    for (int64_t c = 0; c < w.kc; ++c)
      for (int r = 0; r < kTile; ++r) {
        const int64_t row = tile * kTile + r;
        uint64_t m = w.masks[(tile * w.kc + c) * kTile + r];
        O* o = buf + (row - r0) * kp + c * 64;
        while (m) {
          if (row < r1) o[__builtin_ctzll(m)] = widen(*p);
          ++p;
          m &= m - 1;
        }
      }
  }
}

void densify_f32_portable(const SparseF32& w, int64_t r0, int64_t r1, float* buf) {
  densify_bits(w, w.values, r0, r1, buf);
}

void densify_bf16_portable(const SparseBF16& w, int64_t r0, int64_t r1, float* buf) {
  densify_bits(w, w.values, r0, r1, buf);
}

#include "row_math.h"  // quantize_row, rms_norm, silu_mul, attend for this ISA (internal linkage)

}  // namespace

void densify_i8_reference(const SparseI8& w, int64_t r0, int64_t r1, int8_t* buf) {
  densify_bits(w, w.values, r0, r1, buf);
}

KernelTable portable_kernels() {
  return KernelTable{"portable", sparse_i8_portable, sparse_f32_portable, dense_i8_portable, densify_f32_portable, densify_i8_reference,
                     sparse_i4_portable, dense_i4_portable,
                     rm_quantize_row, rm_quantize_row_s8, rm_rms_norm, rm_silu_mul, rm_attend,
                     sparse_bf16_portable, dense_bf16_portable, densify_bf16_portable, /*bf16_pairs=*/false};
}

}  // namespace sparsec
