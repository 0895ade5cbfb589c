//! Rust side of the speed parts of the C++ shim: CUDA streams, copy-stream uploads and CUDA
//! graphs (stages/csrc/cuda.cpp, built only when CUDA's headers are present), and bf16
//! autocast and the channels_last layout (stages/csrc/speed.cpp, always built).
//!
//! Only the step stages call these, on their own threads. Nothing here has run on a GPU yet
//! (see the README's GPU section); on the CPU the stream, graph and upload calls are never
//! made, and the bf16 / channels_last calls are tested. Two calls of speed.cpp run on every
//! device, the CPU included: [`leaky_relu`] (D's activation) and [`grads_to_none`]; their
//! errors come back as [`CudaError`] too (the shim's one error type). [`call`] is the shim's
//! error-buffer convention, shared by all its Rust wrappers.

use std::ffi::{c_char, c_int, c_void, CStr};
use tch::Tensor;

extern "C" {
    fn pipe_cuda_built() -> c_int;
    fn pipe_cuda_device(
        device: i64,
        name: *mut c_char,
        name_len: usize,
        major: *mut c_int,
        minor: *mut c_int,
        bytes: *mut u64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn pipe_stream_new(device: i64, out: *mut *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_stream_free(s: *mut c_void);
    fn pipe_stream_use(s: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_graph_new(out: *mut *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_graph_free(g: *mut c_void);
    fn pipe_graph_begin(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_graph_end(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_graph_replay(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_uploader_new(device: i64, out: *mut *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_uploader_free(u: *mut c_void);
    fn pipe_upload_start(u: *mut c_void, slot: i64, dst: *mut c_void, src: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_upload_wait(u: *mut c_void, slot: i64, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_upload_consumed(u: *mut c_void, slot: i64, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_upload_host_wait(u: *mut c_void, slot: i64, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_autocast_bf16(enable: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_autocast_enabled() -> c_int;
    fn pipe_to_channels_last(t: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_is_channels_last(t: *mut c_void) -> c_int;
    fn pipe_leaky_relu(x: *mut c_void, slope: f64, out: *mut *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_grads_to_none(ts: *const *mut c_void, n: i64);
}

/// An error from the CUDA part of the shim: what was being done, and libtorch's (or CUDA's)
/// message, first line only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {msg}")]
pub struct CudaError {
    pub what: &'static str,
    pub msg: String,
}

/// Calls a shim function that reports errors in a buffer (every function of stages/csrc
/// does); the error holds `what` and the message's first line.
pub(crate) fn call(what: &'static str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), CudaError> {
    let mut err = vec![0 as c_char; 1024];
    if f(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminated the buffer (it writes at most err.len() bytes).
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    Err(CudaError { what, msg: crate::core::stage::first_line(&msg) })
}

/// Why a build without the CUDA part of the shim cannot capture graphs or use a copy stream.
pub const NO_CUDA_BUILD: &str = "this pipe was built without CUDA's headers, so it has no CUDA graphs (run scripts/setup.sh, which installs nvidia-cuda-cccl and nvidia-cuda-crt into the venv, then rebuild)";

/// Whether this build has the CUDA part of the shim (CUDA's headers were found at build time).
pub fn built_with_cuda() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { pipe_cuda_built() != 0 }
}

/// A CUDA device as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Index (`cuda:N`).
    pub index: usize,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0).
    pub capability: (i32, i32),
    /// Global memory, bytes.
    pub memory: u64,
}

impl DeviceInfo {
    /// Whether the device computes in bfloat16 (compute capability 8.0 and up).
    pub fn bf16(&self) -> bool {
        self.capability.0 >= 8
    }
}

/// What CUDA device `index` is. Errors: a build without the CUDA part of the shim, or CUDA's
/// message (no such device, no driver).
pub fn device_info(index: usize) -> Result<DeviceInfo, CudaError> {
    let mut name = vec![0 as c_char; 256];
    let (mut major, mut minor, mut memory) = (0, 0, 0u64);
    // SAFETY: every out-pointer is live for the call; the name is NUL-terminated within its length.
    call("CUDA device", |e, n| unsafe {
        pipe_cuda_device(index as i64, name.as_mut_ptr(), name.len(), &mut major, &mut minor, &mut memory, e, n)
    })?;
    // SAFETY: NUL-terminated by the shim.
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
    Ok(DeviceInfo { index, name, capability: (major, minor), memory })
}

/// A CUDA stream from libtorch's pool. The step stages share one ("the training stream"): each
/// makes it current on its thread with [`CudaStream::make_current`], so the D and G steps stay
/// ordered on the device as they are on the host (the baton), and a graph can be captured on
/// it (capture is impossible on the legacy default stream).
pub struct CudaStream(*mut c_void);

impl std::fmt::Debug for CudaStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CudaStream")
    }
}

// SAFETY: a c10::cuda::CUDAStream is a plain value (device, id); the pointer is owned here and
// freed once on drop.
unsafe impl Send for CudaStream {}
unsafe impl Sync for CudaStream {}

impl CudaStream {
    /// A stream from the pool of CUDA device `device`.
    pub fn new(device: usize) -> Result<Self, CudaError> {
        let mut p = std::ptr::null_mut();
        // SAFETY: `p` is written by the shim on success.
        call("CUDA stream", |e, n| unsafe { pipe_stream_new(device as i64, &mut p, e, n) })?;
        Ok(CudaStream(p))
    }

    /// Makes this the calling thread's current stream (after it waits for the thread's previous
    /// current stream).
    pub fn make_current(&self) -> Result<(), CudaError> {
        // SAFETY: self.0 is a live Stream.
        call("CUDA stream", |e, n| unsafe { pipe_stream_use(self.0, e, n) })
    }
}

impl Drop for CudaStream {
    fn drop(&mut self) {
        // SAFETY: allocated by pipe_stream_new, freed once.
        unsafe { pipe_stream_free(self.0) }
    }
}

/// One CUDA graph: the kernels a thread queues inside [`CudaGraph::capture`] on its current
/// (non-default) stream, replayed by [`CudaGraph::replay`]
/// with the same device addresses. What runs inside must read only tensors allocated before
/// the capture (static buffers), draw no random numbers and never synchronise with the host.
pub struct CudaGraph {
    ptr: *mut c_void,
    captured: bool,
}

// SAFETY: the graph is created, captured, replayed and freed by the one stage thread that owns
// it; moving it between threads before use is safe.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// An empty graph, not captured yet. Errors: a build without CUDA ([`NO_CUDA_BUILD`]), or
    /// CUDA's own error.
    pub fn new() -> Result<Self, CudaError> {
        let mut p = std::ptr::null_mut();
        // SAFETY: `p` is written by the shim on success.
        call("CUDA graph", |e, n| unsafe { pipe_graph_new(&mut p, e, n) })?;
        Ok(CudaGraph { ptr: p, captured: false })
    }

    /// Captures `body` (run once on the host, recorded, not executed), then replays it once so
    /// that its work is done. Errors: the capture failed (an operation that cannot be captured,
    /// such as a host synchronisation inside `body`), or `body`'s own error.
    pub fn capture<T, E: From<CudaError>>(&mut self, body: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        // SAFETY: self.ptr is a live Graph.
        call("CUDA graph capture", |e, n| unsafe { pipe_graph_begin(self.ptr, e, n) })?;
        let out = body();
        // End the capture even when the body failed, so the stream is usable again.
        // SAFETY: as above.
        let ended = call("CUDA graph capture", |e, n| unsafe { pipe_graph_end(self.ptr, e, n) });
        let out = out?;
        ended?;
        self.captured = true;
        self.replay()?;
        Ok(out)
    }

    /// Queues the captured work again on the current stream.
    pub fn replay(&self) -> Result<(), CudaError> {
        if !self.captured {
            return Err(CudaError { what: "CUDA graph replay", msg: "nothing was captured".into() });
        }
        // SAFETY: self.ptr is a live, captured Graph.
        call("CUDA graph replay", |e, n| unsafe { pipe_graph_replay(self.ptr, e, n) })
    }

    /// Whether a step has been captured.
    pub fn is_captured(&self) -> bool {
        self.captured
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: allocated by pipe_graph_new, freed once.
        unsafe { pipe_graph_free(self.ptr) }
    }
}

/// Batch uploads from pinned host memory on a copy stream of their own, double-buffered.
/// Batch `k` of the run (k = 0, 1, 2, ...) uses slot `k % 2`:
/// 1. [`Uploader::host_wait`]`(slot)`: the slot's previous copy has left its pinned buffer;
/// 2. fill the pinned host buffer of the slot;
/// 3. [`Uploader::start`]: copy it into the slot's device staging buffer, overlapping the step
///    the training stream is running;
/// 4. before the step that uses it, [`Uploader::device_wait`], copy staging → the step's
///    static buffer on the training stream, then [`Uploader::consumed`].
pub struct Uploader {
    ptr: *mut c_void,
}

// SAFETY: owned and used by one stage thread.
unsafe impl Send for Uploader {}

impl Uploader {
    /// An uploader with its own stream on CUDA device `device`.
    pub fn new(device: usize) -> Result<Self, CudaError> {
        let mut p = std::ptr::null_mut();
        // SAFETY: `p` is written by the shim on success.
        call("copy stream", |e, n| unsafe { pipe_uploader_new(device as i64, &mut p, e, n) })?;
        Ok(Uploader { ptr: p })
    }

    /// Starts copying pinned host tensor `src` into device tensor `dst` (same shape), once the
    /// slot's previous staging contents were consumed.
    pub fn start(&self, slot: usize, dst: &Tensor, src: &Tensor) -> Result<(), CudaError> {
        // SAFETY: both tensors are live for the call; the copy reads `src` asynchronously, and
        // the caller leaves it unchanged until `host_wait(slot)`.
        call("batch upload", |e, n| unsafe {
            pipe_upload_start(self.ptr, slot as i64, dst.as_ptr() as *mut c_void, src.as_ptr() as *mut c_void, e, n)
        })
    }

    /// Makes the current stream wait (on the device) until slot `slot`'s copy is done.
    pub fn device_wait(&self, slot: usize) -> Result<(), CudaError> {
        // SAFETY: self.ptr is live.
        call("batch upload", |e, n| unsafe { pipe_upload_wait(self.ptr, slot as i64, e, n) })
    }

    /// Marks slot `slot`'s staging buffer as read by the work queued so far on the current
    /// stream.
    pub fn consumed(&self, slot: usize) -> Result<(), CudaError> {
        // SAFETY: self.ptr is live.
        call("batch upload", |e, n| unsafe { pipe_upload_consumed(self.ptr, slot as i64, e, n) })
    }

    /// Blocks until slot `slot`'s copy is done, so its pinned source may be overwritten.
    pub fn host_wait(&self, slot: usize) -> Result<(), CudaError> {
        // SAFETY: self.ptr is live.
        call("batch upload", |e, n| unsafe { pipe_upload_host_wait(self.ptr, slot as i64, e, n) })
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        // SAFETY: allocated by pipe_uploader_new, freed once.
        unsafe { pipe_uploader_free(self.ptr) }
    }
}

/// CUDA autocast in bfloat16 on the calling thread while alive (PyTorch's
/// `torch.autocast("cuda", dtype=torch.bfloat16)`, with the weight-cast cache off). Matrix
/// products and convolutions then run in bf16; their outputs are bf16 (cast them to f32 before
/// a loss). Has no effect on CPU tensors.
pub struct Bf16Autocast(());

impl Bf16Autocast {
    /// Switches autocast on. Errors: libtorch's message.
    pub fn on() -> Result<Self, CudaError> {
        // SAFETY: thread-local state only.
        call("bf16 autocast", |e, n| unsafe { pipe_autocast_bf16(1, e, n) })?;
        Ok(Bf16Autocast(()))
    }

    /// Whether autocast is on for the calling thread.
    pub fn active() -> bool {
        // SAFETY: reads thread-local state.
        unsafe { pipe_autocast_enabled() != 0 }
    }
}

impl Drop for Bf16Autocast {
    fn drop(&mut self) {
        // SAFETY: thread-local state only; pairs with `on`.
        let _ = call("bf16 autocast", |e, n| unsafe { pipe_autocast_bf16(0, e, n) });
    }
}

/// Gives every 4-D tensor in `ts` the channels_last layout (NHWC strides), in place: the
/// tensors keep their shapes and values; aliases made afterwards share the layout. Others are
/// left alone.
pub fn to_channels_last<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> Result<(), CudaError> {
    for t in ts {
        // SAFETY: `t` is a live tensor; the shim replaces its data under no_grad.
        call("channels_last", |e, n| unsafe { pipe_to_channels_last(t.as_ptr() as *mut c_void, e, n) })?;
    }
    Ok(())
}

/// Whether a tensor is 4-D and laid out channels_last.
pub fn is_channels_last(t: &Tensor) -> bool {
    // SAFETY: `t` is a live tensor; read only.
    unsafe { pipe_is_channels_last(t.as_ptr() as *mut c_void) != 0 }
}

/// Leaky ReLU, `x` where x > 0 and `slope·x` elsewhere, as ATen's single fused kernel (whose
/// backward is itself differentiable: the gradient penalty's double backward goes through it).
/// Same values as max(x, slope·x) for 0 ≤ slope ≤ 1.
///
/// Errors: libtorch's message.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor, CudaError> {
    let mut out = std::ptr::null_mut();
    // SAFETY: `x` is live; on success the shim hands over a new heap at::Tensor, which tch then
    // owns (and frees) exactly like the tensors its own wrappers return.
    call("leaky_relu", |e, n| unsafe { pipe_leaky_relu(x.as_ptr() as *mut c_void, slope, &mut out, e, n) })?;
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
}

/// Drops the gradients of `ts` (PyTorch's `zero_grad(set_to_none=True)`): the next backward
/// writes fresh gradient tensors instead of adding into zeroed ones (no fill, no add).
pub fn grads_to_none<'a>(ts: impl IntoIterator<Item = &'a Tensor>) {
    let ptrs: Vec<*mut c_void> = ts.into_iter().map(|t| t.as_ptr() as *mut c_void).collect();
    // SAFETY: every pointer is a live tensor for the call; only their grad slots change.
    unsafe { pipe_grads_to_none(ptrs.as_ptr(), ptrs.len() as i64) }
}
