// CPU kernels of the radial spectrum and the progressive spectral loss
// (semantics: irno_kernels/spectrum.py, radial_spectrum_ref / spectral_loss_ref; DESIGN 3.3).
//
// The spectra come from at::fft_rfft2(norm="ortho"); everything after the FFT is one fused pass over
// the complex entries, with the shell index or the loss weight read from a small table of
// (H, W/2+1) entries (the weights' cached per grid and (lam, f0): csrc/spectrum_weights.h).
// Nothing weighted is materialised.
//
// Reductions are deterministic: the work is cut into chunks whose size depends on the shape only
// (never on the thread count), each chunk sums into its own double, and the chunk sums are added in
// order at the end. No atomics.
//
// Backward uses the adjoint of rfft2. For a gradient G with respect to the (B,C,H,W/2+1) spectrum,
// the gradient with respect to the real field is Re(sum_k G_k e^{+i k.x}) / sqrt(HW) over the kept
// half spectrum, which is irfft2(G') with G' = G on the edge columns (0 and, for even W, W/2) and
// G / 2 on the others (irfft2 counts those twice and takes only the real part of the edge columns).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "checks.h"
#include "spectrum_weights.h"

namespace irno {
namespace {

// entries per chunk of a reduction; chunks are whole rows of the (H, W/2+1) spectrum
constexpr int64_t kChunkEntries = 1 << 14;
// below this many images a radial spectrum also splits each image into row blocks
constexpr int64_t kMinImagesPerTask = 16;

// ------------------------------------------------------------------------------------------------
// frequency tables (the arithmetic mirrors torch.fft.fftfreq / rfftfreq in float64, so the shell
// of every entry is the reference's bit for bit)
// ------------------------------------------------------------------------------------------------
inline double fftfreq(int64_t i, int64_t n) {
  const int64_t k = i < (n + 1) / 2 ? i : i - n;
  return static_cast<double>(k) * (1.0 / static_cast<double>(n));
}

inline double rfftfreq(int64_t j, int64_t n) { return static_cast<double>(j) * (1.0 / static_cast<double>(n)); }

// fy^2 + fx^2 of row i, column j of the rfft2 grid
inline double freq_sq(int64_t i, int64_t j, int64_t H, int64_t W) {
  const double fy = fftfreq(i, H);
  const double fx = rfftfreq(j, W);
  return fy * fy + fx * fx;
}

// round(max(H, W) * |f|) per entry, half to even like torch.round
std::vector<int32_t> shell_table(int64_t H, int64_t W) {
  const int64_t Wr = W / 2 + 1;
  const double L = static_cast<double>(std::max(H, W));
  std::vector<int32_t> shell(H * Wr);
  for (int64_t i = 0; i < H; ++i) {
    for (int64_t j = 0; j < Wr; ++j) {
      shell[i * Wr + j] = static_cast<int32_t>(std::nearbyint(L * std::sqrt(freq_sq(i, j, H, W))));
    }
  }
  return shell;
}

int64_t num_shells(int64_t H, int64_t W) {
  const double L = static_cast<double>(std::max(H, W));
  const double fy = fftfreq(H / 2, H), fx = rfftfreq(W / 2, W);  // the corner has the largest |f|
  return 1 + static_cast<int64_t>(std::nearbyint(L * std::sqrt(fy * fy + fx * fx)));
}

// w(f) = 1 + (|f| / f0)^lam per entry (not normalised); returns the sum over the table.
// Rows i and H - i share |fy|, so only rows 0..H/2 are evaluated.
// rows 0 .. H/2 of the (H, W/2+1) table of 1 + (|f| / f0)^lam; row i >= H/2 + 1 equals row H - i
void weight_half_rows(int64_t H, int64_t W, double lam, double f0, std::vector<double>& w) {
  const int64_t Wr = W / 2 + 1;
  const int64_t half = H / 2 + 1;
  w.resize(half * Wr);
  at::parallel_for(0, half, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double* row = w.data() + i * Wr;
      for (int64_t j = 0; j < Wr; ++j) row[j] = 1.0 + std::pow(std::sqrt(freq_sq(i, j, H, W)) / f0, lam);
    }
  });
}

inline int64_t mirrored_row(int64_t i, int64_t H) { return i <= H / 2 ? i : H - i; }

void build_weight_table(int64_t H, int64_t W, double lam, double f0, std::vector<double>& w) {
  const int64_t Wr = W / 2 + 1;
  weight_half_rows(H, W, lam, f0, w);
  w.resize(H * Wr);
  for (int64_t i = H / 2 + 1; i < H; ++i) std::copy_n(w.data() + mirrored_row(i, H) * Wr, Wr, w.data() + i * Wr);
}

// 1 / c per column: the adjoint of rfft2 halves the columns that stand for a conjugate pair
inline double inv_multiplicity(int64_t j, int64_t W) { return (j == 0 || 2 * j == W) ? 1.0 : 0.5; }

at::Tensor spectrum_of(const at::Tensor& x) {
  return at::fft_rfft2(x, c10::nullopt, {-2, -1}, "ortho").contiguous();
}

// irfft2 is torch's adjoint-friendly inverse: a complex inverse FFT along H, then a 1-D inverse
// real FFT along W that reads only the real part of the edge columns.
at::Tensor adjoint_rfft2(const at::Tensor& G, int64_t H, int64_t W) {
  return at::fft_irfft2(G, at::IntArrayRef({H, W}), {-2, -1}, "ortho");
}

// rows of the (images*H, Wr) spectrum per reduction chunk: depends on the shape only
inline int64_t rows_per_chunk(int64_t Wr) { return std::max<int64_t>(1, kChunkEntries / Wr); }

// |z| of n complex numbers. The loss loops are bound by these square roots, and GCC vectorises
// std::sqrt only under -fno-math-errno, so x86-64 (where SSE2 is always present) does it by hand.
template <typename T>
inline void magnitudes(const c10::complex<T>* z, T* out, int64_t n) {
  int64_t j = 0;
#if defined(__SSE2__)
  const T* p = reinterpret_cast<const T*>(z);  // (re, im) pairs
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 4 <= n; j += 4) {
      __m128 a = _mm_loadu_ps(p + 2 * j), b = _mm_loadu_ps(p + 2 * j + 4);
      a = _mm_mul_ps(a, a);
      b = _mm_mul_ps(b, b);
      const __m128 re2 = _mm_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
      const __m128 im2 = _mm_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
      _mm_storeu_ps(out + j, _mm_sqrt_ps(_mm_add_ps(re2, im2)));
    }
  } else if constexpr (std::is_same_v<T, double>) {
    for (; j + 2 <= n; j += 2) {
      __m128d a = _mm_loadu_pd(p + 2 * j), b = _mm_loadu_pd(p + 2 * j + 2);
      a = _mm_mul_pd(a, a);
      b = _mm_mul_pd(b, b);
      _mm_storeu_pd(out + j, _mm_sqrt_pd(_mm_add_pd(_mm_unpacklo_pd(a, b), _mm_unpackhi_pd(a, b))));
    }
  }
#endif
  for (; j < n; ++j) {
    const T re = z[j].real(), im = z[j].imag();
    out[j] = std::sqrt(re * re + im * im);
  }
}

// sum_j term(j) over j < n with four independent accumulators (a fixed order: deterministic)
template <typename Term>
inline void accumulate(std::array<double, 4>& acc, int64_t n, const Term& term) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    acc[0] += term(j);
    acc[1] += term(j + 1);
    acc[2] += term(j + 2);
    acc[3] += term(j + 3);
  }
  for (; j < n; ++j) acc[0] += term(j);
}

inline double fold(const std::array<double, 4>& acc) { return (acc[0] + acc[1]) + (acc[2] + acc[3]); }

// ------------------------------------------------------------------------------------------------
// radial spectrum
// ------------------------------------------------------------------------------------------------
// Neighbouring entries of a row often share a shell; four interleaved histograms (by column mod 4)
// keep the additions into one bin from forming a single dependency chain.
constexpr int64_t kHistCopies = 4;
static_assert(kHistCopies == 4, "radial_kernel folds exactly four histograms");

template <typename T>
void radial_kernel(T* out, const c10::complex<T>* F, const int32_t* shell, int64_t images, int64_t H,
                   int64_t W, int64_t R) {
  const int64_t Wr = W / 2 + 1;
  // few images: cut each into row blocks whose histograms are summed in block order afterwards
  const int64_t rows = images >= kMinImagesPerTask ? H : std::min(H, rows_per_chunk(Wr));
  const int64_t blocks = (H + rows - 1) / rows;
  std::vector<double> partial(blocks > 1 ? images * blocks * R : 0);
  at::parallel_for(0, images * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> hist(kHistCopies * R);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t img = t / blocks, i0 = (t % blocks) * rows, i1 = std::min(H, i0 + rows);
      std::fill(hist.begin(), hist.end(), 0.0);
      for (int64_t i = i0; i < i1; ++i) {
        const c10::complex<T>* Fi = F + (img * H + i) * Wr;
        const int32_t* si = shell + i * Wr;
        for (int64_t j = 0; j < Wr; ++j) {
          const double re = static_cast<double>(Fi[j].real()), im = static_cast<double>(Fi[j].imag());
          const double e = re * re + im * im;
          hist[(j % kHistCopies) * R + si[j]] += (j == 0 || 2 * j == W) ? e : 2.0 * e;
        }
      }
      double* dst = blocks == 1 ? nullptr : partial.data() + t * R;
      for (int64_t r = 0; r < R; ++r) {
        const double v = (hist[r] + hist[R + r]) + (hist[2 * R + r] + hist[3 * R + r]);
        if (dst != nullptr) {
          dst[r] = v;
        } else {
          out[img * R + r] = static_cast<T>(v);
        }
      }
    }
  });
  if (blocks > 1) {
    at::parallel_for(0, images, 1, [&](int64_t begin, int64_t end) {
      for (int64_t img = begin; img < end; ++img) {
        for (int64_t r = 0; r < R; ++r) {
          double s = 0.0;
          for (int64_t b = 0; b < blocks; ++b) s += partial[(img * blocks + b) * R + r];
          out[img * R + r] = static_cast<T>(s);
        }
      }
    });
  }
}

at::Tensor radial_spectrum_cpu(const at::Tensor& x) {
  check_field(x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t R = num_shells(H, W);
  const at::Tensor F = spectrum_of(x);
  const std::vector<int32_t> shell = shell_table(H, W);
  at::Tensor out = at::empty({B, C, R}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "radial_spectrum_cpu", [&] {
    radial_kernel<scalar_t>(out.mutable_data_ptr<scalar_t>(), F.const_data_ptr<c10::complex<scalar_t>>(), shell.data(),
                            B * C, H, W, R);
  });
  return out;
}

// dE[r]/dF = 2 c F on shell r; with the adjoint's 1/c the column factor cancels: G' = 2 g[r] F.
at::Tensor radial_spectrum_backward_cpu(const at::Tensor& grad, const at::Tensor& x) {
  check_field(x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Wr = W / 2 + 1;
  const int64_t R = num_shells(H, W);
  check_radial_grad(grad, x, R);
  const at::Tensor g = grad.contiguous();
  at::Tensor F = spectrum_of(x);  // overwritten with the gradient spectrum
  const std::vector<int32_t> shell = shell_table(H, W);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "radial_spectrum_backward_cpu", [&] {
    c10::complex<scalar_t>* Fp = F.mutable_data_ptr<c10::complex<scalar_t>>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * C * H, rows_per_chunk(Wr), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* gi = gp + (row / H) * R;
        const int32_t* si = shell.data() + (row % H) * Wr;
        c10::complex<scalar_t>* Fi = Fp + row * Wr;
        for (int64_t j = 0; j < Wr; ++j) Fi[j] *= static_cast<scalar_t>(2) * gi[si[j]];
      }
    });
  });
  return adjoint_rfft2(F, H, W);
}

// ------------------------------------------------------------------------------------------------
// spectral loss
// ------------------------------------------------------------------------------------------------
// sum over entries of w * (|P| - |Y|)^2 (Y != nullptr) or w * |P|^2 (P holds F(pred - target))
template <typename T>
double loss_sum(const c10::complex<T>* P, const c10::complex<T>* Y, const double* w, int64_t images,
                int64_t H, int64_t Wr) {
  const int64_t rows = images * H, per = rows_per_chunk(Wr);
  const int64_t chunks = (rows + per - 1) / per;
  std::vector<double> partial(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ap(Wr), ay(Wr);
    for (int64_t c = begin; c < end; ++c) {
      std::array<double, 4> acc{};
      for (int64_t row = c * per, stop = std::min(rows, row + per); row < stop; ++row) {
        const double* wi = w + (row % H) * Wr;
        const c10::complex<T>* Pi = P + row * Wr;
        if (Y != nullptr) {
          magnitudes(Pi, ap.data(), Wr);
          magnitudes(Y + row * Wr, ay.data(), Wr);
          accumulate(acc, Wr, [&](int64_t j) {
            const double d = static_cast<double>(ap[j]) - static_cast<double>(ay[j]);
            return wi[j] * (d * d);
          });
        } else {
          accumulate(acc, Wr, [&](int64_t j) {
            const double re = Pi[j].real(), im = Pi[j].imag();
            return wi[j] * (re * re + im * im);
          });
        }
      }
      partial[c] = fold(acc);
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spectral_loss_spectra_cpu(const at::Tensor& pred,
                                                                         const at::Tensor& target, double lam,
                                                                         double f0, c10::string_view mode) {
  check_loss_args(pred, target, lam, f0);
  const LossMode m = parse_loss_mode(mode);
  const int64_t B = pred.size(0), C = pred.size(1), H = pred.size(2), W = pred.size(3), Wr = W / 2 + 1;
  const auto weights = loss_weights(H, W, lam, f0);
  // F(p - y) = F(p) - F(y): the error mode needs one transform, not two
  const at::Tensor P = spectrum_of(m == LossMode::kError ? pred - target : pred);
  const at::Tensor Y = m == LossMode::kMagnitude ? spectrum_of(target) : P.new_empty({0});
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "spectral_loss_cpu", [&] {
    total = loss_sum<scalar_t>(P.const_data_ptr<c10::complex<scalar_t>>(),
                               m == LossMode::kMagnitude ? Y.const_data_ptr<c10::complex<scalar_t>>() : nullptr,
                               weights->w.data(), B * C, H, Wr);
  });
  // mean over the B*C*H*Wr entries of w / mean(w) * e = total / (B*C * sum(w))
  return {at::scalar_tensor(total / (static_cast<double>(B * C) * loss_weight_sum(H, W, lam, f0)), pred.options()), P, Y};
}

at::Tensor spectral_loss_cpu(const at::Tensor& pred, const at::Tensor& target, double lam, double f0,
                             c10::string_view mode) {
  return std::get<0>(spectral_loss_spectra_cpu(pred, target, lam, f0, mode));
}

// Gradient of the loss with respect to the spectrum S of pred (or target), written to G (S is only
// read: the forward's saved spectra need no copy). S = F(pred) (or F(target)) in magnitude mode,
// where `other` is the other input's spectrum; S = F(pred - target) in error mode (other == nullptr).
// coef holds +-2 * grad * w / (B*C * sum w) / c.
template <typename T>
void loss_grad_spectrum(const c10::complex<T>* S, const c10::complex<T>* other, const T* coef,
                        c10::complex<T>* G, int64_t images, int64_t H, int64_t Wr) {
  at::parallel_for(0, images * H, rows_per_chunk(Wr), [&](int64_t begin, int64_t end) {
    std::vector<T> as(Wr), ao(Wr);
    for (int64_t row = begin; row < end; ++row) {
      const T* ci = coef + (row % H) * Wr;
      const c10::complex<T>* Si = S + row * Wr;
      c10::complex<T>* Gi = G + row * Wr;
      if (other == nullptr) {
        for (int64_t j = 0; j < Wr; ++j) Gi[j] = Si[j] * ci[j];
        continue;
      }
      magnitudes(Si, as.data(), Wr);
      magnitudes(other + row * Wr, ao.data(), Wr);
      for (int64_t j = 0; j < Wr; ++j) {
        // d(|S| - |O|)^2 / dS = 2 (|S| - |O|) S / |S|; 0 where |S| = 0 (autograd's sgn(0) = 0)
        Gi[j] = Si[j] * (as[j] > T(0) ? ci[j] * (as[j] - ao[j]) / as[j] : T(0));
      }
    }
  });
}

at::Tensor spectral_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                                      double lam, double f0, c10::string_view mode, bool wrt_target,
                                      const c10::optional<at::Tensor>& spec_pred,
                                      const c10::optional<at::Tensor>& spec_target) {
  check_loss_args(pred, target, lam, f0);
  const LossMode m = parse_loss_mode(mode);
  check_loss_grad(grad, pred);
  check_saved_spectra(spec_pred, spec_target, pred, m == LossMode::kMagnitude);
  const int64_t B = pred.size(0), C = pred.size(1), H = pred.size(2), W = pred.size(3), Wr = W / 2 + 1;
  const auto weights = loss_weights(H, W, lam, f0);
  const std::vector<double>& w = weights->w;
  const double sign = (m == LossMode::kError && wrt_target) ? -1.0 : 1.0;
  const double scale = sign * 2.0 * grad.item<double>() / (static_cast<double>(B * C) * loss_weight_sum(H, W, lam, f0));
  at::Tensor S;
  at::Tensor other;
  const bool saved = spec_pred.has_value();  // the forward's spectra (read, never written)
  if (m == LossMode::kError) {
    S = saved ? *spec_pred : spectrum_of(pred - target);
  } else if (saved) {
    S = wrt_target ? *spec_target : *spec_pred;
    other = wrt_target ? *spec_pred : *spec_target;
  } else {
    S = spectrum_of(wrt_target ? target : pred);
    other = spectrum_of(wrt_target ? pred : target);
  }
  at::Tensor G = at::empty_like(S, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "spectral_loss_backward_cpu", [&] {
    std::vector<scalar_t> coef(H * Wr);
    for (int64_t i = 0; i < H; ++i) {
      for (int64_t j = 0; j < Wr; ++j) {
        coef[i * Wr + j] = static_cast<scalar_t>(scale * w[i * Wr + j] * inv_multiplicity(j, W));
      }
    }
    loss_grad_spectrum<scalar_t>(S.const_data_ptr<c10::complex<scalar_t>>(),
                                 other.defined() ? other.const_data_ptr<c10::complex<scalar_t>>() : nullptr,
                                 coef.data(), G.mutable_data_ptr<c10::complex<scalar_t>>(), B * C, H, Wr);
  });
  return adjoint_rfft2(G, H, W);
}

}  // namespace

namespace {
constexpr size_t kMaxCachedWeights = size_t{1} << 23;  // doubles (64 MiB) over all cached tables
constexpr size_t kMaxCachedSums = 4096;                // keys of the sum-only cache
using WeightKey = std::tuple<int64_t, int64_t, double, double>;
}  // namespace

std::shared_ptr<const LossWeights> loss_weights(int64_t H, int64_t W, double lam, double f0) {
  static std::mutex mutex;
  static std::map<WeightKey, std::shared_ptr<const LossWeights>> cache;
  static size_t cached = 0;
  const WeightKey key{H, W, lam, f0};
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto table = std::make_shared<LossWeights>();
  build_weight_table(H, W, lam, f0, table->w);  // outside the lock: it runs parallel_for
  std::lock_guard<std::mutex> lock(mutex);
  if (cached + table->w.size() > kMaxCachedWeights) return table;  // for this call only: keep the cached ones
  const auto inserted = cache.emplace(key, std::move(table));
  if (inserted.second) cached += inserted.first->second->w.size();
  return inserted.first->second;
}

double loss_weight_sum(int64_t H, int64_t W, double lam, double f0) {
  static std::mutex mutex;
  static std::map<WeightKey, double> cache;
  const WeightKey key{H, W, lam, f0};
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  // the entries of the whole table added one by one in row-major order (rows past H/2 read their
  // mirror): the same sum whatever the thread count, from half a table held for this call only
  std::vector<double> half;
  weight_half_rows(H, W, lam, f0, half);
  const int64_t Wr = W / 2 + 1;
  double sum = 0.0;
  for (int64_t i = 0; i < H; ++i) {
    const double* row = half.data() + mirrored_row(i, H) * Wr;
    for (int64_t j = 0; j < Wr; ++j) sum += row[j];
  }
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= kMaxCachedSums) cache.clear();  // a double per key: rebuilding them is cheap
  cache.emplace(key, sum);
  return sum;
}

TORCH_LIBRARY_IMPL(irno, CPU, m) {
  m.impl("radial_spectrum", &radial_spectrum_cpu);
  m.impl("radial_spectrum_backward", &radial_spectrum_backward_cpu);
  m.impl("spectral_loss", &spectral_loss_cpu);
  m.impl("spectral_loss_spectra", &spectral_loss_spectra_cpu);
  m.impl("spectral_loss_backward", &spectral_loss_backward_cpu);
}

}  // namespace irno
