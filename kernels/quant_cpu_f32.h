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

constexpr int64_t kPass = 8;  // contracted rows of w per pass over the accumulators (8 read streams)

// acc[m, j] += sum_r x[m, c + r] w[c + r, o0 + j] for r < rows (<= kPass), j < width: each vector
// of w is loaded once and multiplied into every row's accumulator (acc rows of stride `stride`).
inline void f32_pass(const float* x, int64_t C, int64_t M, const float* w, int64_t O, int64_t c, int64_t rows,
                     int64_t o0, int64_t width, float* acc, int64_t stride) {
  const float* row[kPass];
  for (int64_t r = 0; r < kPass; ++r) row[r] = w + (c + (r < rows ? r : 0)) * O + o0;
  const int64_t vec = width / kLanes * kLanes;
  for (int64_t j = 0; j < vec; j += kLanes) {
    f32v wr[kPass];
    for (int64_t r = 0; r < kPass; ++r) wr[r] = r < rows ? load_v(row[r] + j) : f32v{};
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * C + c;
      f32v p[kPass];
      for (int64_t r = 0; r < kPass; ++r) p[r] = wr[r] * (r < rows ? xm[r] : 0.f);
      for (int64_t n = kPass / 2; n >= 1; n /= 2)  // a tree, not a chain of dependent adds
        for (int64_t r = 0; r < n; ++r) p[r] += p[r + n];
      store_v(acc + m * stride + j, load_v(acc + m * stride + j) + p[0]);
    }
  }
  for (int64_t j = vec; j < width; ++j)
    for (int64_t m = 0; m < M; ++m) {
      float sum = 0.f;
      for (int64_t r = 0; r < rows; ++r) sum += x[m * C + c + r] * row[r][j];
      acc[m * stride + j] += sum;
    }
}

// Output channels [o0, o1) of x [M, C] @ w [C, O] into out [M, O]: passes of kPass rows of w over
// the accumulators [M, o1 - o0] (kept in L2), so w streams from memory once, row by row.
void f32_columns(const float* x, int64_t M, int64_t C, const float* w, int64_t O, int64_t o0, int64_t o1,
                 float* out) {
  // Accumulator rows 64 bytes longer than a multiple of 4 KiB apart (see `columns`: false aliasing).
  const int64_t width = o1 - o0, stride = (width + kLanes - 1) / kLanes * kLanes + 16;
  std::vector<float> acc(M * stride, 0.f);
  for (int64_t c = 0; c < C; c += kPass)
    f32_pass(x, C, M, w, O, c, std::min(kPass, C - c), o0, width, acc.data(), stride);
  for (int64_t m = 0; m < M; ++m) std::memcpy(out + m * O + o0, acc.data() + m * stride, width * sizeof(float));
}

// x [G, M, C] @ w [G, C, O] -> out [G, M, O] on all threads: work items (g, 64 channels), each
// thread a contiguous run of them.
void f32_columns_all(const float* x, int64_t G, int64_t M, int64_t C, const float* w, int64_t O, float* out) {
  const int64_t blocks = (O + 63) / 64;
  parallel_ranges(G * blocks, 2, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end;) {
      const int64_t g = item / blocks, first = item % blocks, last = std::min(blocks, first + (end - item));
      f32_columns(x + g * M * C, M, C, w + g * C * O, O, first * 64, std::min(O, last * 64), out + g * M * O);
      item += last - first;
    }
  });
}

inline float f32_lanes_sum(f32v a) {
  float sum = 0.f;
  for (int k = 0; k < kLanes; ++k) sum += a[k];
  return sum;
}

// out[m, vs[i]] for rows m of x [m0, m0 + kM) and the kV rows vs of w (w [V, C], dotted along
// its rows): each vector of the kV rows of w is loaded once per kM rows of x, the kV x kM sums are
// independent chains, and the kV rows are parallel read streams (`by_quarters`).
template <int kV, int kM>
inline void f32_row_dots(const float* x, int64_t C, int64_t m0, const float* w, const int64_t* vs, float* out,
                         int64_t V) {
  f32v a[kV][kM] = {};
  const int64_t vec = C / kLanes * kLanes;
  for (int64_t c = 0; c < vec; c += kLanes)
    for (int i = 0; i < kV; ++i) {
      const float* row = w + vs[i] * C;
      if (c % 16 == 0) __builtin_prefetch(row + c + kAhead / 4);
      const f32v e = load_v(row + c);
      for (int m = 0; m < kM; ++m) a[i][m] += load_v(x + (m0 + m) * C + c) * e;
    }
  for (int i = 0; i < kV; ++i)
    for (int m = 0; m < kM; ++m) {
      float sum = f32_lanes_sum(a[i][m]);
      for (int64_t c = vec; c < C; ++c) sum += x[(m0 + m) * C + c] * w[vs[i] * C + c];
      out[(m0 + m) * V + vs[i]] = sum;
    }
}

// The rows vs of w against every row of x, 4 rows of x at a time.
template <int kV>
void f32_rows_of(const float* x, int64_t M, int64_t C, const float* w, int64_t V, const int64_t* vs, float* out) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) f32_row_dots<kV, 4>(x, C, m, w, vs, out, V);
  for (; m < M; ++m) f32_row_dots<kV, 1>(x, C, m, w, vs, out, V);
}

// Rows [v0, v1) of w: x [M, C] @ w[v0:v1]^T into out [M, V].
void f32_rows(const float* x, int64_t M, int64_t C, const float* w, int64_t V, int64_t v0, int64_t v1, float* out) {
  by_quarters(v0, v1, [&](const int64_t* vs) { f32_rows_of<4>(x, M, C, w, V, vs, out); },
              [&](int64_t v) { f32_rows_of<1>(x, M, C, w, V, &v, out); });
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
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  parallel_ranges(V, 64, [&](int64_t v0, int64_t v1) { f32_rows(xp, M, C, wp, V, v0, v1, op); });
  return ffi::Error::Success();
}
