/* Float32 kernels for inference on the CPU: small products and the elementwise work of a decode step;
 * and, at the end, the elementwise passes of a training step (RMSNorm, SwiGLU) in float32 and bfloat16.
 *
 * Compiled on the user's machine by aigc/models/native.py (-O3 -march=native -fopenmp), so the
 * compiler vectorises the loops for whatever this CPU has (AVX2, AVX-512, NEON). Plain C with
 * `omp simd` hints and no -ffast-math: results differ from PyTorch's only by float32 rounding.
 * Every array is contiguous and row-major; shapes are given next to each function.
 */
#include <math.h>
#include <stdint.h>

/* y = x W^T + b for a few input rows. Decoding one row is bound by how fast the weights stream from
 * memory: each weight row is read once, in order, while the (tiny) input rows stay in L1. The output
 * rows are split across `threads` OpenMP threads.
 * w: (n_out, n_in), x: (n_rows, n_in), b: (n_out) or NULL, y: (n_rows, n_out). */
void aigc_gemv_f32(const float *restrict w, const float *restrict x, const float *restrict b,
                   float *restrict y, long n_rows, long n_out, long n_in, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long o = 0; o < n_out; o++) {
        const float *w_row = w + o * n_in;
        for (long r = 0; r < n_rows; r++) {
            const float *x_row = x + r * n_in;
            float sum = 0.0f;
            /* simd reduction: lets the compiler keep several vector partial sums (no -ffast-math needed) */
#pragma omp simd reduction(+ : sum)
            for (long i = 0; i < n_in; i++) sum += w_row[i] * x_row[i];
            y[r * n_out + o] = b ? sum + b[o] : sum;
        }
    }
}

/* exp(x) in plain arithmetic, so that loops calling it vectorise (libm's expf does not without
 * -ffast-math): x = k ln2 + r with |r| <= ln2/2; exp(r) by its degree-7 Taylor polynomial (truncation
 * below 1e-8 relative); 2^k written into the exponent bits. Below -87.3 it gives 0, above 88.7 +inf. */
static inline float exp_f32(float x) {
    if (x < -87.3f) return 0.0f;
    if (x > 88.7f) return INFINITY;
    /* round to nearest by adding and subtracting 1.5 * 2^23: exact in float32, and it vectorises */
    float k = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
    float r = x - k * 0.693145752f; /* ln2 in two parts: k times the first is exact */
    r = r - k * 1.42860677e-6f;
    float p = 1.0f / 5040;
    p = 1.0f / 720 + r * p;
    p = 1.0f / 120 + r * p;
    p = 1.0f / 24 + r * p;
    p = 1.0f / 6 + r * p;
    p = 0.5f + r * p;
    p = 1.0f + r * p;
    p = 1.0f + r * p;
    int bits = ((int)k + 127) << 23;
    float two_to_k;
    __builtin_memcpy(&two_to_k, &bits, sizeof two_to_k);
    return p * two_to_k;
}

/* RMSNorm of each row: y = x / sqrt(mean(x^2) + eps) * w.   x, y: (rows, n); w: (n). */
void aigc_rms_norm_f32(const float *restrict x, const float *restrict w, float *restrict y, long rows, long n,
                       float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long r = 0; r < rows; r++) {
        const float *x_row = x + r * n;
        float *y_row = y + r * n;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (long i = 0; i < n; i++) sum += x_row[i] * x_row[i];
        float scale = 1.0f / sqrtf(sum / (float)n + eps);
#pragma omp simd
        for (long i = 0; i < n; i++) y_row[i] = x_row[i] * scale * w[i];
    }
}

/* SwiGLU's gate: each row of h holds the gate then the up projection; y = silu(gate) * up.
 * h: (rows, 2 hidden), y: (rows, hidden). */
void aigc_silu_mul_f32(const float *restrict h, float *restrict y, long rows, long hidden, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long r = 0; r < rows; r++) {
        const float *gate = h + r * 2 * hidden;
        float *y_row = y + r * hidden;
#pragma omp simd
        for (long i = 0; i < hidden; i++) y_row[i] = gate[i] / (1.0f + exp_f32(-gate[i])) * gate[hidden + i];
    }
}

/* One decode step's new token per row: rotate its queries in place and its keys into the cache, copy
 * its values into the cache (Hugging Face Llama's rotary layout: pair (i, i + hs/2) turns by angle i).
 * qkv: (B, (nh + 2 nkv) hs), queries then keys then values; cache: (2, B, nkv, capacity, hs), keys
 * then values, written at position `at`; cos, sin: row b at b * rope_stride (stride 0: one row for
 * all), (hs) each, or NULL for no rotation (learned positions). */
void aigc_rope_append_f32(float *restrict qkv, const float *restrict cos, const float *restrict sin,
                          long rope_stride, float *restrict cache, long B, long nh, long nkv, long hs,
                          long capacity, long at) {
    long half = hs / 2, width = (nh + 2 * nkv) * hs;
    for (long b = 0; b < B; b++) {
        float *row = qkv + b * width;
        for (long h = 0; h < nh + nkv; h++) {
            float *x = row + h * hs;
            float *out = h < nh ? x : cache + ((b * nkv + (h - nh)) * capacity + at) * hs;
            if (!cos) {
                for (long i = 0; i < hs; i++) out[i] = x[i];
                continue;
            }
            const float *c = cos + b * rope_stride, *s = sin + b * rope_stride;
#pragma omp simd
            for (long i = 0; i < half; i++) {
                float first = x[i], second = x[i + half];
                out[i] = first * c[i] - second * s[i];
                out[i + half] = second * c[i + half] + first * s[i + half];
            }
        }
        for (long h = 0; h < nkv; h++) {
            const float *v = row + (nh + nkv + h) * hs;
            float *out = cache + (((B + b) * nkv + h) * capacity + at) * hs;
            for (long i = 0; i < hs; i++) out[i] = v[i];
        }
    }
}

/* Attention of one new query token per row over the `length` cached positions, the last of which is
 * the token itself. Grouped-query: each of the nkv cached heads serves nh / nkv query heads and is
 * read once for all of them. Scores are scaled by 1/sqrt(hs); softmax subtracts the row's maximum.
 * q: row b's head h at q + b * q_stride + h * hs; cache: (2, B, nkv, capacity, hs);
 * valid: (B, valid_stride) bytes, nonzero where a position may be attended (the last always may),
 * or NULL for all; work: (B, nh, length) scratch; y: (B, nh * hs). */
void aigc_decode_attention_f32(const float *restrict q, long q_stride, const float *restrict cache,
                               const unsigned char *restrict valid, long valid_stride, float *restrict work,
                               float *restrict y, long B, long nh, long nkv, long hs, long capacity, long length,
                               int threads) {
    long group = nh / nkv;
    float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long task = 0; task < B * nkv; task++) {
        long b = task / nkv, g = task % nkv;
        const float *keys = cache + (b * nkv + g) * capacity * hs;
        const float *values = cache + ((B + b) * nkv + g) * capacity * hs;
        const unsigned char *ok = valid ? valid + b * valid_stride : 0;
        const float *queries = q + b * q_stride + g * group * hs; /* the group's heads, adjacent: (group, hs) */
        float *scores = work + (b * nh + g * group) * length;    /* (group, length) */
        float *out = y + b * nh * hs + g * group * hs;             /* (group, hs) */
        /* Scores, one pass over the keys: each key row is read once and serves the whole group. */
        for (long s = 0; s < length; s++) {
            const float *key = keys + s * hs;
            /* Ask for the key row 16 ahead and this position's value row: the loads that follow a
             * task's jump to new memory otherwise wait on it (2x slower with a cache not in L3). */
            for (long line = 0; line < hs; line += 16) {
                __builtin_prefetch(key + 16 * hs + line);
                __builtin_prefetch(values + s * hs + line);
            }
            int masked = ok && !ok[s] && s != length - 1;
            for (long j = 0; j < group; j++) {
                const float *query = queries + j * hs;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (long i = 0; i < hs; i++) dot += query[i] * key[i];
                scores[j * length + s] = masked ? -INFINITY : dot * scale;
            }
        }
        /* Softmax of each head's scores, normalised in place. */
        for (long j = 0; j < group; j++) {
            float *row = scores + j * length, best = -INFINITY, total = 0.0f;
            for (long s = 0; s < length; s++) best = row[s] > best ? row[s] : best;
#pragma omp simd reduction(+ : total)
            for (long s = 0; s < length; s++) {
                row[s] = exp_f32(row[s] - best);
                total += row[s];
            }
            for (long s = 0; s < length; s++) row[s] /= total;
        }
        /* Weighted values, one pass over them. */
        for (long i = 0; i < group * hs; i++) out[i] = 0.0f;
        for (long s = 0; s < length; s++) {
            const float *value = values + s * hs;
            for (long j = 0; j < group; j++) {
                float weight = scores[j * length + s];
#pragma omp simd
                for (long i = 0; i < hs; i++) out[j * hs + i] += weight * value[i];
            }
        }
    }
}

/* ---- Training: forward and backward of RMSNorm and SwiGLU, one pass over memory each ----
 * Each comes in float32 (`_f32`, type float) and bfloat16 (`_bf16`, stored as uint16_t); arithmetic is
 * float32 either way, rounded once on the store (bf16: to nearest even, as PyTorch rounds). Rows are
 * split across `threads` OpenMP threads. */

static inline float load_f32(const float *p, long i) { return p[i]; }
static inline void store_f32(float *p, long i, float v) { p[i] = v; }
static inline float load_bf16(const uint16_t *p, long i) {
    uint32_t bits = (uint32_t)p[i] << 16;
    float v;
    __builtin_memcpy(&v, &bits, sizeof v);
    return v;
}
static inline void store_bf16(uint16_t *p, long i, float v) {
    uint32_t bits;
    __builtin_memcpy(&bits, &v, sizeof bits);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    p[i] = (uint16_t)(v != v ? 0x7fc0u : rounded); /* NaN stays NaN */
}

/* RMSNorm forward, optionally after a residual add: with d non-NULL, s = x + d is written (rounded to
 * the storage type) and normalised, else s = x. rstd = 1 / sqrt(mean(s^2) + eps) per row (kept for the
 * backward, float32), y = s * rstd * w.  x, d, s, y: (rows, n); w: (n); rstd: (rows). */
#define RMS_NORM_FORWARD(SUFFIX, T)                                                                              \
    void aigc_rms_norm_forward_##SUFFIX(const T *restrict x, const T *restrict d, const T *restrict w,         \
                                         T *restrict s, T *restrict y, float *restrict rstd, long rows, long n, \
                                         float eps, int threads) {                                             \
        _Pragma("omp parallel for schedule(static) num_threads(threads)") for (long r = 0; r < rows; r++) {    \
            const T *xr = x + r * n;                                                                           \
            T *yr = y + r * n;                                                                                 \
            if (d) {                                                                                           \
                const T *dr = d + r * n;                                                                       \
                T *sr = s + r * n;                                                                             \
                _Pragma("omp simd") for (long i = 0; i < n; i++)                                               \
                    store_##SUFFIX(sr, i, load_##SUFFIX(xr, i) + load_##SUFFIX(dr, i));                        \
                xr = sr;                                                                                       \
            }                                                                                                  \
            float sum = 0.0f;                                                                                  \
            _Pragma("omp simd reduction(+ : sum)") for (long i = 0; i < n; i++) {                              \
                float v = load_##SUFFIX(xr, i);                                                                \
                sum += v * v;                                                                                  \
            }                                                                                                  \
            float scale = 1.0f / sqrtf(sum / (float)n + eps);                                                  \
            rstd[r] = scale;                                                                                   \
            _Pragma("omp simd") for (long i = 0; i < n; i++)                                                   \
                store_##SUFFIX(yr, i, load_##SUFFIX(xr, i) * scale * load_##SUFFIX(w, i));                     \
        }                                                                                                      \
    }

/* RMSNorm backward for the input: gx = rstd * (g w - x rstd^2 mean(g w x)) + g_res, where g_res (the
 * gradient that reaches x by the residual path) may be NULL.  x, g, g_res, gx: (rows, n). */
#define RMS_NORM_BACKWARD(SUFFIX, T)                                                                             \
    void aigc_rms_norm_backward_##SUFFIX(const T *restrict x, const T *restrict w, const float *restrict rstd, \
                                          const T *restrict g, const T *restrict g_res, T *restrict gx,        \
                                          long rows, long n, int threads) {                                    \
        _Pragma("omp parallel for schedule(static) num_threads(threads)") for (long r = 0; r < rows; r++) {    \
            const T *xr = x + r * n, *gr = g + r * n;                                                          \
            T *out = gx + r * n;                                                                               \
            float dot = 0.0f, s = rstd[r];                                                                     \
            _Pragma("omp simd reduction(+ : dot)") for (long i = 0; i < n; i++)                                \
                dot += load_##SUFFIX(gr, i) * load_##SUFFIX(w, i) * load_##SUFFIX(xr, i);                      \
            float c = dot * s * s / (float)n;                                                                  \
            if (g_res) {                                                                                       \
                const T *res = g_res + r * n;                                                                  \
                _Pragma("omp simd") for (long i = 0; i < n; i++) {                                             \
                    float gw = load_##SUFFIX(gr, i) * load_##SUFFIX(w, i);                                     \
                    store_##SUFFIX(out, i, s * (gw - load_##SUFFIX(xr, i) * c) + load_##SUFFIX(res, i));       \
                }                                                                                              \
            } else {                                                                                           \
                _Pragma("omp simd") for (long i = 0; i < n; i++) {                                             \
                    float gw = load_##SUFFIX(gr, i) * load_##SUFFIX(w, i);                                     \
                    store_##SUFFIX(out, i, s * (gw - load_##SUFFIX(xr, i) * c));                               \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }

/* SwiGLU forward: y = silu(gate) * up for rows of h = [gate | up].  h: (rows, 2 hidden); y: (rows, hidden). */
#define SWIGLU_FORWARD(SUFFIX, T)                                                                                \
    void aigc_swiglu_forward_##SUFFIX(const T *restrict h, T *restrict y, long rows, long hidden, int threads) { \
        _Pragma("omp parallel for schedule(static) num_threads(threads)") for (long r = 0; r < rows; r++) {    \
            const T *gate = h + r * 2 * hidden, *up = gate + hidden;                                           \
            T *out = y + r * hidden;                                                                           \
            _Pragma("omp simd") for (long i = 0; i < hidden; i++) {                                            \
                float a = load_##SUFFIX(gate, i);                                                              \
                store_##SUFFIX(out, i, a / (1.0f + exp_f32(-a)) * load_##SUFFIX(up, i));                       \
            }                                                                                                  \
        }                                                                                                      \
    }

/* SwiGLU backward, silu recomputed: with s = sigmoid(gate), d gate = g up s (1 + gate (1 - s)) and
 * d up = g gate s.  h, gh: (rows, 2 hidden); g: (rows, hidden). */
#define SWIGLU_BACKWARD(SUFFIX, T)                                                                               \
    void aigc_swiglu_backward_##SUFFIX(const T *restrict h, const T *restrict g, T *restrict gh, long rows,    \
                                        long hidden, int threads) {                                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads)") for (long r = 0; r < rows; r++) {    \
            const T *gate = h + r * 2 * hidden, *up = gate + hidden, *gr = g + r * hidden;                     \
            T *out = gh + r * 2 * hidden;                                                                      \
            _Pragma("omp simd") for (long i = 0; i < hidden; i++) {                                            \
                float a = load_##SUFFIX(gate, i), u = load_##SUFFIX(up, i), d = load_##SUFFIX(gr, i);          \
                float s = 1.0f / (1.0f + exp_f32(-a));                                                         \
                store_##SUFFIX(out, i, d * u * s * (1.0f + a * (1.0f - s)));                                   \
                store_##SUFFIX(out, hidden + i, d * a * s);                                                    \
            }                                                                                                  \
        }                                                                                                      \
    }

RMS_NORM_FORWARD(f32, float)
RMS_NORM_FORWARD(bf16, uint16_t)
RMS_NORM_BACKWARD(f32, float)
RMS_NORM_BACKWARD(bf16, uint16_t)
SWIGLU_FORWARD(f32, float)
SWIGLU_FORWARD(bf16, uint16_t)
SWIGLU_BACKWARD(f32, float)
SWIGLU_BACKWARD(bf16, uint16_t)

/* Rotary positions for training, with the layout change that attention needs: qkv (B, T, (H + 2 G) D)
 * holds each token's H query heads, G key heads, G value heads; q (B, H, T, D), k and v (B, G, T, D)
 * receive the rotated queries and keys and the values. Hugging Face Llama's layout: pair (i, i + D/2)
 * turns by the angle of position t; cos, sin: (T, D) float32. */
#define QKV_ROTARY(SUFFIX, T)                                                                                    \
    void aigc_qkv_rotary_##SUFFIX(const T *restrict qkv, const float *restrict cos, const float *restrict sin, \
                                   T *restrict q, T *restrict k, T *restrict v, long B, long n, long H, long G, \
                                   long D, int threads) {                                                      \
        long half = D / 2, width = (H + 2 * G) * D;                                                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads)") for (long bt = 0; bt < B * n; bt++) { \
            long b = bt / n, t = bt % n;                                                                       \
            const float *c = cos + t * D, *s = sin + t * D;                                                    \
            for (long head = 0; head < H + 2 * G; head++) {                                                    \
                const T *x = qkv + bt * width + head * D;                                                      \
                T *out = head < H       ? q + ((b * H + head) * n + t) * D                                     \
                         : head < H + G ? k + ((b * G + head - H) * n + t) * D                                 \
                                        : v + ((b * G + head - H - G) * n + t) * D;                            \
                if (head >= H + G) {                                                                           \
                    _Pragma("omp simd") for (long i = 0; i < D; i++) out[i] = x[i];                            \
                    continue;                                                                                  \
                }                                                                                              \
                _Pragma("omp simd") for (long i = 0; i < half; i++) {                                          \
                    float first = load_##SUFFIX(x, i), second = load_##SUFFIX(x, i + half);                    \
                    store_##SUFFIX(out, i, first * c[i] - second * s[i]);                                      \
                    store_##SUFFIX(out, i + half, second * c[i + half] + first * s[i + half]);                 \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }

/* The backward of `aigc_qkv_rotary`: the inverse rotation of the query and key gradients and the value
 * gradients, written back into one (B, T, (H + 2 G) D) gradient of qkv. */
#define QKV_ROTARY_BACKWARD(SUFFIX, T)                                                                           \
    void aigc_qkv_rotary_backward_##SUFFIX(const T *restrict gq, const T *restrict gk, const T *restrict gv,   \
                                            const float *restrict cos, const float *restrict sin,              \
                                            T *restrict gqkv, long B, long n, long H, long G, long D,          \
                                            int threads) {                                                     \
        long half = D / 2, width = (H + 2 * G) * D;                                                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads)") for (long bt = 0; bt < B * n; bt++) { \
            long b = bt / n, t = bt % n;                                                                       \
            const float *c = cos + t * D, *s = sin + t * D;                                                    \
            for (long head = 0; head < H + 2 * G; head++) {                                                    \
                T *out = gqkv + bt * width + head * D;                                                         \
                const T *g = head < H       ? gq + ((b * H + head) * n + t) * D                                \
                             : head < H + G ? gk + ((b * G + head - H) * n + t) * D                            \
                                            : gv + ((b * G + head - H - G) * n + t) * D;                       \
                if (head >= H + G) {                                                                           \
                    _Pragma("omp simd") for (long i = 0; i < D; i++) out[i] = g[i];                            \
                    continue;                                                                                  \
                }                                                                                              \
                _Pragma("omp simd") for (long i = 0; i < half; i++) {                                          \
                    float first = load_##SUFFIX(g, i), second = load_##SUFFIX(g, i + half);                    \
                    store_##SUFFIX(out, i, first * c[i] + second * s[i + half]);                               \
                    store_##SUFFIX(out, i + half, second * c[i + half] - first * s[i]);                        \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }

QKV_ROTARY(f32, float)
QKV_ROTARY(bf16, uint16_t)
QKV_ROTARY_BACKWARD(f32, float)
QKV_ROTARY_BACKWARD(bf16, uint16_t)
