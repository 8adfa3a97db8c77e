// CUDA implementation of radial_spectrum, spectral_loss and their backward (semantics:
// irno_kernels/spectrum.py, radial_spectrum_ref / spectral_loss_ref): argument checks, the FFTs
// (cuFFT through ATen), the launches of the one-pass kernels of csrc/spectrum.cu, and the
// registration for the CUDA dispatch key. Compiled in CUDA builds only (CMakeLists.txt: *_cuda.cpp).
//
// The transforms are unscaled (rfft2 norm "backward", irfft2 norm "forward"): ATen applies any other
// normalisation as one more pass over the output, so the "ortho" factors 1/sqrt(HW) of the definition
// are folded into the kernels' scale arguments instead. The spectra that spectral_loss_spectra returns
// (and spectral_loss_backward takes back) are these unscaled ones.
//
// Backward applies the adjoint of rfft2 like the CPU kernels (csrc/spectrum.cpp): the kernels write
// the gradient with respect to the spectrum with the conjugate-pair columns halved (into a new
// tensor for the loss: the saved spectra are read, not copied), and irfft2 maps it back to the grid.
//
// bfloat16/float16 fields are stored in 16 bits and computed in float32 (FFTs on float32 copies,
// sums in float64); the results are rounded to the input dtype at the end. Everything runs on the
// current stream; the loss gradient's scale stays on the device (no .item()), scratch memory comes
// from PyTorch's caching allocator: the ops can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/fft_irfft2.h>
#include <ATen/ops/fft_rfft2.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <cstdint>

#include "checks.h"
#include "complex_view.h"
#include "spectrum_cuda.h"
#include "spectrum_weights.h"

namespace irno {
namespace {

// the dtype the kernels compute in: float64 for float64 fields, float32 for the others
at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor in_compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == compute_dtype(t) ? t : t.to(compute_dtype(t));
}

// rfft2 of a field already in its compute dtype, unscaled, contiguous (the kernels index it); a fresh
// tensor, which the radial backward overwrites
at::Tensor spectrum_of(const at::Tensor& x) {
  return at::fft_rfft2(x, c10::nullopt, {-2, -1}, "backward").contiguous();
}

// irfft2 of a gradient spectrum, unscaled (the kernels that wrote G applied the scale)
at::Tensor adjoint_rfft2(const at::Tensor& G, int64_t H, int64_t W, at::ScalarType dtype) {
  at::Tensor out = at::fft_irfft2(G, at::IntArrayRef({H, W}), {-2, -1}, "forward");
  return out.scalar_type() == dtype ? out.contiguous() : out.to(dtype).contiguous();
}

// |unscaled spectrum|^2 = H W |ortho spectrum|^2: every quadratic quantity is scaled by 1 / (H W)
double inv_grid(const at::Tensor& x) { return 1.0 / static_cast<double>(x.size(2) * x.size(3)); }

// R = 1 + the shell of the corner frequency, as num_shells() in irno_kernels/spectrum.py
int64_t num_shells(int64_t H, int64_t W) {
  const double L = static_cast<double>(std::max(H, W));
  const double fy = static_cast<double>(H / 2) * (1.0 / static_cast<double>(H));
  const double fx = static_cast<double>(W / 2) * (1.0 / static_cast<double>(W));
  return 1 + static_cast<int64_t>(std::nearbyint(L * std::sqrt(fy * fy + fx * fx)));
}

cuda::SpectrumShape shape_of(const at::Tensor& x, int64_t R) {
  cuda::SpectrumShape s;
  s.planes = x.size(0) * x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  s.R = R;
  return s;
}

// the kernels index the entries of one spectrum with 32-bit integers
void check_launch_limits(const at::Tensor& x, const char* name) {
  const int64_t entries = x.size(2) * (x.size(3) / 2 + 1);
  TORCH_CHECK(entries <= (int64_t{1} << 30), name, ": the CUDA kernels take at most 2^30 spectrum entries ",
              "H*(W//2+1) per channel, got shape ", x.sizes());
}

at::Tensor workspace(int64_t doubles, const at::Tensor& like) {
  return at::empty({doubles}, like.options().dtype(at::kDouble));
}

// ------------------------------------------------------------------------------------------------
// radial spectrum
// ------------------------------------------------------------------------------------------------
at::Tensor radial_spectrum_cuda(const at::Tensor& x) {
  check_field(x, "x", /*low_precision=*/true);
  check_launch_limits(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const cuda::SpectrumShape s = shape_of(x, num_shells(x.size(2), x.size(3)));
  const at::Tensor F = spectrum_of(in_compute_dtype(x));
  at::Tensor work = workspace(cuda::radial_workspace(s), x);
  at::Tensor out = at::empty({x.size(0), x.size(1), s.R}, x.options().dtype(compute_dtype(x)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (compute_dtype(x) == at::kDouble) {
    cuda::radial_spectrum(real_ptr<double>(F), work.mutable_data_ptr<double>(), out.mutable_data_ptr<double>(),
                          inv_grid(x), s, stream);
  } else {
    cuda::radial_spectrum(real_ptr<float>(F), work.mutable_data_ptr<double>(), out.mutable_data_ptr<float>(),
                          inv_grid(x), s, stream);
  }
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

at::Tensor radial_spectrum_backward_cuda(const at::Tensor& grad, const at::Tensor& x) {
  check_field(x, "x", /*low_precision=*/true);
  const cuda::SpectrumShape s = shape_of(x, num_shells(x.size(2), x.size(3)));
  check_radial_grad(grad, x, s.R);
  check_launch_limits(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor F = spectrum_of(in_compute_dtype(x));  // overwritten with the gradient spectrum
  const at::Tensor g = in_compute_dtype(grad).resolve_neg().contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (compute_dtype(x) == at::kDouble) {
    cuda::radial_spectrum_grad(real_ptr_mut<double>(F), g.const_data_ptr<double>(), inv_grid(x), s, stream);
  } else {
    cuda::radial_spectrum_grad(real_ptr_mut<float>(F), g.const_data_ptr<float>(), inv_grid(x), s, stream);
  }
  return adjoint_rfft2(F, s.H, s.W, x.scalar_type());
}

// ------------------------------------------------------------------------------------------------
// spectral loss
// ------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> spectral_loss_spectra_cuda(const at::Tensor& pred,
                                                                          const at::Tensor& target, double lam,
                                                                          double f0, c10::string_view mode) {
  check_loss_args(pred, target, lam, f0, /*low_precision=*/true);
  const LossMode m = parse_loss_mode(mode);
  check_launch_limits(pred, "pred");
  c10::cuda::CUDAGuard guard(pred.device());
  const cuda::SpectrumShape s = shape_of(pred, 0);
  const at::Tensor p = in_compute_dtype(pred), t = in_compute_dtype(target);
  // F(p - y) = F(p) - F(y): the error mode needs one transform, not two
  const at::Tensor P = spectrum_of(m == LossMode::kError ? p.sub(t) : p);
  const at::Tensor Y = m == LossMode::kMagnitude ? spectrum_of(t) : P.new_empty({0});
  at::Tensor work = workspace(cuda::loss_workspace(s), pred);
  at::Tensor out = at::empty({}, pred.options().dtype(compute_dtype(pred)));
  // mean over the planes*H*Wr entries of w / mean(w) * err = sum(w err) / (planes * sum(w))
  const double norm =
      inv_grid(pred) / (static_cast<double>(s.planes) * loss_weight_sum(s.H, s.W, lam, f0));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (compute_dtype(pred) == at::kDouble) {
    cuda::spectral_loss(real_ptr<double>(P), m == LossMode::kMagnitude ? real_ptr<double>(Y) : nullptr, lam, f0,
                        norm, work.mutable_data_ptr<double>(), out.mutable_data_ptr<double>(), s, stream);
  } else {
    cuda::spectral_loss(real_ptr<float>(P), m == LossMode::kMagnitude ? real_ptr<float>(Y) : nullptr, lam, f0,
                        norm, work.mutable_data_ptr<double>(), out.mutable_data_ptr<float>(), s, stream);
  }
  return {out.scalar_type() == pred.scalar_type() ? out : out.to(pred.scalar_type()), P, Y};
}

at::Tensor spectral_loss_cuda(const at::Tensor& pred, const at::Tensor& target, double lam, double f0,
                              c10::string_view mode) {
  return std::get<0>(spectral_loss_spectra_cuda(pred, target, lam, f0, mode));
}

at::Tensor spectral_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                                       double lam, double f0, c10::string_view mode, bool wrt_target,
                                       const c10::optional<at::Tensor>& spec_pred,
                                       const c10::optional<at::Tensor>& spec_target) {
  check_loss_args(pred, target, lam, f0, /*low_precision=*/true);
  const LossMode m = parse_loss_mode(mode);
  check_loss_grad(grad, pred);
  check_saved_spectra(spec_pred, spec_target, pred, m == LossMode::kMagnitude);
  check_launch_limits(pred, "pred");
  c10::cuda::CUDAGuard guard(pred.device());
  const cuda::SpectrumShape s = shape_of(pred, 0);
  const double sign = (m == LossMode::kError && wrt_target) ? -1.0 : 1.0;
  const at::Tensor p = in_compute_dtype(pred), t = in_compute_dtype(target);
  at::Tensor S;  // read by the kernel, which writes the gradient spectrum into G
  at::Tensor other;
  const bool saved = spec_pred.has_value();
  if (m == LossMode::kError) {
    S = saved ? *spec_pred : spectrum_of(p.sub(t));
  } else if (saved) {
    S = wrt_target ? *spec_target : *spec_pred;
    other = wrt_target ? *spec_pred : *spec_target;
  } else {
    S = spectrum_of(wrt_target ? t : p);
    other = spectrum_of(wrt_target ? p : t);
  }
  at::Tensor G = at::empty_like(S, at::MemoryFormat::Contiguous);
  // d/dS of sum(w err) / (planes * sum w) is 2 w (...) / (planes * sum w); the unscaled spectra and
  // the unscaled inverse transform add 1 / (H W)
  const double scale =
      sign * 2.0 * inv_grid(pred) / (static_cast<double>(s.planes) * loss_weight_sum(s.H, s.W, lam, f0));
  // the incoming gradient stays on the device: read by the kernel, never by the host (float32 and
  // float64 as they are; a 16-bit gradient is widened first)
  at::Tensor g = grad.reshape({1}).resolve_neg();
  if (g.scalar_type() != at::kFloat && g.scalar_type() != at::kDouble) g = g.to(at::kDouble);
  g = g.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (compute_dtype(pred) == at::kDouble) {
    if (g.scalar_type() != at::kDouble) g = g.to(at::kDouble);
    cuda::spectral_loss_grad(real_ptr<double>(S), other.defined() ? real_ptr<double>(other) : nullptr,
                             real_ptr_mut<double>(G), g.const_data_ptr<double>(), scale, lam, f0, s, stream);
  } else if (g.scalar_type() == at::kFloat) {
    cuda::spectral_loss_grad(real_ptr<float>(S), other.defined() ? real_ptr<float>(other) : nullptr,
                             real_ptr_mut<float>(G), g.const_data_ptr<float>(), scale, lam, f0, s, stream);
  } else {
    cuda::spectral_loss_grad(real_ptr<float>(S), other.defined() ? real_ptr<float>(other) : nullptr,
                             real_ptr_mut<float>(G), g.const_data_ptr<double>(), scale, lam, f0, s, stream);
  }
  return adjoint_rfft2(G, s.H, s.W, pred.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(irno, CUDA, m) {
  m.impl("radial_spectrum", &radial_spectrum_cuda);
  m.impl("radial_spectrum_backward", &radial_spectrum_backward_cuda);
  m.impl("spectral_loss", &spectral_loss_cuda);
  m.impl("spectral_loss_spectra", &spectral_loss_spectra_cuda);
  m.impl("spectral_loss_backward", &spectral_loss_backward_cuda);
}

}  // namespace irno
