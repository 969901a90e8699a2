// deployq's fused calibration operators for MXNet 1.9 (loaded with mx.library.load; deployq/native/calibops.py).
//
// One operator, dq_calib_stats(x_0, ..., x_{k-1}[, aux]), reduces the tapped activations of a batch inside the graph
// (one call per batch, not per tensor), so that only a few numbers per tensor cross to the host (deployq.calib.api).
// The output is one float64 vector, the per-tensor results below one after the other; aux row i (float64, rows of
// 4 for clip, 1 for hist) belongs to x_i. attrs: mode, num_inputs (k), num_bins. Per tensor x:
//
//   range      (x) -> [min, max]                  min/max of x; both NaN if x has a NaN (as NumPy's min/max)
//   clip       (x, aux) -> [min, max, clipped]    aux row [ema_lo, ema_hi, initialised, momentum]: the EMA of the
//                                                 batch range after this batch, exactly as calib/ema.py computes it
//                                                 in float64, then clipped = #{x > t} + #{x < -t} with
//                                                 t = float32(max(|ema_lo|, |ema_hi|)) (EMACalibrator.observe)
//   hist       (x, aux) -> [counts(num_bins), zeros]
//                                                 aux row [absmax]: ncnn2table's binning of |x| as
//                                                 calib/histogram.py computes it: index = trunc(float32(|x| * s)),
//                                                 s = float32(num_bins / absmax), min(index, num_bins - 1); exact
//                                                 zeros (|x| bits 0) counted apart and not in the bins
//
// Compiled with -ffp-contract=off and without fast-math, so the float32/float64 operations are exactly the NumPy
// ones. Zeros are tested on the bits, so a flush-to-zero/denormals-are-zero mode of the engine thread
// does not change which values count as zero.
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

#include "lib_api.h"

using namespace mxnet::ext;
using Attrs = std::unordered_map<std::string, std::string>;

namespace {

enum Mode { kRange = 0, kClip = 1, kHist = 2, kBad = -1 };

Mode mode_of(const Attrs& a) {
  auto it = a.find("mode");
  const std::string m = it == a.end() ? std::string("range") : it->second;
  if (m == "range") return kRange;
  if (m == "clip") return kClip;
  if (m == "hist") return kHist;
  return kBad;
}
int64_t attr_int(const Attrs& a, const char* k, int64_t d) {
  auto it = a.find(k);
  return it == a.end() ? d : std::stoll(it->second);
}
int64_t out_len(Mode m, int64_t bins) {
  switch (m) {
    case kRange: return 2;
    case kClip: return 3;
    case kHist: return bins + 1;
    default: return 0;
  }
}

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
MinMax min_max(const float* x, int64_t n) {
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
int64_t count_beyond(const float* x, int64_t n, float t) {
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
// dependency between neighbours), zeros (|x| bits 0) counted apart and removed from bin 0
void abs_hist(const float* x, int64_t n, float s, int64_t bins, double* counts, double* zeros) {
  std::vector<uint32_t> sub(4 * static_cast<size_t>(bins), 0u);
  const float top = static_cast<float>(bins);  // exact (bins <= 2^24 checked in parse)
  const int32_t last = static_cast<int32_t>(bins - 1);
  int64_t nz = 0;
  constexpr int64_t kBlock = 256;
  alignas(32) int32_t idx[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    const float* xb = x + b;
    int64_t j = 0;
#ifdef __AVX2__
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
    for (int l = 0; l < 8; ++l) nz += z8[l];
#endif
    for (; j < m; ++j) {
      const float a = std::fabs(xb[j]);
      const float v = a * s;
      // v >= bins (or inf) -> the last bin, as calib/histogram.py's min(index, bins - 1)
      idx[j] = v < top ? static_cast<int32_t>(v) : last;
      nz += (bits_of(a) == 0u) ? 1 : 0;
    }
    j = 0;
    for (; j + 4 <= m; j += 4) {
      ++sub[idx[j]];
      ++sub[bins + idx[j + 1]];
      ++sub[2 * bins + idx[j + 2]];
      ++sub[3 * bins + idx[j + 3]];
    }
    for (; j < m; ++j) ++sub[idx[j]];
  }
  for (int64_t k = 0; k < bins; ++k)
    counts[k] = static_cast<double>(static_cast<uint64_t>(sub[k]) + sub[bins + k] + sub[2 * bins + k] +
                                    sub[3 * bins + k]);
  counts[0] -= static_cast<double>(nz);
  *zeros = static_cast<double>(nz);
}

bool has_aux(Mode m) { return m == kClip || m == kHist; }

MXReturnValue parse(const Attrs& attrs, int* n_in, int* n_out) {
  const Mode m = mode_of(attrs);
  if (m == kBad) {
    MX_ERROR_MSG << "dq_calib_stats: unknown mode " << attrs.at("mode");
    return MX_FAIL;
  }
  const int64_t bins = attr_int(attrs, "num_bins", 2048);
  if (m == kHist && (bins < 2 || bins > (1 << 24))) {
    MX_ERROR_MSG << "dq_calib_stats: num_bins must be in [2, 2^24], got " << bins;
    return MX_FAIL;
  }
  const int64_t k = attr_int(attrs, "num_inputs", 1);
  if (k < 1) {
    MX_ERROR_MSG << "dq_calib_stats: num_inputs must be >= 1, got " << k;
    return MX_FAIL;
  }
  *n_in = static_cast<int>(k) + (has_aux(m) ? 1 : 0);
  *n_out = 1;
  return MX_SUCCESS;
}
MXReturnValue infer_type(const Attrs& attrs, std::vector<int>* in, std::vector<int>* out) {
  const size_t k = static_cast<size_t>(attr_int(attrs, "num_inputs", 1));
  for (size_t i = 0; i < k; ++i)
    if ((*in)[i] != kFloat32) {
      MX_ERROR_MSG << "dq_calib_stats: the tensors must be float32";
      return MX_FAIL;
    }
  if (in->size() > k && (*in)[k] != kFloat64) {
    MX_ERROR_MSG << "dq_calib_stats: aux must be float64";
    return MX_FAIL;
  }
  (*out)[0] = kFloat64;
  return MX_SUCCESS;
}
MXReturnValue infer_shape(const Attrs& attrs, std::vector<std::vector<unsigned int>>*,
                          std::vector<std::vector<unsigned int>>* out) {
  (*out)[0] = {static_cast<unsigned int>(attr_int(attrs, "num_inputs", 1) *
                                         out_len(mode_of(attrs), attr_int(attrs, "num_bins", 2048)))};
  return MX_SUCCESS;
}

// the statistics of one tensor x (n values) into o; aux: its row of the aux input (clip: 4 values, hist: 1)
void stats_of(Mode m, const float* x, int64_t n, const double* aux, int64_t bins, double* o) {
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

MXReturnValue forward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                      const OpResource&) {
  const Mode m = mode_of(attrs);
  const int64_t bins = attr_int(attrs, "num_bins", 2048);
  const int64_t k = attr_int(attrs, "num_inputs", 1);
  const int64_t len = out_len(m, bins), row = m == kClip ? 4 : 1;
  const double* aux = has_aux(m) ? (*in)[k].data<double>() : nullptr;
  double* o = (*out)[0].data<double>();
  for (int64_t i = 0; i < k; ++i)
    stats_of(m, (*in)[i].data<float>(), (*in)[i].size(), aux ? aux + i * row : nullptr, bins, o + i * len);
  return MX_SUCCESS;
}

// statistics have no gradient (registered only because a CachedOp builds the backward graph): zeros
MXReturnValue backward(const Attrs&, std::vector<MXTensor>*, std::vector<MXTensor>* out, const OpResource&) {
  for (auto& t : *out) {
    const size_t bytes = t.dtype == kFloat64 ? sizeof(double) : sizeof(float);
    std::memset(t.data_ptr, 0, bytes * t.size());
  }
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(dq_calib_stats)
    .setParseAttrs(parse)
    .setInferType(infer_type)
    .setInferShape(infer_shape)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu");

MXReturnValue initialize(int version) {
  if (version < 10900) {
    MX_ERROR_MSG << "deployq calibration ops need MXNet >= 1.9 (found " << version << ")";
    return MX_FAIL;
  }
  return MX_SUCCESS;
}
