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
#include <stdio.h>
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

/* ---- the boundary: every length, stride, index range and table size checked before a kernel runs ---- */

static thread_local char last_error[256];
// memory accounting (see sa_alloc below): bytes held, the cap, the test hook, the size that last failed
static std::atomic<int64_t> mem_held{0}, mem_max{INT64_MAX}, fail_after{-1}, mem_failed{0};
const char *sa_last_error(void) { return last_error; }

#define FAIL(...) do { snprintf(last_error, sizeof last_error, __VA_ARGS__); return false; } while (0)

static const int64_t POS_MAX = (int64_t)1 << 60;  // positions, window sides: sums of a few never overflow int64
static const int64_t DIM_MAX = (int64_t)1 << 40;

static bool mul_ok(int64_t a, int64_t b, int64_t *r) { return !__builtin_mul_overflow(a, b, r); }

/* elements a strided 4-D view of sizes n reads from its pointer: 0 if any size is 0, else 1 + max offset */
static bool span4(const char *what, const int64_t n[4], const int64_t s[4], int64_t have, const void *ptr) {
    for (int d = 0; d < 4; d++) if (n[d] == 0) return true;
    int64_t top = 0;
    for (int d = 0; d < 4; d++) {
        int64_t t;
        if (s[d] < 0) FAIL("%s: stride %d is negative (%lld)", what, d, (long long)s[d]);
        if (!mul_ok(n[d] - 1, s[d], &t) || __builtin_add_overflow(top, t, &top))
            FAIL("%s: strides overflow int64", what);
    }
    if (!ptr) FAIL("%s: NULL data for a non-empty view", what);
    if (top >= have)
        FAIL("%s: reads element %lld of %lld allocated", what, (long long)top, (long long)have);
    return true;
}

static bool count_ok(const char *what, const void *ptr, int64_t need, int64_t have) {
    if (need <= 0) return true;
    if (!ptr) FAIL("%s: NULL buffer for %lld elements", what, (long long)need);
    if (need > have) FAIL("%s: needs %lld elements, %lld allocated", what, (long long)need, (long long)have);
    return true;
}

/* a position range [p0, p0 + n) indexed with stride st into a table of `have` elements at offset base */
static bool pos_ok(const char *what, int64_t base, int64_t p0, int64_t n, int64_t st, int64_t have, const void *ptr) {
    if (n == 0) return true;
    if (!ptr) FAIL("%s: NULL table", what);
    if (st < 0) FAIL("%s: negative stride", what);
    if (st > 0 && p0 < 0) FAIL("%s: position %lld is negative", what, (long long)p0);
    int64_t t;
    if (!mul_ok(p0 + n - 1, st, &t) || __builtin_add_overflow(base, t, &t)) FAIL("%s: index overflows int64", what);
    if (t >= have) FAIL("%s: reads element %lld of %lld allocated", what, (long long)t, (long long)have);
    return true;
}

int sa_prog_depth(const sa_params *p) {
    int top = 0, depth = 1;
    for (int t = 0; t < p->n_prog; t++) {
        top += p->prog[t] >= 0 ? 1 : p->prog[t] == SA_OP_NOT ? 0 : -1;
        depth = top > depth ? top : depth;
    }
    return depth;
}

static bool check_mask(const sa_params *p, int64_t nqb, int64_t nkb) {
    if (p->n_atoms < 0 || p->n_prog < 0) FAIL("mask: negative atom or program count");
    if (p->classes && p->n_prog == 0) FAIL("mask: tile classes without a program");
    if (p->n_prog == 0) return true;
    // an empty tile grid (no keys) has no classes to point to; any other masked call needs them
    if (!p->classes && p->B > 0 && p->Hq > 0 && nqb > 0 && nkb > 0) FAIL("mask: a program without tile classes");
    if (!p->atoms || !p->prog || p->n_atoms == 0) FAIL("mask: a program without atoms");
    int top = 0;
    for (int t = 0; t < p->n_prog; t++) {
        const int32_t op = p->prog[t];
        if (op >= 0) {
            if (op >= p->n_atoms) FAIL("mask program[%d] pushes atom %d of %d", t, op, p->n_atoms);
            top++;
        } else if (op == SA_OP_NOT) {
            if (top < 1) FAIL("mask program[%d]: 'not' on an empty stack", t);
        } else if (op == SA_OP_AND || op == SA_OP_OR) {
            if (top < 2) FAIL("mask program[%d]: 'and'/'or' needs two operands, stack holds %d", t, top);
            top--;
        } else FAIL("mask program[%d]: unknown op %d", t, op);
    }
    if (top != 1) FAIL("mask program leaves %d values on the stack (expected 1)", top);
    const int64_t cn[4] = {p->B, p->Hq, nqb, nkb};
    if (!span4("mask tile classes", cn, p->cls_s, p->cls_n, p->classes)) return false;
    for (int a = 0; a < p->n_atoms; a++) {
        const sa_atom &at = p->atoms[a];
        if (at.q0 < -POS_MAX || at.q0 > POS_MAX || at.k0 < -POS_MAX || at.k0 > POS_MAX)
            FAIL("mask atom %d: positions (%lld, %lld) beyond +-2^60", a, (long long)at.q0, (long long)at.k0);
        if (p->B == 0 || p->Nq == 0 || p->Nk == 0) continue;  // never evaluated
        const int64_t bl = p->B - 1;
        int64_t base, base2;
        switch (at.kind) {
        case SA_CAUSAL: break;
        case SA_WINDOW:
            if (at.left < -POS_MAX || at.left > POS_MAX || at.right < -POS_MAX || at.right > POS_MAX)
                FAIL("mask atom %d: window sides (%lld, %lld) beyond +-2^60", a, (long long)at.left, (long long)at.right);
            break;
        case SA_PAD_LEN: case SA_PREFIX:
            if (!pos_ok("mask lengths", 0, 0, p->B, at.ia_sb, at.ia_n, at.ia)) return false;
            break;
        case SA_DOCUMENT:
            if (!mul_ok(bl, at.ia_sb, &base) || !mul_ok(bl, at.ib_sb, &base2) || at.ia_sb < 0 || at.ib_sb < 0)
                FAIL("mask atom %d: bad batch strides", a);
            if (!pos_ok("document ids (queries)", base, at.q0, p->Nq, at.ia_sn, at.ia_n, at.ia)) return false;
            if (!pos_ok("document ids (keys)", base2, at.k0, p->Nk, at.ib_sn, at.ib_n, at.ib)) return false;
            break;
        case SA_PAD_KEEP:
            if (!mul_ok(bl, at.u8_s[0], &base) || at.u8_s[0] < 0) FAIL("mask atom %d: bad batch stride", a);
            if (!pos_ok("key-padding keep mask", base, at.k0, p->Nk, at.u8_s[3], at.u8_n, at.u8)) return false;
            break;
        case SA_DENSE: {
            const int64_t n[4] = {p->B, p->Hq, p->Nq, p->Nk};
            if ((at.u8_s[2] > 0 && at.q0 < 0) || (at.u8_s[3] > 0 && at.k0 < 0))
                FAIL("mask atom %d: dense mask read at a negative position", a);
            const int64_t off = (at.u8_s[2] ? at.q0 : 0), offk = (at.u8_s[3] ? at.k0 : 0);
            int64_t o1, o2;
            if (!mul_ok(off, at.u8_s[2], &o1) || !mul_ok(offk, at.u8_s[3], &o2) || __builtin_add_overflow(o1, o2, &o1) ||
                o1 > at.u8_n)
                FAIL("mask atom %d: dense mask positions beyond its table", a);
            if (!span4("dense mask", n, at.u8_s, at.u8_n - o1, at.u8)) return false;
            break;
        }
        default: FAIL("mask atom %d: unknown kind %d", a, at.kind);
        }
    }
    return true;
}

static bool check(const sa_params *p, bool bwd) {
    if (p->dtype < SA_F32 || p->dtype > SA_F16) FAIL("dtype code %d", p->dtype);
    const int64_t dims[7] = {p->B, p->Hq, p->Hkv, p->Nq, p->Nk, p->D, p->Dv};
    for (int d = 0; d < 7; d++)
        if (dims[d] < 0 || dims[d] > DIM_MAX) FAIL("dimension %d is %lld (expected 0..2^40)", d, (long long)dims[d]);
    if (p->Hq > 0 && (p->Hkv < 1 || p->Hq % p->Hkv != 0))
        FAIL("Hq=%lld is not a multiple of Hkv=%lld", (long long)p->Hq, (long long)p->Hkv);
    if (p->bq < 1 || p->bk < 1 || p->bq > (1 << 16) || p->bk > (1 << 16))
        FAIL("tile sizes (%lld, %lld) outside 1..65536", (long long)p->bq, (long long)p->bk);
    if (p->nthreads < 1) FAIL("nthreads %d", p->nthreads);
    if (!(p->dropout_p >= 0.0 && p->dropout_p < 1.0)) FAIL("dropout_p %g outside [0, 1)", p->dropout_p);
    if (p->q_pos0 < -POS_MAX || p->q_pos0 > POS_MAX || p->k_pos0 < -POS_MAX || p->k_pos0 > POS_MAX)
        FAIL("global positions (%lld, %lld) beyond +-2^60", (long long)p->q_pos0, (long long)p->k_pos0);
    int64_t rows, t;
    if (!mul_ok(p->B, p->Hq, &rows) || !mul_ok(rows, p->Nq, &rows)) FAIL("B*Hq*Nq overflows");
    const int64_t nq[4] = {p->B, p->Hq, p->Nq, p->D}, nk[4] = {p->B, p->Hkv, p->Nk, p->D};
    const int64_t nv[4] = {p->B, p->Hkv, p->Nk, p->Dv}, no[4] = {p->B, p->Hq, p->Nq, p->Dv};
    if (!span4("q", nq, p->sq, p->q_n, p->q) || !span4("k", nk, p->sk, p->k_n, p->k) ||
        !span4("v", nv, p->sv, p->v_n, p->v))
        return false;
    if (!count_ok("lse", p->lse, rows, p->lse_n)) return false;
    if (!bwd && !span4("out", no, p->so, p->out_n, p->out)) return false;
    const int64_t nqb = (p->Nq + p->bq - 1) / p->bq, nkb = (p->Nk + p->bk - 1) / p->bk;
    if (p->bias) {
        const int64_t nb[4] = {p->B, p->Hq, p->Nq, p->Nk};
        if (!span4("bias", nb, p->sbias, p->bias_n, p->bias)) return false;
    }
    if (!check_mask(p, nqb, nkb)) return false;
    if (p->n_mods < 0 || p->n_mods > SA_MAX_MODS) FAIL("%d score modifiers (at most %d)", p->n_mods, SA_MAX_MODS);
    for (int m = 0; m < p->n_mods; m++) {
        const sa_mod &md = p->mods[m];
        if (md.kind == SA_MOD_SOFTCAP) {
            if (!(md.cap > 0.0)) FAIL("softcap %d: cap %g (expected > 0)", m, md.cap);
        } else if (md.kind == SA_MOD_DIST) {
            // read at h * ndist + (j - i) - dmin for j - i in [-(Nq - 1), Nk - 1]
            if (p->Nq > 0 && p->Nk > 0 && (p->dmin > -(p->Nq - 1) || (p->Nk - 1) - p->dmin >= p->ndist))
                FAIL("modifier %d: distance table [%lld, %lld) does not cover -(Nq-1)..Nk-1", m, (long long)p->dmin,
                     (long long)(p->dmin + p->ndist));
            if (!mul_ok(p->Hq, p->ndist, &t) || !count_ok("modifier distance table", md.dist, t, md.dist_n)) return false;
            if (md.grad) {
                if (!mul_ok(p->B * p->Hq, nqb, &t) || !mul_ok(t, p->ndist, &t) ||
                    !count_ok("modifier gradient buffer", md.dgrad, t, md.dgrad_n))
                    return false;
            }
        } else FAIL("modifier %d: unknown kind %d", m, md.kind);
    }
    if (!bwd) return true;
    if (!span4("grad_out", no, p->sdo, p->dout_n, p->dout) || !span4("out", no, p->sout, p->o_n, p->o)) return false;
    int64_t nqd, nkd, nkv;
    if (!mul_ok(rows, p->D, &nqd) || !mul_ok(p->B * p->Hkv, p->Nk, &nkd) || !mul_ok(nkd, p->Dv, &nkv) ||
        !mul_ok(nkd, p->D, &nkd))
        FAIL("gradient sizes overflow");
    if ((p->dq && !count_ok("dq", p->dq, nqd, p->dq_n)) || (p->dk && !count_ok("dk", p->dk, nkd, p->dk_n)) ||
        (p->dv && !count_ok("dv", p->dv, nkv, p->dv_n)))
        return false;
    if (p->dbias_buf) {
        if (!(p->dbias_heads == 1 || p->dbias_heads == p->Hq) || !(p->dbias_rows == 1 || p->dbias_rows == p->Nq) ||
            !(p->dbias_cols == 1 || p->dbias_cols == p->Nk))
            FAIL("bias gradient layout (%d, %lld, %lld)", p->dbias_heads, (long long)p->dbias_rows,
                 (long long)p->dbias_cols);
        const int64_t Hb = p->dbias_heads == 1 ? p->Hkv : p->Hq, Rb = p->dbias_rows == 1 ? nqb : p->Nq;
        if (!mul_ok(p->B, Hb, &t) || !mul_ok(t, Rb, &t) || !mul_ok(t, p->dbias_cols, &t) ||
            !count_ok("bias gradient buffer", p->dbias_buf, t, p->dbias_n))
            return false;
    }
    return true;
}
#undef FAIL

/* p->isa: -1 = best for this CPU, else the one asked for (error -3 when this CPU cannot run it); -5: invalid */
static int pick(sa_params *p, bool bwd) {
    last_error[0] = 0;
    mem_failed.store(0);
    if (p->abi != SA_ABI_VERSION) return -4;
    if (!check(p, bwd)) return -5;
    int isa = p->isa < 0 ? sa_best_isa() : p->isa;
    if (isa > 3 || !isa_ok(isa)) return -3;
    p->isa = isa;
    return 0;
}

int sa_forward(sa_params *p) {
    int e = pick(p, false);
    if (e) return e;
    // avx512bf16 differs from avx512 only for bf16 forward calls (vdpbf16ps GEMMs)
    if (p->isa == 3) return p->dtype == SA_BF16 ? sa_avx512bf16::forward(p) : sa_avx512::forward(p);
    return p->isa == 2 ? sa_avx512::forward(p) : p->isa == 1 ? sa_avx2::forward(p) : sa_scalar::forward(p);
}

int sa_backward(sa_params *p) {
    int e = pick(p, true);
    if (e) return e;
    return p->isa >= 2 ? sa_avx512::backward(p) : p->isa == 1 ? sa_avx2::backward(p) : sa_scalar::backward(p);
}

/* Every buffer the kernel allocates goes through sa_alloc: 64-byte aligned, counted, and refused (NULL) past
 * SELFATTN_NATIVE_ARENA_MAX bytes held at once (arena slots, per-thread scratch and per-call buffers together;
 * read when the library loads; unset = no limit but the system's). A refused or failed allocation makes the call
 * return -2 after releasing what it took; native.py raises MemoryError with sa_last_error()'s text (the size). */

void *sa_alloc(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (bytes == 0) bytes = 64;
    if (fail_after.load(std::memory_order_relaxed) >= 0 && fail_after.fetch_sub(1) == 0) {  // test hook
        mem_failed.store((int64_t)bytes);
        return nullptr;
    }
    const int64_t now = mem_held.fetch_add((int64_t)bytes) + (int64_t)bytes;
    void *p = now > mem_max.load(std::memory_order_relaxed) || bytes > (size_t)INT64_MAX / 2 ? nullptr : aligned_alloc(64, bytes);
    if (!p) {
        mem_held.fetch_sub((int64_t)bytes);
        mem_failed.store((int64_t)bytes);
    }
    return p;
}

void sa_free(void *p, size_t bytes) {
    if (!p) return;
    free(p);
    bytes = (bytes + 63) / 64 * 64;
    mem_held.fetch_sub((int64_t)(bytes ? bytes : 64));
}

int sa_oom(void) {
    const long long max = (long long)mem_max.load();
    if (max == INT64_MAX)
        snprintf(last_error, sizeof last_error, "out of memory: an allocation of %lld bytes failed",
                 (long long)mem_failed.load());
    else
        snprintf(last_error, sizeof last_error,
                 "out of memory: an allocation of %lld bytes failed (SELFATTN_NATIVE_ARENA_MAX=%lld bytes)",
                 (long long)mem_failed.load(), max);
    return -2;
}

static std::atomic<int> trim_req{0};
int64_t sa_set_arena_max(int64_t bytes) {
    const int64_t old = mem_max.load();
    if (bytes >= 0) mem_max.store(bytes);
    else if (bytes == -1) mem_max.store(INT64_MAX);
    if (mem_max.load() < old) trim_req.store(1);  // met by the next call that holds the arena
    return old == INT64_MAX ? -1 : old;
}
int sa_arena_take_trim(void) { return trim_req.load(std::memory_order_relaxed) && trim_req.exchange(0); }

int64_t sa_fail_alloc_after(int64_t n) { return fail_after.exchange(n < 0 ? -1 : n); }
int64_t sa_mem_held(void) { return mem_held.load(); }

__attribute__((constructor)) static void sa_read_arena_max(void) {
    const char *e = getenv("SELFATTN_NATIVE_ARENA_MAX");
    if (!e || !*e) return;
    char *end = nullptr;
    const long long v = strtoll(e, &end, 10);
    if (end && *end == 0 && v >= 0) mem_max.store(v);
    else fprintf(stderr, "selfattn native: SELFATTN_NATIVE_ARENA_MAX=%s ignored (expected bytes, an integer >= 0)\n", e);
}

enum { ARENA_SLOTS = 32 };
static std::mutex arena_mu;
static void *arena_bufs[ARENA_SLOTS];
static size_t arena_sizes[ARENA_SLOTS];

int sa_arena_acquire(void) { return arena_mu.try_lock() ? 1 : 0; }
void sa_arena_release(void) { arena_mu.unlock(); }
void *sa_arena_buf(int slot, size_t bytes) {
    if (slot < 0 || slot >= ARENA_SLOTS) return nullptr;
    if (arena_sizes[slot] < bytes) {
        sa_free(arena_bufs[slot], arena_sizes[slot]);
        arena_bufs[slot] = nullptr;
        arena_sizes[slot] = 0;
        size_t n = (bytes + bytes / 4 + 63) / 64 * 64;  // 25% headroom: a slowly growing shape does not realloc
        void *b = sa_alloc(n);
        if (!b && n > (bytes + 63) / 64 * 64) b = sa_alloc(n = (bytes + 63) / 64 * 64);  // without the headroom
        if (!b) return nullptr;
        arena_bufs[slot] = b;
        arena_sizes[slot] = n;
        if (slot == 0) memset(b, 0, n);  // slot 0: Scratch records (tile.h)
    }
    return arena_bufs[slot];
}
void *sa_arena_peek(int slot, size_t bytes) {
    return slot >= 0 && slot < ARENA_SLOTS && arena_sizes[slot] >= bytes ? arena_bufs[slot] : nullptr;
}
/* after a failed call: give the call-wide slots (1..) back; slot 0's records are emptied by their owner */
void sa_arena_trim(void) {
    for (int s = 1; s < ARENA_SLOTS; s++) {
        sa_free(arena_bufs[s], arena_sizes[s]);
        arena_bufs[s] = nullptr;
        arena_sizes[s] = 0;
    }
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

/* The child of a fork() has only the forking thread. Whatever the parent's other threads held (the job lock, the
 * pool lock, a condition variable's internal state with waiters that do not exist here, the arena lock and its
 * half-updated vectors) is abandoned, not waited for: fresh objects are made in place and the old ones leaked
 * (a few hundred bytes and the arena's buffers, once per fork). Nothing here may block. */
void after_fork_child() {
    new (&pool->job_mu) std::mutex();
    new (&pool->mu) std::mutex();
    new (&pool->cv) std::condition_variable();
    new (&pool->done_cv) std::condition_variable();
    new (&pool->th) std::vector<pthread_t>();
    pool->active = 0;
    pool->want = 0;
    pool->closed = true;
    new (&arena_mu) std::mutex();
    memset(arena_bufs, 0, sizeof arena_bufs);
    memset(arena_sizes, 0, sizeof arena_sizes);
    mem_held.store(0);  // what the parent held is leaked here, not counted
}
}  // namespace

/* registered when the library is loaded, before any thread of ours exists */
__attribute__((constructor)) static void sa_register_atfork(void) { pthread_atfork(nullptr, nullptr, after_fork_child); }

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
        try {
            pool->th.reserve(nt - 1);  // push_back below then never allocates (nor throws across the C ABI)
        } catch (...) {
        }
        while ((int)pool->th.size() < nt - 1 && pool->th.size() < pool->th.capacity()) {
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
