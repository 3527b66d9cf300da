/* SIMD helpers, compiled once per instruction set (SA_NS names the namespace, SA_VBYTES the vector width):
 * GCC vector extensions, so one source serves AVX-512 (64-byte vectors), AVX2+FMA (32) and the portable build
 * (16 bytes: whatever the compiler's baseline target has, SSE2 on x86-64). -ffp-contract=fast turns a*b+c into
 * FMA where the ISA has it.
 *
 * exp2f: Cephes' degree-6 polynomial on [-0.5, 0.5] after rounding to the nearest integer (max rel. error
 * ~1.7e-7, about 1.5 ulp); arguments below -126 give exactly 0, so a masked score (-inf) has weight 0 and
 * never produces NaN or a denormal; a NaN argument (a NaN score, inf - inf) gives NaN, as exp2 does. float64 uses the libm exp2 (fp64 serves gradcheck, not speed).
 */
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#if SA_VBYTES >= 32
#include <immintrin.h>
#endif

#include "abi.h"

namespace SA_NS {

constexpr int VB = SA_VBYTES;
template <class T> struct VecT { typedef T type __attribute__((vector_size(VB))); };
template <class T> using V = typename VecT<T>::type;
template <class T> constexpr int W = VB / (int)sizeof(T);
typedef V<float> vf;
typedef V<int32_t> vi;

template <class T> static inline V<T> vload(const T *p) { V<T> v; memcpy(&v, p, sizeof v); return v; }
template <class T> static inline void vstore(T *p, V<T> v) { memcpy(p, &v, sizeof v); }
// a broadcast: x - 0 is the identity for every x (0 + x is not, for x = -0), so the compiler drops the subtraction
template <class T> static inline V<T> vset(T x) { return x - V<T>{}; }
template <class T> static inline V<T> vmax(V<T> a, V<T> b) { return a > b ? a : b; }

template <class T> static inline T hmax(V<T> v) {
    T m = v[0];
    for (int i = 1; i < W<T>; i++) m = v[i] > m ? v[i] : m;
    return m;
}
template <class T> static inline T hsum(V<T> v) {
    T s = 0;
    for (int i = 0; i < W<T>; i++) s += v[i];
    return s;
}
/* float sums by halving (log2 W shuffles instead of W scalar adds): the decode path reduces one dot product per
   key and row */
#if SA_VBYTES == 64
static inline float hsumf(vf v) {  // vector-extension halving (the intrinsics trip a GCC 12 header warning)
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
    v8 y = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 z = __builtin_shufflevector(y, y, 0, 1, 2, 3) + __builtin_shufflevector(y, y, 4, 5, 6, 7);
    return (z[0] + z[2]) + (z[1] + z[3]);
}
#elif SA_VBYTES == 32
static inline float hsumf(vf v) {
    __m256 x; memcpy(&x, &v, 32);
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
    return _mm_cvtss_f32(a);
}
#else
static inline float hsumf(vf v) { return hsum<float>(v); }
#endif
template <class T> static inline T hsum_fast(V<T> v) { return hsum<T>(v); }
template <> inline float hsum_fast<float>(V<float> v) { return hsumf(v); }

static inline vf vexp2(vf x) {
    const vf lo = vset<float>(-126.0f);
    vi zero = x < lo;  // -1 where the result is flushed to exactly 0
    vi nan = x != x;   // NaN in, NaN out (the integer tricks below would turn it into a number)
    x = x < lo ? lo : x;
    x = x > vset<float>(127.0f) ? vset<float>(127.0f) : x;
    const vf magic = vset<float>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
    vf t = x + magic;
    vi n;
    memcpy(&n, &t, sizeof n);
    n -= vset<int32_t>(0x4B400000);
    vf f = x - (t - magic);  // in [-0.5, 0.5]
    vf p = vset<float>(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    vi pi;
    memcpy(&pi, &p, sizeof pi);
    pi += n << 23;
    pi &= ~zero;
    pi |= nan & vset<int32_t>(0x7fc00000);
    vf r;
    memcpy(&r, &pi, sizeof r);
    return r;
}

static inline float sexp2(float x) {
    vf v = vset<float>(x);
    return vexp2(v)[0];
}
static inline double sexp2(double x) { return x < -1022.0 ? 0.0 : exp2(x); }

/* y[j] = exp2(x[j] - c), n any; returns the sum of the results (fixed order: vector lanes, then the tail) */
static inline float exp2_row(float *x, int64_t n, float c) {
    vf acc = {};
    vf cv = vset<float>(c);
    int64_t j = 0;
    for (; j + W<float> <= n; j += W<float>) {
        vf e = vexp2(vload(x + j) - cv);
        vstore(x + j, e);
        acc += e;
    }
    float s = hsum<float>(acc);
    for (; j < n; j++) {
        float e = sexp2(x[j] - c);
        x[j] = e;
        s += e;
    }
    return s;
}
static inline double exp2_row(double *x, int64_t n, double c) {
    double s = 0;
    for (int64_t j = 0; j < n; j++) {
        double e = sexp2(x[j] - c);
        x[j] = e;
        s += e;
    }
    return s;
}

template <class T> static inline T max_row(const T *x, int64_t n) {
    V<T> m = vset<T>(-INFINITY);
    int64_t j = 0;
    for (; j + W<T> <= n; j += W<T>) m = vmax<T>(m, vload(x + j));
    T r = hmax<T>(m);
    for (; j < n; j++) r = x[j] > r ? x[j] : r;
    return r;
}

/* ---- loads of the input dtypes into the compute type ---- */
static inline float bf16_to_f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float f16_to_f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        if (m == 0) u = s;
        else {  // subnormal: normalise
            int sh = 0;
            while (!(m & 0x400)) { m <<= 1; sh++; }
            m &= 0x3ff;
            u = s | ((uint32_t)(113 - sh) << 23) | (m << 13);
        }
    } else if (e == 31) u = s | 0x7f800000u | (m << 13);
    else u = s | ((e + 112) << 23) | (m << 13);
    float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t f_to_bf16(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
static inline uint16_t f_to_f16(float f) {  // round to nearest even
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t s = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(s | 0x7e00);
    if (a >= 0x477ff000u) return (uint16_t)(s | 0x7c00);  // rounds to >= 65520: inf
    if (a < 0x38800000u) {  // subnormal half (or zero): m * 2^-24, scaling by 2^24 is exact
        float x; memcpy(&x, &a, 4);
        return (uint16_t)(s | (uint32_t)nearbyintf(x * 16777216.0f));
    }
    uint32_t e = (a >> 23) - 112, m = a & 0x7fffff;
    uint32_t q = (e << 10) | (m >> 13), rem = m & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (q & 1))) q++;
    return (uint16_t)(s | q);
}

template <class C> static inline C load_as(const void *p, int64_t i, int dt) {
    switch (dt) {
    case SA_F32: return (C)((const float *)p)[i];
    case SA_F64: return (C)((const double *)p)[i];
    case SA_BF16: return (C)bf16_to_f(((const uint16_t *)p)[i]);
    default: return (C)f16_to_f(((const uint16_t *)p)[i]);
    }
}
template <class C> static inline void store_as(void *p, int64_t i, int dt, C x) {
    switch (dt) {
    case SA_F32: ((float *)p)[i] = (float)x; break;
    case SA_F64: ((double *)p)[i] = (double)x; break;
    case SA_BF16: ((uint16_t *)p)[i] = f_to_bf16((float)x); break;
    default: ((uint16_t *)p)[i] = f_to_f16((float)x); break;
    }
}

/* row of n elements with element stride s -> dst (compute type), scaled */
template <class C> static inline void load_row(C *dst, const void *src, int64_t off, int64_t s, int64_t n, int dt, C mul) {
    if (dt == SA_F32 && s == 1) {
        const float *p = (const float *)src + off;
        for (int64_t i = 0; i < n; i++) dst[i] = (C)p[i] * mul;
    } else if (dt == SA_F64 && s == 1) {
        const double *p = (const double *)src + off;
        for (int64_t i = 0; i < n; i++) dst[i] = (C)p[i] * mul;
    } else if (dt == SA_BF16 && s == 1) {
        const uint16_t *p = (const uint16_t *)src + off;
        for (int64_t i = 0; i < n; i++) { uint32_t u = (uint32_t)p[i] << 16; float f; memcpy(&f, &u, 4); dst[i] = (C)f * mul; }
    } else {
        for (int64_t i = 0; i < n; i++) dst[i] = load_as<C>(src, off + i * s, dt) * mul;
    }
}

}  // namespace SA_NS
