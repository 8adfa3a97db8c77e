// The spectral loss's weights w(f) = 1 + (|f| / f0)^lam over the (H, W/2+1) rfft2 grid, not
// normalised, and their sum (the normaliser: mean(w) = sum / (H * (W/2+1))). Shared by the CPU
// kernels (csrc/spectrum.cpp, which read the table) and the CUDA host code (csrc/spectrum_cuda.cpp,
// which needs only the sum: its kernels compute each weight inline).
//
// Tables are cached per (H, W, lam, f0): training calls the loss with the same grid and a handful of
// lam values (one per refinement step), and building a table costs H/2 * (W/2+1) pow() calls,
// more than the loss's own pass on small fields. The cache is bounded (cleared when it would hold
// more than kMaxCachedWeights doubles) and thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace irno {

struct LossWeights {
  std::vector<double> w;  // (H, W/2+1), row-major
  double sum;             // summed in row-major order, float64
};

// the table of (H, W, lam, f0): built on first use, then shared (never modified)
std::shared_ptr<const LossWeights> loss_weights(int64_t H, int64_t W, double lam, double f0);

}  // namespace irno
