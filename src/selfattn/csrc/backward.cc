/* Backward: FlashAttention-2's split, no atomics. Every output element is written by exactly one work item, which
 * sums its contributions in a fixed order: results are bit-identical run to run and for any thread count.
 *
 *   delta = rowsum(dO * O)                        items (b, h), compute dtype
 *   dK/dV pass: items (b, KV head, key block)     for each q block and its G heads (R = G*Tq rows), in the key-
 *       major ("transposed") layout so that every GEMM reads a row-major A and a packed B:
 *       S^T = K Q^T, P^T = exp2(S^T - lse2), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q
 *   dQ pass: items (b, KV head, q block)          for each key block: S = Q K^T, dP = dO V^T, dS, dQ += dS K;
 *       the tensor-bias gradient (partial sums per item, reduced by native.py in fixed order) and the per-
 *       (head, distance) sums for T5 tables come from this pass, where each item owns its rows.
 * Cost: 7 GEMMs per tile (S and dP are recomputed in both passes) against FlashAttention-2's 5: the price of
 * writing dQ without atomics or a per-key-block dQ buffer.
 *
 * P = exp2(S - lse2) with lse2 = lse*log2(e) (+inf for empty rows, so their weights are exactly 0).
 *
 * Precision (fp32): the lse arrives rounded to fp32, an absolute error of up to ulp(lse)/2 that becomes a relative
 * error of every P of the row: 2e-6 at lse = 60 (FlashAttention's bwd_overflow inputs), 60x what a plain fp32
 * softmax errs on a row that one key dominates. Where some |lse2| >= LSE_EXACT_FROM, a stats pass recomputes each
 * row's c = sum_j exp2(S_ij - lse2_i) over the same S bits (one more S GEMM per tile) and P is taken as
 * exp2(S - lse2) / c: normalized over the kernel's own scores, as the plain softmax is. Below that the rounding
 * moves P by at most ~5 ulp and the pass is skipped. The rule reads the data only: both schedules give the same
 * bits. Masked entries
 * are selected to 0 in P and dS (never multiplied): NaN/Inf in keys nobody may see stays out of every gradient;
 * the dQ pass also zeroes dead K rows (dS = 0 there would meet them in the dQ GEMM).
 */
#include "tile.h"

namespace SA_NS {

// |lse2| from which P is renormalized: below, the stored lse's rounding moves P by <= 2^-20 (~5 ulp; a row of many
// keys errs more in a plain softmax), and the pass (+1 GEMM per tile, ~20% of the backward) is not worth it
constexpr double LSE_EXACT_FROM = 16.0;

template <class C> struct Backward {
    const Prob &P;
    const sa_params *p;
    int64_t Dp, Dvp, bkp, Rm, Rpm;        // padded dims; rows of a q block (G*bq) and padded
    // packed once per call (compute type): per (b, hkv, key block) K^T and V^T tiles; K and V rows (padded);
    // per (b, hkv, q block) Q^T (scaled), Q rows, dO^T, dO rows, lse2 and delta (padded: +inf / 0)
    ArenaHold ah;  // declared before the buffers that live in it
    Buf<C> KT{ah, 1}, VT{ah, 2}, KP{ah, 3}, VP{ah, 4}, QT{ah, 5}, QP{ah, 6}, OT{ah, 7}, OP{ah, 8}, L2{ah, 9}, DL{ah, 10}, IC{ah, 12};
    struct Packs {  // where an item finds its packed tiles: the call-wide buffers, or one head's in scratch
        C *KP, *VP, *QT, *QP, *OT, *OP, *L2, *DL, *IC;  // IC: 1 / c per row (see the top), or 1
        int64_t bh0;  // first (b, hkv) the pointers hold
    };
    bool fast;  // no bias, no modifiers, no dropout: vectorized elementwise path

    explicit Backward(const Prob &pp) : P(pp), p(pp.p) {
        const int w = W<C>;
        Dp = round_up(P.D, w); Dvp = round_up(P.Dv, w); bkp = round_up(P.bk, w);
        Rm = P.G * P.bq; Rpm = round_up(Rm, w);
        fast = !P.post && !P.dropout;
    }

    /* Q^T (scaled), Q rows, dO^T, dO rows of q block it = (b * Hkv + hkv) * nqb + qb, with each row's
       lse2 = lse*log2(e) (+inf for an empty row: its weights exp2(s - inf) are exactly 0) and
       delta = rowsum(dO * O) (compute dtype) */
    void pack_q_block(int64_t it, const Packs &pk) {
        const int64_t qb = it % P.nqb, bh = it / P.nqb, hkv = bh % P.Hkv, b = bh / P.Hkv;
        const int64_t qs = qb * P.bq, tq = smin<int64_t>(P.Nq, qs + P.bq) - qs, R = P.G * tq;
        const int64_t Rp = round_up(R, W<C>), li = it - pk.bh0 * P.nqb;
        C *qt = pk.QT + li * P.D * Rpm, *ot = pk.OT + li * P.Dv * Rpm, *qp = pk.QP + li * Rm * Dp;
        C *op = pk.OP + li * Rm * Dvp, *l2 = pk.L2 + li * Rpm, *dl = pk.DL + li * Rpm, *ic = pk.IC + li * Rpm;
        for (int64_t r = 0; r < Rp; r++) ic[r] = 1;
        for (int64_t g = 0; g < P.G; g++) {
            const int64_t h = hkv * P.G + g;
            pack_rows<C>(qp + g * tq * Dp, Dp, p->q, p->sq, b, h, qs, tq, P.D, P.dt, (C)1);
            pack_rows<C>(op + g * tq * Dvp, Dvp, p->dout, p->sdo, b, h, qs, tq, P.Dv, P.dt, (C)1);
            for (int64_t ii = 0; ii < tq; ii++) {
                const int64_t r = g * tq + ii, row = (b * P.Hq + h) * P.Nq + qs + ii;
                const C L = ((const C *)p->lse)[row];
                l2[r] = L == (C)-INFINITY ? (C)INFINITY : (C)(L * LOG2E);
                const int64_t oo = b * p->sout[0] + h * p->sout[1] + (qs + ii) * p->sout[2];
                // the same sum, order and FMA contraction as the dP GEMM's dO . V: with one visible key (O = V)
                // dP - delta is exactly 0, the exact gradient (a double sum here left a roundoff there)
                C de = 0;
                for (int64_t c = 0; c < P.Dv; c++) de += op[r * Dvp + c] * load_as<C>(p->o, oo + c * p->sout[3], P.dt);
                dl[r] = de;
            }
        }
        // the transposed copies in blocks of 16 rows: contiguous stores (row-by-row strided stores were slow)
        transpose16(qp, Dp, R, P.D, qt, Rp, (C)P.qmul);
        transpose16(op, Dvp, R, P.Dv, ot, Rp, (C)1);
        for (int64_t r = R; r < Rp; r++) {
            l2[r] = (C)INFINITY;
            dl[r] = 0;
        }
    }

    /* dst (n x ldd) = mul * src^T for src (rows x n, row stride lds); columns rows..ldd of dst zeroed */
    static void transpose16(const C *src, int64_t lds, int64_t rows, int64_t n, C *dst, int64_t ldd, C mul) {
        int64_t r = 0;
        for (; r + 16 <= rows; r += 16)
            for (int64_t c = 0; c < n; c++) {
                C *__restrict__ d = dst + c * ldd + r;
                const C *s = src + r * lds + c;
                for (int k = 0; k < 16; k++) d[k] = s[k * lds] * mul;
            }
        for (; r < rows; r++)
            for (int64_t c = 0; c < n; c++) dst[c * ldd + r] = src[r * lds + c] * mul;
        for (int64_t c = 0; c < n; c++)
            for (int64_t x = rows; x < ldd; x++) dst[c * ldd + x] = 0;
    }

    /* one element of the softmax backward (general path): returns dz at the qk level (natural units), the
       (dropped-out) weight written to *pw */
    inline C grad_elem(C x0, C dp, C lse2r, C icr, C delr, int64_t b, int64_t h, int64_t i, int64_t j, uint32_t hr,
                       C drop_scale, const Post<C> &post, C *pw, C *gm) const {
        C x = P.post ? post.apply(x0, b, h, i, j) : x0;
        C pr = sexp2(x - lse2r) * icr;
        if (P.dropout) {
            bool keep = drop_keep(p, hr, p->k_pos0 + j);
            *pw = keep ? pr * drop_scale : (C)0;
            dp = keep ? dp * drop_scale : (C)0;
        } else *pw = pr;
        C dz = pr * (dp - delr);
        return P.post ? post.chain(dz, x0, b, h, i, j, gm) : dz;
    }

    /* fast path, n elements: p = exp2(s - l2) * ic, ds = p (dp - dl); s <- ds, pw <- p. l2 / dl / ic are scalars
       per row (stride 0) or vectors per column (stride 1) */
    static inline void fast_row(C *s, const C *dp, C *pw, int64_t n, const C *l2, const C *dl, const C *ic, int vec) {
        const int w = W<C>;
        int64_t j = 0;
        if (sizeof(C) == 4) {
            for (; j + w <= n; j += w) {
                V<C> L = vec ? vload(l2 + j) : vset<C>(l2[0]), Dl = vec ? vload(dl + j) : vset<C>(dl[0]);
                V<C> Ic = vec ? vload(ic + j) : vset<C>(ic[0]);
                V<C> e;
                if constexpr (sizeof(C) == 4) e = vexp2(vload(s + j) - L) * Ic;
                if (pw) vstore(pw + j, e);
                vstore(s + j, e * (vload(dp + j) - Dl));
            }
        }
        for (; j < n; j++) {
            C e = sexp2(s[j] - l2[vec ? j : 0]) * ic[vec ? j : 0];
            if (pw) pw[j] = e;
            s[j] = e * (dp[j] - dl[vec ? j : 0]);
        }
    }

    bool one_pass = false;  // dK/dV items cover whole heads and also write dQ (5 GEMMs per tile instead of 7)
    C *dQall = nullptr;     // one_pass: (B*Hkv, nqb, Rm, Dp) dQ sums, owned by the head's item

    void pack_k_block(int64_t it, const Packs &pk, bool transposed) {  // it = (b * Hkv + hkv) * nkb + kb
        const int64_t kb = it % P.nkb, bh = it / P.nkb, ks = kb * P.bk, nk = smin<int64_t>(P.Nk, ks + P.bk) - ks;
        const int64_t b = bh / P.Hkv, h = bh % P.Hkv, lb = bh - pk.bh0;
        if (transposed) {
            pack_cols<C>(KT.p + it * P.D * bkp, bkp, p->k, p->sk, b, h, ks, nk, P.D, P.dt, (C)1);
            pack_cols<C>(VT.p + it * P.Dv * bkp, bkp, p->v, p->sv, b, h, ks, nk, P.Dv, P.dt, (C)1);
        }
        pack_rows<C>(pk.KP + (lb * P.Nk + ks) * Dp, Dp, p->k, p->sk, b, h, ks, nk, P.D, P.dt, (C)1);
        pack_rows<C>(pk.VP + (lb * P.Nk + ks) * Dvp, Dvp, p->v, p->sv, b, h, ks, nk, P.Dv, P.dt, (C)1);
    }

    /* one_pass: one head, everything packed into this thread's scratch (it stays in cache for small heads) */
    void head_item(Scratch &sc, int64_t bh) {
        Packs pk;
        pk.bh0 = bh;
        pk.KP = sc.get<C>(12, P.Nk * Dp); pk.VP = sc.get<C>(13, P.Nk * Dvp);
        pk.QT = sc.get<C>(14, P.nqb * P.D * Rpm); pk.QP = sc.get<C>(15, P.nqb * Rm * Dp);
        pk.OT = sc.get<C>(16, P.nqb * P.Dv * Rpm); pk.OP = sc.get<C>(17, P.nqb * Rm * Dvp);
        pk.L2 = sc.get<C>(18, P.nqb * Rpm); pk.DL = sc.get<C>(19, P.nqb * Rpm); pk.IC = sc.get<C>(20, P.nqb * Rpm);
        if (sc.bad) return;  // out of memory: the call returns -2 (and every item that calls these checks too)
        for (int64_t qb = 0; qb < P.nqb; qb++) pack_q_block(bh * P.nqb + qb, pk);
        for (int64_t kb = 0; kb < P.nkb; kb++) pack_k_block(bh * P.nkb + kb, pk, false);
        if (exact)
            for (int64_t qb = 0; qb < P.nqb; qb++) stats_q_block(sc, bh * P.nqb + qb, pk);
        for (int64_t kb = 0; kb < P.nkb; kb++) dkdv_item(sc, bh * P.nkb + kb, pk);
        if (sc.bad) return;
        const int64_t hkv = bh % P.Hkv, b = bh / P.Hkv;
        const C sc_q = (C)p->scale;
        for (int64_t qb = 0; qb < P.nqb; qb++) {
            const int64_t qs = qb * P.bq, tq = smin<int64_t>(P.Nq, qs + P.bq) - qs;
            const C *dQ = dQall + (bh * P.nqb + qb) * Rm * Dp;
            for (int64_t r = 0; r < P.G * tq; r++) {
                const int64_t row = (b * P.Hq + hkv * P.G + r / tq) * P.Nq + qs + r % tq;
                store_row<C>(p->dq, row * P.D, P.dt, dQ + r * Dp, P.D, sc_q);
            }
        }
    }

    void dkdv_item(Scratch &sc, int64_t it, const Packs &pk) {
        const int64_t kb = it % P.nkb, bh = it / P.nkb, hkv = bh % P.Hkv, b = bh / P.Hkv;
        const int64_t G = P.G, D = P.D, Dv = P.Dv;
        const int64_t ks = kb * P.bk, nk = smin<int64_t>(P.Nk, ks + P.bk) - ks;
        C *ST = sc.get<C>(0, nk * Rpm), *PT = sc.get<C>(1, nk * Rpm), *dPT = sc.get<C>(2, nk * Rpm);
        C *dK = sc.get<C>(3, nk * Dp), *dV = sc.get<C>(4, nk * Dvp);
        C *tK = sc.get<C>(5, nk * Dp), *tV = sc.get<C>(6, nk * Dvp);
        uint8_t *Mb = sc.get<uint8_t>(7, Rm * nk), *stack = sc.get<uint8_t>(8, P.depth * nk), *seen = sc.get<uint8_t>(9, nk);
        C *tQ = sc.get<C>(10, Rm * Dp), *Kz = sc.get<C>(11, nk * Dp);
        if (sc.bad) return;
        C gm[SA_MAX_MODS];
        const int64_t lb = bh - pk.bh0;
        const C *Kr = pk.KP + (lb * P.Nk + ks) * Dp, *Vr = pk.VP + (lb * P.Nk + ks) * Dvp;
        if (one_pass && kb == 0) memset(dQall + bh * P.nqb * Rm * Dp, 0, sizeof(C) * P.nqb * Rm * Dp);
        memset(dK, 0, sizeof(C) * nk * Dp);
        memset(dV, 0, sizeof(C) * nk * Dvp);
        const Post<C> post(P);
        const C drop_scale = P.dropout ? (C)(1.0 / (1.0 - p->dropout_p)) : (C)1;
        for (int64_t qb = 0; qb < P.nqb; qb++) {
            const int cls = P.tile_class(b, hkv, qb, kb);
            if (cls == CLS_EMPTY) continue;
            const int64_t qi = bh * P.nqb + qb, li = lb * P.nqb + qb;
            const int64_t qs = qb * P.bq, tq = smin<int64_t>(P.Nq, qs + P.bq) - qs, R = G * tq, Rp = round_up(R, W<C>);
            const C *qt = pk.QT + li * D * Rpm, *ot = pk.OT + li * Dv * Rpm, *qp = pk.QP + li * Rm * Dp;
            const C *op = pk.OP + li * Rm * Dvp, *l2 = pk.L2 + li * Rpm, *dl = pk.DL + li * Rpm, *ic = pk.IC + li * Rpm;
            if (cls == CLS_PARTIAL)
                for (int64_t r = 0; r < R; r++)
                    mask_row(p, b, hkv * G + r / tq, qs + r % tq, ks, nk, Mb + r * nk, stack);
            gemm<C>(nk, Rp, D, Kr, Dp, qt, Rp, ST, Rp, GEMM_SET);    // S^T = K Q^T
            gemm<C>(nk, Rp, Dv, Vr, Dvp, ot, Rp, dPT, Rp, GEMM_SET);  // dP^T = V dO^T
            if (fast) {
                for (int64_t j = 0; j < nk; j++) fast_row(ST + j * Rp, dPT + j * Rp, PT + j * Rp, Rp, l2, dl, ic, 1);
                if (cls == CLS_PARTIAL)
                    for (int64_t r = 0; r < R; r++) {
                        const uint8_t *mr = Mb + r * nk;
                        for (int64_t j = 0; j < nk; j++)
                            if (!mr[j]) { PT[j * Rp + r] = 0; ST[j * Rp + r] = 0; }
                    }
            } else {
                for (int64_t r = 0; r < R; r++) {
                    const int64_t g = r / tq, i = qs + r % tq, h = hkv * G + g;
                    const uint32_t hr = P.dropout ? drop_row(drop_head(p, b, h), p->q_pos0 + i) : 0;
                    const uint8_t *mr = cls == CLS_PARTIAL ? Mb + r * nk : nullptr;
                    for (int64_t j = 0; j < nk; j++) {
                        C *pw = PT + j * Rp + r;
                        if (mr && !mr[j]) { *pw = 0; ST[j * Rp + r] = 0; continue; }
                        ST[j * Rp + r] = grad_elem(ST[j * Rp + r], dPT[j * Rp + r], l2[r], ic[r], dl[r], b, h, i, ks + j, hr,
                                                   drop_scale, post, pw, gm);
                    }
                }
                for (int64_t j = 0; j < nk; j++)
                    for (int64_t r = R; r < Rp; r++) { PT[j * Rp + r] = 0; ST[j * Rp + r] = 0; }
            }
            // per q block into fresh sums, then added: blocked summation (error ~ (R + nqb) ulps, not G*Nq)
            gemm<C>(nk, Dvp, R, PT, Rp, op, Dvp, tV, Dvp, GEMM_SET);
            gemm<C>(nk, Dp, R, ST, Rp, qp, Dp, tK, Dp, GEMM_SET);
            for (int64_t x = 0; x < nk * Dvp; x++) dV[x] += tV[x];
            for (int64_t x = 0; x < nk * Dp; x++) dK[x] += tK[x];
            if (one_pass) {  // dQ += dS K with dS read through the transposed tile; dead K rows zeroed first
                const C *Kn = Kr;
                if (cls == CLS_PARTIAL) {
                    memset(seen, 0, nk);
                    for (int64_t r = 0; r < R; r++)
                        for (int64_t j = 0; j < nk; j++) seen[j] |= Mb[r * nk + j];
                    bool any_dead = false;
                    for (int64_t j = 0; j < nk; j++) any_dead |= !seen[j];
                    if (any_dead) {
                        for (int64_t j = 0; j < nk; j++)
                            if (seen[j]) memcpy(Kz + j * Dp, Kr + j * Dp, sizeof(C) * Dp);
                            else memset(Kz + j * Dp, 0, sizeof(C) * Dp);
                        Kn = Kz;
                    }
                }
                gemm_s<C>(R, Dp, nk, ST, 1, Rp, Kn, Dp, tQ, Dp, GEMM_SET);
                C *dQ = dQall + qi * Rm * Dp;
                for (int64_t x = 0; x < R * Dp; x++) dQ[x] += tQ[x];
            }
        }
        const C sc_k = (C)p->scale;
        for (int64_t j = 0; j < nk; j++) {
            const int64_t row = bh * P.Nk + ks + j;
            if (p->dk) store_row<C>(p->dk, row * D, P.dt, dK + j * Dp, D, sc_k);
            if (p->dv) store_row<C>(p->dv, row * Dv, P.dt, dV + j * Dvp, Dv, (C)1);
        }
    }

    bool exact = false;  // the stats pass runs (see the top)

    /* c_r = sum over the row's visible keys of exp2(S - lse2) with S computed as dkdv_item computes it (same GEMM,
       same bits); ic = 1 / c. Sums run per tile in the compute type (vector lanes are rows: j in order), then
       across tiles in double, the same way in either schedule.
       Without dropout the row's delta is taken here too, as the plain softmax backward takes it: the P-weighted
       mean of the kernel's own dP (dP^T = V dO^T, dkdv_item's GEMM), sum_j e_j dP_j / sum_j e_j in double. The
       delta = dO . O of pack_q_block reads the forward output rounded to fp32; where one key dominates a row,
       dP_j - delta cancels to the size of that rounding (dQ 2.5-7x the plain fp32 error on bwd_overflow). With
       one visible key the quotient is dP itself (products of two floats are exact in double): dS = 0 exactly. */
    void stats_q_block(Scratch &sc, int64_t it, const Packs &pk) {
        const int64_t qb = it % P.nqb, bh = it / P.nqb, hkv = bh % P.Hkv, b = bh / P.Hkv, G = P.G;
        const int64_t qs = qb * P.bq, tq = smin<int64_t>(P.Nq, qs + P.bq) - qs, R = G * tq, Rp = round_up(R, W<C>);
        const int64_t li = it - pk.bh0 * P.nqb, lb = bh - pk.bh0;
        const C *qt = pk.QT + li * P.D * Rpm, *ot = pk.OT + li * P.Dv * Rpm, *l2 = pk.L2 + li * Rpm;
        C *ic = pk.IC + li * Rpm, *dl = pk.DL + li * Rpm;
        const bool own_delta = !P.dropout;
        C *ST = sc.get<C>(0, P.bk * Rpm), *ts = sc.get<C>(21, Rpm), *dPT = sc.get<C>(2, P.bk * Rpm);
        double *acc = sc.get<double>(22, Rpm), *num = sc.get<double>(23, Rpm);
        uint8_t *Mb = sc.get<uint8_t>(7, Rm * P.bk), *stack = sc.get<uint8_t>(8, P.depth * P.bk);
        if (sc.bad) return;
        const Post<C> post(P);
        for (int64_t r = 0; r < R; r++) { acc[r] = 0; num[r] = 0; }
        for (int64_t kb = 0; kb < P.nkb; kb++) {
            const int cls = P.tile_class(b, hkv, qb, kb);
            if (cls == CLS_EMPTY) continue;
            const int64_t ks = kb * P.bk, nk = smin<int64_t>(P.Nk, ks + P.bk) - ks;
            gemm<C>(nk, Rp, P.D, pk.KP + (lb * P.Nk + ks) * Dp, Dp, qt, Rp, ST, Rp, GEMM_SET);  // S^T = K Q^T
            if (own_delta)  // dP^T = V dO^T
                gemm<C>(nk, Rp, P.Dv, pk.VP + (lb * P.Nk + ks) * Dvp, Dvp, ot, Rp, dPT, Rp, GEMM_SET);
            if (P.post)
                for (int64_t j = 0; j < nk; j++)
                    for (int64_t r = 0; r < R; r++)
                        ST[j * Rp + r] = post.apply(ST[j * Rp + r], b, hkv * G + r / tq, qs + r % tq, ks + j);
            if (cls == CLS_PARTIAL)
                for (int64_t r = 0; r < R; r++) {
                    mask_row(p, b, hkv * G + r / tq, qs + r % tq, ks, nk, Mb + r * nk, stack);
                    for (int64_t j = 0; j < nk; j++)
                        if (!Mb[r * nk + j]) ST[j * Rp + r] = (C)-INFINITY;
                }
            for (int64_t r = 0; r < Rp; r++) ts[r] = 0;
            for (int64_t j = 0; j < nk; j++) {
                C *row = ST + j * Rp;  // becomes e = exp2(S - lse2)
                int64_t r = 0;
                if constexpr (sizeof(C) == 4)
                    for (; r + W<C> <= Rp; r += W<C>) {
                        const V<C> e = vexp2(vload(row + r) - vload(l2 + r));
                        vstore(row + r, e);
                        vstore(ts + r, vload(ts + r) + e);
                    }
                for (; r < Rp; r++) { row[r] = sexp2(row[r] - l2[r]); ts[r] += row[r]; }
            }
            for (int64_t r = 0; r < R; r++) acc[r] += ts[r];
            if (own_delta && cls == CLS_FULL)  // rows are lanes: a vector loop in double (products of floats exact)
                for (int64_t j = 0; j < nk; j++) {
                    const C *e = ST + j * Rp, *dp = dPT + j * Rp;
                    for (int64_t r = 0; r < R; r++) num[r] += (double)e[r] * (double)dp[r];
                }
            else if (own_delta)  // masked keys are skipped, not multiplied: their dP may be NaN (V rows nobody sees)
                for (int64_t j = 0; j < nk; j++)
                    for (int64_t r = 0; r < R; r++)
                        if (Mb[r * nk + j]) num[r] += (double)ST[j * Rp + r] * (double)dPT[j * Rp + r];
        }
        for (int64_t r = 0; r < R; r++) {
            ic[r] = acc[r] > 0 ? (C)(1.0 / acc[r]) : (C)1;
            if (own_delta && acc[r] > 0) dl[r] = (C)(num[r] / acc[r]);  // else (an empty or NaN row) dO . O stays
        }
    }

    void dq_item(Scratch &sc, int64_t it) {
        const int64_t qb = it % P.nqb, bh = it / P.nqb, hkv = bh % P.Hkv, b = bh / P.Hkv;
        const int64_t G = P.G, D = P.D, bk = P.bk;
        const int64_t qs = qb * P.bq, tq = smin<int64_t>(P.Nq, qs + P.bq) - qs, R = G * tq;
        const int w = W<C>;
        C *Q = sc.get<C>(0, R * D), *S = sc.get<C>(1, R * bkp), *dP = sc.get<C>(2, R * bkp);
        C *dQ = sc.get<C>(3, R * Dp), *tQ = sc.get<C>(4, R * Dp), *Kz = sc.get<C>(5, bk * Dp);
        uint8_t *Mb = sc.get<uint8_t>(8, R * bk), *stack = sc.get<uint8_t>(9, P.depth * bk), *seen = sc.get<uint8_t>(10, bk);
        if (sc.bad) return;
        const C *op = OP.p + it * Rm * Dvp, *l2 = L2.p + it * Rpm, *dl = DL.p + it * Rpm;  // call-wide packs
        const C *ic = IC.p + it * Rpm;
        for (int64_t g = 0; g < G; g++)
            pack_rows<C>(Q + g * tq * D, D, p->q, p->sq, b, hkv * G + g, qs, tq, D, P.dt, (C)P.qmul);
        memset(dQ, 0, sizeof(C) * R * Dp);
        const Post<C> post(P);
        const C drop_scale = P.dropout ? (C)(1.0 / (1.0 - p->dropout_p)) : (C)1;
        C gm[SA_MAX_MODS];
        C *dbias = (C *)p->dbias_buf;
        const int64_t Hb = p->dbias_heads == 1 ? P.Hkv : P.Hq, Rb = p->dbias_rows == 1 ? P.nqb : P.Nq,
                      Cb = p->dbias_cols == 1 ? 1 : P.Nk;
        if (dbias)  // this item's cells are its own: clear them (rows of its q block or its q block's cell)
            for (int64_t g = 0; g < (p->dbias_heads == 1 ? 1 : G); g++) {
                const int64_t hb = p->dbias_heads == 1 ? hkv : hkv * G + g;
                const int64_t r0 = p->dbias_rows == 1 ? qb : qs, nr = p->dbias_rows == 1 ? 1 : tq;
                memset(dbias + ((b * Hb + hb) * Rb + r0) * Cb, 0, sizeof(C) * nr * Cb);
            }
        for (int m = 0; m < p->n_mods; m++)
            if (p->mods[m].grad)
                for (int64_t g = 0; g < G; g++)
                    memset((C *)p->mods[m].dgrad + ((b * P.Hq + hkv * G + g) * P.nqb + qb) * p->ndist, 0,
                           sizeof(C) * p->ndist);
        for (int64_t kb = 0; kb < P.nkb; kb++) {
            const int cls = P.tile_class(b, hkv, qb, kb);
            if (cls == CLS_EMPTY) continue;
            const int64_t ks = kb * bk, nk = smin<int64_t>(P.Nk, ks + bk) - ks, nkp = round_up(nk, w);
            bool any_dead = false;
            if (cls == CLS_PARTIAL) {
                memset(seen, 0, nk);
                for (int64_t r = 0; r < R; r++) {
                    mask_row(p, b, hkv * G + r / tq, qs + r % tq, ks, nk, Mb + r * nk, stack);
                    for (int64_t j = 0; j < nk; j++) seen[j] |= Mb[r * nk + j];
                }
                for (int64_t j = 0; j < nk; j++) any_dead |= !seen[j];
            }
            const int64_t ti = bh * P.nkb + kb;
            gemm<C>(R, nkp, D, Q, D, KT.p + ti * D * bkp, bkp, S, nkp, GEMM_SET);           // S = Q K^T
            gemm<C>(R, nkp, P.Dv, op, Dvp, VT.p + ti * P.Dv * bkp, bkp, dP, nkp, GEMM_SET);  // dP = dO V^T
            const C *Kn = KP.p + (bh * P.Nk + ks) * Dp;
            if (any_dead) {  // dS = 0 on a dead key must not meet its (possibly NaN) K row in the dQ GEMM
                for (int64_t j = 0; j < nk; j++)
                    if (seen[j]) memcpy(Kz + j * Dp, Kn + j * Dp, sizeof(C) * Dp);
                    else memset(Kz + j * Dp, 0, sizeof(C) * Dp);
                Kn = Kz;
            }
            if (fast) {
                for (int64_t r = 0; r < R; r++) {
                    C *srow = S + r * nkp;
                    fast_row(srow, dP + r * nkp, nullptr, nk, l2 + r, dl + r, ic + r, 0);
                    if (cls == CLS_PARTIAL) {
                        const uint8_t *mr = Mb + r * nk;
                        for (int64_t j = 0; j < nk; j++) srow[j] = mr[j] ? srow[j] : (C)0;
                    }
                }
            } else {
                for (int64_t r = 0; r < R; r++) {
                    const int64_t g = r / tq, i = qs + r % tq, h = hkv * G + g;
                    const uint32_t hr = P.dropout ? drop_row(drop_head(p, b, h), p->q_pos0 + i) : 0;
                    const uint8_t *mr = cls == CLS_PARTIAL ? Mb + r * nk : nullptr;
                    C *srow = S + r * nkp;
                    C *db = nullptr;
                    if (dbias) {
                        const int64_t hb = p->dbias_heads == 1 ? hkv : h, rb = p->dbias_rows == 1 ? qb : i;
                        db = dbias + ((b * Hb + hb) * Rb + rb) * Cb;
                    }
                    C *dg[SA_MAX_MODS];
                    for (int m = 0; m < p->n_mods; m++)
                        dg[m] = p->mods[m].grad ? (C *)p->mods[m].dgrad + ((b * P.Hq + h) * P.nqb + qb) * p->ndist : nullptr;
                    for (int64_t j = 0; j < nk; j++) {
                        if (mr && !mr[j]) { srow[j] = 0; continue; }
                        C pw;
                        for (int m = 0; m < p->n_mods; m++) gm[m] = 0;
                        C dz = grad_elem(srow[j], dP[r * nkp + j], l2[r], ic[r], dl[r], b, h, i, ks + j, hr, drop_scale, post,
                                         &pw, gm);
                        srow[j] = dz;
                        if (db) db[Cb == 1 ? 0 : ks + j] += dz;
                        for (int m = 0; m < p->n_mods; m++)
                            if (dg[m]) dg[m][(ks + j - i) - p->dmin] += gm[m];
                    }
                }
            }
            gemm<C>(R, Dp, nk, S, nkp, Kn, Dp, tQ, Dp, GEMM_SET);  // dQ += dS K, blocked summation
            for (int64_t x = 0; x < R * Dp; x++) dQ[x] += tQ[x];
        }
        const C sc_q = (C)p->scale;
        for (int64_t r = 0; p->dq && r < R; r++) {
            const int64_t g = r / tq, i = qs + r % tq, h = hkv * G + g;
            const int64_t row = (b * P.Hq + h) * P.Nq + i;
            store_row<C>(p->dq, row * D, P.dt, dQ + r * Dp, D, sc_q);
        }
    }

    int run() {
        const int64_t heads = P.B * P.Hkv, nt = p->nthreads;
        const int64_t nqi = heads * P.nqb, nki = heads * P.nkb;
        bool need_q = p->dq || p->dbias_buf, mod_grads = false;
        for (int m = 0; m < p->n_mods; m++) mod_grads |= p->mods[m].grad != 0;
        need_q |= mod_grads;
        // one pass over whole heads when there are enough of them; the bits are the same either way (every sum
        // runs in the same order), so the rule may look at the thread count
        one_pass = p->dq && !p->dbias_buf && !mod_grads && (p->dk || p->dv) && heads >= 2 * nt && P.nkb > 0;
        if (sizeof(C) == 4)  // a property of the data, not of the schedule: the same bits either way
            for (int64_t x = 0, n = P.B * P.Hq * P.Nq; x < n && !exact; x++) {
                const C L = ((const C *)p->lse)[x];
                exact = L == L && fabs((double)L) * LOG2E >= LSE_EXACT_FROM && fabs((double)L) != INFINITY;
            }
        if (one_pass) {
            Buf<C> dqbuf(ah, 11);
            if (!dqbuf.alloc(heads * P.nqb * Rm * Dp)) return out_of_memory(ah);
            dQall = dqbuf.p;
            Scratches sc(nt, ah);
            if (!sc.ok()) return out_of_memory(ah);
            parallel_for(heads, nt, [&](int64_t bh, int tid) { head_item(sc[tid], bh); });
            return sc.ok() ? 0 : out_of_memory(ah);
        }
        if (!KT.alloc(nki * P.D * bkp) || !VT.alloc(nki * P.Dv * bkp) || !KP.alloc(heads * P.Nk * Dp) ||
            !VP.alloc(heads * P.Nk * Dvp) || !QT.alloc(nqi * P.D * Rpm) || !QP.alloc(nqi * Rm * Dp) ||
            !OT.alloc(nqi * P.Dv * Rpm) || !OP.alloc(nqi * Rm * Dvp) || !L2.alloc(nqi * Rpm) || !DL.alloc(nqi * Rpm) ||
            !IC.alloc(nqi * Rpm))
            return out_of_memory(ah);
        const Packs pk = {KP.p, VP.p, QT.p, QP.p, OT.p, OP.p, L2.p, DL.p, IC.p, 0};
        parallel_for(nki, nt, [&](int64_t it, int) { pack_k_block(it, pk, true); });
        parallel_for(nqi, nt, [&](int64_t it, int) { pack_q_block(it, pk); });
        // each pass: its scratch records first, then its items; a thread whose scratch is refused skips the rest
        if (exact && P.nkb > 0) {
            Scratches sc(nt, ah);
            if (sc.ok()) parallel_for(nqi, nt, [&](int64_t it, int tid) { stats_q_block(sc[tid], it, pk); });
            if (!sc.ok()) return out_of_memory(ah);
        }
        if ((p->dk || p->dv) && P.nkb > 0) {
            Scratches sc(nt, ah);
            if (sc.ok()) parallel_for(nki, nt, [&](int64_t it, int tid) { dkdv_item(sc[tid], it, pk); });
            if (!sc.ok()) return out_of_memory(ah);
        }
        if (need_q) {
            Scratches sc(nt, ah);
            if (sc.ok()) parallel_for(nqi, nt, [&](int64_t it, int tid) { dq_item(sc[tid], it); });
            if (!sc.ok()) return out_of_memory(ah);
        }
        return 0;
    }
};

int backward(sa_params *p) {
    Prob P(p, p->bq, p->bk);
    if (p->dtype == SA_F64) { Backward<double> bw(P); return bw.run(); }
    Backward<float> bw(P);
    return bw.run();
}

}  // namespace SA_NS
