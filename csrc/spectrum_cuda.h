// Launchers of the CUDA kernels of the radial spectrum and the spectral loss (csrc/spectrum.cu),
// called by the host code in csrc/spectrum_cuda.cpp. Raw pointers and sizes only: this header keeps
// torch out of nvcc. Spectra are contiguous (planes, H, W/2+1) complex arrays, seen as interleaved
// (re, im) pairs of T = float or double, as at::fft_rfft2(norm="backward") returns them (unscaled:
// the callers pass the normalisation as a scale).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace irno {
namespace cuda {

// planes = B*C spectra of an H x W grid; R = the number of radial shells (radial spectrum only)
struct SpectrumShape {
  int64_t planes, H, W, R;
};

// doubles of scratch memory that radial_spectrum needs (per-block partial histograms)
int64_t radial_workspace(const SpectrumShape& s);

// out[p, r] = scale * sum over the entries of shell r of c(j) |F[p, i, j]|^2    (planes, R)
void radial_spectrum(const float* F, double* work, float* out, double scale, const SpectrumShape& s,
                     cudaStream_t stream);
void radial_spectrum(const double* F, double* work, double* out, double scale, const SpectrumShape& s,
                     cudaStream_t stream);

// in place: F[p, i, j] <- 2 scale g[p, shell(i, j)] F[p, i, j]; g (planes, R). With F = rfft2(x)
// unnormalised and scale = 1 / (H W), irfft2(F, norm "forward") is the gradient with respect to x
// (the multiplicity c cancels against the adjoint's 1/c).
void radial_spectrum_grad(float* F, const float* g, double scale, const SpectrumShape& s, cudaStream_t stream);
void radial_spectrum_grad(double* F, const double* g, double scale, const SpectrumShape& s, cudaStream_t stream);

// doubles of scratch memory that spectral_loss needs
int64_t loss_workspace(const SpectrumShape& s);

// out[0] = norm * sum_{p, i, j} w(i, j) err, w = 1 + (|f| / f0)^lam; err = (|P| - |Y|)^2 (magnitude),
// or |P|^2 when Y == nullptr (error mode: P = F(pred - target)). The loss is
// norm = 1 / (planes * sum_{i, j} w(i, j) * H W) for unnormalised spectra.
void spectral_loss(const float* P, const float* Y, double lam, double f0, double norm, double* work, float* out,
                   const SpectrumShape& s, cudaStream_t stream);
void spectral_loss(const double* P, const double* Y, double lam, double f0, double norm, double* work, double* out,
                   const SpectrumShape& s, cudaStream_t stream);

// G = grad[0] * scale * w / c(j) * dErr/dS (S and O are read, G written): with unnormalised spectra
// and scale = +-2 / (planes * sum w * H W), irfft2(G, norm "forward") is the gradient with respect to
// the field. Magnitude mode: S is the spectrum of the input differentiated, O the other one; error
// mode (O == nullptr): S = F(pred - target). grad: the loss gradient on the device (float or double).
void spectral_loss_grad(const float* S, const float* O, float* G, const float* grad, double scale, double lam,
                        double f0, const SpectrumShape& s, cudaStream_t stream);
void spectral_loss_grad(const float* S, const float* O, float* G, const double* grad, double scale, double lam,
                        double f0, const SpectrumShape& s, cudaStream_t stream);
void spectral_loss_grad(const double* S, const double* O, double* G, const double* grad, double scale, double lam,
                        double f0, const SpectrumShape& s, cudaStream_t stream);

}  // namespace cuda
}  // namespace irno
