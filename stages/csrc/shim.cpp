// What tch does not expose, called from Rust (stages/src/shim.rs). Each function returns 0 on
// success, or 1 with the exception's message in `err` (NUL-terminated, at most err_len bytes).
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstring>
#include <exception>
#include <vector>

#include "error.h"

namespace {
using pipe_shim::set_error;

std::vector<at::Tensor> list(at::Tensor** ts, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; i++) out.push_back(*ts[i]);
  return out;
}
}  // namespace

extern "C" {

// One Adam update of n parameters at once with ATen's fused multi-tensor kernel
// (aten::_fused_adam_, the kernel behind torch.optim.Adam(fused=True); L2 weight decay added
// to the gradient, no AMSGrad). `steps[i]` holds the step number t (from 1) of parameter i,
// already incremented by the caller; params, grads, exp_avgs, exp_avg_sqs are updated in place.
int pipe_fused_adam(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                    at::Tensor** steps, int64_t n, double lr, double beta1, double beta2, double weight_decay,
                    double eps, char* err, size_t err_len) {
  try {
    at::AutoGradMode no_grad(false);
    at::_fused_adam_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), {}, list(steps, n), lr,
                     beta1, beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception& e) {
    set_error(e.what(), err, err_len);
    return 1;
  }
}

}  // extern "C"
