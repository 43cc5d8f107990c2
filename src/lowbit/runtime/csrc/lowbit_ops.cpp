// lowbit's CPU int4 GEMV as a torch operator (namespace `lowbit`), compiled at first use by
// lowbit.runtime.native (c++ -O3 -march=native against the installed torch's headers) and
// loaded with torch.ops.load_library, so that a decode step captured by torch.compile calls
// it through torch's dispatcher like any aten kernel (no Python in between).
//
// lowbit::int4_mm(x [M, K] bf16, packed uint8, scale_zeros [K / group, N, 2] bf16, group) -> [M, N] bf16
//   torch's CPU int4 packed weight (torch._convert_weight_to_int4pack_for_cpu of q_u = code + 8,
//   blocks of 64 output channels: [N / 64, K, 32] bytes, byte j of row (nb, k) holds channel
//   nb * 64 + j in its low nibble and nb * 64 + 32 + j in its high one; the Python side checks
//   the block size on a probe), the same operands as torch._weight_int4pack_mm_for_cpu and the
//   same function: y = x W^T with W[n, k] = (q_u - 8) * scale[g, n] + zero[g, n], g = k / group,
//   float32 accumulation, rounded once to bfloat16.
//
//   How: rows k and k + 1 of a block (64 bytes) are spread by one byte permutation (vpermb) into
//   32-bit lanes holding a bfloat16 pair per output channel, and one vdpbf16ps does 32
//   multiply-adds against the pair (x[k], x[k + 1]). A 4-bit code q_u becomes the bfloat16
//   128 + q_u by OR-ing its bits into 0x4300 (exact), so per group
//   sum((q_u - 8) x) = acc - 136 * sum(x), and y += scale * acc + (zero - 136 * scale) * sum(x).
//   The products are exact in float32; only the order of the float32 sums differs from torch's
//   kernel (the Python side compares the two on a probe before using this one).
//
// lowbit::bf16_mm(x [M, K] bf16, w [N, K] bf16) -> [M, N] bf16
//   y = x w^T as torch.mm/torch.mv compute it for bfloat16 (float32 accumulation, one rounding):
//   a decode row through a bfloat16 weight (a bfloat16 model's linears, an unquantized LM head).
//   One row of w at a time, one vdpbf16ps per 32 multiply-adds.
//
// lowbit::int8_mm(x [M, K] bf16, w [N, K] int8, scale [N] bf16) -> [M, N] bf16
//   y[m, n] = scale[n] * sum_k w[n, k] x[m, k] as torch._weight_int8pack_mm computes it (float32
//   accumulation, one rounding): an int8 weight-only layer's decode row. One weight row at a
//   time (int8 -> float32, FMA against x in float32).
//
// lowbit::decode_attn(q [H, d], k [n_kv, L, d], v [n_kv, L, d], pos int64 [1], scale) -> [H, d]
//   attention of one query position over the cache positions 0..pos (grouped-query heads: query
//   head h reads key/value head h / (H / n_kv)), in float32 (scores, softmax, weighted sum),
//   rounded once to q's dtype (bfloat16 or float32). Reads only the filled part of the cache.
//
// M is small (decode: 1). Blocks of 64 output channels are split across torch's intra-op
// threads (at::parallel_for). Needs AVX-512 F/BW/VBMI/BF16 (Zen 4, Sapphire Rapids and later).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t round_bf16(float f) {  // nearest even (finite values)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define LB_HAVE_KERNEL 1
// 16 floats -> 16 bfloat16 at y, rounded to nearest even (finite values)
inline void store16(uint16_t *y, __m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(
        u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                            _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(y), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
#endif

at::Tensor int4_mm(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &sz,
                   int64_t group) {
    TORCH_CHECK(sz.dim() == 3 && sz.size(2) == 2 && sz.scalar_type() == at::kBFloat16 &&
                    sz.is_contiguous(),
                "lowbit::int4_mm: scale_zeros must be contiguous bfloat16 [G, N, 2]");
    const int64_t N = sz.size(1), G = sz.size(0), K = G * group;
    TORCH_CHECK(group >= 2 && group % 2 == 0 && N % 64 == 0, "lowbit::int4_mm: group ", group,
                " and N ", N, " (need an even group and N a multiple of 64)");
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                    packed.numel() * 2 == N * K,
                "lowbit::int4_mm: packed must be ", N * K / 2, " contiguous uint8 bytes");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous() && x.device().is_cpu() &&
                    x.scalar_type() == at::kBFloat16,
                "lowbit::int4_mm: x must be a contiguous CPU [M, ", K, "] bfloat16 matrix");
    const int64_t M = x.size(0), NB = N / 64;
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0) return y;
#ifdef LB_HAVE_KERNEL
    std::vector<float> xs(M * G);  // sum of x over each group
    {
        const uint16_t *p = reinterpret_cast<const uint16_t *>(x.data_ptr<at::BFloat16>());
        for (int64_t i = 0; i < M * G; i++) {
            float s = 0.f;
            for (int64_t k = 0; k < group; k++) s += bf16_f32(p[i * group + k]);
            xs[i] = s;
        }
    }
    const uint8_t *pk = packed.data_ptr<uint8_t>();
    const uint32_t *szp = reinterpret_cast<const uint32_t *>(sz.data_ptr<at::BFloat16>());
    {
        const uint32_t *xb = reinterpret_cast<const uint32_t *>(x.data_ptr<at::BFloat16>());
        uint16_t *yp = reinterpret_cast<uint16_t *>(y.data_ptr<at::BFloat16>());
        at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
            // vpermb indices: lane L of `ia` takes byte L of row k (bytes 0, 1 of the lane) and
            // of row k + 1 (bytes 2, 3; 32 bytes on); `ib` the same for bytes 16 + L. The masks
            // keep one nibble per 16-bit half.
            __m512i ia, ib;
            {
                alignas(64) uint8_t a[64], b[64];
                for (int L = 0; L < 16; L++) {
                    a[4 * L] = a[4 * L + 1] = (uint8_t)L;
                    a[4 * L + 2] = a[4 * L + 3] = (uint8_t)(32 + L);
                    b[4 * L] = b[4 * L + 1] = (uint8_t)(16 + L);
                    b[4 * L + 2] = b[4 * L + 3] = (uint8_t)(48 + L);
                }
                ia = _mm512_load_si512(a);
                ib = _mm512_load_si512(b);
            }
            const __m512i nib = _mm512_set1_epi32(0x000F000F), one28 = _mm512_set1_epi32(0x43004300);
            const __m512i hi_s = _mm512_set1_epi32((int)0xFFFF0000u);
            for (int64_t m = 0; m < M; m++) {
                const uint32_t *xm = xb + m * K / 2;
                for (int64_t nb = b0; nb < b1; nb++) {
                    __m512 o[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                                   _mm512_setzero_ps()};
                    const uint8_t *pb = pk + nb * K * 32;
                    for (int64_t g = 0; g < G; g++) {
                        __m512 a[8];
                        for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
                        const uint8_t *pg = pb + g * group * 32;
                        const uint32_t *xg = xm + g * group / 2;
                        int64_t k = 0;
#define LB_STEP(J, KK)                                                                              \
    {                                                                                               \
        const __m512i v = _mm512_loadu_si512((const void *)(pg + (KK) * 32));                      \
        const __m512bh xk = (__m512bh)_mm512_set1_epi32((int)xg[(KK) / 2]);                        \
        const __m512i pa = _mm512_permutexvar_epi8(ia, v), pc = _mm512_permutexvar_epi8(ib, v);    \
        a[J] = _mm512_dpbf16_ps(a[J], (__m512bh)_mm512_ternarylogic_epi32(pa, nib, one28, 0xEA), xk); \
        a[J + 1] = _mm512_dpbf16_ps(a[J + 1], (__m512bh)_mm512_ternarylogic_epi32(pc, nib, one28, 0xEA), xk); \
        a[J + 2] = _mm512_dpbf16_ps(a[J + 2], (__m512bh)_mm512_ternarylogic_epi32(                   \
                                                  _mm512_srli_epi16(pa, 4), nib, one28, 0xEA), xk);  \
        a[J + 3] = _mm512_dpbf16_ps(a[J + 3], (__m512bh)_mm512_ternarylogic_epi32(                   \
                                                  _mm512_srli_epi16(pc, 4), nib, one28, 0xEA), xk);  \
    }
                        for (; k + 4 <= group; k += 4) {
                            LB_STEP(0, k)
                            LB_STEP(4, k + 2)
                        }
                        for (; k < group; k += 2) LB_STEP(0, k)
#undef LB_STEP
                        for (int i = 0; i < 4; i++) a[i] = _mm512_add_ps(a[i], a[i + 4]);
                        const __m512 xsum = _mm512_set1_ps(xs[m * G + g]);
                        const uint32_t *s = szp + g * N + nb * 64;  // (scale, zero) pairs
                        for (int i = 0; i < 4; i++) {
                            __m512i vv = _mm512_loadu_si512((const void *)(s + 16 * i));
                            __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(vv, 16));
                            __m512 ze = _mm512_castsi512_ps(_mm512_and_si512(vv, hi_s));
                            // s * (acc - 136 xs) + z xs = s * acc + (z - 136 s) xs
                            __m512 zc = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), sc, ze);
                            o[i] = _mm512_fmadd_ps(a[i], sc, _mm512_fmadd_ps(zc, xsum, o[i]));
                        }
                    }
                    for (int i = 0; i < 4; i++) store16(yp + m * N + nb * 64 + 16 * i, o[i]);
                }
            }
        });
        return y;
    }
#else
    TORCH_CHECK(false, "lowbit::int4_mm: built without AVX-512 BF16/VBMI (needs -march=native "
                "on a CPU that has them)");
#endif
    return y;
}

at::Tensor bf16_mm(const at::Tensor &x, const at::Tensor &w) {
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() &&
                    w.device().is_cpu(),
                "lowbit::bf16_mm: w must be a contiguous CPU bfloat16 [N, K] matrix");
    const int64_t N = w.size(0), K = w.size(1);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous() && x.device().is_cpu() &&
                    x.scalar_type() == at::kBFloat16,
                "lowbit::bf16_mm: x must be a contiguous CPU [M, ", K, "] bfloat16 matrix");
    const int64_t M = x.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0 || N == 0) return y;
#ifdef LB_HAVE_KERNEL
    const uint16_t *wp = reinterpret_cast<const uint16_t *>(w.data_ptr<at::BFloat16>());
    const uint16_t *xp = reinterpret_cast<const uint16_t *>(x.data_ptr<at::BFloat16>());
    uint16_t *yp = reinterpret_cast<uint16_t *>(y.data_ptr<at::BFloat16>());
    const int64_t K32 = K / 32 * 32;
    const __mmask32 tail = (__mmask32)((1ull << (K - K32)) - 1);
    // one row of w at a time (one read stream per thread: 2x faster than 4 interleaved rows on a
    // head that does not fit the caches), tasks of 64 rows
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        for (int64_t m = 0; m < M; m++) {
            const uint16_t *xm = xp + m * K;
            for (int64_t n = n0; n < n1; n++) {
                const uint16_t *r = wp + n * K;
                __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                int64_t k = 0;
                for (; k + 64 <= K32; k += 64) {
                    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(r + k)),
                                          (__m512bh)_mm512_loadu_si512((const void *)(xm + k)));
                    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512((const void *)(r + k + 32)),
                                          (__m512bh)_mm512_loadu_si512((const void *)(xm + k + 32)));
                }
                if (k < K32)
                    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(r + k)),
                                          (__m512bh)_mm512_loadu_si512((const void *)(xm + k)));
                if (tail)
                    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + K32),
                                          (__m512bh)_mm512_maskz_loadu_epi16(tail, xm + K32));
                yp[m * N + n] = round_bf16(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
            }
        }
    });
#else
    TORCH_CHECK(false, "lowbit::bf16_mm: built without AVX-512 BF16/VBMI (needs -march=native "
                "on a CPU that has them)");
#endif
    return y;
}

at::Tensor int8_mm(const at::Tensor &x, const at::Tensor &w, const at::Tensor &scale) {
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() &&
                    w.device().is_cpu(),
                "lowbit::int8_mm: w must be a contiguous CPU int8 [N, K] matrix");
    const int64_t N = w.size(0), K = w.size(1);
    TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N && scale.is_contiguous() &&
                    scale.scalar_type() == at::kBFloat16,
                "lowbit::int8_mm: scale must be a contiguous bfloat16 [", N, "] vector");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous() && x.device().is_cpu() &&
                    x.scalar_type() == at::kBFloat16,
                "lowbit::int8_mm: x must be a contiguous CPU [M, ", K, "] bfloat16 matrix");
    const int64_t M = x.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0 || N == 0) return y;
#ifdef LB_HAVE_KERNEL
    const int8_t *wp = w.data_ptr<int8_t>();
    const uint16_t *xp = reinterpret_cast<const uint16_t *>(x.data_ptr<at::BFloat16>());
    const uint16_t *sp = reinterpret_cast<const uint16_t *>(scale.data_ptr<at::BFloat16>());
    uint16_t *yp = reinterpret_cast<uint16_t *>(y.data_ptr<at::BFloat16>());
    std::vector<float> xf(M * K + 16, 0.f);  // x in float32 (+16: the tail reads stay inside)
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_f32(xp[i]);
    const int64_t K16 = K / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (K - K16)) - 1);
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        for (int64_t m = 0; m < M; m++) {
            const float *xm = xf.data() + m * K;
            for (int64_t n = n0; n < n1; n++) {
                const int8_t *r = wp + n * K;
                __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                int64_t k = 0;
                for (; k + 32 <= K16; k += 32) {
                    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                             _mm_loadu_si128((const __m128i *)(r + k)))),
                                         _mm512_loadu_ps(xm + k), a0);
                    a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                             _mm_loadu_si128((const __m128i *)(r + k + 16)))),
                                         _mm512_loadu_ps(xm + k + 16), a1);
                }
                if (k < K16)
                    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                             _mm_loadu_si128((const __m128i *)(r + k)))),
                                         _mm512_loadu_ps(xm + k), a0);
                if (tail)
                    a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                             _mm_maskz_loadu_epi8(tail, r + K16))),
                                         _mm512_maskz_loadu_ps(tail, xm + K16), a1);
                const float acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                yp[m * N + n] = round_bf16(acc * bf16_f32(sp[n]));
            }
        }
    });
#else
    TORCH_CHECK(false, "lowbit::int8_mm: built without AVX-512 BF16/VBMI (needs -march=native "
                "on a CPU that has them)");
#endif
    return y;
}

template <typename T>
inline __m512 load16f(const T *p);
template <>
inline __m512 load16f<float>(const float *p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16f<uint16_t>(const uint16_t *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

template <typename T>
void attn_heads(const T *q, const T *k, const T *v, T *o, int64_t H, int64_t nkv, int64_t L,
                int64_t d, int64_t n, float scale) {
    const int64_t rep = H / nkv, d16 = d / 16;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n * d));
    at::parallel_for(0, H, grain, [&](int64_t h0, int64_t h1) {
        std::vector<float> sc(n);
        __m512 qv[16], acc[16];  // d <= 256
        for (int64_t h = h0; h < h1; h++) {
            const T *kh = k + (h / rep) * L * d, *vh = v + (h / rep) * L * d;
            for (int64_t i = 0; i < d16; i++) qv[i] = load16f(q + h * d + 16 * i);
            float mx = -INFINITY;
            for (int64_t j = 0; j < n; j++) {
                __m512 a = _mm512_mul_ps(qv[0], load16f(kh + j * d));
                for (int64_t i = 1; i < d16; i++) a = _mm512_fmadd_ps(qv[i], load16f(kh + j * d + 16 * i), a);
                sc[j] = _mm512_reduce_add_ps(a) * scale;
                mx = std::max(mx, sc[j]);
            }
            float sum = 0.f;
            for (int64_t j = 0; j < n; j++) sum += (sc[j] = std::exp(sc[j] - mx));
            for (int64_t i = 0; i < d16; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j++) {
                const __m512 p = _mm512_set1_ps(sc[j]);
                for (int64_t i = 0; i < d16; i++) acc[i] = _mm512_fmadd_ps(p, load16f(vh + j * d + 16 * i), acc[i]);
            }
            const __m512 inv = _mm512_set1_ps(1.f / sum);
            for (int64_t i = 0; i < d16; i++) {
                const __m512 r = _mm512_mul_ps(acc[i], inv);
                if constexpr (std::is_same<T, float>::value) {
                    _mm512_storeu_ps(o + h * d + 16 * i, r);
                } else {
                    store16(o + h * d + 16 * i, r);
                }
            }
        }
    });
}

at::Tensor decode_attn(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                       const at::Tensor &pos, double scale) {
    TORCH_CHECK(q.dim() == 2 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(1) == k.size(2) &&
                    q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                    q.scalar_type() == k.scalar_type() && v.scalar_type() == k.scalar_type() &&
                    (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat) &&
                    q.device().is_cpu() && k.device().is_cpu(),
                "lowbit::decode_attn: q [H, d], k and v [n_kv, L, d]: contiguous CPU tensors of one "
                "dtype (bfloat16 or float32)");
    const int64_t H = q.size(0), d = q.size(1), nkv = k.size(0), L = k.size(1);
    TORCH_CHECK(nkv > 0 && H % nkv == 0 && d % 16 == 0 && d <= 256,
                "lowbit::decode_attn: H ", H, " a multiple of n_kv ", nkv, ", head size ", d,
                " a multiple of 16 up to 256");
    TORCH_CHECK(pos.numel() == 1 && pos.scalar_type() == at::kLong,
                "lowbit::decode_attn: pos must be one int64");
    const int64_t n = pos.item<int64_t>() + 1;
    TORCH_CHECK(n >= 1 && n <= L, "lowbit::decode_attn: position ", n - 1, " outside the cache of ", L);
    at::Tensor o = at::empty({H, d}, q.options());
#ifdef LB_HAVE_KERNEL
    if (q.scalar_type() == at::kFloat) {
        attn_heads<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                          o.data_ptr<float>(), H, nkv, L, d, n, (float)scale);
    } else {
        auto u = [](const at::Tensor &t) { return reinterpret_cast<uint16_t *>(t.data_ptr<at::BFloat16>()); };
        attn_heads<uint16_t>(u(q), u(k), u(v), u(o), H, nkv, L, d, n, (float)scale);
    }
#else
    TORCH_CHECK(false, "lowbit::decode_attn: built without AVX-512 BF16/VBMI");
#endif
    return o;
}

}  // namespace

TORCH_LIBRARY(lowbit, m) {
    m.def("int4_mm(Tensor x, Tensor packed, Tensor scale_zeros, int group) -> Tensor");
    m.def("bf16_mm(Tensor x, Tensor w) -> Tensor");
    m.def("int8_mm(Tensor x, Tensor w, Tensor scale) -> Tensor");
    m.def("decode_attn(Tensor q, Tensor k, Tensor v, Tensor pos, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
    m.impl("int4_mm", &int4_mm);
    m.impl("bf16_mm", &bf16_mm);
    m.impl("int8_mm", &int8_mm);
    m.impl("decode_attn", &decode_attn);
}
