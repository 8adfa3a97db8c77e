// CPU kernels of the 2-D spectral convolution (semantics: irno_kernels/spectral_conv.py,
// spectral_conv2d_ref):
//   y = irfft2(Mix(rfft2(x)), s=(H, W)), norm "forward" (1/(H*W) on the forward transform only)
//   x (B,Cin,H,W) real; weight (Cin,Cout,2*m1,m2) complex; rows 0..m1-1 of the weight act on the
//   H-frequencies 0..m1-1, rows m1..2m1-1 on -m1..-1; columns on the rfft frequencies 0..m2-1.
//
// Only K1 x m2 modes (K1 = 2*m1) survive, so no transform is computed in full and the zero modes
// are never touched:
//  * analysis (x -> kept modes): along W, one real GEMM with a (W, 2*m2) DFT matrix, or an rfft of
//    which m2 columns are kept; along H, a batched GEMM with a (2*K1, H) matrix that produces only
//    the K1 kept rows, or an FFT over the m2 kept columns only.
//  * synthesis (kept modes -> y): the same steps transposed (the matrices are shared); the FFT
//    form along H fills the kept rows of an m2-column spectrum whose other rows are zero.
// A GEMM beats an FFT while the mode count is small next to log2 of the grid (the usual FNO case):
// BLAS runs near peak on these shapes while an FFT passes the whole grid through memory several
// times; the FFT form takes over for wide mode counts (see *_by_gemm), and when both axes take it
// the analysis is one 2-D rfft, as little is left to prune.
//
// The channel contraction works on a planar copy of the kept modes, X (B, C, 2, M), M = K1*m2
// modes in the weight's (row, column) order, so that the weight is read in its own layout, once
// per call, and the inner loops run over contiguous modes. Its result goes straight into the
// operand that the synthesis needs (no zero-padded spectrum in the GEMM form).
//
// Backward, in PyTorch's convention for complex gradients (grad = dL/dRe + i dL/dIm):
//   grad_Y = c_k * DFT(grad_y) on the kept modes, c_k the multiplicity of rfft column k (2, or 1
//            for column 0 and the Nyquist column): the adjoint of irfft;
//   grad_X[b,i] = sum_o grad_Y[b,o] conj(W[i,o]);  grad_W[i,o] = sum_b grad_Y[b,o] conj(X[b,i]);
//   grad_x = (1/(H*W)) sum over kept modes of Re(grad_X e^{+i theta}) (each mode counted once).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "checks.h"

// The contraction loops are compiled twice on x86-64: for the baseline ISA and for AVX2+FMA,
// picked at run time (the extension is built without -march flags so that it runs anywhere).
#if defined(__GNUC__) && defined(__x86_64__)
#define IRNO_SC_X86 1
#define IRNO_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define IRNO_ALWAYS_INLINE inline
#endif

namespace irno {
namespace {

using Shape = SpectralConvShape;

Shape check_args(const at::Tensor& x, const at::Tensor& weight) { return check_spectral_conv_args(x, weight); }

// ---------------------------------------------------------------------------------------------
// which transform serves each axis
// ---------------------------------------------------------------------------------------------
// Flop counts (GEMM: 2 per multiply-add; FFT: ~2.5 n log2 n real, ~5 n log2 n complex) weighed by
// how much faster the GEMM form runs per flop than the FFT form, fitted to the measured crossovers
// on the development CPU (MKL, AVX-512, 1 thread): along W the GEMM wins up to m2 ~ 4.4 log2(W)
// (27 modes for W = 64, 35 for W = 256); along H up to 2*m1 ~ 10 log2(H) (the FFT form there also
// pays for moving the transform axis last, which torch's FFT does with copies).
constexpr double kGemmAdvantageW = 7.0;
constexpr double kGemmAdvantageH = 16.0;

double log2_at_least_1(int64_t n) { return std::max(1.0, std::log2(static_cast<double>(n))); }

bool w_by_gemm(const Shape& s) {  // per row of length W: 2*m2 real outputs vs one real FFT
  const double gemm = 2.0 * s.W * 2.0 * s.m2;
  const double fft = 2.5 * s.W * log2_at_least_1(s.W);
  return gemm <= kGemmAdvantageW * fft;
}

bool h_by_gemm(const Shape& s) {  // per kept column: K1 complex outputs vs one complex FFT of length H
  const double gemm = 2.0 * (2.0 * s.K1()) * (2.0 * s.H);
  const double fft = 5.0 * s.H * log2_at_least_1(s.H);
  return gemm <= kGemmAdvantageH * fft;
}

// ---------------------------------------------------------------------------------------------
// DFT matrices; every entry is cos or sin of 2*pi*j/n for an integer j, read from one table
// ---------------------------------------------------------------------------------------------
struct Twiddles {
  std::vector<double> c, s;
  explicit Twiddles(int64_t n) : c(n), s(n) {
    for (int64_t j = 0; j < n; ++j) {
      const double a = 2.0 * M_PI * static_cast<double>(j) / static_cast<double>(n);
      c[j] = std::cos(a);
      s[j] = std::sin(a);
    }
  }
};

// (W, 2*m2), columns (k, re/im): row @ F = sum_w x[w] e^{-2 pi i k w / W} (interleaved).
// Its transpose maps interleaved U back: (U @ F^T)[w] = sum_k Re(U_k e^{+2 pi i k w / W}).
at::Tensor w_matrix(int64_t W, int64_t m2, at::ScalarType dtype) {
  const Twiddles tw(W);
  at::Tensor F = at::empty({W, 2 * m2}, at::TensorOptions().dtype(at::kDouble));
  double* f = F.data_ptr<double>();
  for (int64_t w = 0; w < W; ++w) {
    for (int64_t k = 0; k < m2; ++k) {
      const int64_t j = (k * w) % W;
      f[w * 2 * m2 + 2 * k] = tw.c[j];
      f[w * 2 * m2 + 2 * k + 1] = -tw.s[j];
    }
  }
  return F.to(dtype);
}

// H-frequency (mod H) of kept row r: 0..m1-1, then -m1..-1.
int64_t row_freq(int64_t r, int64_t m1, int64_t H) { return r < m1 ? r : H - 2 * m1 + r; }

// (2*K1, H): rows r = cos(phi_r h), rows K1+r = sin(phi_r h), phi_r = 2 pi f_r / H.
// For one column T (H, complex, interleaved in the GEMM's columns) P = A @ T gives
// X_r = sum_h T_h e^{-i phi_r h} = (P_r.re + P_{K1+r}.im) + i (P_r.im - P_{K1+r}.re);
// and A^T @ [Y; iY] = sum_r Y_r e^{+i phi_r h}.
at::Tensor h_matrix(int64_t H, int64_t m1, at::ScalarType dtype) {
  const Twiddles tw(H);
  const int64_t K1 = 2 * m1;
  at::Tensor A = at::empty({2 * K1, H}, at::TensorOptions().dtype(at::kDouble));
  double* a = A.data_ptr<double>();
  for (int64_t r = 0; r < K1; ++r) {
    const int64_t f = row_freq(r, m1, H);
    for (int64_t h = 0; h < H; ++h) {
      const int64_t j = (f * h) % H;
      a[r * H + h] = tw.c[j];
      a[(K1 + r) * H + h] = tw.s[j];
    }
  }
  return A.to(dtype);
}

// multiplicity of rfft column k: 1 for column 0 and the Nyquist column of an even W, else 2
double multiplicity(int64_t k, int64_t W) { return (k == 0 || 2 * k == W) ? 1.0 : 2.0; }

// ---------------------------------------------------------------------------------------------
// analysis: x (B, C, H, W) -> planar kept modes X (B, C, 2, M), X = scale[k] * sum x e^{-i theta}
// ---------------------------------------------------------------------------------------------
template <typename T>
void gather_modes(const T* src, int64_t n_stride, int64_t row_stride, T* X, const Shape& s, int64_t N,
                  const std::vector<double>& scale, bool from_gemm) {
  // from_gemm: src is P (N, 2*K1, m2, 2); X_r = (P_r.re + P_{K1+r}.im) + i (P_r.im - P_{K1+r}.re)
  // else:      src is F (N, H, >= m2, 2), spectrum rows with the kept ones at row_freq(r)
  const int64_t K1 = s.K1(), m2 = s.m2, M = s.M();
  std::vector<T> fac(m2);
  for (int64_t k = 0; k < m2; ++k) fac[k] = static_cast<T>(scale[k]);
  const int64_t grain = std::max<int64_t>(1, 32768 / M);  // small spectra: one thread, no fork/join
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* xr = X + n * 2 * M;
      T* xi = xr + M;
      const T* base = src + n * n_stride;
      for (int64_t r = 0; r < K1; ++r) {
        if (from_gemm) {
          const T* pc = base + r * row_stride;
          const T* ps = base + (K1 + r) * row_stride;
          for (int64_t k = 0; k < m2; ++k) {
            xr[r * m2 + k] = (pc[2 * k] + ps[2 * k + 1]) * fac[k];
            xi[r * m2 + k] = (pc[2 * k + 1] - ps[2 * k]) * fac[k];
          }
        } else {
          const T* pf = base + row_freq(r, s.m1, s.H) * row_stride;
          for (int64_t k = 0; k < m2; ++k) {
            xr[r * m2 + k] = pf[2 * k] * fac[k];
            xi[r * m2 + k] = pf[2 * k + 1] * fac[k];
          }
        }
      }
    }
  });
}

at::Tensor analysis(const at::Tensor& x, const Shape& s, int64_t C, const std::vector<double>& scale) {
  const int64_t B = s.B, H = s.H, W = s.W, m2 = s.m2, K1 = s.K1(), N = B * C;
  const auto dtype = x.scalar_type();
  const bool gemm_w = w_by_gemm(s), gemm_h = h_by_gemm(s);
  at::Tensor src;  // P (N, 2*K1, m2, 2) from the GEMM along H, else F (N, H, >= m2, 2) spectrum rows
  if (!gemm_w && !gemm_h) {
    // wide modes on both axes: little to prune, and one 2-D rfft beats two 1-D passes
    src = at::view_as_real(at::fft_rfft2(x, c10::nullopt, {-2, -1}, "backward")).reshape({N, H, W / 2 + 1, 2});
  } else {
    // T (N, H, m2, 2): the W-transform of every row, kept columns only; strided after an rfft
    const at::Tensor T =
        gemm_w ? at::mm(x.contiguous().view({N * H, W}), w_matrix(W, m2, dtype)).view({N, H, m2, 2})
               : at::view_as_real(at::fft_rfft(x, c10::nullopt, -1, "backward").narrow(-1, 0, m2))
                     .reshape({N, H, m2, 2});
    if (gemm_h) {
      const at::Tensor A = h_matrix(H, s.m1, dtype).expand({N, 2 * K1, H});
      src = at::bmm(A, T.reshape({N, H, 2 * m2})).view({N, 2 * K1, m2, 2});
    } else {  // the H-FFT of the kept columns only
      src = at::view_as_real(at::fft_fft(at::view_as_complex(T), c10::nullopt, 1, "backward"));
    }
  }
  src = src.contiguous();
  at::Tensor X = at::empty({B, C, 2, s.M()}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "spectral_conv2d_gather", [&] {
    gather_modes<scalar_t>(src.data_ptr<scalar_t>(), src.size(1) * src.size(2) * 2, src.size(2) * 2,
                           X.data_ptr<scalar_t>(), s, N, scale, gemm_h);
  });
  return X;
}

// ---------------------------------------------------------------------------------------------
// where the contraction writes: the operand of the synthesis' H-step
//   GEMM form: Q (N, 2*K1, m2, 2) = [V; iV] (interleaved), so that A^T @ Q = sum_r V_r e^{+i phi_r h}
//   FFT form:  S (N, H, m2, 2), zero outside the kept rows, V at row_freq(r)
// with V = fac[k] * value; fac folds in the column weights of the synthesis.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Sink {
  T* base = nullptr;
  int64_t n_stride = 0;         // elements per (b, channel)
  std::vector<int64_t> offset;  // per mode m = r*m2 + k: where V_m's real part goes, from the (b, channel) base
  std::vector<T> fac;           // per mode
  int64_t aug = -1;             // offset of iV from V, or -1 (FFT form)

  IRNO_ALWAYS_INLINE void put(int64_t n, int64_t m0, int64_t len, const T* vr, const T* vi) const {
    T* b = base + n * n_stride;
    for (int64_t j = 0; j < len; ++j) {
      const int64_t m = m0 + j;
      const T re = vr[j] * fac[m], im = vi[j] * fac[m];
      T* d = b + offset[m];
      d[0] = re;
      d[1] = im;
      if (aug >= 0) {
        d[aug] = -im;
        d[aug + 1] = re;
      }
    }
  }
};

struct SynthesisPlan {
  bool gemm_h, gemm_w;
  at::Tensor operand;  // Q or S
};

// Allocates the synthesis operand for N = B*C rows and describes how to write into it.
template <typename T>
SynthesisPlan make_sink(Sink<T>& sink, const Shape& s, int64_t N, const std::vector<double>& scale,
                        const at::TensorOptions& opts) {
  const int64_t K1 = s.K1(), m2 = s.m2, M = s.M();
  SynthesisPlan plan{h_by_gemm(s), w_by_gemm(s), at::Tensor()};
  // irfft weighs column k by its multiplicity itself; the GEMM does not
  sink.fac.resize(M);
  sink.offset.resize(M);
  for (int64_t r = 0; r < K1; ++r) {
    for (int64_t k = 0; k < m2; ++k) {
      const double f = plan.gemm_w ? scale[k] : scale[k] / multiplicity(k, s.W);
      sink.fac[r * m2 + k] = static_cast<T>(f);
      const int64_t row = plan.gemm_h ? r : row_freq(r, s.m1, s.H);
      sink.offset[r * m2 + k] = (row * m2 + k) * 2;
    }
  }
  if (plan.gemm_h) {
    plan.operand = at::empty({N, 2 * K1, m2, 2}, opts);
    sink.n_stride = 2 * K1 * m2 * 2;
    sink.aug = K1 * m2 * 2;
  } else {
    plan.operand = at::zeros({N, s.H, m2, 2}, opts);
    sink.n_stride = s.H * m2 * 2;
    sink.aug = -1;
  }
  sink.base = plan.operand.data_ptr<T>();
  return plan;
}

at::Tensor synthesis(const SynthesisPlan& plan, const Shape& s, int64_t C, const at::TensorOptions& opts) {
  const int64_t B = s.B, H = s.H, W = s.W, m2 = s.m2, K1 = s.K1(), N = B * C;
  const auto dtype = opts.dtype().toScalarType();
  at::Tensor U;  // (N, H, 2*m2) interleaved: sum over kept rows of V_r e^{+i phi_r h}
  if (plan.gemm_h) {
    U = at::bmm(h_matrix(H, s.m1, dtype).t().expand({N, H, 2 * K1}), plan.operand.view({N, 2 * K1, 2 * m2}));
  } else {
    U = at::view_as_real(at::fft_ifft(at::view_as_complex(plan.operand), c10::nullopt, 1, "forward"));
  }
  if (plan.gemm_w) {
    at::Tensor y = at::empty({B, C, H, W}, opts);
    at::Tensor y2d = y.view({N * H, W});
    at::mm_out(y2d, U.reshape({N * H, 2 * m2}), w_matrix(W, m2, dtype).t());
    return y;
  }
  return at::fft_irfft(at::view_as_complex(U.reshape({N, H, m2, 2})), W, -1, "forward").view({B, C, H, W});
}

// ---------------------------------------------------------------------------------------------
// channel contraction over contiguous chunks of modes
// ---------------------------------------------------------------------------------------------
constexpr int64_t kChunk = 64;

// For output channel p and modes [m0, m0+len): V(b, p) = sum_q In(b, q) * Wt(q, p), with
// Wt(q, p) = weight[q, p] (forward; q over C_in) or conj(weight[p, q]) (grad of x; q over C_out).
// In: planar (B, n_in, 2, M). weight: (C_in, C_out, M) complex. wbuf: 2*kChunk*n_in scratch.
template <typename T, bool kAdjoint>
IRNO_ALWAYS_INLINE void contract_chunk(const T* in, const c10::complex<T>* weight, int64_t B, int64_t n_in,
                                       int64_t co_w, int64_t M, int64_t n_out, int64_t p, int64_t m0, int64_t len,
                                       T* wbuf, const Sink<T>& sink) {
  for (int64_t q = 0; q < n_in; ++q) {
    const c10::complex<T>* w = weight + (kAdjoint ? p * co_w + q : q * co_w + p) * M + m0;
    T* wr = wbuf + q * 2 * kChunk;
    T* wi = wr + kChunk;
    for (int64_t j = 0; j < len; ++j) {
      wr[j] = w[j].real();
      wi[j] = kAdjoint ? -w[j].imag() : w[j].imag();
    }
  }
  T vr[kChunk], vi[kChunk];
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < len; ++j) vr[j] = vi[j] = T(0);
    for (int64_t q = 0; q < n_in; ++q) {
      const T* xr = in + (b * n_in + q) * 2 * M + m0;
      const T* xi = xr + M;
      const T* wr = wbuf + q * 2 * kChunk;
      const T* wi = wr + kChunk;
      for (int64_t j = 0; j < len; ++j) {
        vr[j] += xr[j] * wr[j] - xi[j] * wi[j];
        vi[j] += xr[j] * wi[j] + xi[j] * wr[j];
      }
    }
    sink.put(b * n_out + p, m0, len, vr, vi);
  }
}

// grad_weight[i, o, m] = sum_b G(b, o, m) * conj(X(b, i, m)) for modes [m0, m0+len)
template <typename T>
IRNO_ALWAYS_INLINE void weight_grad_chunk(const T* g, const T* x, c10::complex<T>* gw, int64_t B, int64_t Ci,
                                          int64_t Co, int64_t M, int64_t i, int64_t m0, int64_t len) {
  T ar[kChunk], ai[kChunk];
  for (int64_t o = 0; o < Co; ++o) {
    for (int64_t j = 0; j < len; ++j) ar[j] = ai[j] = T(0);
    for (int64_t b = 0; b < B; ++b) {
      const T* gr = g + (b * Co + o) * 2 * M + m0;
      const T* gi = gr + M;
      const T* xr = x + (b * Ci + i) * 2 * M + m0;
      const T* xi = xr + M;
      for (int64_t j = 0; j < len; ++j) {
        ar[j] += gr[j] * xr[j] + gi[j] * xi[j];
        ai[j] += gi[j] * xr[j] - gr[j] * xi[j];
      }
    }
    T* d = reinterpret_cast<T*>(gw + (i * Co + o) * M + m0);  // interleaved (re, im)
    for (int64_t j = 0; j < len; ++j) {
      d[2 * j] = ar[j];
      d[2 * j + 1] = ai[j];
    }
  }
}

#ifdef IRNO_SC_X86
template <typename T, bool kAdjoint>
__attribute__((target("avx2,fma"))) void contract_chunk_avx2(const T* in, const c10::complex<T>* weight, int64_t B,
                                                             int64_t n_in, int64_t co_w, int64_t M, int64_t n_out,
                                                             int64_t p, int64_t m0, int64_t len, T* wbuf,
                                                             const Sink<T>& sink) {
  contract_chunk<T, kAdjoint>(in, weight, B, n_in, co_w, M, n_out, p, m0, len, wbuf, sink);
}

template <typename T>
__attribute__((target("avx2,fma"))) void weight_grad_chunk_avx2(const T* g, const T* x, c10::complex<T>* gw,
                                                                int64_t B, int64_t Ci, int64_t Co, int64_t M,
                                                                int64_t i, int64_t m0, int64_t len) {
  weight_grad_chunk<T>(g, x, gw, B, Ci, Co, M, i, m0, len);
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

template <typename T, bool kAdjoint>
void contract(const at::Tensor& in, const at::Tensor& weight, const Shape& s, int64_t n_in, int64_t n_out,
              const Sink<T>& sink) {
  const int64_t M = s.M(), nchunks = (M + kChunk - 1) / kChunk;
  const T* src = in.data_ptr<T>();
  const auto* w = weight.data_ptr<c10::complex<T>>();
#ifdef IRNO_SC_X86
  const bool avx2 = cpu_has_avx2_fma();
#endif
  const int64_t grain = std::max<int64_t>(1, 32768 / (s.B * n_in * kChunk));  // tiny contractions: one thread
  at::parallel_for(0, n_out * nchunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> wbuf(2 * kChunk * n_in);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / nchunks, m0 = (t % nchunks) * kChunk, len = std::min(kChunk, M - m0);
#ifdef IRNO_SC_X86
      if (avx2) {
        contract_chunk_avx2<T, kAdjoint>(src, w, s.B, n_in, s.Co, M, n_out, p, m0, len, wbuf.data(), sink);
        continue;
      }
#endif
      contract_chunk<T, kAdjoint>(src, w, s.B, n_in, s.Co, M, n_out, p, m0, len, wbuf.data(), sink);
    }
  });
}

template <typename T>
void weight_grad(const at::Tensor& G, const at::Tensor& X, at::Tensor& grad_w, const Shape& s) {
  const int64_t M = s.M(), nchunks = (M + kChunk - 1) / kChunk;
  const T* g = G.data_ptr<T>();
  const T* x = X.data_ptr<T>();
  auto* gw = grad_w.data_ptr<c10::complex<T>>();
#ifdef IRNO_SC_X86
  const bool avx2 = cpu_has_avx2_fma();
#endif
  const int64_t grain = std::max<int64_t>(1, 32768 / (s.B * s.Co * kChunk));
  at::parallel_for(0, s.Ci * nchunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / nchunks, m0 = (t % nchunks) * kChunk, len = std::min(kChunk, M - m0);
#ifdef IRNO_SC_X86
      if (avx2) {
        weight_grad_chunk_avx2<T>(g, x, gw, s.B, s.Ci, s.Co, M, i, m0, len);
        continue;
      }
#endif
      weight_grad_chunk<T>(g, x, gw, s.B, s.Ci, s.Co, M, i, m0, len);
    }
  });
}

// Contract the planar modes `in` with the weight and synthesise the result on the grid:
// forward (in = X, channels C_in -> C_out) or grad of x (in = grad_Y, channels C_out -> C_in).
template <bool kAdjoint>
at::Tensor contract_and_synthesise(const at::Tensor& in, const at::Tensor& weight, const Shape& s,
                                   const std::vector<double>& scale, const at::TensorOptions& opts) {
  const int64_t n_in = kAdjoint ? s.Co : s.Ci, n_out = kAdjoint ? s.Ci : s.Co;
  const at::Tensor wc = weight.contiguous();
  SynthesisPlan plan;
  AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "spectral_conv2d_contract", [&] {
    Sink<scalar_t> sink;
    plan = make_sink<scalar_t>(sink, s, s.B * n_out, scale, opts);
    contract<scalar_t, kAdjoint>(in, wc, s, n_in, n_out, sink);
  });
  return synthesis(plan, s, n_out, opts);
}

std::vector<double> multiplicities(const Shape& s) {
  std::vector<double> c(s.m2);
  for (int64_t k = 0; k < s.m2; ++k) c[k] = multiplicity(k, s.W);
  return c;
}

// ---------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------
at::Tensor spectral_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight) {
  const Shape s = check_args(x, weight);
  const std::vector<double> inv_n(s.m2, 1.0 / static_cast<double>(s.H * s.W));  // norm="forward"
  const at::Tensor X = analysis(x, s, s.Ci, inv_n);
  return contract_and_synthesise<false>(X, weight, s, multiplicities(s), x.options());
}

std::tuple<at::Tensor, at::Tensor> spectral_conv2d_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                                const at::Tensor& weight) {
  const Shape s = check_args(x, weight);
  check_spectral_conv_grad(grad_y, x, s);
  const std::vector<double> inv_n(s.m2, 1.0 / static_cast<double>(s.H * s.W));
  const at::Tensor G = analysis(grad_y, s, s.Co, multiplicities(s));
  const at::Tensor X = analysis(x, s, s.Ci, inv_n);
  at::Tensor grad_x = contract_and_synthesise<true>(G, weight, s, inv_n, x.options());
  at::Tensor grad_w = at::empty(weight.sizes(), weight.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spectral_conv2d_weight_grad",
                             [&] { weight_grad<scalar_t>(G, X, grad_w, s); });
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(irno, CPU, m) {
  m.impl("spectral_conv2d", &spectral_conv2d_cpu);
  m.impl("spectral_conv2d_backward", &spectral_conv2d_backward_cpu);
}

}  // namespace irno
