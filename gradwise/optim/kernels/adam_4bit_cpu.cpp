// Adam/AdamW with 4-bit moments (Li et al. 2023, "Memory Efficient Optimizers with 4-bit States",
// arXiv:2309.01507) fused on the CPU: the packed codes and scales are read and written directly,
// with no float32 working copy of either moment.
//
// Layout (gradwise/optim/state_formats.py, quantize_4bit): two codes per byte, code 2j in the low
// half of byte j (an odd count leaves the last high half 0). m is signed, on the 4-bit dynamic map
// (dynamic_map(True, decades=3)), scaled per block of 128 by the block's largest magnitude. v is
// unsigned, on the linear map {1..16}/16; a vector's v is scaled per block of 128 too, a tensor of
// two or more dimensions (none empty) by rank-1 normalisation: the scales are the maxima of v
// along every other dimension, one dimension after another (M_0 for the rows, M_1 for the columns,
// ...), and entry (i_0, ..., i_k) is divided by min_d M_d[i_d].
//
// It computes what the generic path computes (Adam._foreach_update on the decoded moments, then
// quantize_4bit), operation for operation, with the arithmetic of adam_8bit_cpu.cpp:
//   decode   m = map_s[code] * scale_m               (one float product, as dequantize_4bit)
//            v = map_u[code] * min_d M_d[i_d]        (or * the block's scale)
//   moments  m = lerp(m, g, 1 - beta1),  v = fma((1 - beta2) * g, g, v * beta2)
//   update   p = p + (-step_size * m) / (sqrt(v) / sqrt(bc2) + eps)
//   encode   the number of midpoints between neighbouring map values that are < m / max(scale, tiny)
//            (torch.bucketize, right=False, after clamping to the map's range, which moves no
//            value across a midpoint; NaN gives 15 as there): m's by a 4-step binary search, v's
//            in closed form (the linear map's midpoints are (2j + 3) / 32; see linear_codes).
// except the square root: the CPU's correctly rounded one where torch.sqrt on float32 CPU tensors
// calls MKL's (see adam_8bit_cpu.cpp). So the codes and scales of both moments equal the generic
// path's bit for bit (unless weight decay is coupled, when a parameter's last bit can move a value
// across a midpoint), and the parameters agree to the last bits of each step.
//
// Rank-1 normalisation needs every new v of a tensor before the first can be encoded, so those
// tensors take two passes, and nothing of v is kept between them: pass 1 computes each new v (from
// the gradient, the old codes and scales, and under coupled weight decay the parameter) and keeps
// only its maxima along each dimension; pass 2 recomputes the same v (the same operations on the
// same inputs, so the same bits) and does the whole step. Extra memory: the new maxima, sum(shape)
// floats per tensor, plus one partial copy of them per thread in pass 1; extra work: one more read
// of the gradient and of v's codes (4.5 bytes per value, 8.5 with coupled decay), where a float32
// copy of v would write and read 8. The tensors are stepped in rounds of consecutive ones of at most
// 2^20 values (a larger tensor alone), pass 1 then pass 2 for each round, so that pass 2 finds the
// round's gradients in the last-level cache. Block-scaled moments are encoded per block in pass 2.
// A block of 128 inside one row reads its rank-1 scales in place (the row's scale over the other
// dimensions, once per row, against the last dimension's maxima); one across rows fills them in.
//
// Vectorised with AVX-512 (F, BW, VL) where the CPU has it: the 16-entry maps and midpoints sit in
// one register each and are looked up with vpermps; elsewhere the same arithmetic runs one value at
// a time. Threads split tiles of 128 blocks (16384 values) of all tensors (at::parallel_for); pass 1
// merges each thread's partial maxima under a lock (a maximum does not depend on the order).
#include "adam_cpu_common.h"

#include <limits>
#include <mutex>
#include <optional>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define GRADWISE_ADAM_4BIT_AVX512 1
#endif

namespace {

using namespace adam_cpu;

constexpr int64_t kBlock = 128;
constexpr int64_t kTile = 128 * kBlock;
// Values per round of pass 1 then pass 2: 4 MiB of gradients, which pass 2 reads again from the cache.
constexpr int64_t kRound = int64_t{1} << 20;
constexpr uint32_t kInfinityBits = 0x7f800000u;
constexpr uint32_t kQuietNanBits = 0x7fc00000u;  // torch.amax's NaN

// One 4-bit map: its 16 values in increasing order and the 15 midpoints between them (a 16th,
// +inf, pads the table and is never compared).
struct Codebook {
  alignas(64) float values[16];
  alignas(64) float bounds[16];

  explicit Codebook(const at::Tensor& map) {
    TORCH_CHECK(map.numel() == 16 && map.scalar_type() == at::kFloat && map.is_contiguous() && map.device().is_cpu(),
                "adam_4bit_: a map is 16 contiguous float32 values on the CPU");
    std::memcpy(values, map.data_ptr<float>(), sizeof(values));
    for (int i = 0; i < 15; ++i) bounds[i] = (values[i] + values[i + 1]) / 2.0f;  // as torch: add, then halve
    bounds[15] = std::numeric_limits<float>::infinity();
  }
};

// The signed dynamic map with its midpoints, and the values of the unsigned linear map, whose nearest
// codes have a closed form (linear_codes).
struct Books {
  Codebook m;
  alignas(64) float v[16];

  Books(const at::Tensor& signed_map, const at::Tensor& unsigned_map) : m(signed_map) {
    TORCH_CHECK(unsigned_map.numel() == 16 && unsigned_map.scalar_type() == at::kFloat &&
                    unsigned_map.is_contiguous() && unsigned_map.device().is_cpu(),
                "adam_4bit_: a map is 16 contiguous float32 values on the CPU");
    std::memcpy(v, unsigned_map.data_ptr<float>(), sizeof(v));
    for (int j = 0; j < 16; ++j) {
      TORCH_CHECK(v[j] == static_cast<float>(j + 1) / 16.0f,
                  "adam_4bit_: the unsigned map is the linear one, (j + 1) / 16 (linear_map_4bit)");
    }
  }
};

// A tensor of two or more dimensions, none empty, whose v is scaled by rank-1 normalisation: its
// shape, and where each dimension's maxima start among the concatenated scales.
struct Rank1 {
  std::vector<int64_t> sizes, starts;
  int64_t count = 0;  // sum(shape): how many maxima

  explicit Rank1(at::IntArrayRef shape) {
    for (const int64_t size : shape) {
      starts.push_back(count);
      sizes.push_back(size);
      count += size;
    }
  }

  // min over the dimensions but the last of maxima[starts[d] + i_d] for row `row`; NaN if one is.
  float row_scale(const float* maxima, int64_t row) const {
    float scale = std::numeric_limits<float>::infinity();
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) {
      const float x = maxima[starts[d] + row % sizes[d]];
      scale = (x != x || scale != scale) ? x + scale : std::min(scale, x);
      row /= sizes[d];
    }
    return scale;
  }

  // maxima[starts[d] + i_d] raised to `bits` for the dimensions but the last, of row `row`.
  void raise_row(uint32_t* maxima, int64_t row, uint32_t bits) const {
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) {
      uint32_t& largest = maxima[starts[d] + row % sizes[d]];
      largest = std::max(largest, bits);
      row /= sizes[d];
    }
  }
};

// The rank-1 scales of a block's values: min(outer, values[i]), NaN where either is NaN (as
// torch.minimum). For a block inside one row, `values` are the last dimension's maxima from the
// block's first column and `outer` the row's scale over the other dimensions; for a block across
// rows, the scales filled in per value and outer = +inf.
struct BlockScales {
  const float* values;
  float outer;
};

// A row (flat index over all dimensions but the last) and column of a rank-1 tensor, moved along
// block by block through a tile.
class Rows {
 public:
  Rows(const Rank1& layout, int64_t first)
      : layout_(layout), columns_(layout.sizes.back()), row_(first / columns_), column_(first % columns_) {}

  // A row's scale over the dimensions but the last, on one set of maxima, computed once per row.
  struct Outer {
    int64_t row = -1;
    float scale = 0.0f;
  };

  // The rank-1 scales on `maxima` of the next `count` values: read in place inside one row, else
  // filled into `buffer` (kBlock floats).
  BlockScales scales(const float* maxima, Outer& outer, int64_t count, float* __restrict buffer) const {
    const float* last = maxima + layout_.starts.back();
    if (column_ + count <= columns_) {
      if (outer.row != row_) outer = {row_, layout_.row_scale(maxima, row_)};
      return {last + column_, outer.scale};
    }
    runs(count, [&](int64_t offset, int64_t row, int64_t column, int64_t length) {
      const float scale = layout_.row_scale(maxima, row);
      for (int64_t j = 0; j < length; ++j) {
        const float x = last[column + j];
        buffer[offset + j] = (x != x || scale != scale) ? x + scale : std::min(scale, x);
      }
    });
    return {buffer, std::numeric_limits<float>::infinity()};
  }

  // Raises the partial maxima (bit patterns) of each dimension to the next `count` values v[0..count).
  // The values are +0, positive or NaN (v = (1 - beta2) g^2 + beta2 v, no -0), for which the unsigned
  // order of the bits is the float order with every NaN above +inf: a NaN wins, as in torch.amax.
  void gather_maxima(const float* v, int64_t count, uint32_t* maxima) const {
    uint32_t* last = maxima + layout_.starts.back();
    runs(count, [&](int64_t offset, int64_t row, int64_t column, int64_t length) {
      uint32_t largest = 0;
      for (int64_t j = 0; j < length; ++j) {
        const uint32_t bits = float_bits(v[offset + j]);
        largest = std::max(largest, bits);
        last[column + j] = std::max(last[column + j], bits);
      }
      layout_.raise_row(maxima, row, largest);
    });
  }

  void advance(int64_t count) {
    column_ += count;
    if (column_ >= columns_) {
      row_ += column_ / columns_;
      column_ %= columns_;
    }
  }

 private:
  // visit(offset, row, column, length) for each run of one row among the next `count` values.
  template <typename Visit>
  void runs(int64_t count, Visit&& visit) const {
    int64_t row = row_, column = column_;
    for (int64_t offset = 0; offset < count; ++row, column = 0) {
      const int64_t length = std::min(count - offset, columns_ - column);
      visit(offset, row, column, length);
      offset += length;
    }
  }

  const Rank1& layout_;
  const int64_t columns_;
  int64_t row_, column_;
};

// The float a maximum's bits stand for, every NaN as torch.amax's.
inline float maximum_value(uint32_t bits) { return bits_float(bits > kInfinityBits ? kQuietNanBits : bits); }

#ifdef GRADWISE_ADAM_4BIT_AVX512

inline __mmask16 lanes(int64_t left) {  // the first `left` of 16 lanes
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

// Plain loads and stores of 16 floats, masked at a tail (left < 16) only.
inline __m512 load(const float* x, int64_t left) {
  return left >= 16 ? _mm512_loadu_ps(x) : _mm512_maskz_loadu_ps(lanes(left), x);
}

inline void store(float* x, __m512 value, int64_t left) {
  if (left >= 16) {
    _mm512_storeu_ps(x, value);
  } else {
    _mm512_mask_storeu_ps(x, lanes(left), value);
  }
}

// The 16 codes of the 8 bytes at `packed` (fewer when left < 16; the rest 0), one per int32 lane.
inline __m512i load_codes(const uint8_t* packed, int64_t left) {
  const __m128i bytes = left >= 16 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed))
                                   : _mm_maskz_loadu_epi8(lanes((left + 1) / 2), packed);
  const __m128i nibble = _mm_set1_epi8(15);
  const __m128i low = _mm_and_si128(bytes, nibble), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
  return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(low, high));
}

// The first `left` of 16 codes packed two per byte into `packed` (lanes past `left` must hold 0: an
// odd count's last high half stays 0, as quantize_4bit pads).
inline void store_codes(uint8_t* packed, __m512i codes, int64_t left) {
  const __m512i pairs = _mm512_or_si512(codes, _mm512_srli_epi64(codes, 28));  // odd lane into bits 4-7
  if (left >= 16) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(packed), _mm512_cvtepi64_epi8(pairs));
  } else {
    _mm_mask_storeu_epi8(packed, lanes((left + 1) / 2), _mm512_cvtepi64_epi8(pairs));
  }
}

// 16 rank-1 scales from lane i on: vminps returns its second operand when one is NaN, which keeps a
// per-value NaN; a NaN outer scale is every lane's.
inline __m512 scale_lanes(const BlockScales& scales, int64_t i, int64_t left) {
  const __m512 outer = _mm512_set1_ps(scales.outer);
  return scales.outer != scales.outer ? outer : _mm512_min_ps(outer, load(scales.values + i, left));
}

// The nearest code of each lane: the number of midpoints < y, by binary search over the 15; NaN: 15.
inline __m512i nearest_codes(__m512 bounds, __m512 y) {
  __m512i code = _mm512_setzero_si512();
  for (int step = 8; step > 0; step /= 2) {
    const __m512 bound = _mm512_permutexvar_ps(_mm512_add_epi32(code, _mm512_set1_epi32(step - 1)), bounds);
    code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(bound, y, _CMP_LT_OQ), code, _mm512_set1_epi32(step));
  }
  return _mm512_mask_mov_epi32(code, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(15));
}

// The linear map's nearest code to y (>= 0, or NaN): its midpoints are (2j + 3) / 32 exactly (the sum of
// neighbours, halved), so the number of them below y is #{j <= 14 : j < (32 y - 3) / 2}, which is
// clamp(ceil((32 y - 3) / 2), 0, 15); t = 32 y is exact, and so is t - 3 for t >= 1.5 (below, the count is
// 0 however it rounds). y is clamped to 1 first as the generic path clamps (a NaN to 1 here: code 15, as
// torch.bucketize gives NaN). torch.bucketize's answer bit for bit without a search: checked for every
// float32 in [0, 1] (1,065,353,217 values) when written; the tests check the ties.
inline __m512i linear_codes(__m512 y) {
  const __m512 t = _mm512_mul_ps(_mm512_min_ps(y, _mm512_set1_ps(1.0f)), _mm512_set1_ps(32.0f));  // NaN: 1
  const __m512 x = _mm512_mul_ps(_mm512_sub_ps(t, _mm512_set1_ps(3.0f)), _mm512_set1_ps(0.5f));
  const __m512 up = _mm512_roundscale_ps(x, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
  return _mm512_max_epi32(_mm512_cvtps_epi32(up), _mm512_setzero_si512());
}

inline __m512 clamp_tiny(__m512 scale) {  // clamp(min=tiny), a NaN kept (vmaxps returns its second operand)
  return _mm512_max_ps(_mm512_set1_ps(std::numeric_limits<float>::min()), scale);
}

struct Lanes {  // the scalars broadcast
  __m512 sign, coeff1, beta2, one_minus_beta2, eps, weight_decay, decay, step, bc2;
  Lanes(const Scalars& s, float minus_step, float bc2_sqrt)
      : sign(_mm512_set1_ps(s.sign)), coeff1(_mm512_set1_ps(s.coeff1)), beta2(_mm512_set1_ps(s.beta2)),
        one_minus_beta2(_mm512_set1_ps(s.one_minus_beta2)), eps(_mm512_set1_ps(s.eps)),
        weight_decay(_mm512_set1_ps(s.weight_decay)), decay(_mm512_set1_ps(s.decay)),
        step(_mm512_set1_ps(minus_step)), bc2(_mm512_set1_ps(bc2_sqrt)) {}
};

// The gradient Adam uses (maximize's sign, coupled decay's L2 term from the parameter as it was).
template <Decay kDecay>
inline __m512 gradient(const Lanes& c, const float* g, __m512 param, int64_t left) {
  const __m512 grad = _mm512_mul_ps(load(g, left), c.sign);  // exact: -g
  if constexpr (kDecay == Decay::kCoupled) return _mm512_fmadd_ps(param, c.weight_decay, grad);
  return grad;
}

inline __m512 second_moment(const Lanes& c, __m512 grad, __m512 v) {
  return _mm512_fmadd_ps(_mm512_mul_ps(c.one_minus_beta2, grad), grad, _mm512_mul_ps(v, c.beta2));
}

// A block's codes and its stored scale: the largest magnitude, NaN if a value is NaN.
template <typename Nearest>
inline void encode_block(Nearest nearest, const float* values, int64_t n, bool has_nan, float largest,
                         uint8_t* __restrict codes, float* __restrict scale) {
  *scale = has_nan ? bits_float(kQuietNanBits) : largest;
  const __m512 divisor = clamp_tiny(_mm512_set1_ps(*scale));
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 y = _mm512_div_ps(load(values + i, n - i), divisor);
    store_codes(codes + i / 2, _mm512_maskz_mov_epi32(lanes(n - i), nearest(y)), n - i);
  }
}

// Pass 1 of a rank-1 tensor, one block: its new v into out (n <= 128 values), on the old scales.
template <Decay kDecay>
void second_moments_block(const Books& books, const Lanes& c, const float* p, const float* g,
                          const uint8_t* v_codes, const BlockScales& old_scales, int64_t n, float* __restrict out) {
  const __m512 v_map = _mm512_load_ps(books.v);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 param = kDecay == Decay::kCoupled ? load(p + i, n - i) : _mm512_setzero_ps();
    const __m512 grad = gradient<kDecay>(c, g + i, param, n - i);
    const __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(load_codes(v_codes + i / 2, n - i), v_map),
                                   scale_lanes(old_scales, i, n - i));
    _mm512_store_ps(out + i, second_moment(c, grad, v));
  }
}

// Pass 2, one block of n <= 128 values: decode, update the moments and the parameter, encode. v's
// scales: per value (rank-1: the old ones to decode, the new ones to encode) or the block's.
template <Decay kDecay, bool kRank1>
void step_block(const Books& books, const Lanes& c, bool small1, float* __restrict p, const float* __restrict g,
                uint8_t* __restrict m_codes, float* __restrict m_scale, uint8_t* __restrict v_codes,
                float* __restrict v_scale, const BlockScales& old_scales, const BlockScales& new_scales, int64_t n) {
  alignas(64) float m_new[kBlock], v_new[kBlock];
  const __m512 m_map = _mm512_load_ps(books.m.values), v_map = _mm512_load_ps(books.v);
  const __m512 m_bounds = _mm512_load_ps(books.m.bounds);
  const __m512 m_scales = _mm512_set1_ps(*m_scale), zero = _mm512_setzero_ps();
  const __m512 v_scales = kRank1 ? zero : _mm512_set1_ps(*v_scale);
  __m512 m_largest = zero, v_largest = zero;
  __mmask16 m_nan = 0, v_nan = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = lanes(n - i);
    __m512 param = load(p + i, n - i);
    const __m512 grad = gradient<kDecay>(c, g + i, param, n - i);
    if constexpr (kDecay == Decay::kDecoupled) param = _mm512_mul_ps(param, c.decay);
    const __m512 m = _mm512_mul_ps(_mm512_permutexvar_ps(load_codes(m_codes + i / 2, n - i), m_map), m_scales);
    const __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(load_codes(v_codes + i / 2, n - i), v_map),
                                   kRank1 ? scale_lanes(old_scales, i, n - i) : v_scales);
    const __m512 m1 = _mm512_fmadd_ps(c.coeff1, _mm512_sub_ps(grad, m), small1 ? m : grad);
    const __m512 v1 = second_moment(c, grad, v);
    const __m512 denominator = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v1), c.bc2), c.eps);
    param = _mm512_add_ps(param, _mm512_div_ps(_mm512_mul_ps(c.step, m1), denominator));
    store(p + i, param, n - i);
    _mm512_store_ps(m_new + i, m1);
    // max(a, b) is b when a is NaN: NaNs are counted apart and leave the maxima alone
    m_largest = _mm512_mask_max_ps(m_largest, mask, _mm512_abs_ps(m1), m_largest);
    m_nan |= _mm512_mask_cmp_ps_mask(mask, m1, m1, _CMP_UNORD_Q);
    if constexpr (kRank1) {
      const __m512 y = _mm512_div_ps(v1, clamp_tiny(scale_lanes(new_scales, i, n - i)));
      store_codes(v_codes + i / 2, _mm512_maskz_mov_epi32(mask, linear_codes(y)), n - i);
    } else {
      _mm512_store_ps(v_new + i, v1);
      v_largest = _mm512_mask_max_ps(v_largest, mask, _mm512_abs_ps(v1), v_largest);
      v_nan |= _mm512_mask_cmp_ps_mask(mask, v1, v1, _CMP_UNORD_Q);
    }
  }
  encode_block([&](__m512 y) { return nearest_codes(m_bounds, y); }, m_new, n, m_nan != 0,
               _mm512_reduce_max_ps(m_largest), m_codes, m_scale);
  if constexpr (!kRank1) {
    encode_block([](__m512 y) { return linear_codes(y); }, v_new, n, v_nan != 0, _mm512_reduce_max_ps(v_largest),
                 v_codes, v_scale);
  }
}

#else  // the same arithmetic one value at a time

struct Lanes {
  float sign, coeff1, beta2, one_minus_beta2, eps, weight_decay, decay, step, bc2;
  Lanes(const Scalars& s, float minus_step, float bc2_sqrt)
      : sign(s.sign), coeff1(s.coeff1), beta2(s.beta2), one_minus_beta2(s.one_minus_beta2), eps(s.eps),
        weight_decay(s.weight_decay), decay(s.decay), step(minus_step), bc2(bc2_sqrt) {}
};

inline int code_at(const uint8_t* packed, int64_t i) { return (packed[i / 2] >> (4 * (i % 2))) & 15; }

inline void store_code(uint8_t* packed, int64_t i, int code) {  // the other half of the byte kept
  uint8_t& byte = packed[i / 2];
  byte = i % 2 ? static_cast<uint8_t>((byte & 15) | (code << 4)) : static_cast<uint8_t>((byte & 0xf0) | code);
}

// The number of midpoints < y, by binary search over the 15; NaN: 15.
inline int nearest_code(const float* bounds, float y) {
  int code = 0;
  for (int step = 8; step > 0; step /= 2) code += bounds[code + step - 1] < y ? step : 0;
  return y == y ? code : 15;
}

inline int linear_code(float y) {  // see linear_codes
  const float t = (y < 1.0f ? y : 1.0f) * 32.0f;  // NaN: 1
  return std::max(static_cast<int>(std::ceil((t - 3.0f) * 0.5f)), 0);
}

inline float scale_at(const BlockScales& scales, int64_t i) {  // NaN if either is NaN
  const float x = scales.values[i];
  return (x != x || scales.outer != scales.outer) ? x + scales.outer : std::min(scales.outer, x);
}

inline float clamp_tiny(float scale) {  // clamp(min=tiny), a NaN kept
  const float tiny = std::numeric_limits<float>::min();
  return scale < tiny ? tiny : scale;
}

template <Decay kDecay>
inline float gradient(const Lanes& c, float g, float param) {
  const float grad = g * c.sign;
  if constexpr (kDecay == Decay::kCoupled) return std::fma(param, c.weight_decay, grad);
  return grad;
}

inline float second_moment(const Lanes& c, float grad, float v) {
  return std::fma(c.one_minus_beta2 * grad, grad, v * c.beta2);
}

template <typename Nearest>
inline void encode_block(Nearest nearest, const float* values, int64_t n, bool has_nan, float largest,
                         uint8_t* __restrict codes, float* __restrict scale) {
  *scale = has_nan ? bits_float(kQuietNanBits) : largest;
  const float divisor = clamp_tiny(*scale);
  for (int64_t i = 0; i < n; ++i) store_code(codes, i, nearest(values[i] / divisor));
  if (n % 2) codes[n / 2] &= 15;  // an odd count's last high half is 0
}

template <Decay kDecay>
void second_moments_block(const Books& books, const Lanes& c, const float* p, const float* g,
                          const uint8_t* v_codes, const BlockScales& old_scales, int64_t n, float* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    const float grad = gradient<kDecay>(c, g[i], kDecay == Decay::kCoupled ? p[i] : 0.0f);
    out[i] = second_moment(c, grad, books.v[code_at(v_codes, i)] * scale_at(old_scales, i));
  }
}

template <Decay kDecay, bool kRank1>
void step_block(const Books& books, const Lanes& c, bool small1, float* __restrict p, const float* __restrict g,
                uint8_t* __restrict m_codes, float* __restrict m_scale, uint8_t* __restrict v_codes,
                float* __restrict v_scale, const BlockScales& old_scales, const BlockScales& new_scales, int64_t n) {
  float m_new[kBlock], v_new[kBlock];
  float m_largest = 0.0f, v_largest = 0.0f;
  bool m_nan = false, v_nan = false;
  for (int64_t i = 0; i < n; ++i) {
    float param = p[i];
    const float grad = gradient<kDecay>(c, g[i], param);
    if constexpr (kDecay == Decay::kDecoupled) param = param * c.decay;
    const float m = books.m.values[code_at(m_codes, i)] * *m_scale;
    const float v = books.v[code_at(v_codes, i)] * (kRank1 ? scale_at(old_scales, i) : *v_scale);
    const float m1 = std::fma(c.coeff1, grad - m, small1 ? m : grad);
    const float v1 = second_moment(c, grad, v);
    p[i] = param + (c.step * m1) / (std::sqrt(v1) / c.bc2 + c.eps);
    m_new[i] = m1;
    m_largest = std::fabs(m1) > m_largest ? std::fabs(m1) : m_largest;
    m_nan |= m1 != m1;
    if constexpr (kRank1) {
      store_code(v_codes, i, linear_code(v1 / clamp_tiny(scale_at(new_scales, i))));
    } else {
      v_new[i] = v1;
      v_largest = std::fabs(v1) > v_largest ? std::fabs(v1) : v_largest;
      v_nan |= v1 != v1;
    }
  }
  if constexpr (kRank1) {
    if (n % 2) v_codes[n / 2] &= 15;
  }
  encode_block([&](float y) { return nearest_code(books.m.bounds, y); }, m_new, n, m_nan, m_largest, m_codes,
               m_scale);
  if constexpr (!kRank1) encode_block(linear_code, v_new, n, v_nan, v_largest, v_codes, v_scale);
}

#endif

// Pass 1 over one tile (n values from flat index `first`) of a rank-1 tensor: its new v's partial maxima.
template <Decay kDecay>
void maxima_tile(const Books& books, const Lanes& c, const Rank1& layout, const float* old_maxima, const float* p,
                 const float* g, const uint8_t* v_codes, int64_t first, int64_t n, uint32_t* partial) {
  alignas(64) float buffer[kBlock], v[kBlock];
  Rows rows(layout, first);
  Rows::Outer outer;
  for (int64_t start = first; start < first + n; start += kBlock) {
    const int64_t count = std::min(kBlock, first + n - start);
    const BlockScales scales = rows.scales(old_maxima, outer, count, buffer);
    second_moments_block<kDecay>(books, c, p + start, g + start, v_codes + start / 2, scales, count, v);
    rows.gather_maxima(v, count, partial);
    rows.advance(count);
  }
}

// Pass 2 over one tile of a tensor: the step, block by block.
template <Decay kDecay, bool kRank1>
void step_tile(const Books& books, const Lanes& c, bool small1, const Rank1* layout, const float* old_maxima,
               const float* new_maxima, float* p, const float* g, uint8_t* m_codes, float* m_scales, uint8_t* v_codes,
               float* v_scales, int64_t first, int64_t n) {
  alignas(64) float old_buffer[kBlock], new_buffer[kBlock];
  std::optional<Rows> rows;
  Rows::Outer old_outer, new_outer;
  if constexpr (kRank1) rows.emplace(*layout, first);
  BlockScales old_scales{nullptr, 0.0f}, new_scales{nullptr, 0.0f};
  for (int64_t start = first; start < first + n; start += kBlock) {
    const int64_t count = std::min(kBlock, first + n - start), block = start / kBlock;
    if constexpr (kRank1) {
      old_scales = rows->scales(old_maxima, old_outer, count, old_buffer);
      new_scales = rows->scales(new_maxima, new_outer, count, new_buffer);
      rows->advance(count);
    }
    step_block<kDecay, kRank1>(books, c, small1, p + start, g + start, m_codes + start / 2, m_scales + block,
                               v_codes + start / 2, kRank1 ? nullptr : v_scales + block, old_scales, new_scales,
                               count);
  }
}

bool is_rank1(const at::Tensor& p) { return p.dim() >= 2 && p.numel() > 0; }

// One call's tensors and scalars; the tensors are stepped in rounds of consecutive ones.
struct Step {
  const std::vector<at::Tensor>& params;
  const std::vector<at::Tensor>& grads;
  const std::vector<at::Tensor>& m_codes;
  const std::vector<at::Tensor>& m_scales;
  const std::vector<at::Tensor>& v_codes;
  const std::vector<at::Tensor>& v_scales;
  const std::vector<double>& minus_step_sizes;
  const std::vector<double>& bias_correction2_sqrts;
  const Books& books;
  const Scalars& s;

  Lanes lanes(size_t k) const {
    return Lanes(s, static_cast<float>(minus_step_sizes[k]), static_cast<float>(bias_correction2_sqrts[k]));
  }

  // Tensors k0 .. k1 - 1: pass 1 over the rank-1 ones, then pass 2 over all of them.
  template <Decay kDecay>
  void round(size_t k0, size_t k1) const {
    std::vector<int64_t> first_tile{0};   // of each tensor in pass 2
    std::vector<Rank1> layouts;           // the rank-1 tensors, in order
    std::vector<size_t> rank1_tensors;    // their indices among params
    std::vector<int64_t> rank1_tile{0};   // their first tile in pass 1
    std::vector<int64_t> maxima_start{0};  // where their new maxima start in `fresh`
    std::vector<int64_t> layout_of;       // of each tensor, its rank-1 layout's index or -1
    for (size_t k = k0; k < k1; ++k) {
      const int64_t tiles = ceil_div(params[k].numel(), kTile);
      first_tile.push_back(first_tile.back() + tiles);
      layout_of.push_back(is_rank1(params[k]) ? static_cast<int64_t>(layouts.size()) : -1);
      if (is_rank1(params[k])) {
        layouts.emplace_back(params[k].sizes());
        rank1_tensors.push_back(k);
        rank1_tile.push_back(rank1_tile.back() + tiles);
        maxima_start.push_back(maxima_start.back() + layouts.back().count);
      }
    }

    // Pass 1: the new v's maxima of the rank-1 tensors, as bit patterns (see Rows::gather_maxima).
    std::vector<uint32_t> fresh_bits(maxima_start.back(), 0);
    std::mutex merge;
    at::parallel_for(0, rank1_tile.back(), 1, [&](int64_t begin, int64_t end) {
      const size_t j_first = tensor_of(rank1_tile, begin), j_last = tensor_of(rank1_tile, end - 1);
      std::vector<uint32_t> partial(maxima_start[j_last + 1] - maxima_start[j_first], 0);
      visit_tiles(rank1_tile, kTile, begin, end, [&](size_t j, int64_t first) {
        const size_t k = rank1_tensors[j];
        maxima_tile<kDecay>(books, lanes(k), layouts[j], v_scales[k].data_ptr<float>(), params[k].data_ptr<float>(),
                            grads[k].data_ptr<float>(), v_codes[k].data_ptr<uint8_t>(), first,
                            std::min(kTile, params[k].numel() - first),
                            partial.data() + (maxima_start[j] - maxima_start[j_first]));
      });
      const std::lock_guard<std::mutex> lock(merge);
      uint32_t* target = fresh_bits.data() + maxima_start[j_first];
      for (size_t i = 0; i < partial.size(); ++i) target[i] = std::max(target[i], partial[i]);
    });
    std::vector<float> fresh(fresh_bits.size());
    std::transform(fresh_bits.begin(), fresh_bits.end(), fresh.begin(), maximum_value);

    // Pass 2: the step; a rank-1 tensor's v decoded on its old maxima, encoded on the new.
    parallel_tiles(first_tile, kTile, [&](size_t i, int64_t first) {
      const size_t k = k0 + i;
      const int64_t j = layout_of[i];
      const auto step_tile_of = j >= 0 ? step_tile<kDecay, true> : step_tile<kDecay, false>;
      step_tile_of(books, lanes(k), s.small1, j >= 0 ? &layouts[j] : nullptr, v_scales[k].data_ptr<float>(),
                   j >= 0 ? fresh.data() + maxima_start[j] : nullptr, params[k].data_ptr<float>(),
                   grads[k].data_ptr<float>(), m_codes[k].data_ptr<uint8_t>(), m_scales[k].data_ptr<float>(),
                   v_codes[k].data_ptr<uint8_t>(), v_scales[k].data_ptr<float>(), first,
                   std::min(kTile, params[k].numel() - first));
    });
    for (size_t j = 0; j < layouts.size(); ++j) {  // the new maxima replace the old once nothing decodes on them
      std::memcpy(v_scales[rank1_tensors[j]].data_ptr<float>(), fresh.data() + maxima_start[j],
                  sizeof(float) * layouts[j].count);
    }
  }
};

void adam_4bit_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                std::vector<at::Tensor> exp_avg_scales, std::vector<at::Tensor> exp_avg_sqs,
                std::vector<at::Tensor> exp_avg_sq_scales, const at::Tensor& signed_map,
                const at::Tensor& unsigned_map, std::vector<double> minus_step_sizes,
                std::vector<double> bias_correction2_sqrts, double beta1, double beta2, double eps,
                double weight_decay, double lr, bool decoupled, bool maximize) {
  constexpr const char* kKernel = "adam_4bit_";
  const size_t count = params.size();
  check_lengths(kKernel, count, {grads.size(), exp_avgs.size(), exp_avg_scales.size(), exp_avg_sqs.size(),
                                 exp_avg_sq_scales.size(), minus_step_sizes.size(), bias_correction2_sqrts.size()});
  for (size_t k = 0; k < count; ++k) {
    const at::Tensor& p = params[k];
    check_parameter(kKernel, p, grads[k]);
    const int64_t blocks = ceil_div(p.numel(), kBlock);
    for (const at::Tensor* codes : {&exp_avgs[k], &exp_avg_sqs[k]}) {
      check_state(kKernel, *codes, at::kByte, ceil_div(p.numel(), 2),
                  "moment codes must be contiguous uint8 tensors of ceil(n / 2) bytes");
    }
    check_state(kKernel, exp_avg_scales[k], at::kFloat, blocks,
                "the first moment's scales must be contiguous float32 tensors, one per 128 values");
    check_state(kKernel, exp_avg_sq_scales[k], at::kFloat, is_rank1(p) ? Rank1(p.sizes()).count : blocks,
                "the second moment's scales must be contiguous float32 tensors: the rank-1 maxima (sum of the "
                "shape) for two or more dimensions, else one per 128 values");
  }
  const Books books(signed_map, unsigned_map);
  const Scalars s = step_scalars(beta1, beta2, eps, weight_decay, lr, maximize);
  const Step step{params, grads, exp_avgs, exp_avg_scales, exp_avg_sqs, exp_avg_sq_scales, minus_step_sizes,
                  bias_correction2_sqrts, books, s};
  with_decay_rule(decay_rule(weight_decay, decoupled), [&](auto rule) {
    for (size_t k0 = 0, k1; k0 < count; k0 = k1) {  // rounds of at most kRound values (a larger tensor alone)
      int64_t values = params[k0].numel();
      for (k1 = k0 + 1; k1 < count && values + params[k1].numel() <= kRound; ++k1) values += params[k1].numel();
      step.round<rule>(k0, k1);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("adam_4bit_", &adam_4bit_,
             "Adam/AdamW step of contiguous float32 CPU parameters with 4-bit moments (Li et al. 2023), in place");
}
