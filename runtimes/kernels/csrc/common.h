// Plain-C argument blocks shared by the ISA-specific kernel files and the torch glue (ops.cpp).
//
// Why plain structs and no std:: here: kernels_avx2.cpp / kernels_avx512.cpp are compiled under
// `#pragma GCC target(...)`; any inline function from a shared header instantiated there could be
// merged by the linker with the baseline copy and then run on a CPU without those instructions.
// So the ISA files use only intrinsics and their own functions with internal linkage, and expose
// exactly the entry points declared below.
//
// Packed sparse format of one Linear weight W (N out x K in), see docs/kernels.md. Rows are grouped
// in tiles of 4 (N padded to a multiple of 4 with empty rows) and a tile's data is interleaved chunk
// by chunk, so one tile is ONE sequential stream (masks and values), which the hardware prefetcher
// follows; row-major storage gave 4-8 short streams per pass and ran latency-bound (docs/kernels.md).
//   kc        = ceil(K / 64) chunks of 64 input columns
//   masks     uint64 [tiles * kc * 4]  masks[(tile*kc + c)*4 + r]: bit j <=> W[4 tile + r, 64c + j] != 0
//   tile_ptr  int64  [tiles + 1]       first packed value of each tile
//   values    int8 / fp32 [nnz + 64 padding]  non-zeros in (tile, chunk, row, column) order
//   scales    fp32 [N]          int8 only: W[n, k] = scales[n] * q[n, k]
//   rowsum    int32 [N]         int8 only: sum_k q[n, k]  (the +128 compensation of u8 x s8 VNNI)
// Dense int8 (the same-family baseline): q int8 [N * kp] with kp = 64 * kc (zero padded), scales, rowsum.
//
// int4 (sparse-int4 / dense-int4): asymmetric, groups of 64 along the input dim (= one mask chunk), the
// scheme of onnxruntime's MatMulNBits / NNCF INT4_ASYM g64: each stored weight is a 4-bit code u in
// [0, 15], W[n, k] = s[n, c] * (u - z[n, c]) with one fp16 scale s and one integer zero point z in
// [0, 15] per (row, chunk); the level u - z is in [-15, 15], an int8 for vpdpbusd. Codes are packed
// two per byte, code 2j in the low nibble of byte j, 2j+1 in the high one; each (row, chunk) starts on
// a byte, so a chunk of p non-zeros takes (p + 1) / 2 bytes.
//   sparse-int4: masks, tile_ptr (in bytes) as above; values uint8 [bytes + 32 padding] in (tile, chunk,
//                row) order; scales fp16 and zeros uint8 [tiles * kc * 4] in the same (tile, chunk, row) order
//   dense-int4:  q uint8 [N * kc * 32] row-major (padding columns hold u = z: level 0); scales fp16 and
//                zeros uint8 [N * kc]
//   both:        comp fp32 [N] = 128 * sum_chunks s[n, c] * sum_k (u_k - z[n, c]) (the +128 term of u8 x s8)
//
// bf16 (sparse-bf16 / dense-bf16): values are bfloat16 bit patterns (the top half of an fp32) and the
// activations stay fp32; a weight widens exactly to fp32 (bits << 16), so every product and sum is an fp32
// one on the bf16-rounded weight: half the bytes of fp32 values with no activation quantization.
//   sparse-bf16: masks, tile_ptr as fp32; values uint16 [nnz + 32 padding] in (tile, chunk, row, column) order
//   dense-bf16:  q uint16 [N * kc * 64] row-major, zero padded (the same-family dense baseline, and a bf16 LM head)
#pragma once
#include <cstdint>

namespace sparsec {

constexpr int kTile = 4;

struct SparseI8 {
  const uint64_t* masks;
  const int64_t* tile_ptr;
  const int8_t* values;
  const int32_t* rowsum;
  int64_t n, k, kc;
  int64_t pf;  // software prefetch distance in bytes along the tile stream (SPARSEC_PREFETCH_BYTES)
};

struct SparseF32 {
  const uint64_t* masks;
  const int64_t* tile_ptr;
  const float* values;
  int64_t n, k, kc;
  int64_t pf;
};

struct DenseI8 {
  const int8_t* q;  // [n * kc * 64]
  const int32_t* rowsum;
  int64_t n, k, kc;
};

struct SparseI4 {
  const uint64_t* masks;
  const int64_t* tile_ptr;
  const uint8_t* values;
  const uint16_t* scales;  // fp16
  const uint8_t* zeros;
  const float* comp;
  int64_t n, k, kc;
  int64_t pf;
};

struct DenseI4 {
  const uint8_t* q;        // [n * kc * 32]
  const uint16_t* scales;  // fp16 [n * kc]
  const uint8_t* zeros;    // [n * kc]
  const float* comp;
  int64_t n, k, kc;
};

struct SparseBF16 {
  const uint64_t* masks;
  const int64_t* tile_ptr;
  const uint16_t* values;
  int64_t n, k, kc;
  int64_t pf;
};

struct DenseBF16 {
  const uint16_t* q;  // [n * kc * 64]
  int64_t n, k, kc;
};

// Chunks per row the int4 kernels take (their per-tile fp32 scale buffer lives on the stack): K <= 65536.
constexpr int64_t kMaxI4Chunks = 1024;

// Activations for the int8 kernels: m tokens, each quantized to int8 and stored twice so every ISA
// finds its preferred form: xu = xq + 128 as uint8 (VNNI u8 x s8), xs = xq as int16 (AVX2 madd).
// Both are padded with zeros of their form (128 / 0) to kp = 64 * kc columns.
struct ActI8 {
  const uint8_t* xu;  // [m * kp]
  const int16_t* xs;  // [m * kp]
  int64_t m, kp;
};

// fp32 activations padded with zeros to kp columns: [m * kp].
struct ActF32 {
  const float* x;
  int64_t m, kp;
};

// Each kernel computes rows [n0, n1) for all m tokens (sparse kernels: n0 is a multiple of kTile and
// whole tiles are computed; rows >= n are not written). int8 kernels write exact int32 dot products
// sum_k xq[t,k] * q[n,k] to acc[t * n_total + n]; fp32 kernels write y[t * n_total + n].
typedef void (*SparseI8Fn)(const SparseI8&, const ActI8&, int64_t n0, int64_t n1, int32_t* acc);
typedef void (*SparseF32Fn)(const SparseF32&, const ActF32&, int64_t n0, int64_t n1, float* y);
typedef void (*DenseI8Fn)(const DenseI8&, const ActI8&, int64_t n0, int64_t n1, int32_t* acc);
// int4 kernels write sum_chunks s[n, c] * sum_k xq[t, k] * (u - z)[n, k] (fp32, activation scale not applied)
// to acc[t * n_total + n]; with unit scales that is the exact integer dot product (tests).
typedef void (*SparseI4Fn)(const SparseI4&, const ActI8&, int64_t n0, int64_t n1, float* acc);
typedef void (*DenseI4Fn)(const DenseI4&, const ActI8&, int64_t n0, int64_t n1, float* acc);
// bf16 kernels write fp32 y[t * n_total + n] like the fp32 ones.
typedef void (*SparseBF16Fn)(const SparseBF16&, const ActF32&, int64_t n0, int64_t n1, float* y);
typedef void (*DenseBF16Fn)(const DenseBF16&, const ActF32&, int64_t n0, int64_t n1, float* y);
// Rows [r0, r1) (r0 a multiple of kTile) of a packed fp32 weight written dense into buf [r1 - r0, kc * 64]
// (every element written, zeros included): the densify-a-tile step of the large-M GEMM.
typedef void (*DensifyF32Fn)(const SparseF32&, int64_t r0, int64_t r1, float* buf);
// The same for packed int8 (buf int8 [r1 - r0, kc * 64]): the densify-a-tile step of the int8 GEMM path.
typedef void (*DensifyI8Fn)(const SparseI8&, int64_t r0, int64_t r1, int8_t* buf);
// The same for packed bf16, widened to fp32 (buf fp32 [r1 - r0, kc * 64]): the bf16 GEMM path.
typedef void (*DensifyBF16Fn)(const SparseBF16&, int64_t r0, int64_t r1, float* buf);

// Row-wise vector math (row_math.h, one copy per ISA file): activation quantization (ops.cpp) and the
// decoder step's non-matrix work (decoder_ops.cpp).
typedef float (*QuantizeRowFn)(const float* x, int64_t k, uint8_t* xu, int16_t* xs);
typedef float (*QuantizeRowS8Fn)(const float* x, int64_t k, int8_t* xq);
typedef void (*RmsNormFn)(const float* x, const float* w, int64_t n, float eps, float* out);
typedef void (*SiluMulFn)(const float* gu, int64_t n, float* out);
typedef void (*AttendFn)(const float* q, const float* k, const float* v, int64_t n_keys, int64_t d, int64_t stride,
                         float scale, float* scores, float* out);

struct KernelTable {
  const char* name;
  SparseI8Fn sparse_i8;
  SparseF32Fn sparse_f32;
  DenseI8Fn dense_i8;
  DensifyF32Fn densify_f32;
  DensifyI8Fn densify_i8;
  SparseI4Fn sparse_i4;
  DenseI4Fn dense_i4;
  QuantizeRowFn quantize_row;
  QuantizeRowS8Fn quantize_row_s8;
  RmsNormFn rms_norm;
  SiluMulFn silu_mul;
  AttendFn attend;
  SparseBF16Fn sparse_bf16;
  DenseBF16Fn dense_bf16;
  DensifyBF16Fn densify_bf16;
  // The bf16 kernels read fp32 activations permuted per 32-column block: the 16 even columns, then the 16 odd
  // ones (AVX-512: widening bf16 pairs in place, without a lane-crossing shuffle); else natural order.
  bool bf16_pairs;
};

// The table the ops run (SPARSEC_KERNEL_ISA or the best this CPU supports; set_isa changes it).
const KernelTable& active_kernels();

KernelTable portable_kernels();
// The portable int8 densify (bit walk), also the AVX2 table's: AVX2 has no byte expand, and at M >= 16
// tokens the GEMM after it dominates.
void densify_i8_reference(const SparseI8& w, int64_t r0, int64_t r1, int8_t* buf);
KernelTable avx2_kernels();
KernelTable avx512_kernels();

// AVX2 expansion tables (built once by the baseline code, read by kernels_avx2.cpp):
// shuffle index for pshufb: byte i of expand8_idx[m] = rank of bit i in m, or 0x80 if bit i is clear.
extern uint64_t expand8_idx[256];
// vpermps index for 8 floats: lane i takes packed element rank(i); expand8_keep[m] lane i = -1 if bit set.
extern int32_t expand8_perm[256][8];
extern int32_t expand8_keep[256][8];
void init_tables();
// IEEE half -> float for the baseline code (the AVX2 / AVX-512 kernels convert with F16C / AVX-512F).
float half_to_float(uint16_t h);

}  // namespace sparsec
