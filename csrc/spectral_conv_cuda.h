// Launchers of the CUDA kernels of spectral_conv2d (csrc/spectral_conv.cu), called by the host code
// in csrc/spectral_conv_cuda.cpp. Raw pointers and sizes only: this header keeps torch out of nvcc.
// Spectra are complex arrays seen as interleaved (re, im) pairs of T = float or double.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace irno {
namespace cuda {

// Sizes of one channel mixing, a (B, n_in, H, Wr) -> out (B, n_out, H, Wr) spectra. The weight is
// (C_in, co_w, 2*m1, m2) contiguous, co_w = C_out; W is the real grid width (Wr = W/2 + 1).
struct MixShape {
  int64_t B, n_in, n_out, co_w, H, W, Wr, m1, m2;
};

// out[b, p] = sum_q a[b, q] * weight[q, p]        (adjoint = false: q over C_in, p over C_out)
// out[b, p] = sum_q a[b, q] * conj(weight[p, q])  (adjoint = true:  q over C_out, p over C_in)
// on the kept modes (rows 0..m1-1 and H-m1..H-1, columns 0..m2-1); every other entry of out is 0.
// Then the self-conjugate columns of out (ky = 0; ky = W/2 when W is even and m2 = W/2 + 1) are
// replaced by their Hermitian part along H (hermitian_edges in irno_kernels/spectral_conv.py).
void spectral_mix(const float* a, const float* weight, float* out, const MixShape& s, bool adjoint,
                  cudaStream_t stream);
void spectral_mix(const double* a, const double* weight, double* out, const MixShape& s, bool adjoint,
                  cudaStream_t stream);

// grad_w[i, o, r, ky] = c(ky) * sum_b conj(X[b, i, kx, ky]) * G[b, o, kx, ky] on the kept modes;
// X (B, C_in, H, Wr), G (B, C_out, H, Wr), grad_w (C_in, C_out, 2*m1, m2); s.n_in = C_in, s.n_out = C_out.
// c = 1 on rfft column 0 and the Nyquist column of an even W, else 2.
void spectral_weight_grad(const float* X, const float* G, float* grad_w, const MixShape& s, cudaStream_t stream);
void spectral_weight_grad(const double* X, const double* G, double* grad_w, const MixShape& s,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace irno
