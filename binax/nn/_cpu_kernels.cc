// binax's CPU kernels, as XLA FFI custom calls (binax/nn/_native.py compiles this file on the
// machine that runs it, g++ -O3 -march=native, so vectors are the CPU's: 16 floats with
// AVX-512, 8 with AVX2, 4 otherwise).
//
// BinaxConvKernelGrad: the kernel gradient of a 2-d convolution,
//
//   dw[i, j, c, o] = sum over n, h, w of  xpad[n, h*sh + i*dh, w*sw + j*dw, c] * g[n, h, w, o]
//
// where xpad is x (N, H, W, C; float32 or int8) padded by (pad_top, pad_left) before and as
// needed after with pad_value, g is the output gradient (N, Ho, Wo, O; float32) and dw is
// (KH, KW, C, O). This is what a matrix product of the input's patches computes, without
// writing the patches out: for each band of about 512 output positions (rows of one example,
// or the whole images of several examples side by side when an image has fewer) the padded
// input rows it reads are converted to float once, and every (kernel position, block of C,
// block of O) tile of dw is accumulated in registers over all positions of the band. The batch is cut into a fixed number of chunks (one per thread of XLA's pool);
// each chunk's sum is kept apart and the chunks are added in order at the end, so a result
// depends only on the shapes and the thread count, not on scheduling.
//
// BinaxBinaryConv: the same convolution's forward pass for an input of +-1 (int8) and a kernel
// of -1, 0 or +1 (int8), exactly, by bits: each input position's C signs are packed into
// 32-bit words (bit set: -1), the kernel into sign bits and nonzero bits, and
//
//   y[n, h, w, o] = nonzero[o] - 2 * sum over i, j, words of popcount((x ^ k_sign) & k_nonzero)
//
// (nonzero[o]: the kernel's nonzero entries for output o), counted in 32-bit integers over the
// outputs o in vectors, written as float32. The border is pad_value (+1 or -1).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

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
  int64_t examples;         // examples per band (more than 1 only when a band is all rows)
  int64_t band_rows() const { return (band - 1) * sh + (kh - 1) * dh + 1; }
  int64_t band_cols() const { return (wo - 1) * sw + (kw - 1) * dw + 1; }
  int64_t band_size() const { return band_rows() * band_cols() * c; }  // one example's
};

// acc[r][v] += x[p, c0 + r] * g[p, o0 + v*kLanes ...] over the band's positions p (`rows`
// output rows of `examples` examples), for one tile.
template <int R, int V>
void Tile(const Geometry& G, const float* xb, const float* gb, int64_t examples, int64_t rows,
          int64_t i, int64_t j, int64_t c0, int64_t o0, float* out) {
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = Vec{} + 0.0f;
  // Band layout (see FillBand): x (row, column, example, C), g (row, column, example, op).
  const int64_t cols = G.band_cols(), xstep = G.sw * examples * G.c;
  for (int64_t h = 0; h < rows; ++h) {
    const float* xr = xb + ((h * G.sh + i * G.dh) * cols + j * G.dw) * examples * G.c + c0;
    const float* gr = gb + h * G.wo * examples * G.op + o0;
    for (int64_t w = 0; w < G.wo; ++w, xr += xstep)
      for (int64_t k = 0; k < examples; ++k, gr += G.op) {
        const float* xk = xr + k * G.c;
        Vec gv[V];
        for (int v = 0; v < V; ++v) gv[v] = *reinterpret_cast<const Vec*>(gr + v * kLanes);
        for (int r = 0; r < R; ++r) {
          const float b = xk[r];
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
void TileRows(int rows_c, const Geometry& G, const float* xb, const float* gb, int64_t examples,
              int64_t rows, int64_t i, int64_t j, int64_t c0, int64_t o0, float* out) {
  switch (rows_c) {
#define BINAX_ROWS(R) \
  case R:             \
    return Tile<R, V>(G, xb, gb, examples, rows, i, j, c0, o0, out);
    BINAX_ROWS(1) BINAX_ROWS(2) BINAX_ROWS(3) BINAX_ROWS(4) BINAX_ROWS(5) BINAX_ROWS(6)
#if defined(__AVX512F__)
    BINAX_ROWS(7) BINAX_ROWS(8) BINAX_ROWS(9) BINAX_ROWS(10) BINAX_ROWS(11) BINAX_ROWS(12)
#endif
#undef BINAX_ROWS
  }
}

// The padded float input rows that output rows [h0, h0 + rows) of examples [n, n + e) read,
// as (band row, column, example, C): a band's examples side by side at each position.
template <typename T>
void FillBand(const Geometry& G, const T* x, int64_t n, int64_t e, int64_t h0, float* xb) {
  const int64_t cols = G.band_cols();
  for (int64_t r = 0; r < G.band_rows(); ++r) {
    const int64_t hi = h0 * G.sh + r - G.pad_top;
    for (int64_t col = 0; col < cols; ++col) {
      const int64_t wi = col - G.pad_left;
      float* dst = xb + (r * cols + col) * e * G.c;
      for (int64_t k = 0; k < e; ++k, dst += G.c) {
        if (hi < 0 || hi >= G.h || wi < 0 || wi >= G.w) {
          std::fill(dst, dst + G.c, G.pad_value);
        } else {
          const T* src = x + (((n + k) * G.h + hi) * G.w + wi) * G.c;
          for (int64_t c = 0; c < G.c; ++c) dst[c] = static_cast<float>(src[c]);
        }
      }
    }
  }
}

// Adds the kernel gradient of examples [n0, n1) to out (KH, KW, C, op).
template <typename T>
void Examples(const Geometry& G, const T* x, const float* g, int64_t n0, int64_t n1,
              float* out) {
  std::vector<float> xb(G.examples * G.band_size());
  // g's rows are read in place for one example a band when O is whole vectors, else copied
  // as (row, column, example, op), O padded by zeros.
  const bool copy = G.op != G.o || G.examples > 1;
  std::vector<float> gpad(copy ? G.examples * G.band * G.wo * G.op : 0, 0.0f);
  // C in blocks of at most kMaxRows, as even as they go (32 = 11 + 11 + 10, not 12 + 12 + 8).
  const int64_t blocks = (G.c + kMaxRows - 1) / kMaxRows, per = (G.c + blocks - 1) / blocks;
  for (int64_t n = n0; n < n1; n += G.examples) {
    const int64_t e = std::min(G.examples, n1 - n);
    for (int64_t h0 = 0; h0 < G.ho; h0 += G.band) {
      const int64_t rows = std::min(G.band, G.ho - h0);
      FillBand(G, x, n, e, h0, xb.data());
      const float* gb = g + (n * G.ho + h0) * G.wo * G.o;
      if (copy) {
        for (int64_t k = 0; k < e; ++k)
          for (int64_t p = 0; p < rows * G.wo; ++p)
            std::memcpy(gpad.data() + (p * e + k) * G.op, gb + (k * G.ho * G.wo + p) * G.o,
                        G.o * sizeof(float));
        gb = gpad.data();
      }
      for (int64_t i = 0; i < G.kh; ++i)
        for (int64_t j = 0; j < G.kw; ++j)
          for (int64_t o0 = 0; o0 < G.op; o0 += kVecs * kLanes)
            for (int64_t c0 = 0; c0 < G.c; c0 += per) {
              const int rc = static_cast<int>(std::min(per, G.c - c0));
              if (G.op - o0 >= kVecs * kLanes)
                TileRows<kVecs>(rc, G, xb.data(), gb, e, rows, i, j, c0, o0, out);
              else
                TileRows<1>(rc, G, xb.data(), gb, e, rows, i, j, c0, o0, out);
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

// Calls f(k) for k in [0, chunks) on the calling thread and chunks - 1 tasks of XLA's pool,
// returning when all are done. A task that starts after the work is taken returns at once
// (`shared` outlives them all), so the caller never waits on a task that has not started.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, const F& f) {
  auto shared = std::make_shared<Shared>();
  auto work = [chunks, &f](Shared& s) {
    for (int64_t k; (k = s.next.fetch_add(1)) < chunks;) {
      f(k);
      std::lock_guard<std::mutex> lock(s.mu);
      if (++s.done == chunks) s.cv.notify_all();
    }
  };
  for (int64_t t = 1; t < chunks; ++t) pool.Schedule([shared, work]() { work(*shared); });
  work(*shared);
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done == chunks; });
}

int64_t Chunks(ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min(n, pool.num_threads()));
}

template <typename T>
void Run(ffi::ThreadPool& pool, const Geometry& G, const T* x, const float* g, float* dw) {
  const int64_t chunks = Chunks(pool, G.n), size = G.kh * G.kw * G.c * G.op;
  std::vector<float> partial(chunks * size, 0.0f);
  ParallelFor(pool, chunks, [&](int64_t k) {
    Examples(G, x, g, G.n * k / chunks, G.n * (k + 1) / chunks, partial.data() + k * size);
  });
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
             wd[0], wd[1], sh, sw, dh, dwl, pad_top, pad_left, pad_value, 1, 1};
  // About 512 output positions a band, of one example's rows or of several examples' images
  // when one image has fewer: each tile is then summed in registers over that many products.
  const int64_t image = std::max<int64_t>(1, G.ho * G.wo);
  G.band = std::clamp<int64_t>(512 / std::max<int64_t>(1, G.wo), 1, std::max<int64_t>(1, G.ho));
  if (G.band >= G.ho) G.examples = std::clamp<int64_t>(512 / image, 1, std::max<int64_t>(1, G.n));
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

// --- BinaxBinaryConv ------------------------------------------------------------------------

struct BinaryGeometry {
  int64_t n, h, w, c, words;  // input; words: 32-bit words of C signs
  int64_t ho, wo, o, ob;      // output; ob: O rounded up to whole blocks
  int64_t kh, kw, sh, sw, dh, dw, pad_top, pad_left;
  bool negative_border;       // pad_value -1: the border's sign bits are set
  int64_t hp() const { return (ho - 1) * sh + (kh - 1) * dh + 1; }
  int64_t wp() const { return (wo - 1) * sw + (kw - 1) * dw + 1; }
};

// The sign bits of C int8 values (-1 -> 1, +1 -> 0), 32 to a word.
void PackSigns(const int8_t* x, int64_t c, uint32_t* out, int64_t words) {
  for (int64_t q = 0; q < words; ++q) {
#if defined(__AVX2__)
    if (32 * (q + 1) <= c) {  // the bytes' top bits
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * q));
      out[q] = uint32_t(_mm256_movemask_epi8(v));
      continue;
    }
#endif
    uint32_t bits = 0;
    const int64_t end = std::min<int64_t>(32, c - 32 * q);
    for (int64_t b = 0; b < end; ++b) bits |= uint32_t(x[32 * q + b] < 0) << b;
    out[q] = bits;
  }
}

// The padded sign image of example n: (hp, wp, words).
void PackExample(const BinaryGeometry& G, const int8_t* x, int64_t n, uint32_t* xb) {
  for (int64_t r = 0; r < G.hp(); ++r) {
    const int64_t hi = r - G.pad_top;
    for (int64_t col = 0; col < G.wp(); ++col) {
      const int64_t wi = col - G.pad_left;
      uint32_t* dst = xb + (r * G.wp() + col) * G.words;
      if (hi < 0 || hi >= G.h || wi < 0 || wi >= G.w) {
        for (int64_t q = 0; q < G.words; ++q) {
          const int64_t bits = std::min<int64_t>(32, G.c - 32 * q);
          dst[q] = G.negative_border ? uint32_t((uint64_t(1) << bits) - 1) : 0u;
        }
      } else {
        PackSigns(x + ((n * G.h + hi) * G.w + wi) * G.c, G.c, dst, G.words);
      }
    }
  }
}

// y[n] for one example, kb/km: (KH, KW, words, ob) sign and nonzero bits of the kernel; the
// outputs are counted kBlock at a time (64: 4 vectors with AVX-512).
template <int64_t kBlock, bool kDense>
void BinaryExample(const BinaryGeometry& G, const uint32_t* xb, const uint32_t* kb,
                   const uint32_t* km, const int32_t* nonzero, float* y) {
  for (int64_t h = 0; h < G.ho; ++h)
    for (int64_t w = 0; w < G.wo; ++w) {
      float* out = y + (h * G.wo + w) * G.o;
      for (int64_t o0 = 0; o0 < G.ob; o0 += kBlock) {
        uint32_t acc[kBlock] = {};
        for (int64_t i = 0; i < G.kh; ++i)
          for (int64_t j = 0; j < G.kw; ++j) {
            const uint32_t* xw = xb + ((h * G.sh + i * G.dh) * G.wp() + w * G.sw + j * G.dw) * G.words;
            const int64_t t = (i * G.kw + j) * G.words;
            for (int64_t q = 0; q < G.words; ++q) {
              const uint32_t bits = xw[q];
              const uint32_t* ks = kb + (t + q) * G.ob + o0;
              const uint32_t* kn = km + (t + q) * G.ob + o0;
              for (int64_t o = 0; o < kBlock; ++o)
                acc[o] += __builtin_popcount(kDense ? bits ^ ks[o] : (bits ^ ks[o]) & kn[o]);
            }
          }
        const int64_t end = std::min(kBlock, G.o - o0);
        for (int64_t o = 0; o < end; ++o)
          out[o0 + o] = float(nonzero[o0 + o] - 2 * int32_t(acc[o]));
      }
    }
}

ffi::Error BinaryConv(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> k,
                      ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t dh,
                      int64_t dwl, int64_t pad_top, int64_t pad_left, float pad_value) {
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || xd[0] != yd[0] || xd[3] != kd[2] ||
      kd[3] != yd[3])
    return ffi::Error::InvalidArgument("binax_binary_conv: inconsistent shapes");
  const int64_t block = yd[3] > 32 ? 64 : yd[3] > 16 ? 32 : 16;
  BinaryGeometry G{xd[0], xd[1], xd[2], xd[3], (xd[3] + 31) / 32,
                   yd[1], yd[2], yd[3], (yd[3] + block - 1) / block * block,
                   kd[0], kd[1], sh, sw, dh, dwl, pad_top, pad_left, pad_value < 0};
  if (G.n == 0 || G.ho == 0 || G.wo == 0 || G.o == 0) return ffi::Error::Success();
  // The kernel's sign and nonzero bits, (KH, KW, words, ob), and each output's nonzero count.
  const int64_t taps = G.kh * G.kw;
  std::vector<uint32_t> kb(taps * G.words * G.ob, 0), km(taps * G.words * G.ob, 0);
  std::vector<int32_t> nonzero(G.ob, 0);
  bool dense = true;
  const int8_t* kp = k.typed_data();
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t c = 0; c < G.c; ++c)
      for (int64_t o = 0; o < G.o; ++o) {
        const int8_t v = kp[(t * G.c + c) * G.o + o];
        const int64_t at = (t * G.words + c / 32) * G.ob + o;
        kb[at] |= uint32_t(v < 0) << (c % 32);
        km[at] |= uint32_t(v != 0) << (c % 32);
        nonzero[o] += v != 0;
        dense = dense && v != 0;
      }
  const int8_t* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t chunks = Chunks(pool, G.n), image = G.hp() * G.wp() * G.words;
  ParallelFor(pool, chunks, [&](int64_t c) {
    std::vector<uint32_t> xb(image);
    for (int64_t n = G.n * c / chunks; n < G.n * (c + 1) / chunks; ++n) {
      PackExample(G, xp, n, xb.data());
      float* out = yp + n * G.ho * G.wo * G.o;
      const uint32_t *b = xb.data(), *s = kb.data(), *m = km.data();
      const int32_t* z = nonzero.data();
      if (block == 64)
        dense ? BinaryExample<64, true>(G, b, s, m, z, out)
              : BinaryExample<64, false>(G, b, s, m, z, out);
      else if (block == 32)
        dense ? BinaryExample<32, true>(G, b, s, m, z, out)
              : BinaryExample<32, false>(G, b, s, m, z, out);
      else
        dense ? BinaryExample<16, true>(G, b, s, m, z, out)
              : BinaryExample<16, false>(G, b, s, m, z, out);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// Both custom calls take the convolution's geometry as the same attributes.
template <typename Binding>
auto WithGeometry(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("dilation_h")
      .template Attr<int64_t>("dilation_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_left")
      .template Attr<float>("pad_value");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BinaxConvKernelGrad, KernelGrad,
                              WithGeometry(ffi::Ffi::Bind()
                                               .Ctx<ffi::ThreadPool>()
                                               .Arg<ffi::AnyBuffer>()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BinaxBinaryConv, BinaryConv,
                              WithGeometry(ffi::Ffi::Bind()
                                               .Ctx<ffi::ThreadPool>()
                                               .Arg<ffi::Buffer<ffi::S8>>()
                                               .Arg<ffi::Buffer<ffi::S8>>()
                                               .Ret<ffi::Buffer<ffi::F32>>()));
