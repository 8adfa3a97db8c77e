// The schema table of irno: every op of the extension is declared here, once.
// Implementations register per dispatch key beside their kernels:
//   CPU  -> csrc/<op>.cpp                            (TORCH_LIBRARY_IMPL(irno, CPU, m))
//   CUDA -> csrc/<op>.cu, or, where the op's host code calls ATen (FFTs), csrc/<op>_cuda.cpp
//           beside the kernels in csrc/<op>.cu       (TORCH_LIBRARY_IMPL(irno, CUDA, m))
// Fake (meta) implementations and autograd formulas live in irno_kernels/<op>.py.
// The exact semantics of each op are fixed in the pure-PyTorch references (irno_kernels/*_ref).
#include <torch/library.h>

#include <pybind11/pybind11.h>

#include <string>

#ifndef IRNO_CUDA_ARCHS
#define IRNO_CUDA_ARCHS ""
#endif
#ifndef IRNO_CUDA_VERSION
#define IRNO_CUDA_VERSION ""
#endif
#ifndef IRNO_TORCH_VERSION
#define IRNO_TORCH_VERSION ""
#endif
#ifndef IRNO_CXX_COMPILER
#define IRNO_CXX_COMPILER ""
#endif

TORCH_LIBRARY(irno, m) {
  // -- spectral convolution (csrc/spectral_conv.cpp, csrc/spectral_conv{.cu,_cuda.cpp}) --------
  // y = irfft2(Mix(rfft2(x))); x (B,Cin,H,W) real, weight (Cin,Cout,2*m1,m2) complex
  m.def("spectral_conv2d(Tensor x, Tensor weight) -> Tensor");
  // (grad_x, grad_weight) of spectral_conv2d for one grad_y (B,Cout,H,W)
  m.def("spectral_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight) -> (Tensor, Tensor)");
  // -- refinement update (csrc/update.cpp, csrc/update.cu) ------------------------------------
  // h + alpha * phi
  m.def("residual_update(Tensor h, Tensor phi, float alpha) -> Tensor");
  // h += alpha * phi, in place (inference; no autograd)
  m.def("residual_update_(Tensor(a!) h, Tensor phi, float alpha) -> ()");
  // h + alpha * (einsum('of,bf...->bo...', weight, z) + bias); weight (Co,F), bias (Co) or None
  m.def("refine_update(Tensor h, Tensor z, Tensor weight, Tensor? bias, float alpha) -> Tensor");
  // the same, written into h in place (inference; no autograd)
  m.def("refine_update_(Tensor(a!) h, Tensor z, Tensor weight, Tensor? bias, float alpha) -> ()");
  // -- spectra and the spectral loss (csrc/spectrum.cpp, csrc/spectrum{.cu,_cuda.cpp}) --------
  // energy of rfft2(x, norm="ortho") per radial shell: (B,C,H,W) -> (B,C,R)
  m.def("radial_spectrum(Tensor x) -> Tensor");
  // grad_x of radial_spectrum for one grad (B,C,R)
  m.def("radial_spectrum_backward(Tensor grad, Tensor x) -> Tensor");
  // weighted spectral loss (scalar); mode "magnitude" or "error"
  m.def("spectral_loss(Tensor pred, Tensor target, float lam, float f0, str mode) -> Tensor");
  // the same loss and the spectra it read, kept for the backward: (loss, P, Y) with P = rfft2(pred)
  // and Y = rfft2(target) in magnitude mode, P = rfft2(pred - target) and Y empty in error mode. The
  // spectra are in the device implementation's own scaling (CPU: norm "ortho"; CUDA: unscaled, see
  // csrc/spectrum_cuda.cpp) and are meant for spectral_loss_backward of the same device only. The
  // autograd of irno_kernels.spectral_loss uses this op, so that the backward transforms nothing
  // but the gradient.
  m.def("spectral_loss_spectra(Tensor pred, Tensor target, float lam, float f0, str mode) -> (Tensor, Tensor, Tensor)");
  // gradient of spectral_loss w.r.t. pred (wrt_target=False) or target (wrt_target=True); with
  // spec_pred / spec_target (the P and Y of spectral_loss_spectra) it reuses them instead of
  // transforming pred and target again
  m.def(
      "spectral_loss_backward(Tensor grad, Tensor pred, Tensor target, float lam, float f0, "
      "str mode, bool wrt_target, Tensor? spec_pred=None, Tensor? spec_target=None) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::string(IRNO_TORCH_VERSION);
#ifdef IRNO_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
  info["cuda_version"] = std::string(IRNO_CUDA_VERSION);
  info["cuda_archs"] = std::string(IRNO_CUDA_ARCHS);
  info["cxx_compiler"] = std::string(IRNO_CXX_COMPILER);
  info["cplusplus"] = static_cast<long>(__cplusplus);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "irno compiled ops; the ops themselves are reached through torch.ops.irno";
  m.def("build_info", &build_info,
        "Build facts: torch version, whether CUDA was compiled in, CUDA archs and version, compiler.");
}
