// The decode-time product of a few rows by a weight stored output channel by output channel (ops.PackedKernel):
// y[m, n] = x[m, k] · w[n, k] over k, with x and y float32 and w bfloat16, int8 or float32. Built and registered
// with XLA by gpt_jax/cpu_kernel.py; ops.matmul sends it the products of 2 to 8 rows on CPUs with AVX-512.
//
// Why a kernel of our own: a decode step reads every weight once for a handful of rows. XLA:CPU multiplies a few
// rows as a GEMM at its small-batch rate, after converting a bf16 or int8 weight to float32 (a copy per step).
// Here each weight row is read once in its stored type, widened to float32 in registers and multiplied with all
// m rows; a software prefetch keeps the stream ahead of the arithmetic, and the output channels are split over
// XLA's intra-op threads. (Tried and slower on this project's AMD EPYC: bf16 pairs multiplied by vdpbf16ps with x
// rounded to bf16; four channels interleaved per step; a prefetch 1, 4 or 32 KiB ahead instead of 8, or into L1:
// 8 rows of SmolLM2 float32 in 33.0 ms, against 22.7 into L2.)
#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#error "cpu_kernel.cc needs AVX-512 (F and BW); gpt_jax/cpu_kernel.py builds it only where the CPU has them"
#endif
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;          // rows handled together; more rows are done in groups of this many
constexpr int kPrefetchBytes = 8192;     // how far ahead of the reads the prefetch (into L2) runs
constexpr int64_t kMinChunk = 32;        // output channels per task, at least

// 16 weights widened to float32; `mask` keeps the first lanes (a row's tail), the others read as zero.
inline __m512 Widen(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 Widen(const uint16_t* p, __mmask16 mask) {  // bfloat16 is the high half of a float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
inline __m512 Widen(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

// Channels [c, c + NB) of M rows. The NB weight rows are adjacent in memory, so the reads are one stream; P partial
// sums per (row, channel) keep enough independent multiply-adds in flight when M·NB is small.
template <int M, int NB, typename W>
inline void Channels(const float* x, const W* w, float* y, int64_t k, int64_t n, int64_t c) {
  constexpr int P = M * NB == 1 ? 4 : M * NB <= 3 ? 2 : 1;
  const W* wc = w + c * k;
  __m512 acc[P][M][NB];
#pragma GCC unroll 64
  for (int a = 0; a < P * M * NB; ++a) (&acc[0][0][0])[a] = _mm512_setzero_ps();
  auto step = [&](int p, int64_t i, __mmask16 mask) __attribute__((always_inline)) {
    __m512 wv[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(wc + j * k + i) + kPrefetchBytes, _MM_HINT_T1);
      wv[j] = Widen(wc + j * k + i, mask);
    }
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * k + i);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[p][r][j] = _mm512_fmadd_ps(wv[j], xv, acc[p][r][j]);
    }
  };
  int64_t i = 0;
  for (; i + 16 * P <= k; i += 16 * P) {
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) step(p, i + 16 * p, 0xFFFF);
  }
  for (; i < k; i += 16) step(0, i, k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1));
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      __m512 s = acc[0][r][j];
#pragma GCC unroll 4
      for (int p = 1; p < P; ++p) s = _mm512_add_ps(s, acc[p][r][j]);
      y[r * n + c + j] = _mm512_reduce_add_ps(s);
    }
  }
}

template <int M, typename W>
void ChannelRange(const float* x, const W* w, float* y, int64_t k, int64_t n, int64_t lo, int64_t hi) {
  constexpr int NB = M <= 2 ? 1 : 2;  // two channels share each x load once there are rows enough to need it
  int64_t c = lo;
  for (; c + NB <= hi; c += NB) Channels<M, NB>(x, w, y, k, n, c);
  for (; c < hi; ++c) Channels<M, 1>(x, w, y, k, n, c);
}

template <typename W>
void Product(const float* x, const W* w, float* y, int64_t m, int64_t k, int64_t n, int64_t lo, int64_t hi) {
  for (int64_t r = 0; r < m; r += kMaxRows) {
    const float* xr = x + r * k;
    float* yr = y + r * n;
    switch (std::min(m - r, kMaxRows)) {
      case 1: ChannelRange<1>(xr, w, yr, k, n, lo, hi); break;
      case 2: ChannelRange<2>(xr, w, yr, k, n, lo, hi); break;
      case 3: ChannelRange<3>(xr, w, yr, k, n, lo, hi); break;
      case 4: ChannelRange<4>(xr, w, yr, k, n, lo, hi); break;
      case 5: ChannelRange<5>(xr, w, yr, k, n, lo, hi); break;
      case 6: ChannelRange<6>(xr, w, yr, k, n, lo, hi); break;
      case 7: ChannelRange<7>(xr, w, yr, k, n, lo, hi); break;
      default: ChannelRange<8>(xr, w, yr, k, n, lo, hi); break;
    }
  }
}

// The output channels go in chunks, each claimed from a counter by the calling thread or by a helper task on
// XLA's intra-op pool. The caller waits only for chunks being computed, never for a task still queued (that could
// deadlock when two products run at once), and a task that starts late finds nothing left and returns.
struct Chunks {
  std::atomic<int64_t> next{0}, done{0};
  int64_t count = 0, size = 0;
};

template <typename W>
ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("cpu_kernel: x must be [m, k] and w [n, k]");
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  const float* xp = x.typed_data();
  const W* wp = reinterpret_cast<const W*>(w.untyped_data());
  float* yp = y->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto chunks = std::make_shared<Chunks>();
  chunks->size = std::max(kMinChunk, (n + 2 * threads - 1) / (2 * threads));
  chunks->count = (n + chunks->size - 1) / chunks->size;
  auto work = [=] {
    for (int64_t c; (c = chunks->next.fetch_add(1)) < chunks->count;) {
      Product(xp, wp, yp, m, k, n, c * chunks->size, std::min(n, (c + 1) * chunks->size));
      chunks->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks->count); ++t) pool.Schedule([work] { work(); });
  work();
  while (chunks->done.load(std::memory_order_acquire) < chunks->count) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxProductBF16, Run<uint16_t>,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxProductS8, Run<int8_t>,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxProductF32, Run<float>,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>());
