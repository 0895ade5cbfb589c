//! Rust side of the C++ shim (stages/csrc/shim.cpp, compiled by build.rs against the pip
//! torch's headers): ATen operations tch does not expose.

use crate::train::TrainError;
use std::ffi::{c_char, c_int, c_void};
use tch::Tensor;

extern "C" {
    fn pipe_fused_adam(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        steps: *const *mut c_void,
        n: i64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

fn ptrs(ts: &[&Tensor]) -> Vec<*mut c_void> {
    ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

/// Settings of one fused Adam update: learning rate, β₁, β₂, L2 weight decay, ε.
#[derive(Debug, Clone, Copy)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One Adam update of all `params` at once with ATen's fused multi-tensor kernel
/// (`aten::_fused_adam_`, PyTorch's `Adam(fused=True)`): for each i, with t = `steps[i]`
/// (a one-element float tensor on the parameter's device, already holding this step's number):
/// g ← g + wd·θ; m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
/// θ ← θ − lr/(1−β₁ᵗ) · m/(√v/√(1−β₂ᵗ) + ε). Parameters, moments updated in place; all
/// lists the same length, tensors f32 of matching shapes on one device.
///
/// Errors: lists of different lengths ([`TrainError::FusedAdamLists`]); libtorch's message
/// (mismatched devices, dtypes: [`TrainError::FusedAdam`]).
pub fn fused_adam(
    params: &[&Tensor],
    grads: &[&Tensor],
    m: &[&Tensor],
    v: &[&Tensor],
    steps: &[&Tensor],
    h: AdamHyper,
) -> Result<(), TrainError> {
    let n = params.len();
    if [grads.len(), m.len(), v.len(), steps.len()].iter().any(|&l| l != n) {
        return Err(TrainError::FusedAdamLists);
    }
    if n == 0 {
        return Ok(());
    }
    let (p, g, mm, vv, s) = (ptrs(params), ptrs(grads), ptrs(m), ptrs(v), ptrs(steps));
    // SAFETY: every pointer is a live at::Tensor owned by the slices above for the whole call;
    // the shim catches C++ exceptions and writes its message into the buffer `call` gives.
    crate::train::cuda::call("fused Adam", |err, err_len| unsafe {
        pipe_fused_adam(
            p.as_ptr(),
            g.as_ptr(),
            mm.as_ptr(),
            vv.as_ptr(),
            s.as_ptr(),
            n as i64,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            err,
            err_len,
        )
    })
    .map_err(|e| TrainError::FusedAdam(e.msg))
}
