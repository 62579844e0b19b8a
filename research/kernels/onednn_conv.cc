// 2-D convolutions through oneDNN, behind jax.ffi (NHWC, bfloat16 in, float32
// accumulation).
//
// XLA:CPU runs the 3x3 convolutions of airbench-style CNNs at ~60 GFLOP/s and
// does not reach the AVX-512 BF16 dot products (vdpbf16ps); oneDNN's brgemm
// convolutions do (~500 GFLOP/s on 2 Zen 4 cores). Three handlers:
//   research_onednn_conv_fwd:  y  = x (*) w            x [N, H, W, C] bf16,
//                                                      w [KH, KW, C, O] bf16
//                                                      -> y [N, Ho, Wo, O] bf16|f32
//   research_onednn_conv_bwd_data:    dx = dy (*)^T w  -> dx [N, H, W, C] bf16|f32
//   research_onednn_conv_bwd_weights: dw = x^T dy      -> dw [KH, KW, C, O] f32
// Stride 1, no dilation, explicit zero padding (attributes pad_top, pad_bottom,
// pad_left, pad_right). Activations are plain NHWC (oneDNN's `nhwc`, which its
// brgemm kernels use directly); weights come in flax's HWIO layout (`hwio`)
// and are reordered into the primitive's blocked layout on every call (they
// change every step; the reorder is tiny next to the convolution).
//
// Primitive descriptors and primitives are cached by shape, dtypes, padding
// and thread count: creating one costs milliseconds (brgemm kernels are
// JIT-compiled at creation). Scratchpads (user mode) and reordered weights
// live in per-thread buffers. Threading (attribute `threading`, see Run):
// by default the batch is cut over XLA's intra-op threads, each part a
// single-threaded oneDNN call, so oneDNN never competes with XLA for the
// cores; or (threading=1) oneDNN's own OpenMP team (libgomp, the
// onednn-cpu-gomp build) runs one call at a time over all cores.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" void omp_set_num_threads(int);  // libgomp, loaded with libdnnl
extern "C" int omp_get_num_procs();

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

dnnl::engine& Engine() {
  static dnnl::engine* eng = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *eng;
}

dnnl::stream& Stream() {
  static dnnl::stream* s = new dnnl::stream(Engine());
  return *s;
}

std::mutex& ExecMutex() {
  static std::mutex* mu = new std::mutex;
  return *mu;
}

enum class Op { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Problem {
  Op op;
  int64_t N, H, W, C, O, KH, KW, Ho, Wo;
  int64_t pt, pb, pl, pr;
  dt act_out;  // dtype of y (fwd) or dx (bwd_data); f32 for bwd_weights' dw

  std::string Key() const {
    std::string k;
    for (int64_t v : {static_cast<int64_t>(op), N, H, W, C, O, KH, KW, pt, pb, pl,
                      pr, static_cast<int64_t>(act_out)}) {
      k += std::to_string(v);
      k += ',';
    }
    return k;
  }
  memory::dims Src() const { return {N, C, H, W}; }
  memory::dims Wei() const { return {O, C, KH, KW}; }
  memory::dims Dst() const { return {N, O, Ho, Wo}; }
  memory::dims Strides() const { return {1, 1}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }
};

// A cached primitive with what it needs besides the call's buffers.
struct Entry {
  dnnl::primitive conv;
  memory::desc user_wei;   // hwio (bf16 in, f32 for dw out)
  memory::desc prim_wei;   // the primitive's weights layout
  bool reorder_wei = false;
  dnnl::reorder wei_reorder;
  memory::desc scratch_md;
};

dnnl::convolution_forward::primitive_desc FwdPd(const Problem& p, dt dst_dt) {
  auto& eng = Engine();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      memory::desc(p.Src(), dt::bf16, tag::nhwc),
      memory::desc(p.Wei(), dt::bf16, tag::any),
      memory::desc(p.Dst(), dst_dt, tag::nhwc), p.Strides(), p.PadL(), p.PadR(),
      attr);
}

std::unique_ptr<Entry> Create(const Problem& p) {
  auto& eng = Engine();
  auto e = std::make_unique<Entry>();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (p.op == Op::kFwd) {
    auto pd = FwdPd(p, p.act_out);
    e->conv = dnnl::convolution_forward(pd);
    e->prim_wei = pd.weights_desc();
    e->scratch_md = pd.scratchpad_desc();
  } else if (p.op == Op::kBwdData) {
    auto hint = FwdPd(p, dt::bf16);
    dnnl::convolution_backward_data::primitive_desc pd(
        eng, dnnl::algorithm::convolution_direct,
        memory::desc(p.Src(), p.act_out, tag::nhwc),
        memory::desc(p.Wei(), dt::bf16, tag::any),
        memory::desc(p.Dst(), dt::bf16, tag::nhwc), p.Strides(), p.PadL(),
        p.PadR(), hint, attr);
    e->conv = dnnl::convolution_backward_data(pd);
    e->prim_wei = pd.weights_desc();
    e->scratch_md = pd.scratchpad_desc();
  } else {
    auto hint = FwdPd(p, dt::bf16);
    dnnl::convolution_backward_weights::primitive_desc pd(
        eng, dnnl::algorithm::convolution_direct,
        memory::desc(p.Src(), dt::bf16, tag::nhwc),
        memory::desc(p.Wei(), dt::f32, tag::any),
        memory::desc(p.Dst(), dt::bf16, tag::nhwc), p.Strides(), p.PadL(),
        p.PadR(), hint, attr);
    e->conv = dnnl::convolution_backward_weights(pd);
    e->prim_wei = pd.diff_weights_desc();
    e->scratch_md = pd.scratchpad_desc();
  }
  const dt wei_dt = p.op == Op::kBwdWeights ? dt::f32 : dt::bf16;
  e->user_wei = memory::desc(p.Wei(), wei_dt, tag::hwio);
  e->reorder_wei = e->prim_wei != e->user_wei;
  if (e->reorder_wei) {
    e->wei_reorder = p.op == Op::kBwdWeights
                         ? dnnl::reorder(dnnl::reorder::primitive_desc(
                               eng, e->prim_wei, eng, e->user_wei))
                         : dnnl::reorder(dnnl::reorder::primitive_desc(
                               eng, e->user_wei, eng, e->prim_wei));
  }
  return e;
}

// Runs problem p on the call's buffers: `a` (x for fwd and bwd_weights, dy
// for bwd_data), `wei` (w, or dw for bwd_weights), `b` (y for fwd, dx for
// bwd_data, dy for bwd_weights), with oneDNN's threads; the caller holds the
// execution lock (OpenMP mode) or runs one batch part on one thread (pool
// mode). Scratchpads and reordered weights live in per-thread buffers.
void Execute(Entry* e, const Problem& p, void* a, void* wei, void* b) {
  auto& eng = Engine();
  thread_local dnnl::stream* s = new dnnl::stream(eng);
  thread_local std::vector<uint8_t> scratch_buf;
  thread_local std::vector<uint8_t> wei_buf;
  if (scratch_buf.size() < e->scratch_md.get_size()) {
    scratch_buf.resize(e->scratch_md.get_size());
  }
  if (wei_buf.size() < e->prim_wei.get_size()) wei_buf.resize(e->prim_wei.get_size());
  memory user_wei(e->user_wei, eng, wei);
  memory prim_wei =
      e->reorder_wei ? memory(e->prim_wei, eng, wei_buf.data()) : user_wei;
  memory scratch(e->scratch_md, eng, scratch_buf.data());
  const dt dst_dt = p.op == Op::kFwd ? p.act_out : dt::bf16;
  const dt src_dt = p.op == Op::kBwdData ? p.act_out : dt::bf16;
  memory src(memory::desc(p.Src(), src_dt, tag::nhwc), eng,
             p.op == Op::kBwdData ? b : a);
  memory dst(memory::desc(p.Dst(), dst_dt, tag::nhwc), eng,
             p.op == Op::kFwd ? b : (p.op == Op::kBwdData ? a : b));
  if (p.op == Op::kFwd) {
    if (e->reorder_wei) e->wei_reorder.execute(*s, user_wei, prim_wei);
    e->conv.execute(*s, {{DNNL_ARG_SRC, src},
                         {DNNL_ARG_WEIGHTS, prim_wei},
                         {DNNL_ARG_DST, dst},
                         {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (p.op == Op::kBwdData) {
    if (e->reorder_wei) e->wei_reorder.execute(*s, user_wei, prim_wei);
    e->conv.execute(*s, {{DNNL_ARG_DIFF_DST, dst},
                         {DNNL_ARG_WEIGHTS, prim_wei},
                         {DNNL_ARG_DIFF_SRC, src},
                         {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    e->conv.execute(*s, {{DNNL_ARG_SRC, src},
                         {DNNL_ARG_DIFF_DST, dst},
                         {DNNL_ARG_DIFF_WEIGHTS, prim_wei},
                         {DNNL_ARG_SCRATCHPAD, scratch}});
    if (e->reorder_wei) e->wei_reorder.execute(*s, prim_wei, user_wei);
  }
  s->wait();
}

Entry* Lookup(const Problem& p, int threads) {
  static std::mutex* mu = new std::mutex;
  static auto* cache = new std::map<std::string, std::unique_ptr<Entry>>;
  std::lock_guard<std::mutex> lock(*mu);
  auto& slot = (*cache)[p.Key() + "t" + std::to_string(threads)];
  if (!slot) slot = Create(p);  // oneDNN sizes its blocking for this thread count
  return slot.get();
}

// Runs f(part) for part in [0, parts) on the caller and the pool's threads;
// the caller runs every part no pool thread has claimed, so a busy pool never
// blocks it.
template <typename F>
void ParallelParts(ffi::ThreadPool& pool, int parts, F f) {
  struct Shared {
    std::atomic<int> next{0};
    std::atomic<int> done{0};
  };
  auto shared = std::make_shared<Shared>();
  F* body = &f;
  for (int i = 1; i < parts; ++i) {
    pool.Schedule([shared, body, parts] {
      const int part = shared->next.fetch_add(1);
      if (part >= parts) return;
      (*body)(part);
      shared->done.fetch_add(1, std::memory_order_release);
    });
  }
  for (int part; (part = shared->next.fetch_add(1)) < parts;) {
    f(part);
    shared->done.fetch_add(1, std::memory_order_release);
  }
  while (shared->done.load(std::memory_order_acquire) < parts) {
    __builtin_ia32_pause();
  }
}

// How oneDNN's work is spread over the cores (attribute `threading`):
//   0, "pool": the batch is cut in as many parts as XLA's intra-op pool has
//     threads; each part runs single-threaded oneDNN on one pool thread (the
//     caller takes any part no pool thread has started), so the convolutions
//     share XLA's threads instead of competing with them;
//   1, "omp": one call, oneDNN's OpenMP team over all cores, one call at a time.
ffi::Error Run(ffi::ThreadPool& pool, const Problem& p, void* a, void* wei,
               void* b, int64_t threading) {
  try {
    if (threading == 1) {
      std::lock_guard<std::mutex> lock(ExecMutex());
      omp_set_num_threads(omp_get_num_procs());  // pool mode set this thread to 1
      Execute(Lookup(p, 0), p, a, wei, b);
      return ffi::Error::Success();
    }
    const int parts = static_cast<int>(
        std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), p.N)));
    // Bytes per image of a (x or dy) and b (y, dx or dy).
    auto bytes = [](dt t) { return t == dt::f32 ? 4 : 2; };
    const int64_t src_img = p.H * p.W * p.C, dst_img = p.Ho * p.Wo * p.O;
    int64_t a_img, b_img;
    if (p.op == Op::kFwd) {
      a_img = src_img * 2;
      b_img = dst_img * bytes(p.act_out);
    } else if (p.op == Op::kBwdData) {
      a_img = dst_img * 2;
      b_img = src_img * bytes(p.act_out);
    } else {
      a_img = src_img * 2;
      b_img = dst_img * 2;
    }
    std::vector<std::vector<float>> dw_parts(
        p.op == Op::kBwdWeights ? parts - 1 : 0);
    ParallelParts(pool, parts, [&](int part) {
      omp_set_num_threads(1);
      const int64_t n0 = p.N * part / parts, n1 = p.N * (part + 1) / parts;
      Problem q = p;
      q.N = n1 - n0;
      Entry* e = Lookup(q, 1);
      void* qa = static_cast<uint8_t*>(a) + n0 * a_img;
      void* qb = static_cast<uint8_t*>(b) + n0 * b_img;
      if (p.op == Op::kBwdWeights && part > 0) {
        auto& dw = dw_parts[part - 1];
        dw.assign(p.KH * p.KW * p.C * p.O, 0.f);
        Execute(e, q, qa, dw.data(), qb);
      } else {
        Execute(e, q, qa, wei, qb);
      }
    });
    if (p.op == Op::kBwdWeights) {  // the parts' weight gradients, in order
      float* out = static_cast<float*>(wei);
      for (const auto& dw : dw_parts) {
        for (size_t i = 0; i < dw.size(); ++i) out[i] += dw[i];
      }
    }
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error ActDtype(ffi::DataType t, dt* out) {
  if (t == ffi::DataType::BF16) {
    *out = dt::bf16;
  } else if (t == ffi::DataType::F32) {
    *out = dt::f32;
  } else {
    return ffi::Error::InvalidArgument("oneDNN convolution: outputs are bf16 or f32");
  }
  return ffi::Error::Success();
}

ffi::Error Fill(Op op, ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                ffi::Span<const int64_t> y, int64_t pt, int64_t pb, int64_t pl,
                int64_t pr, Problem* p) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4) {
    return ffi::Error::InvalidArgument(
        "oneDNN convolution: x, y must be NHWC and w HWIO (rank 4)");
  }
  *p = Problem{op, x[0], x[1], x[2], x[3], w[3], w[0], w[1], y[1], y[2],
               pt, pb, pl, pr, dt::f32};
  if (w[2] != p->C || y[0] != p->N || y[3] != p->O ||
      p->Ho != p->H + pt + pb - p->KH + 1 || p->Wo != p->W + pl + pr - p->KW + 1 ||
      p->Ho < 1 || p->Wo < 1 || pt < 0 || pb < 0 || pl < 0 || pr < 0) {
    return ffi::Error::InvalidArgument(
        "oneDNN convolution: shapes do not match a stride-1 convolution");
  }
  return ffi::Error::Success();
}

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                   ffi::Result<ffi::AnyBuffer> y, int64_t pad_top,
                   int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                   int64_t threading) {
  Problem p;
  if (auto e = Fill(Op::kFwd, x.dimensions(), w.dimensions(), y->dimensions(),
                    pad_top, pad_bottom, pad_left, pad_right, &p);
      e.failure()) {
    return e;
  }
  if (auto e = ActDtype(y->element_type(), &p.act_out); e.failure()) return e;
  return Run(pool, p, x.untyped_data(), w.untyped_data(), y->untyped_data(),
             threading);
}

ffi::Error BwdDataImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> dy, ffi::Buffer<ffi::BF16> w,
                       ffi::Result<ffi::AnyBuffer> dx, int64_t pad_top,
                       int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                   int64_t threading) {
  Problem p;
  if (auto e = Fill(Op::kBwdData, dx->dimensions(), w.dimensions(),
                    dy.dimensions(), pad_top, pad_bottom, pad_left, pad_right, &p);
      e.failure()) {
    return e;
  }
  if (auto e = ActDtype(dx->element_type(), &p.act_out); e.failure()) return e;
  return Run(pool, p, dy.untyped_data(), w.untyped_data(), dx->untyped_data(),
             threading);
}

ffi::Error BwdWeightsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> dy,
                          ffi::Result<ffi::Buffer<ffi::F32>> dw, int64_t pad_top,
                          int64_t pad_bottom, int64_t pad_left,
                          int64_t pad_right, int64_t threading) {
  Problem p;
  if (auto e = Fill(Op::kBwdWeights, x.dimensions(), dw->dimensions(),
                    dy.dimensions(), pad_top, pad_bottom, pad_left, pad_right, &p);
      e.failure()) {
    return e;
  }
  return Run(pool, p, x.untyped_data(), dw->untyped_data(), dy.untyped_data(),
             threading);
}

}  // namespace

// The ISA oneDNN dispatches to here (e.g. "avx512_core_bf16"), for tests and
// benchmarks; a plain C symbol called through ctypes.
extern "C" int ResearchOnednnIsa(char* out, int n) {
  const char* name = "unknown";
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::avx512_core_bf16: name = "avx512_core_bf16"; break;
    case dnnl::cpu_isa::avx512_core_amx: name = "avx512_core_amx"; break;
    case dnnl::cpu_isa::avx512_core_fp16: name = "avx512_core_fp16"; break;
    case dnnl::cpu_isa::avx512_core_vnni: name = "avx512_core_vnni"; break;
    case dnnl::cpu_isa::avx512_core: name = "avx512_core"; break;
    case dnnl::cpu_isa::avx2_vnni: name = "avx2_vnni"; break;
    case dnnl::cpu_isa::avx2: name = "avx2"; break;
    default: break;
  }
  std::strncpy(out, name, n);
  return 0;
}

#define RESEARCH_PADS                      \
  .Attr<int64_t>("pad_top")                \
      .Attr<int64_t>("pad_bottom")         \
      .Attr<int64_t>("pad_left")           \
      .Attr<int64_t>("pad_right")          \
      .Attr<int64_t>("threading")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResearchOnednnConvFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::AnyBuffer>() RESEARCH_PADS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResearchOnednnConvBwdData, BwdDataImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::AnyBuffer>() RESEARCH_PADS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResearchOnednnConvBwdWeights, BwdWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() RESEARCH_PADS);
