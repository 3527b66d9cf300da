/* Forward: FlashAttention-2 online softmax, fused, one pass over each K/V tile held in cache.
 *
 * Loop order: work items (batch b, KV head, q block[, key split]) over threads; inside an item the G query heads
 * of the KV head are stacked as R = G*Tq rows (GQA without copies: each K/V tile is packed once for all of
 * them), then key tiles in order: pack K transposed (D x Tk, fp32/fp64, bf16/fp16 converted here), pack V
 * (Tk x Dv, or read in place when it is fp32/fp64 with unit stride and nothing in the tile is dead), S = Q Kt
 * (register-blocked GEMM), the score pipeline (PARTIAL tiles: mask; bias/modifiers when present), running max,
 * exp2, row sum, dropout, O = alpha*O + P V (the rescale fused into the GEMM's load of O).
 * Tile sizes come from native.py (Tq 64-128 rows, Tk 128-256 keys): Q (R x D), Kt, V and S (R x Tk) together
 * stay within a core's 1-2 MiB L2 and one GEMM panel within L1.
 *
 * Decode (few rows, G*Tq <= 16): S is computed with dot products straight from the K rows (packing a transposed
 * tile would cost more than the math) and keys split across work items when B*Hkv*nqb is small; the splits'
 * (O, m, l) are merged in split order, so the result never depends on the thread count.
 *
 * Keys that no row of a tile may see ("dead") are zeroed in the packed K and V, so a NaN/Inf stored there never
 * meets a zero weight (0*NaN) in a GEMM; masked scores are replaced (selected), never added to.
 */
#include "tile.h"

namespace SA_NS {

#if SA_DPBF16
/* bf16 operands for vdpbf16ps (gemm_bf16), packed straight from the bf16 inputs (no rounding anywhere but P):
   Q rows and K^T as pairs along D, V as pairs along keys; odd tails padded with zeros */
static inline uint16_t bf_at(const void *x, int64_t i) { return ((const uint16_t *)x)[i]; }
static void pack_q2(uint32_t *dst, int64_t D2, const sa_params *p, int64_t off, int64_t D) {
    const int64_t s = p->sq[3];
    for (int64_t t = 0; t < D2; t++) {
        uint32_t lo = bf_at(p->q, off + 2 * t * s), hi = 2 * t + 1 < D ? bf_at(p->q, off + (2 * t + 1) * s) : 0;
        dst[t] = lo | hi << 16;
    }
}
static void pack_k2(uint32_t *dst, int64_t ld, const Prob &P, int64_t b, int64_t h, int64_t ks, int64_t nk) {
    const sa_params *p = P.p;
    const int64_t D = P.D, D2 = (D + 1) / 2, s = p->sk[3];
    for (int64_t j = 0; j < nk; j++) {
        const int64_t o = P.koff(b, h, ks + j);
        for (int64_t t = 0; t < D2; t++) {
            uint32_t lo = bf_at(p->k, o + 2 * t * s), hi = 2 * t + 1 < D ? bf_at(p->k, o + (2 * t + 1) * s) : 0;
            dst[t * ld + j] = lo | hi << 16;
        }
    }
    for (int64_t t = 0; t < D2; t++)
        for (int64_t j = nk; j < ld; j++) dst[t * ld + j] = 0;
}
/* keys ks..ks+nk in pairs: dst[t * ld + c] = (v[2t][c], v[2t+1][c]); keys past nk and dead keys (!sn[j]) are 0 */
static void pack_v2(uint32_t *dst, int64_t ld, const Prob &P, int64_t b, int64_t h, int64_t ks, int64_t nk,
                    const uint8_t *sn) {
    const sa_params *p = P.p;
    const int64_t nk2 = (nk + 1) / 2, s = p->sv[3];
    for (int64_t t = 0; t < nk2; t++) {
        const int64_t j = 2 * t;
        const bool a = !sn || sn[j], bb = j + 1 < nk && (!sn || sn[j + 1]);
        const int64_t o0 = P.voff(b, h, ks + j), o1 = P.voff(b, h, ks + j + 1);
        uint32_t *d = dst + t * ld;
        for (int64_t c = 0; c < P.Dv; c++) {
            uint32_t lo = a ? bf_at(p->v, o0 + c * s) : 0, hi = bb ? bf_at(p->v, o1 + c * s) : 0;
            d[c] = lo | hi << 16;
        }
        for (int64_t c = P.Dv; c < ld; c++) d[c] = 0;
    }
}
#endif

template <class C> struct Forward {
    const Prob &P;
    const sa_params *p;
    int64_t nsplit, kpb;  // key splits per (b, hkv, qb) and key blocks per split
    bool decode;
    C *part_o = nullptr, *part_m = nullptr, *part_l = nullptr;  // (nsplit, B, Hq, Nq, Dv) / (nsplit, B, Hq, Nq)
    Buf<C> parts_o, parts_m, parts_l;  // their own allocations (never in the arena)
    ArenaHold ah;     // declared before the buffers that live in it
    Buf<C> KT{ah, 1}; // (B, Hkv, nkb) tiles of K^T, (D x bkp) each: packed once per call, not once per q block
    Buf<C> VP{ah, 2}; // (B, Hkv, Nk, Dvp) V in the compute type, when it cannot be read in place
    bool v_inplace;
    int64_t bkp, Dvp;
    bool bf = false;   // bf16 inputs on AVX512_BF16: both GEMMs in vdpbf16ps (P rounded to bf16 once)
#if SA_DPBF16
    Buf<uint32_t> K2{ah, 3}, V2{ah, 4};  // call-wide bf16-pair packs (K^T tiles; V per head)
#endif

    explicit Forward(const Prob &pp) : P(pp), p(pp.p) {
        decode = P.G * P.bq <= 16;
        const int w = W<C>;
        bkp = round_up(P.bk, w);
        Dvp = round_up(P.Dv, w);
        v_inplace = (P.dt == SA_F32 || P.dt == SA_F64) && sizeof(C) == (P.dt == SA_F32 ? 4u : 8u) &&
                    p->sv[3] == 1 && P.Dv % w == 0;
#if SA_DPBF16
        bf = P.dt == SA_BF16 && sizeof(C) == 4 && !decode;
#endif
        int64_t items = P.B * P.Hkv * P.nqb;
        nsplit = 1;
        // fixed by the shape alone (never by the thread count): enough items for 16 threads
        if (items < 16 && P.nkb > 1) nsplit = smin<int64_t>(P.nkb, (16 + items - 1) / items);
        kpb = (P.nkb + nsplit - 1) / nsplit;
        nsplit = P.nkb ? (P.nkb + kpb - 1) / kpb : 1;
    }

    void item(Scratch &sc, int64_t it) {
        const int64_t split = it % nsplit;
        int64_t t = it / nsplit;
        const int64_t qb = t % P.nqb; t /= P.nqb;
        const int64_t hkv = t % P.Hkv, b = t / P.Hkv;
        const int64_t G = P.G, D = P.D, Dv = P.Dv, bk = P.bk;
        const int64_t qs = qb * P.bq, qe = smin<int64_t>(P.Nq, qs + P.bq), tq = qe - qs, R = G * tq;
        const int w = W<C>;
        C *Q = sc.get<C>(0, R * D);
        C *kbuf = sc.get<C>(1, D);
        C *Vp = sc.get<C>(2, bk * Dvp);
        C *S = sc.get<C>(3, R * bkp);
        C *O = sc.get<C>(4, R * Dvp);
        C *m = sc.get<C>(5, R), *l = sc.get<C>(6, R), *alpha = sc.get<C>(7, R);
        uint8_t *Mb = sc.get<uint8_t>(8, R * bk), *stack = sc.get<uint8_t>(9, P.depth * bk), *seen = sc.get<uint8_t>(10, bk);
        int64_t *lohi = sc.get<int64_t>(17, 2 * R);
        if (sc.bad) return;  // out of memory: the call returns -2
#if SA_DPBF16
        const int64_t D2 = (D + 1) / 2, bk32 = round_up(bk, 32);
        uint32_t *Q2 = bf ? sc.get<uint32_t>(13, R * D2) : nullptr;
        uint32_t *P2 = bf ? sc.get<uint32_t>(14, R * bk32 / 2) : nullptr;
        uint32_t *Kl2 = bf ? sc.get<uint32_t>(15, D2 * bkp) : nullptr;
        uint32_t *Vl2 = bf ? sc.get<uint32_t>(16, (bk / 2 + 1) * Dvp) : nullptr;
        if (bf) {
            S = sc.get<C>(3, R * bk32);
            if (sc.bad) return;
            for (int64_t g = 0; g < G; g++)
                for (int64_t ii = 0; ii < tq; ii++)
                    pack_q2(Q2 + (g * tq + ii) * D2, D2, p, P.qoff(b, hkv * G + g, qs + ii), D);
        } else
#endif
        for (int64_t g = 0; g < G; g++)
            pack_rows<C>(Q + g * tq * D, D, p->q, p->sq, b, hkv * G + g, qs, tq, D, P.dt, (C)P.qmul);
        for (int64_t r = 0; r < R; r++) { m[r] = -INFINITY; l[r] = 0; }
        memset(O, 0, sizeof(C) * R * Dvp);
        const Post<C> post(P);
        const C drop_scale = P.dropout ? (C)(1.0 / (1.0 - p->dropout_p)) : (C)1;
        const int64_t kb0 = split * kpb, kb1 = smin<int64_t>(P.nkb, kb0 + kpb);
        for (int64_t kb = kb0; kb < kb1; kb++) {
            const int cls = P.tile_class(b, hkv, qb, kb);
            if (cls == CLS_EMPTY) continue;
            const int64_t ks0 = kb * bk, nk_full = smin<int64_t>(P.Nk, ks0 + bk) - ks0;
            bool any_dead = false;
            int64_t j0 = 0, nk = nk_full;  // PARTIAL: keys j0 .. j0+nk are those some row of the tile sees
            int64_t r0 = 0, r1 = R;        // PARTIAL: rows r0 .. r1 see some key (the others skip the tile)
            // a lone causal / window mask allows one interval of keys per row: no byte masks, no dead keys inside
            const bool interval = cls == CLS_PARTIAL && p->n_prog == 1 &&
                                  (p->atoms[p->prog[0]].kind == SA_CAUSAL || p->atoms[p->prog[0]].kind == SA_WINDOW);
            if (interval) {
                const sa_atom &at = p->atoms[p->prog[0]];
                const int64_t left = at.kind == SA_WINDOW ? at.left : INT64_MAX / 4, right = at.kind == SA_WINDOW ? at.right : 0;
                int64_t a = nk_full, e = 0;
                r0 = R;
                r1 = 0;
                for (int64_t r = 0; r < R; r++) {
                    const int64_t qp = at.q0 + qs + r % tq, kp0 = at.k0 + ks0;  // row r: keys j with lo <= j < hi
                    const int64_t lo = smax<int64_t>(0, qp - left - kp0), hi = smin<int64_t>(nk_full, qp + right - kp0 + 1);
                    lohi[2 * r] = lo;
                    lohi[2 * r + 1] = hi;
                    if (lo < hi) { a = smin<int64_t>(a, lo); e = smax<int64_t>(e, hi); r0 = smin<int64_t>(r0, r); r1 = r + 1; }
                }
                if (decode) { r0 = 0; r1 = R; }
                if (a >= e) continue;
                if (bf) a &= ~(int64_t)1;
                j0 = a;
                nk = e - a;
            } else if (cls == CLS_PARTIAL) {
                memset(seen, 0, nk_full);
                r0 = R;
                r1 = 0;
                for (int64_t g = 0; g < G; g++)
                    for (int64_t ii = 0; ii < tq; ii++) {
                        const int64_t r = g * tq + ii;
                        uint8_t *row = Mb + r * nk_full;
                        mask_row(p, b, hkv * G + g, qs + ii, ks0, nk_full, row, stack);
                        uint8_t any = 0;
                        for (int64_t j = 0; j < nk_full; j++) { seen[j] |= row[j]; any |= row[j]; }
                        if (any) { r0 = smin<int64_t>(r0, r); r1 = r + 1; }
                    }
                if (decode) { r0 = 0; r1 = R; }
                // trim keys nobody sees at both ends (a causal diagonal tile, a window's edges): less work, and
                // those keys' V rows are never read
                int64_t a = 0, e = nk_full;
                while (a < e && !seen[a]) a++;
                while (e > a && !seen[e - 1]) e--;
                if (a == e) continue;
                if (bf) a &= ~(int64_t)1;  // bf16 pairs start at even keys of the tile
                j0 = a;
                nk = e - a;
                for (int64_t j = a; j < e; j++) any_dead |= !seen[j];
            }
            const int64_t ks = ks0 + j0, nkp = round_up(nk, w);
            const uint8_t *sn = seen + j0;
            int64_t lds = nkp;  // row stride of S (bf16: whole 32-float groups, converted pairwise into P2)
#if SA_DPBF16
            const int64_t nk2 = (nk + 1) / 2;
            if (bf) {
                lds = round_up(nk, 32);
                const uint32_t *kt2;
                if (K2.p) kt2 = K2.p + ((b * P.Hkv + hkv) * P.nkb + kb) * D2 * bkp + j0;
                else { pack_k2(Kl2, bkp, P, b, hkv, ks, nk); kt2 = Kl2; }
                gemm_bf16(r1 - r0, nkp, D2, Q2 + r0 * D2, D2, kt2, bkp, (float *)S + r0 * lds, lds, GEMM_SET);
                const float qm = (float)P.qmul;
                for (int64_t r = r0; r < r1; r++) {
                    float *row = (float *)S + r * lds;
                    for (int64_t j = 0; j < nk; j++) row[j] *= qm;
                }
            } else
#endif
            // S = Q K^T (R x nkp); a NaN in a masked key's row only reaches masked entries, which are selected away
            if (bf) {
            } else if (decode) {
                dot_scores(Q, R, b, hkv, ks, nk, nkp, S, any_dead ? sn : nullptr, kbuf);
            } else {
                const C *kt;
                if (KT.p) kt = KT.p + ((b * P.Hkv + hkv) * P.nkb + kb) * D * bkp + j0;  // may read past bkp: padded
                else {  // one item per head: each tile is used once, pack it here while it is hot
                    C *t = sc.get<C>(12, D * bkp);
                    if (!t) return;
                    pack_cols<C>(t, bkp, p->k, p->sk, b, hkv, ks, nk, D, P.dt, (C)1);
                    kt = t;
                }
                gemm<C>(r1 - r0, nkp, D, Q + r0 * D, D, kt, bkp, S + r0 * nkp, nkp, GEMM_SET);
            }
            // V operand: in place, or packed; keys nobody in the tile sees are zeroed (P = 0 must not meet NaN)
            const C *Vb = nullptr;
            int64_t ldv = 0;
            if (bf) {
            } else if (v_inplace) { Vb = (const C *)p->v + P.voff(b, hkv, ks); ldv = p->sv[2]; }
            else if (VP.p) { Vb = VP.p + ((b * P.Hkv + hkv) * P.Nk + ks) * Dvp; ldv = Dvp; }
            else { pack_rows<C>(Vp, Dvp, p->v, p->sv, b, hkv, ks, nk, Dv, P.dt, (C)1); Vb = Vp; ldv = Dvp; }
            if (any_dead && !bf) {
                for (int64_t j = 0; j < nk; j++) {
                    C *vr = Vp + j * Dvp;
                    if (!sn[j]) memset(vr, 0, sizeof(C) * Dvp);
                    else if (Vb != Vp) { memcpy(vr, Vb + j * ldv, sizeof(C) * Dv); for (int64_t c = Dv; c < Dvp; c++) vr[c] = 0; }
                }
                Vb = Vp;
                ldv = Dvp;
            }
            // scores -> probabilities, row by row
            for (int64_t r = r0; r < r1; r++) {
                C *row = S + r * lds;
                const int64_t g = r / tq, i = qs + r % tq, h = hkv * G + g;
                if (P.post)
                    for (int64_t j = 0; j < nk; j++) row[j] = post.apply(row[j], b, h, i, ks + j);
                if (interval) {
                    // [lo, hi) clipped to the trimmed tile (a row that sees nothing here gets lo = hi)
                    const int64_t lo = smin<int64_t>(nk, smax<int64_t>(0, lohi[2 * r] - j0));
                    const int64_t hi = smax<int64_t>(lo, smin<int64_t>(nk, lohi[2 * r + 1] - j0));
                    for (int64_t j = 0; j < lo; j++) row[j] = (C)-INFINITY;
                    for (int64_t j = hi; j < nk; j++) row[j] = (C)-INFINITY;
                } else if (cls == CLS_PARTIAL) {
                    const uint8_t *mr = Mb + r * nk_full + j0;
                    for (int64_t j = 0; j < nk; j++) row[j] = mr[j] ? row[j] : (C)-INFINITY;
                }
                const C mx = max_row<C>(row, nk);
                const C mnew = mx > m[r] ? mx : m[r];
                if (mnew == (C)-INFINITY) {  // nothing visible yet: weights 0, O stays 0 ...
                    alpha[r] = 1;
                    bool nan = false;
                    for (int64_t j = 0; j < nk; j++) nan |= row[j] != row[j];
                    if (!nan) {
                        memset(row, 0, sizeof(C) * lds);
                        continue;
                    }
                    // ... unless a visible score is NaN (max_row skips NaN): the softmax is NaN, like the
                    // reference's; NaN weights carry it into O, and l = NaN marks the row (finish_row, merge)
                    for (int64_t j = 0; j < nk; j++) row[j] = (C)NAN;
                    for (int64_t j = nk; j < lds; j++) row[j] = 0;
                    l[r] = (C)NAN;
                    continue;
                }
                // NaN scores that max_row skipped and +inf ones (inf - inf) reach exp2 as NaN: the sum is NaN
                alpha[r] = m[r] == (C)-INFINITY ? (C)0 : sexp2(m[r] - mnew);
                const C sum = exp2_row(row, nk, mnew);
                l[r] = alpha[r] * l[r] + sum;
                m[r] = mnew;
                if (P.dropout) {
                    const uint32_t hr = drop_row(drop_head(p, b, h), p->q_pos0 + i);
                    for (int64_t j = 0; j < nk; j++)
                        if (!drop_keep(p, hr, p->k_pos0 + ks + j)) row[j] = 0;
                }
                for (int64_t j = nk; j < lds; j++) row[j] = 0;
            }
#if SA_DPBF16
            if (bf) {  // P -> bf16 pairs (the one rounding of the bf16 path), O = alpha*O + P V in vdpbf16ps
                const int64_t ld2 = lds / 2;
                for (int64_t r = r0; r < r1; r++) {
                    const float *row = (const float *)S + r * lds;
                    uint32_t *pr = P2 + r * ld2;
                    for (int64_t j = 0; j < lds; j += 32) {
                        __m512bh hb = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + j + 16), _mm512_loadu_ps(row + j));
                        _mm512_storeu_si512((void *)(pr + j / 2), (__m512i)hb);
                    }
                }
                const uint32_t *vt2;
                // the call-wide V2 pairs keys (0, 1), (2, 3), ...: usable only where the tile starts at an even key
                // (an odd block_k starts every other tile at an odd one, which is packed here instead)
                if (V2.p && cls == CLS_FULL && (ks & 1) == 0) vt2 = V2.p + ((b * P.Hkv + hkv) * ((P.Nk + 1) / 2) + ks / 2) * Dvp;
                else { pack_v2(Vl2, Dvp, P, b, hkv, ks, nk, any_dead ? sn : nullptr); vt2 = Vl2; }
                gemm_bf16(r1 - r0, Dvp, nk2, P2 + r0 * ld2, ld2, vt2, Dvp, (float *)O + r0 * Dvp, Dvp, GEMM_SCALE_ADD,
                          (const float *)alpha + r0);
                continue;
            }
#endif
            gemm<C>(r1 - r0, Dvp, nk, S + r0 * nkp, nkp, Vb, ldv, O + r0 * Dvp, Dvp, GEMM_SCALE_ADD, alpha + r0);
        }
        // write the result (or this split's partial)
        for (int64_t r = 0; r < R; r++) {
            const int64_t g = r / tq, i = qs + r % tq, h = hkv * G + g;
            const int64_t row = (b * P.Hq + h) * P.Nq + i;
            if (nsplit > 1) {
                const int64_t pr = split * P.B * P.Hq * P.Nq + row;
                memcpy(part_o + pr * Dv, O + r * Dvp, sizeof(C) * Dv);
                part_m[pr] = m[r];
                part_l[pr] = l[r];
                continue;
            }
            finish_row(O + r * Dvp, m[r], l[r], b, h, i, row, drop_scale);
        }
    }

    /* lr = 0: nothing visible (out 0, lse -inf); lr NaN: a NaN or +inf score was visible (out and lse NaN) */
    void finish_row(const C *o, C mr, C lr, int64_t b, int64_t h, int64_t i, int64_t row, C drop_scale) {
        const bool seen = lr > 0 || lr != lr;
        const C inv = seen ? drop_scale / lr : (C)0;
        const int64_t oo = b * p->so[0] + h * p->so[1] + i * p->so[2];
        if (p->so[3] == 1 && sizeof(C) == (P.dt == SA_F32 ? 4u : P.dt == SA_F64 ? 8u : 0u)) {
            C *dst = (C *)p->out + oo;
            for (int64_t c = 0; c < P.Dv; c++) dst[c] = o[c] * inv;
        } else if (p->so[3] == 1 && P.dt == SA_BF16) {
            uint16_t *dst = (uint16_t *)p->out + oo;
            for (int64_t c = 0; c < P.Dv; c++) dst[c] = f_to_bf16((float)(o[c] * inv));
        } else
            for (int64_t c = 0; c < P.Dv; c++) store_as<C>(p->out, oo + c * p->so[3], P.dt, o[c] * inv);
        // in double: m + log2(l) rounded once (in float it lost ~3e-7 at |lse2| ~ 10, more than a plain logsumexp)
        ((C *)p->lse)[row] = seen ? (C)(((double)mr + log2((double)lr)) * LN2) : (C)-INFINITY;
    }

    /* merge the key splits of rows (b, h, i) in split order */
    void merge(Scratch &sc, int64_t bh) {
        const int64_t b = bh / P.Hq, h = bh % P.Hq, rows = P.B * P.Hq * P.Nq;
        C *o = sc.get<C>(11, P.Dv);
        if (!o) return;
        const C drop_scale = P.dropout ? (C)(1.0 / (1.0 - p->dropout_p)) : (C)1;
        for (int64_t i = 0; i < P.Nq; i++) {
            const int64_t row = (b * P.Hq + h) * P.Nq + i;
            C M = -INFINITY;
            bool nan = false;  // a split that saw a NaN / +inf score (l NaN) makes the row NaN
            for (int64_t s = 0; s < nsplit; s++) {
                M = smax<C>(M, part_m[s * rows + row]);
                nan |= part_l[s * rows + row] != part_l[s * rows + row];
            }
            C L = 0;
            for (int64_t c = 0; c < P.Dv; c++) o[c] = 0;
            if (nan) {
                L = (C)NAN;
                for (int64_t c = 0; c < P.Dv; c++) o[c] = (C)NAN;
            } else if (M != (C)-INFINITY)
                for (int64_t s = 0; s < nsplit; s++) {
                    const int64_t pr = s * rows + row;
                    if (part_l[pr] == 0) continue;
                    const C a = sexp2(part_m[pr] - M);
                    L += a * part_l[pr];
                    for (int64_t c = 0; c < P.Dv; c++) o[c] += a * part_o[pr * P.Dv + c];
                }
            finish_row(o, M, L, b, h, i, row, drop_scale);
        }
    }

    /* decode scores: S[r, j] = q_r . k_j straight from the K rows (dead keys give score 0, masked anyway) */
    void dot_scores(const C *Q, int64_t R, int64_t b, int64_t hkv, int64_t ks, int64_t nk, int64_t nkp, C *S,
                    const uint8_t *seen, C *kbuf) {
        const int64_t D = P.D;
        const int w = W<C>;
        const bool inplace = sizeof(C) == (P.dt == SA_F32 ? 4 : P.dt == SA_F64 ? 8 : 0) && p->sk[3] == 1;
        for (int64_t j = 0; j < nk; j++) {
            if (seen && !seen[j]) { for (int64_t r = 0; r < R; r++) S[r * nkp + j] = 0; continue; }
            const C *kr;
            // decode is a stream over K and V: fetch K a few keys ahead and this key's V row (read by the P V
            // GEMM after the tile's scores) while the dot products run
            if (j + 4 < nk) {
                const char *kn = (const char *)((const C *)p->k + P.koff(b, hkv, ks + j + 4));
                for (int64_t c = 0; c < D * (int64_t)sizeof(C); c += 64) __builtin_prefetch(kn + c, 0, 3);
            }
            if (P.dt == SA_F32 || P.dt == SA_F64) {
                const char *vn = (const char *)p->v + P.voff(b, hkv, ks + j) * (int64_t)sizeof(C);
                for (int64_t c = 0; c < P.Dv * (int64_t)sizeof(C); c += 64) __builtin_prefetch(vn + c, 0, 2);
            }
            if (inplace) kr = (const C *)p->k + P.koff(b, hkv, ks + j);
            else { load_row<C>(kbuf, p->k, P.koff(b, hkv, ks + j), p->sk[3], D, P.dt, (C)1); kr = kbuf; }
            int64_t r = 0;
            for (; r + 4 <= R; r += 4) {
                V<C> a0 = {}, a1 = {}, a2 = {}, a3 = {};
                C t0 = 0, t1 = 0, t2 = 0, t3 = 0;
                int64_t d = 0;
                const C *q0 = Q + r * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
                for (; d + w <= D; d += w) {
                    V<C> kv = vload(kr + d);
                    a0 += vload(q0 + d) * kv; a1 += vload(q1 + d) * kv; a2 += vload(q2 + d) * kv; a3 += vload(q3 + d) * kv;
                }
                for (; d < D; d++) { t0 += q0[d] * kr[d]; t1 += q1[d] * kr[d]; t2 += q2[d] * kr[d]; t3 += q3[d] * kr[d]; }
                S[r * nkp + j] = hsum_fast<C>(a0) + t0; S[(r + 1) * nkp + j] = hsum_fast<C>(a1) + t1;
                S[(r + 2) * nkp + j] = hsum_fast<C>(a2) + t2; S[(r + 3) * nkp + j] = hsum_fast<C>(a3) + t3;
            }
            for (; r < R; r++) {
                V<C> a0 = {};
                C t0 = 0;
                int64_t d = 0;
                const C *q0 = Q + r * D;
                for (; d + w <= D; d += w) a0 += vload(q0 + d) * vload(kr + d);
                for (; d < D; d++) t0 += q0[d] * kr[d];
                S[r * nkp + j] = hsum_fast<C>(a0) + t0;
            }
        }
    }

    int run() {
        const int64_t items = P.B * P.Hkv * P.nqb * nsplit;
        if (P.Nk == 0 || P.nkb == 0) {  // no keys: every row is empty
            for (int64_t b = 0; b < P.B; b++)
                for (int64_t h = 0; h < P.Hq; h++)
                    for (int64_t i = 0; i < P.Nq; i++) {
                        const int64_t oo = b * p->so[0] + h * p->so[1] + i * p->so[2];
                        for (int64_t c = 0; c < P.Dv; c++) store_as<C>(p->out, oo + c * p->so[3], P.dt, (C)0);
                        ((C *)p->lse)[(b * P.Hq + h) * P.Nq + i] = (C)-INFINITY;
                    }
            return 0;
        }
        if (nsplit > 1) {
            const int64_t rows = P.B * P.Hq * P.Nq;
            if (!parts_o.alloc(nsplit * rows * (P.Dv ? P.Dv : 1)) || !parts_m.alloc(nsplit * rows) ||
                !parts_l.alloc(nsplit * rows))
                return out_of_memory(ah);  // what was taken goes back with the Bufs
            part_o = parts_o.p; part_m = parts_m.p; part_l = parts_l.p;
        }
        const int64_t heads = P.B * P.Hkv;
#if SA_DPBF16
        if (bf && P.nqb * nsplit > 1) {
            const int64_t D2 = (P.D + 1) / 2, N2 = (P.Nk + 1) / 2;
            if (!K2.alloc(heads * P.nkb * D2 * bkp + bkp) || !V2.alloc(heads * N2 * Dvp)) return out_of_memory(ah);
            parallel_for(heads * P.nkb, p->nthreads, [&](int64_t it, int) {
                const int64_t kb = it % P.nkb, bh = it / P.nkb, ks = kb * P.bk;
                pack_k2(K2.p + it * D2 * bkp, bkp, P, bh / P.Hkv, bh % P.Hkv, ks, smin<int64_t>(P.Nk, ks + P.bk) - ks);
            });
            parallel_for(heads, p->nthreads, [&](int64_t bh, int) {
                pack_v2(V2.p + bh * N2 * Dvp, Dvp, P, bh / P.Hkv, bh % P.Hkv, 0, P.Nk, nullptr);
            });
        }
#endif
        if (!bf && !decode && P.nqb * nsplit > 1) {  // several items read each K/V tile: pack them once for all
            if (!KT.alloc(heads * P.nkb * P.D * bkp + bkp)) return out_of_memory(ah);  // + a row: trimmed tiles read past their end
            parallel_for(heads * P.nkb, p->nthreads, [&](int64_t it, int) {
                const int64_t kb = it % P.nkb, bh = it / P.nkb, ks = kb * P.bk;
                pack_cols<C>(KT.p + it * P.D * bkp, bkp, p->k, p->sk, bh / P.Hkv, bh % P.Hkv, ks,
                             smin<int64_t>(P.Nk, ks + P.bk) - ks, P.D, P.dt, (C)1);
            });
            if (!v_inplace) {
                if (!VP.alloc(heads * P.Nk * Dvp)) return out_of_memory(ah);
                parallel_for(heads, p->nthreads, [&](int64_t bh, int) {
                    pack_rows<C>(VP.p + bh * P.Nk * Dvp, Dvp, p->v, p->sv, bh / P.Hkv, bh % P.Hkv, 0, P.Nk, P.Dv,
                                 P.dt, (C)1);
                });
            }
        }
        Scratches sc(p->nthreads, ah);
        if (!sc.ok()) return out_of_memory(ah);
        parallel_for(items, p->nthreads, [&](int64_t it, int tid) { item(sc[tid], it); });
        if (nsplit > 1 && sc.ok())
            parallel_for(P.B * P.Hq, p->nthreads, [&](int64_t bh, int tid) { merge(sc[tid], bh); });
        return sc.ok() ? 0 : out_of_memory(ah);
    }
};

int forward(sa_params *p) {
    Prob P(p, p->bq, p->bk);
    if (p->dtype == SA_F64) { Forward<double> f(P); return f.run(); }
    Forward<float> f(P);
    return f.run();
}

}  // namespace SA_NS
