// An LSTM layer's time loop for CPUs, behind jax.ffi.
//
// XLA:CPU runs a while loop's body (one [batch, hidden] x [hidden, 4 hidden]
// matmul and the gate math per step) with fixed per-iteration costs that left
// the LSTM at 0.75x PyTorch. Here the whole loop is one call:
//   research_lstm_fwd: z_t = gates_x[t] + h_{t-1} W_hh, the gates, c_t, h_t;
//   research_lstm_bwd: the gate gradients dz_t and dh_{t-1} = dz_t W_hh^T;
//   research_lstm_infer: the forward without what the backward reads.
// (The recurrent weight gradient, sum_t h_{t-1}^T dz_t, stays one big matmul
// in XLA.) The matmuls use W packed once per call into 32-column panels and
// an 8 x 32 register-blocked micro-kernel. Two threads split the hidden units
// (all four gates of a unit stay on one thread), so each step needs a single
// barrier. Sums run in a fixed order: results are deterministic.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "simd.h"  // beside this file
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using V = research::Vec<16>::type;
using VI = research::Vec<16>::mask;
constexpr int kPanel = 32;  // columns per packed panel: two vectors
constexpr int kRows = 8;    // rows per micro-kernel call

inline V Load(const float* p) { return research::Load<16>(p); }
inline void Store(float* p, V v) { research::Store<16>(p, v); }

// exp on 16 floats: 2^n * p(r), Cephes' expf polynomial; |rel. error| < 2e-7.
inline V Exp(V x) {
  const V lo = V{} - 87.f, hi = V{} + 88.f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V big = V{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to integer
  const V n = (x * 1.44269504088896341f + big) - big;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline V Sigmoid(V x) { return 1.f / (1.f + Exp(-x)); }
inline V Tanh(V x) { return 1.f - 2.f / (1.f + Exp(x + x)); }

// The activated gates of 16 units at column u of a row of pre-activations
// z [4H] (i, f, g, o), and the new cell state from c_prev.
struct Cell {
  V i, f, g, o, c;
};
inline Cell Step(const float* z, int64_t H, int64_t u, V c_prev) {
  Cell cell;
  cell.i = Sigmoid(Load(z + u));
  cell.f = Sigmoid(Load(z + H + u));
  cell.g = Tanh(Load(z + 2 * H + u));
  cell.o = Sigmoid(Load(z + 3 * H + u));
  cell.c = cell.f * c_prev + cell.i * cell.g;
  return cell;
}

// W [K, N] row-major -> panels [N / 32][K][32].
std::vector<float> Pack(const float* w, int64_t K, int64_t N) {
  std::vector<float> packed(K * N);
  for (int64_t p = 0; p < N / kPanel; ++p)
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(&packed[(p * K + k) * kPanel], w + k * N + p * kPanel,
                  sizeof(float) * kPanel);
  return packed;
}

// C[m, 0:32] += sum_k A[m, k] * panel[k, 0:32] for MR rows; lda/ldc in floats.
template <int MR>
void MicroKernel(const float* a, int64_t lda, const float* panel, int64_t K,
                 float* c, int64_t ldc) {
  V acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = Load(c + r * ldc);
    acc[r][1] = Load(c + r * ldc + 16);
  }
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = Load(panel + k * kPanel), b1 = Load(panel + k * kPanel + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float av = a[r * lda + k];
      acc[r][0] += av * b0;
      acc[r][1] += av * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    Store(c + r * ldc, acc[r][0]);
    Store(c + r * ldc + 16, acc[r][1]);
  }
}

// C[0:M, panel p's columns] += A[0:M, 0:K] @ panel p.
void PanelGemm(const float* a, int64_t lda, const float* packed, int64_t p,
               int64_t K, float* c, int64_t ldc, int64_t M) {
  const float* panel = packed + p * K * kPanel;
  float* cp = c + p * kPanel;
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows)
    MicroKernel<kRows>(a + m * lda, lda, panel, K, cp + m * ldc, ldc);
  switch (M - m) {
#define RESEARCH_CASE(n) \
  case n:                \
    MicroKernel<n>(a + m * lda, lda, panel, K, cp + m * ldc, ldc); \
    break;
    RESEARCH_CASE(1) RESEARCH_CASE(2) RESEARCH_CASE(3) RESEARCH_CASE(4)
    RESEARCH_CASE(5) RESEARCH_CASE(6) RESEARCH_CASE(7)
#undef RESEARCH_CASE
    default: break;
  }
}

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void Wait() {
    if (n_ == 1) return;
    const int phase = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
    } else {
      while (phase_.load(std::memory_order_acquire) == phase) __builtin_ia32_pause();
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> phase_{0};
};

// Runs body(thread, threads, barrier) on the caller and, when the pool has a
// second thread and there are at least two blocks of units, on one pool
// thread too; the barrier is sized to the team it actually runs.
template <typename F>
void RunTeam(ffi::ThreadPool& pool, int64_t unit_blocks, F body) {
  if (unit_blocks < 2 || pool.num_threads() < 2) {
    Barrier alone(1);
    body(0, 1, alone);
    return;
  }
  Barrier barrier(2);
  auto done = std::make_shared<std::atomic<bool>>(false);
  F* shared_body = &body;
  Barrier* shared_barrier = &barrier;
  pool.Schedule([done, shared_body, shared_barrier] {
    (*shared_body)(1, 2, *shared_barrier);
    done->store(true, std::memory_order_release);
  });
  body(0, 2, barrier);
  while (!done->load(std::memory_order_acquire)) __builtin_ia32_pause();
}

struct Sizes {
  int64_t T, B, H;
};

ffi::Error CheckSizes(ffi::Span<const int64_t> gates, ffi::Span<const int64_t> w,
                      Sizes* s) {
  if (gates.size() != 3 || w.size() != 2 || gates[2] % 4 || w[0] * 4 != gates[2] ||
      w[1] != gates[2] || w[0] % kPanel) {
    return ffi::Error::InvalidArgument(
        "lstm: need gates [B, T, 4H] and w_hh [H, 4H] with H a multiple of 32");
  }
  *s = Sizes{gates[1], gates[0], w[0]};
  return ffi::Error::Success();
}

// Units [u0, u1) of thread `t` of `n`, in whole panels.
void UnitRange(const Sizes& s, int t, int n, int64_t* u0, int64_t* u1) {
  const int64_t blocks = s.H / kPanel;
  *u0 = blocks * t / n * kPanel;
  *u1 = blocks * (t + 1) / n * kPanel;
}

// Batch-major, as the model holds them (no transposes around the call).
// Inputs: gates_x [B, T, 4H] (i, f, g, o), w_hh [H, 4H], c0, h0 [B, H].
// Outputs: hs, cs [B, T, H] and acts [B, T, 4H] (the activated gates).
ffi::Error LstmFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gates_x,
                       ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> c0,
                       ffi::Buffer<ffi::F32> h0, ffi::ResultBuffer<ffi::F32> hs,
                       ffi::ResultBuffer<ffi::F32> cs,
                       ffi::ResultBuffer<ffi::F32> acts) {
  Sizes s;
  if (auto e = CheckSizes(gates_x.dimensions(), w_hh.dimensions(), &s); e.failure()) {
    return e;
  }
  const int64_t T = s.T, B = s.B, H = s.H, G = 4 * H;
  const std::vector<float> packed = Pack(w_hh.typed_data(), H, G);
  const float* gx = gates_x.typed_data();
  float* h_out = hs->typed_data();
  float* c_out = cs->typed_data();
  float* z = acts->typed_data();
  std::memcpy(z, gx, sizeof(float) * T * B * G);
  RunTeam(pool, H / kPanel, [&](int t, int n, Barrier& barrier) {
    int64_t u0, u1;
    UnitRange(s, t, n, &u0, &u1);
    for (int64_t step = 0; step < T; ++step) {
      // Row b of step t is at (b * T + t) * width: rows stride by T * width.
      const float* h_prev = step ? h_out + (step - 1) * H : h0.typed_data();
      const int64_t ld_prev = step ? T * H : H;
      float* zt = z + step * G;
      for (int64_t gate = 0; gate < 4; ++gate)
        for (int64_t u = u0; u < u1; u += kPanel)
          PanelGemm(h_prev, ld_prev, packed.data(), (gate * H + u) / kPanel, H, zt,
                    T * G, B);
      for (int64_t b = 0; b < B; ++b) {
        float* zr = zt + b * T * G;
        const float* c_prev = step ? c_out + (b * T + step - 1) * H
                                   : c0.typed_data() + b * H;
        for (int64_t u = u0; u < u1; u += 16) {
          const Cell cell = Step(zr, H, u, Load(c_prev + u));
          Store(zr + u, cell.i);
          Store(zr + H + u, cell.f);
          Store(zr + 2 * H + u, cell.g);
          Store(zr + 3 * H + u, cell.o);
          Store(c_out + (b * T + step) * H + u, cell.c);
          Store(h_out + (b * T + step) * H + u, cell.o * Tanh(cell.c));
        }
      }
      barrier.Wait();  // h_t is whole before any thread's next matmul
    }
  });
  return ffi::Error::Success();
}

// Inference (no gradient will be taken): hs [B, T, H] and the final c
// [B, H] only. A step's gates live in a [B, 4H] buffer and the cell state in
// place, so it writes a sixth of what the training forward writes (cs, the
// activated gates, a copy of gates_x).
ffi::Error LstmInferImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gates_x,
                         ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> c0,
                         ffi::Buffer<ffi::F32> h0, ffi::ResultBuffer<ffi::F32> hs,
                         ffi::ResultBuffer<ffi::F32> c_last) {
  Sizes s;
  if (auto e = CheckSizes(gates_x.dimensions(), w_hh.dimensions(), &s); e.failure()) {
    return e;
  }
  const int64_t T = s.T, B = s.B, H = s.H, G = 4 * H;
  const std::vector<float> packed = Pack(w_hh.typed_data(), H, G);
  std::vector<float> z(B * G);
  const float* gx = gates_x.typed_data();
  float* h_out = hs->typed_data();
  float* c = c_last->typed_data();  // the running cell state, c_T at the end
  std::memcpy(c, c0.typed_data(), sizeof(float) * B * H);
  RunTeam(pool, H / kPanel, [&](int t, int n, Barrier& barrier) {
    int64_t u0, u1;
    UnitRange(s, t, n, &u0, &u1);
    for (int64_t step = 0; step < T; ++step) {
      const float* h_prev = step ? h_out + (step - 1) * H : h0.typed_data();
      const int64_t ld_prev = step ? T * H : H;
      for (int64_t b = 0; b < B; ++b)  // this thread's columns of z_t = gates_x[t]
        for (int64_t gate = 0; gate < 4; ++gate)
          std::memcpy(&z[b * G + gate * H + u0], gx + (b * T + step) * G + gate * H + u0,
                      sizeof(float) * (u1 - u0));
      for (int64_t gate = 0; gate < 4; ++gate)
        for (int64_t u = u0; u < u1; u += kPanel)
          PanelGemm(h_prev, ld_prev, packed.data(), (gate * H + u) / kPanel, H,
                    z.data(), G, B);
      for (int64_t b = 0; b < B; ++b) {
        const float* zr = z.data() + b * G;
        for (int64_t u = u0; u < u1; u += 16) {
          const Cell cell = Step(zr, H, u, Load(c + b * H + u));
          Store(c + b * H + u, cell.c);
          Store(h_out + (b * T + step) * H + u, cell.o * Tanh(cell.c));
        }
      }
      barrier.Wait();  // h_t is whole before any thread's next matmul
    }
  });
  return ffi::Error::Success();
}

// Inputs: d_hs [B, T, H], dc_T, dh_T [B, H], cs [B, T, H], c0 [B, H],
// acts [B, T, 4H], w_hh [H, 4H]. Outputs: dz [B, T, 4H], dc0, dh0 [B, H].
ffi::Error LstmBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> d_hs,
                       ffi::Buffer<ffi::F32> dc_last, ffi::Buffer<ffi::F32> dh_last,
                       ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> c0,
                       ffi::Buffer<ffi::F32> acts, ffi::Buffer<ffi::F32> w_hh,
                       ffi::ResultBuffer<ffi::F32> dz,
                       ffi::ResultBuffer<ffi::F32> dc0,
                       ffi::ResultBuffer<ffi::F32> dh0) {
  Sizes s;
  if (auto e = CheckSizes(acts.dimensions(), w_hh.dimensions(), &s); e.failure()) {
    return e;
  }
  const int64_t T = s.T, B = s.B, H = s.H, G = 4 * H;
  // W_hh^T [4H, H], packed: dh_{t-1} = dz_t @ W_hh^T.
  std::vector<float> wt(G * H);
  const float* w = w_hh.typed_data();
  for (int64_t k = 0; k < H; ++k)
    for (int64_t g = 0; g < G; ++g) wt[g * H + k] = w[k * G + g];
  const std::vector<float> packed = Pack(wt.data(), G, H);
  float* dzp = dz->typed_data();
  float* dc = dc0->typed_data();  // the running dc, dc_0 at the end
  float* dh = dh0->typed_data();  // the running dh from later steps
  std::memcpy(dc, dc_last.typed_data(), sizeof(float) * B * H);
  std::memcpy(dh, dh_last.typed_data(), sizeof(float) * B * H);
  const float* dhs = d_hs.typed_data();
  const float* csp = cs.typed_data();
  const float* a = acts.typed_data();
  RunTeam(pool, H / kPanel, [&](int t, int n, Barrier& barrier) {
    int64_t u0, u1;
    UnitRange(s, t, n, &u0, &u1);
    for (int64_t step = T - 1; step >= 0; --step) {
      float* dzt = dzp + step * G;  // row b at b * T * G
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = b * T + step;
        const float* ar = a + row * G;
        float* zr = dzp + row * G;
        const float* c_prev = step ? csp + (row - 1) * H : c0.typed_data() + b * H;
        for (int64_t u = u0; u < u1; u += 16) {
          const int64_t at = b * H + u;
          const V i = Load(ar + u), f = Load(ar + H + u);
          const V g = Load(ar + 2 * H + u), o = Load(ar + 3 * H + u);
          const V tc = Tanh(Load(csp + row * H + u));
          const V dhv = Load(dhs + row * H + u) + Load(dh + at);
          const V dcv = Load(dc + at) + dhv * o * (1.f - tc * tc);
          Store(zr + u, dcv * g * i * (1.f - i));
          Store(zr + H + u, dcv * Load(c_prev + u) * f * (1.f - f));
          Store(zr + 2 * H + u, dcv * i * (1.f - g * g));
          Store(zr + 3 * H + u, dhv * tc * o * (1.f - o));
          Store(dc + at, dcv * f);
        }
      }
      barrier.Wait();  // dz_t is whole before the matmul reads it
      for (int64_t b = 0; b < B; ++b)
        std::memset(dh + b * H + u0, 0, sizeof(float) * (u1 - u0));
      for (int64_t u = u0; u < u1; u += kPanel)
        PanelGemm(dzt, T * G, packed.data(), u / kPanel, G, dh, H, B);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResearchLstmFwd, LstmFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResearchLstmInfer, LstmInferImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResearchLstmBwd, LstmBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
