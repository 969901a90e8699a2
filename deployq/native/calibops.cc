// deployq's fused calibration operators for MXNet 1.9 (loaded with mx.library.load; deployq/native/calibops.py).
//
// One operator, dq_calib_stats(x_0, ..., x_{k-1}[, aux]), reduces the tapped activations of a batch inside the graph
// (one call per batch, not per tensor), so that only a few numbers per tensor cross to the host (deployq.calib.api).
// The output is one float64 vector, the per-tensor results below one after the other; aux row i (float64, rows of
// 4 for clip, 1 for hist and pow2) belongs to x_i. attrs: mode, num_inputs (k), num_bins. Per tensor x:
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
//   pow2       (x, aux) -> [min, max, R, counts(num_bins), zeros]
//                                                 the one-pass histogram: aux row [R0] (0: none yet); R = R0, or
//                                                 the smallest power of two above the batch's max |x| if that is
//                                                 >= R0; |x| binned as in hist with absmax = R. With a power-of-two
//                                                 num_bins, |x| * num_bins / R is exact, so the histogram of R can
//                                                 be merged into that of 2^d R exactly (bin i -> i >> d)
//
// Compiled with -ffp-contract=off and without fast-math, so the float32/float64 operations are exactly the NumPy
// ones. Zeros are tested on the bits, so a flush-to-zero/denormals-are-zero mode of the engine thread
// does not change which values count as zero.
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "calibstats.h"  // the kernels (shared with rawstats.cc)
#include "lib_api.h"
#include "opslib.h"

using namespace mxnet::ext;
using Attrs = std::unordered_map<std::string, std::string>;
using namespace deployq_calib;

namespace {

Mode mode_of(const Attrs& a) {
  auto it = a.find("mode");
  const std::string m = it == a.end() ? std::string("range") : it->second;
  if (m == "range") return kRange;
  if (m == "clip") return kClip;
  if (m == "hist") return kHist;
  if (m == "pow2") return kPow2;
  return kBad;
}
int64_t attr_int(const Attrs& a, const char* k, int64_t d) {
  auto it = a.find(k);
  return it == a.end() ? d : std::stoll(it->second);
}

MXReturnValue parse(const Attrs& attrs, int* n_in, int* n_out) {
  const Mode m = mode_of(attrs);
  if (m == kBad) {
    MX_ERROR_MSG << "dq_calib_stats: unknown mode " << attrs.at("mode");
    return MX_FAIL;
  }
  const int64_t bins = attr_int(attrs, "num_bins", 2048);
  if ((m == kHist || m == kPow2) && (bins < 2 || bins > (1 << 24))) {
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

MXReturnValue forward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                      const OpResource&) {
  const Mode m = mode_of(attrs);
  const int64_t bins = attr_int(attrs, "num_bins", 2048);
  const int64_t k = attr_int(attrs, "num_inputs", 1);
  const int64_t len = out_len(m, bins), row = aux_row(m);
  const double* aux = has_aux(m) ? (*in)[k].data<double>() : nullptr;
  double* o = (*out)[0].data<double>();
  for (int64_t i = 0; i < k; ++i)
    stats_of(m, (*in)[i].data<float>(), (*in)[i].size(), aux ? aux + i * row : nullptr, bins, o + i * len);
  return MX_SUCCESS;
}


}  // namespace

REGISTER_OP(dq_calib_stats)
    .setParseAttrs(parse)
    .setInferType(infer_type)
    .setInferShape(infer_shape)
    .setForward(forward, "cpu")
    .setBackward(deployq_ops::zero_backward, "cpu");  // statistics have no gradient
