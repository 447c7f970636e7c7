// oneDNN convolutions (forward, input gradient, filter gradient) as XLA FFI
// custom calls on CPU. Channels-last data (N, *spatial, C) and
// (*kernel_spatial, C_in, C_out) kernels, as in jaxseg.models.conv.
#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <new>
#include <mutex>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = memory::format_tag;

dnnl::engine& Engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

tag DataTag(int nd) {
  return nd == 1 ? tag::nwc : nd == 2 ? tag::nhwc : tag::ndhwc;
}
tag KernelTag(int nd) {
  return nd == 1 ? tag::wio : nd == 2 ? tag::hwio : tag::dhwio;
}

// Every primitive is made with a user-managed scratchpad. With oneDNN's default
// (library) scratchpad, some implementations (the GEMM-based backward-weights
// convolution that AVX2 CPUs get) bind a thread-local buffer when the
// primitive is *created*; XLA runs the custom call on its own worker threads,
// where that buffer does not exist, and the primitive writes through a null
// pointer. Here each call passes a buffer owned by the calling thread instead.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A grow-only, 64-byte aligned buffer per calling thread.
void* ThreadScratch(size_t bytes) {
  struct Buf {
    void* p = nullptr;
    size_t size = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf buf;
  if (bytes > buf.size) {
    std::free(buf.p);
    size_t rounded = (bytes + 63) / 64 * 64;
    buf.p = std::aligned_alloc(64, rounded);
    buf.size = buf.p ? rounded : 0;
    if (!buf.p) throw std::bad_alloc();
  }
  return buf.p;
}

// (N, *sp, C) -> oneDNN dims (N, C, *sp).
memory::dims DataDims(ffi::Span<const int64_t> d) {
  memory::dims out{d[0], d[d.size() - 1]};
  for (size_t i = 1; i + 1 < d.size(); ++i) out.push_back(d[i]);
  return out;
}
// (*ks, I, O) -> (O, I, *ks).
memory::dims KernelDims(ffi::Span<const int64_t> d) {
  size_t n = d.size();
  memory::dims out{d[n - 1], d[n - 2]};
  for (size_t i = 0; i + 2 < n; ++i) out.push_back(d[i]);
  return out;
}
memory::dims ToDims(ffi::Span<const int64_t> v) {
  return memory::dims(v.begin(), v.end());
}

enum Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Entry {
  dnnl::primitive prim;
  memory::desc scratch;  // the primitive's scratchpad
  memory::desc reorder_scratch;
  memory::desc kernel_user;  // the caller's (*ks, I, O) layout
  memory::desc kernel_prim;  // the layout the primitive wants
  std::unique_ptr<dnnl::reorder> reorder;  // between the two, if they differ
};

std::string Key(Kind k, const memory::dims& x, const memory::dims& w,
                const memory::dims& y, const memory::dims& s,
                const memory::dims& lo, const memory::dims& hi) {
  std::string key = std::to_string(k);
  for (const auto* v : {&x, &w, &y, &s, &lo, &hi}) {
    key += '|';
    for (auto i : *v) key += std::to_string(i) + ',';
  }
  return key;
}

// One primitive per (kind, shapes, strides, pads), made on first use.
Entry& Get(Kind kind, const memory::dims& xd, const memory::dims& wd,
           const memory::dims& yd, const memory::dims& s,
           const memory::dims& lo, const memory::dims& hi) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<Entry>> cache;
  std::string key = Key(kind, xd, wd, yd, s, lo, hi);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;

  int nd = static_cast<int>(xd.size()) - 2;
  auto f32 = memory::data_type::f32;
  memory::desc x_md(xd, f32, DataTag(nd)), y_md(yd, f32, DataTag(nd));
  memory::desc w_any(wd, f32, tag::any), w_user(wd, f32, KernelTag(nd));
  memory::dims dil(nd, 0);
  auto& eng = Engine();
  auto attr = UserScratchpad();
  auto fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, x_md, w_any, y_md, s, dil, lo, hi,
      attr);
  auto e = std::make_unique<Entry>();
  e->kernel_user = w_user;
  if (kind == kFwd) {
    e->prim = dnnl::convolution_forward(fwd_pd);
    e->kernel_prim = fwd_pd.weights_desc();
    e->scratch = fwd_pd.scratchpad_desc();
  } else if (kind == kBwdData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, x_md, w_any, y_md, s, dil,
        lo, hi, fwd_pd, attr);
    e->prim = dnnl::convolution_backward_data(pd);
    e->kernel_prim = pd.weights_desc();
    e->scratch = pd.scratchpad_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, x_md, w_any, y_md, s, dil,
        lo, hi, fwd_pd, attr);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->kernel_prim = pd.diff_weights_desc();
    e->scratch = pd.scratchpad_desc();
  }
  if (e->kernel_prim != e->kernel_user) {
    auto rpd = kind == kBwdWeights
        ? dnnl::reorder::primitive_desc(eng, e->kernel_prim, eng, w_user, attr)
        : dnnl::reorder::primitive_desc(eng, w_user, eng, e->kernel_prim, attr);
    e->reorder = std::make_unique<dnnl::reorder>(rpd);
    e->reorder_scratch = rpd.scratchpad_desc();
  }
  return *cache.emplace(key, std::move(e)).first->second;
}

ffi::Error Run(Kind kind, void* x, void* w, void* y,
               ffi::Span<const int64_t> x_shape,
               ffi::Span<const int64_t> w_shape,
               ffi::Span<const int64_t> y_shape,
               ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> pad_lo,
               ffi::Span<const int64_t> pad_hi) {
  try {
    memory::dims xd = DataDims(x_shape), wd = KernelDims(w_shape),
                 yd = DataDims(y_shape);
    Entry& e = Get(kind, xd, wd, yd, ToDims(strides), ToDims(pad_lo),
                   ToDims(pad_hi));
    auto& eng = Engine();
    dnnl::stream strm(eng);
    memory x_m(memory::desc(xd, memory::data_type::f32,
                            DataTag(static_cast<int>(xd.size()) - 2)),
               eng, x);
    memory y_m(memory::desc(yd, memory::data_type::f32,
                            DataTag(static_cast<int>(yd.size()) - 2)),
               eng, y);
    memory w_user(e.kernel_user, eng, w);
    memory w_prim = e.reorder ? memory(e.kernel_prim, eng) : w_user;
    // One buffer serves the reorder and the convolution: they run in turn.
    size_t scratch_bytes = std::max(e.scratch.get_size(),
                                    e.reorder_scratch.get_size());
    void* scratch = ThreadScratch(scratch_bytes);
    memory conv_scratch(e.scratch, eng, scratch);
    auto reorder = [&](memory& from, memory& to) {
      memory rs(e.reorder_scratch, eng, scratch);
      e.reorder->execute(strm, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                {DNNL_ARG_SCRATCHPAD, rs}});
    };
    if (kind == kFwd) {
      if (e.reorder) reorder(w_user, w_prim);
      e.prim.execute(strm, {{DNNL_ARG_SRC, x_m}, {DNNL_ARG_WEIGHTS, w_prim},
                            {DNNL_ARG_DST, y_m},
                            {DNNL_ARG_SCRATCHPAD, conv_scratch}});
    } else if (kind == kBwdData) {
      if (e.reorder) reorder(w_user, w_prim);
      e.prim.execute(strm, {{DNNL_ARG_DIFF_SRC, x_m},
                            {DNNL_ARG_WEIGHTS, w_prim},
                            {DNNL_ARG_DIFF_DST, y_m},
                            {DNNL_ARG_SCRATCHPAD, conv_scratch}});
    } else {
      e.prim.execute(strm, {{DNNL_ARG_SRC, x_m},
                            {DNNL_ARG_DIFF_WEIGHTS, w_prim},
                            {DNNL_ARG_DIFF_DST, y_m},
                            {DNNL_ARG_SCRATCHPAD, conv_scratch}});
      if (e.reorder) reorder(w_prim, w_user);
    }
    strm.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN convolution: ") + err.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "oneDNN convolution: out of memory for its scratchpad");
  }
  return ffi::Error::Success();
}

ffi::Error Fwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
               ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> pad_lo,
               ffi::Span<const int64_t> pad_hi) {
  return Run(kFwd, x.untyped_data(), w.untyped_data(), y->untyped_data(),
             x.dimensions(), w.dimensions(), y->dimensions(), strides, pad_lo,
             pad_hi);
}

ffi::Error BwdData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> dx,
                   ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> pad_lo,
                   ffi::Span<const int64_t> pad_hi) {
  return Run(kBwdData, dx->untyped_data(), w.untyped_data(),
             dy.untyped_data(), dx->dimensions(), w.dimensions(),
             dy.dimensions(), strides, pad_lo, pad_hi);
}

ffi::Error BwdWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw,
                      ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> pad_lo,
                      ffi::Span<const int64_t> pad_hi) {
  return Run(kBwdWeights, x.untyped_data(), dw->untyped_data(),
             dy.untyped_data(), x.dimensions(), dw->dimensions(),
             dy.dimensions(), strides, pad_lo, pad_hi);
}

}  // namespace

#define JAXSEG_CONV_HANDLER(symbol, fn)                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                              \
      symbol, fn,                                             \
      ffi::Ffi::Bind()                                        \
          .Arg<ffi::Buffer<ffi::F32>>()                       \
          .Arg<ffi::Buffer<ffi::F32>>()                       \
          .Ret<ffi::Buffer<ffi::F32>>()                       \
          .Attr<ffi::Span<const int64_t>>("strides")          \
          .Attr<ffi::Span<const int64_t>>("pad_lo")           \
          .Attr<ffi::Span<const int64_t>>("pad_hi"));

// The instruction set oneDNN's kernels use here (dnnl_cpu_isa_t; ONEDNN_MAX_CPU_ISA caps it).
extern "C" int jaxseg_onednn_cpu_isa() {
  return static_cast<int>(dnnl::get_effective_cpu_isa());
}

// Arguments: (x, kernel) -> y; (dy, kernel) -> dx; (x, dy) -> dkernel.
JAXSEG_CONV_HANDLER(jaxseg_onednn_conv_fwd, Fwd)
JAXSEG_CONV_HANDLER(jaxseg_onednn_conv_bwd_data, BwdData)
JAXSEG_CONV_HANDLER(jaxseg_onednn_conv_bwd_weights, BwdWeights)
