// Matrix-vector products on int8 / int4 weights for XLA:CPU (XLA FFI custom calls).
//
// XLA:CPU never fuses an int8 -> float32 convert into a dot: it writes the converted weight,
// then the dot reads it back, so a quantized weight costs at least as much memory traffic as a
// float32 one. These loops read each quantized byte once, convert it in registers and multiply
// it into float32 accumulators; with few rows of x (decoding) the weight read is all the work.
// Formats (paligemma.ref.quant): int8 per-output-channel scale; int4 two sign-extended nibbles
// per byte along the contracted axis (low = element 2b, high = 2b + 1) with one scale per group
// of contracted elements. The numbers are those of x @ dequantize(q, scale) up to float32
// reassociation. paligemma/kernels/quant_cpu.py compiles, registers and calls these.
//
// Axes: G independent weights, M rows of x, C contracted length (Cp: padded to whole int4
// groups, Cb = Cp / 2 bytes), O output channels, V vocabulary rows, S scale rows.

#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x8 __attribute__((vector_size(32)));

// Block sizes (compile-time: the loops over rows unroll fully).
constexpr int64_t kRows = 8;       // contracted rows of q per pass over the accumulators
constexpr int64_t kBlock = 256;    // output channels converted per step (kRows x kBlock floats stay in L1)
constexpr int64_t kAhead = 32768;  // bytes `rows` prefetches ahead of its reads
constexpr int64_t kShortRow = 8192;  // `columns` at batch 1 splits rows of q up to this long by rows

inline f32x8 load_f32(const float* p) { f32x8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store_f32(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

// 8 int8 -> 8 floats. GCC lowers __builtin_convertvector from int8 lanes element by element, so
// AVX2 gets its one-instruction sign extension explicitly.
inline f32x8 int8_to_f32(const int8_t* p) {
#if defined(__AVX2__)
  return (f32x8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  f32x8 v;
  for (int k = 0; k < 8; ++k) v[k] = p[k];
  return v;
#endif
}

// The low (element 2b) and high (2b + 1) nibbles of 8 bytes, sign-extended, as floats.
inline void int4_to_f32(const uint8_t* p, f32x8* low, f32x8* high) {
#if defined(__AVX2__)
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  *low = (f32x8)_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));
  *high = (f32x8)_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 28));
#else
  for (int k = 0; k < 8; ++k) {
    (*low)[k] = static_cast<int8_t>(static_cast<uint8_t>(p[k] << 4)) >> 4;
    (*high)[k] = static_cast<int8_t>(p[k]) >> 4;
  }
#endif
}

inline int8_t low_nibble(uint8_t b) { return static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4; }
inline int8_t high_nibble(uint8_t b) { return static_cast<int8_t>(b) >> 4; }

int worker_count() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Runs fn(begin, end, t) over [0, n) split into contiguous ranges, one per thread t (at least
// `grain` items each; t < worker_count()); the calling thread takes the first range (t = 0).
template <class Fn>
void parallel_parts(int64_t n, int64_t grain, Fn fn) {
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(worker_count(), n / std::max<int64_t>(1, grain)));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(fn, n * t / threads, n * (t + 1) / threads, t);
  fn(0, n / threads, 0);
  for (auto& th : pool) th.join();
}

// parallel_parts for an fn(begin, end) that needs no thread index.
template <class Fn>
void parallel_ranges(int64_t n, int64_t grain, Fn fn) {
  parallel_parts(n, grain, [&](int64_t begin, int64_t end, int64_t) { fn(begin, end); });
}

// The rows [v0, v1) as 4 quarters read side by side (4 memory streams: one sequential stream reads
// at about 2/3 of the bandwidth here): four(vs) for vs = the i-th row of each quarter, then
// one(v) for each row the quarters leave over.
template <class Four, class One>
void by_quarters(int64_t v0, int64_t v1, Four four, One one) {
  const int64_t quarter = (v1 - v0) / 4;
  for (int64_t i = 0; i < quarter; ++i) {
    const int64_t vs[4] = {v0 + i, v0 + quarter + i, v0 + 2 * quarter + i, v0 + 3 * quarter + i};
    four(vs);
  }
  for (int64_t v = v0 + 4 * quarter; v < v1; ++v) one(v);
}

// The contracted rows of q one pass covers: up to kRows, never past `end` or a group's end.
inline int64_t pass_rows(int64_t c, int64_t end, int64_t group_bytes) {
  return std::min({kRows, end - c, (c / group_bytes + 1) * group_bytes - c});
}

// x[c + r] broadcast for r < kRows, 0 where r >= rows (those rows' q is read but adds nothing).
inline void broadcast_rows(const float* x, int64_t rows, f32x8* xb) {
  for (int64_t r = 0; r < kRows; ++r) xb[r] = f32x8{} + (r < rows ? x[r] : 0.f);
}

// p[0] + ... + p[kRows - 1] as a tree (p is overwritten): a chain of kRows dependent adds would
// bound the loops that call this.
inline f32x8 pairwise_sum(f32x8* p) {
  for (int64_t n = kRows / 2; n >= 1; n /= 2)
    for (int64_t r = 0; r < n; ++r) p[r] += p[r + n];
  return p[0];
}

// int4's inputs de-interleaved: [M, Cb] of x's even elements, then [M, Cb] of its odd ones.
std::vector<float> split_even_odd(const float* x, int64_t M, int64_t Cb) {
  std::vector<float> xs(2 * M * Cb);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < Cb; ++b) {
      xs[m * Cb + b] = x[m * 2 * Cb + 2 * b];
      xs[(M + m) * Cb + b] = x[m * 2 * Cb + 2 * b + 1];
    }
  return xs;
}

#include "quant_cpu_avx512.h"  // rows_int4_table, columns_pass_wide

// One row of x (decoding at batch 1): each pass converts kRows rows of q in registers and adds
// them into acc [width] at once, so the weight is read once and nothing the size of it is written.
// Only the contracted rows [c0, c1) of q (all when c1 < 0; int4: c0 and c1 on group boundaries).
template <bool kInt4>
void columns_one_row(const float* x, int64_t C, const uint8_t* q, const float* scale, int64_t S, int64_t O,
                     int64_t o0, int64_t o1, float* out, int64_t c0 = 0, int64_t c1 = -1) {
  const int64_t width = o1 - o0, vec = width / 8 * 8, Cb = kInt4 ? C / 2 : C;
  const int64_t group_bytes = kInt4 ? Cb / S : Cb;
  if (c1 < 0) c1 = Cb;
  std::vector<float> acc(width, 0.f), xs = kInt4 ? split_even_odd(x, 1, Cb) : std::vector<float>();
  for (int64_t c = c0, rows; c < c1; c += rows) {
    rows = pass_rows(c, c1, group_bytes);
    const uint8_t* row[kRows];
    for (int64_t r = 0; r < kRows; ++r) row[r] = q + (c + (r < rows ? r : 0)) * O + o0;
    f32x8 xe[kRows], xo[kRows];
    broadcast_rows(kInt4 ? xs.data() + c : x + c, rows, xe);
    if (kInt4) broadcast_rows(xs.data() + Cb + c, rows, xo);
    const float* s = kInt4 ? scale + (c / group_bytes) * O + o0 : nullptr;
    int64_t j = 0;
#if defined(__AVX512F__)
    j = width / 16 * 16;
    columns_pass_wide<kInt4>(kInt4 ? xs.data() + c : x + c, kInt4 ? xs.data() + Cb + c : nullptr, rows, row, s, j,
                             acc.data());
#endif
    for (; j < vec; j += 8) {
      f32x8 p[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        if (kInt4) {
          f32x8 lo, hi;
          int4_to_f32(row[r] + j, &lo, &hi);
          p[r] = xe[r] * lo + xo[r] * hi;
        } else {
          p[r] = xe[r] * int8_to_f32(reinterpret_cast<const int8_t*>(row[r]) + j);
        }
      }
      const f32x8 sum = pairwise_sum(p);
      store_f32(acc.data() + j, load_f32(acc.data() + j) + (kInt4 ? sum * load_f32(s + j) : sum));
    }
    for (j = vec; j < width; ++j) {
      float sum = 0.f;
      for (int64_t r = 0; r < rows; ++r)
        sum += kInt4 ? xs[c + r] * low_nibble(row[r][j]) + xs[Cb + c + r] * high_nibble(row[r][j])
                     : x[c + r] * static_cast<int8_t>(row[r][j]);
      acc[j] += kInt4 ? sum * s[j] : sum;
    }
  }
  for (int64_t j = 0; j < width; ++j) out[o0 + j] = kInt4 ? acc[j] : acc[j] * scale[o0 + j];
}

// w[r, j] = q[r, j] as float (rows of stride O), times the group scale s[j] for int4 (w[0] the
// low nibbles, w[1] the high); rows >= `rows` and columns >= `block` are 0.
template <bool kInt4>
void convert_rows(const uint8_t* q, int64_t O, int64_t rows, const float* s, int64_t block,
                  float (*w)[kRows][kBlock]) {
  const int64_t vec = block / 8 * 8;
  for (int64_t r = 0; r < kRows; ++r) {
    if (r >= rows) {
      std::fill(w[0][r], w[0][r] + kBlock, 0.f);
      if (kInt4) std::fill(w[1][r], w[1][r] + kBlock, 0.f);
      continue;
    }
    const uint8_t* row = q + r * O;
    for (int64_t j = 0; j < vec; j += 8) {
      if (kInt4) {
        f32x8 lo, hi, sc = load_f32(s + j);
        int4_to_f32(row + j, &lo, &hi);
        store_f32(w[0][r] + j, lo * sc);
        store_f32(w[1][r] + j, hi * sc);
      } else {
        store_f32(w[0][r] + j, int8_to_f32(reinterpret_cast<const int8_t*>(row) + j));
      }
    }
    for (int64_t j = vec; j < kBlock; ++j) {
      const bool real = j < block;
      w[0][r][j] = !real ? 0.f : kInt4 ? low_nibble(row[j]) * s[j] : static_cast<int8_t>(row[j]);
      if (kInt4) w[1][r][j] = real ? high_nibble(row[j]) * s[j] : 0.f;
    }
  }
}

// acc[m, j] += sum_r x[m, r] * w[r, j] for one pass (x rows of stride x_stride, acc of acc_stride).
inline void accumulate(float* acc, int64_t acc_stride, const float* x, int64_t x_stride, int64_t M,
                       const float (*w)[kBlock], int64_t rows, int64_t width) {
  for (int64_t m = 0; m < M; ++m) {
    float* a = acc + m * acc_stride;
    f32x8 xb[kRows];
    broadcast_rows(x + m * x_stride, rows, xb);
    for (int64_t j = 0; j < width; j += 8) {
      f32x8 p[kRows];
      for (int64_t r = 0; r < kRows; ++r) p[r] = xb[r] * load_f32(w[r] + j);
      store_f32(a + j, load_f32(a + j) + pairwise_sum(p));
    }
  }
}

// One weight's output channels [o0, o1) of x [M, C] @ q [C, O] (int8, scale [1, O]) or
// q [Cb, O] (int4, scale [S, O]) into out [M, O]. Several rows of x: each pass converts
// kRows x kBlock of q once into an L1 buffer and every row of x reads it from there.
template <bool kInt4>
void columns(const float* x, int64_t M, int64_t C, const uint8_t* q, const float* scale, int64_t S,
             int64_t O, int64_t o0, int64_t o1, float* out) {
  if (M == 1) return columns_one_row<kInt4>(x, C, q, scale, S, O, o0, o1, out);
  // Accumulator rows 64 bytes longer than the block: at a multiple of 4 KiB apart, each row's
  // stores would falsely alias the loads of the next (measured 2x slower at M = 8).
  const int64_t width = o1 - o0, padded = (width + 7) / 8 * 8 + 16, Cb = kInt4 ? C / 2 : C;
  const int64_t group_bytes = kInt4 ? Cb / S : Cb;
  std::vector<float> acc(M * padded, 0.f), xs = kInt4 ? split_even_odd(x, M, Cb) : std::vector<float>();
  alignas(32) float w[2][kRows][kBlock];
  for (int64_t c = 0, rows; c < Cb; c += rows) {
    rows = pass_rows(c, Cb, group_bytes);
    const float* s = kInt4 ? scale + (c / group_bytes) * O + o0 : nullptr;
    for (int64_t j0 = 0; j0 < width; j0 += kBlock) {
      convert_rows<kInt4>(q + c * O + o0 + j0, O, rows, kInt4 ? s + j0 : nullptr, std::min(kBlock, width - j0), w);
      const int64_t span = std::min(kBlock, (width - j0 + 7) / 8 * 8);
      if (kInt4) {
        accumulate(acc.data() + j0, padded, xs.data() + c, Cb, M, w[0], rows, span);
        accumulate(acc.data() + j0, padded, xs.data() + M * Cb + c, Cb, M, w[1], rows, span);
      } else {
        accumulate(acc.data() + j0, padded, x + c, C, M, w[0], rows, span);
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < width; ++j)
      out[m * O + o0 + j] = kInt4 ? acc[m * padded + j] : acc[m * padded + j] * scale[o0 + j];
}

#include "quant_cpu_rows.h"  // rows (and quant_cpu_lanes.h)
#include "quant_cpu_f32.h"  // float32 weights, few rows of x (batched decoding)

// x [G, M, C] @ dequantize(q [G, Cq, O], scale [G, S, O]) -> out [G, M, O], on all threads.
template <bool kInt4>
void columns_all(const float* xp, int64_t G, int64_t M, int64_t C, const uint8_t* qp, const float* sp, int64_t S,
                 int64_t O, float* op) {
  const int64_t Cb = kInt4 ? C / 2 : C;
  // One row of x and rows of q up to kShortRow bytes (the attention output, the MLP's down
  // projection): the threads split the contracted rows instead of the channels, so that each reads
  // one contiguous stretch of q rather than a short piece of every row, and their sums are added
  // (int8 1.1-1.3x on 16384 x 2048 and 2048 x 2048 here; int4 level, bound by its conversion).
  if (M == 1 && G == 1 && O <= kShortRow) {
    const int64_t unit = kInt4 ? Cb / S : kRows, units = (Cb + unit - 1) / unit;
    const int64_t workers = worker_count();
    std::vector<float> parts(workers * O, 0.f);
    parallel_parts(units, 4, [&](int64_t u0, int64_t u1, int64_t t) {
      columns_one_row<kInt4>(xp, C, qp, sp, S, O, 0, O, parts.data() + t * O, u0 * unit, std::min(Cb, u1 * unit));
    });
    for (int64_t o = 0; o < O; ++o) {
      float sum = 0.f;
      for (int64_t t = 0; t < workers; ++t) sum += parts[t * O + o];
      op[o] = sum;
    }
    return;
  }
  // Work items: (g, block of 64 channels); each thread takes a contiguous run of them.
  const int64_t blocks = (O + 63) / 64;
  parallel_ranges(G * blocks, 2, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end;) {
      const int64_t g = item / blocks, first = item % blocks;
      const int64_t last = std::min(blocks, first + (end - item));
      columns<kInt4>(xp + g * M * C, M, C, qp + g * Cb * O, sp + g * S * O, S, O, first * 64,
                     std::min(O, last * 64), op + g * M * O);
      item += last - first;
    }
  });
}

ffi::Error bad(const char* what) { return ffi::Error::InvalidArgument(what); }

// x f32 [G, M, C]; q [G, Cq, O] (int8: Cq = C; int4: Cq = C / 2); scale f32 [G, S, O]; out [G, M, O].
template <bool kInt4>
ffi::Error ColumnsImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                       ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (xd.size() != 3 || qd.size() != 3 || sd.size() != 3) return bad("quant columns: x, q and scale must be rank 3");
  const int64_t G = xd[0], M = xd[1], C = xd[2], O = qd[2], S = sd[1];
  if (qd[0] != G || sd[0] != G || sd[2] != O || qd[1] != (kInt4 ? C / 2 : C) || (kInt4 && (C % 2 || S < 1 || (C / 2) % S)))
    return bad("quant columns: shapes of x [G, M, C], q [G, Cq, O] and scale [G, S, O] disagree");
  const float* xp = x.typed_data();
  const uint8_t* qp = static_cast<const uint8_t*>(q.untyped_data());
  const float* sp = scale.typed_data();
  float* op = out->typed_data();
  columns_all<kInt4>(xp, G, M, C, qp, sp, S, O, op);
  return ffi::Error::Success();
}

// x f32 [M, C]; q [V, Cq]; scale f32 [V, S]; out [M, V].
template <bool kInt4>
ffi::Error RowsImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                    ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2) return bad("quant rows: x, q and scale must be rank 2");
  const int64_t M = xd[0], C = xd[1], V = qd[0], S = sd[1];
  if (sd[0] != V || qd[1] != (kInt4 ? C / 2 : C) || (kInt4 && (C % 2 || S < 1 || (C / 2) % S)) || (!kInt4 && S != 1))
    return bad("quant rows: shapes of x [M, C], q [V, Cq] and scale [V, S] disagree");
  const float* xp = x.typed_data();
  const uint8_t* qp = static_cast<const uint8_t*>(q.untyped_data());
  const float* sp = scale.typed_data();
  float* op = out->typed_data();
  parallel_ranges(V, 64, [&](int64_t v0, int64_t v1) { rows<kInt4>(xp, M, C, qp, sp, S, V, v0, v1, op); });
  return ffi::Error::Success();
}

}  // namespace

#define PALIGEMMA_BIND                                                                            \
  ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>() \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(PaligemmaInt8Columns, ColumnsImpl<false>, PALIGEMMA_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PaligemmaInt4Columns, ColumnsImpl<true>, PALIGEMMA_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PaligemmaInt8Rows, RowsImpl<false>, PALIGEMMA_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PaligemmaInt4Rows, RowsImpl<true>, PALIGEMMA_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PaligemmaF32Columns, F32ColumnsImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PaligemmaF32Rows, F32RowsImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

// Which of the loops above this build runs (for `quant_cpu.built_isa()`): 2 AVX-512, 1 AVX2, 0 neither.
extern "C" int PaligemmaQuantIsa() {
#if defined(__AVX512F__)
  return 2;
#elif defined(__AVX2__)
  return 1;
#else
  return 0;
#endif
}
