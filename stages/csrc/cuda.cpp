// CUDA streams, events and graphs for the step stages (stages/src/train/cuda.rs).
//
// Built with PIPE_CUDA defined when build.rs finds CUDA's headers (the venv's nvidia/cu13/include,
// with nv/target and crt/host_config.h from the PyPI packages nvidia-cuda-cccl and
// nvidia-cuda-crt); without them every function fails with a message saying so, and pipe still
// builds and runs on the CPU. Each function returns 0 on success, or 1 with the exception's message
// in `err` (NUL-terminated, at most err_len bytes).
#include <cstdint>
#include <cstring>
#include <exception>

#ifdef PIPE_CUDA
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <optional>
#endif

#include "error.h"

namespace {
using pipe_shim::set_error;
}  // namespace

#ifdef PIPE_CUDA

namespace {
// A stream from the pool of a device.
struct Stream {
  c10::cuda::CUDAStream stream;
};

// One captured step. `prev`: the stream that was current before capture (restored after).
struct Graph {
  at::cuda::CUDAGraph graph;
  bool captured = false;
};

// Uploads on their own stream, double-buffered: per slot, `done` marks the end of its copy and
// `consumed` the training stream's read of it.
struct Uploader {
  c10::cuda::CUDAStream copy;
  c10::cuda::CUDAEvent done[2];
  c10::cuda::CUDAEvent consumed[2];
  bool consumed_recorded[2] = {false, false};
  explicit Uploader(c10::cuda::CUDAStream s) : copy(s) {}
};

template <class F>
int guarded(char* err, size_t err_len, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    set_error(e.what(), err, err_len);
    return 1;
  }
}
}  // namespace

extern "C" {

int pipe_cuda_built() { return 1; }

// Name (NUL-terminated, at most name_len bytes), compute capability and memory of CUDA device
// `device`.
int pipe_cuda_device(int64_t device, char* name, size_t name_len, int* major, int* minor, uint64_t* bytes, char* err,
                     size_t err_len) {
  return guarded(err, err_len, [&] {
    cudaDeviceProp prop;
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, static_cast<int>(device)));
    set_error(prop.name, name, name_len);
    *major = prop.major;
    *minor = prop.minor;
    *bytes = prop.totalGlobalMem;
  });
}

// A new stream from the pool of CUDA device `device`.
int pipe_stream_new(int64_t device, void** out, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto s = c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device));
    *out = new Stream{s};
  });
}

void pipe_stream_free(void* s) { delete static_cast<Stream*>(s); }

// Makes `s` the current stream of this thread (on its device), after it waits for whatever the
// thread's previous current stream had queued.
int pipe_stream_use(void* s, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* st = static_cast<Stream*>(s);
    auto prev = c10::cuda::getCurrentCUDAStream(st->stream.device_index());
    if (prev != st->stream) {
      c10::cuda::CUDAEvent ev;
      ev.record(prev);
      ev.block(st->stream);
    }
    c10::cuda::setCurrentCUDAStream(st->stream);
  });
}

int pipe_graph_new(void** out, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { *out = new Graph(); });
}

void pipe_graph_free(void* g) { delete static_cast<Graph*>(g); }

// Starts capturing the work this thread queues on its current stream (which must not be the
// legacy default stream: see pipe_stream_use). Thread-local capture mode, so the other threads
// of the pipeline may call CUDA meanwhile.
int pipe_graph_begin(void* g, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    static_cast<Graph*>(g)->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
  });
}

int pipe_graph_end(void* g, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* gr = static_cast<Graph*>(g);
    gr->graph.capture_end();
    gr->captured = true;
  });
}

// Queues the captured work again on the current stream.
int pipe_graph_replay(void* g, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { static_cast<Graph*>(g)->graph.replay(); });
}

int pipe_uploader_new(int64_t device, void** out, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    *out = new Uploader(c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device)));
  });
}

void pipe_uploader_free(void* u) { delete static_cast<Uploader*>(u); }

// Copies host tensor `src` (pinned, so the copy is asynchronous) into device tensor `dst` (a
// staging buffer of slot `slot`, 0 or 1) on the uploader's stream, once the training stream has
// consumed that slot's previous upload (see pipe_upload_consumed), and marks the slot done when
// the copy is. The copy overlaps whatever the training stream runs meanwhile.
int pipe_upload_start(void* u, int64_t slot, at::Tensor* dst, at::Tensor* src, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* up = static_cast<Uploader*>(u);
    auto k = slot & 1;
    if (up->consumed_recorded[k]) up->consumed[k].block(up->copy);
    {
      c10::cuda::CUDAStreamGuard on_copy(up->copy);
      at::AutoGradMode no_grad(false);
      dst->copy_(*src, /*non_blocking=*/true);
    }
    up->done[k].record(up->copy);
  });
}

// Records on the current stream that slot `slot`'s staging buffer has been read (after the
// copy out of it is queued), so its next upload may overwrite it.
int pipe_upload_consumed(void* u, int64_t slot, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* up = static_cast<Uploader*>(u);
    auto k = slot & 1;
    up->consumed[k].record(c10::cuda::getCurrentCUDAStream(up->copy.device_index()));
    up->consumed_recorded[k] = true;
  });
}

// Makes the current stream wait (on the device, the host goes on) for slot `slot`'s copy.
int pipe_upload_wait(void* u, int64_t slot, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* up = static_cast<Uploader*>(u);
    up->done[slot & 1].block(c10::cuda::getCurrentCUDAStream(up->copy.device_index()));
  });
}

// Blocks the host until slot `slot`'s copy is done (before its pinned source is overwritten).
int pipe_upload_host_wait(void* u, int64_t slot, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { static_cast<Uploader*>(u)->done[slot & 1].synchronize(); });
}

}  // extern "C"

#else  // no CUDA headers: every call fails, saying why.

namespace {
const char* kNoCuda =
    "this pipe was built without CUDA's headers, so it has no CUDA graphs or copy streams (run scripts/setup.sh, "
    "which installs nvidia-cuda-cccl and nvidia-cuda-crt into the venv, then rebuild)";
int no_cuda(char* err, size_t err_len) {
  set_error(kNoCuda, err, err_len);
  return 1;
}
}  // namespace

extern "C" {
int pipe_cuda_built() { return 0; }
int pipe_cuda_device(int64_t, char*, size_t, int*, int*, uint64_t*, char* err, size_t n) { return no_cuda(err, n); }
int pipe_stream_new(int64_t, void**, char* err, size_t n) { return no_cuda(err, n); }
void pipe_stream_free(void*) {}
int pipe_stream_use(void*, char* err, size_t n) { return no_cuda(err, n); }
int pipe_graph_new(void**, char* err, size_t n) { return no_cuda(err, n); }
void pipe_graph_free(void*) {}
int pipe_graph_begin(void*, char* err, size_t n) { return no_cuda(err, n); }
int pipe_graph_end(void*, char* err, size_t n) { return no_cuda(err, n); }
int pipe_graph_replay(void*, char* err, size_t n) { return no_cuda(err, n); }
int pipe_uploader_new(int64_t, void**, char* err, size_t n) { return no_cuda(err, n); }
void pipe_uploader_free(void*) {}
int pipe_upload_start(void*, int64_t, void*, void*, char* err, size_t n) { return no_cuda(err, n); }
int pipe_upload_wait(void*, int64_t, char* err, size_t n) { return no_cuda(err, n); }
int pipe_upload_consumed(void*, int64_t, char* err, size_t n) { return no_cuda(err, n); }
int pipe_upload_host_wait(void*, int64_t, char* err, size_t n) { return no_cuda(err, n); }
}  // extern "C"

#endif
