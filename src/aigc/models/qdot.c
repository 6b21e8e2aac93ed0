/* Integer products over GGML blocks: y = x W^T with x rounded to 8-bit blocks first.
 *
 * Built into the same library as quant.c (see quant.py). Each call rounds its activation rows once,
 * block by block of 32 along the input: d = max|x| / 127, q = round(x / d) in int8, and s = d * sum(q)
 * per block. A group of 32 weights w = a u + c (u the stored unsigned integers, a the group's scale,
 * c its offset: -8 a for Q4_0, m for Q4_1, -dmin m_g for Q4_K ...) then gives
 *     sum_j w_j x_j ~= a d (u . q) + c s,
 * one integer dot of 32 bytes per group and row: VNNI's dpbusd (u8 x s8 -> s32) where the CPU has it,
 * AVX2's maddubs + madd otherwise (no saturation: |u| <= 128, |q| <= 127). Signed weights (Q8_0,
 * Q6_K's q - 32) move their sign onto the activations (|w| . sign(q, w)). The result differs from
 * "dequantise, then F.linear" by the activation rounding: at most d / 2 per activation.
 *
 * Compiled only where AVX2 is (the haswell build and any native x86 build); elsewhere
 * aigc_qdot_isa() returns 0 and quant.py keeps the float kernels.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "quant.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define QDOT_ISA_AVX2 1
#define QDOT_ISA_AVXVNNI 2
#define QDOT_ISA_AVX512VNNI 3

/* Integer dot of 32 unsigned bytes u with 32 signed bytes s -> 8 int32 lanes, lane i from bytes 4i..4i+3. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define QDOT_ISA QDOT_ISA_AVX512VNNI
static inline __m256i dot_u8s8(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
#elif defined(__AVXVNNI__)
#define QDOT_ISA QDOT_ISA_AVXVNNI
static inline __m256i dot_u8s8(__m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s); }
#else
#define QDOT_ISA QDOT_ISA_AVX2
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#endif

int aigc_qdot_isa(void) { return QDOT_ISA; }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

/* Rows x (n_rows, n_in) -> q (n_rows, n_in) int8 and, per block k of 32 (n_rows * n_in / 32 of them,
 * row-major), d[k] = max|x| / 127 and s[k] = d[k] * sum(q). The float steps are those of
 * quant.round_activations (d, then 1 / d, then round half to even of x * (1 / d)), so both give the same bytes. */
void aigc_quantise_rows(const float *restrict x, long n_rows, long n_in, int8_t *restrict q, float *restrict d,
                        float *restrict s) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undo packs' per-lane interleave */
    for (long k = 0; k < n_rows * (n_in / 32); k++) {
        const float *xb = x + 32 * k;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            m = _mm256_max_ps(m, _mm256_and_ps(v[i], magnitude));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        float dk = amax / 127.0f, inv = dk > 0.0f ? 1.0f / dk : 0.0f;
        __m256i n[4];
        for (int i = 0; i < 4; i++) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
        int total = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3])));
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
        _mm256_storeu_si256((__m256i *)(q + 32 * k), _mm256_permutevar8x32_epi32(packed, order));
        d[k] = dk;
        s[k] = dk * (float)total;
    }
}

/* One block of 32 weights of a 32-block type: integers u (unsigned bytes; signed for Q8_0), the scale
 * a of the integer dot (in every lane), and the offset c. */
typedef struct {
    __m256i u;
    __m256 scale;
    float offset;
} group_t;

static inline __m256i nibbles(const uint8_t *qs) { /* 16 bytes -> low nibbles (0-15), then high (16-31) */
    __m128i v = _mm_loadu_si128((const __m128i *)qs), low = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
}

static inline __m256i fifth_bits(uint32_t bits) { /* bit j -> 16 in byte j, else 0 */
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, /* byte j <- byte j / 8 */
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(16));
}

static inline group_t group_q8_0(const uint8_t *b) {
    return (group_t){_mm256_loadu_si256((const __m256i *)(b + 2)), _mm256_set1_ps(f16(b)), 0.0f};
}

static inline group_t group_q4_0(const uint8_t *b) {
    float a = f16(b);
    return (group_t){nibbles(b + 2), _mm256_set1_ps(a), -8.0f * a};
}

static inline group_t group_q4_1(const uint8_t *b) {
    return (group_t){nibbles(b + 4), _mm256_set1_ps(f16(b)), f16(b + 2)};
}

static inline group_t group_q5_0(const uint8_t *b) {
    float a = f16(b);
    return (group_t){_mm256_or_si256(nibbles(b + 6), fifth_bits(u32(b + 2))), _mm256_set1_ps(a), -16.0f * a};
}

static inline group_t group_q5_1(const uint8_t *b) {
    return (group_t){_mm256_or_si256(nibbles(b + 8), fifth_bits(u32(b + 4))), _mm256_set1_ps(f16(b)), f16(b + 2)};
}

/* The row kernels' shared signature: qdotN_NAME(row, xq, xd, xs, n_in, y, ld_y), described below. */
#define QDOT_ROW_KERNEL(NAME, N)                                                                             \
    static inline void qdot##N##_##NAME(const uint8_t *restrict row, const int8_t *restrict xq,              \
                                        const float *restrict xd, const float *restrict xs, long n_in,       \
                                        float *restrict y, long ld_y)

/* A row kernel's sums, zero: per activation row the lanes of its integer dots times their scales (acc)
 * and the offsets' term (off); `groups` blocks of 32 along the input. */
#define QDOT_ACCUMULATORS(N)                                                                                 \
    long groups = n_in / 32;                                                                                 \
    __m256 acc[N];                                                                                           \
    float off[N];                                                                                            \
    for (int r = 0; r < N; r++) acc[r] = _mm256_setzero_ps(), off[r] = 0.0f

/* y[r, o] for N activation rows and one weight row: each group is unpacked once and multiplied with
 * the N rows' blocks; lanes accumulate in float32 until the row ends (one horizontal sum per output).
 * xq: (N, n_in) int8 rows `n_in` apart; xd, xs: (N, n_in / 32) rows `n_in / 32` apart. */
#define QDOT_ROWS(NAME, BYTES, SIGNED, N)                                                                    \
    QDOT_ROW_KERNEL(NAME, N) {                                                                               \
        QDOT_ACCUMULATORS(N);                                                                                \
        for (long k = 0; k < groups; k++) {                                                                  \
            group_t w = group_##NAME(row + k * BYTES);                                                       \
            __m256i u = SIGNED ? _mm256_sign_epi8(w.u, w.u) : w.u;                                           \
            for (int r = 0; r < N; r++) {                                                                    \
                __m256i q = _mm256_loadu_si256((const __m256i *)(xq + r * n_in + 32 * k));                   \
                if (SIGNED) q = _mm256_sign_epi8(q, w.u);                                                    \
                __m256 dot = _mm256_cvtepi32_ps(dot_u8s8(u, q));                                             \
                acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(w.scale, _mm256_set1_ps(xd[r * groups + k])), acc[r]); \
                if (!SIGNED) off[r] += w.offset * xs[r * groups + k];                                        \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < N; r++) y[r * ld_y] = hsum(acc[r]) + off[r];                                     \
    }

/* The same for Q4_K / Q5_K, a super-block of 256 weights at a time: its eight 6-bit scales and mins
 * are unpacked and its two fp16 factors converted once, not once per group of 32, and each 32-byte load
 * of nibbles gives two groups: group 2c the low nibbles of chunk c, group 2c + 1 the high ones, for
 * Q5_K with bit g of each of the 32 qh bytes as the fifth bit. Per group: scale a = d sc_g and offset
 * c = -dmin m_g, the arithmetic of QDOT_ROWS. */
#define QDOT_ROWS_K(NAME, BYTES, HIGH_BITS, N)                                                               \
    QDOT_ROW_KERNEL(NAME, N) {                                                                               \
        QDOT_ACCUMULATORS(N);                                                                                \
        for (long sb = 0; sb < groups / 8; sb++) {                                                           \
            const uint8_t *b = row + sb * BYTES, *qs = b + (HIGH_BITS ? 48 : 16);                            \
            float d = f16(b), dmin = f16(b + 2), scale[8], offset[8];                                        \
            for (int g = 0; g < 8; g++) {                                                                    \
                int sc, m;                                                                                   \
                scale_min(b + 4, g, &sc, &m);                                                                \
                scale[g] = d * (float)sc, offset[g] = -dmin * (float)m;                                      \
            }                                                                                                \
            __m256i h = HIGH_BITS ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();  \
            for (int c = 0; c < 4; c++) {                                                                    \
                __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));                              \
                for (int half = 0; half < 2; half++) {                                                       \
                    int g = 2 * c + half;                                                                    \
                    long k = 8 * sb + g;                                                                     \
                    __m256i u = _mm256_and_si256(half ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));  \
                    if (HIGH_BITS) {                                                                         \
                        __m256i bit = _mm256_set1_epi8((char)(1 << g));                                      \
                        __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);                      \
                        u = _mm256_or_si256(u, _mm256_and_si256(set, _mm256_set1_epi8(16)));                 \
                    }                                                                                        \
                    __m256 a = _mm256_set1_ps(scale[g]);                                                     \
                    for (int r = 0; r < N; r++) {                                                            \
                        __m256i q = _mm256_loadu_si256((const __m256i *)(xq + r * n_in + 32 * k));           \
                        __m256 dot = _mm256_cvtepi32_ps(dot_u8s8(u, q));                                     \
                        acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(a, _mm256_set1_ps(xd[r * groups + k])), acc[r]); \
                        off[r] += offset[g] * xs[r * groups + k];                                            \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < N; r++) y[r * ld_y] = hsum(acc[r]) + off[r];                                     \
    }

/* The same for Q6_K, a super-block of 256 at a time: its fp16 factor converted once, and each half
 * (n = 0, 1) loads its two 32-byte chunks of low nibbles and its 32 bytes of high bits once for its
 * four groups, not once per group. Per group, the layout in quant.c (q - 32 as signed bytes, 16
 * weights per int8 scale) and QDOT_ROWS's arithmetic for signed weights, so the results are the same bits. */
#define QDOT_ROWS_Q6K(N)                                                                                     \
    QDOT_ROW_KERNEL(q6_k, N) {                                                                               \
        (void)xs;                                                                                            \
        long groups = n_in / 32;                                                                             \
        __m256 acc[N];                                                                                       \
        for (int r = 0; r < N; r++) acc[r] = _mm256_setzero_ps();                                            \
        for (long sb = 0; sb < groups / 8; sb++) {                                                           \
            const uint8_t *b = row + sb * 210;                                                               \
            const int8_t *scales = (const int8_t *)(b + 192);                                                \
            float d = f16(b + 208);                                                                          \
            for (int n = 0; n < 2; n++) {                                                                    \
                __m256i chunk[2] = {_mm256_loadu_si256((const __m256i *)(b + 64 * n)),                       \
                                    _mm256_loadu_si256((const __m256i *)(b + 64 * n + 32))};                 \
                __m256i high = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n));                      \
                for (int k = 0; k < 4; k++) {                                                                \
                    long g = 8 * sb + 4 * n + k;                                                             \
                    __m256i low = k < 2 ? chunk[k & 1] : _mm256_srli_epi16(chunk[k & 1], 4);                 \
                    low = _mm256_and_si256(low, _mm256_set1_epi8(15));                                       \
                    __m256i hi = _mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(2 * k)),          \
                                                  _mm256_set1_epi8(3));                                      \
                    __m256i u = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(hi, 4)),              \
                                                _mm256_set1_epi8(32));                                       \
                    const int8_t *sc = scales + 8 * n + 2 * k;                                               \
                    __m256 a = _mm256_setr_m128(_mm_set1_ps(d * sc[0]), _mm_set1_ps(d * sc[1]));             \
                    __m256i magnitude = _mm256_sign_epi8(u, u);                                              \
                    for (int r = 0; r < N; r++) {                                                            \
                        __m256i q = _mm256_loadu_si256((const __m256i *)(xq + r * n_in + 32 * g));           \
                        __m256 dot = _mm256_cvtepi32_ps(dot_u8s8(magnitude, _mm256_sign_epi8(q, u)));        \
                        acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(a, _mm256_set1_ps(xd[r * groups + g])), acc[r]); \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < N; r++) y[r * ld_y] = hsum(acc[r]) + 0.0f;                                       \
    }

/* The arguments of one product, for the pool's chunks of output rows. */
typedef struct {
    const uint8_t *w;
    const int8_t *xq;
    const float *xd, *xs;
    float *y;
    long n_rows, n_in, ld_y, row_bytes;
} qdot_job;

/* Each thread claims about CHUNKS_PER_THREAD chunks of a product's output rows (at least MIN_CHUNK_ROWS):
 * few enough that each reads long runs of consecutive rows, which the hardware prefetcher follows, and
 * enough that a caller whose worker has lost its core is not left waiting on one big chunk. */
#define MIN_CHUNK_ROWS 16
#define CHUNKS_PER_THREAD 4
static inline long chunk_rows(long n_out, int threads) {
    long rows = n_out / ((long)threads * CHUNKS_PER_THREAD);
    return rows > MIN_CHUNK_ROWS ? rows : MIN_CHUNK_ROWS;
}

/* The weight rows PREFETCH_BYTES ahead are requested while this one is multiplied. A decode step reads
 * each layer's blocks once, from memory, not cache, and the hardware prefetcher stops at each 4 KB page:
 * SmolLM2-135M Q4_1, 1 thread, a step's 121 products took 17.1 ms without, 8.9 ms with (2-core Xeon,
 * docs/benchmarks.md). 1-8 KB ahead measured alike. */
#define PREFETCH_BYTES 2048
static inline void prefetch_rows(const uint8_t *first, long bytes) {
    for (long b = 0; b < bytes; b += 64) _mm_prefetch((const char *)first + b, _MM_HINT_T0);
}

/* aigc_qdot_NAME: y[r, o] (rows ld_y apart) for x (n_rows, n_in) float32 and W (n_out, n_in) of
 * blocks; output rows split over `threads` threads (pool.c). Returns -1 when the rounded rows
 * cannot be allocated, else 0. */
#define QDOT_PRODUCT(NAME, QK, BYTES)                                                                        \
    static void qdot_rows_##NAME(void *ctx, long begin, long end) {                                          \
        const qdot_job *j = ctx;                                                                             \
        long n_in = j->n_in, groups = n_in / 32, ld_y = j->ld_y;                                             \
        long ahead = (PREFETCH_BYTES + j->row_bytes - 1) / j->row_bytes;                                     \
        for (long o = begin; o < end; o++) {                                                                 \
            const uint8_t *row = j->w + o * j->row_bytes;                                                    \
            if (o + ahead < end) prefetch_rows(row + ahead * j->row_bytes, j->row_bytes);                    \
            const int8_t *xq = j->xq;                                                                        \
            const float *xd = j->xd, *xs = j->xs;                                                            \
            float *y = j->y + o;                                                                             \
            long r = 0;                                                                                      \
            for (; r + 8 <= j->n_rows; r += 8)                                                               \
                qdot8_##NAME(row, xq + r * n_in, xd + r * groups, xs + r * groups, n_in, y + r * ld_y, ld_y); \
            if (r + 4 <= j->n_rows) {                                                                        \
                qdot4_##NAME(row, xq + r * n_in, xd + r * groups, xs + r * groups, n_in, y + r * ld_y, ld_y); \
                r += 4;                                                                                      \
            }                                                                                                \
            if (r + 2 <= j->n_rows) {                                                                        \
                qdot2_##NAME(row, xq + r * n_in, xd + r * groups, xs + r * groups, n_in, y + r * ld_y, ld_y); \
                r += 2;                                                                                      \
            }                                                                                                \
            if (r < j->n_rows)                                                                               \
                qdot1_##NAME(row, xq + r * n_in, xd + r * groups, xs + r * groups, n_in, y + r * ld_y, ld_y); \
        }                                                                                                    \
    }                                                                                                        \
    int aigc_qdot_##NAME(const uint8_t *restrict w, const float *restrict x, float *restrict y, long n_rows,   \
                         long n_out, long n_in, long ld_y, int threads) {                                    \
        long groups = n_in / 32;                                                                             \
        int8_t *xq = aligned_alloc(64, (size_t)((n_rows * n_in + 2 * 4 * n_rows * groups + 63) / 64 * 64));  \
        if (!xq) return -1;                                                                                  \
        float *xd = (float *)(xq + n_rows * n_in), *xs = xd + n_rows * groups;                               \
        aigc_quantise_rows(x, n_rows, n_in, xq, xd, xs);                                                     \
        qdot_job job = {w, xq, xd, xs, y, n_rows, n_in, ld_y, n_in / QK * BYTES};                            \
        pool_run(qdot_rows_##NAME, &job, n_out, chunk_rows(n_out, threads), threads, 1);                     \
        free(xq);                                                                                            \
        return 0;                                                                                            \
    }

/* A type's row kernels for 8, 4, 2 and 1 activation rows, made by ROWS (QDOT_ROWS or QDOT_ROWS_K, whose
 * FLAG is SIGNED or HIGH_BITS), and its entry point. */
#define QDOT_KERNELS(ROWS, NAME, QK, BYTES, FLAG)                                                            \
    ROWS(NAME, BYTES, FLAG, 8)                                                                               \
    ROWS(NAME, BYTES, FLAG, 4)                                                                               \
    ROWS(NAME, BYTES, FLAG, 2)                                                                               \
    ROWS(NAME, BYTES, FLAG, 1)                                                                               \
    QDOT_PRODUCT(NAME, QK, BYTES)

QDOT_KERNELS(QDOT_ROWS, q8_0, 32, 34, 1)
QDOT_KERNELS(QDOT_ROWS, q4_0, 32, 18, 0)
QDOT_KERNELS(QDOT_ROWS, q4_1, 32, 20, 0)
QDOT_KERNELS(QDOT_ROWS, q5_0, 32, 22, 0)
QDOT_KERNELS(QDOT_ROWS, q5_1, 32, 24, 0)
QDOT_KERNELS(QDOT_ROWS_K, q4_k, 256, 144, 0)
QDOT_KERNELS(QDOT_ROWS_K, q5_k, 256, 176, 1)
QDOT_ROWS_Q6K(8)
QDOT_ROWS_Q6K(4)
QDOT_ROWS_Q6K(2)
QDOT_ROWS_Q6K(1)
QDOT_PRODUCT(q6_k, 256, 210)

#else
int aigc_qdot_isa(void) { return 0; } /* no AVX2: quant.py keeps the float kernels */
#endif
