// Statistics kernels shared by deployq's two calibration readers: the dq_calib_stats operator (calibops.cc, inside
// the graph) and dq_raw_stats (rawstats.cc, on the oneDNN buffers of the graph's outputs). The result layout per
// tensor is documented in calibops.cc. Every kernel is invariant under a permutation of x (min/max, counts,
// histograms), so a tensor can be read in any memory layout that holds each element once.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__AVX__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace deployq_calib {

enum Mode { kRange = 0, kClip = 1, kHist = 2, kPow2 = 3, kBad = -1 };

inline int64_t out_len(Mode m, int64_t bins) {
  switch (m) {
    case kRange: return 2;
    case kClip: return 3;
    case kHist: return bins + 1;
    case kPow2: return bins + 4;
    default: return 0;
  }
}
inline bool has_aux(Mode m) { return m == kClip || m == kHist || m == kPow2; }
inline int64_t aux_row(Mode m) { return m == kClip ? 4 : 1; }

inline uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

struct MinMax {
  float lo, hi;
  bool nan;
};

// min and max of x (AVX: 8 lanes of vminps/vmaxps, a NaN found by an unordered compare); both NaN on a NaN
inline MinMax min_max(const float* x, int64_t n) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  bool nan = false;
  int64_t i = 0;
#ifdef __AVX__
  if (n >= 8) {
    __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi), vnan = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      vlo = _mm256_min_ps(v, vlo);  // v < lo ? v : lo (lo kept when v is NaN)
      vhi = _mm256_max_ps(v, vhi);
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float l8[8], h8[8];
    _mm256_store_ps(l8, vlo);
    _mm256_store_ps(h8, vhi);
    for (int l = 0; l < 8; ++l) {
      lo = l8[l] < lo ? l8[l] : lo;
      hi = h8[l] > hi ? h8[l] : hi;
    }
    nan = _mm256_movemask_ps(vnan) != 0;
  }
#endif
  for (; i < n; ++i) {
    const float v = x[i];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    nan = nan || v != v;
  }
  if (nan) lo = hi = std::numeric_limits<float>::quiet_NaN();
  return MinMax{lo, hi, nan};
}

// #{x > t} + #{x < -t}
inline int64_t count_beyond(const float* x, int64_t n, float t) {
  int64_t c = 0, i = 0;
#ifdef __AVX2__
  const __m256 vt = _mm256_set1_ps(t), vmt = _mm256_set1_ps(-t);
  while (i + 8 <= n) {
    __m256i acc = _mm256_setzero_si256();  // per-lane counts, flushed every 2^20 vectors (no int32 overflow)
    const int64_t stop = std::min(n - (n - i) % 8, i + (int64_t{8} << 20));
    for (; i < stop; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      acc = _mm256_sub_epi32(acc, _mm256_castps_si256(_mm256_cmp_ps(v, vt, _CMP_GT_OQ)));  // mask = -1
      acc = _mm256_sub_epi32(acc, _mm256_castps_si256(_mm256_cmp_ps(v, vmt, _CMP_LT_OQ)));
    }
    alignas(32) int32_t a8[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(a8), acc);
    for (int l = 0; l < 8; ++l) c += a8[l];
  }
#endif
  for (; i < n; ++i) c += (x[i] > t ? 1 : 0) + (x[i] < -t ? 1 : 0);
  return c;
}

// counts of trunc(|x| * s) clamped to [0, bins - 1] into four interleaved sub-histograms (no store-to-load
// dependency between neighbours); zeros (|x| bits 0) counted apart and not in the bins. AVX-512: the indices of
// the non-zero values are compressed before the scatter (post-ReLU tensors are ~40 % zeros); AVX2: zeros are
// scattered into bin 0 and taken out again. Both give the scalar loop's counts.
inline void abs_hist(const float* x, int64_t n, float s, int64_t bins, double* counts, double* zeros) {
  // four sub-histograms on large tensors; one where zeroing and summing 4 x bins would cost more than it saves
  const int64_t nsub = n >= 16 * bins ? 4 : 1;
  thread_local std::vector<uint32_t> sub;
  sub.assign(static_cast<size_t>(nsub * bins), 0u);
  const float top = static_cast<float>(bins);  // exact (bins <= 2^24 checked by the callers)
  const int32_t last = static_cast<int32_t>(bins - 1);
  int64_t nz = 0;      // zeros among x
  int64_t binned0 = 0;  // zeros that went into bin 0 (AVX2 and scalar paths)
  constexpr int64_t kBlock = 256;
  alignas(64) int32_t idx[kBlock + 16];  // + 16: the AVX-512 path stores whole vectors past the kept indices
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    const float* xb = x + b;
    int64_t j = 0, k = 0;  // j: values read, k: indices written
#ifdef __AVX512F__
    {
      const __m512 vs = _mm512_set1_ps(s), vtop = _mm512_set1_ps(top);
      const __m512i vlast = _mm512_set1_epi32(last), vabs = _mm512_set1_epi32(0x7fffffff);
      for (; j + 16 <= m; j += 16) {
        const __m512i bits = _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(xb + j)), vabs);  // |x|
        const __mmask16 nonzero = _mm512_test_epi32_mask(bits, bits);
        const __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(bits), vs);
        const __mmask16 in = _mm512_cmp_ps_mask(v, vtop, _CMP_LT_OQ);  // v < bins (false for NaN)
        const __m512i t = _mm512_mask_mov_epi32(vlast, in, _mm512_cvttps_epi32(v));
        // compress in a register, then a plain store (the memory form of vpcompressd is microcoded on AMD Zen 4)
        _mm512_storeu_si512(idx + k, _mm512_maskz_compress_epi32(nonzero, t));
        const int kept = __builtin_popcount(static_cast<unsigned>(nonzero));
        k += kept;
        nz += 16 - kept;
      }
    }
#elif defined(__AVX2__)
    {
      const __m256 vs = _mm256_set1_ps(s), vtop = _mm256_set1_ps(top);
      const __m256i vlast = _mm256_set1_epi32(last), vabs = _mm256_set1_epi32(0x7fffffff);
      __m256i vz = _mm256_setzero_si256();
      for (; j + 8 <= m; j += 8) {
        const __m256i bits = _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(xb + j)), vabs);  // |x|
        const __m256 v = _mm256_mul_ps(_mm256_castsi256_ps(bits), vs);
        const __m256i t = _mm256_cvttps_epi32(v);  // truncation
        const __m256 in = _mm256_cmp_ps(v, vtop, _CMP_LT_OQ);  // v < bins (false for NaN)
        _mm256_store_si256(reinterpret_cast<__m256i*>(idx + j),
                           _mm256_blendv_epi8(vlast, t, _mm256_castps_si256(in)));
        vz = _mm256_sub_epi32(vz, _mm256_cmpeq_epi32(bits, _mm256_setzero_si256()));
      }
      alignas(32) int32_t z8[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(z8), vz);
      for (int l = 0; l < 8; ++l) binned0 += z8[l];
      nz += binned0;
      k = j;
    }
#endif
    for (; j < m; ++j) {
      const float a = std::fabs(xb[j]);
      if (bits_of(a) == 0u) {  // a zero: counted apart, not binned
        ++nz;
        continue;
      }
      const float v = a * s;
      // v >= bins (or inf, NaN) -> the last bin, as calib/histogram.py's min(index, bins - 1)
      idx[k++] = v < top ? static_cast<int32_t>(v) : last;
    }
    int64_t i = 0;
    if (nsub == 4)
      for (; i + 4 <= k; i += 4) {
        ++sub[idx[i]];
        ++sub[bins + idx[i + 1]];
        ++sub[2 * bins + idx[i + 2]];
        ++sub[3 * bins + idx[i + 3]];
      }
    for (; i < k; ++i) ++sub[idx[i]];
  }
  for (int64_t q = 0; q < bins; ++q) {
    uint64_t c = 0;
    for (int64_t t = 0; t < nsub; ++t) c += sub[t * bins + q];
    counts[q] = static_cast<double>(c);
  }
  counts[0] -= static_cast<double>(binned0);
  *zeros = static_cast<double>(nz);
}

// the histogram range of the one-pass mode: the smallest power of two > absmax, at least `current`
// (frexp: absmax = f * 2^e with f in [0.5, 1), so 2^e > absmax)
inline double pow2_range(double absmax, double current) {
  if (!(absmax >= current) || absmax == 0.0) return current;
  int e = 0;
  std::frexp(absmax, &e);
  return std::ldexp(1.0, e);
}

inline void stats_of(Mode m, const float* x, int64_t n, const double* aux, int64_t bins, double* o) {
  if (m == kPow2) {  // [min, max, R, counts(bins), zeros]: the batch range, then |x| binned over [0, R)
    const MinMax r = min_max(x, n);
    o[0] = r.lo;
    o[1] = r.hi;
    const double absmax = std::max(std::fabs(static_cast<double>(r.lo)), std::fabs(static_cast<double>(r.hi)));
    std::fill(o + 3, o + 3 + bins + 1, 0.0);
    if (r.nan || !std::isfinite(absmax)) {  // the caller reports NaN/Inf from lo/hi
      o[2] = aux[0];
      return;
    }
    const double range = pow2_range(absmax, aux[0]);
    o[2] = range;
    if (!(range > 0.0)) {  // every value so far is zero
      o[3 + bins] = static_cast<double>(n);
      return;
    }
    abs_hist(x, n, static_cast<float>(static_cast<double>(bins) / range), bins, o + 3, o + 3 + bins);
    return;
  }
  if (m == kHist) {
    const double absmax = aux[0];
    if (!(absmax > 0.0)) {
      std::fill(o, o + bins, 0.0);
      int64_t z = 0;
      for (int64_t i = 0; i < n; ++i) z += ((bits_of(x[i]) & 0x7fffffffu) == 0u) ? 1 : 0;
      o[bins] = static_cast<double>(z);
      return;
    }
    const float s = static_cast<float>(static_cast<double>(bins) / absmax);  // np.float32(num_bins / absmax)
    abs_hist(x, n, s, bins, o, o + bins);
    return;
  }
  const MinMax r = min_max(x, n);
  o[0] = r.lo;
  o[1] = r.hi;
  if (m == kClip) {
    const double* st = aux;  // [ema_lo, ema_hi, initialised, momentum]
    double lo = r.lo, hi = r.hi;
    if (st[2] != 0.0) {  // calib/ema.py: m * ema + (1 - m) * range, in float64
      const double mo = st[3];
      lo = mo * st[0] + (1 - mo) * static_cast<double>(r.lo);
      hi = mo * st[1] + (1 - mo) * static_cast<double>(r.hi);
    }
    const float t = static_cast<float>(std::max(std::fabs(lo), std::fabs(hi)));
    // calib/ema.py skips the count when the batch max |x| <= t (nothing is beyond t then)
    const bool beyond = !(std::max(std::fabs(static_cast<double>(r.lo)), std::fabs(static_cast<double>(r.hi))) <=
                          static_cast<double>(t));
    o[2] = beyond ? static_cast<double>(count_beyond(x, n, t)) : 0.0;
  }
}


// one batch's statistics `s` (stats_of's layout) added to running totals `t` in the same layout: min / max
// (a NaN stays), histogram counts and zeros summed. pow2: when the batch's R exceeds the totals' R (> 0), the
// counts so far are merged first (bin i -> i / factor, calib/base.py's merge_pow2), then R = the batch's.
inline void add_stats(Mode m, const double* s, int64_t bins, double* t) {
  if (m == kHist) {
    for (int64_t q = 0; q <= bins; ++q) t[q] += s[q];
    return;
  }
  t[0] = (std::isnan(s[0]) || s[0] < t[0]) ? s[0] : t[0];
  t[1] = (std::isnan(s[1]) || s[1] > t[1]) ? s[1] : t[1];
  if (m != kPow2) return;
  double* c = t + 3;
  const double cur = t[2], r = s[2];
  if (r > cur && cur > 0.0) {
    const double factor = r / cur;  // a power of two
    if (factor >= static_cast<double>(bins)) {
      double all = 0.0;
      for (int64_t q = 0; q < bins; ++q) all += c[q];
      std::fill(c, c + bins, 0.0);
      c[0] = all;
    } else {
      const int64_t f = static_cast<int64_t>(factor), kept = bins / f;
      for (int64_t j = 0; j < kept; ++j) {  // in place: c[j] is written after c[j * f ..] (>= j) is read
        double sum = 0.0;
        for (int64_t i = j * f; i < (j + 1) * f; ++i) sum += c[i];
        c[j] = sum;
      }
      std::fill(c + kept, c + bins, 0.0);
    }
  }
  t[2] = std::max(cur, r);
  for (int64_t q = 0; q <= bins; ++q) c[q] += s[3 + q];  // counts and zeros
}

}  // namespace deployq_calib
