// The kernel gradient of a 2-d convolution on the CPU, as an XLA FFI custom call.
//
//   dw[i, j, c, o] = sum over n, h, w of  xpad[n, h*sh + i*dh, w*sw + j*dw, c] * g[n, h, w, o]
//
// where xpad is x (N, H, W, C; float32 or int8) padded by (pad_top, pad_left) before and as
// needed after with pad_value, g is the output gradient (N, Ho, Wo, O; float32) and dw is
// (KH, KW, C, O). This is what a matrix product of the input's patches computes, without
// writing the patches out: for each band of output rows of one example the padded input rows
// it reads are converted to float once (a few tens of KiB, in cache), and every (kernel
// position, block of C, block of O) tile of dw is accumulated in registers over all positions
// of the band. The batch is cut into a fixed number of chunks (one per thread of XLA's pool);
// each chunk's sum is kept apart and the chunks are added in order at the end, so a result
// depends only on the shapes and the thread count, not on scheduling.
//
// Compiled on the machine that runs it (binax/nn/_native.py: g++ -O3 -march=native), so the
// vector width is the CPU's (16 floats with AVX-512, 8 with AVX2, 4 otherwise).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kMaxRows = 12;  // 12 x 2 accumulators + 2 loads of g + 1 broadcast <= 32 registers
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kMaxRows = 6;  // <= 16 registers
#else
constexpr int kLanes = 4;
constexpr int kMaxRows = 6;
#endif
constexpr int kVecs = 2;  // vectors of O per tile

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

struct Geometry {
  int64_t n, h, w, c;       // input
  int64_t ho, wo, o, op;    // output gradient; op: O rounded up to whole vectors
  int64_t kh, kw, sh, sw, dh, dw, pad_top, pad_left;
  float pad_value;
  int64_t band;             // output rows per band
  int64_t band_rows() const { return (band - 1) * sh + (kh - 1) * dh + 1; }
  int64_t band_cols() const { return (wo - 1) * sw + (kw - 1) * dw + 1; }
};

// acc[r][v] += x[p, c0 + r] * g[p, o0 + v*kLanes ...] over the band's positions p, for one tile.
template <int R, int V>
void Tile(const Geometry& G, const float* xb, const float* gb, int64_t rows, int64_t i,
          int64_t j, int64_t c0, int64_t o0, float* out) {
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = Vec{} + 0.0f;
  const int64_t cols = G.band_cols(), xstep = G.sw * G.c;
  for (int64_t h = 0; h < rows; ++h) {
    const float* xr = xb + ((h * G.sh + i * G.dh) * cols + j * G.dw) * G.c + c0;
    const float* gr = gb + h * G.wo * G.op + o0;
    for (int64_t w = 0; w < G.wo; ++w, xr += xstep, gr += G.op) {
      Vec gv[V];
      for (int v = 0; v < V; ++v) gv[v] = *reinterpret_cast<const Vec*>(gr + v * kLanes);
      for (int r = 0; r < R; ++r) {
        const float b = xr[r];
        for (int v = 0; v < V; ++v) acc[r][v] += b * gv[v];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* dst = out + ((i * G.kw + j) * G.c + c0 + r) * G.op + o0;
    for (int v = 0; v < V; ++v) *reinterpret_cast<Vec*>(dst + v * kLanes) += acc[r][v];
  }
}

template <int V>
void TileRows(int rows_c, const Geometry& G, const float* xb, const float* gb, int64_t rows,
              int64_t i, int64_t j, int64_t c0, int64_t o0, float* out) {
  switch (rows_c) {
#define BINAX_ROWS(R) \
  case R:             \
    return Tile<R, V>(G, xb, gb, rows, i, j, c0, o0, out);
    BINAX_ROWS(1) BINAX_ROWS(2) BINAX_ROWS(3) BINAX_ROWS(4) BINAX_ROWS(5) BINAX_ROWS(6)
#if defined(__AVX512F__)
    BINAX_ROWS(7) BINAX_ROWS(8) BINAX_ROWS(9) BINAX_ROWS(10) BINAX_ROWS(11) BINAX_ROWS(12)
#endif
#undef BINAX_ROWS
  }
}

// The padded float input rows that output rows [h0, h0 + rows) of example n read.
template <typename T>
void FillBand(const Geometry& G, const T* x, int64_t n, int64_t h0, float* xb) {
  const int64_t cols = G.band_cols();
  for (int64_t r = 0; r < G.band_rows(); ++r) {
    const int64_t hi = h0 * G.sh + r - G.pad_top;
    float* dst = xb + r * cols * G.c;
    if (hi < 0 || hi >= G.h) {
      std::fill(dst, dst + cols * G.c, G.pad_value);
      continue;
    }
    const T* src = x + (n * G.h + hi) * G.w * G.c;
    for (int64_t col = 0; col < cols; ++col, dst += G.c) {
      const int64_t wi = col - G.pad_left;
      if (wi < 0 || wi >= G.w) {
        std::fill(dst, dst + G.c, G.pad_value);
      } else {
        const T* s = src + wi * G.c;
        for (int64_t c = 0; c < G.c; ++c) dst[c] = static_cast<float>(s[c]);
      }
    }
  }
}

// Adds the kernel gradient of examples [n0, n1) to out (KH, KW, C, op).
template <typename T>
void Examples(const Geometry& G, const T* x, const float* g, int64_t n0, int64_t n1,
              float* out) {
  std::vector<float> xb(G.band_rows() * G.band_cols() * G.c);
  // g's rows are read in place when O is whole vectors, else copied with O padded by zeros.
  std::vector<float> gpad(G.op == G.o ? 0 : G.band * G.wo * G.op, 0.0f);
  // C in blocks of at most kMaxRows, as even as they go (32 = 11 + 11 + 10, not 12 + 12 + 8).
  const int64_t blocks = (G.c + kMaxRows - 1) / kMaxRows, per = (G.c + blocks - 1) / blocks;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h0 = 0; h0 < G.ho; h0 += G.band) {
      const int64_t rows = std::min(G.band, G.ho - h0);
      FillBand(G, x, n, h0, xb.data());
      const float* gb = g + (n * G.ho + h0) * G.wo * G.o;
      if (!gpad.empty()) {
        for (int64_t p = 0; p < rows * G.wo; ++p)
          std::memcpy(gpad.data() + p * G.op, gb + p * G.o, G.o * sizeof(float));
        gb = gpad.data();
      }
      for (int64_t i = 0; i < G.kh; ++i)
        for (int64_t j = 0; j < G.kw; ++j)
          for (int64_t o0 = 0; o0 < G.op; o0 += kVecs * kLanes)
            for (int64_t c0 = 0; c0 < G.c; c0 += per) {
              const int rc = static_cast<int>(std::min(per, G.c - c0));
              if (G.op - o0 >= kVecs * kLanes)
                TileRows<kVecs>(rc, G, xb.data(), gb, rows, i, j, c0, o0, out);
              else
                TileRows<1>(rc, G, xb.data(), gb, rows, i, j, c0, o0, out);
            }
    }
  }
}

struct Shared {
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mu;
  std::condition_variable cv;
};

template <typename T>
void Run(ffi::ThreadPool& pool, const Geometry& G, const T* x, const float* g, float* dw) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min(G.n, threads));
  const int64_t size = G.kh * G.kw * G.c * G.op;
  std::vector<float> partial(chunks * size, 0.0f);
  auto shared = std::make_shared<Shared>();
  auto work = [&G, x, g, chunks, size, p = partial.data()](Shared& s) {
    for (int64_t k; (k = s.next.fetch_add(1)) < chunks;) {
      Examples(G, x, g, G.n * k / chunks, G.n * (k + 1) / chunks, p + k * size);
      std::lock_guard<std::mutex> lock(s.mu);
      if (++s.done == chunks) s.cv.notify_all();
    }
  };
  // Helpers that start after the work is taken return at once; `shared` outlives them all.
  for (int64_t t = 1; t < chunks; ++t)
    pool.Schedule([shared, work]() { work(*shared); });
  work(*shared);
  {
    std::unique_lock<std::mutex> lock(shared->mu);
    shared->cv.wait(lock, [&] { return shared->done == chunks; });
  }
  const int64_t cells = G.kh * G.kw * G.c;
  for (int64_t e = 0; e < cells; ++e)
    for (int64_t o = 0; o < G.o; ++o) {
      float sum = partial[e * G.op + o];
      for (int64_t k = 1; k < chunks; ++k) sum += partial[k * size + e * G.op + o];
      dw[e * G.o + o] = sum;
    }
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t dh,
                      int64_t dwl, int64_t pad_top, int64_t pad_left, float pad_value) {
  const auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || xd[0] != gd[0] || xd[3] != wd[2] ||
      gd[3] != wd[3])
    return ffi::Error::InvalidArgument("binax_conv_kernel_grad: inconsistent shapes");
  Geometry G{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3],
             (gd[3] + kLanes - 1) / kLanes * kLanes,
             wd[0], wd[1], sh, sw, dh, dwl, pad_top, pad_left, pad_value, 1};
  // About 512 output positions a band (its input rows in float are then a few tens of KiB).
  G.band = std::clamp<int64_t>(512 / std::max<int64_t>(1, G.wo), 1, std::max<int64_t>(1, G.ho));
  if (G.n == 0 || G.ho == 0 || G.wo == 0) {
    std::fill(dw->typed_data(), dw->typed_data() + G.kh * G.kw * G.c * G.o, 0.0f);
    return ffi::Error::Success();
  }
  switch (x.element_type()) {
    case ffi::DataType::F32:
      Run(pool, G, x.typed_data<float>(), g.typed_data(), dw->typed_data());
      break;
    case ffi::DataType::S8:
      Run(pool, G, x.typed_data<int8_t>(), g.typed_data(), dw->typed_data());
      break;
    default:
      return ffi::Error::InvalidArgument("binax_conv_kernel_grad: x must be float32 or int8");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BinaxConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("dilation_h")
                                  .Attr<int64_t>("dilation_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<float>("pad_value"));
