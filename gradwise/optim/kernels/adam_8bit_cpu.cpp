// Adam/AdamW with 8-bit block-wise moments (Dettmers et al. 2021, arXiv:2110.02861) in one pass
// over memory on the CPU. Per block of 256 values it reads the parameter, the gradient, the
// uint8 codes of m and v and their two fp32 scales once, and writes the parameter, the codes
// and the scales once: 16 bytes per value against about 60 for the same step through
// dequantise / torch._foreach_* update / quantise.
//
// It computes what gradwise's generic path computes (Adam._foreach_update on the decoded
// moments, then state_formats.quantize_8bit), operation for operation:
//   decode   m = map_s[code] * absmax_m            (one float product, as dequantize_8bit)
//   moments  m = lerp(m, g, 1 - beta1)             (ATen's vectorised lerp: one fma)
//            v = fma((1 - beta2) * g, g, v * beta2) (ATen's vectorised mul_, then addcmul_)
//   update   p = p + (-step_size * m) / (sqrt(v) / sqrt(bc2) + eps)   (ATen's addcdiv_)
//   encode   the index of the first midpoint >= m / max(absmax, tiny), clamped to [-1, 1]
//            (torch.bucketize, right=False; NaN gives 255 as there).
// except the square root: here the CPU's correctly rounded one (vsqrtps), where torch.sqrt on
// float32 CPU tensors calls MKL's vector math, which is not correctly rounded (about one root in
// five is one ulp off). Matching MKL meant a call to at::sqrt_out per tile, 0.8 of 6.5 ms a step
// at 1M parameters. So the moments' codes and scales equal the generic path's bit for bit (they
// do not depend on the parameter, unless weight decay is coupled), and the parameters agree to the
// last bits of each step. The kernel against itself (a resumed run) is bit for bit.
// Scalars arrive as doubles and are rounded to float once, as ATen rounds a Python scalar to
// the kernel's opmath type. The translation unit is built with -ffp-contract=off, so the only
// fused multiply-adds are the explicit ones, where ATen's AVX2/AVX-512 kernels use one.
//
// Encoding without a binary search: the midpoints are cut into cells by the top 15 bits of |y|
// (8 exponent bits, 7 fraction bits), each binary octave into as few equal cells as leave at most
// one midpoint in each (225 cells for the signed map, 447 for the unsigned one), each cell holding
// the number of midpoints below it, so one more comparison gives the exact index. Table lookups
// avoid AVX-512 gathers, which made the step about 3.5x slower than without them (1M values, 1
// thread): the 256-entry maps and midpoints and the cell counts go through VBMI byte permutes
// (Lookup, Cells), an octave's first cell and width through a dword permute. CPUs without AVX-512
// VBMI run the same arithmetic one value at a time. Threads split tiles of 64 blocks of all tensors (at::parallel_for).
#include "adam_cpu_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif
#include <limits>
#include <utility>

namespace {

using namespace adam_cpu;

constexpr int64_t kBlock = 256;
constexpr int64_t kTileBlocks = 64;  // blocks per task: 16384 values
constexpr int64_t kTile = kTileBlocks * kBlock;
// Keys: the 15 bits above the 16 low fraction bits of |y|'s float, from 2^-30 to 1.0. Below 2^-30
// (far under the smallest nonzero code, 3.25e-7 / 2) everything shares the first key. The octave
// of key k (k >> 7, from 2^-30 up) is cut into 2^b cells by the top b of its 7 fraction bits.
constexpr uint32_t kKeyShift = 16;
constexpr uint32_t kKeyLow = (127u - 30u) << 7;  // key of 2^-30
constexpr uint32_t kKeyHigh = 0x3f80u;           // key of 1.0
constexpr int kOctaves = 32;                     // 2^-30 .. 2^0 (31), one more for a 32-entry permute
constexpr int kNegative = 256;                   // where a signed map's cells of negative arguments start
constexpr int kCells = 512;

// One dynamic map (signed or unsigned): its values, its 255 midpoints (+inf at 255) and the
// cells: per octave its first cell and 7 - b (its cells' width in keys, as a shift), per cell the
// number of midpoints below its arguments; a signed map's cells of negative arguments from
// kNegative on (an unsigned map's negative arguments, below every midpoint, take the first cell).
struct Codebook {
  float values[256];
  float bounds[256];
  uint32_t octaves[kOctaves];  // first cell | (7 - b) << 16
  uint8_t cells[kCells] = {};  // past the map's cells: 0, loaded into the lookup's registers, never selected
  bool negative;

  explicit Codebook(const at::Tensor& map) {
    TORCH_CHECK(map.numel() == 256 && map.scalar_type() == at::kFloat && map.is_contiguous() && map.device().is_cpu(),
                "adam_8bit_: a map is 256 contiguous float32 values on the CPU");
    std::memcpy(values, map.data_ptr<float>(), sizeof(values));
    for (int i = 0; i < 255; ++i) bounds[i] = (values[i] + values[i + 1]) / 2.0f;  // as torch: add, then halve
    bounds[255] = std::numeric_limits<float>::infinity();
    negative = values[0] < 0.0f;
    int cell = 0;
    for (int octave = 0; octave < kOctaves - 1; ++octave) {
      int bits = 0;
      while (bits < 7 && !separates(octave, bits)) ++bits;
      TORCH_CHECK(separates(octave, bits), "adam_8bit_: the map's midpoints are closer than the encoding table's cells");
      octaves[octave] = static_cast<uint32_t>(cell) | static_cast<uint32_t>(7 - bits) << 16;
      for (int part = 0; part < 1 << bits; ++part, ++cell) {
        TORCH_CHECK(cell < (negative ? kNegative : kCells), "adam_8bit_: the map needs more cells than the table has");
        const auto [low, high] = range(octave, bits, part);
        cells[cell] = static_cast<uint8_t>(below(low));
        if (negative) cells[kNegative + cell] = static_cast<uint8_t>(below(-high));
      }
    }
    octaves[kOctaves - 1] = octaves[kOctaves - 2];  // beyond 1.0: never read
  }

  // The smallest and the largest float whose key falls in part `part` of 2^bits of the octave (the
  // first part of all from 0, the last up to 1.0).
  static std::pair<float, float> range(int octave, int bits, int part) {
    const uint32_t first = kKeyLow + (static_cast<uint32_t>(octave) << 7) + (static_cast<uint32_t>(part) << (7 - bits));
    const uint32_t last = first + (1u << (7 - bits)) - 1;
    const float low = first == kKeyLow ? 0.0f : bits_float(first << kKeyShift);
    const float high = last >= kKeyHigh ? 1.0f : bits_float((last << kKeyShift) | ((1u << kKeyShift) - 1));
    return {low, high};
  }

  // How many midpoints are < y (torch.bucketize's index for y, right=False).
  int below(float y) const { return static_cast<int>(std::lower_bound(bounds, bounds + 255, y) - bounds); }

  // Whether cutting the octave into 2^bits parts leaves at most one midpoint in each, for either sign.
  bool separates(int octave, int bits) const {
    for (int part = 0; part < 1 << bits; ++part) {
      const auto [low, high] = range(octave, bits, part);
      if (below(high) - below(low) > 1 || (negative && below(-low) - below(-high) > 1)) return false;
    }
    return true;
  }

  // The cell of y's bits (y within [-1, 1]).
  uint32_t cell(uint32_t bits) const {
    uint32_t key = (bits & 0x7fffffffu) >> kKeyShift;
    key = key < kKeyLow ? kKeyLow : (key > kKeyHigh ? kKeyHigh : key);
    const uint32_t octave = octaves[(key - kKeyLow) >> 7];
    const uint32_t cell = (octave & 0xffffu) + ((key & 127u) >> (octave >> 16));
    return bits >> 31 ? (negative ? kNegative + cell : 0u) : cell;
  }
};

// One block (n <= 256 values) in one pass: decode, update the moments and the parameter, keep the
// new moments in two 1 KiB buffers for the block's absmax, then encode them. The AVX-512 version
// and the scalar one compute the same thing operation for operation (IEEE division and square
// root, the same explicit fmas), so the kernel's result does not depend on the CPU it runs on.

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)

inline __mmask16 lanes(int64_t left) {  // the first `left` of 16 lanes (none when left <= 0)
  return left >= 16 ? static_cast<__mmask16>(0xffff) : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1u);
}

inline __mmask64 byte_lanes(int64_t left) {
  return left >= 64 ? ~static_cast<__mmask64>(0) : (static_cast<__mmask64>(1) << left) - 1;
}

// 64 lookups at once in a table of 256 floats kept as 4 planes of bytes (byte k of every
// entry), with VBMI's two-register byte permutes: gathers cost about 30 cycles per 16 values
// on the AMD EPYC this was tuned on, a gather-free lookup under a tenth of that. The codes are
// first shuffled so that interleaving the planes' bytes (within 128-bit lanes) gives the floats
// in order: out[q] holds the values of codes 16q .. 16q + 15.
struct Lookup {
  __m512i planes[4][4];  // plane k: entries 0-63, 64-127, 128-191, 192-255

  explicit Lookup(const float* table) {
    alignas(64) uint8_t bytes[4][256];
    for (int i = 0; i < 256; ++i) {
      const uint32_t bits = float_bits(table[i]);
      for (int k = 0; k < 4; ++k) bytes[k][i] = static_cast<uint8_t>(bits >> (8 * k));
    }
    for (int k = 0; k < 4; ++k) {
      for (int part = 0; part < 4; ++part) planes[k][part] = _mm512_load_si512(bytes[k] + 64 * part);
    }
  }

  void operator()(__m512i codes, __m512* out) const {
    alignas(64) static const uint8_t kOrder[64] = {  // position 16L + 4q + j takes code 16q + 4L + j
        0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39,
        52, 53, 54, 55, 8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30,
        31, 44, 45, 46, 47, 60, 61, 62, 63};
    const __m512i index = _mm512_permutexvar_epi8(_mm512_load_si512(kOrder), codes);
    const __mmask64 upper = _mm512_movepi8_mask(index);  // code >= 128
    __m512i byte[4];
    for (int k = 0; k < 4; ++k) {
      byte[k] = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(planes[k][0], index, planes[k][1]),
                                       _mm512_permutex2var_epi8(planes[k][2], index, planes[k][3]));
    }
    const __m512i low01 = _mm512_unpacklo_epi8(byte[0], byte[1]), high01 = _mm512_unpackhi_epi8(byte[0], byte[1]);
    const __m512i low23 = _mm512_unpacklo_epi8(byte[2], byte[3]), high23 = _mm512_unpackhi_epi8(byte[2], byte[3]);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(low01, low23));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(low01, low23));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(high01, high23));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(high01, high23));
  }
};

// A codebook's cells: the cell of 16 values at once (the octave's entry through a dword permute),
// and the counts of 64 cells at once through VBMI byte permutes over the 512-entry table.
struct Cells {
  __m512i octaves[2], table[8];
  bool negative;

  explicit Cells(const Codebook& book) : negative(book.negative) {
    for (int part = 0; part < 2; ++part) octaves[part] = _mm512_loadu_si512(book.octaves + 16 * part);
    for (int part = 0; part < 8; ++part) table[part] = _mm512_loadu_si512(book.cells + 64 * part);
  }

  __m512i cell(__m512i bits) const {  // Codebook::cell, 16 at once
    __m512i key = _mm512_srli_epi32(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)), kKeyShift);
    key = _mm512_min_epu32(_mm512_max_epu32(key, _mm512_set1_epi32(kKeyLow)), _mm512_set1_epi32(kKeyHigh));
    const __m512i octave = _mm512_permutex2var_epi32(
        octaves[0], _mm512_srli_epi32(_mm512_sub_epi32(key, _mm512_set1_epi32(kKeyLow)), 7), octaves[1]);
    const __m512i cell = _mm512_add_epi32(_mm512_and_si512(octave, _mm512_set1_epi32(0xffff)),
                                          _mm512_srlv_epi32(_mm512_and_si512(key, _mm512_set1_epi32(127)),
                                                            _mm512_srli_epi32(octave, 16)));
    const __mmask16 minus = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
    return negative ? _mm512_mask_add_epi32(cell, minus, cell, _mm512_set1_epi32(kNegative))
                    : _mm512_maskz_mov_epi32(static_cast<__mmask16>(~minus), cell);
  }

  __m512i counts(const uint32_t* cells) const {  // of cells[0..64), byte j for cell j
    __m128i bytes[4];
    __mmask64 bit7 = 0, bit8 = 0;
    for (int q = 0; q < 4; ++q) {
      const __m512i cell = _mm512_load_si512(cells + 16 * q);
      bytes[q] = _mm512_cvtepi32_epi8(cell);
      bit7 |= static_cast<__mmask64>(_mm512_test_epi32_mask(cell, _mm512_set1_epi32(128))) << (16 * q);
      bit8 |= static_cast<__mmask64>(_mm512_test_epi32_mask(cell, _mm512_set1_epi32(256))) << (16 * q);
    }
    const __m512i low = _mm512_inserti32x4(
        _mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(bytes[0]), bytes[1], 1), bytes[2], 2), bytes[3], 3);
    // permutex2var reads an index's low 7 bits: 128 entries from two registers
    const __m512i first = _mm512_mask_blend_epi8(bit7, _mm512_permutex2var_epi8(table[0], low, table[1]),
                                                 _mm512_permutex2var_epi8(table[2], low, table[3]));
    const __m512i second = _mm512_mask_blend_epi8(bit7, _mm512_permutex2var_epi8(table[4], low, table[5]),
                                                  _mm512_permutex2var_epi8(table[6], low, table[7]));
    return _mm512_mask_blend_epi8(bit8, first, second);
  }
};

struct Lookups {
  Lookup values, bounds;
  Cells cells;
  explicit Lookups(const Codebook& book) : values(book.values), bounds(book.bounds), cells(book) {}
};

// A block's codes (n <= 256 of them) decoded and scaled into out (256 floats; past n, junk).
inline void decode_block(const Lookup& values, const uint8_t* __restrict codes, float scale, int64_t n,
                         float* __restrict out) {
  const __m512 scales = _mm512_set1_ps(scale);
  __m512 decoded[4];
  for (int64_t i = 0; i < n; i += 64) {
    values(_mm512_maskz_loadu_epi8(byte_lanes(n - i), codes + i), decoded);
    for (int q = 0; q < 4; ++q) _mm512_store_ps(out + i + 16 * q, _mm512_mul_ps(decoded[q], scales));
  }
}

// A block's codes, in two passes over it in the L1 cache: the cell of each value (16 at a time);
// the cell's count of midpoints below it and the one midpoint the cell may hold, looked up 64 at a
// time, and NaN's code 255.
inline void encode_block(const Lookups& lookups, const float* __restrict values, int64_t n, bool has_nan,
                         float largest, uint8_t* __restrict codes, float* __restrict absmax) {
  alignas(64) float clamped[kBlock];
  alignas(64) uint32_t cells[kBlock];
  const float scale_stored = has_nan ? std::numeric_limits<float>::quiet_NaN() : largest;
  *absmax = scale_stored;
  const float tiny = std::numeric_limits<float>::min();
  const __m512 scale = _mm512_set1_ps(scale_stored < tiny ? tiny : scale_stored);  // clamp(min=tiny), NaN kept
  const __m512 minus_one = _mm512_set1_ps(-1.0f), one = _mm512_set1_ps(1.0f);
  const int64_t rounded = (n + 63) / 64 * 64;  // past n: zeros, whose cell is a valid one
  for (int64_t i = 0; i < rounded; i += 16) {
    const __mmask16 mask = lanes(n - i);
    const __m512 y = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, values + i), scale);
    // clamped to [-1, 1]; a NaN stays NaN (max(a, b) is b when a is NaN), its cell is any valid one
    const __m512 bounded = _mm512_min_ps(_mm512_max_ps(y, minus_one), one);
    _mm512_store_si512(cells + i, lookups.cells.cell(_mm512_castps_si512(bounded)));
    _mm512_store_ps(clamped + i, _mm512_mask_mov_ps(bounded, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), y));
  }
  const __m512i step = _mm512_set1_epi8(1), nan_code = _mm512_set1_epi8(static_cast<char>(255));
  __m512 midpoint[4];
  for (int64_t i = 0; i < n; i += 64) {
    const __m512i counts = lookups.cells.counts(cells + i);
    lookups.bounds(counts, midpoint);
    __mmask64 up = 0, nan = 0;  // bit 16q + j: value i + 16q + j
    for (int q = 0; q < 4; ++q) {
      const __m512 x = _mm512_load_ps(clamped + i + 16 * q);
      up |= static_cast<__mmask64>(_mm512_cmp_ps_mask(midpoint[q], x, _CMP_LT_OQ)) << (16 * q);
      nan |= static_cast<__mmask64>(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q)) << (16 * q);
    }
    const __m512i code = _mm512_mask_mov_epi8(_mm512_mask_add_epi8(counts, up, counts, step), nan, nan_code);
    _mm512_mask_storeu_epi8(codes + i, byte_lanes(n - i), code);  // NaN: 255, as torch.bucketize
  }
}

template <Decay kDecay>
inline void adam_block(const Codebook&, const Codebook&, const Lookups& signed_lookups,
                       const Lookups& unsigned_lookups, const Scalars& s, float minus_step, float bc2_sqrt,
                       float* __restrict p, const float* __restrict g, uint8_t* __restrict m_codes,
                       float* __restrict m_absmax, uint8_t* __restrict v_codes, float* __restrict v_absmax,
                       int64_t n) {
  alignas(64) float m_new[kBlock], v_new[kBlock];
  decode_block(signed_lookups.values, m_codes, *m_absmax, n, m_new);
  decode_block(unsigned_lookups.values, v_codes, *v_absmax, n, v_new);
  const __m512 sign = _mm512_set1_ps(s.sign);
  const __m512 coeff1 = _mm512_set1_ps(s.coeff1), beta2 = _mm512_set1_ps(s.beta2),
               one_minus_beta2 = _mm512_set1_ps(s.one_minus_beta2), decay = _mm512_set1_ps(s.decay),
               weight_decay = _mm512_set1_ps(s.weight_decay), step = _mm512_set1_ps(minus_step),
               bc2 = _mm512_set1_ps(bc2_sqrt), eps = _mm512_set1_ps(s.eps), zero = _mm512_setzero_ps();
  __m512 m_largest = zero, v_largest = zero;
  __mmask16 m_nan = 0, v_nan = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = lanes(n - i);
    __m512 grad = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, g + i), sign);
    __m512 param = _mm512_maskz_loadu_ps(mask, p + i);
    if constexpr (kDecay == Decay::kDecoupled) param = _mm512_mul_ps(param, decay);
    if constexpr (kDecay == Decay::kCoupled) grad = _mm512_fmadd_ps(param, weight_decay, grad);
    const __m512 m = _mm512_load_ps(m_new + i), v = _mm512_load_ps(v_new + i);
    const __m512 m1 = _mm512_fmadd_ps(coeff1, _mm512_sub_ps(grad, m), s.small1 ? m : grad);
    const __m512 v1 = _mm512_fmadd_ps(_mm512_mul_ps(one_minus_beta2, grad), grad, _mm512_mul_ps(v, beta2));
    const __m512 denominator = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v1), bc2), eps);
    param = _mm512_add_ps(param, _mm512_div_ps(_mm512_mul_ps(step, m1), denominator));
    _mm512_mask_storeu_ps(p + i, mask, param);
    _mm512_store_ps(m_new + i, m1);
    _mm512_store_ps(v_new + i, v1);
    // max(a, b) is b when a is NaN: NaNs are counted apart and leave the maxima alone
    m_largest = _mm512_mask_max_ps(m_largest, mask, _mm512_abs_ps(m1), m_largest);
    v_largest = _mm512_mask_max_ps(v_largest, mask, _mm512_abs_ps(v1), v_largest);
    m_nan |= _mm512_mask_cmp_ps_mask(mask, m1, m1, _CMP_UNORD_Q);
    v_nan |= _mm512_mask_cmp_ps_mask(mask, v1, v1, _CMP_UNORD_Q);
  }
  encode_block(signed_lookups, m_new, n, m_nan != 0, _mm512_reduce_max_ps(m_largest), m_codes, m_absmax);
  encode_block(unsigned_lookups, v_new, n, v_nan != 0, _mm512_reduce_max_ps(v_largest), v_codes, v_absmax);
}

#else  // the same arithmetic one value at a time

struct Lookups {  // the scalar code reads the codebook's tables directly
  explicit Lookups(const Codebook&) {}
};

inline void encode_block(const Codebook& book, const float* __restrict values, int64_t n, bool has_nan,
                         float largest, uint8_t* __restrict codes, float* __restrict absmax) {
  const float scale_stored = has_nan ? std::numeric_limits<float>::quiet_NaN() : largest;
  *absmax = scale_stored;
  const float tiny = std::numeric_limits<float>::min();
  const float scale = scale_stored < tiny ? tiny : scale_stored;  // clamp(min=tiny), NaN kept
  for (int64_t i = 0; i < n; ++i) {
    const float y = values[i] / scale;
    const float clamped = std::min(std::max(y, -1.0f), 1.0f);  // NaN is decided below
    int32_t code = book.cells[book.cell(float_bits(clamped))];
    code += book.bounds[code] < clamped;  // the one midpoint the cell may hold
    codes[i] = static_cast<uint8_t>(y == y ? code : 255);  // NaN: 255, as torch.bucketize
  }
}

template <Decay kDecay>
inline void adam_block(const Codebook& signed_book, const Codebook& unsigned_book, const Lookups&, const Lookups&,
                       const Scalars& s, float minus_step, float bc2_sqrt, float* __restrict p, const float* __restrict g,
                       uint8_t* __restrict m_codes, float* __restrict m_absmax, uint8_t* __restrict v_codes,
                       float* __restrict v_absmax, int64_t n) {
  float m_new[kBlock], v_new[kBlock];
  const float m_scale = *m_absmax, v_scale = *v_absmax;
  float m_largest = 0.0f, v_largest = 0.0f;
  bool m_nan = false, v_nan = false;
  for (int64_t i = 0; i < n; ++i) {
    float grad = g[i] * s.sign;
    float param = p[i];
    if constexpr (kDecay == Decay::kDecoupled) param = param * s.decay;
    if constexpr (kDecay == Decay::kCoupled) grad = std::fma(param, s.weight_decay, grad);
    const float m = signed_book.values[m_codes[i]] * m_scale;
    const float v = unsigned_book.values[v_codes[i]] * v_scale;
    const float m1 = std::fma(s.coeff1, grad - m, s.small1 ? m : grad);
    const float v1 = std::fma(s.one_minus_beta2 * grad, grad, v * s.beta2);
    p[i] = param + (minus_step * m1) / (std::sqrt(v1) / bc2_sqrt + s.eps);
    m_new[i] = m1;
    v_new[i] = v1;
    m_largest = std::fabs(m1) > m_largest ? std::fabs(m1) : m_largest;
    v_largest = std::fabs(v1) > v_largest ? std::fabs(v1) : v_largest;
    m_nan |= m1 != m1;
    v_nan |= v1 != v1;
  }
  encode_block(signed_book, m_new, n, m_nan, m_largest, m_codes, m_absmax);
  encode_block(unsigned_book, v_new, n, v_nan, v_largest, v_codes, v_absmax);
}

#endif

// One tile: up to kTileBlocks blocks of one tensor, n values from the tile's first.
template <Decay kDecay>
void adam_tile(const Codebook& signed_book, const Codebook& unsigned_book, const Lookups& signed_lookups,
               const Lookups& unsigned_lookups, const Scalars& s, float minus_step, float bc2_sqrt, float* p,
               const float* g, uint8_t* m_codes, float* m_absmax, uint8_t* v_codes, float* v_absmax, int64_t n) {
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t block = start / kBlock;
    adam_block<kDecay>(signed_book, unsigned_book, signed_lookups, unsigned_lookups, s, minus_step, bc2_sqrt,
                       p + start, g + start, m_codes + start, m_absmax + block, v_codes + start, v_absmax + block,
                       std::min(kBlock, n - start));
  }
}

void adam_8bit_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                std::vector<at::Tensor> exp_avg_absmaxes, std::vector<at::Tensor> exp_avg_sqs,
                std::vector<at::Tensor> exp_avg_sq_absmaxes, const at::Tensor& signed_map,
                const at::Tensor& unsigned_map, std::vector<double> minus_step_sizes,
                std::vector<double> bias_correction2_sqrts, double beta1, double beta2, double eps,
                double weight_decay, double lr, bool decoupled, bool maximize) {
  constexpr const char* kKernel = "adam_8bit_";
  const size_t count = params.size();
  check_lengths(kKernel, count, {grads.size(), exp_avgs.size(), exp_avg_absmaxes.size(), exp_avg_sqs.size(),
                                 exp_avg_sq_absmaxes.size(), minus_step_sizes.size(), bias_correction2_sqrts.size()});
  for (size_t k = 0; k < count; ++k) {
    check_parameter(kKernel, params[k], grads[k]);
    const int64_t numel = params[k].numel();
    for (const at::Tensor* codes : {&exp_avgs[k], &exp_avg_sqs[k]}) {
      check_state(kKernel, *codes, at::kByte, numel,
                  "moment codes must be contiguous uint8 tensors of the parameter's size");
    }
    for (const at::Tensor* scales : {&exp_avg_absmaxes[k], &exp_avg_sq_absmaxes[k]}) {
      check_state(kKernel, *scales, at::kFloat, ceil_div(numel, kBlock),
                  "block scales must be contiguous float32 tensors, one per 256 values");
    }
  }
  const Codebook signed_book(signed_map), unsigned_book(unsigned_map);
  const Lookups signed_lookups(signed_book), unsigned_lookups(unsigned_book);
  const Scalars s = step_scalars(beta1, beta2, eps, weight_decay, lr, maximize);
  with_decay_rule(decay_rule(weight_decay, decoupled), [&](auto rule) {
    parallel_tiles(first_tiles(params, kTile), kTile, [&](size_t k, int64_t start) {
      const int64_t block = start / kBlock;
      adam_tile<rule>(signed_book, unsigned_book, signed_lookups, unsigned_lookups, s,
                      static_cast<float>(minus_step_sizes[k]), static_cast<float>(bias_correction2_sqrts[k]),
                      params[k].data_ptr<float>() + start, grads[k].data_ptr<float>() + start,
                      exp_avgs[k].data_ptr<uint8_t>() + start, exp_avg_absmaxes[k].data_ptr<float>() + block,
                      exp_avg_sqs[k].data_ptr<uint8_t>() + start, exp_avg_sq_absmaxes[k].data_ptr<float>() + block,
                      std::min(kTile, params[k].numel() - start));
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("adam_8bit_", &adam_8bit_,
             "Adam/AdamW step of contiguous float32 CPU parameters with 8-bit block-wise moments, in place");
}
