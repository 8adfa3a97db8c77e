// Complex tensors as the CUDA kernels read them: interleaved (re, im) pairs of float or double.
// Host side (*_cuda.cpp); the device side's pair type is in vec2.cuh.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/complex.h>

namespace irno {

template <typename T>
inline const T* real_ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr<c10::complex<T>>());
}

template <typename T>
inline T* real_ptr_mut(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr<c10::complex<T>>());
}

}  // namespace irno
