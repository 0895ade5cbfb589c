// ATen calls for the speed settings that tch does not expose: bf16 autocast and channels_last.
// Built against the CPU headers of the pip torch (always compiled). Each function returns 0 on
// success, or 1 with the exception's message in `err` (NUL-terminated, at most err_len bytes).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <cstring>
#include <exception>

#include "error.h"

namespace {
using pipe_shim::set_error;
}  // namespace

extern "C" {

// Switches this thread's CUDA autocast on in bfloat16 (enable != 0) or off again. On: the
// nesting count goes up and the weight-cast cache is off (a CUDA graph replays the casts, so a
// cache kept across steps would go stale). Off: the nesting count goes down and, at the
// outermost level, the cache is cleared. Thread-local, like grad mode.
int pipe_autocast_bf16(int enable, char* err, size_t err_len) {
  try {
    if (enable) {
      at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
      at::autocast::set_autocast_cache_enabled(false);
      at::autocast::set_autocast_enabled(at::kCUDA, true);
      at::autocast::increment_nesting();
    } else {
      at::autocast::set_autocast_enabled(at::kCUDA, false);
      if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
      at::autocast::set_autocast_cache_enabled(true);
    }
    return 0;
  } catch (const std::exception& e) {
    set_error(e.what(), err, err_len);
    return 1;
  }
}

// Whether CUDA autocast is on for this thread (1) or not (0).
int pipe_autocast_enabled() { return at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0; }

// Gives a 4-D tensor the channels_last layout (NHWC strides) in place: its data is replaced by a
// channels_last copy, so every alias made afterwards (set_data views, optimiser moments built
// with zeros_like) shares that layout. Other ranks are left alone.
int pipe_to_channels_last(at::Tensor* t, char* err, size_t err_len) {
  try {
    if (t->dim() != 4) return 0;
    at::AutoGradMode no_grad(false);
    t->set_data(t->contiguous(at::MemoryFormat::ChannelsLast));
    return 0;
  } catch (const std::exception& e) {
    set_error(e.what(), err, err_len);
    return 1;
  }
}

// leaky_relu(x, slope) as one ATen kernel (tch has it only with slope 0.01): x where x > 0,
// slope·x elsewhere. Its backward (leaky_relu_backward) is differentiable again, as the
// gradient penalty's double backward needs. The result is a new tensor for tch to own.
int pipe_leaky_relu(at::Tensor* x, double slope, at::Tensor** out, char* err, size_t err_len) {
  try {
    *out = new at::Tensor(at::leaky_relu(*x, slope));
    return 0;
  } catch (const std::exception& e) {
    set_error(e.what(), err, err_len);
    return 1;
  }
}

// Drops the gradients of n tensors (PyTorch's zero_grad(set_to_none=True)): the next backward
// writes fresh gradients instead of adding to zeroed ones.
void pipe_grads_to_none(at::Tensor** ts, int64_t n) {
  for (int64_t i = 0; i < n; i++) ts[i]->mutable_grad().reset();
}

// 1 when a 4-D tensor is laid out channels_last, else 0.
int pipe_is_channels_last(at::Tensor* t) {
  return t->dim() == 4 && t->suggest_memory_format() == at::MemoryFormat::ChannelsLast ? 1 : 0;
}

}  // extern "C"
