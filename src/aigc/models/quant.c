/* Kernels over GGML block-quantised weights (the layouts of GGUF files), for CPU inference.
 *
 * Compiled on the user's machine by aigc/models/quant.py (with qdot.c and pool.c into one library), twice: with
 * -march=native (AVX-512 where the CPU has it) and with -march=haswell (AVX2 + FMA), chosen at run
 * time. Plain C: each block is expanded to float32 in registers and multiplied in float32, so a
 * result differs from "dequantise, then F.linear" by float32 rounding only. These are the products
 * of AIGC_QUANT_ACTIVATIONS=float and of builds without AVX2; qdot.c's integer products are the
 * default. The expansion to float32 (aigc_dequant_*) serves the tiled products of long prefills.
 *
 * A weight matrix is (n_out, n_in) logically and (n_out, n_in / QK * BYTES) uint8 as stored: each
 * row is a run of blocks of QK weights along the input dimension. Block layouts (little-endian,
 * fp16 scales; "d" the scale, "m" the offset; GGML's definitions):
 *   Q8_0  34 B / 32: d, int8 q[32]                                   w = d q
 *   Q4_0  18 B / 32: d, 16 B of nibbles (low: w 0-15, high: 16-31)    w = d (q - 8)
 *   Q4_1  20 B / 32: d, m, nibbles                                    w = d q + m
 *   Q5_0  22 B / 32: d, 32 high bits, nibbles                         w = d (q - 16)
 *   Q5_1  24 B / 32: d, m, 32 high bits, nibbles                      w = d q + m
 *   Q4_K 144 B / 256: d, dmin, 12 B of 6-bit (scale, min) for 8 groups of 32, 128 B nibbles
 *   Q5_K 176 B / 256: as Q4_K plus 32 B of fifth bits
 *   Q6_K 210 B / 256: 128 B low nibbles, 64 B high 2-bit pairs, int8 scales[16] (groups of 16), d last
 */
#include <stdint.h>
#include <string.h>

#include "pool.h"
#include "quant.h"

static inline void dq_q8_0(const uint8_t *restrict b, float *restrict y) {
    float d = f16(b);
    const int8_t *q = (const int8_t *)(b + 2);
    for (int i = 0; i < 32; i++) y[i] = d * (float)q[i];
}

/* Low nibbles, then high nibbles, in two loops: with one loop writing both halves, GCC 12's AVX2
 * build took 2.1-12.5 ms for a 1536 x 1536 product against 0.8-1.3 ms (one thread, under load). */
static inline void dq_q4_0(const uint8_t *restrict b, float *restrict y) {
    float d = f16(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) y[j] = d * (float)((qs[j] & 15) - 8);
    for (int j = 0; j < 16; j++) y[j + 16] = d * (float)((qs[j] >> 4) - 8);
}

static inline void dq_q4_1(const uint8_t *restrict b, float *restrict y) {
    float d = f16(b), m = f16(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) y[j] = d * (float)(qs[j] & 15) + m;
    for (int j = 0; j < 16; j++) y[j + 16] = d * (float)(qs[j] >> 4) + m;
}

static inline void dq_q5_0(const uint8_t *restrict b, float *restrict y) {
    float d = f16(b);
    uint32_t qh = u32(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        int lo = (qs[j] & 15) | (int)(((qh >> j) & 1) << 4);
        int hi = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}

static inline void dq_q5_1(const uint8_t *restrict b, float *restrict y) {
    float d = f16(b), m = f16(b + 2);
    uint32_t qh = u32(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        int lo = (qs[j] & 15) | (int)(((qh >> j) & 1) << 4);
        int hi = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)lo + m;
        y[j + 16] = d * (float)hi + m;
    }
}

/* Q4_K and Q5_K: 4 chunks of 64 weights; a chunk's 32 bytes give group 2c (low nibbles) and 2c + 1
 * (high nibbles); Q5_K's bit for group g is bit g of qh[l]. */
static inline void dq_k45(const uint8_t *restrict b, const uint8_t *restrict qh, const uint8_t *restrict qs,
                          float *restrict y) {
    float d = f16(b), dmin = f16(b + 2);
    for (int c = 0; c < 4; c++) {
        int sc0, m0, sc1, m1;
        scale_min(b + 4, 2 * c, &sc0, &m0);
        scale_min(b + 4, 2 * c + 1, &sc1, &m1);
        float d0 = d * (float)sc0, o0 = dmin * (float)m0, d1 = d * (float)sc1, o1 = dmin * (float)m1;
        const uint8_t *q = qs + 32 * c;
        for (int l = 0; l < 32; l++) {
            int lo = q[l] & 15, hi = q[l] >> 4;
            if (qh) {
                lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
            }
            y[64 * c + l] = d0 * (float)lo - o0;
            y[64 * c + 32 + l] = d1 * (float)hi - o1;
        }
    }
}

static inline void dq_q4_k(const uint8_t *restrict b, float *restrict y) { dq_k45(b, 0, b + 16, y); }

static inline void dq_q5_k(const uint8_t *restrict b, float *restrict y) { dq_k45(b, b + 16, b + 48, y); }

/* Q6_K: 2 halves of 128 weights; in half n, weight 32 k + l (k 0-3, l 0-31) takes its low 4 bits
 * from ql[64 n + l + 32 (k & 1)] (low nibble for k < 2, high for k >= 2), its top 2 bits from bits
 * 2k, 2k + 1 of qh[32 n + l], and the scale of group 8 n + 2 k + l / 16. */
static inline void dq_q6_k(const uint8_t *restrict b, float *restrict y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *scales = (const int8_t *)(b + 192);
    float d = f16(b + 208);
    for (int n = 0; n < 2; n++) {
        for (int k = 0; k < 4; k++) {
            const uint8_t *low = ql + 64 * n + 32 * (k & 1), *high = qh + 32 * n;
            int shift = k < 2 ? 0 : 4;
            for (int h = 0; h < 2; h++) { /* 16 weights per scale: the inner loop has no branch */
                float scale = d * (float)scales[8 * n + 2 * k + h];
                for (int l = 16 * h; l < 16 * h + 16; l++) {
                    int q = (((low[l] >> shift) & 15) | (((high[l] >> (2 * k)) & 3) << 4)) - 32;
                    y[128 * n + 32 * k + l] = scale * (float)q;
                }
            }
        }
    }
}

/* For each type: a product of a few rows, y[r, o] = sum_i W[o, i] x[r, i] (y's rows `ld_y` apart,
 * so the parts of a fused layer write their own columns), and the expansion of whole rows to float32.
 * Each block is expanded once per group of up to 8 input rows; the partial sums stay in 32 lanes per
 * row until the weight row ends (one horizontal sum per output, not per block). The row count of a
 * group is a compile-time constant (8, 4, 2, 1), so the compiler keeps the sums in registers. Output
 * rows are split over `threads` threads (pool.c).
 * w: (n_out, n_in / QK * BYTES) uint8, x: (n_rows, n_in), y: (n_rows, ld_y); out: (n_out, n_in). */
#define DOT_ROWS(NAME, QK, BYTES, N, WIDTH)                                                                  \
    WIDTH static inline void dot##N##_##NAME(const uint8_t *restrict row, const float *restrict x, long n_in, \
                                            long blocks, float *restrict y, long ld_y) {                     \
        _Alignas(64) float acc[N][32];                                                                       \
        _Alignas(64) float buf[QK];                                                                          \
        memset(acc, 0, sizeof acc);                                                                          \
        for (long b = 0; b < blocks; b++) {                                                                  \
            dq_##NAME(row + b * BYTES, buf);                                                                 \
            for (int r = 0; r < N; r++) {                                                                    \
                const float *xb = x + r * n_in + b * QK;                                                     \
                for (int i = 0; i < QK; i += 32) {                                                           \
                    _Pragma("omp simd") for (int j = 0; j < 32; j++) acc[r][j] += buf[i + j] * xb[i + j];    \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < N; r++) {                                                                        \
            float sum = 0.0f;                                                                                \
            for (int j = 0; j < 32; j++) sum += acc[r][j];                                                   \
            y[r * ld_y] = sum;                                                                               \
        }                                                                                                    \
    }

/* float32 -> bf16 rounded to nearest even, as PyTorch's .to(torch.bfloat16) (NaN stays NaN): training
 * on a quantised base expands its layers straight into bf16, without a float32 copy in between. */
static inline void to_bf16(const float *restrict y, uint16_t *restrict out, int n) {
    for (int i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, y + i, sizeof u);
        uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        out[i] = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded);
    }
}

/* The arguments of one product or expansion, for the pool's chunks of output rows (pool.c). */
typedef struct {
    const uint8_t *w;
    const float *x;
    float *y;
    long n_rows, n_in, ld_y; /* expansions: y (or the bf16 out) has rows ld_y apart */
    uint16_t *bf16;
} gemv_job;

#define QUANT_KERNELS(NAME, QK, BYTES, WIDTH)                                                                \
    DOT_ROWS(NAME, QK, BYTES, 8, WIDTH)                                                                      \
    DOT_ROWS(NAME, QK, BYTES, 4, WIDTH)                                                                      \
    DOT_ROWS(NAME, QK, BYTES, 2, WIDTH)                                                                      \
    DOT_ROWS(NAME, QK, BYTES, 1, WIDTH)                                                                      \
    WIDTH static void gemv_rows_##NAME(void *ctx, long begin, long end) {                                    \
        const gemv_job *j = ctx;                                                                             \
        long n_in = j->n_in, blocks = n_in / QK, ld_y = j->ld_y;                                             \
        for (long o = begin; o < end; o++) {                                                                 \
            const uint8_t *row = j->w + o * blocks * BYTES;                                                  \
            const float *x = j->x;                                                                           \
            float *y = j->y + o;                                                                             \
            long r = 0;                                                                                      \
            for (; r + 8 <= j->n_rows; r += 8) dot8_##NAME(row, x + r * n_in, n_in, blocks, y + r * ld_y, ld_y); \
            if (r + 4 <= j->n_rows) {                                                                        \
                dot4_##NAME(row, x + r * n_in, n_in, blocks, y + r * ld_y, ld_y);                            \
                r += 4;                                                                                      \
            }                                                                                                \
            if (r + 2 <= j->n_rows) {                                                                        \
                dot2_##NAME(row, x + r * n_in, n_in, blocks, y + r * ld_y, ld_y);                            \
                r += 2;                                                                                      \
            }                                                                                                \
            if (r < j->n_rows) dot1_##NAME(row, x + r * n_in, n_in, blocks, y + r * ld_y, ld_y);             \
        }                                                                                                    \
    }                                                                                                        \
    void aigc_gemv_##NAME(const uint8_t *restrict w, const float *restrict x, float *restrict y, long n_rows,   \
                          long n_out, long n_in, long ld_y, int threads) {                                   \
        gemv_job job = {w, x, y, n_rows, n_in, ld_y};                                                        \
        pool_run(gemv_rows_##NAME, &job, n_out, 16, threads, 1);                                             \
    }                                                                                                        \
    static void dequant_rows_##NAME(void *ctx, long begin, long end) {                                       \
        const gemv_job *j = ctx;                                                                             \
        long blocks = j->n_in / QK;                                                                          \
        for (long o = begin; o < end; o++) {                                                                 \
            for (long b = 0; b < blocks; b++) dq_##NAME(j->w + (o * blocks + b) * BYTES, j->y + o * j->n_in + b * QK); \
        }                                                                                                    \
    }                                                                                                        \
    void aigc_dequant_##NAME(const uint8_t *restrict w, float *restrict out, long n_out, long n_in,          \
                             int threads) {                                                                  \
        gemv_job job = {w, 0, out, 0, n_in, n_in, 0};                                                        \
        pool_run(dequant_rows_##NAME, &job, n_out, 16, threads, 0);                                          \
    }                                                                                                        \
    WIDTH static void dequant_bf16_rows_##NAME(void *ctx, long begin, long end) {                            \
        const gemv_job *j = ctx;                                                                             \
        long blocks = j->n_in / QK;                                                                          \
        float y[QK];                                                                                         \
        for (long o = begin; o < end; o++) {                                                                 \
            for (long b = 0; b < blocks; b++) {                                                              \
                dq_##NAME(j->w + (o * blocks + b) * BYTES, y);                                               \
                to_bf16(y, j->bf16 + o * j->ld_y + b * QK, QK);                                              \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    WIDTH void aigc_dequant_bf16_##NAME(const uint8_t *restrict w, uint16_t *restrict out, long n_out,       \
                                        long n_in, long ld_out, int threads) {                               \
        gemv_job job = {w, 0, 0, 0, n_in, ld_out, out};                                                      \
        pool_run(dequant_bf16_rows_##NAME, &job, n_out, 16, threads, 0);                                     \
    }

/* Vector width per type, where the compiler takes a hint (GCC and Clang on x86): measured on a
 * 2-core AVX-512 Xeon (1536 x 1536, one thread, best of 15 under load), GCC 12's 512-bit code expanded
 * Q4_0 and Q4_1 14x faster than its 256-bit code, and Q8_0 8x slower; the K-quants barely differ. */
#if defined(__x86_64__) && defined(__AVX512F__)
#define WIDE __attribute__((target("prefer-vector-width=512")))
#define NARROW __attribute__((target("prefer-vector-width=256")))
#else
#define WIDE
#define NARROW
#endif

QUANT_KERNELS(q8_0, 32, 34, NARROW)
QUANT_KERNELS(q4_0, 32, 18, WIDE)
QUANT_KERNELS(q4_1, 32, 20, WIDE)
QUANT_KERNELS(q5_0, 32, 22, NARROW)
QUANT_KERNELS(q5_1, 32, 24, WIDE)
QUANT_KERNELS(q4_k, 256, 144, NARROW)
QUANT_KERNELS(q5_k, 256, 176, NARROW)
QUANT_KERNELS(q6_k, 256, 210, NARROW)
