// The (re, im) pair of a complex number as one vector load/store in the CUDA kernels:
// Vec2<float>::type = float2, Vec2<double>::type = double2. Host side: complex_view.h.
#pragma once

#include <cuda_runtime.h>

namespace irno {
namespace cuda {

template <typename T>
struct Vec2;
template <>
struct Vec2<float> {
  using type = float2;
};
template <>
struct Vec2<double> {
  using type = double2;
};

template <typename T>
__device__ __forceinline__ typename Vec2<T>::type make_vec2(T x, T y) {
  typename Vec2<T>::type v;
  v.x = x;
  v.y = y;
  return v;
}

}  // namespace cuda
}  // namespace irno
