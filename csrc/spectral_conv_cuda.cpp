// CUDA implementation of spectral_conv2d and its backward (semantics: irno_kernels/spectral_conv.py,
// spectral_conv2d_ref): argument checks, the FFTs (cuFFT through ATen), the launches of the fused
// mixing kernels of csrc/spectral_conv.cu, and the registration for the CUDA dispatch key.
// Compiled in CUDA builds only (CMakeLists.txt: *_cuda.cpp).
//
//   forward:  X = rfft2(x, "forward"); S = Mix(X) written in full by one kernel; y = irfft2(S, "forward")
//   backward: Gy = rfft2(grad_y, "backward") (the adjoint of the "forward"-normalised irfft2, up to
//             the column multiplicity c, which cancels against the adjoint of rfft2 for grad_x);
//             grad_x = irfft2(Mix^H(Gy), "backward"); grad_w = c(ky) sum_b conj(X) Gy
//
// bfloat16/float16 fields are stored in 16 bits and computed in float32: the FFTs and the mixing run
// on float32 copies with a complex64 weight, and y / grad_x are rounded to the input dtype at the end.
// Everything runs on the current stream; nothing synchronises with the host and all memory comes
// from PyTorch's caching allocator, so the ops can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fft_irfft2.h>
#include <ATen/ops/fft_rfft2.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "checks.h"
#include "complex_view.h"
#include "spectral_conv_cuda.h"

namespace irno {
namespace {

// FFT_NORM of irno_kernels/spectral_conv.py: rfft2 divides by H*W, irfft2 does not
constexpr const char* kNorm = "forward";
constexpr int64_t kMaxGridYZ = 65535;

// rfft2 of a (B, C, H, W) field in its compute precision, contiguous (the kernels index it)
at::Tensor rfft2(const at::Tensor& t, const char* norm) {
  const at::Tensor src = is_low_precision(t.scalar_type()) ? t.to(at::kFloat) : t;
  return at::fft_rfft2(src, c10::nullopt, {-2, -1}, norm).contiguous();
}

at::Tensor irfft2(const at::Tensor& spectrum, int64_t H, int64_t W, const char* norm, at::ScalarType dtype) {
  at::Tensor out = at::fft_irfft2(spectrum, at::IntArrayRef({H, W}), {-2, -1}, norm);
  return out.scalar_type() == dtype ? out.contiguous() : out.to(dtype).contiguous();
}

void check_launch_limits(const SpectralConvShape& s) {
  // the kernels index the entries of one spectrum with 32-bit integers
  const int64_t entries = s.H * (s.W / 2 + 1);
  TORCH_CHECK(entries <= (int64_t{1} << 30), "x: the CUDA kernel takes at most 2^30 spectrum entries ",
              "H*(W//2+1) per channel, got ", entries, " (H = ", s.H, ", W = ", s.W, ")");
  TORCH_CHECK(s.Ci <= kMaxGridYZ && s.Co <= kMaxGridYZ, "weight: the CUDA kernel takes at most ", kMaxGridYZ,
              " input and output channels, got shape ", s.Ci, " x ", s.Co);
  TORCH_CHECK(s.B <= 4 * kMaxGridYZ, "x: the CUDA kernel takes a batch of at most ", 4 * kMaxGridYZ, ", got ", s.B);
}

// mixing sizes: forward (C_in -> C_out) or adjoint (C_out -> C_in); the weight is (C_in, C_out, ...)
cuda::MixShape mix_shape(const SpectralConvShape& s, bool adjoint) {
  cuda::MixShape m;
  m.B = s.B;
  m.n_in = adjoint ? s.Co : s.Ci;
  m.n_out = adjoint ? s.Ci : s.Co;
  m.co_w = s.Co;
  m.H = s.H;
  m.W = s.W;
  m.Wr = s.W / 2 + 1;
  m.m1 = s.m1;
  m.m2 = s.m2;
  return m;
}

// the weight as the kernels read it: contiguous, conjugation and negation materialised
at::Tensor plain_weight(const at::Tensor& weight) { return weight.resolve_conj().resolve_neg().contiguous(); }

at::Tensor spectral_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight) {
  const SpectralConvShape s = check_spectral_conv_args(x, weight, /*low_precision=*/true);
  check_launch_limits(s);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor X = rfft2(x, kNorm);
  const at::Tensor w = plain_weight(weight);
  at::Tensor S = at::empty({s.B, s.Co, s.H, s.W / 2 + 1}, X.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (X.scalar_type() == at::kComplexDouble) {
    cuda::spectral_mix(real_ptr<double>(X), real_ptr<double>(w), real_ptr_mut<double>(S), mix_shape(s, false), false,
                       stream);
  } else {
    cuda::spectral_mix(real_ptr<float>(X), real_ptr<float>(w), real_ptr_mut<float>(S), mix_shape(s, false), false,
                       stream);
  }
  return irfft2(S, s.H, s.W, kNorm, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> spectral_conv2d_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                 const at::Tensor& weight) {
  const SpectralConvShape s = check_spectral_conv_args(x, weight, /*low_precision=*/true);
  check_spectral_conv_grad(grad_y, x, s);
  check_launch_limits(s);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor Gy = rfft2(grad_y, "backward");
  const at::Tensor X = rfft2(x, kNorm);
  const at::Tensor w = plain_weight(weight);
  at::Tensor GX = at::empty({s.B, s.Ci, s.H, s.W / 2 + 1}, X.options());
  at::Tensor grad_w = at::empty({s.Ci, s.Co, s.K1(), s.m2}, X.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (X.scalar_type() == at::kComplexDouble) {
    cuda::spectral_mix(real_ptr<double>(Gy), real_ptr<double>(w), real_ptr_mut<double>(GX), mix_shape(s, true), true,
                       stream);
    cuda::spectral_weight_grad(real_ptr<double>(X), real_ptr<double>(Gy), real_ptr_mut<double>(grad_w),
                               mix_shape(s, false), stream);
  } else {
    cuda::spectral_mix(real_ptr<float>(Gy), real_ptr<float>(w), real_ptr_mut<float>(GX), mix_shape(s, true), true,
                       stream);
    cuda::spectral_weight_grad(real_ptr<float>(X), real_ptr<float>(Gy), real_ptr_mut<float>(grad_w),
                               mix_shape(s, false), stream);
  }
  return {irfft2(GX, s.H, s.W, "backward", x.scalar_type()), grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(irno, CUDA, m) {
  m.impl("spectral_conv2d", &spectral_conv2d_cuda);
  m.impl("spectral_conv2d_backward", &spectral_conv2d_backward_cuda);
}

}  // namespace irno
