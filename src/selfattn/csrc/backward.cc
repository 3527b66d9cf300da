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
 * P = exp2(S - lse2) with lse2 = lse*log2(e) (+inf for empty rows, so their weights are exactly 0). Masked entries
 * are selected to 0 in P and dS (never multiplied): NaN/Inf in keys nobody may see stays out of every gradient;
 * the dQ pass also zeroes dead K rows (dS = 0 there would meet them in the dQ GEMM).
 */
#include "tile.h"

namespace SA_NS {

template <class C> struct Backward {
    const Prob &P;
    const sa_params *p;
    C *delta = nullptr, *lse2 = nullptr;  // (B, Hq, Nq)

    explicit Backward(const Prob &pp) : P(pp), p(pp.p) {}

    void load_block_rows(C *dst, int64_t ld, const void *src, const int64_t *st, int64_t b, int64_t hkv, int64_t qs,
                         int64_t tq, int64_t n, C mul, int dt) {
        for (int64_t g = 0; g < P.G; g++)
            for (int64_t ii = 0; ii < tq; ii++) {
                C *d = dst + (g * tq + ii) * ld;
                load_row<C>(d, src, b * st[0] + (hkv * P.G + g) * st[1] + (qs + ii) * st[2], st[3], n, dt, mul);
                for (int64_t c = n; c < ld; c++) d[c] = 0;
            }
    }
    static void transpose(const C *src, int64_t rows, int64_t cols, int64_t lds, C *dst, int64_t ldd) {
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < cols; c++) dst[c * ldd + r] = src[r * lds + c];
    }

    void row_delta(Scratch &, int64_t bh) {
        const int64_t b = bh / P.Hq, h = bh % P.Hq;
        for (int64_t i = 0; i < P.Nq; i++) {
            const int64_t row = bh * P.Nq + i;
            C s = 0;
            const int64_t od = b * p->sdo[0] + h * p->sdo[1] + i * p->sdo[2];
            const int64_t oo = b * p->sout[0] + h * p->sout[1] + i * p->sout[2];
            for (int64_t c = 0; c < P.Dv; c++)
                s += load_as<C>(p->dout, od + c * p->sdo[3], P.dt) * load_as<C>(p->o, oo + c * p->sout[3], P.dt);
            delta[row] = s;
            const C L = ((const C *)p->lse)[row];
            lse2[row] = L == (C)-INFINITY ? (C)INFINITY : (C)(L * LOG2E);
        }
    }

    /* one element of the softmax backward: returns dz at the qk level (natural units), P written to *pw */
    inline C grad_elem(C x0, C dp, C lse2r, C delr, int64_t b, int64_t h, int64_t i, int64_t j, uint32_t hr,
                       C drop_scale, const Post<C> &post, C *pw, C *gm) const {
        C x = P.post ? post.apply(x0, b, h, i, j) : x0;
        C pr = sexp2(x - lse2r);
        if (P.dropout) {
            bool keep = drop_keep(p, hr, p->k_pos0 + j);
            *pw = keep ? pr * drop_scale : (C)0;
            dp = keep ? dp * drop_scale : (C)0;
        } else *pw = pr;
        C dz = pr * (dp - delr);
        return P.post ? post.chain(dz, x0, b, h, i, j, gm) : dz;
    }

    void dkdv_item(Scratch &sc, int64_t it) {
        const int64_t kb = it % P.nkb, bh = it / P.nkb, hkv = bh % P.Hkv, b = bh / P.Hkv;
        const int64_t G = P.G, D = P.D, Dv = P.Dv;
        const int w = W<C>;
        const int64_t Dp = round_up(D, w), Dvp = round_up(Dv, w);
        const int64_t ks = kb * P.bk, nk = smin<int64_t>(P.Nk, ks + P.bk) - ks;
        const int64_t Rmax = G * P.bq, Rpm = round_up(Rmax, w);
        C *Kn = sc.get<C>(0, nk * D), *Vn = sc.get<C>(1, nk * Dv);
        C *Qt = sc.get<C>(2, D * Rpm), *Qn = sc.get<C>(3, Rmax * Dp), *dO = sc.get<C>(4, Rmax * Dvp);
        C *dOt = sc.get<C>(5, Dv * Rpm), *ST = sc.get<C>(6, nk * Rpm), *PT = sc.get<C>(7, nk * Rpm);
        C *dPT = sc.get<C>(8, nk * Rpm), *dK = sc.get<C>(9, nk * Dp), *dV = sc.get<C>(10, nk * Dvp);
        C *tmp = sc.get<C>(11, Rmax * smax<int64_t>(D, Dv));
        uint8_t *Mb = sc.get<uint8_t>(12, Rmax * nk), *stack = sc.get<uint8_t>(13, 8 * nk);
        C gm[SA_MAX_MODS];
        for (int64_t j = 0; j < nk; j++) {
            load_row<C>(Kn + j * D, p->k, P.koff(b, hkv, ks + j), p->sk[3], D, P.dt, (C)1);
            load_row<C>(Vn + j * Dv, p->v, P.voff(b, hkv, ks + j), p->sv[3], Dv, P.dt, (C)1);
        }
        memset(dK, 0, sizeof(C) * nk * Dp);
        memset(dV, 0, sizeof(C) * nk * Dvp);
        const Post<C> post(P);
        const C drop_scale = P.dropout ? (C)(1.0 / (1.0 - p->dropout_p)) : (C)1;
        for (int64_t qb = 0; qb < P.nqb; qb++) {
            const int cls = P.tile_class(b, hkv, qb, kb);
            if (cls == CLS_EMPTY) continue;
            const int64_t qs = qb * P.bq, tq = smin<int64_t>(P.Nq, qs + P.bq) - qs, R = G * tq, Rp = round_up(R, w);
            load_block_rows(tmp, D, p->q, p->sq, b, hkv, qs, tq, D, (C)P.qmul, P.dt);
            for (int64_t d = 0; d < D; d++) for (int64_t r = R; r < Rp; r++) Qt[d * Rp + r] = 0;
            transpose(tmp, R, D, D, Qt, Rp);
            load_block_rows(Qn, Dp, p->q, p->sq, b, hkv, qs, tq, D, (C)1, P.dt);
            load_block_rows(dO, Dvp, p->dout, p->sdo, b, hkv, qs, tq, Dv, (C)1, P.dt);
            for (int64_t d = 0; d < Dv; d++) for (int64_t r = R; r < Rp; r++) dOt[d * Rp + r] = 0;
            transpose(dO, R, Dv, Dvp, dOt, Rp);
            if (cls == CLS_PARTIAL)
                for (int64_t r = 0; r < R; r++)
                    mask_row(p, b, hkv * G + r / tq, qs + r % tq, ks, nk, Mb + r * nk, stack);
            gemm<C>(nk, Rp, D, Kn, D, Qt, Rp, ST, Rp, GEMM_SET);
            gemm<C>(nk, Rp, Dv, Vn, Dv, dOt, Rp, dPT, Rp, GEMM_SET);
            for (int64_t r = 0; r < R; r++) {
                const int64_t g = r / tq, i = qs + r % tq, h = hkv * G + g, row = (b * P.Hq + h) * P.Nq + i;
                const C l2 = lse2[row], de = delta[row];
                const uint32_t hr = P.dropout ? drop_row(drop_head(p, b, h), p->q_pos0 + i) : 0;
                const uint8_t *mr = cls == CLS_PARTIAL ? Mb + r * nk : nullptr;
                for (int64_t j = 0; j < nk; j++) {
                    C *pw = PT + j * Rp + r;
                    if (mr && !mr[j]) { *pw = 0; ST[j * Rp + r] = 0; continue; }
                    ST[j * Rp + r] = grad_elem(ST[j * Rp + r], dPT[j * Rp + r], l2, de, b, h, i, ks + j, hr,
                                               drop_scale, post, pw, gm);
                }
            }
            for (int64_t j = 0; j < nk; j++)
                for (int64_t r = R; r < Rp; r++) { PT[j * Rp + r] = 0; ST[j * Rp + r] = 0; }
            gemm<C>(nk, Dvp, R, PT, Rp, dO, Dvp, dV, Dvp, GEMM_ADD);
            gemm<C>(nk, Dp, R, ST, Rp, Qn, Dp, dK, Dp, GEMM_ADD);
        }
        const C sc_k = (C)p->scale;
        for (int64_t j = 0; j < nk; j++) {
            const int64_t row = (b * P.Hkv + hkv) * P.Nk + ks + j;
            if (p->dk) for (int64_t d = 0; d < D; d++) store_as<C>(p->dk, row * D + d, P.dt, dK[j * Dp + d] * sc_k);
            if (p->dv) for (int64_t c = 0; c < Dv; c++) store_as<C>(p->dv, row * Dv + c, P.dt, dV[j * Dvp + c]);
        }
    }

    void dq_item(Scratch &sc, int64_t it) {
        const int64_t qb = it % P.nqb, bh = it / P.nqb, hkv = bh % P.Hkv, b = bh / P.Hkv;
        const int64_t G = P.G, D = P.D, Dv = P.Dv, bk = P.bk;
        const int w = W<C>;
        const int64_t Dp = round_up(D, w), bkp = round_up(bk, w);
        const int64_t qs = qb * P.bq, tq = smin<int64_t>(P.Nq, qs + P.bq) - qs, R = G * tq;
        C *Q = sc.get<C>(0, R * D), *dO = sc.get<C>(1, R * Dv), *Kt = sc.get<C>(2, D * bkp);
        C *Vt = sc.get<C>(3, Dv * bkp), *Kn = sc.get<C>(4, bk * Dp), *S = sc.get<C>(5, R * bkp);
        C *dP = sc.get<C>(6, R * bkp), *dQ = sc.get<C>(7, R * Dp);
        uint8_t *Mb = sc.get<uint8_t>(8, R * bk), *stack = sc.get<uint8_t>(9, 8 * bk), *seen = sc.get<uint8_t>(10, bk);
        load_block_rows(Q, D, p->q, p->sq, b, hkv, qs, tq, D, (C)P.qmul, P.dt);
        load_block_rows(dO, Dv, p->dout, p->sdo, b, hkv, qs, tq, Dv, (C)1, P.dt);
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
            for (int64_t j = 0; j < nk; j++) {
                C *kn = Kn + j * Dp;
                load_row<C>(kn, p->k, P.koff(b, hkv, ks + j), p->sk[3], D, P.dt, (C)1);
                for (int64_t d = 0; d < D; d++) Kt[d * nkp + j] = kn[d];
                if (any_dead && !seen[j]) memset(kn, 0, sizeof(C) * D);
                for (int64_t d = D; d < Dp; d++) kn[d] = 0;
                const int64_t vo = P.voff(b, hkv, ks + j);
                for (int64_t c = 0; c < Dv; c++) Vt[c * nkp + j] = load_as<C>(p->v, vo + c * p->sv[3], P.dt);
            }
            for (int64_t j = nk; j < nkp; j++) {
                for (int64_t d = 0; d < D; d++) Kt[d * nkp + j] = 0;
                for (int64_t c = 0; c < Dv; c++) Vt[c * nkp + j] = 0;
            }
            gemm<C>(R, nkp, D, Q, D, Kt, nkp, S, nkp, GEMM_SET);
            gemm<C>(R, nkp, Dv, dO, Dv, Vt, nkp, dP, nkp, GEMM_SET);
            for (int64_t r = 0; r < R; r++) {
                const int64_t g = r / tq, i = qs + r % tq, h = hkv * G + g, row = (b * P.Hq + h) * P.Nq + i;
                const C l2 = lse2[row], de = delta[row];
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
                    C dz = grad_elem(srow[j], dP[r * nkp + j], l2, de, b, h, i, ks + j, hr, drop_scale, post, &pw, gm);
                    srow[j] = dz;
                    if (db) db[Cb == 1 ? 0 : ks + j] += dz;
                    for (int m = 0; m < p->n_mods; m++)
                        if (dg[m]) dg[m][(ks + j - i) - p->dmin] += gm[m];
                }
                for (int64_t j = nk; j < nkp; j++) srow[j] = 0;
            }
            gemm<C>(R, Dp, nk, S, nkp, Kn, Dp, dQ, Dp, GEMM_ADD);
        }
        const C sc_q = (C)p->scale;
        for (int64_t r = 0; p->dq && r < R; r++) {
            const int64_t g = r / tq, i = qs + r % tq, h = hkv * G + g;
            const int64_t row = (b * P.Hq + h) * P.Nq + i;
            for (int64_t d = 0; d < D; d++) store_as<C>(p->dq, row * D + d, P.dt, dQ[r * Dp + d] * sc_q);
        }
    }

    int run() {
        const int64_t rows = P.B * P.Hq * P.Nq;
        delta = (C *)malloc(sizeof(C) * (rows ? rows : 1));
        lse2 = (C *)malloc(sizeof(C) * (rows ? rows : 1));
        if (!delta || !lse2) { free(delta); free(lse2); return -2; }
        Scratches sc(p->nthreads);
        parallel_for(P.B * P.Hq, p->nthreads, [&](int64_t it, int tid) { row_delta(sc[tid], it); });
        if ((p->dk || p->dv) && P.nkb > 0)
            parallel_for(P.B * P.Hkv * P.nkb, p->nthreads, [&](int64_t it, int tid) { dkdv_item(sc[tid], it); });
        bool need_q = p->dq || p->dbias_buf;
        for (int m = 0; m < p->n_mods; m++) need_q |= p->mods[m].grad != 0;
        if (need_q) {
            Scratches sc2(p->nthreads);
            parallel_for(P.B * P.Hkv * P.nqb, p->nthreads, [&](int64_t it, int tid) { dq_item(sc2[tid], it); });
        }
        free(delta); free(lse2);
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
