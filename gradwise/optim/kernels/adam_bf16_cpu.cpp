// Adam/AdamW with bfloat16 moments (state_format "bf16" and "bf16-sr") in one pass over memory
// on the CPU: per value it reads the parameter, the gradient and the two bf16 moments once and
// writes the parameter and the moments once (12 bytes per value), where the generic path decodes
// the moments into float32 working copies, runs the update and encodes them back.
//
// The arithmetic is the generic path's (Adam._foreach_update on float32 moments) operation for
// operation, as in adam_8bit_cpu.cpp (the same fma for m's lerp and v's addcmul, the same division
// order), except the square root: the CPU's correctly rounded one where torch.sqrt on float32 CPU
// tensors calls MKL's. Decoding a bf16 moment is exact; encoding is
//   "bf16":    round to nearest even, as torch's float -> bfloat16 conversion (NaN stays NaN);
//   "bf16-sr": stochastic rounding, a 16-bit noise added to the 16 bits bf16 drops, then truncated,
//              as state_formats.stochastic_round_bf16, non-finite values kept; the noise comes from
//              a counter-based hash (SplitMix64 of the write's seed and the value's index), not
//              from torch's generator as in the generic path: the same distribution, other draws.
// Threads split tiles of 16384 values of all tensors (at::parallel_for).
#include "adam_cpu_common.h"

namespace {

using namespace adam_cpu;

constexpr int64_t kTile = 16384;

inline float bf16_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t round_nearest_even(float x) {
  if (x != x) return UINT16_C(0x7FC0);  // c10::BFloat16's NaN
  const uint32_t bits = float_bits(x);
  return static_cast<uint16_t>((bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1u)) >> 16);
}

// The index-th output of SplitMix64 (Steele et al. 2014) started at `seed`: a counter-based draw.
inline uint64_t splitmix64(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * UINT64_C(0x9E3779B97F4A7C15);
  z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
  z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
  return z ^ (z >> 31);
}

inline uint16_t round_stochastic(float x, uint64_t seed, int64_t index) {
  if (!std::isfinite(x)) return round_nearest_even(x);  // infinities exact, NaN stays NaN
  const uint32_t noise = static_cast<uint32_t>(splitmix64(seed, static_cast<uint64_t>(index)) >> 48);
  return static_cast<uint16_t>((float_bits(x) + noise) >> 16);
}

// n values of one tensor, the first at index `first` of the tensor (the noise's counter).
template <Decay kDecay, bool kStochastic>
void adam_tile(const Scalars& s, float minus_step, float bc2_sqrt, float* __restrict p, const float* __restrict g,
               uint16_t* __restrict m_store, uint16_t* __restrict v_store, int64_t n, int64_t first, uint64_t m_seed,
               uint64_t v_seed) {
  // locals, not loads through `s` in the loop (which the compiler cannot prove unaliased): vectorised
  const float sign = s.sign;
  const float decay = s.decay, weight_decay = s.weight_decay, coeff1 = s.coeff1, beta2 = s.beta2;
  const float one_minus_beta2 = s.one_minus_beta2, eps = s.eps;
  const float small1 = s.small1 ? 1.0f : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    float grad = g[i] * sign;
    float param = p[i];
    if constexpr (kDecay == Decay::kDecoupled) param = param * decay;
    if constexpr (kDecay == Decay::kCoupled) grad = std::fma(param, weight_decay, grad);
    const float m = bf16_float(m_store[i]);
    const float v = bf16_float(v_store[i]);
    const float m1 = std::fma(coeff1, grad - m, small1 != 0.0f ? m : grad);  // ATen's lerp
    const float v1 = std::fma(one_minus_beta2 * grad, grad, v * beta2);
    p[i] = param + (minus_step * m1) / (std::sqrt(v1) / bc2_sqrt + eps);
    if constexpr (kStochastic) {
      m_store[i] = round_stochastic(m1, m_seed, first + i);
      v_store[i] = round_stochastic(v1, v_seed, first + i);
    } else {
      m_store[i] = round_nearest_even(m1);
      v_store[i] = round_nearest_even(v1);
    }
  }
}

void adam_bf16_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                std::vector<at::Tensor> exp_avg_sqs, std::vector<double> minus_step_sizes,
                std::vector<double> bias_correction2_sqrts, double beta1, double beta2, double eps,
                double weight_decay, double lr, bool decoupled, bool maximize, bool stochastic,
                std::vector<int64_t> seeds) {
  constexpr const char* kKernel = "adam_bf16_";
  const size_t count = params.size();
  check_lengths(kKernel, count, {grads.size(), exp_avgs.size(), exp_avg_sqs.size(), minus_step_sizes.size(),
                                 bias_correction2_sqrts.size()});
  TORCH_CHECK(!stochastic || seeds.size() == 2 * count, kKernel, ": lists differ in length");
  for (size_t k = 0; k < count; ++k) {
    check_parameter(kKernel, params[k], grads[k]);
    for (const at::Tensor* moment : {&exp_avgs[k], &exp_avg_sqs[k]}) {
      check_state(kKernel, *moment, at::kBFloat16, params[k].numel(),
                  "moments must be contiguous bfloat16 tensors of the parameter's size");
    }
  }
  const Scalars s = step_scalars(beta1, beta2, eps, weight_decay, lr, maximize);
  with_decay_rule(decay_rule(weight_decay, decoupled), [&](auto rule) {
    parallel_tiles(first_tiles(params, kTile), kTile, [&](size_t k, int64_t start) {
      const int64_t n = std::min(kTile, params[k].numel() - start);
      auto* m = reinterpret_cast<uint16_t*>(exp_avgs[k].data_ptr<at::BFloat16>()) + start;
      auto* v = reinterpret_cast<uint16_t*>(exp_avg_sqs[k].data_ptr<at::BFloat16>()) + start;
      float* p = params[k].data_ptr<float>() + start;
      const float* g = grads[k].data_ptr<float>() + start;
      const float step = static_cast<float>(minus_step_sizes[k]), bc2 = static_cast<float>(bias_correction2_sqrts[k]);
      if (stochastic) {
        adam_tile<rule, true>(s, step, bc2, p, g, m, v, n, start, static_cast<uint64_t>(seeds[2 * k]),
                              static_cast<uint64_t>(seeds[2 * k + 1]));
      } else {
        adam_tile<rule, false>(s, step, bc2, p, g, m, v, n, start, 0, 0);
      }
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("adam_bf16_", &adam_bf16_,
             "Adam/AdamW step of contiguous float32 CPU parameters with bfloat16 moments, in place");
}
