// CPU kernels of the refinement update (semantics: irno_kernels/update.py, *_ref):
//   residual_update(h, phi, alpha)           = h + alpha * phi
//   refine_update(h, z, weight, bias, alpha) = h + alpha * (weight @ z + bias)   (1x1 conv, fused)
// plus in-place forms for inference. The fused form reads z and h once and writes the result
// once, instead of materialising Phi's output and re-reading it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace irno {
namespace {

void check_residual_args(const at::Tensor& h, const at::Tensor& phi) {
  check_defined_nonempty(h, "h");
  check_defined_nonempty(phi, "phi");
  check_floating(h, "h");
  check_same_shape(h, "h", phi, "phi");
  check_same_dtype(h, "h", phi, "phi");
  check_same_device(h, "h", phi, "phi");
}

// out = h + alpha * phi over contiguous buffers (out may alias h)
template <typename T>
void axpy_kernel(T* out, const T* h, const T* phi, double alpha, int64_t n) {
  using acc_t = at::opmath_type<T>;
  const acc_t a = static_cast<acc_t>(alpha);
  at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = static_cast<T>(static_cast<acc_t>(h[i]) + a * static_cast<acc_t>(phi[i]));
    }
  });
}

void residual_into(at::Tensor& out, const at::Tensor& h, const at::Tensor& phi, double alpha) {
  const at::Tensor hc = h.contiguous();
  const at::Tensor pc = phi.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "residual_update_cpu", [&] {
    axpy_kernel<scalar_t>(out.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(),
                          alpha, out.numel());
  });
}

at::Tensor residual_update_cpu(const at::Tensor& h, const at::Tensor& phi, double alpha) {
  check_residual_args(h, phi);
  at::Tensor out = at::empty(h.sizes(), h.options());
  residual_into(out, h, phi, alpha);
  return out;
}

void residual_update_inplace_cpu(at::Tensor& h, const at::Tensor& phi, double alpha) {
  check_residual_args(h, phi);
  if (h.is_contiguous()) {
    residual_into(h, h, phi, alpha);
  } else {  // write through a contiguous temporary so any stride pattern of h is honoured
    at::Tensor tmp = at::empty(h.sizes(), h.options());
    residual_into(tmp, h, phi, alpha);
    h.copy_(tmp);
  }
}

// out[b,o,n] = h[b,o,n] + alpha * (sum_f w[o,f] z[b,f,n] + bias[o]); one pass over z, h and out.
template <typename T>
void refine_kernel(T* out, const T* h, const T* z, const T* w, const T* bias, double alpha, int64_t B,
                   int64_t Co, int64_t F, int64_t N) {
  using acc_t = at::opmath_type<T>;
  constexpr int64_t kBlock = 256;  // spatial tile kept in registers/L1 across the F loop
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  const acc_t a = static_cast<acc_t>(alpha);
  std::vector<acc_t> wacc(Co * F), bacc(Co, acc_t(0));
  for (int64_t i = 0; i < Co * F; ++i) wacc[i] = static_cast<acc_t>(w[i]);
  if (bias != nullptr) {
    for (int64_t o = 0; o < Co; ++o) bacc[o] = static_cast<acc_t>(bias[o]);
  }
  at::parallel_for(0, B * nblocks, 1, [&](int64_t begin, int64_t end) {
    acc_t acc[kBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nblocks;
      const int64_t n0 = (t % nblocks) * kBlock;
      const int64_t len = std::min(kBlock, N - n0);
      const T* zb = z + b * F * N + n0;
      for (int64_t o = 0; o < Co; ++o) {
        const acc_t* wo = wacc.data() + o * F;
        for (int64_t i = 0; i < len; ++i) acc[i] = bacc[o];
        for (int64_t f = 0; f < F; ++f) {
          const acc_t wf = wo[f];
          const T* zf = zb + f * N;
          for (int64_t i = 0; i < len; ++i) acc[i] += wf * static_cast<acc_t>(zf[i]);
        }
        const int64_t off = (b * Co + o) * N + n0;
        for (int64_t i = 0; i < len; ++i) {
          out[off + i] = static_cast<T>(static_cast<acc_t>(h[off + i]) + a * acc[i]);
        }
      }
    }
  });
}

// From this many output channels on, a batched GEMM (BLAS) beats the per-position loop on CPU.
constexpr int64_t kGemmMinOut = 4;

void refine_into(at::Tensor& out, const at::Tensor& h, const at::Tensor& z, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& bias, double alpha) {
  const int64_t Bn = h.size(0), Con = h.size(1), Fn = z.size(1);
  if (Con >= kGemmMinOut && out.is_contiguous()) {
    // out = h + alpha * (W z) + alpha * b, with W z as one batched GEMM over (B, Co, N)
    const int64_t N = h.numel() / (Bn * Con);
    at::Tensor out3 = out.view({Bn, Con, N});
    at::Tensor h3 = h.reshape({Bn, Con, N});
    at::Tensor z3 = z.reshape({Bn, Fn, N});
    at::baddbmm_out(out3, h3, weight.unsqueeze(0).expand({Bn, Con, Fn}), z3, 1.0, alpha);
    if (bias.has_value() && bias->defined()) {
      out3.add_(bias->view({1, Con, 1}), alpha);
    }
    return;
  }
  const at::Tensor hc = h.contiguous();
  const at::Tensor zc = z.contiguous();
  const at::Tensor wc = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t B = h.size(0), Co = h.size(1), F = z.size(1);
  const int64_t N = h.numel() / (B * Co);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "refine_update_cpu", [&] {
    refine_kernel<scalar_t>(out.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(), zc.data_ptr<scalar_t>(),
                            wc.data_ptr<scalar_t>(), has_bias ? bc.data_ptr<scalar_t>() : nullptr, alpha,
                            B, Co, F, N);
  });
}

at::Tensor refine_update_cpu(const at::Tensor& h, const at::Tensor& z, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, double alpha) {
  check_refine_args(h, z, weight, bias);
  at::Tensor out = at::empty(h.sizes(), h.options());
  refine_into(out, h, z, weight, bias, alpha);
  return out;
}

void refine_update_inplace_cpu(at::Tensor& h, const at::Tensor& z, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, double alpha) {
  check_refine_args(h, z, weight, bias);
  if (h.is_contiguous()) {
    // each element of h is read before it is written, but not each element of z: the fused loop writes
    // h channel by channel and the GEMM its whole output, so a z sharing memory with h (z is h, or a
    // view into h's buffer) is read from a copy
    const at::Tensor zr = at::get_overlap_status(h, z) == at::MemOverlapStatus::No ? z : z.clone();
    refine_into(h, h, zr, weight, bias, alpha);
  } else {
    at::Tensor tmp = at::empty(h.sizes(), h.options());
    refine_into(tmp, h, z, weight, bias, alpha);
    h.copy_(tmp);
  }
}

// ADInplaceOrView kernels of the in-place ops (CPU and CUDA alike): the backend kernels write h
// through its data pointer, unseen by autograd, so h's version counter is bumped here, as ATen's
// in-place ops bump theirs; a backward that saved h's old value then raises instead of using the new
// one. (Not reached under torch.inference_mode, like ATen's: inference tensors have no counter.)
void residual_update_inplace_adinplaceorview(c10::DispatchKeySet ks, at::Tensor& h, const at::Tensor& phi,
                                             double alpha) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("irno::residual_update_", "")
                             .typed<void(at::Tensor&, const at::Tensor&, double)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, h, phi, alpha);
  }
  h.unsafeGetTensorImpl()->bump_version();
}

void refine_update_inplace_adinplaceorview(c10::DispatchKeySet ks, at::Tensor& h, const at::Tensor& z,
                                           const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                           double alpha) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("irno::refine_update_", "")
          .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, h, z, weight, bias, alpha);
  }
  h.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(irno, ADInplaceOrView, m) {
  m.impl("residual_update_", TORCH_FN(residual_update_inplace_adinplaceorview));
  m.impl("refine_update_", TORCH_FN(refine_update_inplace_adinplaceorview));
}

TORCH_LIBRARY_IMPL(irno, CPU, m) {
  m.impl("residual_update", &residual_update_cpu);
  m.impl("residual_update_", &residual_update_inplace_cpu);
  m.impl("refine_update", &refine_update_cpu);
  m.impl("refine_update_", &refine_update_inplace_cpu);
}

}  // namespace irno
