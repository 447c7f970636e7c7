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
  // The filter gradient where it reads x and dy in oneDNN's channel-blocked
  // layout (`TryBlockedFilterGrad`): copies them there.
  Reorder x, dy;
};

bool HasAvx512() {
  // dnnl_cpu_isa_t sets this bit from avx512_core up.
  return (static_cast<int>(dnnl::get_effective_cpu_isa()) & 0x20) != 0;
}

bool IsGemm(const dnnl::primitive_desc_base& pd) {
  return std::string(pd.impl_info_str()).find("gemm") != std::string::npos;
}

// Without AVX-512, oneDNN's filter gradient on channels-last data is 1.2-3x
// slower than its direct AVX2 kernel on 8-channel blocks (nChw8c), the copies
// of x and dy included (2D U-Net layers; benchmarks/README_conv.md, 'ISA
// levels'). So there the filter gradient asks for oneDNN's preferred layout,
// unless the input has fewer than 8 channels (padded to a whole block) or
// even that kernel is GEMM-based: then channels-last stays (in 3D at AVX2,
// where it is, `WindowFilterGrad` runs instead). With
// AVX-512 the channels-last kernels are the measured default.
bool TryBlockedFilterGrad(int64_t c_in) { return !HasAvx512() && c_in >= 8; }

// The filter gradient's primitive descriptor, for channels-last data or, where
// `blocked`, for the data layout oneDNN prefers.
dnnl::convolution_backward_weights::primitive_desc FilterGradPd(
    const memory::dims& xd, const memory::dims& wd, const memory::dims& yd,
    const memory::dims& s, const memory::dims& lo, const memory::dims& hi,
    bool blocked) {
  int nd = static_cast<int>(xd.size()) - 2;
  auto f32 = memory::data_type::f32;
  tag data = blocked ? tag::any : DataTag(nd);
  memory::desc x_md(xd, f32, data), y_md(yd, f32, data), w_any(wd, f32, tag::any);
  memory::dims dil(nd, 0);
  auto fwd_pd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, x_md, w_any, y_md, s, dil, lo, hi,
      UserScratchpad());
  return dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, x_md, w_any, y_md, s, dil,
      lo, hi, fwd_pd, UserScratchpad());
}

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
  if (kind == kBwdWeights) {
    bool blocked = TryBlockedFilterGrad(xd[1]);
    auto pd = FilterGradPd(xd, wd, yd, s, lo, hi, blocked);
    if (blocked && IsGemm(pd)) pd = FilterGradPd(xd, wd, yd, s, lo, hi, false);
    auto e = std::make_unique<Entry>();
    e->kernel_user = w_user;
    e->prim = dnnl::convolution_backward_weights(pd);
    e->scratch = pd.scratchpad_desc();
    e->kernel_prim = pd.diff_weights_desc();
    e->kernel = MakeReorder(e->kernel_prim, w_user);
    e->x = MakeReorder(x_md, pd.src_desc());
    e->dy = MakeReorder(y_md, pd.diff_dst_desc());
    return *cache.emplace(key, std::move(e)).first->second;
  }
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
    // One thread-local buffer holds, 64-byte aligned one after the other: the
    // scratchpad (shared by the convolution and the reorders, which run in
    // turn), the kernel in the primitive's layout and, for a blocked filter
    // gradient, the blocked copies of x and dy.
    auto align = [](size_t n) { return (n + 63) / 64 * 64; };
    size_t scratch_bytes = align(std::max({e.scratch.get_size(), e.kernel.scratch.get_size(),
                                           e.x.scratch.get_size(), e.dy.scratch.get_size()}));
    size_t kernel_bytes = e.kernel.prim ? align(e.kernel_prim.get_size()) : 0;
    size_t x_bytes = e.x.prim ? align(e.x.to.get_size()) : 0;
    size_t dy_bytes = e.dy.prim ? align(e.dy.to.get_size()) : 0;
    char* scratch = static_cast<char*>(
        ThreadScratch(scratch_bytes + kernel_bytes + x_bytes + dy_bytes));
    char* kernel_buf = scratch + scratch_bytes;
    char* x_buf = kernel_buf + kernel_bytes;
    char* dy_buf = x_buf + x_bytes;
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
      memory x_prim = e.x.prim ? memory(e.x.to, eng, x_buf) : x_m;
      memory dy_prim = e.dy.prim ? memory(e.dy.to, eng, dy_buf) : y_m;
      if (e.x.prim) reorder(e.x, x_m, x_prim);
      if (e.dy.prim) reorder(e.dy, y_m, dy_prim);
      e.prim.execute(strm, {{DNNL_ARG_SRC, x_prim},
                            {DNNL_ARG_DIFF_WEIGHTS, w_prim},
                            {DNNL_ARG_DIFF_DST, dy_prim},
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

// The filter gradient as GEMMs over shifted windows of the padded input, for
// where oneDNN's own is GEMM-based (3D without AVX-512): that one builds an
// im2col copy of x, 27 values per voxel and channel for a 3-kernel; this one
// reads x in place.
//
// At stride 1, for one batch item, with x zero-padded to a (Q0, Q1, Q2) grid
// and dy written into an (O0, Q1, Q2) grid (zeros where o1 >= O1 or
// o2 >= O2), both flattened to rows of C_in and C_out values:
//   dW[k0, k1, k2] = sum_j X[j + k0*Q1*Q2]^T DY[j - k1*Q2 - k2]
// (DY is zero outside its rows; where o1 or o2 lies outside the output, the X
// row read belongs to the next row or plane and meets a zero of dy). For one
// k0, the k1, k2 taps share the X rows, so their DY rows are laid side by
// side into one (rows x 9*C_out) block per chunk of rows, which fits in
// cache, and one GEMM (C_in x rows) @ (rows x 9*C_out) computes nine taps.
// A stride s splits x into its phases (every s-th voxel from offset p per
// axis), each a stride-1 problem for the taps k = a*s + p. OpenMP threads take
// (item, chunk) pairs with accumulators of their own, summed at the end.
struct WindowPlan {
  int64_t n, cin, cout;
  int64_t s[3], k[3], lo[3], in[3], out[3], q[3], phases[3];
  int64_t taps, nphases, grid_rows, dy_rows, slack_rows;
};

WindowPlan PlanWindows(ffi::Span<const int64_t> x_shape,
                       ffi::Span<const int64_t> w_shape,
                       ffi::Span<const int64_t> y_shape,
                       ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> pad_lo) {
  WindowPlan p;
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
    p.phases[i] = std::min(p.s[i], p.k[i]);
    p.q[i] = p.out[i] + (p.k[i] + p.s[i] - 1) / p.s[i] - 1;
  }
  p.taps = p.k[0] * p.k[1] * p.k[2];
  p.nphases = p.phases[0] * p.phases[1] * p.phases[2];
  p.grid_rows = p.q[0] * p.q[1] * p.q[2];
  p.dy_rows = p.out[0] * p.q[1] * p.q[2];
  p.slack_rows = p.q[1] * p.q[2];  // covers the last grid's overhang
  return p;
}

// One GEMM's worth of taps: phase `ph`, first-axis offset `a0`, and the
// (a1, a2) offsets of its `count` taps, whose DY rows sit side by side.
struct TapGroup {
  int64_t ph, a0, count, acc_offset;
  std::vector<int64_t> shift, tap;  // shift = a1*Q2 + a2 rows; tap index into dw
};

// Returns false where a GEMM failed (invalid sizes).
bool WindowFilterGrad(const float* x, const float* dy, float* dw,
                      const WindowPlan& p) {
  const int64_t cin = p.cin, cout = p.cout;
  const int64_t grid = p.grid_rows * cin, dyg = p.dy_rows * cout;
  std::vector<TapGroup> groups;
  int64_t acc_floats = 0, max_count = 0, max_shift = 0;
  for (int64_t ph = 0; ph < p.nphases; ++ph) {
    int64_t pp[3] = {ph / (p.phases[1] * p.phases[2]), (ph / p.phases[2]) % p.phases[1],
                     ph % p.phases[2]};
    int64_t na[3];
    for (int i = 0; i < 3; ++i) na[i] = (p.k[i] - pp[i] + p.s[i] - 1) / p.s[i];
    for (int64_t a0 = 0; a0 < na[0]; ++a0) {
      TapGroup g{ph, a0, 0, acc_floats, {}, {}};
      for (int64_t a1 = 0; a1 < na[1]; ++a1)
        for (int64_t a2 = 0; a2 < na[2]; ++a2) {
          int64_t k0 = a0 * p.s[0] + pp[0], k1 = a1 * p.s[1] + pp[1], k2 = a2 * p.s[2] + pp[2];
          g.shift.push_back(a1 * p.q[2] + a2);
          g.tap.push_back((k0 * p.k[1] + k1) * p.k[2] + k2);
          max_shift = std::max(max_shift, g.shift.back());
          ++g.count;
        }
      acc_floats += cin * g.count * cout;
      max_count = std::max(max_count, g.count);
      groups.push_back(g);
    }
  }
  const int threads = omp_get_max_threads();
  // The sum runs over rows j in [0, dy_rows + max_shift), cut into chunks
  // whose side-by-side DY block (rows x count*C_out) stays in L2; at least
  // two chunks per thread where the layer is large enough.
  const int64_t total_rows = p.dy_rows + max_shift;
  int64_t chunk = std::clamp<int64_t>((1 << 19) / (max_count * cout + cin), 64, 4096);
  int64_t per_item = (total_rows + chunk - 1) / chunk;
  int64_t want = (2 * threads + p.n - 1) / p.n;
  if (per_item < want) {
    per_item = std::min(want, std::max<int64_t>(1, total_rows / 32));
    chunk = (total_rows + per_item - 1) / per_item;
  }
  const int64_t items = p.n * per_item;
  const int64_t x_floats = p.n * p.nphases * grid + p.slack_rows * cin;
  const int64_t block_floats = chunk * max_count * cout;
  auto align = [](int64_t f) { return (f + 15) / 16 * 16; };
  float* xg = static_cast<float*>(ThreadScratch(
      4 * (align(x_floats) + align(p.n * dyg) +
           threads * (align(acc_floats) + align(block_floats)))));
  float* dyg_buf = xg + align(x_floats);
  float* acc = dyg_buf + align(p.n * dyg);
  float* blocks = acc + threads * align(acc_floats);
  std::atomic<bool> failed{false};

#pragma omp parallel num_threads(threads)
  {
    // x -> its phases, zero-padded: xg[n][phase][q0][q1][q2][c].
    const int64_t planes = p.n * p.nphases * p.q[0];
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < planes; ++t) {
      int64_t q0 = t % p.q[0], ph = (t / p.q[0]) % p.nphases, n = t / (p.q[0] * p.nphases);
      int64_t ph0 = ph / (p.phases[1] * p.phases[2]), ph1 = (ph / p.phases[2]) % p.phases[1],
              ph2 = ph % p.phases[2];
      float* dst = xg + (n * p.nphases + ph) * grid + q0 * p.q[1] * p.q[2] * cin;
      int64_t i0 = q0 * p.s[0] + ph0 - p.lo[0];
      for (int64_t q1 = 0; q1 < p.q[1]; ++q1) {
        int64_t i1 = q1 * p.s[1] + ph1 - p.lo[1];
        float* row = dst + q1 * p.q[2] * cin;
        if (i0 < 0 || i0 >= p.in[0] || i1 < 0 || i1 >= p.in[1]) {
          std::memset(row, 0, 4 * p.q[2] * cin);
          continue;
        }
        const float* src = x + (((n * p.in[0] + i0) * p.in[1] + i1) * p.in[2]) * cin;
        for (int64_t q2 = 0; q2 < p.q[2]; ++q2) {
          int64_t i2 = q2 * p.s[2] + ph2 - p.lo[2];
          if (i2 < 0 || i2 >= p.in[2])
            std::memset(row + q2 * cin, 0, 4 * cin);
          else
            std::memcpy(row + q2 * cin, src + i2 * cin, 4 * cin);
        }
      }
    }
    // dy -> its (O0, Q1, Q2) grid, zeros outside the output.
    const int64_t dy_planes = p.n * p.out[0];
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < dy_planes; ++t) {
      float* dst = dyg_buf + t * p.q[1] * p.q[2] * cout;
      const float* src = dy + t * p.out[1] * p.out[2] * cout;
      for (int64_t q1 = 0; q1 < p.q[1]; ++q1) {
        float* row = dst + q1 * p.q[2] * cout;
        if (q1 >= p.out[1]) {
          std::memset(row, 0, 4 * p.q[2] * cout);
          continue;
        }
        std::memcpy(row, src + q1 * p.out[2] * cout, 4 * p.out[2] * cout);
        std::memset(row + p.out[2] * cout, 0, 4 * (p.q[2] - p.out[2]) * cout);
      }
    }
#pragma omp single
    std::memset(xg + p.n * p.nphases * grid, 0, 4 * p.slack_rows * cin);
    // The barrier at the end of `single` orders the copies before the GEMMs.
    const int tid = omp_get_thread_num();
    float* mine = acc + tid * align(acc_floats);
    float* block = blocks + tid * align(block_floats);
    std::memset(mine, 0, 4 * acc_floats);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      int64_t n = it / per_item, r0 = (it % per_item) * chunk;
      int64_t rows = std::min(chunk, total_rows - r0);
      if (rows <= 0) continue;
      const float* dyn = dyg_buf + n * dyg;
      for (const TapGroup& g : groups) {
        int64_t width = g.count * cout;
        for (int64_t r = 0; r < rows; ++r) {
          float* out = block + r * width;
          for (int64_t t = 0; t < g.count; ++t) {
            int64_t src = r0 + r - g.shift[t];
            if (src < 0 || src >= p.dy_rows)
              std::memset(out + t * cout, 0, 4 * cout);
            else
              std::memcpy(out + t * cout, dyn + src * cout, 4 * cout);
          }
        }
        const float* a = xg + (n * p.nphases + g.ph) * grid +
                         (r0 + g.a0 * p.q[1] * p.q[2]) * cin;
        // The C API: an exception must not leave an OpenMP region.
        if (dnnl_sgemm('T', 'N', cin, width, rows, 1.f, a, cin, block, width,
                       1.f, mine + g.acc_offset, width) != dnnl_success)
          failed = true;
      }
    }
    // Sum the threads' accumulators into dw (*ks, C_in, C_out).
    const int64_t pairs = static_cast<int64_t>(groups.size()) * cin;
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < pairs; ++gi) {
      const TapGroup& g = groups[gi / cin];
      int64_t ci = gi % cin, width = g.count * cout;
      for (int64_t t = 0; t < g.count; ++t) {
        float* d = dw + (g.tap[t] * cin + ci) * cout;
        int64_t o = g.acc_offset + ci * width + t * cout;
        for (int64_t co = 0; co < cout; ++co) d[co] = acc[o + co];
        for (int th = 1; th < threads; ++th)
          for (int64_t co = 0; co < cout; ++co) d[co] += acc[th * align(acc_floats) + o + co];
      }
    }
  }
  return !failed;
}

// Whether the filter gradient of `nd`-dimensional convolutions goes through
// `WindowFilterGrad`: where oneDNN's is GEMM-based even in its preferred
// layout (3D without AVX-512), asked once per nd of a 16-channel 3-kernel layer.
bool UseWindowFilterGrad(int nd) {
  static std::once_flag once;
  static bool window[4] = {false, false, false, false};
  std::call_once(once, [] {
    for (int d = 1; d <= 3; ++d) {
      try {
        if (HasAvx512()) continue;
        memory::dims x{2, 16}, w{16, 16}, y{2, 16}, s, p;
        for (int i = 0; i < d; ++i) {
          x.push_back(16); w.push_back(3); y.push_back(16); s.push_back(1); p.push_back(1);
        }
        window[d] = IsGemm(FilterGradPd(x, w, y, s, p, p, TryBlockedFilterGrad(16)));
      } catch (const dnnl::error&) {
        window[d] = false;
      }
    }
  });
  return nd >= 1 && nd <= 3 && window[nd];
}

ffi::Error BwdWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw,
                      ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> pad_lo,
                      ffi::Span<const int64_t> pad_hi) {
  int nd = static_cast<int>(x.dimensions().size()) - 2;
  if (UseWindowFilterGrad(nd)) {
    try {
      if (!WindowFilterGrad(static_cast<const float*>(x.untyped_data()),
                            static_cast<const float*>(dy.untyped_data()),
                            static_cast<float*>(dw->untyped_data()),
                            PlanWindows(x.dimensions(), dw->dimensions(),
                                        dy.dimensions(), strides, pad_lo)))
        return ffi::Error(ffi::ErrorCode::kInternal,
                          "window filter gradient: oneDNN's sgemm failed");
    } catch (const std::bad_alloc&) {
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "window filter gradient: out of memory for its buffers");
    }
    return ffi::Error::Success();
  }
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

// Whether the filter gradient of `nd`-dimensional convolutions goes through
// `WindowFilterGrad` here (see `UseWindowFilterGrad`).
extern "C" int jaxseg_onednn_window_filter_grad(int nd) {
  return UseWindowFilterGrad(nd) ? 1 : 0;
}

// Arguments: (x, kernel) -> y; (dy, kernel) -> dx; (x, dy) -> dkernel.
JAXSEG_CONV_HANDLER(jaxseg_onednn_conv_fwd, Fwd)
JAXSEG_CONV_HANDLER(jaxseg_onednn_conv_bwd_data, BwdData)
JAXSEG_CONV_HANDLER(jaxseg_onednn_conv_bwd_weights, BwdWeights)
