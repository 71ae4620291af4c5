// Part of quant_cpu.cc, included inside its anonymous namespace (it uses kRows, kAhead,
// by_quarters and the helpers above it): the AVX-512 paths. The rest of quant_cpu.cc is the
// fallback for machines without AVX-512 and covers every shape; these take the common ones.
//
// int4 through a table: `vpermps` reads only the low 4 bits of each 32-bit index, so with a
// 16-entry table of floats, nibble k of each 32-bit lane becomes its value in one instruction
// after a shift by 4k (none for k = 0). The table holds the 16 signed codes (0..7, -8..-1), times
// the group's scale where one scale covers every lane (`rows`): then each weight is exactly
// `ref.quant`'s float32 dequantization, and a weight costs a shift, a permute and a multiply-add.

#if defined(__AVX512F__)
inline __m512 int4_codes() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1); }

// x in the lanes' order: a 64-byte chunk of a row of q is 16 lanes of 4 bytes, and nibble k of
// lane l is element 8 l + k of the chunk's 128. Returns [M][Cb / 64][8 k][16 l].
std::vector<float> lane_order(const float* x, int64_t M, int64_t Cb) {
  std::vector<float> out(2 * M * Cb);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t e = 0; e < 2 * Cb; ++e)
      out[m * 2 * Cb + e / 128 * 128 + e % 8 * 16 + e % 128 / 8] = x[m * 2 * Cb + e];
  return out;
}

// Dots of kV rows of q (vs) with kM rows of x from m0, as `row_block` for int4 with groups of
// whole 64-byte chunks. Two accumulators per output (even / odd k) halve the add chains.
template <int kV, int kM>
inline void table_block(const std::vector<float>& xl, int64_t Cb, int64_t m0, const uint8_t* q, const float* scale,
                        int64_t S, int64_t V, const int64_t* vs, float* out) {
  const __m512 codes = int4_codes();
  const int64_t group_bytes = Cb / S;
  __m512 acc[kV][kM][2];
  for (int v = 0; v < kV; ++v)
    for (int m = 0; m < kM; ++m) acc[v][m][0] = acc[v][m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < S; ++g) {
    __m512 table[kV];
    for (int v = 0; v < kV; ++v) table[v] = _mm512_mul_ps(codes, _mm512_set1_ps(scale[vs[v] * S + g]));
    for (int64_t b = g * group_bytes; b < (g + 1) * group_bytes; b += 64)
      for (int v = 0; v < kV; ++v) {
        const uint8_t* row = q + vs[v] * Cb;
        __builtin_prefetch(row + b + kAhead);
        const __m512i w = _mm512_loadu_si512(row + b);
        for (int k = 0; k < 8; ++k) {
          const __m512 f = _mm512_permutexvar_ps(k ? _mm512_srli_epi32(w, 4 * k) : w, table[v]);  // [16 l]
          for (int m = 0; m < kM; ++m)
            acc[v][m][k & 1] = _mm512_fmadd_ps(_mm512_loadu_ps(xl.data() + (m0 + m) * 2 * Cb + 2 * b + 16 * k), f,
                                               acc[v][m][k & 1]);
        }
      }
  }
  for (int v = 0; v < kV; ++v)
    for (int m = 0; m < kM; ++m)
      out[(m0 + m) * V + vs[v]] = _mm512_reduce_add_ps(_mm512_add_ps(acc[v][m][0], acc[v][m][1]));
}

// `rows<true>` by table_block, `by_quarters` as `rows`.
void rows_int4_table(const float* x, int64_t M, int64_t C, const uint8_t* q, const float* scale, int64_t S,
                     int64_t V, int64_t v0, int64_t v1, float* out) {
  const int64_t Cb = C / 2;
  const std::vector<float> xl = lane_order(x, M, Cb);
  by_quarters(v0, v1, [&](const int64_t* vs) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      table_block<2, 4>(xl, Cb, m, q, scale, S, V, vs, out);
      table_block<2, 4>(xl, Cb, m, q, scale, S, V, vs + 2, out);
    }
    for (; m < M; ++m) table_block<4, 1>(xl, Cb, m, q, scale, S, V, vs, out);
  }, [&](int64_t v) {
    for (int64_t m = 0; m < M; ++m) table_block<1, 1>(xl, Cb, m, q, scale, S, V, &v, out);
  });
}

// `columns_one_row`'s step for output channels [0, end) in 16s (end a multiple of 16): acc[j] +=
// (sum over the pass's rows r of x[r] q[r, j]) (times s[j] for int4). int4: the table without a
// scale (scales differ across the lanes here), the low nibble from the byte as it is, the high
// after a shift by 4; xe / xo are x's even / odd elements (int8: xe only), 0 past `rows`.
template <bool kInt4>
void columns_pass_wide(const float* xe, const float* xo, int64_t rows, const uint8_t* const* row, const float* s,
                       int64_t end, float* acc) {
  const __m512 codes = int4_codes();
  __m512 be[kRows], bo[kRows];
  for (int64_t r = 0; r < kRows; ++r) {
    be[r] = _mm512_set1_ps(r < rows ? xe[r] : 0.f);
    bo[r] = _mm512_set1_ps(kInt4 && r < rows ? xo[r] : 0.f);
  }
  for (int64_t j = 0; j < end; j += 16) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();  // two chains of kRows
    for (int64_t r = 0; r < kRows; ++r) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + j));
      if (kInt4) {
        const __m512i v = _mm512_cvtepu8_epi32(bytes);  // [16] one byte per lane
        a = _mm512_fmadd_ps(be[r], _mm512_permutexvar_ps(v, codes), a);
        b = _mm512_fmadd_ps(bo[r], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), codes), b);
      } else {
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
        (r % 2 ? b : a) = _mm512_fmadd_ps(be[r], w, r % 2 ? b : a);
      }
    }
    const __m512 sum = _mm512_add_ps(a, b), prev = _mm512_loadu_ps(acc + j);
    _mm512_storeu_ps(acc + j, kInt4 ? _mm512_fmadd_ps(sum, _mm512_loadu_ps(s + j), prev) : _mm512_add_ps(prev, sum));
  }
}
#endif
