// The spectral loss's weights w(f) = 1 + (|f| / f0)^lam over the (H, W/2+1) rfft2 grid, not
// normalised, and their sum (the normaliser: mean(w) = sum / (H * (W/2+1))). The CPU kernels
// (csrc/spectrum.cpp) read the table and the sum; the CUDA host code (csrc/spectrum_cuda.cpp) needs
// only the sum (its kernels compute each weight inline).
//
// Tables are cached per (H, W, lam, f0): training calls the loss with the same grid and a handful of
// lam values (one per refinement step), and building a table costs H/2 * (W/2+1) pow() calls,
// more than the loss's own pass on small fields. The cache is bounded and thread-safe: tables are
// kept while the cached ones total at most kMaxCachedWeights doubles; a table beyond that is built
// for its call only (cycling through more (H, W, lam, f0) than fit then rebuilds only those, never
// the cached ones). The sums are cached apart, a double per key (both paths take the normaliser
// from there), so the CUDA path never builds or holds a table.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace irno {

struct LossWeights {
  std::vector<double> w;  // (H, W/2+1), row-major
};

// the table of (H, W, lam, f0): built on first use, then shared (never modified)
std::shared_ptr<const LossWeights> loss_weights(int64_t H, int64_t W, double lam, double f0);

// the sum of that table's entries, added in row-major order (a fixed order, whatever the thread
// count), cached per key without the table
double loss_weight_sum(int64_t H, int64_t W, double lam, double f0);

}  // namespace irno
