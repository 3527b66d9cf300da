/* The C ABI between kernels/native.py (ctypes) and the native kernel: one parameter struct per call.
 *
 * Every tensor crosses as a data pointer plus element strides (int64, 0 on broadcast dims), so K/V caches and
 * transposed views are read in place. The layout of these structs is mirrored field for field by ctypes
 * Structures in kernels/native.py: change both together (sa_abi_version() guards against a stale library).
 *
 * The C side trusts nothing it is handed: every pointer comes with the number of elements allocated from it (the
 * *_n fields), and sa_forward / sa_backward check every length, stride, index range, program and table size
 * against those before the first load (an invalid call returns -5 and sa_last_error() says what was wrong).
 *
 * dtype codes: 0 float32, 1 float64, 2 bfloat16, 3 float16. The compute type is float64 for float64 inputs and
 * float32 otherwise; lse, delta, bias (converted by native.py), modifier tables and gradient buffers are in the
 * compute type.
 */
#pragma once
#include <stddef.h>
#include <stdint.h>

#define SA_ABI_VERSION 4

enum { SA_F32 = 0, SA_F64 = 1, SA_BF16 = 2, SA_F16 = 3 };

/* mask atoms (see kernels/native.py for the lowering); allowed(b, h, qp, kp) with qp = q0 + i, kp = k0 + j */
enum { SA_CAUSAL = 1, SA_WINDOW = 2, SA_PAD_LEN = 3, SA_PAD_KEEP = 4, SA_DOCUMENT = 5, SA_PREFIX = 6, SA_DENSE = 7 };
/* program ops (postfix): >= 0 pushes atom i; these combine the top of the stack */
enum { SA_OP_AND = -1, SA_OP_OR = -2, SA_OP_NOT = -3 };

typedef struct {
    int32_t kind;
    int32_t pad_;
    int64_t q0, k0;          /* global position of local query row 0 / local key 0 */
    int64_t left, right;     /* window */
    const int64_t *ia;       /* lengths / prefix (Bm,) | ids_q (Bq, Qtot) */
    int64_t ia_sb, ia_sn;    /* strides (batch, position); batch stride 0 broadcasts */
    const int64_t *ib;       /* ids_k (Bk, Ktot) */
    int64_t ib_sb, ib_sn;
    const uint8_t *u8;       /* pad_keep (Bm, Ktot) | dense (Bm, Hm, Qt, Kt) */
    int64_t u8_s[4];         /* strides (0 on broadcast dims); pad_keep uses [0] (batch) and [3] (key) */
    int64_t ia_n, ib_n, u8_n; /* elements allocated at ia / ib / u8 */
} sa_atom;

enum { SA_MOD_DIST = 1, SA_MOD_SOFTCAP = 2 };
#define SA_MAX_MODS 4

typedef struct {
    int32_t kind;
    int32_t grad;            /* DIST: write per-(head, distance) sums of dS at this op into dgrad */
    const void *dist;        /* DIST: (Hq, ndist) compute dtype, value at distance d = kp - qp is dist[h, d - dmin] */
    void *dgrad;             /* DIST grad: (B, Hq, nqb_bwd, ndist) compute dtype, per work item partials */
    double cap;              /* SOFTCAP */
    int64_t dist_n, dgrad_n; /* elements allocated at dist / dgrad */
} sa_mod;

typedef struct {
    int32_t abi;             /* SA_ABI_VERSION */
    int32_t dtype;
    int32_t nthreads;
    int32_t isa;             /* resolved by the library: 0 scalar, 1 avx2, 2 avx512 (written back) */
    int64_t B, Hq, Hkv, Nq, Nk, D, Dv;
    const void *q, *k, *v;
    int64_t sq[4], sk[4], sv[4];
    void *out;  int64_t so[4];
    void *lse;               /* (B, Hq, Nq) contiguous, compute dtype */
    double scale;
    /* tensor bias (compute dtype), strides 0 on broadcast dims; NULL if none */
    const void *bias; int64_t sbias[4];
    /* mask: NULL atoms = no mask */
    int32_t n_atoms, n_prog;
    const sa_atom *atoms;
    const int32_t *prog;
    const int8_t *classes;   /* (Bm, Hm, nqb, nkb) at block sizes (bq, bk); NULL = all FULL */
    int64_t cls_s[4];        /* strides, 0 on broadcast dims */
    int64_t bq, bk;          /* the kernel's tile sizes (native.py asks the mask for classes at these) */
    /* score modifiers, applied in order after the bias */
    int32_t n_mods, pad2_;
    sa_mod mods[SA_MAX_MODS];
    int64_t dmin, ndist;     /* distance range of the DIST tables */
    int64_t q_pos0, k_pos0;  /* global positions of query 0 / key 0 (modifier distances and dropout) */
    /* dropout */
    double dropout_p;
    uint32_t seed, pad3_;
    uint64_t drop_thresh;    /* keep iff hash >= drop_thresh (= llround(p * 2^32)) */
    /* backward */
    const void *dout; int64_t sdo[4];
    const void *o;    int64_t sout[4];   /* forward output (for delta) */
    void *dq; void *dk; void *dv;        /* contiguous (B,Hq,Nq,D) / (B,Hkv,Nk,D) / (B,Hkv,Nk,Dv), q's dtype; NULL = not needed */
    void *dbias_buf;                     /* see backward.cc: per-item partial dS sums, compute dtype; NULL = none */
    int64_t dbias_rows, dbias_cols;      /* 1 = reduced dim: rows Nq or 1 (then per q block), cols Nk or 1 */
    int32_t dbias_heads, pad4_;          /* Hq, or 1 (summed over the G heads of an item; buffer has Hkv) */
    /* elements allocated from each pointer above (for a view: from its first element to the storage's end) */
    int64_t q_n, k_n, v_n, out_n, lse_n, bias_n, cls_n, dout_n, o_n, dq_n, dk_n, dv_n, dbias_n;
} sa_params;

#define SA_API __attribute__((visibility("default")))
#ifdef __cplusplus
extern "C" {
#endif
SA_API int sa_abi_version(void);
SA_API const char *sa_isa_name(int isa);
SA_API int sa_best_isa(void);
SA_API int sa_forward(sa_params *p);
SA_API int sa_backward(sa_params *p);
SA_API const char *sa_last_error(void);  /* why the calling thread's last call returned -5 (invalid) or -2 (memory) */
/* memory: SELFATTN_NATIVE_ARENA_MAX (bytes, read at load) caps what the kernel holds at once (arena, scratch and
   per-call buffers); a call that would pass it returns -2 having released what it took. sa_set_arena_max sets the
   cap (-1: none; a lower one empties the arena at the next call) and returns the previous one (-1: none); sa_fail_alloc_after(n) makes the allocation n from now
   fail (a test hook; -1 off) and returns what was left of the previous count (-1: it fired or was off); sa_mem_held() is the bytes held now (arena and persistent scratch included). */
SA_API int64_t sa_set_arena_max(int64_t bytes);
SA_API int64_t sa_fail_alloc_after(int64_t n);
SA_API int64_t sa_mem_held(void);
/* 64-byte aligned, counted against the cap; NULL when refused or when the system has no memory. sa_free takes the
   size given to sa_alloc. sa_oom() writes the failed size into sa_last_error and returns -2. */
void *sa_alloc(size_t bytes);
void sa_free(void *p, size_t bytes);
int sa_oom(void);
void sa_arena_trim(void);
int sa_arena_take_trim(void);  /* 1 once after sa_set_arena_max lowered the cap: the holder empties the arena */
/* the mask program's stack depth (>= 1; checked by sa_forward / sa_backward before any kernel runs) */
int sa_prog_depth(const sa_params *p);
/* a process-wide arena (dispatch.cc): buffers kept between calls, so that large packs and per-thread scratch do
   not page-fault afresh every call. acquire() returns 1 when this call holds it (0: another call does; use
   malloc), buf() grows slot n (0..31) to at least `bytes` (64-byte aligned, contents undefined; NULL when the
   memory is refused). */
int sa_arena_acquire(void);
void sa_arena_release(void);
void *sa_arena_buf(int slot, size_t bytes);
void *sa_arena_peek(int slot, size_t bytes);  /* slot n if it holds >= bytes, else NULL (never allocates) */
/* the thread pool (dispatch.cc): fn(ctx, item, thread) for item in [0, n), items handed out in order */
void sa_parallel_for(int64_t n, int nthreads, void (*fn)(void *, int64_t, int), void *ctx);
#ifdef __cplusplus
}
#endif
