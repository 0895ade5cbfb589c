//! The non-finite guard of the step stages: what `on_nonfinite` does with a NaN or infinite
//! loss (see [`NonFinite`]), in a form a captured update can use.

use crate::train::{scalar, NonFinite, Optim, RunSettings, TrainError, MAX_SKIPPED_IN_A_ROW};
use tch::{Device, Tensor};

/// Watches one step stage's losses for NaN and ±Inf (see [`NonFinite`]).
///
/// Everything it does inside an update works on device tensors that live as long as the guard
/// (the step number, the first bad step, the test hook's factor), so an update that uses it
/// can be captured as a CUDA graph: [`FiniteGuard::begin`] sets them before each update,
/// outside the captured region.
pub struct FiniteGuard {
    mode: NonFinite,
    /// On a GPU with `Stop`: the first generator step whose loss was not finite (0: none), an
    /// i64 scalar kept on the device so that checking costs no synchronisation.
    first_bad: Option<Tensor>,
    /// On a GPU with `Stop`: the generator step of the update under way (i64 scalar).
    step_t: Option<Tensor>,
    /// With the test hook: the factor of the loss, 1 or NaN at the injected steps (f32 scalar).
    poison_t: Option<Tensor>,
    skipped_in_a_row: u32,
    /// Updates skipped so far.
    pub skipped: u64,
    inject: Option<(u64, bool)>,
    /// Keep the device record on the CPU too (tests of the GPU path).
    device_record: bool,
    /// Data-parallel runs: the ranks' group. Every verdict is agreed (a bad loss on any rank
    /// counts on all), so that they skip or stop at the same update: see [`FiniteGuard::votes`].
    group: Option<std::sync::Arc<crate::dist::ProcessGroup>>,
    /// This update's votes once all-reduced ([`FiniteGuard::votes`]), for [`FiniteGuard::check`].
    agreed: Option<Tensor>,
}

/// What [`FiniteGuard::check`] decided about one update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on with the optimiser step.
    Step,
    /// Skip this update (`NonFinite::Skip`); the gradients were zeroed.
    Skipped,
}

impl FiniteGuard {
    /// A guard for the stage called `stage` (for the test hook).
    pub fn new(run: &RunSettings, stage: &str) -> Self {
        let inject = run.inject_nonfinite.as_ref().filter(|(s, _, _)| s == stage).map(|(_, k, on)| (*k, *on));
        FiniteGuard {
            mode: run.on_nonfinite,
            first_bad: None,
            step_t: None,
            poison_t: None,
            skipped_in_a_row: 0,
            skipped: 0,
            inject,
            device_record: false,
            group: run.group.clone().filter(|g| g.world() > 1),
            agreed: None,
        }
    }

    /// Use the GPU path (the device-side record of the first bad step) on the CPU too: for
    /// tests of that path on machines without a GPU.
    pub fn record_on_device(mut self) -> Self {
        self.device_record = true;
        self
    }

    /// Before the update of generator step `step` on `device` (outside a captured region):
    /// puts the step number (GPU, `Stop`) and the test hook's factor on the device.
    pub fn begin(&mut self, step: u64, device: Device) -> Result<(), tch::TchError> {
        if self.mode == NonFinite::Stop && (device.is_cuda() || self.device_record) {
            if self.first_bad.is_none() {
                self.first_bad = Some(Tensor::f_zeros([], (tch::Kind::Int64, device))?);
            }
            let t = match &mut self.step_t {
                Some(t) => t,
                None => self.step_t.insert(Tensor::f_zeros([], (tch::Kind::Int64, device))?),
            };
            let _ = t.f_fill_(step as i64)?;
        }
        if let Some((k, onward)) = self.inject {
            let factor = if step == k || (onward && step > k) { f64::NAN } else { 1.0 };
            let t = match &mut self.poison_t {
                Some(t) => t,
                None => self.poison_t.insert(Tensor::f_ones([], (tch::Kind::Float, device))?),
            };
            let _ = t.f_fill_(factor)?;
        }
        Ok(())
    }

    /// The loss to back-propagate: `loss`, or with the test hook `loss` times its factor (NaN
    /// at the injected steps, else 1: the same value and gradient).
    pub fn maybe_poison(&self, loss: Tensor) -> Tensor {
        match &self.poison_t {
            Some(f) => loss * f,
            None => loss,
        }
    }

    /// Check an update after `backward`, before the optimiser step. `what` names the loss in
    /// messages ("discriminator loss"). On the CPU with `Stop`, and with `Skip`, it reads the
    /// loss back; on a GPU with `Stop` it only queues device work (capturable). Errors: (Stop)
    /// the loss is not finite, naming the step ([`TrainError::NonFinite`]); (Skip) too many
    /// updates skipped in a row ([`TrainError::Diverged`]); a libtorch failure
    /// ([`TrainError::Torch`]).
    pub fn check(&mut self, loss: &Tensor, opt: &mut Optim, step: u64, what: &str) -> Result<Verdict, TrainError> {
        match self.mode {
            NonFinite::Skip => {
                // The gradients are averaged over the ranks already (a NaN anywhere is a NaN
                // everywhere); the loss is each rank's own.
                let bad = match self.agreed.take() {
                    Some(v) => v.f_double_value(&[0])? > 0.0,
                    None => !scalar(loss)?.is_finite(),
                };
                let finite = !bad && opt.grads_finite()?;
                if finite {
                    self.skipped_in_a_row = 0;
                    return Ok(Verdict::Step);
                }
                opt.zero_grad();
                self.skipped += 1;
                self.skipped_in_a_row += 1;
                if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW {
                    return Err(TrainError::Diverged { step, what: what.to_string() });
                }
                Ok(Verdict::Skipped)
            }
            NonFinite::Stop if self.step_t.is_none() => {
                let value = scalar(loss)?;
                let any_bad = match self.agreed.take() {
                    Some(v) => v.f_double_value(&[0])? > 0.0,
                    None => !value.is_finite(),
                };
                match (value.is_finite(), any_bad) {
                    (_, false) => Ok(Verdict::Step),
                    (false, true) => Err(TrainError::NonFinite { step, what: what.to_string(), value }),
                    (true, true) => Err(TrainError::NonFiniteOnDevice { step, what: format!("{what} on another rank") }),
                }
            }
            NonFinite::Stop => {
                // first_bad ← step where first_bad = 0 and the loss is not finite, in place.
                let (Some(first_bad), Some(step_t)) = (self.first_bad.as_mut(), self.step_t.as_ref()) else {
                    return Err(TrainError::Torch(tch::TchError::Torch("internal: FiniteGuard::begin was not called".into())));
                };
                let mut bad = loss.f_isfinite()?.f_logical_not()?;
                if let Some(g) = &self.group {
                    // On the device, no synchronisation: a bad loss on any rank.
                    let any = bad.f_to_kind(tch::Kind::Float)?;
                    g.all_reduce_max(&any)
                        .map_err(|e| TrainError::Torch(tch::TchError::Torch(format!("agreeing on a non-finite {what}: {e}"))))?;
                    bad = any.f_gt(0.0)?;
                }
                let first = first_bad.f_eq(0)?.f_logical_and(&bad)?;
                let next = step_t.f_where_self(&first, first_bad)?;
                first_bad.f_copy_(&next)?;
                Ok(Verdict::Step)
            }
        }
    }

    /// Data-parallel runs: this update's votes, to be carried in the gradient all-reduce
    /// ([`crate::dist::ProcessGroup::average_grads`]'s `extra`): `[loss not finite, stop]` as
    /// f32 on the loss's device (no synchronisation), 0 or 1 here and the number of ranks voting
    /// so once all-reduced. [`FiniteGuard::check`] then uses the agreed first value; the caller
    /// may read the second (a stop asked for on any rank). None in a single process.
    pub fn votes(&mut self, loss: &Tensor, stop: bool) -> Result<Option<Tensor>, TrainError> {
        if self.group.is_none() {
            return Ok(None);
        }
        let bad = loss.f_detach()?.f_isfinite()?.f_logical_not()?.f_to_kind(tch::Kind::Float)?.f_reshape([1])?;
        let stop = Tensor::f_full([1], stop as u8 as f64, (tch::Kind::Float, loss.device()))?;
        let v = Tensor::f_cat(&[bad, stop], 0)?;
        self.agreed = Some(v.shallow_clone());
        Ok(Some(v))
    }

    /// Read the device-side record (GPU, `Stop`): call at logged steps and before a
    /// checkpoint. Errors naming the first bad step ([`TrainError::NonFiniteOnDevice`]), or a
    /// libtorch failure ([`TrainError::Torch`]).
    pub fn verify(&self, what: &str) -> Result<(), TrainError> {
        if let Some(acc) = &self.first_bad {
            let first = scalar(acc)? as u64;
            if first > 0 {
                return Err(TrainError::NonFiniteOnDevice { step: first, what: what.to_string() });
            }
        }
        Ok(())
    }
}
