/* The one matrix-multiply microkernel every pass uses: C (M x N) = [alpha_r *] C + A (M x K) . B (K x N).
 *
 * A is row-major with any row stride (its elements are broadcast one at a time), B is a packed row-major panel
 * whose N is a multiple of the vector width W (callers zero-pad), C row-major. Register blocking: MR rows x NV
 * vectors of accumulators stay in registers for the whole K loop (AVX-512: 6 x 4 zmm = 24 of 32 registers; AVX2
 * and the portable build: 6 x 2 = 12 of 16). Loop order: column panels outside, rows inside, so one B panel
 * (K x NV*W, 16 KiB for K = 64 on AVX-512) stays in L1 while every row block streams over it.
 *
 * Every C element is a sum over k = 0..K-1 in order, whatever M, N and the blocking: the same dot product
 * computed in another pass (the backward recomputes S) gives the same bits.
 */
#pragma once
#include "simd.h"

namespace SA_NS {

#if SA_VBYTES >= 64
constexpr int NVMAX = 4;
#else
constexpr int NVMAX = 2;
#endif
constexpr int MR = 6;

enum { GEMM_SET = 0, GEMM_ADD = 1, GEMM_SCALE_ADD = 2 };

template <class T, int R, int NV>
static inline void micro(int64_t K, const T *A, int64_t lda, int64_t aks, const T *B, int64_t ldb, T *Cm, int64_t ldc,
                         int mode, const T *alpha) {
    constexpr int w = W<T>;
    V<T> acc[R][NV];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) {
            if (mode == GEMM_SET) acc[r][v] = V<T>{};
            else if (mode == GEMM_ADD) acc[r][v] = vload(Cm + r * ldc + v * w);
            else acc[r][v] = vload(Cm + r * ldc + v * w) * alpha[r];
        }
    for (int64_t k = 0; k < K; k++) {
        V<T> b[NV];
        for (int v = 0; v < NV; v++) b[v] = vload(B + k * ldb + v * w);
        for (int r = 0; r < R; r++) {
            V<T> a = vset<T>(A[r * lda + k * aks]);
            for (int v = 0; v < NV; v++) acc[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) vstore(Cm + r * ldc + v * w, acc[r][v]);
}

template <class T, int NV>
static inline void rows_panel(int64_t M, int64_t K, const T *A, int64_t lda, int64_t aks, const T *B, int64_t ldb,
                              T *Cm, int64_t ldc, int mode, const T *alpha) {
    int64_t r = 0;
    for (; r + MR <= M; r += MR)
        micro<T, MR, NV>(K, A + r * lda, lda, aks, B, ldb, Cm + r * ldc, ldc, mode, alpha ? alpha + r : nullptr);
    const T *a = A + r * lda;
    T *c = Cm + r * ldc;
    const T *al = alpha ? alpha + r : nullptr;
    switch (M - r) {
    case 1: micro<T, 1, NV>(K, a, lda, aks, B, ldb, c, ldc, mode, al); break;
    case 2: micro<T, 2, NV>(K, a, lda, aks, B, ldb, c, ldc, mode, al); break;
    case 3: micro<T, 3, NV>(K, a, lda, aks, B, ldb, c, ldc, mode, al); break;
    case 4: micro<T, 4, NV>(K, a, lda, aks, B, ldb, c, ldc, mode, al); break;
    case 5: micro<T, 5, NV>(K, a, lda, aks, B, ldb, c, ldc, mode, al); break;
    default: break;
    }
}

/* N must be a multiple of W<T>; K may be 0 (then C = 0, C or alpha*C). A[r, k] is at A[r * lda + k * aks]:
   aks = 1 row-major, lda = 1 and aks = ld for a transposed A (the backward's dS^T as dS) */
template <class T>
static inline void gemm_s(int64_t M, int64_t N, int64_t K, const T *A, int64_t lda, int64_t aks, const T *B,
                          int64_t ldb, T *Cm, int64_t ldc, int mode, const T *alpha = nullptr) {
    constexpr int w = W<T>;
    int64_t n = 0;
    for (; n + NVMAX * w <= N; n += NVMAX * w) rows_panel<T, NVMAX>(M, K, A, lda, aks, B + n, ldb, Cm + n, ldc, mode, alpha);
    if (NVMAX > 2 && n + 2 * w <= N) { rows_panel<T, 2>(M, K, A, lda, aks, B + n, ldb, Cm + n, ldc, mode, alpha); n += 2 * w; }
    for (; n + w <= N; n += w) rows_panel<T, 1>(M, K, A, lda, aks, B + n, ldb, Cm + n, ldc, mode, alpha);
}

template <class T>
static inline void gemm(int64_t M, int64_t N, int64_t K, const T *A, int64_t lda, const T *B, int64_t ldb, T *Cm,
                        int64_t ldc, int mode, const T *alpha = nullptr) {
    gemm_s<T>(M, N, K, A, lda, 1, B, ldb, Cm, ldc, mode, alpha);
}

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace SA_NS

#if SA_DPBF16
/* AVX512_BF16: C (M x N, fp32) = [alpha_r *] C + A . B with A and B in bf16 pairs along K: A[r, t] is the uint32
 * holding elements (2t, 2t+1) of row r, B[t, n] the uint32 holding (B[2t, n], B[2t+1, n]). vdpbf16ps multiplies
 * the bf16 pairs exactly and adds both products into the fp32 accumulator: twice the products per instruction of
 * an fp32 FMA. Same blocking as gemm(). */
namespace SA_NS {
template <int R, int NV>
static inline void micro_bf16(int64_t K2, const uint32_t *A, int64_t lda, const uint32_t *B, int64_t ldb, float *Cm,
                              int64_t ldc, int mode, const float *alpha) {
    __m512 acc[R][NV];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) {
            if (mode == GEMM_SET) acc[r][v] = _mm512_setzero_ps();
            else if (mode == GEMM_ADD) acc[r][v] = _mm512_loadu_ps(Cm + r * ldc + v * 16);
            else acc[r][v] = _mm512_mul_ps(_mm512_loadu_ps(Cm + r * ldc + v * 16), _mm512_set1_ps(alpha[r]));
        }
    for (int64_t t = 0; t < K2; t++) {
        __m512bh b[NV];
        for (int v = 0; v < NV; v++) b[v] = (__m512bh)_mm512_loadu_si512((const void *)(B + t * ldb + v * 16));
        for (int r = 0; r < R; r++) {
            __m512bh a = (__m512bh)_mm512_set1_epi32((int)A[r * lda + t]);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(Cm + r * ldc + v * 16, acc[r][v]);
}

template <int NV>
static inline void rows_panel_bf16(int64_t M, int64_t K2, const uint32_t *A, int64_t lda, const uint32_t *B,
                                   int64_t ldb, float *Cm, int64_t ldc, int mode, const float *alpha) {
    int64_t r = 0;
    for (; r + MR <= M; r += MR)
        micro_bf16<MR, NV>(K2, A + r * lda, lda, B, ldb, Cm + r * ldc, ldc, mode, alpha ? alpha + r : nullptr);
    const uint32_t *a = A + r * lda;
    float *c = Cm + r * ldc;
    const float *al = alpha ? alpha + r : nullptr;
    switch (M - r) {
    case 1: micro_bf16<1, NV>(K2, a, lda, B, ldb, c, ldc, mode, al); break;
    case 2: micro_bf16<2, NV>(K2, a, lda, B, ldb, c, ldc, mode, al); break;
    case 3: micro_bf16<3, NV>(K2, a, lda, B, ldb, c, ldc, mode, al); break;
    case 4: micro_bf16<4, NV>(K2, a, lda, B, ldb, c, ldc, mode, al); break;
    case 5: micro_bf16<5, NV>(K2, a, lda, B, ldb, c, ldc, mode, al); break;
    default: break;
    }
}

/* N a multiple of 16; K2 = pairs along K (an odd K is padded with a zero element by the packers) */
static inline void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t *A, int64_t lda, const uint32_t *B,
                             int64_t ldb, float *Cm, int64_t ldc, int mode, const float *alpha = nullptr) {
    int64_t n = 0;
    for (; n + 64 <= N; n += 64) rows_panel_bf16<4>(M, K2, A, lda, B + n, ldb, Cm + n, ldc, mode, alpha);
    if (n + 32 <= N) { rows_panel_bf16<2>(M, K2, A, lda, B + n, ldb, Cm + n, ldc, mode, alpha); n += 32; }
    for (; n + 16 <= N; n += 16) rows_panel_bf16<1>(M, K2, A, lda, B + n, ldb, Cm + n, ldc, mode, alpha);
}
}  // namespace SA_NS
#endif
