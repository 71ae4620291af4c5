// Part of quant_cpu.cc, included inside its anonymous namespace (it uses parallel_ranges and
// kAhead from above its #include there): float32 products for a few rows of x (batched decoding).
//
// Why: XLA:CPU runs x [M, C] @ w [C, O] with M = 1 as a matrix-vector product that reads w in
// place, but with 2 <= M <= 16 as a GEMM that packs (copies) panels of w before multiplying them,
// so a batch-8 decoding step costs about 3x a batch-1 one although it reads the same weights.
// These loops read each weight element once and multiply it into all M rows' accumulators.
// Every sum is a float32 sum of float32 products (the order differs from XLA's: reassociation).
//
// Axes: G independent weights, M rows of x, C contracted length, O output channels, V rows of a
// weight contracted along its rows (the tied embedding).

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // one zmm register
#else
constexpr int kLanes = 8;  // one ymm register (two xmm ones without AVX)
#endif
typedef float f32v __attribute__((vector_size(kLanes * 4)));

inline f32v load_v(const float* p) { f32v v; std::memcpy(&v, p, sizeof v); return v; }
inline void store_v(float* p, f32v v) { std::memcpy(p, &v, sizeof v); }

constexpr int64_t kPass = 16;  // contracted rows of w per pass over the accumulators (read streams)

// x's rows are copied to a stride of C + 16 floats: at C = 2048 or 16384 (a multiple of 4 KiB) all
// rows of x and of w map to the same L1 sets, and 8-16 rows of x plus the rows of w in flight
// exceed its 12 ways (measured: the logits at 16 rows slower than XLA's GEMM before this copy).
inline int64_t padded_stride(int64_t C) { return C + 16; }

std::vector<float> with_stride(const float* x, int64_t rows, int64_t C, int64_t stride) {
  std::vector<float> out(rows * stride, 0.f);
  for (int64_t m = 0; m < rows; ++m) std::memcpy(out.data() + m * stride, x + m * C, C * sizeof(float));
  return out;
}

// acc[m, j] += sum_r x[m, c + r] w[c + r, o0 + j] for r < rows (<= kPass), j < width: each vector
// of w is loaded once and multiplied into every row's accumulator (acc rows of stride `stride`).
inline void f32_pass(const float* x, int64_t xs, int64_t M, const float* w, int64_t O, int64_t c, int64_t rows,
                     int64_t o0, int64_t width, float* acc, int64_t stride) {
  const float* row[kPass];
  for (int64_t r = 0; r < kPass; ++r) row[r] = w + (c + (r < rows ? r : 0)) * O + o0;
  const int64_t vec = width / kLanes * kLanes;
  for (int64_t j = 0; j < vec; j += kLanes) {
    f32v wr[kPass];
    for (int64_t r = 0; r < kPass; ++r) wr[r] = r < rows ? load_v(row[r] + j) : f32v{};
    // Two chains of fused multiply-adds per row of x, added to the accumulator once per pass: the
    // rows' chains are independent, so they overlap (a tree of adds costs ~1.5x the instructions),
    // and the accumulator takes one rounded add per kPass rows (fewer sequential roundings).
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * xs + c;
      f32v a = wr[0] * xm[0], b = wr[kPass / 2] * (kPass / 2 < rows ? xm[kPass / 2] : 0.f);
      for (int64_t r = 1; r < kPass / 2; ++r) {
        a += wr[r] * (r < rows ? xm[r] : 0.f);
        b += wr[kPass / 2 + r] * (kPass / 2 + r < rows ? xm[kPass / 2 + r] : 0.f);
      }
      store_v(acc + m * stride + j, load_v(acc + m * stride + j) + (a + b));
    }
  }
  for (int64_t j = vec; j < width; ++j)
    for (int64_t m = 0; m < M; ++m) {
      float sum = 0.f;
      for (int64_t r = 0; r < rows; ++r) sum += x[m * xs + c + r] * row[r][j];
      acc[m * stride + j] += sum;
    }
}

// Output channels [o0, o1) of x [M, C] @ w [C, O], contracted rows [c0, c1) only, into out [M, O]
// (row stride `out_stride`): passes of kPass rows of w over the accumulators [M, o1 - o0] (kept in
// L2), so w streams from memory once, row by row.
void f32_columns(const float* x, int64_t xs, int64_t M, const float* w, int64_t O, int64_t o0, int64_t o1,
                 int64_t c0, int64_t c1, float* out, int64_t out_stride) {
  // Accumulator rows 64 bytes longer than a multiple of 4 KiB apart (see `columns`: false aliasing).
  const int64_t width = o1 - o0, stride = (width + kLanes - 1) / kLanes * kLanes + 16;
  std::vector<float> acc(M * stride, 0.f);
  for (int64_t c = c0; c < c1; c += kPass)
    f32_pass(x, xs, M, w, O, c, std::min(kPass, c1 - c), o0, width, acc.data(), stride);
  for (int64_t m = 0; m < M; ++m) std::memcpy(out + m * out_stride + o0, acc.data() + m * stride, width * sizeof(float));
}

// x [G, M, C] @ w [G, C, O] -> out [G, M, O] on all threads.
void f32_columns_all(const float* x_in, int64_t G, int64_t M, int64_t C, const float* w, int64_t O, float* out) {
  const int64_t xs = padded_stride(C);
  const std::vector<float> xp = with_stride(x_in, G * M, C, xs);
  const float* x = xp.data();
  // One weight with rows up to kShortRow (the attention output, the MLP's down projection): the
  // threads split the contracted rows, so that each reads one contiguous stretch of w rather than
  // a piece of every row, and their partial sums are added (as quant_cpu.cc's `columns_all`).
  if (G == 1 && O <= kShortRow && C >= 4 * kPass) {
    const int64_t units = (C + kPass - 1) / kPass, workers = worker_count();
    std::vector<float> parts(workers * M * O, 0.f);
    parallel_parts(units, 4, [&](int64_t u0, int64_t u1, int64_t t) {
      f32_columns(x, xs, M, w, O, 0, O, u0 * kPass, std::min(C, u1 * kPass), parts.data() + t * M * O, O);
    });
    for (int64_t i = 0; i < M * O; ++i) {
      float sum = 0.f;
      for (int64_t t = 0; t < workers; ++t) sum += parts[t * M * O + i];
      out[i] = sum;
    }
    return;
  }
  // Work items: (g, 64 channels); each thread takes a contiguous run of them.
  const int64_t blocks = (O + 63) / 64;
  parallel_ranges(G * blocks, 2, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end;) {
      const int64_t g = item / blocks, first = item % blocks, last = std::min(blocks, first + (end - item));
      f32_columns(x + g * M * xs, xs, M, w + g * C * O, O, first * 64, std::min(O, last * 64), 0, C, out + g * M * O, O);
      item += last - first;
    }
  });
}

inline float f32_lanes_sum(f32v a) {
  float sum = 0.f;
  for (int k = 0; k < kLanes; ++k) sum += a[k];
  return sum;
}

constexpr int64_t kChunk = 256;  // contracted elements per block of `f32_rows`: x [<= 16, kChunk] stays in L1

// a[i][m] += x[m0 + m, c0:c1] . row[i][c0:c1] for kV rows of w and kM rows of x (c1 - c0 a
// multiple of kLanes): each vector of the kV rows is loaded once for the kM rows, each vector of x
// once for the kV rows; the kV x kM sums are independent chains.
template <int kV, int kM>
inline void f32_row_block(const float* x, int64_t xs, int64_t m0, const float* const* row, int64_t c0, int64_t c1,
                          f32v* acc, int64_t M) {
  f32v a[kV][kM];
  for (int i = 0; i < kV; ++i)
    for (int m = 0; m < kM; ++m) a[i][m] = acc[i * M + m0 + m];
  for (int64_t c = c0; c < c1; c += kLanes) {
    f32v e[kV];
    for (int i = 0; i < kV; ++i) e[i] = load_v(row[i] + c);
    for (int m = 0; m < kM; ++m) {
      const f32v xv = load_v(x + (m0 + m) * xs + c);
      for (int i = 0; i < kV; ++i) a[i][m] += xv * e[i];
    }
  }
  for (int i = 0; i < kV; ++i)
    for (int m = 0; m < kM; ++m) acc[i * M + m0 + m] = a[i][m];
}

// out[m, vs[i]] = x[m] . w[vs[i]] for every row m of x and the kV rows vs of w (w [V, C], dotted
// along its rows). The contracted axis goes by blocks of kChunk: a block of the kV rows (parallel
// read streams, `by_quarters`) is read from memory once and from L1 by every row of x, whose
// block [M, kChunk] stays there too (x whole, [16, 2048], would not: every load an L2 miss).
template <int kV>
void f32_rows_of(const float* x, int64_t xs, int64_t M, int64_t C, const float* w, int64_t V, const int64_t* vs,
                 float* out) {
  const float* row[kV];
  for (int i = 0; i < kV; ++i) row[i] = w + vs[i] * C;
  std::vector<f32v> acc(kV * M, f32v{});
  const int64_t vec = C / kLanes * kLanes;
  for (int64_t c0 = 0; c0 < vec; c0 += kChunk) {
    const int64_t c1 = std::min(vec, c0 + kChunk);
    for (int i = 0; i < kV; ++i)  // every cache line of the block kAhead bytes ahead
      for (int64_t c = c0; c < c1; c += 16) __builtin_prefetch(row[i] + c + kAhead / 4);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) f32_row_block<kV, 4>(x, xs, m, row, c0, c1, acc.data(), M);
    for (; m < M; ++m) f32_row_block<kV, 1>(x, xs, m, row, c0, c1, acc.data(), M);
  }
  for (int i = 0; i < kV; ++i)
    for (int64_t m = 0; m < M; ++m) {
      float sum = f32_lanes_sum(acc[i * M + m]);
      for (int64_t c = vec; c < C; ++c) sum += x[m * xs + c] * row[i][c];
      out[m * V + vs[i]] = sum;
    }
}

// Rows [v0, v1) of w: x [M, C] @ w[v0:v1]^T into out [M, V].
void f32_rows(const float* x, int64_t xs, int64_t M, int64_t C, const float* w, int64_t V, int64_t v0, int64_t v1,
              float* out) {
  by_quarters(v0, v1, [&](const int64_t* vs) { f32_rows_of<4>(x, xs, M, C, w, V, vs, out); },
              [&](int64_t v) { f32_rows_of<1>(x, xs, M, C, w, V, &v, out); });
}

// x f32 [G, M, C]; w f32 [G, C, O]; out [G, M, O].
ffi::Error F32ColumnsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 3 || wd.size() != 3) return ffi::Error::InvalidArgument("f32 columns: x and w must be rank 3");
  const int64_t G = xd[0], M = xd[1], C = xd[2], O = wd[2];
  if (wd[0] != G || wd[1] != C)
    return ffi::Error::InvalidArgument("f32 columns: shapes of x [G, M, C] and w [G, C, O] disagree");
  f32_columns_all(x.typed_data(), G, M, C, w.typed_data(), O, out->typed_data());
  return ffi::Error::Success();
}

// x f32 [M, C]; w f32 [V, C]; out [M, V].
ffi::Error F32RowsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("f32 rows: x and w must be rank 2");
  const int64_t M = xd[0], C = xd[1], V = wd[0];
  if (wd[1] != C) return ffi::Error::InvalidArgument("f32 rows: shapes of x [M, C] and w [V, C] disagree");
  const int64_t xs = padded_stride(C);
  const std::vector<float> xp = with_stride(x.typed_data(), M, C, xs);
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  parallel_ranges(V, 64, [&](int64_t v0, int64_t v1) { f32_rows(xp.data(), xs, M, C, wp, V, v0, v1, op); });
  return ffi::Error::Success();
}
