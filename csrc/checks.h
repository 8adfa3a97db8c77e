// Argument checks shared by the C++ and CUDA op implementations. Every failure names the argument
// and the expected value, and raises a RuntimeError in Python (never a crash).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <string>
#include <vector>

namespace irno {

inline void check_defined_nonempty(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.numel() > 0, name, ": expected a non-empty tensor, got shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name,
              ": expected a real floating-point tensor, got dtype ", t.scalar_type());
}

inline void check_same_shape(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), bn, ": expected shape ", a.sizes(), " (the shape of ", an,
              "), got ", b.sizes());
}

inline void check_same_dtype(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), bn, ": expected dtype ", a.scalar_type(),
              " (the dtype of ", an, "), got ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), bn, ": expected a tensor on ", a.device(), " (the device of ",
              an, "), got ", b.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got shape ", t.sizes());
}

// refine_update's shapes: h (B,Co,*S), z (B,F,*S), weight (Co,F), bias (Co) or undefined
inline void check_refine_args(const at::Tensor& h, const at::Tensor& z, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  check_defined_nonempty(h, "h");
  check_defined_nonempty(z, "z");
  check_defined_nonempty(weight, "weight");
  check_floating(h, "h");
  check_same_dtype(h, "h", z, "z");
  check_same_dtype(h, "h", weight, "weight");
  check_same_device(h, "h", z, "z");
  check_same_device(h, "h", weight, "weight");
  TORCH_CHECK(h.dim() >= 2, "h: expected (B, C_out, *spatial), got shape ", h.sizes());
  TORCH_CHECK(z.dim() == h.dim(), "z: expected ", h.dim(), " dims like h (B, F, *spatial), got shape ",
              z.sizes());
  TORCH_CHECK(z.size(0) == h.size(0), "z: expected batch ", h.size(0), " (the batch of h), got ", z.size(0));
  for (int64_t d = 2; d < h.dim(); ++d) {
    TORCH_CHECK(z.size(d) == h.size(d), "z: expected spatial shape ", h.sizes().slice(2),
                " (that of h), got ", z.sizes().slice(2));
  }
  check_dim(weight, 2, "weight");
  TORCH_CHECK(weight.size(0) == h.size(1) && weight.size(1) == z.size(1), "weight: expected shape (",
              h.size(1), ", ", z.size(1), ") = (C_out of h, F of z), got ", weight.sizes());
  if (bias.has_value() && bias->defined()) {
    check_same_dtype(h, "h", *bias, "bias");
    check_same_device(h, "h", *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == h.size(1), "bias: expected shape (", h.size(1),
                ",), got ", bias->sizes());
  }
}

// ------------------------------------------------------------------------------------------------
// spectral_conv2d and the spectral ops. `low_precision` also admits bfloat16/float16 fields: the
// CUDA kernels store them in 16 bits and compute in float32 (with a complex64 weight); the CPU
// kernels take float32/float64 only.
// ------------------------------------------------------------------------------------------------
inline bool is_low_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

inline void check_field_dtype(const at::Tensor& t, const char* name, bool low_precision) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kDouble || (low_precision && is_low_precision(st));
  TORCH_CHECK(ok, name, ": expected dtype ", low_precision ? "float32, float64, bfloat16 or float16" : "float32 or float64",
              ", got ", st);
}

// x (B, C_in, H, W) real; weight (C_in, C_out, 2*m1, m2) complex, the complex dtype of x's precision
struct SpectralConvShape {
  int64_t B, Ci, Co, H, W, m1, m2;
  int64_t K1() const { return 2 * m1; }
  int64_t M() const { return 2 * m1 * m2; }
};

inline SpectralConvShape check_spectral_conv_args(const at::Tensor& x, const at::Tensor& weight,
                                                  bool low_precision = false) {
  check_defined_nonempty(x, "x");
  check_defined_nonempty(weight, "weight");
  TORCH_CHECK(x.dim() == 4, "x: expected a 4-D tensor (B, C_in, H, W), got shape ", x.sizes());
  check_field_dtype(x, "x", low_precision);
  const auto want = is_low_precision(x.scalar_type()) ? at::kComplexFloat : c10::toComplexType(x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == want, "weight: expected dtype ", want, " (the complex dtype of x's ",
              x.scalar_type(), "), got ", weight.scalar_type());
  check_same_device(x, "x", weight, "weight");
  TORCH_CHECK(weight.dim() == 4, "weight: expected a 4-D tensor (C_in, C_out, 2*m1, m2), got shape ",
              weight.sizes());
  SpectralConvShape s{x.size(0), x.size(1), weight.size(1), x.size(2), x.size(3), weight.size(2) / 2, weight.size(3)};
  TORCH_CHECK(weight.size(0) == s.Ci, "weight: expected C_in = ", s.Ci, " (x.shape[1]) along dim 0, got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(2) % 2 == 0, "weight: expected an even size 2*m1 along dim 2, got ", weight.size(2));
  TORCH_CHECK(weight.size(2) <= s.H, "weight: 2*m1 = ", weight.size(2), " modes along H need H >= ",
              weight.size(2), ", got x with H = ", s.H);
  TORCH_CHECK(s.m2 <= s.W / 2 + 1, "weight: m2 = ", s.m2, " modes along W need m2 <= W//2+1 = ", s.W / 2 + 1,
              " (x has W = ", s.W, ")");
  return s;
}

// grad_y of spectral_conv2d: (B, C_out, H, W), x's dtype and device
inline void check_spectral_conv_grad(const at::Tensor& grad_y, const at::Tensor& x, const SpectralConvShape& s) {
  check_defined_nonempty(grad_y, "grad_y");
  check_same_dtype(x, "x", grad_y, "grad_y");
  check_same_device(x, "x", grad_y, "grad_y");
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == s.B && grad_y.size(1) == s.Co && grad_y.size(2) == s.H &&
                  grad_y.size(3) == s.W,
              "grad_y: expected shape (", s.B, ", ", s.Co, ", ", s.H, ", ", s.W,
              ") = (B, C_out, H, W) of the output, got ", grad_y.sizes());
}

// a (B, C, H, W) field of the radial spectrum and the spectral loss
inline void check_field(const at::Tensor& t, const char* name, bool low_precision = false) {
  check_defined_nonempty(t, name);
  check_dim(t, 4, name);
  check_field_dtype(t, name, low_precision);
}

enum class LossMode { kMagnitude, kError };

inline LossMode parse_loss_mode(c10::string_view mode) {
  if (mode == "magnitude") return LossMode::kMagnitude;
  if (mode == "error") return LossMode::kError;
  TORCH_CHECK(false, "mode: expected \"magnitude\" or \"error\", got \"", std::string(mode), "\"");
}

inline void check_loss_args(const at::Tensor& pred, const at::Tensor& target, double lam, double f0,
                            bool low_precision = false) {
  check_field(pred, "pred", low_precision);
  check_field(target, "target", low_precision);
  check_same_device(pred, "pred", target, "target");
  check_same_dtype(pred, "pred", target, "target");
  check_same_shape(pred, "pred", target, "target");
  TORCH_CHECK(std::isfinite(lam) && lam >= 0, "lam: expected a finite number >= 0, got ", lam);
  TORCH_CHECK(std::isfinite(f0) && f0 > 0, "f0: expected a finite number > 0, got ", f0);
}

// grad of radial_spectrum: (B, C, R), x's dtype and device
inline void check_radial_grad(const at::Tensor& grad, const at::Tensor& x, int64_t R) {
  check_defined_nonempty(grad, "grad");
  check_same_device(x, "x", grad, "grad");
  check_same_dtype(x, "x", grad, "grad");
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == x.size(0) && grad.size(1) == x.size(1) && grad.size(2) == R,
              "grad: expected shape (", x.size(0), ", ", x.size(1), ", ", R,
              ") = (B, C, R) of x's radial spectrum, got ", grad.sizes());
}

// grad of spectral_loss: one element on pred's device
inline void check_loss_grad(const at::Tensor& grad, const at::Tensor& pred) {
  check_defined_nonempty(grad, "grad");
  TORCH_CHECK(grad.numel() == 1, "grad: expected a 0-D tensor (the loss is a scalar), got shape ", grad.sizes());
  check_same_device(pred, "pred", grad, "grad");
}

// the spectra saved by spectral_loss_spectra: contiguous (B, C, H, W/2+1) complex of pred's compute
// precision on pred's device; magnitude mode needs both, error mode only spec_pred
inline void check_saved_spectra(const c10::optional<at::Tensor>& spec_pred, const c10::optional<at::Tensor>& spec_target,
                                const at::Tensor& pred, bool magnitude) {
  if (!spec_pred.has_value()) {
    TORCH_CHECK(!spec_target.has_value(), "spec_target: given without spec_pred");
    return;
  }
  const auto want = pred.scalar_type() == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
  const std::vector<int64_t> shape{pred.size(0), pred.size(1), pred.size(2), pred.size(3) / 2 + 1};
  auto check = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == want, name, ": expected dtype ", want, ", got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, ": expected shape ", at::IntArrayRef(shape), ", got ",
                t.sizes());
    TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
    check_same_device(pred, "pred", t, name);
  };
  check(*spec_pred, "spec_pred");
  if (magnitude) {
    TORCH_CHECK(spec_target.has_value(), "spec_target: required with spec_pred in magnitude mode");
    check(*spec_target, "spec_target");
  }
}

}  // namespace irno
