/* pool.c: run task(ctx, begin, end) over [0, n) in chunks of `chunk` on up to `threads` threads (the caller included). */
#ifndef AIGC_POOL_H
#define AIGC_POOL_H

typedef void (*pool_task)(void *ctx, long begin, long end);

void pool_run(pool_task task, void *ctx, long n, long chunk, int threads);

#endif
