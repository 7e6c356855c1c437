// What the fused CPU Adam/AdamW kernels (adam_8bit_cpu.cpp, adam_4bit_cpu.cpp, adam_bf16_cpu.cpp)
// share: the step's scalars rounded to float, the weight-decay rule, the checks of their arguments,
// and the split of all tensors into tiles for the threads. Each kernel is an extension of its own
// that includes this file; the loader (__init__.py) rebuilds every one of them when it changes.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

namespace adam_cpu {

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

inline int64_t ceil_div(int64_t n, int64_t d) { return (n + d - 1) / d; }

enum class Decay { kNone, kDecoupled, kCoupled };

inline Decay decay_rule(double weight_decay, bool decoupled) {
  return weight_decay == 0.0 ? Decay::kNone : decoupled ? Decay::kDecoupled : Decay::kCoupled;
}

// visit(rule) with the rule as a compile-time constant (std::integral_constant), so that each
// kernel instantiates its loops once per rule instead of branching per value.
template <typename Visit>
void with_decay_rule(Decay rule, Visit&& visit) {
  switch (rule) {
    case Decay::kNone:
      visit(std::integral_constant<Decay, Decay::kNone>());
      break;
    case Decay::kDecoupled:
      visit(std::integral_constant<Decay, Decay::kDecoupled>());
      break;
    case Decay::kCoupled:
      visit(std::integral_constant<Decay, Decay::kCoupled>());
      break;
  }
}

// The step's scalars: they arrive as doubles and are rounded to float once, as ATen rounds a
// Python scalar to the kernel's opmath type.
struct Scalars {
  float coeff1;  // lerp's coefficient: 1 - beta1, or (1 - beta1) - 1 when lerp starts from g
  bool small1;   // |1 - beta1| < 0.5: lerp starts from m, else from g
  float beta2, one_minus_beta2, eps, weight_decay;
  float decay;  // decoupled decay's factor, 1 - lr * weight_decay
  float sign;   // -1 to maximize (g * -1 is exactly -g)
};

inline Scalars step_scalars(double beta1, double beta2, double eps, double weight_decay, double lr, bool maximize) {
  Scalars s;
  const float weight1 = static_cast<float>(1.0 - beta1);
  s.small1 = std::fabs(weight1) < 0.5f;
  s.coeff1 = s.small1 ? weight1 : weight1 - 1.0f;
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.weight_decay = static_cast<float>(weight_decay);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.sign = maximize ? -1.0f : 1.0f;
  return s;
}

// The checks each kernel makes of its arguments; `kernel` names it in the message.
inline void check_lengths(const char* kernel, size_t count, std::initializer_list<size_t> lengths) {
  for (const size_t length : lengths) TORCH_CHECK(length == count, kernel, ": lists differ in length");
}

inline void check_parameter(const char* kernel, const at::Tensor& param, const at::Tensor& grad) {
  TORCH_CHECK(param.device().is_cpu() && param.scalar_type() == at::kFloat && param.is_contiguous(), kernel,
              ": parameters must be contiguous float32 CPU tensors");
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.is_contiguous() &&
                  grad.numel() == param.numel(),
              kernel, ": a gradient differs from its parameter");
}

// A moment's codes or scales: `numel` contiguous values of `dtype` on the CPU; else `rule` is the message.
inline void check_state(const char* kernel, const at::Tensor& state, at::ScalarType dtype, int64_t numel,
                        const char* rule) {
  TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == dtype && state.is_contiguous() &&
                  state.numel() == numel,
              kernel, ": ", rule);
}

// Threads split tiles of all tensors: tensor k's tiles are first[k] .. first[k + 1] - 1.
inline std::vector<int64_t> first_tiles(const std::vector<at::Tensor>& tensors, int64_t tile) {
  std::vector<int64_t> first{0};
  for (const at::Tensor& tensor : tensors) first.push_back(first.back() + ceil_div(tensor.numel(), tile));
  return first;
}

inline size_t tensor_of(const std::vector<int64_t>& first, int64_t tile) {
  return std::upper_bound(first.begin(), first.end(), tile) - first.begin() - 1;
}

// visit(k, start) for tiles begin .. end - 1: tensor k's tile of `tile` values from value `start`.
template <typename Visit>
void visit_tiles(const std::vector<int64_t>& first, int64_t tile, int64_t begin, int64_t end, Visit&& visit) {
  size_t k = tensor_of(first, begin);
  for (int64_t t = begin; t < end; ++t) {
    while (t >= first[k + 1]) ++k;
    visit(k, (t - first[k]) * tile);
  }
}

// visit_tiles over every tile, the tiles split among the threads (at::parallel_for).
template <typename Visit>
void parallel_tiles(const std::vector<int64_t>& first, int64_t tile, Visit&& visit) {
  at::parallel_for(0, first.back(), 1,
                   [&](int64_t begin, int64_t end) { visit_tiles(first, tile, begin, end, visit); });
}

}  // namespace adam_cpu
