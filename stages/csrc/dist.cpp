// Data-parallel communication through PyTorch's own c10d (stages/src/dist.rs): a TCPStore for
// the rendezvous, a PrefixStore per process group, ProcessGroupGloo (CPU) and, in builds with
// PIPE_CUDA, ProcessGroupNCCL (CUDA), all from the libtorch the pip torch ships.
//
// Built by build.rs with USE_C10D_GLOO (and USE_C10D_NCCL with PIPE_CUDA) and compat/ first on
// the include path, in this compile unit only: the wheel lacks the gloo headers that
// ProcessGroupGloo.hpp includes, and compat/gloo/ declares just enough of them. Every c10d object
// this file constructs is allocated here with our view of its size, so the sizes are checked
// below against libtorch's own (read from the `operator new` before each constructor call in
// libtorch_cpu.so / libtorch_cuda.so, torch 2.11.0): if a torch upgrade changes a layout, the
// build stops here instead of corrupting memory at run time.
//
// Each function returns 0 on success, or 1 with the exception's message in `err` (the first line
// of c10d's message without the C++ backtrace and without gloo's "[file.cc:123] " prefix,
// NUL-terminated, at most err_len bytes).
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Logging.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef PIPE_DIST_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "error.h"

static_assert(sizeof(c10d::ProcessGroupGloo) == 488,
              "c10d::ProcessGroupGloo's size differs from torch 2.11's (488 bytes): after a torch upgrade, re-check "
              "libtorch_cpu.so's operator new size and the gloo compat headers in stages/csrc/compat");
static_assert(sizeof(c10d::ProcessGroupGloo::Options) == 176,
              "c10d::ProcessGroupGloo::Options' size differs from torch 2.11's (176 bytes): re-check after a torch upgrade");
static_assert(sizeof(c10d::TCPStore) == 216,
              "c10d::TCPStore's size differs from torch 2.11's (216 bytes): re-check after a torch upgrade");
static_assert(sizeof(c10d::PrefixStore) == 64,
              "c10d::PrefixStore's size differs from torch 2.11's (64 bytes): re-check after a torch upgrade");
#ifdef PIPE_DIST_NCCL
static_assert(sizeof(c10d::ProcessGroupNCCL) == 1112,
              "c10d::ProcessGroupNCCL's size differs from torch 2.11's with NCCL 2.28 headers (1112 bytes): re-check "
              "libtorch_cuda.so's operator new size after a torch or nvidia-nccl upgrade");
static_assert(sizeof(c10d::ProcessGroupNCCL::Options) == 248,
              "c10d::ProcessGroupNCCL::Options' size differs from torch 2.11's (248 bytes): re-check after an upgrade");
#endif

namespace {

// The message of an exception: c10::Error's without its backtrace, first line only, and without
// the "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:547] " source prefix gloo puts first.
std::string message(const std::exception& e) {
  std::string m;
  if (auto* ce = dynamic_cast<const c10::Error*>(&e)) {
    m = ce->what_without_backtrace();
  } else {
    m = e.what();
  }
  auto nl = m.find('\n');
  if (nl != std::string::npos) m.resize(nl);
  if (!m.empty() && m[0] == '[') {
    auto close = m.find("] ");
    if (close != std::string::npos) {
      auto inside = m.substr(1, close - 1);
      auto colon = inside.rfind(':');
      bool line_no = colon != std::string::npos && colon + 1 < inside.size() &&
                     inside.find_first_not_of("0123456789", colon + 1) == std::string::npos;
      if (line_no) m.erase(0, close + 2);
    }
  }
  return m;
}

template <class F>
int guarded(char* err, size_t err_len, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    pipe_shim::set_error(message(e).c_str(), err, err_len);
    return 1;
  } catch (...) {
    pipe_shim::set_error("unknown C++ exception", err, err_len);
    return 1;
  }
}

// c10's logging reads TORCH_CPP_LOG_LEVEL only in initLogging() (Python calls it at import).
// Unset, c10d's retries and connection warnings would print as [W ...] lines on every rank, and
// everything they say reaches the caller as an error anyway; so without the variable pipe sets
// the level to ERROR (TORCH_CPP_LOG_LEVEL=WARNING or INFO brings them back for debugging).
void init_logging() {
  static std::once_flag once;
  std::call_once(once, [] {
    c10::initLogging();
    if (std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr) {
      FLAGS_caffe2_log_level = 2;  // c10::GLOG_ERROR
      c10::UpdateLoggingLevelsFromFlags();
    }
  });
}

struct Store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct Group {
  c10::intrusive_ptr<c10d::Backend> pg;
};

// Runs a collective on `t` in place and waits: non-contiguous tensors go through a contiguous
// copy (c10d wants dense contiguous buffers).
template <class F>
void in_place(at::Tensor& t, F op) {
  if (t.is_contiguous()) {
    std::vector<at::Tensor> ts{t};
    op(ts)->wait();
  } else {
    std::vector<at::Tensor> ts{t.contiguous()};
    op(ts)->wait();
    t.copy_(ts[0]);
  }
}
}  // namespace

extern "C" {

int pipe_dist_nccl_built() {
#ifdef PIPE_DIST_NCCL
  return 1;
#else
  return 0;
#endif
}

// A TCPStore client (or the server and a client, with is_server): connects within timeout_ms;
// the server waits for all `world` clients to connect.
int pipe_dist_store_new(const char* addr, uint16_t port, int64_t world, int is_server, int64_t timeout_ms, void** out,
                        char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    init_logging();
    c10d::TCPStoreOptions o;
    o.port = port;
    o.isServer = is_server != 0;
    o.numWorkers = static_cast<size_t>(world);
    o.waitWorkers = true;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    auto s = c10::make_intrusive<c10d::TCPStore>(std::string(addr), o);
    *out = new Store{s};
  });
}

void pipe_dist_store_free(void* s) { delete static_cast<Store*>(s); }

// A process group over the store, its keys under `prefix`. backend 0: Gloo, with its device on
// interface `iface` when not empty, else on the address `host` resolves to when not empty, else
// on the address this machine's hostname resolves to (loopback when it does not); 1: NCCL.
int pipe_dist_group_new(void* store, const char* prefix, int backend, int64_t rank, int64_t world, int64_t timeout_ms,
                        const char* iface, const char* host, void** out, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    init_logging();
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Store> prefixed =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), static_cast<Store*>(store)->store);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (backend == 0) {
      auto o = c10d::ProcessGroupGloo::Options::create(timeout);
      if (iface[0] != '\0') {
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
      } else if (host[0] != '\0') {
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
      } else {
        o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      // Every collective is waited for by its caller, so one worker thread per group suffices.
      o->threads = 1;
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, static_cast<int>(rank), static_cast<int>(world), o);
    } else {
#ifdef PIPE_DIST_NCCL
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, static_cast<int>(rank), static_cast<int>(world), o);
#else
      throw std::runtime_error(
          "this build has no NCCL (pipe was built without CUDA's headers; scripts/setup.sh installs them, then rebuild)");
#endif
    }
    *out = new Group{pg};
  });
}

void pipe_dist_group_free(void* g) { delete static_cast<Group*>(g); }

// op 0: SUM, 1: MAX.
int pipe_dist_all_reduce(void* g, at::Tensor* t, int op, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto& pg = static_cast<Group*>(g)->pg;
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp(op == 1 ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM);
    in_place(*t, [&](std::vector<at::Tensor>& ts) { return pg->allreduce(ts, o); });
  });
}

int pipe_dist_broadcast(void* g, at::Tensor* t, int64_t root, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto& pg = static_cast<Group*>(g)->pg;
    c10d::BroadcastOptions o;
    o.rootRank = root;
    in_place(*t, [&](std::vector<at::Tensor>& ts) { return pg->broadcast(ts, o); });
  });
}

int pipe_dist_barrier(void* g, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { static_cast<Group*>(g)->pg->barrier()->wait(); });
}

// Averages the gradients of n parameters over the ranks (see ProcessGroup::average_grads): one
// buffer [grad_0, ..., grad_{n-1}, defined_0, ..., defined_{n-1}], undefined gradients as zeros
// and defined_i = 1 where this rank has a gradient; all-reduce SUM; gradients divided by the
// world size; then a parameter gets the average when any rank had a gradient (its own gradient
// is overwritten, or set when it had none), and keeps no gradient when no rank had one.
//
// `extra` (may be null): a 1-D tensor of the parameters' dtype and device, appended to the buffer
// and replaced by its sum over the ranks (not divided): flags the caller agrees on in the same
// collective (a non-finite loss, a stop), at no extra round trip.
int pipe_dist_average_grads(void* g, at::Tensor** params, int64_t n, int64_t world, at::Tensor* extra, char* err,
                            size_t err_len) {
  return guarded(err, err_len, [&] {
    if (n == 0) return;
    at::NoGradGuard no_grad;
    auto& pg = static_cast<Group*>(g)->pg;
    const at::Tensor& first = *params[0];
    auto opts = first.options().requires_grad(false);
    std::vector<at::Tensor> parts;
    parts.reserve(n + 1);
    int64_t total = 0;
    bool all_defined = true;
    std::vector<float> flags(n);
    for (int64_t i = 0; i < n; i++) {
      const at::Tensor& p = *params[i];
      TORCH_CHECK(p.scalar_type() == first.scalar_type() && p.device() == first.device(), "parameter ", i, " is ",
                  p.scalar_type(), " on ", p.device(), " but parameter 0 is ", first.scalar_type(), " on ", first.device(),
                  ": one buffer needs one dtype and device");
      const at::Tensor& gr = p.grad();
      if (gr.defined()) {
        TORCH_CHECK(gr.numel() == p.numel() && gr.scalar_type() == p.scalar_type(), "parameter ", i,
                    "'s gradient does not match it in size or dtype");
        parts.push_back(gr.reshape({-1}));
      } else {
        parts.push_back(at::zeros({p.numel()}, opts));
        all_defined = false;
      }
      flags[i] = gr.defined() ? 1.0f : 0.0f;
      total += p.numel();
    }
    parts.push_back(at::from_blob(flags.data(), {n}, at::kFloat).to(first.device(), first.scalar_type()));
    int64_t n_extra = 0;
    if (extra != nullptr) {
      TORCH_CHECK(extra->dim() == 1 && extra->scalar_type() == first.scalar_type() && extra->device() == first.device(),
                  "the extra values must be a 1-D tensor of the parameters' dtype and device");
      parts.push_back(*extra);
      n_extra = extra->numel();
    }
    std::vector<at::Tensor> flat{at::cat(parts)};
    pg->allreduce(flat)->wait();
    if (n_extra > 0) extra->copy_(flat[0].narrow(0, total + n, n_extra));
    auto grads = flat[0].narrow(0, 0, total);
    grads.div_(static_cast<double>(world));
    // Where this rank had every gradient, every count is ≥ 1: no need to read them (a device sync).
    at::Tensor counts;
    if (!all_defined) counts = flat[0].narrow(0, total, n).to(at::kCPU, at::kFloat);
    int64_t off = 0;
    for (int64_t i = 0; i < n; i++) {
      at::Tensor& p = *params[i];
      auto slice = grads.narrow(0, off, p.numel()).view(p.sizes());
      off += p.numel();
      if (p.grad().defined()) {
        p.mutable_grad().copy_(slice);
      } else if (counts.data_ptr<float>()[i] > 0.5f) {
        p.mutable_grad() = slice.clone();
      }
    }
  });
}
}  // extern "C"
