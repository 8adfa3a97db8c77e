// CUDA kernels of the 2-D spectral convolution (semantics: irno_kernels/spectral_conv.py,
// spectral_conv2d_ref; host code, FFTs and registration: csrc/spectral_conv_cuda.cpp).
//
//   forward:  S = Mix(rfft2(x, "forward")), y = irfft2(S, "forward")
//   backward: grad_x = irfft2(Mix^H(Gy), "backward"), Gy = rfft2(grad_y, "backward")
//             grad_w = c(ky) * sum_b conj(X) * Gy
//
// spectral_mix reads the kept modes straight from the rfft2 output and writes the whole output
// spectrum, the zero modes included, so there is no zero-fill pass, no gathered copy and no scatter;
// a second small kernel then makes the self-conjugate columns Hermitian, so that cuFFT's irfft2 reads
// the spectrum as Re(ifft2) does (the op's definition), whatever algorithm it picks for the size.
// One thread owns one entry (kx, ky) of one output channel for a tile of kBatchTile batch entries:
// every weight value it loads serves the whole tile. Threads of a warp take consecutive ky, so the
// spectra and the weight are read and written in coalesced runs. The contraction over channels runs
// in the spectrum's precision (float32 for float32/bf16/fp16 inputs, float64 for float64), in a fixed
// order: the result does not depend on the launch.
//
// A truncated-DFT variant would go here: the kept modes are a small corner of the spectrum, so the
// forward DFT along H and W restricted to them (and the inverse from them) are skinny GEMMs that
// tensor cores run far faster than a full FFT pass over the grid (cf. the GEMM route of the CPU
// kernel in csrc/spectral_conv.cpp). Not done yet; the FFT route below is exact for every shape.
//
// No torch headers: only the launch check of c10. Launches go on the caller's stream.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "spectral_conv_cuda.h"
#include "vec2.cuh"

namespace irno {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBatchTile = 4;  // batch entries per thread in spectral_mix (weight reuse)
constexpr int kOutTile = 4;    // output channels per thread in spectral_weight_grad (X reuse)

// grid (ceil(H*Wr / kThreads), n_out, ceil(B / kBatchTile)); thread: entry e = kx*Wr + ky of output
// channel p for batch entries b0 .. b0+kBatchTile-1
template <typename T, bool kAdjoint>
__global__ void __launch_bounds__(kThreads)
    spectral_mix_kernel(const T* __restrict__ a, const T* __restrict__ w, T* __restrict__ out, MixShape s) {
  using V = typename Vec2<T>::type;
  const int plane = static_cast<int>(s.H * s.Wr);
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= plane) return;
  const int64_t p = blockIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.z) * kBatchTile;
  const int Wr = static_cast<int>(s.Wr), H = static_cast<int>(s.H), m1 = static_cast<int>(s.m1);
  const int kx = e / Wr;
  const int ky = e - kx * Wr;

  T re[kBatchTile], im[kBatchTile];
#pragma unroll
  for (int k = 0; k < kBatchTile; ++k) re[k] = im[k] = T(0);

  const bool kept = ky < s.m2 && (kx < m1 || kx >= H - m1);
  if (kept) {
    // weight row of spectrum row kx: 0..m1-1 for frequencies 0..m1-1, m1..2m1-1 for -m1..-1
    const int r = kx < m1 ? kx : kx - (H - 2 * m1);
    const int64_t M = 2 * s.m1 * s.m2;
    const int64_t m = static_cast<int64_t>(r) * s.m2 + ky;
    const V* a2 = reinterpret_cast<const V*>(a);
    const V* w2 = reinterpret_cast<const V*>(w);
#pragma unroll 2
    for (int64_t q = 0; q < s.n_in; ++q) {
      const int64_t wi_ = kAdjoint ? p * s.co_w + q : q * s.co_w + p;
      const V wv = w2[wi_ * M + m];
      const T wr = wv.x;
      const T wi = kAdjoint ? -wv.y : wv.y;
#pragma unroll
      for (int k = 0; k < kBatchTile; ++k) {
        const int64_t b = b0 + k;
        if (b < s.B) {
          const V av = a2[(b * s.n_in + q) * plane + e];
          re[k] += av.x * wr - av.y * wi;
          im[k] += av.x * wi + av.y * wr;
        }
      }
    }
  }
  V* o2 = reinterpret_cast<V*>(out);
#pragma unroll
  for (int k = 0; k < kBatchTile; ++k) {
    const int64_t b = b0 + k;
    if (b < s.B) o2[(b * s.n_out + p) * plane + e] = make_vec2<T>(re[k], im[k]);
  }
}

// grid (ceil(M / kThreads), ceil(C_out / kOutTile), C_in); thread: mode m = r*m2 + ky of input
// channel i for output channels o0 .. o0+kOutTile-1; the batch is summed in order (no atomics)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    spectral_weight_grad_kernel(const T* __restrict__ X, const T* __restrict__ G, T* __restrict__ gw, MixShape s) {
  using V = typename Vec2<T>::type;
  const int M = static_cast<int>(2 * s.m1 * s.m2);
  const int m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m >= M) return;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kOutTile;
  const int64_t i = blockIdx.z;
  const int m1 = static_cast<int>(s.m1), m2 = static_cast<int>(s.m2), H = static_cast<int>(s.H);
  const int r = m / m2;
  const int ky = m - r * m2;
  const int kx = r < m1 ? r : H - 2 * m1 + r;
  const int64_t plane = s.H * s.Wr;
  const int64_t e = static_cast<int64_t>(kx) * s.Wr + ky;
  const int64_t Ci = s.n_in, Co = s.n_out;

  T re[kOutTile], im[kOutTile];
#pragma unroll
  for (int k = 0; k < kOutTile; ++k) re[k] = im[k] = T(0);
  const V* x2 = reinterpret_cast<const V*>(X);
  const V* g2 = reinterpret_cast<const V*>(G);
  for (int64_t b = 0; b < s.B; ++b) {
    const V xv = x2[(b * Ci + i) * plane + e];
#pragma unroll
    for (int k = 0; k < kOutTile; ++k) {
      const int64_t o = o0 + k;
      if (o < Co) {
        const V gv = g2[(b * Co + o) * plane + e];
        // conj(x) * g
        re[k] += xv.x * gv.x + xv.y * gv.y;
        im[k] += xv.x * gv.y - xv.y * gv.x;
      }
    }
  }
  // a non-edge rfft column stands for a conjugate pair: irfft2 counts it twice
  const T c = (ky == 0 || 2 * ky == s.W) ? T(1) : T(2);
  V* w2 = reinterpret_cast<V*>(gw);
#pragma unroll
  for (int k = 0; k < kOutTile; ++k) {
    const int64_t o = o0 + k;
    if (o < Co) w2[(i * Co + o) * M + m] = make_vec2<T>(c * re[k], c * im[k]);
  }
}

// The self-conjugate rfft columns (ky = 0, and ky = W/2 for an even W when kept) made Hermitian along
// H, in place: S[kx] <- (S[kx] + conj(S[-kx])) / 2 and S[-kx] <- conj(S[kx]) (semantics:
// hermitian_edges in irno_kernels/spectral_conv.py). One thread per pair (kx, -kx), kx = 0 .. H/2, of
// one column of one plane; the pairs are disjoint, so the update is race-free.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    hermitian_edges_kernel(T* __restrict__ S, int64_t n_planes, int64_t H, int64_t Wr, int64_t n_cols, int64_t col1) {
  using V = typename Vec2<T>::type;
  const int64_t half = H / 2 + 1;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n_planes * n_cols * half) return;
  const int64_t k = t % half;
  const int64_t c = (t / half) % n_cols;
  const int64_t plane = t / (half * n_cols);
  V* col = reinterpret_cast<V*>(S) + plane * H * Wr + (c == 0 ? 0 : col1);
  const int64_t kn = (H - k) % H;
  const V a = col[k * Wr];
  const V b = col[kn * Wr];
  const T re = T(0.5) * (a.x + b.x);
  const T im = T(0.5) * (a.y - b.y);
  col[k * Wr] = make_vec2<T>(re, im);
  col[kn * Wr] = make_vec2<T>(re, -im);
}

template <typename T>
void hermitian(T* S, int64_t n_planes, const MixShape& s, cudaStream_t stream) {
  const bool nyquist = s.W % 2 == 0 && s.W / 2 > 0 && s.W / 2 < s.m2;
  const int64_t n_cols = nyquist ? 2 : 1;
  const int64_t n = n_planes * n_cols * (s.H / 2 + 1);
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  hermitian_edges_kernel<T><<<blocks, kThreads, 0, stream>>>(S, n_planes, s.H, s.Wr, n_cols, s.W / 2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void mix(const T* a, const T* w, T* out, const MixShape& s, bool adjoint, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((s.H * s.Wr + kThreads - 1) / kThreads), static_cast<unsigned>(s.n_out),
                  static_cast<unsigned>((s.B + kBatchTile - 1) / kBatchTile));
  if (adjoint) {
    spectral_mix_kernel<T, true><<<grid, kThreads, 0, stream>>>(a, w, out, s);
  } else {
    spectral_mix_kernel<T, false><<<grid, kThreads, 0, stream>>>(a, w, out, s);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  hermitian<T>(out, s.B * s.n_out, s, stream);
}

template <typename T>
void weight_grad(const T* X, const T* G, T* gw, const MixShape& s, cudaStream_t stream) {
  const int64_t M = 2 * s.m1 * s.m2;
  const dim3 grid(static_cast<unsigned>((M + kThreads - 1) / kThreads),
                  static_cast<unsigned>((s.n_out + kOutTile - 1) / kOutTile), static_cast<unsigned>(s.n_in));
  spectral_weight_grad_kernel<T><<<grid, kThreads, 0, stream>>>(X, G, gw, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void spectral_mix(const float* a, const float* weight, float* out, const MixShape& s, bool adjoint,
                  cudaStream_t stream) {
  mix<float>(a, weight, out, s, adjoint, stream);
}

void spectral_mix(const double* a, const double* weight, double* out, const MixShape& s, bool adjoint,
                  cudaStream_t stream) {
  mix<double>(a, weight, out, s, adjoint, stream);
}

void spectral_weight_grad(const float* X, const float* G, float* grad_w, const MixShape& s, cudaStream_t stream) {
  weight_grad<float>(X, G, grad_w, s, stream);
}

void spectral_weight_grad(const double* X, const double* G, double* grad_w, const MixShape& s,
                          cudaStream_t stream) {
  weight_grad<double>(X, G, grad_w, s, stream);
}

}  // namespace cuda
}  // namespace irno
