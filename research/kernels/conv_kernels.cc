// Few-channel 2-D convolutions for CPUs, batch-minor, behind jax.ffi.
//
// XLA:CPU runs LeNet's convolutions (3 -> 6 and 6 -> 16 channels) at a few
// GFLOP/s. Here activations are laid out [batch / 16, channels, height,
// width, 16]: one 16-float vector holds one pixel of 16 images, so every
// multiply-add is a full vector (no im2col buffer, no shuffles, weights
// broadcast from memory), and each block of 16 images is contiguous (a
// plain batch-minor layout strides by the batch and thrashes the cache at
// large batches). Two kernels:
//   research_conv_fwd: y = valid cross-correlation of x with w
//                      (the input gradient is this kernel on the padded
//                      output gradient with flipped weights);
//   research_conv_dw:  the weight gradient;
//   research_bias_relu_pool(_grad): bias, ReLU and 2x2 max pooling in one
//                      pass over the convolution's output, and its gradient
//                      (XLA spent more time on these than on the convolutions).
// Work is split over XLA's own CPU thread pool (no second pool competes for
// the cores). Sums run in a fixed order, so results are deterministic.
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "simd.h"  // beside this file
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using research::Load;
using research::Store;
using research::Sum;
using research::Vec;

// Runs f(begin, end) over [0, n) on the caller and at most one pool thread.
// The caller takes the pool's half itself if no thread has started it, so a
// busy pool never blocks us.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t min_split, F f) {
  if (n < 2 * min_split || pool.num_threads() < 2) {
    f(0, n);
    return;
  }
  struct Shared {
    std::atomic<bool> claimed{false};
    std::atomic<bool> done{false};
  };
  auto shared = std::make_shared<Shared>();
  const int64_t mid = n / 2;
  F* body = &f;
  pool.Schedule([shared, body, mid, n] {
    if (shared->claimed.exchange(true)) return;  // the caller took it
    (*body)(mid, n);
    shared->done.store(true, std::memory_order_release);
  });
  f(0, mid);
  if (!shared->claimed.exchange(true)) {
    f(mid, n);
    return;
  }
  while (!shared->done.load(std::memory_order_acquire)) __builtin_ia32_pause();
}

struct Conv {
  int64_t NB, C, H, W, K, O, Ho, Wo;  // NB: blocks of L images
};

// One output vector: VL floats, i.e. VL / L adjacent output pixels
// (i, j .. j + VL / L - 1) of L images, for outputs o0 .. o0 + OB. With L < 16
// a 16-float vector covers several pixels, so small batches still fill it.
// y[nb, o, i, j] = sum_{c, a, b} w[a, b, c, o] * x[nb, c, i + a, j + b].
template <int L, int VL, int OB>
inline void FwdVector(const Conv& s, const float* xb, const float* w, float* yb,
                      int64_t o0, int64_t i, int64_t j) {
  using V = typename Vec<VL>::type;
  V acc[OB];
  for (int o = 0; o < OB; ++o) acc[o] = V{};
  for (int64_t c = 0; c < s.C; ++c) {
    for (int64_t a = 0; a < s.K; ++a) {
      const float* xp = xb + ((c * s.H + i + a) * s.W + j) * L;
      for (int64_t b = 0; b < s.K; ++b) {
        const V xv = Load<VL>(xp + b * L);
        const float* wp = w + ((a * s.K + b) * s.C + c) * s.O + o0;
#pragma GCC unroll 16
        for (int o = 0; o < OB; ++o) acc[o] += wp[o] * xv;
      }
    }
  }
  for (int o = 0; o < OB; ++o) {
    Store<VL>(yb + (((o0 + o) * s.Ho + i) * s.Wo + j) * L, acc[o]);
  }
}

// Output rows r = nb * Ho + i in [r0, r1), outputs o0 .. o0 + OB.
template <int L, int OB>
void FwdRows(const Conv& s, const float* x, const float* w, float* y, int64_t o0,
             int64_t r0, int64_t r1) {
  constexpr int kStep = 16 / L;  // pixels per 16-float vector
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t nb = r / s.Ho, i = r % s.Ho;
    const float* xb = x + nb * s.C * s.H * s.W * L;
    float* yb = y + nb * s.O * s.Ho * s.Wo * L;
    int64_t j = 0;
    for (; j + kStep <= s.Wo; j += kStep) FwdVector<L, 16, OB>(s, xb, w, yb, o0, i, j);
    for (; j < s.Wo; ++j) FwdVector<L, L, OB>(s, xb, w, yb, o0, i, j);
  }
}

template <int L>
void Fwd(const Conv& s, const float* x, const float* w, float* y, int64_t r0,
         int64_t r1) {
  for (int64_t o0 = 0; o0 < s.O; o0 += 16) {
    switch (std::min<int64_t>(16, s.O - o0)) {
#define RESEARCH_CASE(n) \
  case n:                \
    FwdRows<L, n>(s, x, w, y, o0, r0, r1); \
    break;
      RESEARCH_CASE(1) RESEARCH_CASE(2) RESEARCH_CASE(3) RESEARCH_CASE(4)
      RESEARCH_CASE(5) RESEARCH_CASE(6) RESEARCH_CASE(7) RESEARCH_CASE(8)
      RESEARCH_CASE(9) RESEARCH_CASE(10) RESEARCH_CASE(11) RESEARCH_CASE(12)
      RESEARCH_CASE(13) RESEARCH_CASE(14) RESEARCH_CASE(15) RESEARCH_CASE(16)
#undef RESEARCH_CASE
    }
  }
}

// Partial weight gradients of taps (c, a, b0 .. b0 + KB) and outputs
// o0 .. o0 + OB over output rows [i0, i1) and columns [j0, j1) (VL / L
// columns per vector) of batch block nb, added to the vector accumulators
// acc[KB][OB]; their lanes are summed at the end.
template <int L, int VL, int OB, int KB>
void DwTile(const Conv& s, const float* x, const float* dy,
            typename Vec<VL>::type* acc, int64_t nb, int64_t c, int64_t a,
            int64_t b0, int64_t o0, int64_t i0, int64_t i1, int64_t j0,
            int64_t j1) {
  using V = typename Vec<VL>::type;
  constexpr int kStep = VL / L;
  V t[KB][OB];
  for (int k = 0; k < KB; ++k)
    for (int o = 0; o < OB; ++o) t[k][o] = acc[k * OB + o];
  const float* xb = x + nb * s.C * s.H * s.W * L;
  const float* db = dy + nb * s.O * s.Ho * s.Wo * L;
  for (int64_t i = i0; i < i1; ++i) {
    const float* xp = xb + ((c * s.H + i + a) * s.W + b0) * L;
    const float* dp = db + ((o0 * s.Ho + i) * s.Wo) * L;
    for (int64_t j = j0; j < j1; j += kStep) {
      V xv[KB];
#pragma GCC unroll 4
      for (int k = 0; k < KB; ++k) xv[k] = Load<VL>(xp + (j + k) * L);
#pragma GCC unroll 8
      for (int o = 0; o < OB; ++o) {
        const V dv = Load<VL>(dp + (o * s.Ho * s.Wo + j) * L);
#pragma GCC unroll 4
        for (int k = 0; k < KB; ++k) t[k][o] += xv[k] * dv;
      }
    }
  }
  for (int k = 0; k < KB; ++k)
    for (int o = 0; o < OB; ++o) acc[k * OB + o] = t[k][o];
}

template <int L, int VL, int OB>
void DwTileK(const Conv& s, const float* x, const float* dy,
             typename Vec<VL>::type* acc, int64_t nb, int64_t c, int64_t a,
             int64_t b0, int kb, int64_t o0, int64_t i0, int64_t i1, int64_t j0,
             int64_t j1) {
  switch (kb) {
    case 1: DwTile<L, VL, OB, 1>(s, x, dy, acc, nb, c, a, b0, o0, i0, i1, j0, j1); break;
    case 2: DwTile<L, VL, OB, 2>(s, x, dy, acc, nb, c, a, b0, o0, i0, i1, j0, j1); break;
    default: DwTile<L, VL, OB, 3>(s, x, dy, acc, nb, c, a, b0, o0, i0, i1, j0, j1); break;
  }
}

// All tiles of taps (c, a) = divmod(u, K), u in [u0, u1), over rows [i0, i1)
// and columns [j0, j1) of block nb, into `acc` (K * O vectors per u; tile
// (b0, o0) holds [kb][ob] vectors at b0 * O + o0 * kb).
template <int L, int VL>
void DwUnits(const Conv& s, const float* x, const float* dy,
             typename Vec<VL>::type* acc, int64_t nb, int64_t u0, int64_t u1,
             int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t c = u / s.K, a = u % s.K;
    auto* unit = acc + (u - u0) * s.K * s.O;
    for (int64_t b0 = 0; b0 < s.K; b0 += 3) {
      const int kb = static_cast<int>(std::min<int64_t>(3, s.K - b0));
      for (int64_t o0 = 0; o0 < s.O; o0 += 8) {
        auto* tile = unit + b0 * s.O + o0 * kb;
        switch (std::min<int64_t>(8, s.O - o0)) {
#define RESEARCH_CASE(n)                                                   \
  case n:                                                                  \
    DwTileK<L, VL, n>(s, x, dy, tile, nb, c, a, b0, kb, o0, i0, i1, j0, j1); \
    break;
          RESEARCH_CASE(1) RESEARCH_CASE(2) RESEARCH_CASE(3) RESEARCH_CASE(4)
          RESEARCH_CASE(5) RESEARCH_CASE(6) RESEARCH_CASE(7) RESEARCH_CASE(8)
#undef RESEARCH_CASE
        }
      }
    }
  }
}

// dw[a, b, c, o] = sum_{nb, i, j, lanes} x[nb, c, i + a, j + b] * dy[nb, o, i, j]
// for the taps (c, a) with c * K + a in [u0, u1). Batch blocks are outermost
// and output rows are taken a few at a time, so each tile's data stays in
// cache. Columns go 16 / L per vector; the last Wo % (16 / L) one at a time.
template <int L>
void Dw(const Conv& s, const float* x, const float* dy, float* dw, int64_t u0,
        int64_t u1) {
  using V = typename Vec<16>::type;
  using VT = typename Vec<L>::type;
  constexpr int64_t kRows = 2;
  const int64_t main_end = s.Wo - s.Wo % (16 / L);
  const int64_t per_unit = s.K * s.O;
  std::vector<V> acc((u1 - u0) * per_unit, V{});
  std::vector<VT> tail(main_end < s.Wo ? (u1 - u0) * per_unit : 0, VT{});
  for (int64_t nb = 0; nb < s.NB; ++nb) {
    for (int64_t i0 = 0; i0 < s.Ho; i0 += kRows) {
      const int64_t i1 = std::min(s.Ho, i0 + kRows);
      DwUnits<L, 16>(s, x, dy, acc.data(), nb, u0, u1, i0, i1, 0, main_end);
      if (!tail.empty()) {
        DwUnits<L, L>(s, x, dy, tail.data(), nb, u0, u1, i0, i1, main_end, s.Wo);
      }
    }
  }
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t c = u / s.K, a = u % s.K;
    for (int64_t b0 = 0; b0 < s.K; b0 += 3) {
      const int64_t kb = std::min<int64_t>(3, s.K - b0);
      for (int64_t o0 = 0; o0 < s.O; o0 += 8) {
        const int64_t ob = std::min<int64_t>(8, s.O - o0);
        const int64_t at = (u - u0) * per_unit + b0 * s.O + o0 * kb;
        for (int64_t k = 0; k < kb; ++k) {
          for (int64_t o = 0; o < ob; ++o) {
            float sum = Sum<16>(acc[at + k * ob + o]);
            if (!tail.empty()) sum += Sum<L>(tail[at + k * ob + o]);
            dw[((a * s.K + b0 + k) * s.C + c) * s.O + o0 + o] = sum;
          }
        }
      }
    }
  }
}

// pooled[nb, o, p, q] = max(0, max_{d, e < 2} y[nb, o, 2p + d, 2q + e] + bias[o])
// and which of the four won (0-3, first on ties), or 4 where the ReLU is 0.
// NaN propagates (the trainer's non-finite check relies on it). Written on
// whole vectors of L images so that it compiles to vector selects.
template <int L>
void BiasReluPool(int64_t O, int64_t H, int64_t W, const float* y,
                  const float* bias, float* pooled, int8_t* arg, int64_t r0,
                  int64_t r1) {
  using V = typename Vec<L>::type;
  using VI = typename Vec<L>::mask;
  using VB = typename Vec<L>::bytes;
  const int64_t Hp = H / 2, Wp = W / 2;
  for (int64_t r = r0; r < r1; ++r) {  // r = nb * O + o
    const float b = bias[r % O];
    const float* yr = y + r * H * W * L;
    float* pr = pooled + r * Hp * Wp * L;
    int8_t* ar = arg + r * Hp * Wp * L;
    for (int64_t p = 0; p < Hp; ++p) {
      for (int64_t q = 0; q < Wp; ++q) {
        const float* y0 = yr + ((2 * p) * W + 2 * q) * L;
        const float* y1 = y0 + W * L;
        V m = Load<L>(y0) + b;
        VI best = VI{};
        const V candidates[3] = {Load<L>(y0 + L) + b, Load<L>(y1) + b,
                                 Load<L>(y1 + L) + b};
        for (int k = 0; k < 3; ++k) {
          const V c = candidates[k];
          const VI take = ((c > m) | (c != c)) & (m == m);
          m = take ? c : m;
          best = take ? VI{} + (k + 1) : best;
        }
        const VI live = (m > 0.f) | (m != m);
        Store<L>(pr + (p * Wp + q) * L, live ? m : V{});
        const VB winners = __builtin_convertvector(live ? best : VI{} + 4, VB);
        std::memcpy(ar + (p * Wp + q) * L, &winners, L);
      }
    }
  }
}

// The gradient of BiasReluPool: dy[nb, o, i, j] gets dpooled where (i, j) won
// its window and the ReLU was live, else 0; dbias_rows[r] sums row r's dy.
template <int L>
void BiasReluPoolGrad(int64_t H, int64_t W, const float* dpooled,
                      const int8_t* arg, float* dy, float* dbias_rows, int64_t r0,
                      int64_t r1) {
  using V = typename Vec<L>::type;
  using VI = typename Vec<L>::mask;
  using VB = typename Vec<L>::bytes;
  const int64_t Hp = H / 2, Wp = W / 2;
  for (int64_t r = r0; r < r1; ++r) {
    float* dr = dy + r * H * W * L;
    if (H % 2) std::memset(dr + (H - 1) * W * L, 0, sizeof(float) * W * L);
    if (W % 2) {
      for (int64_t i = 0; i < H; ++i) {
        std::memset(dr + (i * W + W - 1) * L, 0, sizeof(float) * L);
      }
    }
    const float* gr = dpooled + r * Hp * Wp * L;
    const int8_t* ar = arg + r * Hp * Wp * L;
    V sum = V{};
    for (int64_t p = 0; p < Hp; ++p) {
      for (int64_t q = 0; q < Wp; ++q) {
        const V g = Load<L>(gr + (p * Wp + q) * L);
        VB winners;
        std::memcpy(&winners, ar + (p * Wp + q) * L, L);
        const VI a = __builtin_convertvector(winners, VI);
        float* d0 = dr + ((2 * p) * W + 2 * q) * L;
        float* const d[4] = {d0, d0 + L, d0 + W * L, d0 + W * L + L};
        for (int k = 0; k < 4; ++k) Store<L>(d[k], a == k ? g : V{});
        sum += a < 4 ? g : V{};
      }
    }
    dbias_rows[r] = Sum<L>(sum);
  }
}

ffi::Error CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                       Conv* s) {
  if (x.size() != 5 || w.size() != 4 || (x[4] != 4 && x[4] != 8 && x[4] != 16)) {
    return ffi::Error::InvalidArgument(
        "conv: x must be [N/L, C, H, W, L] with L = 4, 8 or 16, w [K, K, C, O]");
  }
  *s = Conv{x[0], x[1], x[2], x[3], w[0], w[3], x[2] - w[0] + 1, x[3] - w[1] + 1};
  if (w[0] != w[1] || w[2] != s->C || s->Ho < 1 || s->Wo < 1) {
    return ffi::Error::InvalidArgument(
        "conv: need square kernels no larger than the input and matching "
        "channels");
  }
  return ffi::Error::Success();
}

ffi::Error ConvFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  Conv s;
  if (ffi::Error e = CheckShapes(x.dimensions(), w.dimensions(), &s); e.failure()) {
    return e;
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t lanes = x.dimensions()[4];
  ParallelFor(pool, s.NB * s.Ho, 2, [&](int64_t r0, int64_t r1) {
    if (lanes == 16) Fwd<16>(s, xp, wp, yp, r0, r1);
    else if (lanes == 8) Fwd<8>(s, xp, wp, yp, r0, r1);
    else Fwd<4>(s, xp, wp, yp, r0, r1);
  });
  return ffi::Error::Success();
}

// x [N/L, C, H, W, L] and dy [N/L, O, Ho, Wo, L] -> dw [K, K, C, O].
ffi::Error ConvDwImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  Conv s;
  if (ffi::Error e = CheckShapes(x.dimensions(), dw->dimensions(), &s); e.failure()) {
    return e;
  }
  auto d = dy.dimensions();
  const int64_t lanes = x.dimensions()[4];
  if (d.size() != 5 || d[0] != s.NB || d[1] != s.O || d[2] != s.Ho ||
      d[3] != s.Wo || d[4] != lanes) {
    return ffi::Error::InvalidArgument("conv_dw: dy must be [N/L, O, Ho, Wo, L]");
  }
  const float* xp = x.typed_data();
  const float* dp = dy.typed_data();
  float* wp = dw->typed_data();
  ParallelFor(pool, s.C * s.K, 1, [&](int64_t u0, int64_t u1) {
    if (lanes == 16) Dw<16>(s, xp, dp, wp, u0, u1);
    else if (lanes == 8) Dw<8>(s, xp, dp, wp, u0, u1);
    else Dw<4>(s, xp, dp, wp, u0, u1);
  });
  return ffi::Error::Success();
}

// y [N/L, O, H, W, L] and bias [O] -> pooled [N/L, O, H/2, W/2, L] (f32) and
// the winners (s8, same shape).
ffi::Error BiasReluPoolImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y,
                            ffi::Buffer<ffi::F32> bias,
                            ffi::ResultBuffer<ffi::F32> pooled,
                            ffi::ResultBuffer<ffi::S8> arg) {
  auto d = y.dimensions();
  if (d.size() != 5 || (d[4] != 4 && d[4] != 8 && d[4] != 16) ||
      bias.element_count() != static_cast<size_t>(d[1])) {
    return ffi::Error::InvalidArgument(
        "bias_relu_pool: y must be [N/L, O, H, W, L] (L = 4, 8, 16), bias [O]");
  }
  const int64_t O = d[1], H = d[2], W = d[3], lanes = d[4];
  const float* yp = y.typed_data();
  const float* bp = bias.typed_data();
  float* pp = pooled->typed_data();
  int8_t* ap = arg->typed_data();
  ParallelFor(pool, d[0] * O, 2, [&](int64_t r0, int64_t r1) {
    if (lanes == 16) BiasReluPool<16>(O, H, W, yp, bp, pp, ap, r0, r1);
    else if (lanes == 8) BiasReluPool<8>(O, H, W, yp, bp, pp, ap, r0, r1);
    else BiasReluPool<4>(O, H, W, yp, bp, pp, ap, r0, r1);
  });
  return ffi::Error::Success();
}

// dpooled and the winners -> dy [N/L, O, H, W, L] and dbias [O].
ffi::Error BiasReluPoolGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dpooled,
                                ffi::Buffer<ffi::S8> arg,
                                ffi::ResultBuffer<ffi::F32> dy,
                                ffi::ResultBuffer<ffi::F32> dbias) {
  auto d = dy->dimensions();
  auto g = dpooled.dimensions();
  if (d.size() != 5 || g.size() != 5 || g[0] != d[0] || g[1] != d[1] ||
      g[2] != d[2] / 2 || g[3] != d[3] / 2 || g[4] != d[4] ||
      (d[4] != 4 && d[4] != 8 && d[4] != 16)) {
    return ffi::Error::InvalidArgument(
        "bias_relu_pool_grad: dpooled must be [N/L, O, H/2, W/2, L]");
  }
  const int64_t NB = d[0], O = d[1], H = d[2], W = d[3], lanes = d[4];
  std::vector<float> rows(NB * O);
  const float* gp = dpooled.typed_data();
  const int8_t* ap = arg.typed_data();
  float* dp = dy->typed_data();
  ParallelFor(pool, NB * O, 2, [&](int64_t r0, int64_t r1) {
    if (lanes == 16) BiasReluPoolGrad<16>(H, W, gp, ap, dp, rows.data(), r0, r1);
    else if (lanes == 8) BiasReluPoolGrad<8>(H, W, gp, ap, dp, rows.data(), r0, r1);
    else BiasReluPoolGrad<4>(H, W, gp, ap, dp, rows.data(), r0, r1);
  });
  float* bp = dbias->typed_data();
  for (int64_t o = 0; o < O; ++o) {
    float total = 0.f;
    for (int64_t nb = 0; nb < NB; ++nb) total += rows[nb * O + o];
    bp[o] = total;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResearchConvFwd, ConvFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResearchConvDw, ConvDwImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResearchBiasReluPool, BiasReluPoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResearchBiasReluPoolGrad, BiasReluPoolGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
