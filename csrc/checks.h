// Argument checks shared by the C++ and CUDA op implementations. Every failure names the argument
// and the expected value, and raises a RuntimeError in Python (never a crash).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

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

}  // namespace irno
