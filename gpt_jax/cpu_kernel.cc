// The decode step on a CPU with AVX-512, built and registered with XLA by gpt_jax/cpu_kernel.py: the product of a few
// rows by weights stored output channel by output channel (ops.PackedKernel), y[m, n] = x[m, k] · w[n, k] over k
// with x and y float32 and w bfloat16, int8 or float32 (ops.packed_products sends it 1 to 8 rows, one row not for
// float32, and the weights of one input together), the attention of one new position per row over the KV cache
// (ops.attention_of_new_positions), rows of a packed embedding table (ops.take_rows) and the greedy token
// (ops.argmax).
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
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPrefetchBytes = 8192;     // how far ahead of the reads the prefetch (into L2) runs
constexpr int64_t kMinChunk = 32;        // output channels per task, at least

// The first min(left, 16) of 16 lanes.
inline __mmask16 Tail(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// The largest of row[0..n), or -inf.
inline float MaxOf(const float* row, int64_t n) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16)
    top = _mm512_mask_max_ps(top, Tail(n - i), top, _mm512_maskz_loadu_ps(Tail(n - i), row + i));
  return _mm512_reduce_max_ps(top);
}

// The float32 scale [n] that follows an int8 weight or table [n, k] among a call's arguments, at `index`.
inline ffi::ErrorOr<const float*> ScaleAt(const ffi::RemainingArgs& args, size_t index, int64_t n) {
  auto s = args.get<ffi::Buffer<ffi::F32>>(index);
  if (!s.has_value() || int64_t(s->element_count()) != n)
    return ffi::Unexpected(ffi::Error::InvalidArgument("cpu_kernel: int8 values [n, k] need a float32 scale [n]"));
  return s->typed_data();
}

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
inline void Channels(const float* x, const W* w, const float* scale, float* y, int64_t k, int64_t n, int64_t c) {
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
  for (; i < k; i += 16) step(0, i, Tail(k - i));
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      __m512 s = acc[0][r][j];
#pragma GCC unroll 4
      for (int p = 1; p < P; ++p) s = _mm512_add_ps(s, acc[p][r][j]);
      y[r * n + c + j] = scale ? _mm512_reduce_add_ps(s) * scale[c + j] : _mm512_reduce_add_ps(s);
    }
  }
}

template <int M, typename W>
void ChannelRange(const float* x, const W* w, const float* scale, float* y, int64_t k, int64_t n, int64_t lo,
                  int64_t hi) {
  constexpr int NB = M <= 2 ? 1 : 2;  // two channels share each x load once there are rows enough to need it
  int64_t c = lo;
  for (; c + NB <= hi; c += NB) Channels<M, NB>(x, w, scale, y, k, n, c);
  for (; c < hi; ++c) Channels<M, 1>(x, w, scale, y, k, n, c);
}

// fn(std::integral_constant<int, G>(), start) for groups [start, start + G) of up to 8 covering [0, count): a
// template per group size (rows of a product, query heads of attention) keeps the accumulators in registers.
template <typename F>
void InGroupsOf8(int64_t count, F&& fn) {
  for (int64_t start = 0; start < count; start += 8) {
    switch (std::min<int64_t>(count - start, 8)) {
      case 1: fn(std::integral_constant<int, 1>(), start); break;
      case 2: fn(std::integral_constant<int, 2>(), start); break;
      case 3: fn(std::integral_constant<int, 3>(), start); break;
      case 4: fn(std::integral_constant<int, 4>(), start); break;
      case 5: fn(std::integral_constant<int, 5>(), start); break;
      case 6: fn(std::integral_constant<int, 6>(), start); break;
      case 7: fn(std::integral_constant<int, 7>(), start); break;
      default: fn(std::integral_constant<int, 8>(), start); break;
    }
  }
}

template <typename W>
void Product(const float* x, const W* w, const float* scale, float* y, int64_t m, int64_t k, int64_t n, int64_t lo,
             int64_t hi) {
  InGroupsOf8(m, [&](auto rows, int64_t r) {
    ChannelRange<decltype(rows)::value>(x + r * k, w, scale, y + r * n, k, n, lo, hi);
  });
}

// Runs fn(0), ..., fn(count - 1), each index claimed from a counter by the calling thread or by a helper task on
// XLA's intra-op pool. The caller waits only for indices being computed, never for a task still queued (that could
// deadlock when two kernels run at once), and a task that starts late finds nothing left and returns.
template <typename F>
void Parallel(ffi::ThreadPool& pool, int64_t count, F fn) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, count, fn] {
    for (int64_t c; (c = counters->next.fetch_add(1)) < count;) {
      fn(c);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, count); ++t) pool.Schedule([work] { work(); });
  work();
  while (counters->done.load(std::memory_order_acquire) < count) _mm_pause();
}

// y_i[m, n_i] = x[m, k] · w_i[n_i, k] over k for each weight w_i of one call (products that share their input: a
// layer's query, key and value, or its gate and up), times the scale of each output channel for int8 weights (the
// arguments are then pairs w_i, scale_i [n_i]). The call's output channels are one range, split into chunks.
template <typename W>
ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets ys) {
  constexpr size_t kArgs = std::is_same_v<W, int8_t> ? 2 : 1;  // per weight
  const auto xd = x.dimensions();
  if (xd.size() != 2 || ys.empty() || args.size() != kArgs * ys.size())
    return ffi::Error::InvalidArgument("cpu_kernel: x must be [m, k], with one output per weight");
  const int64_t m = xd[0], k = xd[1];
  struct Part {
    const W* w;
    const float* scale;
    float* y;
    int64_t first, n;  // its channels in the call's range
  };
  std::vector<Part> parts;
  int64_t total = 0;
  for (size_t i = 0; i < ys.size(); ++i) {
    auto w = args.get<ffi::AnyBuffer>(kArgs * i);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !y.has_value()) return ffi::Error::InvalidArgument("cpu_kernel: a weight or output");
    const auto wd = w->dimensions();
    if (wd.size() != 2 || wd[1] != k || (*y)->element_count() != size_t(m * wd[0]))
      return ffi::Error::InvalidArgument("cpu_kernel: each w must be [n, k] and its y [m, n]");
    const float* scale = nullptr;
    if (kArgs == 2) {
      auto s = ScaleAt(args, 2 * i + 1, wd[0]);
      if (!s.has_value()) return s.error();
      scale = *s;
    }
    parts.push_back({reinterpret_cast<const W*>(w->untyped_data()), scale, (*y)->typed_data(), total, wd[0]});
    total += wd[0];
  }
  const float* xp = x.typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t size = std::max(kMinChunk, (total + 2 * threads - 1) / (2 * threads));  // channels per chunk
  Parallel(pool, (total + size - 1) / size, [=](int64_t c) {
    const int64_t lo = c * size, hi = std::min(total, lo + size);
    for (const Part& p : parts) {
      const int64_t from = std::max(lo, p.first) - p.first, to = std::min(hi, p.first + p.n) - p.first;
      if (from < to) Product(xp, p.w, p.scale, p.y, m, k, p.n, from, to);
    }
  });
  return ffi::Error::Success();
}

// -- Attention of one new position per row over the KV cache (model.init_cache's layout) ---------------------------

// e^x for x <= 0 (a softmax's scores less their maximum): 2^(x log2 e) as 2^n (the exponent) times 2^f for the
// fraction |f| <= 1/2 by its Taylor polynomial of degree 6 (relative error below 2e-7); e^x below e^-87 is 0.
inline __m512 Exp(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  for (float c : {1.3333558146428443e-3f, 9.618129107628477e-3f, 5.550410866482158e-2f, 0.2402265069591007f,
                  0.6931471805599453f, 1.0f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// out[g, j] = factor[g] · Σ_t coef[g, t] · rows[t, j] for G heads, t < count, j < width (rows row_stride apart,
// coef coef_stride apart per head, out out_stride apart). Scores: coef q, rows the keys [head_dim, slots], width the
// slots in use. Values: coef the softmax's numerators, rows the values [slots, head_dim], factor 1 / their sum.
template <int G, typename C>
void WeightedRows(const float* coef, int64_t coef_stride, const C* rows, int64_t row_stride, int64_t count,
                  int64_t width, const float* factor, float* out, int64_t out_stride) {
  for (int64_t j = 0; j < width; j += 16) {
    const __mmask16 mask = Tail(width - j);
    __m512 acc[G];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t t = 0; t < count; ++t) {
      const __m512 row = Widen(rows + t * row_stride + j, mask);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(coef[g * coef_stride + t]), row, acc[g]);
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
      _mm512_mask_storeu_ps(out + g * out_stride + j, mask, _mm512_mul_ps(acc[g], _mm512_set1_ps(factor[g])));
  }
}

// q [batch, heads, head_dim]; keys [rows, kv_heads, head_dim, slots] and values [rows, kv_heads, slots, head_dim]
// (rows >= batch; bfloat16 as its bits, or float32); lengths [batch]: row b attends to its slots < lengths[b].
// y [batch, heads, head_dim]: softmax attention, each kv head serving heads / kv_heads query heads.
template <typename C>
ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                  ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> y) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || kd[0] < qd[0] || kd[2] != qd[2] || qd[1] % kd[1] ||
      vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[3] || vd[3] != kd[2] ||
      int64_t(lengths.element_count()) != qd[0])
    return ffi::Error::InvalidArgument("cpu_kernel: attention shapes do not match");
  const int64_t batch = qd[0], heads = qd[1], head_dim = qd[2], kv_heads = kd[1], slots = kd[3];
  const int64_t group = heads / kv_heads, stride = (slots + 15) / 16 * 16;
  const float scale = 1.0f / std::sqrt(float(head_dim));
  const float* qp = q.typed_data();
  const C* kp = reinterpret_cast<const C*>(k.untyped_data());
  const C* vp = reinterpret_cast<const C*>(v.untyped_data());
  const int32_t* lp = lengths.typed_data();
  float* yp = y->typed_data();
  Parallel(pool, batch * kv_heads, [=](int64_t task) {
    const int64_t b = task / kv_heads, h = task % kv_heads;
    const int64_t length = std::clamp<int64_t>(lp[b], 1, slots);
    const float* qh = qp + (b * heads + h * group) * head_dim;
    const C* keys = kp + (b * kv_heads + h) * head_dim * slots;
    const C* values = vp + (b * kv_heads + h) * slots * head_dim;
    float* yh = yp + (b * heads + h * group) * head_dim;
    std::vector<float> scores(group * stride), scales(group, scale), inverse(group);
    InGroupsOf8(group, [&](auto heads_now, int64_t g) {
      WeightedRows<decltype(heads_now)::value>(qh + g * head_dim, head_dim, keys, slots, head_dim, length,
                                               scales.data() + g, scores.data() + g * stride, stride);
    });
    for (int64_t g = 0; g < group; ++g) {  // the softmax's numerators, in place, and their sum
      float* row = scores.data() + g * stride;
      const __m512 most = _mm512_set1_ps(MaxOf(row, length));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t s = 0; s < length; s += 16) {
        const __mmask16 mask = Tail(length - s);
        const __m512 e = _mm512_maskz_mov_ps(mask, Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + s), most)));
        _mm512_mask_storeu_ps(row + s, mask, e);
        sum = _mm512_add_ps(sum, e);
      }
      inverse[g] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    InGroupsOf8(group, [&](auto heads_now, int64_t g) {
      WeightedRows<decltype(heads_now)::value>(scores.data() + g * stride, stride, values, head_dim, length,
                                               head_dim, inverse.data() + g, yh + g * head_dim, head_dim);
    });
  });
  return ffi::Error::Success();
}

// -- Rows of an embedding table ------------------------------------------------------------------------------------

// y[r, :] = w[ids[r], :] widened to float32 (times scale[ids[r]] for int8: the arguments are then w, scale), ids
// clamped to the table. XLA:CPU gathers from a bf16 table inside a loop of decode steps by converting all of it.
template <typename W>
ffi::Error Rows(ffi::Buffer<ffi::S32> ids, ffi::RemainingArgs args, ffi::ResultBuffer<ffi::F32> y) {
  constexpr size_t kArgs = std::is_same_v<W, int8_t> ? 2 : 1;
  auto w = args.get<ffi::AnyBuffer>(0);
  if (args.size() != kArgs || !w.has_value() || w->dimensions().size() != 2)
    return ffi::Error::InvalidArgument("cpu_kernel: rows of a table [n, k] (and for int8 its scale [n])");
  const int64_t n = w->dimensions()[0], k = w->dimensions()[1], count = ids.element_count();
  if (int64_t(y->element_count()) != count * k) return ffi::Error::InvalidArgument("cpu_kernel: rows' shape");
  const float* scale = nullptr;
  if (kArgs == 2) {
    auto s = ScaleAt(args, 1, n);
    if (!s.has_value()) return s.error();
    scale = *s;
  }
  const W* wp = reinterpret_cast<const W*>(w->untyped_data());
  for (int64_t r = 0; r < count; ++r) {
    const int64_t row = std::clamp<int64_t>(ids.typed_data()[r], 0, n - 1);
    const __m512 factor = _mm512_set1_ps(scale ? scale[row] : 1.0f);
    float* out = y->typed_data() + r * k;
    for (int64_t i = 0; i < k; i += 16)
      _mm512_mask_storeu_ps(out + i, Tail(k - i), _mm512_mul_ps(Widen(wp + row * k + i, Tail(k - i)), factor));
  }
  return ffi::Error::Success();
}

// -- The greedy token: each row's first largest value ------------------------------------------------------------

// x [rows, n] → y [rows]: the index of each row's largest value, the first of equals (as jnp.argmax, for rows
// without NaN). XLA:CPU's reduction over SmolLM2's 49152 logits takes ~0.3 ms of a one-row decode step; this reads
// them at memory speed.
ffi::Error Argmax(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> y) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] < 1) return ffi::Error::InvalidArgument("cpu_kernel: argmax takes x [rows, n > 0]");
  const int64_t n = xd[1];
  for (int64_t r = 0; r < xd[0]; ++r) {
    const float* row = x.typed_data() + r * n;
    const __m512 most = _mm512_set1_ps(MaxOf(row, n));
    int32_t first = 0;  // a row of NaNs gives 0
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 hit = _mm512_mask_cmp_ps_mask(Tail(n - i), _mm512_maskz_loadu_ps(Tail(n - i), row + i), most,
                                                    _CMP_EQ_OQ);
      if (hit) {
        first = int32_t(i + __builtin_ctz(hit));
        break;
      }
    }
    y->typed_data()[r] = first;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxProductBF16, Run<uint16_t>,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs().RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxProductS8, Run<int8_t>,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs().RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxProductF32, Run<float>,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs().RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxAttendBF16, Attend<uint16_t>,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxAttendF32, Attend<float>,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxArgmax, Argmax,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::S32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxRowsBF16, Rows<uint16_t>,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::S32>>().RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxRowsS8, Rows<int8_t>,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::S32>>().RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxRowsF32, Rows<float>,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::S32>>().RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());
