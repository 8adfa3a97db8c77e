// CUDA kernels of the refinement update (semantics: irno_kernels/update.py, *_ref):
//   residual_update(h, phi, alpha)           = h + alpha * phi
//   refine_update(h, z, weight, bias, alpha) = h + alpha * (weight @ z + bias)   (1x1 conv, fused)
// and their in-place forms. All launches go on the current stream; no host synchronisation and no
// allocation outside PyTorch's caching allocator, so they can be captured in a CUDA graph.
// <torch/extension.h> is kept out of this file on purpose (it triples nvcc's compile time).
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace irno {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535 * 8));
}

template <typename T>
__global__ void axpy_kernel(T* __restrict__ out, const T* h, const T* __restrict__ phi, double alpha,
                            int64_t n) {
  using acc_t = at::opmath_type<T>;
  const acc_t a = static_cast<acc_t>(alpha);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    out[i] = static_cast<T>(static_cast<acc_t>(h[i]) + a * static_cast<acc_t>(phi[i]));
  }
}

// one thread per (b, spatial position): reads F features and Co values of h, writes Co outputs
template <typename T>
__global__ void refine_kernel(T* __restrict__ out, const T* h, const T* __restrict__ z,
                              const T* __restrict__ w, const T* __restrict__ bias, double alpha, int64_t B,
                              int64_t Co, int64_t F, int64_t N) {
  using acc_t = at::opmath_type<T>;
  const acc_t a = static_cast<acc_t>(alpha);
  const int64_t total = B * N;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = t / N;
    const int64_t n = t - b * N;
    const T* zb = z + b * F * N + n;
    for (int64_t o = 0; o < Co; ++o) {
      acc_t acc = bias != nullptr ? static_cast<acc_t>(bias[o]) : acc_t(0);
      for (int64_t f = 0; f < F; ++f) {
        acc += static_cast<acc_t>(w[o * F + f]) * static_cast<acc_t>(zb[f * N]);
      }
      const int64_t off = (b * Co + o) * N + n;
      out[off] = static_cast<T>(static_cast<acc_t>(h[off]) + a * acc);
    }
  }
}

void residual_into(at::Tensor& out, const at::Tensor& h, const at::Tensor& phi, double alpha) {
  const at::Tensor hc = h.contiguous();
  const at::Tensor pc = phi.contiguous();
  const int64_t n = out.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "residual_update_cuda", [&] {
    axpy_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(), alpha, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_residual_args(const at::Tensor& h, const at::Tensor& phi) {
  check_defined_nonempty(h, "h");
  check_defined_nonempty(phi, "phi");
  check_floating(h, "h");
  check_same_shape(h, "h", phi, "phi");
  check_same_dtype(h, "h", phi, "phi");
  check_same_device(h, "h", phi, "phi");
}

at::Tensor residual_update_cuda(const at::Tensor& h, const at::Tensor& phi, double alpha) {
  check_residual_args(h, phi);
  c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = at::empty(h.sizes(), h.options());
  residual_into(out, h, phi, alpha);
  return out;
}

void residual_update_inplace_cuda(at::Tensor& h, const at::Tensor& phi, double alpha) {
  check_residual_args(h, phi);
  c10::cuda::CUDAGuard guard(h.device());
  if (h.is_contiguous()) {
    // phi == h (the same elements) is safe: each thread reads then writes its own element. A phi
    // that partly overlaps h (a shifted view of its buffer) would read elements already updated.
    const at::MemOverlapStatus st = at::get_overlap_status(h, phi);
    const bool safe = st == at::MemOverlapStatus::No || st == at::MemOverlapStatus::Full;
    residual_into(h, h, safe ? phi : phi.clone(), alpha);
  } else {
    at::Tensor tmp = at::empty(h.sizes(), h.options());
    residual_into(tmp, h, phi, alpha);
    h.copy_(tmp);
  }
}

void refine_into(at::Tensor& out, const at::Tensor& h, const at::Tensor& z, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& bias, double alpha) {
  const at::Tensor hc = h.contiguous();
  const at::Tensor zc = z.contiguous();
  const at::Tensor wc = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t B = h.size(0), Co = h.size(1), F = z.size(1);
  const int64_t N = h.numel() / (B * Co);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "refine_update_cuda", [&] {
    refine_kernel<scalar_t><<<blocks_for(B * N), kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(), zc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
        has_bias ? bc.data_ptr<scalar_t>() : nullptr, alpha, B, Co, F, N);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor refine_update_cuda(const at::Tensor& h, const at::Tensor& z, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, double alpha) {
  check_refine_args(h, z, weight, bias);
  c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = at::empty(h.sizes(), h.options());
  refine_into(out, h, z, weight, bias, alpha);
  return out;
}

void refine_update_inplace_cuda(at::Tensor& h, const at::Tensor& z, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, double alpha) {
  check_refine_args(h, z, weight, bias);
  c10::cuda::CUDAGuard guard(h.device());
  if (h.is_contiguous()) {
    // a thread reads all F features of its point and writes its Co outputs one by one: a z that
    // shares memory with h would be read after other threads updated it, so it is read from a copy
    const at::Tensor zr = at::get_overlap_status(h, z) == at::MemOverlapStatus::No ? z : z.clone();
    refine_into(h, h, zr, weight, bias, alpha);
  } else {
    at::Tensor tmp = at::empty(h.sizes(), h.options());
    refine_into(tmp, h, z, weight, bias, alpha);
    h.copy_(tmp);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(irno, CUDA, m) {
  m.impl("residual_update", &residual_update_cuda);
  m.impl("residual_update_", &residual_update_inplace_cuda);
  m.impl("refine_update", &refine_update_cuda);
  m.impl("refine_update_", &refine_update_inplace_cuda);
}

}  // namespace irno
