// Adam/AdamW with 8-bit block-wise moments (Dettmers et al. 2021, arXiv:2110.02861) in one pass
// over memory on the CPU. Per block of 256 values it reads the parameter, the gradient, the
// uint8 codes of m and v and their two fp32 scales once, and writes the parameter, the codes
// and the scales once: 16 bytes per value against about 60 for the same step through
// dequantise / torch._foreach_* update / quantise.
//
// It computes bit for bit what gradwise's generic path computes (Adam._foreach_update on the
// decoded moments, then state_formats.quantize_8bit), so a run may switch between the two:
//   decode   m = map_s[code] * absmax_m            (one float product, as dequantize_8bit)
//   moments  m = lerp(m, g, 1 - beta1)             (ATen's vectorised lerp: one fma)
//            v = fma((1 - beta2) * g, g, v * beta2) (ATen's vectorised mul_, then addcmul_)
//   update   p = p + (-step_size * m) / (sqrt(v) / sqrt(bc2) + eps)   (ATen's addcdiv_; the
//            square roots are torch.sqrt's own, called on a cache-resident tile, see adam_tile)
//   encode   the index of the first midpoint >= m / max(absmax, tiny), clamped to [-1, 1]
//            (torch.bucketize, right=False; NaN gives 255 as there).
// Scalars arrive as doubles and are rounded to float once, as ATen rounds a Python scalar to
// the kernel's opmath type. The translation unit is built with -ffp-contract=off, so the only
// fused multiply-adds are the explicit std::fma calls, where ATen's AVX2/AVX-512 kernels use
// one (on a CPU without FMA ATen's kernels round twice and the two paths differ in the last bit).
//
// Encoding without a binary search: the midpoints are cut by a table indexed by the top 15
// bits of |y| (8 exponent bits, 7 fraction bits), each cell holding the number of midpoints
// below it; the table is built so that at most one midpoint falls inside a cell, so one more
// comparison gives the exact index. Threads split tiles of 64 blocks of all tensors
// (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;
constexpr int64_t kTileBlocks = 64;  // blocks per task: 16384 values
constexpr int64_t kTile = kTileBlocks * kBlock;
// Table cells: the 15 bits above the 16 low fraction bits of |y|'s float, from 2^-30 to 1.0.
// Below 2^-30 (far under the smallest nonzero code, 3.25e-7 / 2) everything shares cell 0.
constexpr uint32_t kKeyShift = 16;
constexpr uint32_t kKeyLow = (127u - 30u) << 7;  // key of 2^-30
constexpr uint32_t kKeyHigh = 0x3f80u;           // key of 1.0
constexpr int kCells = kKeyHigh - kKeyLow + 1;

inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

inline float bits_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// One dynamic map (signed or unsigned): its values, its 255 midpoints (+inf at 255) and the
// cell table: kCells entries for positive arguments, then kCells for negative ones.
struct Codebook {
  float values[256];
  float bounds[256];
  int32_t cells[2 * kCells];

  explicit Codebook(const at::Tensor& map) {
    TORCH_CHECK(map.numel() == 256 && map.scalar_type() == at::kFloat && map.is_contiguous() && map.device().is_cpu(),
                "adam_8bit_: a map is 256 contiguous float32 values on the CPU");
    std::memcpy(values, map.data_ptr<float>(), sizeof(values));
    for (int i = 0; i < 255; ++i) bounds[i] = (values[i] + values[i + 1]) / 2.0f;  // as torch: add, then halve
    bounds[255] = std::numeric_limits<float>::infinity();
    for (int cell = 0; cell < kCells; ++cell) {
      const uint32_t key = kKeyLow + cell;
      const float low = cell == 0 ? 0.0f : bits_float(key << kKeyShift);
      const float high = key == kKeyHigh ? 1.0f : bits_float((key << kKeyShift) | ((1u << kKeyShift) - 1));
      cells[cell] = below(low);
      cells[kCells + cell] = below(-high);
      TORCH_CHECK(below(high) - cells[cell] <= 1 && below(-low) - cells[kCells + cell] <= 1,
                  "adam_8bit_: the map's midpoints are closer than the encoding table's cells");
    }
  }

  // How many midpoints are < y (torch.bucketize's index for y, right=False).
  int32_t below(float y) const {
    return static_cast<int32_t>(std::lower_bound(bounds, bounds + 255, y) - bounds);
  }

};

struct Scalars {
  float weight1, coeff1;  // lerp's weight 1 - beta1 and the coefficient ATen uses with it
  bool small1;            // |weight| < 0.5: lerp starts from m, else from g
  float beta2, one_minus_beta2, eps, weight_decay, decay;
  bool has_decay, maximize, decoupled;
};

// Encode one block's float values (n of them; the padding of a last short block is zero and
// changes no absmax) into codes and a scale, as state_formats.quantize_8bit.
inline void encode_block(const Codebook& book, const float* __restrict values, int64_t n, bool has_nan,
                         float largest, uint8_t* __restrict codes, float* __restrict absmax) {
  const float scale_stored = has_nan ? std::numeric_limits<float>::quiet_NaN() : largest;
  *absmax = scale_stored;
  const float tiny = std::numeric_limits<float>::min();
  const float scale = scale_stored < tiny ? tiny : scale_stored;  // clamp(min=tiny), NaN kept
  const int32_t* __restrict cells = book.cells;
  const float* __restrict bounds = book.bounds;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float y = values[i] / scale;
    const float clamped = std::min(std::max(y, -1.0f), 1.0f);  // NaN is decided below
    const uint32_t bits = __builtin_bit_cast(uint32_t, clamped);
    uint32_t key = (bits & 0x7fffffffu) >> kKeyShift;
    key = key < kKeyLow ? kKeyLow : (key > kKeyHigh ? kKeyHigh : key);
    int32_t code = cells[(key - kKeyLow) + (bits >> 31) * kCells];
    code += bounds[code] < clamped;  // the one midpoint the cell may hold
    codes[i] = static_cast<uint8_t>(y == y ? code : 255);  // NaN: 255, as torch.bucketize
  }
}

// One tile: up to kTileBlocks blocks of one tensor (n values from the tile's first). Pass 1
// decodes and updates the moments into float buffers; the square roots of v come from ATen's
// own torch.sqrt on the whole buffer (for float32 it calls MKL's vector math, which is not
// correctly rounded: about one root in five differs from std::sqrt in the last bit), so they are
// the generic path's bit for bit; pass 2, block by block, updates the parameter and encodes.
// The buffers (3 x 64 KiB) stay in the L2 cache between the passes.
enum class Decay { kNone, kDecoupled, kCoupled };

template <Decay kDecay>
void adam_tile(const Codebook& signed_book, const Codebook& unsigned_book, const Scalars& s, float minus_step,
               float bc2_sqrt, float* __restrict p, const float* __restrict g, uint8_t* __restrict m_codes,
               float* __restrict m_absmax, uint8_t* __restrict v_codes, float* __restrict v_absmax, int64_t n) {
  thread_local std::vector<float> buffers(3 * kTile);
  float* __restrict m_new = buffers.data();
  float* __restrict v_new = m_new + kTile;
  float* __restrict roots = v_new + kTile;
  const float* __restrict m_values = signed_book.values;
  const float* __restrict v_values = unsigned_book.values;
  const float sign = s.maximize ? -1.0f : 1.0f;  // exact: -g
  const float coeff1 = s.coeff1, beta2 = s.beta2, one_minus_beta2 = s.one_minus_beta2;
  const float decay = s.decay, weight_decay = s.weight_decay;
  const bool small1 = s.small1;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t stop = std::min(n, start + kBlock);
    const float m_scale = m_absmax[start / kBlock], v_scale = v_absmax[start / kBlock];
#pragma omp simd
    for (int64_t i = start; i < stop; ++i) {
      float grad = g[i] * sign;
      if constexpr (kDecay == Decay::kDecoupled) p[i] = p[i] * decay;
      if constexpr (kDecay == Decay::kCoupled) grad = std::fma(p[i], weight_decay, grad);
      const float m = m_values[m_codes[i]] * m_scale;
      const float v = v_values[v_codes[i]] * v_scale;
      m_new[i] = std::fma(coeff1, grad - m, small1 ? m : grad);
      v_new[i] = std::fma(one_minus_beta2 * grad, grad, v * beta2);
    }
  }
  at::Tensor roots_tensor = at::from_blob(roots, {n}, at::TensorOptions().dtype(at::kFloat));
  at::sqrt_out(roots_tensor, at::from_blob(v_new, {n}, at::TensorOptions().dtype(at::kFloat)));
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t stop = std::min(n, start + kBlock);
    float m_largest = 0.0f, v_largest = 0.0f;
    int m_nan = 0, v_nan = 0;
#pragma omp simd reduction(max : m_largest, v_largest) reduction(| : m_nan, v_nan)
    for (int64_t i = start; i < stop; ++i) {
      const float m = m_new[i], v = v_new[i];
      p[i] = p[i] + (minus_step * m) / (roots[i] / bc2_sqrt + s.eps);
      m_largest = std::max(m_largest, std::fabs(m));
      v_largest = std::max(v_largest, std::fabs(v));
      m_nan |= m != m;
      v_nan |= v != v;
    }
    const int64_t block = start / kBlock;
    encode_block(signed_book, m_new + start, stop - start, m_nan, m_largest, m_codes + start, m_absmax + block);
    encode_block(unsigned_book, v_new + start, stop - start, v_nan, v_largest, v_codes + start, v_absmax + block);
  }
}

void adam_8bit_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                std::vector<at::Tensor> exp_avg_absmaxes, std::vector<at::Tensor> exp_avg_sqs,
                std::vector<at::Tensor> exp_avg_sq_absmaxes, const at::Tensor& signed_map,
                const at::Tensor& unsigned_map, std::vector<double> minus_step_sizes,
                std::vector<double> bias_correction2_sqrts, double beta1, double beta2, double eps,
                double weight_decay, double lr, bool decoupled, bool maximize) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_absmaxes.size() == count &&
                  exp_avg_sqs.size() == count && exp_avg_sq_absmaxes.size() == count &&
                  minus_step_sizes.size() == count && bias_correction2_sqrts.size() == count,
              "adam_8bit_: lists differ in length");
  std::vector<int64_t> first_tile(count + 1, 0);
  for (size_t k = 0; k < count; ++k) {
    const at::Tensor& p = params[k];
    const int64_t numel = p.numel(), blocks = (numel + kBlock - 1) / kBlock;
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.is_contiguous(),
                "adam_8bit_: parameters must be contiguous float32 CPU tensors");
    TORCH_CHECK(grads[k].scalar_type() == at::kFloat && grads[k].is_contiguous() && grads[k].numel() == numel,
                "adam_8bit_: a gradient differs from its parameter");
    for (const at::Tensor* codes : {&exp_avgs[k], &exp_avg_sqs[k]}) {
      TORCH_CHECK(codes->scalar_type() == at::kByte && codes->is_contiguous() && codes->numel() == numel,
                  "adam_8bit_: moment codes must be contiguous uint8 tensors of the parameter's size");
    }
    for (const at::Tensor* scales : {&exp_avg_absmaxes[k], &exp_avg_sq_absmaxes[k]}) {
      TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() && scales->numel() == blocks,
                  "adam_8bit_: block scales must be contiguous float32 tensors, one per 256 values");
    }
    first_tile[k + 1] = first_tile[k] + (blocks + kTileBlocks - 1) / kTileBlocks;
  }
  const Codebook signed_book(signed_map), unsigned_book(unsigned_map);
  Scalars s;
  s.weight1 = static_cast<float>(1.0 - beta1);
  s.small1 = std::fabs(s.weight1) < 0.5f;
  s.coeff1 = s.small1 ? s.weight1 : s.weight1 - 1.0f;
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.weight_decay = static_cast<float>(weight_decay);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.has_decay = weight_decay != 0.0;
  s.maximize = maximize;
  s.decoupled = decoupled;
  at::parallel_for(0, first_tile[count], 1, [&](int64_t begin, int64_t end) {
    size_t k = std::upper_bound(first_tile.begin(), first_tile.end(), begin) - first_tile.begin() - 1;
    for (int64_t tile = begin; tile < end; ++tile) {
      while (tile >= first_tile[k + 1]) ++k;
      const int64_t start = (tile - first_tile[k]) * kTile, block = start / kBlock;
      const auto tile_update = !s.has_decay ? adam_tile<Decay::kNone>
                               : s.decoupled ? adam_tile<Decay::kDecoupled> : adam_tile<Decay::kCoupled>;
      tile_update(signed_book, unsigned_book, s, static_cast<float>(minus_step_sizes[k]),
                  static_cast<float>(bias_correction2_sqrts[k]), params[k].data_ptr<float>() + start,
                  grads[k].data_ptr<float>() + start, exp_avgs[k].data_ptr<uint8_t>() + start,
                  exp_avg_absmaxes[k].data_ptr<float>() + block, exp_avg_sqs[k].data_ptr<uint8_t>() + start,
                  exp_avg_sq_absmaxes[k].data_ptr<float>() + block, std::min(kTile, params[k].numel() - start));
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("adam_8bit_", &adam_8bit_,
             "Adam/AdamW step of contiguous float32 CPU parameters with 8-bit block-wise moments, in place");
}
