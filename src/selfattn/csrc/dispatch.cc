/* The C ABI (declared in abi.h) and what every instruction set shares: run-time ISA choice and the thread pool.
 * Compiled for the compiler's baseline target only; forward.cc / backward.cc are compiled three times (see
 * scripts/build-native.sh) into namespaces sa_scalar, sa_avx2 and sa_avx512, and the one chosen here on the
 * running CPU (__builtin_cpu_supports) is called. Nothing is hard-wired at build time: a library built on an
 * AVX-512 machine runs its AVX2 or portable path on another CPU.
 *
 * Threads: a persistent pool (below), items handed out by an atomic counter. native.py holds a process-wide
 * lock around calls, so concurrent Python threads queue instead of oversubscribing the cores.
 */
#include <atomic>
#include <condition_variable>
#include <new>
#include <pthread.h>
#include <mutex>
#include <stdlib.h>
#include <string.h>
#include <thread>
#include <vector>

#include "abi.h"

namespace sa_scalar { int forward(sa_params *); int backward(sa_params *); }
namespace sa_avx2 { int forward(sa_params *); int backward(sa_params *); }
namespace sa_avx512 { int forward(sa_params *); int backward(sa_params *); }
namespace sa_avx512bf16 { int forward(sa_params *); }

extern "C" {

int sa_abi_version(void) { return SA_ABI_VERSION; }

const char *sa_isa_name(int isa) {
    return isa == 3 ? "avx512bf16" : isa == 2 ? "avx512" : isa == 1 ? "avx2" : "scalar";
}

static bool isa_ok(int isa) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (isa == 3) return isa_ok(2) && __builtin_cpu_supports("avx512bf16");
    if (isa == 2)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (isa == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    return isa == 0;
}

int sa_best_isa(void) { return isa_ok(3) ? 3 : isa_ok(2) ? 2 : isa_ok(1) ? 1 : 0; }

/* p->isa: -1 = best for this CPU, else the one asked for (error -3 when this CPU cannot run it) */
static int pick(sa_params *p) {
    if (p->abi != SA_ABI_VERSION) return -4;
    int isa = p->isa < 0 ? sa_best_isa() : p->isa;
    if (isa > 3 || !isa_ok(isa)) return -3;
    p->isa = isa;
    return 0;
}

int sa_forward(sa_params *p) {
    int e = pick(p);
    if (e) return e;
    // avx512bf16 differs from avx512 only for bf16 forward calls (vdpbf16ps GEMMs)
    if (p->isa == 3) return p->dtype == SA_BF16 ? sa_avx512bf16::forward(p) : sa_avx512::forward(p);
    return p->isa == 2 ? sa_avx512::forward(p) : p->isa == 1 ? sa_avx2::forward(p) : sa_scalar::forward(p);
}

int sa_backward(sa_params *p) {
    int e = pick(p);
    if (e) return e;
    return p->isa >= 2 ? sa_avx512::backward(p) : p->isa == 1 ? sa_avx2::backward(p) : sa_scalar::backward(p);
}

static std::mutex arena_mu;
static std::vector<void *> arena_bufs;
static std::vector<size_t> arena_sizes;

int sa_arena_acquire(void) { return arena_mu.try_lock() ? 1 : 0; }
void sa_arena_release(void) { arena_mu.unlock(); }
void *sa_arena_buf(int slot, size_t bytes) {
    if ((int)arena_bufs.size() <= slot) { arena_bufs.resize(slot + 1, nullptr); arena_sizes.resize(slot + 1, 0); }
    if (arena_sizes[slot] < bytes) {
        free(arena_bufs[slot]);
        size_t n = (bytes + bytes / 4 + 63) / 64 * 64;  // 25% headroom: a slowly growing shape does not realloc
        arena_bufs[slot] = aligned_alloc(64, n);
        arena_sizes[slot] = arena_bufs[slot] ? n : 0;
        if (slot == 0 && arena_bufs[0]) memset(arena_bufs[0], 0, n);  // slot 0: Scratch records (tile.h)
    }
    return arena_bufs[slot];
}

/* The pool: worker threads made on first use and kept (a thread per call cost ~30-50 us: more than a whole
 * decode step). One job at a time (job_mu); the caller works as thread 0; workers 1..nt-1 take items from the
 * shared counter. After fork() the child starts with no workers (they do not exist there). */
namespace {
struct Pool {
    std::mutex job_mu;          // one parallel_for at a time
    std::mutex mu;              // guards the fields below
    std::condition_variable cv, done_cv;
    std::vector<pthread_t> th;
    uint64_t gen = 0;           // job generation: workers run each new one once
    int want = 0;               // workers (1..want) that take part in the current job
    int active = 0;             // workers running the current job's items
    bool closed = true;         // the caller has finished its share: late workers skip the job
    void (*fn)(void *, int64_t, int) = nullptr;
    void *ctx = nullptr;
    int64_t n = 0;
    std::atomic<int64_t> next{0};
};
Pool *pool = new Pool();  // never destroyed: workers may outlive static destruction at exit

void run_items(int tid) {
    for (;;) {
        int64_t it = pool->next.fetch_add(1, std::memory_order_relaxed);
        if (it >= pool->n) break;
        pool->fn(pool->ctx, it, tid);
    }
}

void *worker_main(void *arg) {
    const int idx = (int)(intptr_t)arg;  // 1-based thread id
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(pool->mu);
    for (;;) {
        pool->cv.wait(lk, [&] { return pool->gen != seen; });
        seen = pool->gen;
        if (idx > pool->want || pool->closed) continue;  // not needed, or too late to help
        pool->active++;
        lk.unlock();
        run_items(idx);
        lk.lock();
        if (--pool->active == 0) pool->done_cv.notify_one();
    }
    return nullptr;
}

void after_fork_child() {  // the workers did not come along: forget them
    new (&pool->job_mu) std::mutex();
    new (&pool->mu) std::mutex();
    pool->th.clear();
    pool->active = 0;
    pool->closed = true;
}
}  // namespace

void sa_parallel_for(int64_t n, int nthreads, void (*fn)(void *, int64_t, int), void *ctx) {
    if (n <= 0) return;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > n) nt = (int)n;
    if (nt == 1) {
        for (int64_t it = 0; it < n; it++) fn(ctx, it, 0);
        return;
    }
    std::lock_guard<std::mutex> job(pool->job_mu);
    {
        std::unique_lock<std::mutex> lk(pool->mu);
        static bool atfork = false;
        if (!atfork) { pthread_atfork(nullptr, nullptr, after_fork_child); atfork = true; }
        while ((int)pool->th.size() < nt - 1) {
            pthread_t t;
            if (pthread_create(&t, nullptr, worker_main, (void *)(intptr_t)(pool->th.size() + 1)) != 0) break;
            pool->th.push_back(t);
        }
        if ((int)pool->th.size() < nt - 1) nt = (int)pool->th.size() + 1;  // could not make more threads
        pool->fn = fn;
        pool->ctx = ctx;
        pool->n = n;
        pool->next.store(0);
        pool->want = nt - 1;
        pool->active = 0;
        pool->closed = false;
        pool->gen++;
    }
    pool->cv.notify_all();
    run_items(0);
    // every item is taken; wait only for workers still inside one (a worker that wakes later skips the job)
    std::unique_lock<std::mutex> lk(pool->mu);
    pool->closed = true;
    pool->done_cv.wait(lk, [] { return pool->active == 0; });
}

}  // extern "C"
