// dq_kl_divergences: ncnn2table's KL threshold search (deployq/calib/kl.py, kl_divergences_numpy) for every
// candidate t, in C++ (deployq/native/klsearch.py loads it with ctypes; no MXNet headers).
//
// The formula is kl_divergences_numpy's: prefix sums of h, pe = h + eps and pe log pe; the mean density q_j of each
// merged bin from the integral of h at the merged-bin edges e_j = j * (t / levels); sum_j log(q_j + eps) * (pe
// summed over the bins wholly inside merged bin j); one term per edge that falls inside a bin; the tail times
// log(q_last + eps). What differs is rounding only: the histogram total (a sequential sum, NumPy's is pairwise),
// q_j (times levels / t instead of divided by t / levels), the order of the sums over j (sequential) and the
// logarithm (fdlibm's e_log.c algorithm below, < 1 ulp). KL is a difference of O(1) sums, so values agree to ~1e-14
// absolute (relative 1e-12 unless KL itself is that small). The AVX-512, AVX2 and scalar paths do the same IEEE
// operations per candidate (no FMA; the build passes -ffp-contract=off), so they give bit-identical results.
//
// Vectorised over candidates: one SIMD lane per t, a loop over the merged bins j carrying the previous edge. The
// lanes are consecutive t, so at each j their bins lie within W of each other: three unaligned loads + permutes per
// (t, j) pair instead of gathers, and two logarithms (the dominant cost). Needs levels to be a power of two (every
// edge exact). No globals; scratch in std::vector, so concurrent calls (ctypes releases the GIL) are safe.
//
// Entry points (C ABI):
//   int dq_kl_divergences(const double* hist, int64_t n, int levels, double eps, double* out)
//   int dq_kl_divergences_scalar(...)  -- the same, one candidate at a time (the tests' check of the SIMD path)
// write KL(P_t || Q_t) for t in [levels, n) into out[t - levels]; return 0, 1 for an empty histogram (sum <= 0),
// 2 for what the kernel does not handle (levels not a power of two, n <= levels, n >= 2^30).
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// fdlibm e_log.c: x = 2^k m, m in [sqrt(2)/2, sqrt(2)), f = m - 1, s = f / (2 + f), log(1 + f) = 2 atanh(s) with a
// minimax polynomial R(s^2); ln 2 split in a high part with trailing zeros (k ln2_hi exact) and a low part.
constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
constexpr double kLg1 = 6.666666666666735130e-01, kLg2 = 3.999999999940941908e-01, kLg3 = 2.857142874366239149e-01,
                 kLg4 = 2.222219843214978396e-01, kLg5 = 1.818357216161805012e-01, kLg6 = 1.531383769920937332e-01,
                 kLg7 = 1.479819860511658591e-01;
constexpr double kSqrt2 = 1.41421356237309504880;

// The reduced-argument part, shared by every vector type (V: double or a SIMD wrapper with + - * /).
template <class V>
inline V log_reduced(V m, V k) {
  const V one(1.0), two(2.0), half(0.5);
  V f = m - one;
  V hfsq = half * f * f;
  V s = f / (two + f);
  V z = s * s;
  V w = z * z;
  V t1 = w * (V(kLg2) + w * (V(kLg4) + w * V(kLg6)));
  V t2 = z * (V(kLg1) + w * (V(kLg3) + w * (V(kLg5) + w * V(kLg7))));
  V r = t2 + t1;
  return k * V(kLn2Hi) - ((hfsq - (s * (hfsq + r) + k * V(kLn2Lo))) - f);
}

inline double log_scalar(double x) {
  if (!(x >= DBL_MIN && x <= DBL_MAX)) return std::log(x);  // 0, subnormal, negative, inf, nan: libm
  int e;
  double m = std::frexp(x, &e);  // [0.5, 1), exact
  m *= 2.0;
  --e;  // [1, 2)
  if (m > kSqrt2) {
    m *= 0.5;
    ++e;
  }
  return log_reduced<double>(m, static_cast<double>(e));
}

// ---- SIMD wrappers: W lanes of doubles, masks, 32-bit bin indices, windows ----------------------------------
struct Scalar {
  static constexpr int W = 1;
  using D = double;
  using M = bool;
  using I = int32_t;
  static D set(double v) { return v; }
  static D lanes(const double* p) { return *p; }
  static void store(double* p, D v) { *p = v; }
  static D floor(D v) { return std::floor(v); }
  static I to_index(D v, int32_t hi) { return std::min(static_cast<int32_t>(v), hi); }
  static int32_t first(I idx) { return idx; }
  static I minus(I idx, int32_t) { return 0; }
  static D window(const double* p, I) { return *p; }
  static M gt(D a, D b) { return a > b; }
  static D select(M m, D a, D b) { return m ? a : b; }
  static D log(D x) { return log_scalar(x); }
};

#if defined(__AVX512F__)
struct Vec {
  __m512d v;
  Vec() = default;
  Vec(__m512d x) : v(x) {}  // NOLINT
  explicit Vec(double x) : v(_mm512_set1_pd(x)) {}
};
inline Vec operator+(Vec a, Vec b) { return _mm512_add_pd(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm512_sub_pd(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm512_mul_pd(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm512_div_pd(a.v, b.v); }

struct Simd {
  static constexpr int W = 8;
  using D = Vec;
  using M = __mmask8;
  using I = __m256i;
  static D set(double v) { return Vec(v); }
  static D lanes(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, D v) { _mm512_storeu_pd(p, v.v); }
  static D floor(D v) { return _mm512_roundscale_pd(v.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static I to_index(D v, int32_t hi) { return _mm256_min_epi32(_mm512_cvttpd_epi32(v.v), _mm256_set1_epi32(hi)); }
  static int32_t first(I idx) { return _mm_cvtsi128_si32(_mm256_castsi256_si128(idx)); }
  static I minus(I idx, int32_t b) { return _mm256_sub_epi32(idx, _mm256_set1_epi32(b)); }
  // p[rel[i]] for 0 <= rel[i] < 8: one load and a permute instead of a gather
  static D window(const double* p, I rel) {
    return _mm512_permutexvar_pd(_mm512_cvtepi32_epi64(rel), _mm512_loadu_pd(p));
  }
  static M gt(D a, D b) { return _mm512_cmp_pd_mask(a.v, b.v, _CMP_GT_OQ); }
  static D select(M m, D a, D b) { return _mm512_mask_blend_pd(m, b.v, a.v); }
  static D log(D x) {
    // getmant/getexp: x = 2^e m, m in [1, 2); m > sqrt(2) moves to [sqrt(2)/2, 1) with e + 1 (exact)
    __m512d m = _mm512_getmant_pd(x.v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
    __m512d e = _mm512_getexp_pd(x.v);
    __mmask8 big = _mm512_cmp_pd_mask(m, _mm512_set1_pd(kSqrt2), _CMP_GT_OQ);
    m = _mm512_mask_mul_pd(m, big, m, _mm512_set1_pd(0.5));
    e = _mm512_mask_add_pd(e, big, e, _mm512_set1_pd(1.0));
    Vec r = log_reduced<Vec>(m, e);
    __mmask8 ok = _mm512_cmp_pd_mask(x.v, _mm512_set1_pd(DBL_MIN), _CMP_GE_OQ) &
                  _mm512_cmp_pd_mask(x.v, _mm512_set1_pd(DBL_MAX), _CMP_LE_OQ);
    if (ok != 0xFF) r = fixup(x, r, ok);
    return r;
  }
  static Vec fixup(Vec x, Vec r, __mmask8 ok) {
    alignas(64) double xs[8], rs[8];
    _mm512_store_pd(xs, x.v);
    _mm512_store_pd(rs, r.v);
    for (int i = 0; i < 8; ++i)
      if (!((ok >> i) & 1)) rs[i] = log_scalar(xs[i]);
    return _mm512_load_pd(rs);
  }
};
#elif defined(__AVX2__)
struct Vec {
  __m256d v;
  Vec() = default;
  Vec(__m256d x) : v(x) {}  // NOLINT
  explicit Vec(double x) : v(_mm256_set1_pd(x)) {}
};
inline Vec operator+(Vec a, Vec b) { return _mm256_add_pd(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm256_sub_pd(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm256_mul_pd(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm256_div_pd(a.v, b.v); }

struct Simd {
  static constexpr int W = 4;
  using D = Vec;
  using M = __m256d;
  using I = __m128i;
  static D set(double v) { return Vec(v); }
  static D lanes(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, D v) { _mm256_storeu_pd(p, v.v); }
  static D floor(D v) { return _mm256_floor_pd(v.v); }
  static I to_index(D v, int32_t hi) { return _mm_min_epi32(_mm256_cvttpd_epi32(v.v), _mm_set1_epi32(hi)); }
  static int32_t first(I idx) { return _mm_cvtsi128_si32(idx); }
  static I minus(I idx, int32_t b) { return _mm_sub_epi32(idx, _mm_set1_epi32(b)); }
  // p[rel[i]] for 0 <= rel[i] < 4: one load and a permute of 32-bit pairs (2 rel, 2 rel + 1) instead of a gather
  static D window(const double* p, I rel) {
    const __m256i d = _mm256_slli_epi64(_mm256_cvtepi32_epi64(rel), 1);
    const __m256i idx = _mm256_or_si256(d, _mm256_slli_epi64(_mm256_add_epi64(d, _mm256_set1_epi64x(1)), 32));
    return _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(_mm256_loadu_pd(p)), idx));
  }
  static M gt(D a, D b) { return _mm256_cmp_pd(a.v, b.v, _CMP_GT_OQ); }
  static D select(M m, D a, D b) { return _mm256_blendv_pd(b.v, a.v, m); }
  static D log(D x) {
    // normal positive x: exponent and mantissa from the bits; m in [1, 2), the biased exponent (< 2^11) as a double
    // through the 2^52 trick; m > sqrt(2) moves to [sqrt(2)/2, 1) with e + 1 (exact)
    const __m256i bits = _mm256_castpd_si256(x.v);
    __m256d m = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi64x(0x000FFFFFFFFFFFFFLL)),
                                                    _mm256_set1_epi64x(0x3FF0000000000000LL)));
    const __m256i ebits = _mm256_or_si256(_mm256_srli_epi64(bits, 52), _mm256_set1_epi64x(0x4330000000000000LL));
    __m256d e = _mm256_sub_pd(_mm256_castsi256_pd(ebits), _mm256_set1_pd(4503599627370496.0 + 1023.0));
    const __m256d big = _mm256_cmp_pd(m, _mm256_set1_pd(kSqrt2), _CMP_GT_OQ);
    m = _mm256_blendv_pd(m, _mm256_mul_pd(m, _mm256_set1_pd(0.5)), big);
    e = _mm256_blendv_pd(e, _mm256_add_pd(e, _mm256_set1_pd(1.0)), big);
    Vec r = log_reduced<Vec>(m, e);
    const __m256d ok = _mm256_and_pd(_mm256_cmp_pd(x.v, _mm256_set1_pd(DBL_MIN), _CMP_GE_OQ),
                                     _mm256_cmp_pd(x.v, _mm256_set1_pd(DBL_MAX), _CMP_LE_OQ));
    if (_mm256_movemask_pd(ok) != 0xF) {
      alignas(32) double xs[4], rs[4];
      _mm256_store_pd(xs, x.v);
      _mm256_store_pd(rs, r.v);
      const int okm = _mm256_movemask_pd(ok);
      for (int i = 0; i < 4; ++i)
        if (!((okm >> i) & 1)) rs[i] = log_scalar(xs[i]);
      r = _mm256_load_pd(rs);
    }
    return r;
  }
};
#else
using Simd = Scalar;
#endif

// Per-histogram tables, as kl_divergences_numpy builds them (cumsum is sequential there too).
struct Tables {
  std::vector<double> h, prefix, sp, spl;  // h normalised; prefix/sp/spl: cumsums of h, pe, pe log pe with a 0 first
};

// W consecutive candidates starting at t0 (lanes past n - 1 repeat t = n - 1; the caller ignores them): the two
// sums over merged bins and log(q_last + eps), per lane.
template <class S>
inline void candidates(const Tables& tb, int64_t n, int levels, double eps, int64_t t0, double* cross1_out,
                       double* cross2_out, double* lq_last_out) {
  using D = typename S::D;
  using M = typename S::M;
  using I = typename S::I;
  alignas(64) double tl[S::W];
  for (int i = 0; i < S::W; ++i) tl[i] = static_cast<double>(std::min<int64_t>(t0 + i, n - 1));
  const int32_t hi = static_cast<int32_t>(n - 1);
  const D t = S::lanes(tl), lv = S::set(static_cast<double>(levels));
  const D npb = t / lv;
  const D inv_npb = lv / t;
  const D zero = S::set(0.0), one = S::set(1.0), veps = S::set(eps);
  const double* h = tb.h.data();
  const double* prefix = tb.prefix.data();
  const double* sp = tb.sp.data();
  // edge 0 (e = 0): integral prefix[0] + 0 * h[0]
  D f_prev = zero;
  D h_prev = S::set(h[0]);
  D sp_prev = S::set(sp[0]);
  D integ_prev = S::set(prefix[0]) + f_prev * h_prev;
  D q_prev = zero, lq = zero, cross1 = zero, cross2 = zero;
  for (int j = 0; j < levels; ++j) {
    const D e = S::set(static_cast<double>(j + 1)) * npb;  // edge j + 1, exact (levels is a power of two)
    const D fl = S::floor(e);
    const D f = e - fl;
    // the W lanes are consecutive t, so their bins floor(e) lie in [b, b + W): a window instead of a gather
    const I fi = S::to_index(fl, hi);
    const int32_t b = S::first(fi);
    const I rel = S::minus(fi, b);
    const D hf = S::window(h + b, rel);
    const D sf = S::window(sp + b, rel);
    const D integ = S::window(prefix + b, rel) + f * hf;
    const D q = (integ - integ_prev) * inv_npb;  // mean density of merged bin j
    lq = S::log(q + veps);
    // pe over the bins wholly inside merged bin j: sp[fi_{j+1}] - sp[ceil(e_j)], sp[fi + 1] = sp[fi] + pe[fi]
    const M inside = S::gt(f_prev, zero);
    const D pe_prev = h_prev + veps;
    const D sp_ci = S::select(inside, sp_prev + pe_prev, sp_prev);
    cross1 = cross1 + lq * (sf - sp_ci);
    if (j > 0) {  // inner edge j inside bin fi_j: Q = f q_{j-1} + (1 - f) q_j + eps there
      const D mix = f_prev * q_prev + (one - f_prev) * q + veps;
      cross2 = cross2 + S::select(inside, pe_prev * S::log(mix), zero);
    }
    f_prev = f;
    h_prev = hf;
    sp_prev = sf;
    integ_prev = integ;
    q_prev = q;
  }
  S::store(cross1_out, cross1);
  S::store(cross2_out, cross2);
  S::store(lq_last_out, lq);
}

// Every candidate t in [levels, n) with the vector type S.
template <class S>
int kl_all(const double* hist, int64_t n, int levels, double eps, double* out) {
  if (levels < 1 || (levels & (levels - 1)) != 0 || n <= levels || n >= (int64_t{1} << 30)) return 2;
  double total = 0.0;
  for (int64_t k = 0; k < n; ++k) total += hist[k];
  if (total <= 0) return 1;
  Tables tb;
  tb.h.assign(n + Simd::W, 0.0);  // padded: windows read up to W - 1 past the last bin
  tb.prefix.assign(n + 1 + Simd::W, 0.0);
  tb.sp.assign(n + 1 + Simd::W, 0.0);
  tb.spl.assign(n + 1, 0.0);
  for (int64_t k = 0; k < n; ++k) {
    const double h = hist[k] / total;
    const double pe = h + eps;
    tb.h[k] = h;
    tb.prefix[k + 1] = tb.prefix[k] + h;
    tb.sp[k + 1] = tb.sp[k] + pe;
    tb.spl[k + 1] = tb.spl[k] + pe * log_scalar(pe);
  }
  constexpr int W = S::W;
  alignas(64) double c1[W], c2[W], lq[W];
  for (int64_t t0 = levels; t0 < n; t0 += W) {
    candidates<S>(tb, n, levels, eps, t0, c1, c2, lq);
    for (int i = 0; i < W && t0 + i < n; ++i) {
      const int64_t t = t0 + i;
      const double tail = tb.prefix[n] - tb.prefix[t];  // sum(h[t:])
      const double last = (tb.h[t - 1] + eps) + tail;   // bin t - 1 carries the tail
      const double cross = (c1[i] + c2[i]) + tail * lq[i];
      out[t - levels] = (tb.spl[t - 1] + last * log_scalar(last)) - cross;
    }
  }
  return 0;
}

}  // namespace

extern "C" int dq_kl_divergences(const double* hist, int64_t n, int levels, double eps, double* out) {
  return kl_all<Simd>(hist, n, levels, eps, out);
}

// The scalar path (the same operations one candidate at a time): the tests' cross-check of the SIMD code.
extern "C" int dq_kl_divergences_scalar(const double* hist, int64_t n, int levels, double eps, double* out) {
  return kl_all<Scalar>(hist, n, levels, eps, out);
}
