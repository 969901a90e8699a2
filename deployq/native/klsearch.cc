// dq_kl_divergences: ncnn2table's KL threshold search (deployq/calib/kl.py, kl_divergences_numpy) for every
// candidate t, in C++ (deployq/native/klsearch.py loads it with ctypes; no MXNet headers).
//
// The formula is kl_divergences_numpy's: prefix sums of h, pe = h + eps and pe log pe; the mean density q_j of each
// merged bin from the integral of h at the merged-bin edges e_j = j * (t / levels); sum_j log(q_j + eps) * (pe
// summed over the bins wholly inside merged bin j); one term per edge that falls inside a bin; the tail times
// log(q_last + eps). What differs is rounding only: the histogram total (a sequential sum, NumPy's is pairwise),
// q_j (times levels / t instead of divided by t / levels), the order of the sums over j (sequential) and the
// logarithm (the table method below, < 0.8 ulp), q_j + eps and the edge terms' mixture in FMAs. KL is a difference of O(1) sums, so values agree to ~1e-14
// absolute (relative 1e-12 unless KL itself is that small). The AVX-512, AVX2 and scalar paths do the same IEEE
// operations per candidate (explicit FMAs in the logarithm only, the same ones everywhere; the build passes
// -ffp-contract=off), so they give bit-identical results.
//
// Vectorised over candidates: one SIMD lane per t, a loop over the merged bins j carrying the previous edge. The
// lanes are consecutive t, so at each j their bins lie within W of each other: windowed loads + permutes per (t, j)
// pair instead of gathers (the window's base from integer arithmetic), and two logarithms (the dominant cost). In
// chunks of 32 merged bins, two passes: the logarithms' arguments and weights (loads, permutes, stores), then the
// logarithms and the sums, a stream of independent logarithms with their constants in registers. Needs levels to
// be a power of two (every edge exact). ~0.45 ms per 2048-bin histogram at levels 128 (AVX-512, Zen 4; with an
// fdlibm log, a division in each, ~0.9 ms). No globals but constant tables; scratch in one heap block per call, so
// concurrent calls (ctypes releases the GIL) are safe.
//
// Entry points (C ABI):
//   int dq_kl_divergences(const double* hist, int64_t n, int levels, double eps, double* out)
//   int dq_kl_divergences_scalar(...)  -- the same, one candidate at a time (the tests' check of the SIMD path)
// write KL(P_t || Q_t) for t in [levels, n) into out[t - levels]; return 0, 1 for an empty histogram (sum <= 0),
// 2 for what the kernel does not handle (levels not a power of two, n <= levels, n >= 2^30).
//   void dq_log_array(const double* x, int64_t n, double* out), dq_log_array_scalar(...)
// the logarithm itself, elementwise (the tests compare it with libm's).
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

namespace {

// ---- the logarithm -------------------------------------------------------------------------------------------
// Division-free, table-driven (the method of ARM optimized-routines' log): x = 2^k z with z in [OFF, 2 OFF),
// OFF = 0.703125, split by its bits into 16 intervals (the index is (bits(x) - bits(OFF)) >> 48 mod 16, k the
// top 12 bits of that difference, z = x with k taken out of the exponent: integer operations, exact). Interval i
// has a constant invc_i ~ 1/c_i, c_i near its centre; with r = z invc_i - 1 (|r| < 0.034),
//   log x = k ln2 + log c_i + log1p(r),  log c_i = -log(invc_i) = logc_hi_i + logc_lo_i,
// log1p(r) = r + r^2 P(r), P a degree-7 near-minimax fit (weighted by |r|: relative accuracy where log x ~ r).
// r comes from one FMA (rounded once; exact where invc has few bits: 1 for the interval around 1, 33/32 and 15/16
// for its neighbours, where log x is as small as r). ln2_hi (fdlibm's, 32 significant bits) and logc_hi are
// multiples of 2^-32, so w = k ln2_hi + logc_hi is exact; hi = w + r with its rounding error recovered (|w| >= |r|
// or w = 0); lo = that error + k ln2_lo + logc_lo + r^2 P(r); log x = hi + lo. Max error 0.77 ulp (measured against
// an 80-bit log over 6e6 points, the interval edges among them; tests/calib/test_kl_native.py checks <= 2 ulp
// against libm's, <= 1 ulp against long double). Zero, negative, subnormal, inf and nan arguments go to std::log.
// Tables: invc a double, logc_hi = -log(invc) rounded to a multiple of 2^-32, logc_lo = the rest rounded to double
// (computed with 80-digit decimal arithmetic); P fitted on r in [-0.0334, 0.0315].
constexpr uint64_t kLogOff = 0x3FE6800000000000ULL;  // bits of 0.703125: 1.0 is the centre (in bits) of interval 9
constexpr uint64_t kTop12 = 0xFFF0000000000000ULL;
alignas(64) constexpr double kInvC[16] = {
    0x1.642c8590b2164p+0, 0x1.5555555555555p+0, 0x1.47ae147ae147bp+0, 0x1.3b13b13b13b14p+0,
    0x1.2f684bda12f68p+0, 0x1.2492492492492p+0, 0x1.1a7b9611a7b96p+0, 0x1.1111111111111p+0,
    0x1.0800000000000p+0, 0x1.0000000000000p+0, 0x1.e000000000000p-1, 0x1.c71c71c71c71cp-1,
    0x1.af286bca1af28p-1, 0x1.999999999999ap-1, 0x1.8618618618618p-1, 0x1.745d1745d1746p-1};
alignas(64) constexpr double kLogCHi[16] = {
    -0x1.522ae07400000p-2, -0x1.2696211400000p-2, -0x1.f991c6c800000p-3, -0x1.a93ed3c800000p-3,
    -0x1.5bf406b800000p-3, -0x1.1178e82000000p-3, -0x1.9335e5d000000p-4, -0x1.08598b6000000p-4,
    -0x1.f829b10000000p-6, 0x0.0p+0,               0x1.08598b6000000p-4, 0x1.e27076e000000p-4,
    0x1.5ff3070800000p-3,  0x1.c8ff7c7800000p-3,  0x1.1675cabc00000p-2,  0x1.4618bc2000000p-2};
alignas(64) constexpr double kLogCLo[16] = {
    0x1.d70a2c7bf4d9cp-36, 0x1.648dd0f882913p-35, -0x1.9d9bd1ecca0cep-34, -0x1.5b3cade57d4efp-36,
    0x1.5e128023eb68ap-34, -0x1.3f23cef19c5a1p-34, -0x1.65261eb8757a9p-34, 0x1.8717e9dd70099p-34,
    0x1.87ccffb30703fp-34, 0x0.0p+0,               -0x1.8717e5dd70099p-34, 0x1.57974f4f54400p-35,
    0x1.3c9eae439f105p-34, 0x1.a9a1fac25d81fp-35,  -0x1.459f0fc63382bp-34, 0x1.c5ec1fd0b7b38p-34};
constexpr double kLn2Hi = 0x1.62e42fee00000p-1, kLn2Lo = 0x1.a39ef35793c76p-33;
constexpr double kP0 = -0x1.fffffffffffbep-2, kP1 = 0x1.5555555554bc0p-2, kP2 = -0x1.00000000db135p-2,
                 kP3 = 0x1.999999b94e338p-3, kP4 = -0x1.55553d945c75fp-3, kP5 = 0x1.249157c089bc5p-3,
                 kP6 = -0x1.0078f9fa83e9ap-3, kP7 = 0x1.cbb6bff39d06dp-4;

inline uint64_t bits_of(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
inline double double_of(uint64_t u) {
  double x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
inline double fmadd(double a, double b, double c) { return std::fma(a, b, c); }
// positive, normal, finite
inline bool log_domain(uint64_t ix) { return ix - 0x0010000000000000ULL < 0x7FE0000000000000ULL; }

// After the reduction, shared by every vector type (V: double or a SIMD wrapper with + - * and fmadd): the same
// operations in the same order everywhere. kb = k 2^52 (the integer k << 52 converted, exact), so kb * (ln2_hi
// 2^-52) = k ln2_hi exactly. K holds the constants (the SIMD paths keep them in registers).
template <class V, class K>
inline V log_tail(V z, V kb, V invc, V lch, V lcl, const K& c) {
  const V r = fmadd(z, invc, c.minus1);
  const V w = fmadd(kb, c.ln2hi, lch);  // exact
  const V hi = w + r;
  const V lo = ((w - hi) + r) + fmadd(kb, c.ln2lo, lcl);
  const V r2 = r * r;
  const V p01 = fmadd(c.p1, r, c.p0), p23 = fmadd(c.p3, r, c.p2);
  const V p45 = fmadd(c.p5, r, c.p4), p67 = fmadd(c.p7, r, c.p6);
  const V r4 = r2 * r2;
  const V p = fmadd(fmadd(p67, r2, p45), r4, fmadd(p23, r2, p01));
  return hi + fmadd(r2, p, lo);
}

// The constants of log_tail as V values.
template <class V>
struct LogConsts {
  V minus1, ln2hi, ln2lo, p0, p1, p2, p3, p4, p5, p6, p7;
  template <class F>
  constexpr explicit LogConsts(F make)
      : minus1(make(-1.0)), ln2hi(make(kLn2Hi * 0x1p-52)), ln2lo(make(kLn2Lo * 0x1p-52)), p0(make(kP0)),
        p1(make(kP1)), p2(make(kP2)), p3(make(kP3)), p4(make(kP4)), p5(make(kP5)), p6(make(kP6)), p7(make(kP7)) {}
};
constexpr LogConsts<double> kScalarLog([](double v) { return v; });

inline double log_core(double x) {  // x in log_domain
  const uint64_t ix = bits_of(x);
  const uint64_t tmp = ix - kLogOff;
  const int i = static_cast<int>((tmp >> 48) & 15);
  const uint64_t top = tmp & kTop12;
  const double kb = static_cast<double>(static_cast<int64_t>(top));
  const double z = double_of(ix - top);
  return log_tail(z, kb, kInvC[i], kLogCHi[i], kLogCLo[i], kScalarLog);
}

inline double log_scalar(double x) { return log_domain(bits_of(x)) ? log_core(x) : std::log(x); }

// ---- SIMD wrappers: W lanes of doubles, masks, windows ----------------------------------------------------------
// Tables of the histogram as the candidates read them (padded: windows read up to 16 + W past the last bin).
struct Tables {
  double *h, *prefix, *sp, *spl;  // h normalised; prefix/sp/spl: cumsums of h, pe, pe log pe with a 0 first
};

// A value the compiler cannot see through: constants made once stay in registers (else GCC folds each use into a
// 64-byte load from the constant pool, and the loads limit the logarithm's throughput on Zen 4).
template <class T>
inline T opaque(T v) {
#if defined(__GNUC__)
  asm volatile("" : "+v"(v));  // volatile: made where written (not hoisted where they would occupy registers)
#endif
  return v;
}

struct Scalar {
  static constexpr int W = 1;
  using D = double;
  using M = bool;
  struct LogK {};
  static LogK log_consts() { return {}; }
  static D set(double v) { return v; }
  static D lanes(const double* p) { return *p; }
  static void store(double* p, D v) { *p = v; }
  // f = e - floor(e) and h, sp, prefix at floor(e); b = floor(e) of lane 0 (the caller's integer arithmetic)
  static void windows(D e, int64_t b, const Tables& tb, D& f, D& hf, D& sf, D& pf) {
    f = e - static_cast<double>(b);
    hf = tb.h[b];
    sf = tb.sp[b];
    pf = tb.prefix[b];
  }
  static M gt(D a, D b) { return a > b; }
  static D add_if(M m, D acc, D v) { return m ? acc + v : acc; }  // acc + v where m, acc elsewhere
  static D select(M m, D a, D b) { return m ? a : b; }
  template <bool kChecked>
  static D log(D x, const LogK&) {
    return kChecked ? log_scalar(x) : log_core(x);
  }
};

#if defined(__AVX512F__) && defined(__FMA__)
struct Vec {
  __m512d v;
  Vec() = default;
  Vec(__m512d x) : v(x) {}  // NOLINT
  explicit Vec(double x) : v(_mm512_set1_pd(x)) {}
};
inline Vec operator+(Vec a, Vec b) { return _mm512_add_pd(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm512_sub_pd(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm512_mul_pd(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm512_div_pd(a.v, b.v); }  // per candidate group only
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_pd(a.v, b.v, c.v); }

struct Simd {
  static constexpr int W = 8;
  using D = Vec;
  using M = __mmask8;
  struct LogK {
    LogConsts<Vec> c;
    __m512i off, top, lowest, span;
    __m512d invc0, invc1, lch0, lch1, lcl0, lcl1;  // the 16-entry tables, two registers each (vpermt2pd)
  };
  static LogK log_consts() {
    return {LogConsts<Vec>([](double v) { return Vec(opaque(_mm512_set1_pd(v))); }),
            opaque(_mm512_set1_epi64(kLogOff)),
            opaque(_mm512_set1_epi64(kTop12)),
            opaque(_mm512_set1_epi64(0x0010000000000000LL)),
            opaque(_mm512_set1_epi64(0x7FE0000000000000LL)),
            opaque(_mm512_load_pd(kInvC)),
            opaque(_mm512_load_pd(kInvC + 8)),
            opaque(_mm512_load_pd(kLogCHi)),
            opaque(_mm512_load_pd(kLogCHi + 8)),
            opaque(_mm512_load_pd(kLogCLo)),
            opaque(_mm512_load_pd(kLogCLo + 8))};
  }
  static D set(double v) { return Vec(v); }
  static D lanes(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, D v) { _mm512_storeu_pd(p, v.v); }
  // The lanes' bins fl lie in [b, b + 8), b = lane 0's: a 16-entry window at A = b & ~7 (two loads, one vpermt2pd
  // each) covers them; the permute index is fl mod 16 (the low bits of fl + 2^52), so the two halves of the window go
  // in swapped order where A = 8 mod 16.
  static void windows(D e, int64_t b, const Tables& tb, D& f, D& hf, D& sf, D& pf) {
    const __m512d fl = _mm512_roundscale_pd(e.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    f = e - Vec(fl);
    const __m512i idx = _mm512_castpd_si512(_mm512_add_pd(fl, _mm512_set1_pd(0x1p52)));
    const int64_t a = b & ~int64_t{7}, s = a & 8;
    const int64_t lo = a + s, hi = a + 8 - s;
    hf = _mm512_permutex2var_pd(_mm512_loadu_pd(tb.h + lo), idx, _mm512_loadu_pd(tb.h + hi));
    sf = _mm512_permutex2var_pd(_mm512_loadu_pd(tb.sp + lo), idx, _mm512_loadu_pd(tb.sp + hi));
    pf = _mm512_permutex2var_pd(_mm512_loadu_pd(tb.prefix + lo), idx, _mm512_loadu_pd(tb.prefix + hi));
  }
  static M gt(D a, D b) { return _mm512_cmp_pd_mask(a.v, b.v, _CMP_GT_OQ); }
  static D add_if(M m, D acc, D v) { return _mm512_mask_add_pd(acc.v, m, acc.v, v.v); }
  static D select(M m, D a, D b) { return _mm512_mask_blend_pd(m, b.v, a.v); }
  template <bool kChecked>
  static D log(D x, const LogK& k) {
    const __m512i ix = _mm512_castpd_si512(x.v);
    const __m512i tmp = _mm512_sub_epi64(ix, k.off);
    const __m512i idx = _mm512_srli_epi64(tmp, 48);  // vpermt2pd reads the low 4 bits
    const __m512i top = _mm512_and_si512(tmp, k.top);
#if defined(__AVX512DQ__)
    const __m512d kb = _mm512_cvtepi64_pd(top);
#else
    const __m512d kb = _mm512_mul_pd(
        _mm512_sub_pd(_mm512_castsi512_pd(_mm512_add_epi64(_mm512_srai_epi64(tmp, 52),
                                                           _mm512_set1_epi64(0x4338000000000000LL))),
                      _mm512_set1_pd(0x1.8p52)),
        _mm512_set1_pd(0x1p52));
#endif
    const __m512d z = _mm512_castsi512_pd(_mm512_sub_epi64(ix, top));
    Vec y = log_tail<Vec>(z, kb, _mm512_permutex2var_pd(k.invc0, idx, k.invc1),
                          _mm512_permutex2var_pd(k.lch0, idx, k.lch1), _mm512_permutex2var_pd(k.lcl0, idx, k.lcl1),
                          k.c);
    if (kChecked) {
      const __mmask8 bad = _mm512_cmpge_epu64_mask(_mm512_sub_epi64(ix, k.lowest), k.span);
      if (bad) y = fixup(x, y, bad);
    }
    return y;
  }
  static Vec fixup(Vec x, Vec y, __mmask8 bad) {
    alignas(64) double xs[8], ys[8];
    _mm512_store_pd(xs, x.v);
    _mm512_store_pd(ys, y.v);
    for (int i = 0; i < 8; ++i)
      if ((bad >> i) & 1) ys[i] = std::log(xs[i]);
    return _mm512_load_pd(ys);
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  __m256d v;
  Vec() = default;
  Vec(__m256d x) : v(x) {}  // NOLINT
  explicit Vec(double x) : v(_mm256_set1_pd(x)) {}
};
inline Vec operator+(Vec a, Vec b) { return _mm256_add_pd(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm256_sub_pd(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm256_mul_pd(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm256_div_pd(a.v, b.v); }  // per candidate group only
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_pd(a.v, b.v, c.v); }

struct Simd {
  static constexpr int W = 4;
  using D = Vec;
  using M = __m256d;
  struct LogK {
    LogConsts<Vec> c;
  };
  static LogK log_consts() {
    return {LogConsts<Vec>([](double v) { return Vec(opaque(_mm256_set1_pd(v))); })};
  }
  static D set(double v) { return Vec(v); }
  static D lanes(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, D v) { _mm256_storeu_pd(p, v.v); }
  // p[rel[i]] for 0 <= rel[i] < 4: one load and a permute of 32-bit pairs (2 rel, 2 rel + 1) instead of a gather
  static __m256d window(const double* p, __m256i pairs) {
    return _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(_mm256_loadu_pd(p)), pairs));
  }
  static void windows(D e, int64_t b, const Tables& tb, D& f, D& hf, D& sf, D& pf) {
    const __m256d fl = _mm256_floor_pd(e.v);
    f = e - Vec(fl);
    const __m128i fi = _mm256_cvttpd_epi32(fl);
    const __m256i d = _mm256_slli_epi64(
        _mm256_cvtepi32_epi64(_mm_sub_epi32(fi, _mm_set1_epi32(static_cast<int32_t>(b)))), 1);
    const __m256i pairs = _mm256_or_si256(d, _mm256_slli_epi64(_mm256_add_epi64(d, _mm256_set1_epi64x(1)), 32));
    hf = window(tb.h + b, pairs);
    sf = window(tb.sp + b, pairs);
    pf = window(tb.prefix + b, pairs);
  }
  static M gt(D a, D b) { return _mm256_cmp_pd(a.v, b.v, _CMP_GT_OQ); }
  static D add_if(M m, D acc, D v) { return _mm256_blendv_pd(acc.v, _mm256_add_pd(acc.v, v.v), m); }
  static D select(M m, D a, D b) { return _mm256_blendv_pd(b.v, a.v, m); }
  template <bool kChecked>
  static D log(D x, const LogK& k) {
    const __m256i ix = _mm256_castpd_si256(x.v);
    const __m256i tmp = _mm256_sub_epi64(ix, _mm256_set1_epi64x(kLogOff));
    const __m256i idx = _mm256_and_si256(_mm256_srli_epi64(tmp, 48), _mm256_set1_epi64x(15));
    const __m256i top = _mm256_and_si256(tmp, _mm256_set1_epi64x(kTop12));
    // k 2^52: k + 2048 from the top 12 bits with the sign flipped, as a double through the 2^52 trick, scaled
    const __m256i kbits = _mm256_or_si256(
        _mm256_srli_epi64(_mm256_xor_si256(tmp, _mm256_set1_epi64x(INT64_MIN)), 52),
        _mm256_set1_epi64x(0x4330000000000000LL));
    const __m256d kb = _mm256_mul_pd(_mm256_sub_pd(_mm256_castsi256_pd(kbits), _mm256_set1_pd(0x1p52 + 2048.0)),
                                     _mm256_set1_pd(0x1p52));
    const __m256d z = _mm256_castsi256_pd(_mm256_sub_epi64(ix, top));
    Vec y = log_tail<Vec>(z, kb, _mm256_i64gather_pd(kInvC, idx, 8), _mm256_i64gather_pd(kLogCHi, idx, 8),
                          _mm256_i64gather_pd(kLogCLo, idx, 8), k.c);
    if (kChecked) {
      const __m256d ok = _mm256_and_pd(_mm256_cmp_pd(x.v, _mm256_set1_pd(DBL_MIN), _CMP_GE_OQ),
                                       _mm256_cmp_pd(x.v, _mm256_set1_pd(DBL_MAX), _CMP_LE_OQ));
      const int okm = _mm256_movemask_pd(ok);
      if (okm != 0xF) {
        alignas(32) double xs[4], ys[4];
        _mm256_store_pd(xs, x.v);
        _mm256_store_pd(ys, y.v);
        for (int i = 0; i < 4; ++i)
          if (!((okm >> i) & 1)) ys[i] = std::log(xs[i]);
        y = _mm256_load_pd(ys);
      }
    }
    return y;
  }
};
#else
using Simd = Scalar;
#endif

// y[i] = log(x[i]) with S, the last n mod W one at a time (the same results)
template <class S>
void log_array(const double* x, int64_t n, double* y) {
  const typename S::LogK k = S::log_consts();
  int64_t i = 0;
  for (; i + S::W <= n; i += S::W) S::store(y + i, S::template log<true>(S::lanes(x + i), k));
  for (; i < n; ++i) y[i] = log_scalar(x[i]);
}

// The running state of W consecutive candidates (one per lane) over the merged bins.
template <class S>
struct Group {
  using D = typename S::D;
  D npb, inv_npb, e, f_prev, pe_prev, sp_prev, integ_prev, q_prev, lq, cross1, cross2;
  int64_t t0, et0;  // lane 0's t and (j + 1) t0: floor(e) of lane 0 is et0 >> log2(levels), in integers
};

// One merged bin j of a group: the logarithms' arguments and weights, stored at o[0, 4 W): log(q + eps)'s argument
// and weight (pe over the merged bin's inner bins), the edge term's (the mix and pe of the edge's bin).
template <class S, bool kChecked>
inline void bin_terms(Group<S>& g, const Tables& tb, int shift, typename S::D veps, double* o) {
  constexpr int W = S::W;
  using D = typename S::D;
  using M = typename S::M;
  const D zero = S::set(0.0), one = S::set(1.0);
  g.e = g.e + g.npb;  // edge j + 1 = (j + 1) t / levels, exact (levels is a power of two), as every sum
  g.et0 += g.t0;      // the window's base from integers: the loads need not wait for the vector arithmetic
  D f, hf, sf, pf;
  S::windows(g.e, g.et0 >> shift, tb, f, hf, sf, pf);
  const D integ = pf + f * hf;
  const D d = integ - g.integ_prev;
  const D q = d * g.inv_npb;                // mean density of merged bin j
  const D qe = fmadd(d, g.inv_npb, veps);  // q + eps, rounded once
  // pe over the bins wholly inside merged bin j: sp[fi_{j+1}] - sp[ceil(e_j)], sp[fi + 1] = sp[fi] + pe[fi]
  const M inside = S::gt(g.f_prev, zero);
  const D sp_ci = S::add_if(inside, g.sp_prev, g.pe_prev);
  S::store(o, qe);
  S::store(o + W, sf - sp_ci);
  // inner edge j (j > 0; inside is false at j = 0) inside bin fi_j: Q = f q_{j-1} + (1 - f) q_j + eps there;
  // elsewhere weight 0 times log(1) (checked) or log(mix = qe), finite (plain): +-0, which leaves the sum as it is
  // (the sum is never -0)
  const D mix = fmadd(g.f_prev, g.q_prev - q, qe);
  S::store(o + 2 * W, kChecked ? S::select(inside, mix, one) : mix);
  S::store(o + 3 * W, S::select(inside, g.pe_prev, zero));
  g.f_prev = f;
  g.pe_prev = hf + veps;
  g.sp_prev = sf;
  g.integ_prev = integ;
  g.q_prev = q;
}

// The logarithms and sums of jn merged bins of a group (bin_terms' output at o, 4 W per bin).
template <class S, bool kChecked>
inline void bin_sums(Group<S>& g, const typename S::LogK& k, int jn, const double* o) {
  using D = typename S::D;
  constexpr int W = S::W;
  D c1 = g.cross1, c2 = g.cross2, l1 = g.lq;
  for (int jj = 0; jj < jn; ++jj, o += 4 * W) {
    l1 = S::template log<kChecked>(S::lanes(o), k);
    c1 = c1 + l1 * S::lanes(o + W);
    c2 = c2 + S::lanes(o + 3 * W) * S::template log<kChecked>(S::lanes(o + 2 * W), k);
  }
  g.cross1 = c1;
  g.cross2 = c2;
  g.lq = l1;
}

// U (1 or 2) groups of W consecutive candidates starting at t0 (lanes past n - 1 repeat t = n - 1; the caller
// ignores them): the two sums over merged bins and log(q_last + eps), per lane. kChecked: logarithms that handle
// any argument (else every argument must be positive normal: kl_all's plain case).
// In chunks of J merged bins: first the logarithms' arguments and weights of every (lane, j) (windows, no
// logarithm; the groups interleaved), then the logarithms and the sums, a stream of independent logarithms (one
// pass's registers free for the other's: no spills, the logarithm's constants in registers).
template <class S, int U, bool kChecked>
inline void candidates(const Tables& tb, int64_t n, int levels, double eps, int64_t t0, double* cross1_out,
                       double* cross2_out, double* lq_last_out) {
  static_assert(U == 1 || U == 2, "one or two groups");
  using D = typename S::D;
  constexpr int W = S::W;
  constexpr int J = 32;
  alignas(64) double tl[U * W];
  for (int i = 0; i < U * W; ++i) tl[i] = static_cast<double>(std::min<int64_t>(t0 + i, n - 1));
  const D lv = S::set(static_cast<double>(levels)), zero = S::set(0.0), veps = S::set(eps);
  Group<S> g[U];
  for (int u = 0; u < U; ++u) {
    const D t = S::lanes(tl + u * W);
    g[u].npb = t / lv;
    g[u].inv_npb = lv / t;
    // edge 0 (e = 0): integral prefix[0] + 0 * h[0]
    g[u].e = zero;
    g[u].f_prev = zero;
    g[u].pe_prev = S::set(tb.h[0]) + veps;
    g[u].sp_prev = S::set(tb.sp[0]);
    g[u].integ_prev = S::set(tb.prefix[0]) + zero * S::set(tb.h[0]);
    g[u].q_prev = zero;
    g[u].lq = zero;
    g[u].cross1 = zero;
    g[u].cross2 = zero;
    g[u].t0 = t0 + u * W;
    g[u].et0 = 0;
  }
  int shift = 0;
  while ((1 << shift) < levels) ++shift;
  // per group and j: log argument and weight of the merged bin's inner bins, of the edge's bin
  alignas(64) double buf[U][J * 4 * W];
  for (int j0 = 0; j0 < levels; j0 += J) {
    const int jn = std::min(J, levels - j0);
    Group<S> g0 = g[0];
    Group<S> g1 = g[U - 1];
    for (int jj = 0; jj < jn; ++jj) {
      bin_terms<S, kChecked>(g0, tb, shift, veps, buf[0] + jj * 4 * W);
      if (U == 2) bin_terms<S, kChecked>(g1, tb, shift, veps, buf[U - 1] + jj * 4 * W);
    }
    const typename S::LogK k = S::log_consts();  // here: not live (in registers) during the first loop
    bin_sums<S, kChecked>(g0, k, jn, buf[0]);
    g[0] = g0;
    if (U == 2) {
      bin_sums<S, kChecked>(g1, k, jn, buf[U - 1]);
      g[U - 1] = g1;
    }
  }
  for (int u = 0; u < U; ++u) {
    S::store(cross1_out + u * W, g[u].cross1);
    S::store(cross2_out + u * W, g[u].cross2);
    S::store(lq_last_out + u * W, g[u].lq);
  }
}

// Every candidate t in [levels, n) with the vector type S.
template <class S>
int kl_all(const double* hist, int64_t n, int levels, double eps, double* out) {
  if (levels < 1 || (levels & (levels - 1)) != 0 || n <= levels || n >= (int64_t{1} << 30)) return 2;
  double total = 0.0;
  bool nonneg = true;
  for (int64_t k = 0; k < n; ++k) {
    total += hist[k];
    nonneg &= hist[k] >= 0;
  }
  if (total <= 0) return 1;
  // every logarithm's argument is then positive normal: h >= 0 makes the integral non-decreasing in e (also
  // rounded), so q >= 0, and q + eps, mix >= eps (to within rounding: eps far above DBL_MIN); q <= 1
  const bool plain = nonneg && total <= DBL_MAX && eps >= 1e-300 && eps <= 1e300;
  constexpr int kPad = 16 + 2 * Simd::W;
  constexpr int U = S::W > 1 ? 2 : 1;
  constexpr int G = U * S::W;
  const int64_t m = n - levels;
  // all scratch in one allocation (several smaller ones freed together leave the heap's top to be trimmed and
  // faulted in again on every call), not zeroed but where read before written: the windows' padding, the sums' 0
  const int64_t size = 3 * (n + 1 + kPad) + (n + 1) + 2 * n + 3 * (m + G) + 2 * m;
  std::unique_ptr<double[]> scratch(new double[size]);
  double* next = scratch.get();
  auto take = [&next](int64_t len) {
    double* p = next;
    next += len;
    return p;
  };
  Tables tb;
  tb.h = take(n + 1 + kPad);
  tb.prefix = take(n + 1 + kPad);
  tb.sp = take(n + 1 + kPad);
  tb.spl = take(n + 1);
  double *pe = take(n), *lpe = take(n), *c1 = take(m + G), *c2 = take(m + G), *lql = take(m + G), *last = take(m),
         *llast = take(m);
  double* h = tb.h;
  std::fill(h + n, h + n + 1 + kPad, 0.0);
  std::fill(tb.prefix + n + 1, tb.prefix + n + 1 + kPad, 0.0);
  std::fill(tb.sp + n + 1, tb.sp + n + 1 + kPad, 0.0);
  tb.prefix[0] = tb.sp[0] = tb.spl[0] = 0.0;
  for (int64_t k = 0; k < n; ++k) h[k] = hist[k] / total;  // (vectorised: separate loops, running sums in locals)
  for (int64_t k = 0; k < n; ++k) pe[k] = h[k] + eps;
  double run_h = 0.0, run_pe = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    tb.prefix[k + 1] = run_h = run_h + h[k];
    tb.sp[k + 1] = run_pe = run_pe + pe[k];
  }
  log_array<S>(pe, n, lpe);
  for (int64_t k = 0; k < n; ++k) lpe[k] = pe[k] * lpe[k];
  double run_pl = 0.0;
  for (int64_t k = 0; k < n; ++k) tb.spl[k + 1] = run_pl = run_pl + lpe[k];
  for (int64_t t0 = levels; t0 < n; t0 += G) {
    const int64_t o = t0 - levels;
    if (plain)
      candidates<S, U, false>(tb, n, levels, eps, t0, &c1[o], &c2[o], &lql[o]);
    else
      candidates<S, U, true>(tb, n, levels, eps, t0, &c1[o], &c2[o], &lql[o]);
  }
  for (int64_t t = levels; t < n; ++t) {
    const double tail = tb.prefix[n] - tb.prefix[t];  // sum(h[t:])
    last[t - levels] = (tb.h[t - 1] + eps) + tail;    // bin t - 1 carries the tail
  }
  log_array<S>(last, m, llast);
  for (int64_t t = levels; t < n; ++t) {
    const int64_t i = t - levels;
    const double tail = tb.prefix[n] - tb.prefix[t];
    const double cross = (c1[i] + c2[i]) + tail * lql[i];
    out[i] = (tb.spl[t - 1] + last[i] * llast[i]) - cross;
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

extern "C" void dq_log_array(const double* x, int64_t n, double* out) { log_array<Simd>(x, n, out); }

extern "C" void dq_log_array_scalar(const double* x, int64_t n, double* out) { log_array<Scalar>(x, n, out); }
