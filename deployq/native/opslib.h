// What deployq's two MXNet operator libraries (fakequant.cc, calibops.cc) share: the zero gradient of operators
// without one (registered only because a CachedOp builds the backward graph) and lib_api's initialize(). Each
// library includes this header once, after lib_api.h.
#pragma once
#include <cstring>
#include <vector>

#include "lib_api.h"

namespace deployq_ops {

inline mxnet::ext::MXReturnValue zero_backward(const std::unordered_map<std::string, std::string>&,
                                               std::vector<mxnet::ext::MXTensor>*,
                                               std::vector<mxnet::ext::MXTensor>* out,
                                               const mxnet::ext::OpResource&) {
  for (auto& t : *out) {
    const size_t bytes = t.dtype == mxnet::ext::kFloat64 ? sizeof(double) : sizeof(float);
    std::memset(t.data_ptr, 0, bytes * t.size());
  }
  return mxnet::ext::MX_SUCCESS;
}

}  // namespace deployq_ops

// lib_api's entry point: the operators use MXNet 1.9's extension interface
mxnet::ext::MXReturnValue initialize(int version) {
  if (version < 10900) {
    MX_ERROR_MSG << "deployq's operators need MXNet >= 1.9 (found " << version << ")";
    return mxnet::ext::MX_FAIL;
  }
  return mxnet::ext::MX_SUCCESS;
}
