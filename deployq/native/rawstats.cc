// dq_raw_stats: calibration statistics read straight from the memory of MXNet 1.9 NDArrays, oneDNN layouts
// included, with no reorder to the default layout (deployq/native/rawstats.py, used by deployq.calib).
//
// Why: the tapped activations of a calibration graph live in oneDNN's blocked/channels-last layouts; every route
// that hands them to an operator or to the host first reorders them into plain NCHW memory (one read + one write
// of every tensor per batch, more than the statistics themselves cost). The statistics (min/max, counts beyond a
// threshold, histograms of |x|: calibstats.h) do not depend on the order of the elements, so any layout that
// stores each element exactly once -- no padding, no gaps -- can be read as one flat float32 buffer.
//
// How: the NDArray handle is MXNet's `mxnet::NDArray*` (include/mxnet/ndarray.h, shipped with the wheel). Its chunk
// holds the storage (shandle.dptr, shandle.size) and, for oneDNN data, an `mxnet::MKLDNNMemory` whose memory
// descriptor gives dims, padded dims, offset and byte size. MKLDNNMemory is not in the shipped headers; its layout
// (shared_ptr<dnnl::memory>, dnnl::memory::desc, size_t) is mirrored below and cross-checked on every call
// (ndims, dims == the NDArray's shape, f32, blocked, no padding, offset 0, size == elements * 4 <= storage size).
// Anything else (views of oneDNN data, padded blocks, other dtypes or devices) is refused, and deployq.calib
// verifies the first batch of every graph against the in-graph operator before trusting this reader.
//
// Entry point (C ABI, called through ctypes with the GIL released):
//   int dq_raw_stats(void** handles, int k, int mode, int64_t num_bins, const double* aux, double* out)
// mode 0/1/2/3 = range/clip/hist/pow2 as dq_calib_stats, aux/out laid out as there. Returns 0, or 1 + i when tensor i
// cannot be read in place (nothing is meaningful in `out` then). The caller has waited for the arrays. One thread:
// right after a forward the engine's OpenMP threads still spin, and a second thread here measured slower; the
// totals of later batches (dq_push_totals) run as an engine operation instead, on the engine's OpenMP team.
#include <dmlc/base.h>
#include <dmlc/logging.h>
#include <dmlc/io.h>
#include <dmlc/registry.h>
#include <dmlc/type_traits.h>
#include <nnvm/node.h>

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <mkldnn.hpp>
#include <mxnet/base.h>
#include <mxnet/engine.h>
#include <mxnet/storage.h>

// NDArray keeps its chunk private; every header ndarray.h includes is included above (std ones too), so only
// ndarray.h itself sees the define
#define private public
#define protected public
#include <mxnet/ndarray.h>
#undef private
#undef protected

#include "calibstats.h"

using namespace deployq_calib;

namespace {

// mxnet::MKLDNNMemory (src/operator/nn/mkldnn/mkldnn_base-inl.h, MXNet 1.9): its data members in order
struct MKLDNNMemoryMirror {
  std::shared_ptr<dnnl::memory> mem;
  dnnl::memory::desc desc;
  size_t size;  // bytes
};

// the elements of a float32 CPU NDArray as one dense buffer (in its own layout), or nullptr
const float* dense_elements(const mxnet::NDArray* a, int64_t* n) {
  const auto* c = a->ptr_.get();
  if (c == nullptr || c->storage_type != mxnet::kDefaultStorage || a->dtype_ != mshadow::kFloat32 ||
      c->ctx.dev_mask() != mxnet::Context::kCPU || c->shandle.dptr == nullptr)
    return nullptr;
  const int64_t count = static_cast<int64_t>(a->shape_.Size());
  const size_t bytes = static_cast<size_t>(count) * sizeof(float);
  const auto* m = reinterpret_cast<const MKLDNNMemoryMirror*>(c->mkl_mem_.get());
  if (m == nullptr) {  // default layout: a contiguous range of the storage (views included)
    if (a->byte_offset_ + bytes > c->shandle.size) return nullptr;
    *n = count;
    return reinterpret_cast<const float*>(static_cast<const char*>(c->shandle.dptr) + a->byte_offset_);
  }
  if (a->byte_offset_ != 0) return nullptr;
  const dnnl_memory_desc_t& d = m->desc.data;
  if (d.ndims != a->shape_.ndim() || d.data_type != dnnl_f32 || d.format_kind != dnnl_blocked || d.offset0 != 0)
    return nullptr;
  for (int i = 0; i < d.ndims; ++i)
    if (d.dims[i] != a->shape_[i] || d.padded_dims[i] != d.dims[i] || d.padded_offsets[i] != 0) return nullptr;
  if (m->size != bytes || m->size > c->shandle.size) return nullptr;  // no gaps: each element stored once
  *n = count;
  return static_cast<const float*>(c->shandle.dptr);
}

}  // namespace

// dq_raw_stats's checks of the arguments and of every array (nothing is computed unless all can be read)
static int dense_all(void** handles, int k, Mode m, int64_t num_bins, std::vector<const float*>* x,
                     std::vector<int64_t>* n) {
  if (k < 1 || (m != kRange && m != kClip && m != kHist && m != kPow2) ||
      ((m == kHist || m == kPow2) && (num_bins < 2 || num_bins > (1 << 24))))
    return -1;
  x->resize(k);
  n->resize(k);
  for (int i = 0; i < k; ++i) {
    (*x)[i] = dense_elements(static_cast<const mxnet::NDArray*>(handles[i]), &(*n)[i]);
    if ((*x)[i] == nullptr) return 1 + i;
  }
  return 0;
}

extern "C" int dq_raw_stats(void** handles, int k, int mode, int64_t num_bins, const double* aux, double* out) {
  const Mode m = static_cast<Mode>(mode);
  std::vector<const float*> x;
  std::vector<int64_t> n;
  if (const int rc = dense_all(handles, k, m, num_bins, &x, &n)) return rc;
  const int64_t len = out_len(m, num_bins), row = aux_row(m);
  for (int i = 0; i < k; ++i) stats_of(m, x[i], n[i], has_aux(m) ? aux + i * row : nullptr, num_bins, out + i * len);
  return 0;
}

// dq_raw_stats of one batch added to running totals (add_stats), tensor by tensor on `threads` OpenMP threads
// (each tensor's row is written by one thread: the same totals whatever the count).
static int raw_totals(void** handles, int k, int mode, int64_t num_bins, const double* aux, double* totals,
                      int threads) {
  const Mode m = static_cast<Mode>(mode);
  if (m == kClip) return -1;
  std::vector<const float*> x;
  std::vector<int64_t> n;
  if (const int rc = dense_all(handles, k, m, num_bins, &x, &n)) return rc;
  const int64_t len = out_len(m, num_bins);
  std::vector<int> order(k);  // largest tensors first: the dynamic schedule balances the rest
  for (int i = 0; i < k; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return n[a] > n[b]; });
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int j = 0; j < k; ++j) {
    const int i = order[j];
    thread_local std::vector<double> batch;
    batch.resize(static_cast<size_t>(len));
    double* t = totals + i * len;
    const double* a = m == kHist ? aux + i : (m == kPow2 ? t + 2 : nullptr);
    stats_of(m, x[i], n[i], a, num_bins, batch.data());
    add_stats(m, batch.data(), num_bins, t);
  }
  return 0;
}

// dq_raw_stats of one batch added to running totals in place, modes range, hist, pow2, in the calling thread:
// `totals` has dq_raw_stats's layout; `aux`: hist's absmax per tensor (range, pow2: unused; pow2's R is read from
// the totals). Returns dq_raw_stats's codes; on a non-zero code the totals are unchanged.
extern "C" int dq_raw_totals(void** handles, int k, int mode, int64_t num_bins, const double* aux, double* totals) {
  return raw_totals(handles, k, mode, num_bins, aux, totals, 1);
}

namespace {

// MXEnginePushSyncND's signature (include/mxnet/c_api.h); the pointer comes from the loaded libmxnet via ctypes
using PushSyncND = int (*)(void (*)(void*, void*), void*, void (*)(void*), const void*, void**, int, void**, int,
                           const void*, int, const char*);

struct PushedTotals {
  std::vector<mxnet::NDArray> arrays;  // copies (shared chunks): valid even if the caller frees its handles
  std::vector<void*> handles;          // their addresses
  int mode;
  int64_t num_bins;
  const double* aux;
  double* totals;
  int threads;
  int* rc;
};

void run_pushed(void* /*run_context*/, void* param) {
  auto* p = static_cast<PushedTotals*>(param);
  *p->rc = raw_totals(p->handles.data(), static_cast<int>(p->handles.size()), p->mode, p->num_bins, p->aux,
                      p->totals, p->threads);
}

void delete_pushed(void* param) { delete static_cast<PushedTotals*>(param); }

}  // namespace

// dq_raw_totals as an operation of MXNet's engine (MXEnginePushSyncND, `push` = its address): it runs on the
// engine's CPU worker once every array is computed, on `threads` OpenMP threads of that worker's team (the
// engine's own OpenMP threads, which would otherwise spin beside a thread of the caller's). `aux`, `totals` and
// `rc` must live until the caller has waited (mx.nd.waitall); *rc receives dq_raw_totals's code. Returns the
// push's code (0: pushed).
extern "C" int dq_push_totals(void* push, void** handles, int k, int mode, int64_t num_bins, const double* aux,
                              double* totals, int threads, int* rc) {
  if (push == nullptr || k < 1) return -1;
  auto* p = new PushedTotals{{}, {}, mode, num_bins, aux, totals, threads, rc};
  p->arrays.reserve(k);
  for (int i = 0; i < k; ++i) p->arrays.push_back(*static_cast<const mxnet::NDArray*>(handles[i]));
  for (auto& a : p->arrays) p->handles.push_back(&a);
  static const mxnet::Context cpu = mxnet::Context::CPU();
  return reinterpret_cast<PushSyncND>(push)(run_pushed, p, delete_pushed, &cpu, p->handles.data(), k, nullptr, 0,
                                            nullptr, 0, "dq_raw_totals");
}
