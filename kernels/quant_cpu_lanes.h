// Part of quant_cpu.cc (included by quant_cpu_rows.h, inside the anonymous namespace; it uses
// f32x8, lanes_sum, kAhead and by_quarters from there): the int4 `rows` path for groups of whole
// 32-byte chunks, kept apart to keep each file short. AVX2 only; `rows` falls back to its generic loop.

#if defined(__AVX2__)
// int4 `rows` when a group is whole 32-byte chunks (G a multiple of 64: every released model).
// A chunk is 8 lanes of 4 bytes; nibble k of lane l holds element 8 l + k of its 64. XOR 0x88
// turns each nibble t into t + 8 in [0, 15]; masked in place, nibble k is (t + 8) 16^k as an
// int32, which converts to float exactly, and x's element comes pre-scaled by 16^-k (exact), so
// a weight costs an AND, a convert and a multiply-add instead of the shifts of `int4_to_f32`
// (about 1.3x on one core here). The 8 each nibble carries is taken off once per output:
// sum_g s_g (x_g . t_g) = sum_g s_g (x_g . (t_g + 8)) - sum_g s_g 8 sum(x_g).
struct LaneInputs {
  std::vector<float> x;     // [M][Cb / 32][8 k][8 l] = x[m, 64 chunk + 8 l + k] 16^-k (k = 7: shifted down, 1)
  std::vector<float> bias;  // [M][S] = 8 * sum of x[m] over the group
};

LaneInputs lane_inputs(const float* x, int64_t M, int64_t Cb, int64_t S) {
  constexpr float kStep[8] = {1.f, 1.f / 16, 1.f / 256, 1.f / 4096, 1.f / 65536, 1.f / 1048576, 1.f / 16777216, 1.f};
  LaneInputs in{std::vector<float>(2 * M * Cb), std::vector<float>(M * S, 0.f)};
  const int64_t group = 2 * Cb / S;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t e = 0; e < 2 * Cb; ++e) {
      const int64_t chunk = e / 64, l = e % 64 / 8, k = e % 8;
      in.x[m * 2 * Cb + chunk * 64 + k * 8 + l] = x[m * 2 * Cb + e] * kStep[k];
      in.bias[m * S + e / group] += 8.f * x[m * 2 * Cb + e];
    }
  return in;
}

// Dots of kV rows of q (vs) with kM rows of x from m0, as `row_block` for int4.
template <int kV, int kM>
inline void lane_block(const LaneInputs& in, int64_t Cb, int64_t m0, const uint8_t* q, const float* scale,
                       int64_t S, int64_t V, const int64_t* vs, float* out) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x88));
  const int64_t group_bytes = Cb / S;
  __m256 total[kV][kM];
  for (int v = 0; v < kV; ++v)
    for (int m = 0; m < kM; ++m) total[v][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < S; ++g)
    for (int64_t b = g * group_bytes; b < (g + 1) * group_bytes; b += 32)
      for (int v = 0; v < kV; ++v) {
        const uint8_t* row = q + vs[v] * Cb;
        if (b % 64 == 0) __builtin_prefetch(row + b + kAhead);
        const __m256i w = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b)), flip);
        __m256 f[8];
        for (int k = 0; k < 7; ++k) f[k] = _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(0xF << (4 * k))));
        f[7] = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 28));
        const __m256 sc = _mm256_set1_ps(scale[vs[v] * S + g]);
        for (int m = 0; m < kM; ++m) {
          const float* xc = in.x.data() + (m0 + m) * 2 * Cb + 2 * b;
          __m256 p[4];  // a tree, not a chain: the chain's latency would bound the loop
          for (int i = 0; i < 4; ++i)
            p[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xc + 16 * i + 8), f[2 * i + 1], _mm256_mul_ps(_mm256_loadu_ps(xc + 16 * i), f[2 * i]));
          total[v][m] = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(p[0], p[1]), _mm256_add_ps(p[2], p[3])), sc, total[v][m]);
        }
      }
  for (int v = 0; v < kV; ++v)
    for (int m = 0; m < kM; ++m) {
      float bias = 0.f;
      for (int64_t g = 0; g < S; ++g) bias += scale[vs[v] * S + g] * in.bias[(m0 + m) * S + g];
      out[(m0 + m) * V + vs[v]] = lanes_sum(static_cast<f32x8>(total[v][m])) - bias;
    }
}

// `rows<true>` by lane_block, `by_quarters` as `rows`.
void rows_int4_lanes(const float* x, int64_t M, int64_t C, const uint8_t* q, const float* scale, int64_t S,
                     int64_t V, int64_t v0, int64_t v1, float* out) {
  const int64_t Cb = C / 2;
  const LaneInputs in = lane_inputs(x, M, Cb, S);
  by_quarters(v0, v1, [&](const int64_t* vs) {
    if (M == 1) return lane_block<4, 1>(in, Cb, 0, q, scale, S, V, vs, out);
    for (int j = 0; j < 4; ++j) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) lane_block<1, 4>(in, Cb, m, q, scale, S, V, vs + j, out);
      for (; m < M; ++m) lane_block<1, 1>(in, Cb, m, q, scale, S, V, vs + j, out);
    }
  }, [&](int64_t v) {
    for (int64_t m = 0; m < M; ++m) lane_block<1, 1>(in, Cb, m, q, scale, S, V, &v, out);
  });
}
#endif
