// deployq's fused fake-quantization operators for MXNet 1.9 (loaded with mx.library.load).
//
// They compute exactly what deployq/fakequant.py and deployq/blocks.py compute with MXNet ops (same float32
// operations in the same order; compiled with -ffp-contract=off so no fused multiply-add changes a rounding),
// in one pass instead of ~30 small operators per layer:
//
//   dq_act_quant(x, state, is_train) -> (y, used)      range tracking + fake quantization of an activation;
//                                                       used = [lo, hi, quantized, gate, steps before, train];
//                                                       relu=1: of max(x, 0) (a ReLU fused into the quantizer)
//   dq_weight_quant(w, gate) -> wq                      per-layer / per-group / per-channel weight fake quant
//                                                       (gate[gate_index] == 0: w unchanged)
//   dq_bn_fold(w, gamma, beta, rm, rv[, b]) -> (w_f, b_f)  BN folding: k = gamma / sqrt(rv + eps),
//                                                       w_f = w * k, b_f = beta + (b - rm) * k (b = 0 if absent)
//   dq_bn_stats(y, mean, var, flags) -> (rm, rv, bm, bv) (see bn_forward for the flags)
//                                                       fake-BN running-statistics update; rm/rv: the running
//                                                       statistics after the update, bm/bv: the batch's (training)
//                                                       or again the running ones (inference)
//
// Conventions: a "multiplier" scale gives q = round(x * scale) (ncnn, scale = qmax / threshold); a "step"
// gives q = round(x / step) (MXNet, ONNX, Tengine, step = threshold / qmax). state = [lo, hi, initialised,
// steps] (float64), updated in the forward of a training step only. Gradients are straight-through: the
// incoming gradient where the rounded code lies inside [qmin, qmax] (or everywhere with mask_clipped=0).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "lib_api.h"
#include "opslib.h"

using namespace mxnet::ext;
using Attrs = std::unordered_map<std::string, std::string>;

namespace {

int attr_int(const Attrs& a, const char* k, int d) {
  auto it = a.find(k);
  return it == a.end() ? d : std::stoi(it->second);
}
double attr_double(const Attrs& a, const char* k, double d) {
  auto it = a.find(k);
  return it == a.end() ? d : std::stod(it->second);
}
std::string attr_str(const Attrs& a, const char* k, const char* d) {
  auto it = a.find(k);
  return it == a.end() ? std::string(d) : it->second;
}

// Round v to an integer: half away from zero (MXNet round, C roundf) or half to even
// (deployq.fakequant.round_half_even). v must lie within int range: callers clip it to [qmin - 1, qmax + 1]
// first, which leaves every clipped code and every in-range test unchanged. Truncation through int, the exact
// fractional part v - trunc(v) and selects instead of branches let the compiler vectorize the loops below
// (with -fno-trapping-math), unlike libm's roundf.
template <bool EVEN>
inline float round_code(float v) {
  const int i = static_cast<int>(v);
  const float t = static_cast<float>(i);
  const float f = v - t;  // exact: the fractional bits of v
  if (!EVEN) return t + (f >= 0.5f ? 1.0f : 0.0f) - (f <= -0.5f ? 1.0f : 0.0f);
  const float odd = static_cast<float>(i & 1);
  return t + (f > 0.5f ? 1.0f : 0.0f) + (f == 0.5f ? odd : 0.0f) - (f < -0.5f ? 1.0f : 0.0f) -
         (f == -0.5f ? odd : 0.0f);
}

struct Grid {
  bool multiplier;  // true: q = round(x * scale); false: q = round(x / scale)
  float scale;
  float zero_point;
  bool affine;
  float qmin, qmax;
  bool even;
};

// the rounded code of x with the zero point added, v clipped to [qmin - zp - 1, qmax - zp + 1] first
template <bool MULT, bool EVEN>
inline float code_of(float x, float scale, float zp, float lo, float hi) {
  float v = MULT ? x * scale : x / scale;
  v = v < lo ? lo : v;
  v = v > hi ? hi : v;
  return round_code<EVEN>(v) + zp;
}

// max(v, 0) as MXNet's relu computes it (-0 and NaN give +0)
inline float relu(float v) { return v > 0.0f ? v : 0.0f; }

template <bool MULT, bool EVEN, bool RELU>
void quant_loop(const float* x, float* y, int64_t n, const Grid& g) {
  const float zp = g.affine ? g.zero_point : 0.0f, lo = g.qmin - zp - 1.0f, hi = g.qmax - zp + 1.0f;
  const float scale = g.scale, qmin = g.qmin, qmax = g.qmax;
  for (int64_t i = 0; i < n; ++i) {
    float q = code_of<MULT, EVEN>(RELU ? relu(x[i]) : x[i], scale, zp, lo, hi);
    q = q < qmin ? qmin : q;
    q = q > qmax ? qmax : q;
    q = q - zp;
    y[i] = MULT ? q / scale : q * scale;
  }
}

template <bool MULT, bool EVEN, bool RELU>
void mask_loop(const float* x, const float* dy, float* dx, int64_t n, const Grid& g) {
  const float zp = g.affine ? g.zero_point : 0.0f, lo = g.qmin - zp - 1.0f, hi = g.qmax - zp + 1.0f;
  const float scale = g.scale, qmin = g.qmin, qmax = g.qmax;
  for (int64_t i = 0; i < n; ++i) {
    const float q = code_of<MULT, EVEN>(RELU ? relu(x[i]) : x[i], scale, zp, lo, hi);
    dx[i] = (q >= qmin && q <= qmax && (!RELU || x[i] > 0.0f)) ? dy[i] : 0.0f;
  }
}

template <bool RELU>
void fake_quant_t(const float* x, float* y, int64_t n, const Grid& g) {
  if (g.multiplier)
    g.even ? quant_loop<true, true, RELU>(x, y, n, g) : quant_loop<true, false, RELU>(x, y, n, g);
  else
    g.even ? quant_loop<false, true, RELU>(x, y, n, g) : quant_loop<false, false, RELU>(x, y, n, g);
}

// y = dequant(clip(code(x))): the fake-quantized tensor (of max(x, 0) with relu)
void fake_quant(const float* x, float* y, int64_t n, const Grid& g, bool relu_first = false) {
  relu_first ? fake_quant_t<true>(x, y, n, g) : fake_quant_t<false>(x, y, n, g);
}

template <bool RELU>
void clip_mask_t(const float* x, const float* dy, float* dx, int64_t n, const Grid& g) {
  if (g.multiplier)
    g.even ? mask_loop<true, true, RELU>(x, dy, dx, n, g) : mask_loop<true, false, RELU>(x, dy, dx, n, g);
  else
    g.even ? mask_loop<false, true, RELU>(x, dy, dx, n, g) : mask_loop<false, false, RELU>(x, dy, dx, n, g);
}

// dx = dy where the code lies in [qmin, qmax] (and x > 0 with relu), else 0: the straight-through gradient
// with clipping
void clip_mask(const float* x, const float* dy, float* dx, int64_t n, const Grid& g, bool relu_first = false) {
  relu_first ? clip_mask_t<true>(x, dy, dx, n, g) : clip_mask_t<false>(x, dy, dx, n, g);
}

// min and max of x (8 independent lanes, so the loop vectorizes; min/max are exact in any order)
void min_max(const float* x, int64_t n, float* lo_out, float* hi_out) {
  float lo[8], hi[8];
  for (int k = 0; k < 8; ++k) lo[k] = hi[k] = x[0];
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const float v = x[i + k];
      lo[k] = v < lo[k] ? v : lo[k];
      hi[k] = v > hi[k] ? v : hi[k];
    }
  for (; i < n; ++i) {
    lo[0] = x[i] < lo[0] ? x[i] : lo[0];
    hi[0] = x[i] > hi[0] ? x[i] : hi[0];
  }
  float l = lo[0], h = hi[0];
  for (int k = 1; k < 8; ++k) {
    l = lo[k] < l ? lo[k] : l;
    h = hi[k] > h ? hi[k] : h;
  }
  *lo_out = l;
  *hi_out = h;
}

// scale for a symmetric threshold T (deployq.fakequant.scale_from_threshold): 1 stands in for T == 0
inline float scale_from_threshold(float thr, float qmax, bool multiplier) {
  float safe = thr > 0 ? thr : 1.0f;
  return multiplier ? qmax / safe : safe / qmax;
}

struct ActAttrs {
  int quant;  // 0: track only, 1: symmetric, 2: affine
  bool is_signed, even, multiplier, observer, online, mask_clipped, relu;
  float qmin, qmax;
  double momentum;
  int start_step;
  explicit ActAttrs(const Attrs& a)
      : quant(attr_int(a, "quant", 0)),
        is_signed(attr_int(a, "signed", 1) != 0),
        even(attr_str(a, "rounding", "half_away_from_zero") == "half_to_even"),
        multiplier(attr_str(a, "convention", "step") == "multiplier"),
        observer(attr_int(a, "observer", 0) != 0),
        online(attr_int(a, "online", 0) != 0),
        mask_clipped(attr_int(a, "mask_clipped", 1) != 0),
        relu(attr_int(a, "relu", 0) != 0),
        qmin(static_cast<float>(attr_int(a, "qmin", -127))),
        qmax(static_cast<float>(attr_int(a, "qmax", 127))),
        momentum(attr_double(a, "momentum", 0.9)),
        start_step(attr_int(a, "start_step", 0)) {}

  Grid grid(float lo, float hi) const {
    Grid g{multiplier, 1.0f, 0.0f, quant == 2, qmin, qmax, even};
    if (quant == 1) {
      float thr = is_signed ? std::max(std::fabs(lo), std::fabs(hi)) : std::max(hi, 0.0f);
      g.scale = scale_from_threshold(thr, qmax, multiplier);
    } else if (quant == 2) {  // uint8 with a zero point (ONNX); always the step convention
      float lo0 = std::min(lo, 0.0f), hi0 = std::max(hi, 0.0f);
      float span = hi0 - lo0;
      float step = (span > 0 ? span : 1.0f) / (qmax - qmin);
      g.multiplier = false;
      g.scale = step;
      g.zero_point = std::min(std::max(std::round(qmin - lo0 / step), qmin), qmax);
    }
    return g;
  }
};

// ------------------------------------------------------------------ dq_act_quant
MXReturnValue act_parse(const Attrs&, int* n_in, int* n_out) {
  *n_in = 3;
  *n_out = 2;
  return MX_SUCCESS;
}
MXReturnValue act_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  if ((*in)[0] != kFloat32 || (*in)[1] != kFloat64) {
    MX_ERROR_MSG << "dq_act_quant: needs float32 data and a float64 state";
    return MX_FAIL;
  }
  (*out)[0] = kFloat32;
  (*out)[1] = kFloat32;
  return MX_SUCCESS;
}
MXReturnValue act_shape(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                        std::vector<std::vector<unsigned int>>* out) {
  (*out)[0] = (*in)[0];
  (*out)[1] = {6};
  return MX_SUCCESS;
}
MXReturnValue act_mutate(const Attrs&, std::vector<int>* idx) {
  idx->push_back(1);
  return MX_SUCCESS;
}

MXReturnValue act_forward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                          const OpResource&) {
  const ActAttrs a(attrs);
  const float* x = (*in)[0].data<float>();
  double* st = (*in)[1].data<double>();
  const bool train = (*in)[2].data<float>()[0] != 0.0f;
  float* y = (*out)[0].data<float>();
  float* used = (*out)[1].data<float>();
  const int64_t n = (*in)[0].size();

  float bl, bh;
  min_max(x, n, &bl, &bh);
  if (a.relu) {  // the range of max(x, 0): exact, max is monotone
    bl = relu(bl);
    bh = relu(bh);
  }
  const double old_lo = st[0], old_hi = st[1], steps = st[3];
  const bool init = st[2] > 0.5;
  double new_lo, new_hi;
  if (a.observer) {
    new_lo = std::min(old_lo, static_cast<double>(bl));
    new_hi = std::max(old_hi, static_cast<double>(bh));
  } else {
    new_lo = old_lo * a.momentum + static_cast<double>(bl) * (1.0 - a.momentum);
    new_hi = old_hi * a.momentum + static_cast<double>(bh) * (1.0 - a.momentum);
  }
  if (!init) {
    new_lo = bl;
    new_hi = bh;
  }
  float lo, hi;
  if (train) {
    st[0] = new_lo;
    st[1] = new_hi;
    st[2] = 1.0;
    st[3] = steps + 1.0;
    lo = static_cast<float>(new_lo);
    hi = static_cast<float>(new_hi);
  } else {
    lo = init ? static_cast<float>(old_lo) : bl;
    hi = init ? static_cast<float>(old_hi) : bh;
  }
  if (a.online) {
    lo = bl;
    hi = bh;
  }
  const bool active = a.start_step <= 0 || static_cast<float>(steps) >= static_cast<float>(a.start_step);
  const bool gate = active && !(a.observer && train);  // quantize weights too
  const bool quantize = a.quant != 0 && gate;
  used[0] = lo;
  used[1] = hi;
  used[2] = quantize ? 1.0f : 0.0f;
  used[3] = gate ? 1.0f : 0.0f;
  used[4] = static_cast<float>(steps);
  used[5] = train ? 1.0f : 0.0f;
  if (!quantize) {
    if (a.relu) {
      for (int64_t i = 0; i < n; ++i) y[i] = relu(x[i]);
    } else if (y != x) {
      std::memcpy(y, x, sizeof(float) * n);
    }
    return MX_SUCCESS;
  }
  fake_quant(x, y, n, a.grid(lo, hi), a.relu);
  return MX_SUCCESS;
}

// inputs: dy, dused, x, state, is_train, y, used; outputs: dx, dstate, dis_train
MXReturnValue act_backward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                           const OpResource&) {
  const ActAttrs a(attrs);
  const float* dy = (*in)[0].data<float>();
  const float* x = (*in)[2].data<float>();
  const float* used = (*in)[6].data<float>();
  float* dx = (*out)[0].data<float>();
  const int64_t n = (*in)[0].size();
  if (used[2] == 0.0f || !a.mask_clipped) {
    if (a.relu) {
      for (int64_t i = 0; i < n; ++i) dx[i] = x[i] > 0.0f ? dy[i] : 0.0f;
    } else if (dx != dy) {
      std::memcpy(dx, dy, sizeof(float) * n);
    }
  } else {
    clip_mask(x, dy, dx, n, a.grid(used[0], used[1]), a.relu);
  }
  std::memset((*out)[1].data_ptr, 0, sizeof(double) * (*out)[1].size());
  std::memset((*out)[2].data_ptr, 0, sizeof(float) * (*out)[2].size());
  return MX_SUCCESS;
}

// ------------------------------------------------------------------ dq_weight_quant
// attrs: units (1: per layer, k: k consecutive blocks of output channels), qmax, qmin, rounding, convention
MXReturnValue w_parse(const Attrs&, int* n_in, int* n_out) {
  *n_in = 2;
  *n_out = 1;
  return MX_SUCCESS;
}
MXReturnValue w_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  if ((*in)[0] != kFloat32) {
    MX_ERROR_MSG << "dq_weight_quant: needs float32 weights";
    return MX_FAIL;
  }
  (*out)[0] = kFloat32;
  return MX_SUCCESS;
}
MXReturnValue w_shape(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                      std::vector<std::vector<unsigned int>>* out) {
  (*out)[0] = (*in)[0];
  return MX_SUCCESS;
}
MXReturnValue w_forward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                        const OpResource&) {
  const float* w = (*in)[0].data<float>();
  // gate: element gate_index of input 1 (dq_act_quant's used vector: no slice operator per layer)
  const bool gate = (*in)[1].data<float>()[attr_int(attrs, "gate_index", 0)] != 0.0f;
  float* wq = (*out)[0].data<float>();
  const int64_t n = (*in)[0].size();
  if (!gate) {
    if (wq != w) std::memcpy(wq, w, sizeof(float) * n);
    return MX_SUCCESS;
  }
  const int64_t units = attr_int(attrs, "units", 1);
  const float qmin = static_cast<float>(attr_int(attrs, "qmin", -127));
  const float qmax = static_cast<float>(attr_int(attrs, "qmax", 127));
  const bool even = attr_str(attrs, "rounding", "half_away_from_zero") == "half_to_even";
  const bool multiplier = attr_str(attrs, "convention", "step") == "multiplier";
  const int64_t per = n / units;
  for (int64_t u = 0; u < units; ++u) {
    const float* src = w + u * per;
    float amax = 0.0f;
    for (int64_t i = 0; i < per; ++i) amax = std::max(amax, std::fabs(src[i]));
    const Grid g{multiplier, scale_from_threshold(amax, qmax, multiplier), 0.0f, false, qmin, qmax, even};
    fake_quant(src, wq + u * per, per, g);
  }
  return MX_SUCCESS;
}
// inputs: dwq, w, gate, wq; outputs: dw, dgate (straight through: the weight grid never clips max|w|)
MXReturnValue w_backward(const Attrs&, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                         const OpResource&) {
  const int64_t n = (*in)[0].size();
  if ((*out)[0].data_ptr != (*in)[0].data_ptr) std::memcpy((*out)[0].data_ptr, (*in)[0].data_ptr, sizeof(float) * n);
  std::memset((*out)[1].data_ptr, 0, sizeof(float) * (*out)[1].size());
  return MX_SUCCESS;
}

// ------------------------------------------------------------------ dq_bn_stats
MXReturnValue bn_parse(const Attrs&, int* n_in, int* n_out) {
  *n_in = 4;
  *n_out = 4;
  return MX_SUCCESS;
}
MXReturnValue bn_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  if ((*in)[0] != kFloat32 || (*in)[1] != kFloat64 || (*in)[2] != kFloat64) {
    MX_ERROR_MSG << "dq_bn_stats: needs float32 data and float64 statistics";
    return MX_FAIL;
  }
  for (auto& t : *out) t = kFloat32;
  return MX_SUCCESS;
}
MXReturnValue bn_shape(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                       std::vector<std::vector<unsigned int>>* out) {
  if ((*in)[0].size() < 2) {
    MX_ERROR_MSG << "dq_bn_stats: needs (N, C, ...) data";
    return MX_FAIL;
  }
  for (auto& s : *out) s = {(*in)[0][1]};
  return MX_SUCCESS;
}
MXReturnValue bn_mutate(const Attrs&, std::vector<int>* idx) {
  idx->push_back(1);
  idx->push_back(2);
  return MX_SUCCESS;
}
MXReturnValue bn_forward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                         const OpResource&) {
  MXTensor& yt = (*in)[0];
  const float* y = yt.data<float>();
  double* mean = (*in)[1].data<double>();
  double* var = (*in)[2].data<double>();
  // input 3: a flag vector (dq_act_quant's used vector) read at train_index; with freeze_step >= 0 the
  // statistics are updated only while flags[steps_index] (training steps seen) < freeze_step
  const float* flags = (*in)[3].data<float>();
  const int freeze_step = attr_int(attrs, "freeze_step", -1);
  const bool train = flags[attr_int(attrs, "train_index", 0)] != 0.0f &&
                     (freeze_step < 0 || flags[attr_int(attrs, "steps_index", 0)] < static_cast<float>(freeze_step));
  float* rm = (*out)[0].data<float>();
  float* rv = (*out)[1].data<float>();
  float* bm = (*out)[2].data<float>();
  float* bv = (*out)[3].data<float>();
  const int64_t batch = yt.shape[0], c = yt.shape[1];
  int64_t inner = 1;
  for (size_t d = 2; d < yt.shape.size(); ++d) inner *= yt.shape[d];
  if (train) {
    const double m = attr_double(attrs, "momentum", 0.9);
    const double count = static_cast<double>(batch * inner);
    for (int64_t k = 0; k < c; ++k) {
      // one pass: sum and sum of squares in float64 (8 lanes each, so that the loop vectorizes);
      // var = E[y^2] - mean^2 loses nothing a float32 result could show for activations whose mean is within
      // ~1e4 standard deviations
      double s8[8] = {0}, ss8[8] = {0};
      for (int64_t b = 0; b < batch; ++b) {
        const float* p = y + (b * c + k) * inner;
        int64_t i = 0;
        for (; i + 8 <= inner; i += 8)
          for (int l = 0; l < 8; ++l) {
            const double v = p[i + l];
            s8[l] += v;
            ss8[l] += v * v;
          }
        for (; i < inner; ++i) {
          const double v = p[i];
          s8[0] += v;
          ss8[0] += v * v;
        }
      }
      double s = 0.0, ss = 0.0;
      for (int l = 0; l < 8; ++l) {
        s += s8[l];
        ss += ss8[l];
      }
      const double mu = s / count;
      const double var_b = std::max(ss / count - mu * mu, 0.0);
      mean[k] = mean[k] * m + mu * (1.0 - m);
      var[k] = var[k] * m + var_b * (1.0 - m);
      bm[k] = static_cast<float>(mu);
      bv[k] = static_cast<float>(var_b);
    }
  }
  for (int64_t k = 0; k < c; ++k) {
    rm[k] = static_cast<float>(mean[k]);
    rv[k] = static_cast<float>(var[k]);
    if (!train) {
      bm[k] = rm[k];
      bv[k] = rv[k];
    }
  }
  return MX_SUCCESS;
}

// ------------------------------------------------------------------ dq_bn_fold
// attrs: eps, fix_gamma (gamma read as 1), has_bias (a 6th input b)
MXReturnValue fold_parse(const Attrs& attrs, int* n_in, int* n_out) {
  *n_in = attr_int(attrs, "has_bias", 0) ? 6 : 5;
  *n_out = 2;
  return MX_SUCCESS;
}
MXReturnValue fold_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  for (int t : *in)
    if (t != kFloat32) {
      MX_ERROR_MSG << "dq_bn_fold: needs float32 inputs";
      return MX_FAIL;
    }
  (*out)[0] = kFloat32;
  (*out)[1] = kFloat32;
  return MX_SUCCESS;
}
MXReturnValue fold_shape(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                         std::vector<std::vector<unsigned int>>* out) {
  (*out)[0] = (*in)[0];
  (*out)[1] = {(*in)[0][0]};
  return MX_SUCCESS;
}
struct FoldArgs {
  float eps;
  bool fix_gamma, has_bias;
  explicit FoldArgs(const Attrs& a)
      : eps(static_cast<float>(attr_double(a, "eps", 1e-5))),
        fix_gamma(attr_int(a, "fix_gamma", 0) != 0),
        has_bias(attr_int(a, "has_bias", 0) != 0) {}
};
// the same float32 operations, in the same order, as _QuantMixin._fold_with
MXReturnValue fold_forward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                           const OpResource&) {
  const FoldArgs a(attrs);
  const float* w = (*in)[0].data<float>();
  const float *gamma = (*in)[1].data<float>(), *beta = (*in)[2].data<float>();
  const float *rm = (*in)[3].data<float>(), *rv = (*in)[4].data<float>();
  const float* b = a.has_bias ? (*in)[5].data<float>() : nullptr;
  float* wf = (*out)[0].data<float>();
  float* bf = (*out)[1].data<float>();
  const int64_t c = (*in)[0].shape[0], per = (*in)[0].size() / c;
  for (int64_t o = 0; o < c; ++o) {
    const float k = (a.fix_gamma ? 1.0f : gamma[o]) / std::sqrt(rv[o] + a.eps);
    for (int64_t i = 0; i < per; ++i) wf[o * per + i] = w[o * per + i] * k;
    bf[o] = beta[o] + ((b ? b[o] : 0.0f) - rm[o]) * k;
  }
  return MX_SUCCESS;
}
// inputs: dwf, dbf, w, gamma, beta, rm, rv[, b], wf, bf; outputs: dw, dgamma, dbeta, drm, drv[, db]
MXReturnValue fold_backward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                            const OpResource&) {
  const FoldArgs a(attrs);
  const float* dwf = (*in)[0].data<float>();
  const float* dbf = (*in)[1].data<float>();
  const float* w = (*in)[2].data<float>();
  const float* gamma = (*in)[3].data<float>();
  const float *rm = (*in)[5].data<float>(), *rv = (*in)[6].data<float>();
  const float* b = a.has_bias ? (*in)[7].data<float>() : nullptr;
  float *dw = (*out)[0].data<float>(), *dgamma = (*out)[1].data<float>(), *dbeta = (*out)[2].data<float>();
  const int64_t c = (*in)[2].shape[0], per = (*in)[2].size() / c;
  for (int64_t o = 0; o < c; ++o) {
    const float inv = 1.0f / std::sqrt(rv[o] + a.eps);
    const float k = (a.fix_gamma ? 1.0f : gamma[o]) * inv;
    double dk = 0.0;
    for (int64_t i = 0; i < per; ++i) {
      dw[o * per + i] = dwf[o * per + i] * k;
      dk += static_cast<double>(dwf[o * per + i]) * w[o * per + i];
    }
    dk += static_cast<double>(dbf[o]) * ((b ? b[o] : 0.0f) - rm[o]);
    dgamma[o] = a.fix_gamma ? 0.0f : static_cast<float>(dk * inv);
    dbeta[o] = dbf[o];
    if (b) (*out)[5].data<float>()[o] = dbf[o] * k;
  }
  std::memset((*out)[3].data_ptr, 0, sizeof(float) * c);
  std::memset((*out)[4].data_ptr, 0, sizeof(float) * c);
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(dq_bn_fold)
    .setParseAttrs(fold_parse)
    .setInferType(fold_type)
    .setInferShape(fold_shape)
    .setForward(fold_forward, "cpu")
    .setBackward(fold_backward, "cpu");

REGISTER_OP(dq_act_quant)
    .setParseAttrs(act_parse)
    .setInferType(act_type)
    .setInferShape(act_shape)
    .setMutateInputs(act_mutate)
    .setForward(act_forward, "cpu")
    .setBackward(act_backward, "cpu");

REGISTER_OP(dq_weight_quant)
    .setParseAttrs(w_parse)
    .setInferType(w_type)
    .setInferShape(w_shape)
    .setForward(w_forward, "cpu")
    .setBackward(w_backward, "cpu");

REGISTER_OP(dq_bn_stats)
    .setParseAttrs(bn_parse)
    .setInferType(bn_type)
    .setInferShape(bn_shape)
    .setMutateInputs(bn_mutate)
    .setForward(bn_forward, "cpu")
    .setBackward(deployq_ops::zero_backward, "cpu");
