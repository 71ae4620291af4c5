// Part of quant_cpu.cc, included inside its anonymous namespace (it uses the helpers above its
// #include there): `rows`, x @ q^T for q [V, Cq] with rows along the contracted axis (the tied
// embedding's logits), kept apart to keep each file short.

// Dots of kV rows of q with kM rows of x over bytes [b0, b1): each 8 bytes of a row of q are
// converted once in registers and multiplied into every row of x's accumulator (int4: x_even /
// x_odd against the low / high nibbles); the kV x kM accumulators are independent chains, and
// kV > 1 reads kV rows of q as parallel streams.
template <bool kInt4, int kV, int kM>
inline void row_dots(const float* const* xe, const float* const* xo, const uint8_t* const* row, int64_t b0,
                     int64_t b1, f32x8 (*out)[kM]) {
  f32x8 a[kV][kM] = {};
  int64_t b = b0;
  for (; b + 8 <= b1; b += 8)
    for (int v = 0; v < kV; ++v) {
      if (b % 64 == 0) __builtin_prefetch(row[v] + b + kAhead);
      f32x8 lo, hi;
      if (kInt4) int4_to_f32(row[v] + b, &lo, &hi);
      else lo = int8_to_f32(reinterpret_cast<const int8_t*>(row[v]) + b);
      for (int m = 0; m < kM; ++m)
        a[v][m] += kInt4 ? load_f32(xe[m] + b) * lo + load_f32(xo[m] + b) * hi : load_f32(xe[m] + b) * lo;
    }
  for (; b < b1; ++b)
    for (int v = 0; v < kV; ++v)
      for (int m = 0; m < kM; ++m)
        a[v][m][0] += kInt4 ? xe[m][b] * low_nibble(row[v][b]) + xo[m][b] * high_nibble(row[v][b])
                            : xe[m][b] * static_cast<int8_t>(row[v][b]);
  for (int v = 0; v < kV; ++v)
    for (int m = 0; m < kM; ++m) out[v][m] = a[v][m];
}

inline float lanes_sum(f32x8 a) {
  float sum = 0.f;
  for (int k = 0; k < 8; ++k) sum += a[k];
  return sum;
}

// out[m, vs[i]] for rows of x [m0, m0 + kM) and the kV rows vs of q (int4: group by group, each
// group's dot times its scale).
template <bool kInt4, int kV, int kM>
inline void row_block(const std::vector<float>& xs, int64_t M, int64_t Cb, int64_t m0, const uint8_t* q,
                      const float* scale, int64_t S, int64_t group_bytes, int64_t V, const int64_t* vs, float* out) {
  const float* xe[kM];
  const float* xo[kM];
  for (int m = 0; m < kM; ++m) {
    xe[m] = xs.data() + (m0 + m) * Cb;
    xo[m] = kInt4 ? xs.data() + (M + m0 + m) * Cb : nullptr;
  }
  const uint8_t* row[kV];
  for (int v = 0; v < kV; ++v) row[v] = q + vs[v] * Cb;
  f32x8 total[kV][kM] = {}, part[kV][kM];
  for (int64_t b0 = 0; b0 < Cb; b0 += group_bytes) {
    row_dots<kInt4, kV, kM>(xe, xo, row, b0, b0 + group_bytes, part);
    for (int v = 0; v < kV; ++v)
      for (int m = 0; m < kM; ++m)
        total[v][m] += kInt4 ? part[v][m] * scale[vs[v] * S + b0 / group_bytes] : part[v][m];
  }
  for (int v = 0; v < kV; ++v)
    for (int m = 0; m < kM; ++m)
      out[(m0 + m) * V + vs[v]] = lanes_sum(total[v][m]) * (kInt4 ? 1.f : scale[vs[v]]);
}

#include "quant_cpu_lanes.h"  // rows_int4_lanes

// Rows [v0, v1) of x [M, C] @ q^T, q [V, C] int8 with scale [V, 1], or q [V, Cb] int4 with
// scale [V, S]: out [M, V], `by_quarters`; each row of q is read from memory once, and blocks of
// 4 rows of x after the first find it in the cache.
template <bool kInt4>
void rows(const float* x, int64_t M, int64_t C, const uint8_t* q, const float* scale, int64_t S,
          int64_t V, int64_t v0, int64_t v1, float* out) {
  const int64_t Cb = kInt4 ? C / 2 : C, group_bytes = kInt4 ? Cb / S : Cb;
#if defined(__AVX512F__)
  if (kInt4 && group_bytes % 64 == 0) return rows_int4_table(x, M, C, q, scale, S, V, v0, v1, out);
#endif
#if defined(__AVX2__)
  if (kInt4 && group_bytes % 32 == 0) return rows_int4_lanes(x, M, C, q, scale, S, V, v0, v1, out);
#endif
  const std::vector<float> xs = kInt4 ? split_even_odd(x, M, Cb) : std::vector<float>(x, x + M * C);
  by_quarters(v0, v1, [&](const int64_t* vs) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      row_block<kInt4, 2, 4>(xs, M, Cb, m, q, scale, S, group_bytes, V, vs, out);
      row_block<kInt4, 2, 4>(xs, M, Cb, m, q, scale, S, group_bytes, V, vs + 2, out);
    }
    for (; m < M; ++m) row_block<kInt4, 4, 1>(xs, M, Cb, m, q, scale, S, group_bytes, V, vs, out);
  }, [&](int64_t v) {
    for (int64_t m = 0; m < M; ++m) row_block<kInt4, 1, 1>(xs, M, Cb, m, q, scale, S, group_bytes, V, &v, out);
  });
}
