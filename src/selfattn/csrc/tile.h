/* What the forward, backward and decode passes share: the problem derived from sa_params, tile classes, the
 * mask evaluator for PARTIAL tiles, the per-element score pipeline (bias -> modifiers -> mask), the dropout
 * hash and the thread pool.
 *
 * Units: without score modifiers, scores are kept in log2 units (q is scaled by scale*log2(e) while it is
 * packed, the bias is multiplied by log2(e) as it is added) and softmax uses exp2; with modifiers (softcap is
 * not linear) the pipeline runs in natural units and converts to log2 at its end.
 */
#pragma once
#include <stdlib.h>
#include <type_traits>

#include "gemm.h"

namespace SA_NS {

constexpr double LOG2E = 1.4426950408889634;
constexpr double LN2 = 0.6931471805599453;
enum { CLS_EMPTY = 0, CLS_PARTIAL = 1, CLS_FULL = 2 };

struct Prob {
    const sa_params *p;
    int64_t B, Hq, Hkv, G, Nq, Nk, D, Dv, bq, bk, nqb, nkb;
    int dt;
    bool fold;        // log2 units from the start (no modifiers)
    bool post;        // bias or modifiers: the per-element pipeline runs on every tile
    bool dropout;
    double qmul;      // applied to q while packing: scale (natural units) or scale*log2e
    double bmul;      // applied to the bias: log2e when folded
    int64_t depth;    // the mask program's stack depth: mask_row's stack holds depth * nk bytes
    Prob(const sa_params *pp, int64_t bq_, int64_t bk_) : p(pp) {
        B = p->B; Hq = p->Hq; Hkv = p->Hkv; G = Hkv ? Hq / Hkv : 1; Nq = p->Nq; Nk = p->Nk; D = p->D; Dv = p->Dv;
        bq = bq_; bk = bk_;
        nqb = (Nq + bq - 1) / bq; nkb = (Nk + bk - 1) / bk;
        dt = p->dtype;
        fold = p->n_mods == 0;
        post = p->bias != nullptr || p->n_mods > 0;
        dropout = p->dropout_p > 0.0;
        qmul = fold ? p->scale * LOG2E : p->scale;
        bmul = fold ? LOG2E : 1.0;
        depth = p->n_prog > 0 ? sa_prog_depth(p) : 1;
    }
    int64_t qoff(int64_t b, int64_t h, int64_t i) const { return b * p->sq[0] + h * p->sq[1] + i * p->sq[2]; }
    int64_t koff(int64_t b, int64_t h, int64_t j) const { return b * p->sk[0] + h * p->sk[1] + j * p->sk[2]; }
    int64_t voff(int64_t b, int64_t h, int64_t j) const { return b * p->sv[0] + h * p->sv[1] + j * p->sv[2]; }

    /* class of the tile (q block qb, key block kb) for the G query heads of KV head hkv, batch b */
    int tile_class(int64_t b, int64_t hkv, int64_t qb, int64_t kb) const {
        if (!p->classes) return CLS_FULL;
        const int64_t *s = p->cls_s;
        const int8_t *c = p->classes + b * s[0] + qb * s[2] + kb * s[3];
        if (s[1] == 0) return c[0];
        bool all_empty = true, all_full = true;
        for (int64_t g = 0; g < G; g++) {
            int k = c[(hkv * G + g) * s[1]];
            all_empty &= k == CLS_EMPTY;
            all_full &= k == CLS_FULL;
        }
        return all_empty ? CLS_EMPTY : all_full ? CLS_FULL : CLS_PARTIAL;
    }
};

/* ---- mask evaluation for PARTIAL tiles ---- */

static inline void atom_row(const sa_atom &a, int64_t b, int64_t h, int64_t i, int64_t ks, int64_t nk, uint8_t *out) {
    const int64_t qp = a.q0 + i, k0 = a.k0 + ks;
    switch (a.kind) {
    case SA_CAUSAL:
        for (int64_t j = 0; j < nk; j++) out[j] = k0 + j <= qp;
        break;
    case SA_WINDOW:
        for (int64_t j = 0; j < nk; j++) out[j] = (k0 + j >= qp - a.left) & (k0 + j <= qp + a.right);
        break;
    case SA_PAD_LEN: {
        const int64_t L = a.ia[b * a.ia_sb];
        for (int64_t j = 0; j < nk; j++) out[j] = k0 + j < L;
        break;
    }
    case SA_PAD_KEEP: {
        const uint8_t *t = a.u8 + b * a.u8_s[0];
        for (int64_t j = 0; j < nk; j++) out[j] = t[(k0 + j) * a.u8_s[3]] != 0;
        break;
    }
    case SA_DOCUMENT: {
        const int64_t idq = a.ia[b * a.ia_sb + qp * a.ia_sn];
        const int64_t *ik = a.ib + b * a.ib_sb;
        for (int64_t j = 0; j < nk; j++) out[j] = ik[(k0 + j) * a.ib_sn] == idq;
        break;
    }
    case SA_PREFIX: {
        const int64_t L = a.ia[b * a.ia_sb];
        for (int64_t j = 0; j < nk; j++) out[j] = (k0 + j < L) | (k0 + j <= qp);
        break;
    }
    case SA_DENSE: {
        const uint8_t *t = a.u8 + b * a.u8_s[0] + h * a.u8_s[1] + qp * a.u8_s[2];
        for (int64_t j = 0; j < nk; j++) out[j] = t[(k0 + j) * a.u8_s[3]] != 0;
        break;
    }
    default:
        for (int64_t j = 0; j < nk; j++) out[j] = 0;
    }
}

/* allowed[j] for query row i of head h (call-local indices), keys ks..ks+nk; stack holds Prob::depth * nk bytes
   (the program was checked at the boundary: atom indices in range, every op has its operands, one result) */
static inline void mask_row(const sa_params *p, int64_t b, int64_t h, int64_t i, int64_t ks, int64_t nk,
                            uint8_t *out, uint8_t *stack) {
    if (p->n_prog == 1) { atom_row(p->atoms[p->prog[0]], b, h, i, ks, nk, out); return; }
    int top = 0;
    for (int t = 0; t < p->n_prog; t++) {
        int op = p->prog[t];
        if (op >= 0) { atom_row(p->atoms[op], b, h, i, ks, nk, stack + top * nk); top++; }
        else if (op == SA_OP_NOT) { uint8_t *x = stack + (top - 1) * nk; for (int64_t j = 0; j < nk; j++) x[j] ^= 1; }
        else {
            uint8_t *x = stack + (top - 2) * nk, *y = stack + (top - 1) * nk;
            if (op == SA_OP_AND) for (int64_t j = 0; j < nk; j++) x[j] &= y[j];
            else for (int64_t j = 0; j < nk; j++) x[j] |= y[j];
            top--;
        }
    }
    memcpy(out, stack, nk);
}

/* ---- dropout: counter-based, the same bits as kernels/common.py dropout_keep ---- */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
    return x;
}
static inline uint32_t drop_head(const sa_params *p, int64_t b, int64_t h) {
    return mix32(p->seed + (uint32_t)b * 0x9E3779B1u + (uint32_t)h * 0x85EBCA77u);
}
static inline uint32_t drop_row(uint32_t hb, int64_t qp) { return mix32(hb ^ (uint32_t)qp); }
static inline bool drop_keep(const sa_params *p, uint32_t hr, int64_t kp) {
    return (uint64_t)mix32((hr ^ (uint32_t)kp) + 0x9E3779B9u) >= p->drop_thresh;
}

/* ---- per-element score pipeline: x (qk, scaled by qmul) -> + bias -> modifiers -> log2 units ---- */
template <class C> struct Post {
    const Prob &P;
    explicit Post(const Prob &pp) : P(pp) {}
    // i, j call-local query / key indices, h query head
    inline C apply(C x, int64_t b, int64_t h, int64_t i, int64_t j) const {
        const sa_params *p = P.p;
        if (p->bias) x += ((const C *)p->bias)[b * p->sbias[0] + h * p->sbias[1] + i * p->sbias[2] + j * p->sbias[3]] * (C)P.bmul;
        if (P.fold) return x;
        for (int m = 0; m < p->n_mods; m++) {
            const sa_mod &md = p->mods[m];
            if (md.kind == SA_MOD_DIST) x += ((const C *)md.dist)[h * p->ndist + (j - i) - p->dmin];
            else { C c = (C)md.cap; x = c * tanh(x / c); }
        }
        return x * (C)LOG2E;
    }
    /* dz: gradient wrt the final natural-units score; x0: qk*scale (natural units). Walks the modifiers back,
       records the DIST gradients into g[m] (when asked) and returns the gradient at the bias / qk level. */
    inline C chain(C dz, C x0, int64_t b, int64_t h, int64_t i, int64_t j, C *g) const {
        const sa_params *p = P.p;
        if (P.fold || p->n_mods == 0) return dz;
        C x = x0;
        if (p->bias) x += ((const C *)p->bias)[b * p->sbias[0] + h * p->sbias[1] + i * p->sbias[2] + j * p->sbias[3]];
        C t[SA_MAX_MODS];
        for (int m = 0; m < p->n_mods; m++) {
            const sa_mod &md = p->mods[m];
            if (md.kind == SA_MOD_DIST) x += ((const C *)md.dist)[h * p->ndist + (j - i) - p->dmin];
            else { C c = (C)md.cap; t[m] = tanh(x / c); x = c * t[m]; }
        }
        for (int m = p->n_mods - 1; m >= 0; m--) {
            const sa_mod &md = p->mods[m];
            if (md.kind == SA_MOD_DIST) g[m] = dz;
            else dz = dz * (1 - t[m] * t[m]);
        }
        return dz;
    }
};

/* ---- threads: the pool lives in dispatch.cc (compiled for the baseline ISA); per-ISA files use no std::
 * templates, whose one shared (COMDAT) copy could otherwise come from an AVX-512 translation unit ---- */
template <class F> static void parallel_for(int64_t n, int nthreads, F &&fn) {
    typedef typename std::remove_reference<F>::type Fn;
    sa_parallel_for(n, nthreads, [](void *c, int64_t it, int tid) { (*(Fn *)c)(it, tid); }, (void *)&fn);
}

/* per-thread scratch, 64-byte aligned, grown on demand; lives in the arena when the call holds it. A refused
   allocation returns NULL and marks the record bad: the item that asked returns at once (writing nothing more),
   later items on the thread skip, and the call returns -2 (Scratches::ok) */
struct Scratch {
    enum { SLOTS = 24 };
    void *bufs[SLOTS];
    size_t sizes[SLOTS];
    bool bad;
    template <class T> T *get(int slot, int64_t n) {
        size_t want = (size_t)round_up((n > 0 ? n : 1) * (int64_t)sizeof(T) + 64, 64);
        if (sizes[slot] < want) {
            sa_free(bufs[slot], sizes[slot]);
            bufs[slot] = bad ? nullptr : sa_alloc(want);
            sizes[slot] = bufs[slot] ? want : 0;
            bad |= bufs[slot] == nullptr;
        }
        return (T *)bufs[slot];
    }
    void release() {
        for (int k = 0; k < SLOTS; k++) { sa_free(bufs[k], sizes[k]); bufs[k] = nullptr; sizes[k] = 0; }
    }
};

constexpr int SCRATCH_MAXT = 256;  // the arena keeps Scratch records for this many threads (slot 0)

/* the arena's call-wide slots and every persistent scratch buffer given back (the caller holds the arena) */
static inline void arena_give_back() {
    if (Scratch *s = (Scratch *)sa_arena_peek(0, sizeof(Scratch) * SCRATCH_MAXT))
        for (int t = 0; t < SCRATCH_MAXT; t++) { s[t].release(); s[t].bad = false; }
    sa_arena_trim();
}

/* the call's hold on the arena: slot 0 keeps the per-thread Scratch array, slots 1.. the call-wide buffers. A
   lowered cap (sa_set_arena_max) is met by the next call that holds it: it starts from an empty arena. */
struct ArenaHold {
    bool held;
    ArenaHold() : held(sa_arena_acquire() != 0) { if (held && sa_arena_take_trim()) arena_give_back(); }
    ~ArenaHold() { if (held) sa_arena_release(); }
};

struct Scratches {  // one per thread
    enum { MAXT = SCRATCH_MAXT };
    Scratch *s;
    int n;
    bool owned;
    Scratches(int nt, const ArenaHold &ah) : n(nt < 1 ? 1 : nt), owned(!ah.held || nt > MAXT) {
        if (owned) {
            s = (Scratch *)sa_alloc(sizeof(Scratch) * n);
            if (s) memset(s, 0, sizeof(Scratch) * n);
            return;
        }
        // persistent: Scratch records for up to MAXT threads; slot 0 of the arena is zeroed when first made
        s = (Scratch *)sa_arena_buf(0, sizeof(Scratch) * MAXT);
        if (s) for (int t = 0; t < n; t++) s[t].bad = false;
    }
    Scratch &operator[](int t) { return s[t]; }
    /* false: the records or some thread's buffers could not be had (check before and after parallel_for) */
    bool ok() const {
        if (!s) return false;
        for (int t = 0; t < n; t++) if (s[t].bad) return false;
        return true;
    }
    ~Scratches() {
        if (!s) return;
        if (owned) {
            for (int t = 0; t < n; t++) s[t].release();
            sa_free(s, sizeof(Scratch) * n);
        } else if (!ok())  // memory ran out: the persistent buffers of every record go back too
            for (int t = 0; t < MAXT; t++) { s[t].release(); s[t].bad = false; }
    }
};

/* what a call returns when memory ran out: the arena's call-wide slots and every persistent scratch buffer given
   back (the next call allocates afresh); sa_last_error names the size that failed */
static inline int out_of_memory(const ArenaHold &ah) {
    if (ah.held) arena_give_back();
    return sa_oom();
}

/* ---- packing: tiles of K, V, Q, dO converted to the compute type once per call ---- */

/* rows j = 0..nk-1 of a (b, head) slice (positions j0 + j), n elements each -> dst (nk x ld), zero-padded */
template <class C>
static inline void pack_rows(C *dst, int64_t ld, const void *src, const int64_t *st, int64_t b, int64_t h, int64_t j0,
                             int64_t nk, int64_t n, int dt, C mul) {
    for (int64_t j = 0; j < nk; j++) {
        C *d = dst + j * ld;
        load_row<C>(d, src, b * st[0] + h * st[1] + (j0 + j) * st[2], st[3], n, dt, mul);
        for (int64_t c = n; c < ld; c++) d[c] = 0;
    }
}
/* the same rows transposed: dst (n x ld), dst[c, j] = x[j, c], columns nk..ld zero */
template <class C>
static inline void pack_cols(C *dst, int64_t ld, const void *src, const int64_t *st, int64_t b, int64_t h, int64_t j0,
                             int64_t nk, int64_t n, int dt, C mul) {
    if (dt == SA_F32 && st[3] == 1) {
        // blocks of 16 keys: column c of the block is 16 loads at stride st[2] (one cache line per key, all in
        // L1 after the first column) and one contiguous store; key-by-key stores at stride ld were ~3x slower
        const float *__restrict__ x = (const float *)src + b * st[0] + h * st[1] + j0 * st[2];
        const int64_t rs = st[2];
        int64_t j = 0;
        for (; j + 16 <= nk; j += 16)
            for (int64_t c = 0; c < n; c++) {
                C *__restrict__ d = dst + c * ld + j;
                const float *xc = x + j * rs + c;
                for (int jj = 0; jj < 16; jj++) d[jj] = (C)xc[jj * rs] * mul;
            }
        for (; j < nk; j++)
            for (int64_t c = 0; c < n; c++) dst[c * ld + j] = (C)x[j * rs + c] * mul;
    } else
        for (int64_t j = 0; j < nk; j++) {
            const int64_t o = b * st[0] + h * st[1] + (j0 + j) * st[2];
            for (int64_t c = 0; c < n; c++) dst[c * ld + j] = load_as<C>(src, o + c * st[3], dt) * mul;
        }
    for (int64_t c = 0; c < n; c++)
        for (int64_t j = nk; j < ld; j++) dst[c * ld + j] = 0;
}

/* n contiguous elements of dst (input dtype) starting at off = mul * src */
template <class C> static inline void store_row(void *dst, int64_t off, int dt, const C *src, int64_t n, C mul) {
    if (dt == SA_F32) { float *d = (float *)dst + off; for (int64_t i = 0; i < n; i++) d[i] = (float)(src[i] * mul); }
    else if (dt == SA_F64) { double *d = (double *)dst + off; for (int64_t i = 0; i < n; i++) d[i] = (double)(src[i] * mul); }
    else if (dt == SA_BF16) { uint16_t *d = (uint16_t *)dst + off; for (int64_t i = 0; i < n; i++) d[i] = f_to_bf16((float)(src[i] * mul)); }
    else { uint16_t *d = (uint16_t *)dst + off; for (int64_t i = 0; i < n; i++) d[i] = f_to_f16((float)(src[i] * mul)); }
}

/* a call-wide buffer: an arena slot when the call holds the arena, else its own allocation */
template <class C> struct Buf {
    C *p = nullptr;
    bool own = false;
    size_t bytes = 0;
    const ArenaHold *ah = nullptr;
    int slot = 0;
    Buf() {}
    Buf(const ArenaHold &a, int s) : ah(&a), slot(s) {}
    bool alloc(int64_t n) {
        bytes = (size_t)round_up((n > 0 ? n : 1) * (int64_t)sizeof(C), 64);
        if (ah && ah->held) { p = (C *)sa_arena_buf(slot, bytes); return p != nullptr; }
        own = true;
        p = (C *)sa_alloc(bytes);
        return p != nullptr;
    }
    ~Buf() { if (own) sa_free(p, bytes); }
};

template <class T> static inline T smin(T a, T b) { return a < b ? a : b; }
template <class T> static inline T smax(T a, T b) { return a > b ? a : b; }

}  // namespace SA_NS
