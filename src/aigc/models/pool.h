/* pool.c: run task(ctx, begin, end) over [0, n) in chunks of `chunk` on up to `threads` threads (the caller
 * included). `linger`: 1 where another job follows soon (a decode step's products), so idle workers spin
 * for it; 0 where PyTorch computes next (a prefill's expanded tiles), so they sleep at once and leave it the cores. */
#ifndef AIGC_POOL_H
#define AIGC_POOL_H

typedef void (*pool_task)(void *ctx, long begin, long end);

void pool_run(pool_task task, void *ctx, long n, long chunk, int threads, int linger);

#endif
