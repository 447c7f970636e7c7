// oneDNN convolutions (forward, input gradient, filter gradient) as XLA FFI
// custom calls on CPU. Channels-last data (N, *spatial, C) and
// (*kernel_spatial, C_in, C_out) kernels, as in jaxseg.models.conv.
#include <cstdint>
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <mutex>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

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

// A reorder from one layout to another, with its scratchpad's size.
struct Reorder {
  std::unique_ptr<dnnl::reorder> prim;  // null when the layouts are the same
  memory::desc scratch;
  memory::desc to;  // the layout it writes
};

Reorder MakeReorder(const memory::desc& from, const memory::desc& to) {
  Reorder r;
  r.to = to;
  if (from != to) {
    auto pd = dnnl::reorder::primitive_desc(Engine(), from, Engine(), to,
                                            UserScratchpad());
    r.prim = std::make_unique<dnnl::reorder>(pd);
    r.scratch = pd.scratchpad_desc();
  }
  return r;
}

struct Entry {
  dnnl::primitive prim;
  memory::desc scratch;  // the primitive's scratchpad
  memory::desc kernel_user;  // the caller's (*ks, I, O) layout
  memory::desc kernel_prim;  // the primitive's kernel layout
  Reorder kernel;  // caller's kernel -> primitive's (forward, input gradient), or back (filter gradient)
};

bool HasAvx512() {
  // dnnl_cpu_isa_t sets this bit from avx512_core up.
  return (static_cast<int>(dnnl::get_effective_cpu_isa()) & 0x20) != 0;
}

// Whether oneDNN runs bfloat16 convolutions natively here: AVX-512 with its
// bfloat16 instructions (avx512_core_bf16) or AMX. Elsewhere it would emulate
// them, or have no kernel at all (AVX2).
bool HasNativeBf16() {
  constexpr int kBf16 = static_cast<int>(dnnl::cpu_isa::avx512_core_bf16);
  return (static_cast<int>(dnnl::get_effective_cpu_isa()) & kBf16) == kBf16;
}

std::string Key(Kind k, memory::data_type dt, const memory::dims& x, const memory::dims& w,
                const memory::dims& y, const memory::dims& s,
                const memory::dims& lo, const memory::dims& hi) {
  std::string key = std::to_string(k) + ':' + std::to_string(static_cast<int>(dt));
  for (const auto* v : {&x, &w, &y, &s, &lo, &hi}) {
    key += '|';
    for (auto i : *v) key += std::to_string(i) + ',';
  }
  return key;
}

// One primitive per (kind, shapes, strides, pads), made on first use.
Entry& Get(Kind kind, memory::data_type dt, const memory::dims& xd, const memory::dims& wd,
           const memory::dims& yd, const memory::dims& s,
           const memory::dims& lo, const memory::dims& hi) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<Entry>> cache;
  std::string key = Key(kind, dt, xd, wd, yd, s, lo, hi);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;

  int nd = static_cast<int>(xd.size()) - 2;
  // Data, kernel and gradients all in `dt` (f32 or bf16); oneDNN accumulates
  // in f32 either way.
  memory::desc x_md(xd, dt, DataTag(nd)), y_md(yd, dt, DataTag(nd));
  memory::desc w_any(wd, dt, tag::any), w_user(wd, dt, KernelTag(nd));
  memory::dims dil(nd, 0);
  auto& eng = Engine();
  auto attr = UserScratchpad();
  auto fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, x_md, w_any, y_md, s, dil, lo, hi,
      attr);
  auto e = std::make_unique<Entry>();
  e->kernel_user = w_user;
  if (kind == kBwdWeights) {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, x_md, w_any, y_md, s, dil,
        lo, hi, fwd_pd, attr);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->scratch = pd.scratchpad_desc();
    e->kernel_prim = pd.diff_weights_desc();
    e->kernel = MakeReorder(e->kernel_prim, w_user);
    return *cache.emplace(key, std::move(e)).first->second;
  }
  if (kind == kFwd) {
    e->prim = dnnl::convolution_forward(fwd_pd);
    e->kernel_prim = fwd_pd.weights_desc();
    e->scratch = fwd_pd.scratchpad_desc();
  } else {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, x_md, w_any, y_md, s, dil,
        lo, hi, fwd_pd, attr);
    e->prim = dnnl::convolution_backward_data(pd);
    e->kernel_prim = pd.weights_desc();
    e->scratch = pd.scratchpad_desc();
  }
  e->kernel = MakeReorder(w_user, e->kernel_prim);
  return *cache.emplace(key, std::move(e)).first->second;
}

ffi::Error Run(Kind kind, memory::data_type dt, void* x, void* w, void* y,
               ffi::Span<const int64_t> x_shape,
               ffi::Span<const int64_t> w_shape,
               ffi::Span<const int64_t> y_shape,
               ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> pad_lo,
               ffi::Span<const int64_t> pad_hi) {
  try {
    memory::dims xd = DataDims(x_shape), wd = KernelDims(w_shape),
                 yd = DataDims(y_shape);
    Entry& e = Get(kind, dt, xd, wd, yd, ToDims(strides), ToDims(pad_lo),
                   ToDims(pad_hi));
    auto& eng = Engine();
    dnnl::stream strm(eng);
    memory x_m(memory::desc(xd, dt, DataTag(static_cast<int>(xd.size()) - 2)),
               eng, x);
    memory y_m(memory::desc(yd, dt, DataTag(static_cast<int>(yd.size()) - 2)),
               eng, y);
    // One thread-local buffer holds, 64-byte aligned one after the other: the
    // scratchpad (shared by the convolution and the kernel's reorder, which
    // run in turn) and the kernel in the primitive's layout.
    auto align = [](size_t n) { return (n + 63) / 64 * 64; };
    size_t scratch_bytes = align(std::max(e.scratch.get_size(), e.kernel.scratch.get_size()));
    size_t kernel_bytes = e.kernel.prim ? align(e.kernel_prim.get_size()) : 0;
    char* scratch = static_cast<char*>(ThreadScratch(scratch_bytes + kernel_bytes));
    char* kernel_buf = scratch + scratch_bytes;
    memory conv_scratch(e.scratch, eng, scratch);
    auto reorder = [&](const Reorder& r, memory& from, memory& to) {
      memory rs(r.scratch, eng, scratch);
      r.prim->execute(strm, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                             {DNNL_ARG_SCRATCHPAD, rs}});
    };
    memory w_user(e.kernel_user, eng, w);
    memory w_prim = e.kernel.prim ? memory(e.kernel_prim, eng, kernel_buf) : w_user;
    if (kind == kFwd) {
      if (e.kernel.prim) reorder(e.kernel, w_user, w_prim);
      e.prim.execute(strm, {{DNNL_ARG_SRC, x_m}, {DNNL_ARG_WEIGHTS, w_prim},
                            {DNNL_ARG_DST, y_m},
                            {DNNL_ARG_SCRATCHPAD, conv_scratch}});
    } else if (kind == kBwdData) {
      if (e.kernel.prim) reorder(e.kernel, w_user, w_prim);
      e.prim.execute(strm, {{DNNL_ARG_DIFF_SRC, x_m},
                            {DNNL_ARG_WEIGHTS, w_prim},
                            {DNNL_ARG_DIFF_DST, y_m},
                            {DNNL_ARG_SCRATCHPAD, conv_scratch}});
    } else {
      e.prim.execute(strm, {{DNNL_ARG_SRC, x_m},
                            {DNNL_ARG_DIFF_WEIGHTS, w_prim},
                            {DNNL_ARG_DIFF_DST, y_m},
                            {DNNL_ARG_SCRATCHPAD, conv_scratch}});
      if (e.kernel.prim) reorder(e.kernel, w_prim, w_user);
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

template <ffi::DataType T>
constexpr memory::data_type DnnlType() {
  return T == ffi::BF16 ? memory::data_type::bf16 : memory::data_type::f32;
}

template <ffi::DataType T>
ffi::Error Fwd(ffi::Buffer<T> x, ffi::Buffer<T> w, ffi::ResultBuffer<T> y,
               ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> pad_lo,
               ffi::Span<const int64_t> pad_hi) {
  return Run(kFwd, DnnlType<T>(), x.untyped_data(), w.untyped_data(),
             y->untyped_data(), x.dimensions(), w.dimensions(),
             y->dimensions(), strides, pad_lo, pad_hi);
}

template <ffi::DataType T>
ffi::Error BwdData(ffi::Buffer<T> dy, ffi::Buffer<T> w,
                   ffi::ResultBuffer<T> dx,
                   ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> pad_lo,
                   ffi::Span<const int64_t> pad_hi) {
  return Run(kBwdData, DnnlType<T>(), dx->untyped_data(), w.untyped_data(),
             dy.untyped_data(), dx->dimensions(), w.dimensions(),
             dy.dimensions(), strides, pad_lo, pad_hi);
}

// The filter gradient as GEMMs over cache-sized chunks of an im2col matrix,
// for convolutions without AVX-512, where oneDNN's own kernels ran slower
// (`UseChunkedFilterGrad`). Per chunk of output voxels of one batch item,
// copies the x values every tap reads into a (rows x taps*C_in) block (zeros
// in the padding), which stays in L2, and accumulates block^T @ dy rows, a
// (taps*C_in x C_out) GEMM whose result is the kernel's own (*ks, C_in, C_out)
// layout. OpenMP threads take chunks with accumulators of their own, summed
// at the end.
struct ChunkPlan {
  int64_t n, cin, cout, taps;
  int64_t s[3], k[3], lo[3], in[3], out[3];
};

ChunkPlan PlanChunks(ffi::Span<const int64_t> x_shape,
                     ffi::Span<const int64_t> w_shape,
                     ffi::Span<const int64_t> y_shape,
                     ffi::Span<const int64_t> strides,
                     ffi::Span<const int64_t> pad_lo) {
  ChunkPlan p;
  int nd = static_cast<int>(x_shape.size()) - 2;
  p.n = x_shape[0];
  p.cin = x_shape[x_shape.size() - 1];
  p.cout = y_shape[y_shape.size() - 1];
  // Missing leading spatial axes (1D, 2D) have size 1.
  for (int i = 0; i < 3; ++i) {
    int j = i - (3 - nd);
    bool real = j >= 0;
    p.s[i] = real ? strides[j] : 1;
    p.k[i] = real ? w_shape[j] : 1;
    p.lo[i] = real ? pad_lo[j] : 0;
    p.in[i] = real ? x_shape[1 + j] : 1;
    p.out[i] = real ? y_shape[1 + j] : 1;
  }
  p.taps = p.k[0] * p.k[1] * p.k[2];
  return p;
}

// Returns false where a GEMM failed (invalid sizes).
bool ChunkedFilterGrad(const float* x, const float* dy, float* dw,
                       const ChunkPlan& p) {
  const int64_t cin = p.cin, cout = p.cout, width = p.taps * cin;
  const int64_t out_rows = p.out[0] * p.out[1] * p.out[2];
  const int threads = omp_get_max_threads();
  // Rows per chunk: the block (and dy's rows) in L2, but at least 256 (a
  // shorter GEMM re-reads its taps*C_in x C_out result for too little work:
  // 1.1x slower in sum on the EM plan's 512-channel layers); at least two
  // chunks per thread where the layer is large enough.
  int64_t chunk = std::clamp<int64_t>((1 << 19) / (width + cout), 256, 4096);
  int64_t per_item = (out_rows + chunk - 1) / chunk;
  int64_t want = (2 * threads + p.n - 1) / p.n;
  if (per_item < want) {
    per_item = std::min(want, std::max<int64_t>(1, out_rows / 32));
    chunk = (out_rows + per_item - 1) / per_item;
  }
  const int64_t items = p.n * per_item, acc_floats = width * cout;
  auto align = [](int64_t f) { return (f + 15) / 16 * 16; };
  float* acc = static_cast<float*>(ThreadScratch(
      4 * threads * (align(acc_floats) + align(chunk * width))));
  float* blocks = acc + threads * align(acc_floats);
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    float* mine = acc + tid * align(acc_floats);
    float* a = blocks + tid * align(chunk * width);
    std::memset(mine, 0, 4 * acc_floats);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      int64_t n = it / per_item, r0 = (it % per_item) * chunk;
      int64_t rows = std::min(chunk, out_rows - r0);
      if (rows <= 0) continue;
      const float* xn = x + n * p.in[0] * p.in[1] * p.in[2] * cin;
      for (int64_t r = 0; r < rows; ++r) {
        int64_t o = r0 + r, o2 = o % p.out[2], o1 = (o / p.out[2]) % p.out[1],
                o0 = o / (p.out[1] * p.out[2]);
        float* row = a + r * width;
        for (int64_t k0 = 0; k0 < p.k[0]; ++k0) {
          int64_t i0 = o0 * p.s[0] + k0 - p.lo[0];
          for (int64_t k1 = 0; k1 < p.k[1]; ++k1) {
            int64_t i1 = o1 * p.s[1] + k1 - p.lo[1];
            bool plane = i0 >= 0 && i0 < p.in[0] && i1 >= 0 && i1 < p.in[1];
            const float* line = plane ? xn + (i0 * p.in[1] + i1) * p.in[2] * cin : nullptr;
            for (int64_t k2 = 0; k2 < p.k[2]; ++k2) {
              int64_t i2 = o2 * p.s[2] + k2 - p.lo[2];
              float* dst = row + ((k0 * p.k[1] + k1) * p.k[2] + k2) * cin;
              if (plane && i2 >= 0 && i2 < p.in[2])
                std::memcpy(dst, line + i2 * cin, 4 * cin);
              else
                std::memset(dst, 0, 4 * cin);
            }
          }
        }
      }
      // The C API: an exception must not leave an OpenMP region.
      if (dnnl_sgemm('T', 'N', width, cout, rows, 1.f, a, width,
                     dy + (n * out_rows + r0) * cout, cout, 1.f, mine, cout) != dnnl_success)
        failed = true;
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < acc_floats; ++i) {
      float v = 0.f;
      for (int t = 0; t < threads; ++t) v += acc[t * align(acc_floats) + i];
      dw[i] = v;
    }
  }
  return !failed;
}

// Whether the filter gradient goes through `ChunkedFilterGrad`: without
// AVX-512. There oneDNN's 3D kernel is its GEMM one in any layout (slower
// even than XLA's GEMM loops), its 2D kernel on channels-last data is 1.2-3x
// slower than its direct kernel on channel-blocked copies of x and dy, and
// that direct kernel in turn ran slower than the chunks in sum over a U-Net's
// layers: 1.2x in 2D (the EM plan), 1.3x in 1D (benchmarks/README_conv.md,
// 'The 3D filter gradient at AVX2'). With AVX-512 oneDNN's channels-last
// kernels are the measured default.
bool UseChunkedFilterGrad() { return !HasAvx512(); }

template <ffi::DataType T>
ffi::Error BwdWeights(ffi::Buffer<T> x, ffi::Buffer<T> dy,
                      ffi::ResultBuffer<T> dw,
                      ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> pad_lo,
                      ffi::Span<const int64_t> pad_hi) {
  // Below 8 input channels (a first layer) the block's copies of 1-4 values
  // cost more than oneDNN's own kernel: it stays. bfloat16 runs only where
  // oneDNN has native kernels for it, which are AVX-512 ones.
  if (T == ffi::F32 && UseChunkedFilterGrad() && x.dimensions().back() >= 8) {
    try {
      if (!ChunkedFilterGrad(static_cast<const float*>(x.untyped_data()),
                             static_cast<const float*>(dy.untyped_data()),
                             static_cast<float*>(dw->untyped_data()),
                             PlanChunks(x.dimensions(), dw->dimensions(),
                                        dy.dimensions(), strides, pad_lo)))
        return ffi::Error(ffi::ErrorCode::kInternal,
                          "chunked filter gradient: oneDNN's sgemm failed");
    } catch (const std::bad_alloc&) {
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "chunked filter gradient: out of memory for its buffers");
    }
    return ffi::Error::Success();
  }
  return Run(kBwdWeights, DnnlType<T>(), x.untyped_data(), dw->untyped_data(),
             dy.untyped_data(), x.dimensions(), dw->dimensions(),
             dy.dimensions(), strides, pad_lo, pad_hi);
}

}  // namespace

#define JAXSEG_CONV_HANDLER(symbol, fn, T)                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                              \
      symbol, fn<T>,                                          \
      ffi::Ffi::Bind()                                        \
          .Arg<ffi::Buffer<T>>()                              \
          .Arg<ffi::Buffer<T>>()                              \
          .Ret<ffi::Buffer<T>>()                              \
          .Attr<ffi::Span<const int64_t>>("strides")          \
          .Attr<ffi::Span<const int64_t>>("pad_lo")           \
          .Attr<ffi::Span<const int64_t>>("pad_hi"));

// The instruction set oneDNN's kernels use here (dnnl_cpu_isa_t; ONEDNN_MAX_CPU_ISA caps it).
extern "C" int jaxseg_onednn_cpu_isa() {
  return static_cast<int>(dnnl::get_effective_cpu_isa());
}

// Whether the filter gradient of convolutions with at least 8 input channels
// goes through `ChunkedFilterGrad` here.
extern "C" int jaxseg_onednn_chunked_filter_grad() {
  return UseChunkedFilterGrad() ? 1 : 0;
}

// Whether the bfloat16 custom calls may be used here (`HasNativeBf16`).
extern "C" int jaxseg_onednn_native_bf16() { return HasNativeBf16() ? 1 : 0; }

// Arguments: (x, kernel) -> y; (dy, kernel) -> dx; (x, dy) -> dkernel.
JAXSEG_CONV_HANDLER(jaxseg_onednn_conv_fwd, Fwd, ffi::F32)
JAXSEG_CONV_HANDLER(jaxseg_onednn_conv_bwd_data, BwdData, ffi::F32)
JAXSEG_CONV_HANDLER(jaxseg_onednn_conv_bwd_weights, BwdWeights, ffi::F32)
JAXSEG_CONV_HANDLER(jaxseg_onednn_conv_fwd_bf16, Fwd, ffi::BF16)
JAXSEG_CONV_HANDLER(jaxseg_onednn_conv_bwd_data_bf16, BwdData, ffi::BF16)
JAXSEG_CONV_HANDLER(jaxseg_onednn_conv_bwd_weights_bf16, BwdWeights, ffi::BF16)
