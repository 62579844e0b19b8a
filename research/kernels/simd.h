// Vectors of L floats on GCC's vector extension (the compiler picks the
// instructions for -march), shared by the kernels.
#ifndef RESEARCH_KERNELS_SIMD_H_
#define RESEARCH_KERNELS_SIMD_H_

#include <cstdint>
#include <cstring>

namespace research {

template <int L>
struct Vec {
  typedef float type __attribute__((vector_size(4 * L)));
  typedef int32_t mask __attribute__((vector_size(4 * L)));  // compare results
  typedef int8_t bytes __attribute__((vector_size(L)));
};

template <int L>
inline typename Vec<L>::type Load(const float* p) {
  typename Vec<L>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int L>
inline void Store(float* p, typename Vec<L>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

template <int L>
inline float Sum(typename Vec<L>::type v) {  // lanes in order: deterministic
  float s = 0.f;
  for (int l = 0; l < L; ++l) s += v[l];
  return s;
}

}  // namespace research

#endif  // RESEARCH_KERNELS_SIMD_H_
