/* lowbit's CPU helper kernels, compiled at first use by lowbit.runtime.native (cc -O3
 * -march=native) and called through ctypes (which releases the GIL). Plain C99 + pthreads,
 * no torch headers: every function takes raw pointers and sizes, and the Python side checks
 * dtypes, shapes and contiguity before calling.
 *
 * lb_int4pack_dequant_t: torch's CPU int4 packed weight (torch._convert_weight_to_int4pack_for_cpu
 * of an [N, K] matrix of q_u = code + 8 in 0..15) and its [G, N, 2] (scale, zero) table, both as
 * torch's _weight_int4pack_mm_for_cpu reads them, dequantized to the TRANSPOSED bfloat16
 * weight W^T [K, N]: W^T[k, n] = bf16((q_u - 8) * scale[g, n] + zero[g, n]), g = k / group.
 * The packed layout is [N / BN, K, BN / 2] bytes: byte j of row (nb, k) holds column
 * nb * BN + j in its low nibble and nb * BN + BN / 2 + j in its high nibble (BN is 64 on
 * AVX-512 builds of torch; the Python side finds it by packing a probe matrix). Rows k of
 * W^T are split across `threads` threads.
 */
#include <pthread.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LB_AVX512BF16 1
#endif
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even (finite inputs) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

typedef struct {
    const uint8_t *packed;
    const uint16_t *sz;
    uint16_t *out;
    int64_t n, k, bn, group, k0, k1;
} dq_job;

/* one row block: `half` columns from the low nibbles, `half` from the high ones */
static inline void dequant_run(const uint8_t *__restrict p, const float *__restrict sc,
                               const float *__restrict ze, uint16_t *__restrict o, int64_t half) {
#ifdef LB_AVX512BF16
    if (half == 32) {  /* 32 bytes -> 64 bf16: low nibbles to o[0:32], high to o[32:64] */
        const __m256i b = _mm256_loadu_si256((const __m256i *)p);
        const __m256i m = _mm256_set1_epi8(15);
        const __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
        const __m256i src[2] = {lo, hi};
        for (int h = 0; h < 2; h++) {
            __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(src[h])));
            __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(src[h], 1)));
            f0 = _mm512_fmadd_ps(f0, _mm512_loadu_ps(sc + 32 * h), _mm512_loadu_ps(ze + 32 * h));
            f1 = _mm512_fmadd_ps(f1, _mm512_loadu_ps(sc + 32 * h + 16), _mm512_loadu_ps(ze + 32 * h + 16));
            _mm512_storeu_si512((void *)(o + 32 * h), (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
        }
        return;
    }
#endif
    for (int64_t c = 0; c < half; c++)
        o[c] = f32_to_bf16((float)(p[c] & 15) * sc[c] + ze[c]);
    for (int64_t c = 0; c < half; c++)
        o[c + half] = f32_to_bf16((float)(p[c] >> 4) * sc[c + half] + ze[c + half]);
}

#define DEQUANT_ROWS(NAME, HALF)                                                             \
    static void NAME(const dq_job *j) {                                                      \
        const int64_t N = j->n, K = j->k, BN = j->bn, NB = j->n / j->bn;                     \
        const int64_t half = (HALF) ? (HALF) : j->bn / 2;                                    \
        float sc[512], ze[512]; /* one column block's scale/zero (BN <= 512) */             \
        for (int64_t nb = 0; nb < NB; nb++) {                                                \
            int64_t g_cur = -1;                                                              \
            for (int64_t k = j->k0; k < j->k1; k++) {                                        \
                int64_t g = k / j->group;                                                    \
                if (g != g_cur) {                                                            \
                    const uint16_t *s = j->sz + (g * N + nb * BN) * 2;                       \
                    for (int64_t c = 0; c < BN; c++) {                                       \
                        sc[c] = bf16_to_f32(s[2 * c]);                                       \
                        ze[c] = bf16_to_f32(s[2 * c + 1]) - 8.0f * sc[c];                    \
                    }                                                                        \
                    g_cur = g;                                                               \
                }                                                                            \
                dequant_run(j->packed + (nb * K + k) * half, sc, ze, j->out + k * N + nb * BN, \
                            half);                                                           \
            }                                                                                \
        }                                                                                    \
    }

DEQUANT_ROWS(dequant_rows_any, 0)
DEQUANT_ROWS(dequant_rows_32, 32)
DEQUANT_ROWS(dequant_rows_16, 16)

static void dequant_rows(const dq_job *j) {
    if (j->bn == 64) dequant_rows_32(j);
    else if (j->bn == 32) dequant_rows_16(j);
    else dequant_rows_any(j);
}

static void *dequant_thread(void *arg) {
    dequant_rows((const dq_job *)arg);
    return NULL;
}

/* returns 0, or -1 for bad sizes */
int lb_int4pack_dequant_t(const uint8_t *packed, const uint16_t *sz, uint16_t *out, int64_t n,
                          int64_t k, int64_t bn, int64_t group, int64_t threads) {
    if (bn <= 0 || bn > 512 || bn % 2 || n % bn || group <= 0 || k % group || threads < 1)
        return -1;
    if (threads > 64) threads = 64;
    if (threads > k) threads = k;
    dq_job jobs[64];
    pthread_t tids[64];
    int started[64] = {0};
    int64_t step = (k + threads - 1) / threads;
    for (int64_t t = 0; t < threads; t++) {
        dq_job jb = {packed, sz, out, n, k, bn, group, t * step, (t + 1) * step < k ? (t + 1) * step : k};
        jobs[t] = jb;
    }
    for (int64_t t = 1; t < threads; t++)
        started[t] = pthread_create(&tids[t], NULL, dequant_thread, &jobs[t]) == 0;
    dequant_rows(&jobs[0]);
    for (int64_t t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        else dequant_rows(&jobs[t]);  /* no thread: run its rows here */
    }
    return 0;
}
