/* The worker threads of the quantised kernels (quant.c, qdot.c), instead of OpenMP's.
 *
 * Why not OpenMP: a parallel region ends at a barrier that waits for every thread of the team, so
 * when another busy process holds a core, each of a decode step's ~120 products waits for a
 * descheduled thread's next time slice: two threads decoded 0.7-1.3 tokens/s where one thread did
 * 9-13 (SmolLM2-135M Q4_1, 2-core Xeon, docs/benchmarks.md). Here the work is a row range cut into
 * chunks that threads claim one at a time; the caller claims chunks too and waits only for chunks
 * already claimed, never for a worker that has not woken: with a core taken, the caller does the
 * work alone at one thread's speed. Idle workers spin, then sleep on a futex (no CPU).
 *
 * How long to spin depends on the machine's load, so the pool measures it. On idle cores a long spin
 * (SPIN_LONG_NS) lets a worker take its share of each of a decode step's products, which come every
 * 50-200 us with Python in between: a futex wake-up arrives too late for most of them (SmolLM2 Q4_1,
 * 2 threads, idle 2-core Xeon: 67 tokens/s with a 20 us spin, 101-106 with 0.2-20 ms). Beside a busy
 * process a spinning worker takes the core the caller needs (same host, load 3-4: 20 us 40 tokens/s,
 * 2 ms 25). A spinning worker that sees its clock jump (PREEMPTED_NS between two looks) was
 * descheduled, i.e. the cores are oversubscribed: for the next CONTENDED_FOR_NS every worker spins only
 * SPIN_SHORT_NS, then tries the long spin again. AIGC_QUANT_SPIN_US fixes the spin instead. A job run
 * with `linger` 0 (a prefill's expanded tiles, which PyTorch's own threads multiply next) gets no spin:
 * its workers sleep at once rather than take the cores from PyTorch's GEMM.
 *
 * One job at a time: a second caller (another Python thread) that finds the pool busy runs its job
 * inline. A child process after fork() has no workers; the caller then does every chunk itself.
 */
#define _GNU_SOURCE
#include "pool.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define RELAX() _mm_pause()
#else
#define RELAX() ((void)0)
#endif

#define MAX_WORKERS 63
#define MAX_CHUNKS 0xffff /* the ticket holds a chunk index in 16 bits */
#define SPIN_LONG_NS 1000000L      /* idle cores: spin up to 1 ms */
#define SPIN_SHORT_NS 5000L        /* oversubscribed cores: 5 us, then sleep */
#define PREEMPTED_NS 200000L       /* a gap this long between two looks at the clock: descheduled */
#define CONTENDED_FOR_NS 1000000000L /* keep the short spin this long after a preemption */

static struct {
    _Atomic uint64_t ticket;  /* job number (32 bits) | next chunk (16) | chunks (16) */
    _Atomic uint32_t bell;    /* rung once per job: the futex idle workers sleep on */
    _Atomic long done;        /* chunks of the current job finished */
    _Atomic int active;       /* workers the current job may use (threads - 1) */
    _Atomic int sleeping;     /* workers in futex_wait, so the caller skips the syscall when none */
    pool_task task;           /* the job: read by a worker only while it holds an unfinished chunk, */
    void *ctx;                /* when the caller cannot be writing the next job */
    long n, chunk;
    int started;              /* workers created; caller side, under run_lock */
    long fixed_spin_ns;       /* AIGC_QUANT_SPIN_US in ns, or -1 (adaptive); set before the first worker starts */
    _Atomic long contended_until; /* CLOCK_MONOTONIC ns: spin short until then */
    _Atomic int linger;       /* the current job's: spin after it (another comes soon) or sleep at once */
    uint32_t jobs;
    pthread_mutex_t run_lock;
} pool = {.run_lock = PTHREAD_MUTEX_INITIALIZER};

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Claim and run chunks of the current job until none is left. */
static void work(void) {
    for (;;) {
        uint64_t t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
        long next = (long)((t >> 16) & MAX_CHUNKS), total = (long)(t & MAX_CHUNKS);
        if (next >= total) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.ticket, &t, t + (1u << 16), memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        long begin = next * pool.chunk, end = begin + pool.chunk < pool.n ? begin + pool.chunk : pool.n;
        pool.task(pool.ctx, begin, end);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

/* How long a worker that has just finished a job may spin now. */
static long spin_budget(long now) {
    if (pool.fixed_spin_ns >= 0) return pool.fixed_spin_ns;
    return now < atomic_load_explicit(&pool.contended_until, memory_order_relaxed) ? SPIN_SHORT_NS : SPIN_LONG_NS;
}

static uint32_t wait_for_bell(uint32_t heard) {
    long start = now_ns(), last = start, budget = atomic_load(&pool.linger) ? spin_budget(start) : 0;
    for (int i = 1;; i++) {
        uint32_t bell = atomic_load(&pool.bell);
        if (bell != heard) return bell;
        if (i % 64 == 0) {
            long now = now_ns();
            if (now - last > PREEMPTED_NS && pool.fixed_spin_ns < 0) {
                atomic_store_explicit(&pool.contended_until, now + CONTENDED_FOR_NS, memory_order_relaxed);
                break;
            }
            if (now - start > budget) break;
            last = now;
        }
        RELAX();
    }
    atomic_fetch_add(&pool.sleeping, 1);
    uint32_t bell;
    /* futex_wait sleeps only while the bell still reads `heard`: a ring between the load and the call is not lost */
    while ((bell = atomic_load(&pool.bell)) == heard) syscall(SYS_futex, &pool.bell, FUTEX_WAIT_PRIVATE, heard, 0, 0, 0);
    atomic_fetch_sub(&pool.sleeping, 1);
    return bell;
}

static void *worker(void *arg) {
    int index = (int)(intptr_t)arg;
    uint32_t heard = atomic_load(&pool.bell);
    for (;;) {
        heard = wait_for_bell(heard);
        if (index < atomic_load(&pool.active)) work();
    }
    return 0;
}

static void start_workers(int wanted) {
    if (pool.started == 0) {
        const char *spin_us = getenv("AIGC_QUANT_SPIN_US");
        pool.fixed_spin_ns = spin_us && *spin_us ? 1000 * atol(spin_us) : -1;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (; pool.started < wanted; pool.started++) {
        pthread_t thread;
        if (pthread_create(&thread, &attr, worker, (void *)(intptr_t)pool.started) != 0) break;
    }
    pthread_attr_destroy(&attr);
}

void pool_run(pool_task task, void *ctx, long n, long chunk, int threads, int linger) {
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    if (threads <= 1 || n <= chunk || pthread_mutex_trylock(&pool.run_lock) != 0) {
        task(ctx, 0, n);
        return;
    }
    start_workers(threads - 1);
    if (chunk < (n + MAX_CHUNKS - 1) / MAX_CHUNKS) chunk = (n + MAX_CHUNKS - 1) / MAX_CHUNKS;
    long total = (n + chunk - 1) / chunk;
    pool.task = task, pool.ctx = ctx, pool.n = n, pool.chunk = chunk;
    atomic_store(&pool.linger, linger);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.active, threads - 1);
    atomic_store_explicit(&pool.ticket, ((uint64_t)++pool.jobs << 32) | (uint64_t)total, memory_order_release);
    atomic_fetch_add(&pool.bell, 1);
    if (atomic_load(&pool.sleeping) > 0) syscall(SYS_futex, &pool.bell, FUTEX_WAKE_PRIVATE, threads - 1, 0, 0, 0);
    work();
    /* only chunks a worker has claimed are left: wait for them, yielding if that worker lost its core */
    for (int i = 1; atomic_load_explicit(&pool.done, memory_order_acquire) < total; i++) {
        if (i % 1024 == 0) sched_yield();
        RELAX();
    }
    pthread_mutex_unlock(&pool.run_lock);
}
