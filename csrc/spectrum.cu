// CUDA kernels of the radial spectrum and the progressive spectral loss (semantics:
// irno_kernels/spectrum.py, radial_spectrum_ref / spectral_loss_ref; host code, FFTs and
// registration: csrc/spectrum_cuda.cpp).
//
// One pass over the rfft2 spectra; the shell index and the loss weight of an entry are computed
// inline from its (row, column):
//   fy = fftfreq(H)[i] = k * (1/H), fx = rfftfreq(W)[j] = j * (1/W)   (torch's arithmetic)
//   shell = round_half_even(max(H, W) * sqrt(fy*fy + fx*fx))            float64, op for op
//   w     = 1 + (sqrt(fy^2 + fx^2) / f0)^lam                             float64
// The shell arithmetic uses the explicitly rounded intrinsics (__dmul_rn, __dadd_rn, __dsqrt_rn,
// __double2int_rn), which nvcc never contracts into an fma: an fma rounds fy*fy + fx*fx once
// instead of twice and moves entries that sit on a half-integer radius into the next shell.
//
// Reductions are deterministic, in two stages with a partition that depends on the shape alone:
//  * radial spectrum: a block owns a chunk of rows of one plane; each warp walks whole rows, lanes
//    on consecutive columns. Along a row the shell never decreases, so the 32 lanes' shells are
//    sorted and equal shells are contiguous: a segmented scan over shuffles adds each run, and the
//    run's last lane adds it to the warp's own histogram in shared memory (one writer per bin and
//    warp, no atomics). The warps' histograms are added in warp order into a per-block partial;
//    a second kernel adds the partials of a plane in block order.
//  * loss: a thread owns one (i, j) entry for a group of planes (the weight is computed once and
//    serves them all); a fixed-shape block tree gives one partial per block, and one block adds
//    the partials in order. The weights' sum (the normaliser) comes from the host
//    (csrc/spectrum_weights.h, cached per grid and (lam, f0)).
// Sums are float64 for every input dtype. No float atomics, no host synchronisation.
//
// The spectra are unnormalised (rfft2 with norm "backward") and the gradient spectra go through
// irfft2 with norm "forward" (no scaling): the "ortho" factors are folded into the kernels'
// scale arguments, which saves cuFFT's separate scaling pass over every spectrum and field.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "spectrum_cuda.h"
#include "vec2.cuh"

namespace irno {
namespace cuda {
namespace {

constexpr int kThreads = 256;          // elementwise and per-entry kernels
constexpr int kFinalThreads = 1024;    // the single-block final reductions
constexpr int kPlanesPerGroup = 8;     // planes per thread in the per-entry kernels (at least)
constexpr int kRowsPerWarp = 4;        // rows per warp and chunk in the radial spectrum
constexpr int kMaxWarps = 8;           // warps per block in the radial spectrum
constexpr int kHistDoubles = 6144;     // 48 KiB of shared memory for the warps' histograms
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// hypot: the unscaled spectra are sqrt(H W) times the definition's, so re^2 + im^2 overflows float
// for fields sqrt(H W) times smaller than the definition's own abs() does; hypot does not
__device__ __forceinline__ float magnitude(float re, float im) { return hypotf(re, im); }
__device__ __forceinline__ double magnitude(double re, double im) { return hypot(re, im); }

// ------------------------------------------------------------------------------------------------
// frequencies, shells, weights
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ double fftfreq(int i, int n) {
  const int k = i < (n + 1) / 2 ? i : i - n;
  return __dmul_rn(static_cast<double>(k), __ddiv_rn(1.0, static_cast<double>(n)));
}

__device__ __forceinline__ double rfftfreq(int j, int n) {
  return __dmul_rn(static_cast<double>(j), __ddiv_rn(1.0, static_cast<double>(n)));
}

// round(max(H, W) * sqrt(fy^2 + fx^2)), half to even, rounded exactly as shell_index() rounds
__device__ __forceinline__ int shell_of(int i, int j, int H, int W) {
  const double fy = fftfreq(i, H);
  const double fx = rfftfreq(j, W);
  const double f2 = __dadd_rn(__dmul_rn(fy, fy), __dmul_rn(fx, fx));
  return __double2int_rn(__dmul_rn(static_cast<double>(max(H, W)), __dsqrt_rn(f2)));
}

// 1 + (|f| / f0)^lam, not normalised (0^0 = 1: a flat weight for lam = 0, as torch's pow)
__device__ __forceinline__ double loss_weight(int i, int j, int H, int W, double lam, double f0) {
  const double fy = fftfreq(i, H);
  const double fx = rfftfreq(j, W);
  return 1.0 + pow(sqrt(fy * fy + fx * fx) / f0, lam);
}

// Sum over the block in a fixed tree (warp shuffles, then the first warp): deterministic for a
// fixed blockDim. Every thread of the block must call it; the result is valid in thread 0.
__device__ double block_sum(double v) {
  __shared__ double warp_sums[32];
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(kFullMask, v, d);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(kFullMask, v, d);
  }
  __syncthreads();  // warp_sums may be reused by the next call
  return v;
}

// ------------------------------------------------------------------------------------------------
// radial spectrum
// ------------------------------------------------------------------------------------------------
struct RadialPlan {
  int warps;           // warps per block
  int bins;            // shells per window (histogram bins per warp)
  int windows;         // shell windows (1 unless R > kHistDoubles)
  int rows;            // rows per chunk
  int64_t chunks;      // chunks per plane
};

RadialPlan radial_plan(const SpectrumShape& s) {
  RadialPlan p;
  p.bins = static_cast<int>(std::min<int64_t>(s.R, kHistDoubles));
  p.windows = static_cast<int>((s.R + p.bins - 1) / p.bins);
  p.warps = std::max(1, std::min(kMaxWarps, kHistDoubles / p.bins));
  p.rows = p.warps * kRowsPerWarp;
  // the workspace holds chunks * R partial sums per plane: at most one per spectrum entry. Tall,
  // narrow grids have many shells and few columns (4096 x 8: 2897 shells, 5 columns), where chunks
  // of warps * 4 rows would need 36 times the spectrum; their chunks take more rows instead (the
  // kernel's warps stride over any number of rows)
  const int64_t max_chunks = std::max<int64_t>(1, s.H * (s.W / 2 + 1) / s.R);
  if ((s.H + p.rows - 1) / p.rows > max_chunks) p.rows = static_cast<int>((s.H + max_chunks - 1) / max_chunks);
  p.chunks = (s.H + p.rows - 1) / p.rows;
  return p;
}

// grid (planes * chunks, windows), blockDim warps * 32, dynamic shared memory warps * bins doubles.
// part[(plane * chunks + chunk) * R + r] = energy of shell r in the chunk's rows of the plane.
template <typename T>
__global__ void radial_partials_kernel(const T* __restrict__ F, double* __restrict__ part, int H, int W, int R,
                                       int chunks, int rows, int bins) {
  using V = typename Vec2<T>::type;
  extern __shared__ double hist[];  // [warps][bins]
  const int warps = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int Wr = W / 2 + 1;
  const int64_t plane = blockIdx.x / chunks;
  const int chunk = static_cast<int>(blockIdx.x - plane * chunks);
  const int r0 = blockIdx.y * bins;
  for (int k = threadIdx.x; k < warps * bins; k += blockDim.x) hist[k] = 0.0;
  __syncthreads();

  double* mine = hist + warp * bins;
  const V* Fp = reinterpret_cast<const V*>(F) + plane * H * Wr;
  const int i0 = chunk * rows, i1 = min(H, i0 + rows);
  for (int i = i0 + warp; i < i1; i += warps) {  // uniform across the warp: all 32 lanes take part
    for (int j0 = 0; j0 < Wr; j0 += 32) {
      const int j = j0 + lane;
      double e = 0.0;
      int key = INT_MAX;  // past the row's end: sorts after every shell, never written
      if (j < Wr) {
        const V v = Fp[static_cast<int64_t>(i) * Wr + j];
        const double re = v.x, im = v.y;
        e = re * re + im * im;
        if (!(j == 0 || 2 * j == W)) e *= 2.0;  // a conjugate pair counts twice
        key = shell_of(i, j, H, W);
      }
      // segmented inclusive scan: the keys are sorted over the lanes, so a lane d places lower
      // with the same key is in the same run
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const double up = __shfl_up_sync(kFullMask, e, d);
        const int up_key = __shfl_up_sync(kFullMask, key, d);
        if (lane >= d && up_key == key) e += up;
      }
      const int next_key = __shfl_down_sync(kFullMask, key, 1);
      const bool run_end = lane == 31 || next_key != key;
      if (run_end && key != INT_MAX && key >= r0 && key - r0 < bins) mine[key - r0] += e;
      __syncwarp();  // the next run of the same bin may end on another lane
    }
  }
  __syncthreads();
  double* dst = part + static_cast<int64_t>(blockIdx.x) * R;
  for (int b = threadIdx.x; b < bins && r0 + b < R; b += blockDim.x) {
    double sum = 0.0;
    for (int w = 0; w < warps; ++w) sum += hist[w * bins + b];
    dst[r0 + b] = sum;
  }
}

// out[plane, r] = scale * sum over the plane's chunks, in order
template <typename T>
__global__ void radial_final_kernel(const double* __restrict__ part, T* __restrict__ out, int64_t planes,
                                    int64_t chunks, int R, double scale) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= planes * R) return;
  const int64_t plane = t / R;
  const int64_t r = t - plane * R;
  const double* src = part + plane * chunks * R + r;
  double sum = 0.0;
  for (int64_t c = 0; c < chunks; ++c) sum += src[c * R];
  out[t] = static_cast<T>(sum * scale);
}

// grid (ceil(H*Wr / kThreads), plane groups); F <- 2 scale g[shell] F
template <typename T>
__global__ void radial_grad_kernel(T* __restrict__ F, const T* __restrict__ g, int64_t planes, int per_group, int H,
                                   int W, int R, T scale) {
  using V = typename Vec2<T>::type;
  const int Wr = W / 2 + 1;
  const int E = H * Wr;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const int i = e / Wr, j = e - i * Wr;
  const int r = min(shell_of(i, j, H, W), R - 1);  // < R by construction; the clamp only guards memory
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * per_group;
  const int64_t p1 = min64(planes, p0 + per_group);
  V* F2 = reinterpret_cast<V*>(F);
  for (int64_t p = p0; p < p1; ++p) {
    const T f = T(2) * scale * g[p * R + r];
    const int64_t idx = p * E + e;
    const V v = F2[idx];
    F2[idx] = make_vec2<T>(v.x * f, v.y * f);
  }
}

template <typename T>
void radial_launch(const T* F, double* work, T* out, double scale, const SpectrumShape& s, cudaStream_t stream) {
  const RadialPlan p = radial_plan(s);
  TORCH_CHECK(s.planes * p.chunks <= INT_MAX, "radial_spectrum: at most 2^31-1 blocks of ", p.rows,
              " rows per CUDA launch, got ", s.planes, " channels of ", s.H, " rows");
  const dim3 grid(static_cast<unsigned>(s.planes * p.chunks), static_cast<unsigned>(p.windows));
  const size_t smem = static_cast<size_t>(p.warps) * p.bins * sizeof(double);
  radial_partials_kernel<T><<<grid, p.warps * 32, smem, stream>>>(F, work, static_cast<int>(s.H),
                                                                  static_cast<int>(s.W), static_cast<int>(s.R),
                                                                  static_cast<int>(p.chunks), p.rows, p.bins);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t n = s.planes * s.R;
  radial_final_kernel<T><<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      work, out, s.planes, p.chunks, static_cast<int>(s.R), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// plane groups of the per-entry kernels: at least kPlanesPerGroup planes, at most 65535 groups
int planes_per_group(int64_t planes) {
  return static_cast<int>(std::max<int64_t>(kPlanesPerGroup, (planes + 65534) / 65535));
}

dim3 entry_grid(const SpectrumShape& s) {
  const int64_t E = s.H * (s.W / 2 + 1);
  const int per = planes_per_group(s.planes);
  return dim3(static_cast<unsigned>((E + kThreads - 1) / kThreads), static_cast<unsigned>((s.planes + per - 1) / per));
}

template <typename T>
void radial_grad_launch(T* F, const T* g, double scale, const SpectrumShape& s, cudaStream_t stream) {
  radial_grad_kernel<T><<<entry_grid(s), kThreads, 0, stream>>>(F, g, s.planes, planes_per_group(s.planes),
                                                                 static_cast<int>(s.H), static_cast<int>(s.W),
                                                                 static_cast<int>(s.R), static_cast<T>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------------
// spectral loss
// ------------------------------------------------------------------------------------------------
// workspace: one partial sum per block of entry_grid
int64_t loss_partials(const SpectrumShape& s) {
  const dim3 g = entry_grid(s);
  return static_cast<int64_t>(g.x) * g.y;
}

// part[blockIdx.y * gridDim.x + blockIdx.x] = sum over the block's entries and plane group of w * err
template <typename T, bool kError>
__global__ void loss_partials_kernel(const T* __restrict__ P, const T* __restrict__ Y, double* __restrict__ part,
                                     int64_t planes, int per_group, int H, int W, double lam, double f0) {
  using V = typename Vec2<T>::type;
  const int Wr = W / 2 + 1;
  const int E = H * Wr;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  double acc = 0.0;
  if (e < E) {
    const int i = e / Wr;
    const double w = loss_weight(i, e - i * Wr, H, W, lam, f0);
    const int64_t p0 = static_cast<int64_t>(blockIdx.y) * per_group;
    const int64_t p1 = min64(planes, p0 + per_group);
    const V* P2 = reinterpret_cast<const V*>(P);
    const V* Y2 = reinterpret_cast<const V*>(Y);
    double err = 0.0;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t idx = p * E + e;
      const V pv = P2[idx];
      if (kError) {
        const double re = pv.x, im = pv.y;
        err += re * re + im * im;
      } else {
        const V yv = Y2[idx];
        const double d = static_cast<double>(magnitude(pv.x, pv.y)) - static_cast<double>(magnitude(yv.x, yv.y));
        err += d * d;
      }
    }
    acc = w * err;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) part[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = acc;
}

// one block: out[0] = norm * sum(part), summed in a fixed order
template <typename T>
__global__ void loss_final_kernel(const double* __restrict__ part, int64_t nb, double norm, T* __restrict__ out) {
  double a = 0.0;
  for (int64_t k = threadIdx.x; k < nb; k += blockDim.x) a += part[k];
  a = block_sum(a);
  if (threadIdx.x == 0) out[0] = static_cast<T>(a * norm);
}

// grid entry_grid; G = f * S with f = coef (error) or coef * (|S| - |O|) / |S| (magnitude; 0 where
// |S| = 0, as autograd's sgn(0) = 0), coef = grad[0] * scale * w / c(j). S and O are only read.
template <typename T, typename Tg, bool kError>
__global__ void loss_grad_kernel(const T* __restrict__ S, const T* __restrict__ O, T* __restrict__ G,
                                 const Tg* __restrict__ grad, double scale, int64_t planes, int per_group, int H,
                                 int W, double lam, double f0) {
  using V = typename Vec2<T>::type;
  const int Wr = W / 2 + 1;
  const int E = H * Wr;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const int i = e / Wr, j = e - i * Wr;
  const double inv_c = (j == 0 || 2 * j == W) ? 1.0 : 0.5;  // the adjoint of rfft2 halves conjugate pairs
  const T coef = static_cast<T>(static_cast<double>(grad[0]) * scale * loss_weight(i, j, H, W, lam, f0) * inv_c);
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * per_group;
  const int64_t p1 = min64(planes, p0 + per_group);
  const V* S2 = reinterpret_cast<const V*>(S);
  const V* O2 = reinterpret_cast<const V*>(O);
  V* G2 = reinterpret_cast<V*>(G);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t idx = p * E + e;
    const V sv = S2[idx];
    T f = coef;
    if (!kError) {
      const V ov = O2[idx];
      const T as = magnitude(sv.x, sv.y), ao = magnitude(ov.x, ov.y);
      f = as > T(0) ? coef * (as - ao) / as : T(0);
    }
    G2[idx] = make_vec2<T>(sv.x * f, sv.y * f);
  }
}

template <typename T>
void loss_launch(const T* P, const T* Y, double lam, double f0, double norm, double* work, T* out,
                 const SpectrumShape& s, cudaStream_t stream) {
  const dim3 grid = entry_grid(s);
  const int H = static_cast<int>(s.H), W = static_cast<int>(s.W), per = planes_per_group(s.planes);
  if (Y == nullptr) {
    loss_partials_kernel<T, true><<<grid, kThreads, 0, stream>>>(P, Y, work, s.planes, per, H, W, lam, f0);
  } else {
    loss_partials_kernel<T, false><<<grid, kThreads, 0, stream>>>(P, Y, work, s.planes, per, H, W, lam, f0);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  loss_final_kernel<T><<<1, kFinalThreads, 0, stream>>>(work, loss_partials(s), norm, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Tg>
void loss_grad_launch(const T* S, const T* O, T* G, const Tg* grad, double scale, double lam, double f0,
                      const SpectrumShape& s, cudaStream_t stream) {
  const dim3 grid = entry_grid(s);
  const int H = static_cast<int>(s.H), W = static_cast<int>(s.W), per = planes_per_group(s.planes);
  if (O == nullptr) {
    loss_grad_kernel<T, Tg, true><<<grid, kThreads, 0, stream>>>(S, O, G, grad, scale, s.planes, per, H, W, lam, f0);
  } else {
    loss_grad_kernel<T, Tg, false><<<grid, kThreads, 0, stream>>>(S, O, G, grad, scale, s.planes, per, H, W, lam,
                                                                  f0);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t radial_workspace(const SpectrumShape& s) { return s.planes * radial_plan(s).chunks * s.R; }

void radial_spectrum(const float* F, double* work, float* out, double scale, const SpectrumShape& s,
                     cudaStream_t stream) {
  radial_launch<float>(F, work, out, scale, s, stream);
}

void radial_spectrum(const double* F, double* work, double* out, double scale, const SpectrumShape& s,
                     cudaStream_t stream) {
  radial_launch<double>(F, work, out, scale, s, stream);
}

void radial_spectrum_grad(float* F, const float* g, double scale, const SpectrumShape& s, cudaStream_t stream) {
  radial_grad_launch<float>(F, g, scale, s, stream);
}

void radial_spectrum_grad(double* F, const double* g, double scale, const SpectrumShape& s, cudaStream_t stream) {
  radial_grad_launch<double>(F, g, scale, s, stream);
}

int64_t loss_workspace(const SpectrumShape& s) { return loss_partials(s); }

void spectral_loss(const float* P, const float* Y, double lam, double f0, double norm, double* work, float* out,
                   const SpectrumShape& s, cudaStream_t stream) {
  loss_launch<float>(P, Y, lam, f0, norm, work, out, s, stream);
}

void spectral_loss(const double* P, const double* Y, double lam, double f0, double norm, double* work, double* out,
                   const SpectrumShape& s, cudaStream_t stream) {
  loss_launch<double>(P, Y, lam, f0, norm, work, out, s, stream);
}

void spectral_loss_grad(const float* S, const float* O, float* G, const float* grad, double scale, double lam,
                        double f0, const SpectrumShape& s, cudaStream_t stream) {
  loss_grad_launch<float, float>(S, O, G, grad, scale, lam, f0, s, stream);
}

void spectral_loss_grad(const float* S, const float* O, float* G, const double* grad, double scale, double lam,
                        double f0, const SpectrumShape& s, cudaStream_t stream) {
  loss_grad_launch<float, double>(S, O, G, grad, scale, lam, f0, s, stream);
}

void spectral_loss_grad(const double* S, const double* O, double* G, const double* grad, double scale, double lam,
                        double f0, const SpectrumShape& s, cudaStream_t stream) {
  loss_grad_launch<double, double>(S, O, G, grad, scale, lam, f0, s, stream);
}

}  // namespace cuda
}  // namespace irno
