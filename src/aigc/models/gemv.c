/* Float32 products of one or two input rows with a row-major weight: y = x W^T + b.
 *
 * Compiled on the user's machine by aigc/models/gemv.py (-O3 -march=native -fopenmp), so the
 * compiler vectorises the inner loop for whatever this CPU has (AVX2, AVX-512, NEON). Decoding one
 * row is bound by how fast the weights stream from memory: each weight row is read once, in order,
 * while the (tiny) input rows stay in L1. The output rows are split across `threads` OpenMP threads.
 *
 * w: (n_out, n_in) row-major, x: (n_rows, n_in), b: (n_out) or NULL, y: (n_rows, n_out).
 */
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
