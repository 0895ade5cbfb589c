//! Copying host batches into a step stage's static device buffers.
//!
//! On the CPU a batch is copied straight in. On CUDA it goes through pinned host memory and a
//! copy stream ([`crate::train::cuda::Uploader`]), double-buffered: d_step stages the batch it
//! has just received (its one-batch lookahead) while the device still runs the previous step,
//! and the step only waits for the copy on the device.

use crate::train::cuda::Uploader;
use crate::train::TrainError;
use tch::{Device, Kind, Tensor};

/// Pinned host buffers and device staging buffers of one slot, one per tensor of a batch.
struct Slot {
    pinned: Vec<Tensor>,
    staging: Vec<Tensor>,
}

/// The CUDA path: the uploader and its two slots.
struct CudaFeed {
    up: Uploader,
    slots: [Option<Slot>; 2],
    /// The slot the next batch goes into.
    next: usize,
    /// The slot holding a staged batch not yet loaded.
    staged: Option<usize>,
}

/// Copies batches (lists of host f32 slices, each as long as its buffer) into device buffers.
pub struct Feeder {
    device: Device,
    cuda: Option<CudaFeed>,
}

impl Feeder {
    /// A feeder for `device`. Errors: the copy stream cannot be made (CUDA).
    pub fn new(device: Device) -> Result<Self, TrainError> {
        let cuda = match device {
            Device::Cuda(i) => Some(CudaFeed { up: Uploader::new(i)?, slots: [None, None], next: 0, staged: None }),
            _ => None,
        };
        Ok(Feeder { device, cuda })
    }

    /// Start copying `srcs` towards the device now (CUDA: into the next slot's staging
    /// buffers, asynchronously); [`Feeder::load`] finishes it. Shapes as the destination
    /// buffers'. On the CPU: nothing (the copy happens in `load`).
    pub fn stage(&mut self, srcs: &[&[f32]], shapes: &[Vec<i64>]) -> Result<(), TrainError> {
        let Some(c) = self.cuda.as_mut() else { return Ok(()) };
        let k = c.next;
        c.next = 1 - k;
        let fits =
            c.slots[k].as_ref().is_some_and(|s| s.pinned.len() == srcs.len() && s.pinned.iter().zip(shapes).all(|(t, sh)| &t.size() == sh));
        if !fits {
            // (Re)allocate for these shapes; the slot's earlier copy must be done first.
            if c.slots[k].is_some() {
                c.up.host_wait(k)?;
            }
            let mut slot = Slot { pinned: vec![], staging: vec![] };
            for sh in shapes {
                slot.pinned.push(Tensor::f_empty(sh.as_slice(), (Kind::Float, Device::Cpu))?.f_pin_memory(self.device)?);
                slot.staging.push(Tensor::f_empty(sh.as_slice(), (Kind::Float, self.device))?);
            }
            c.slots[k] = Some(slot);
        } else {
            // The slot's previous copy must have left the pinned memory before it is rewritten.
            c.up.host_wait(k)?;
        }
        let slot = c.slots[k].as_ref().expect("allocated above");
        for ((src, pinned), staging) in srcs.iter().zip(&slot.pinned).zip(&slot.staging) {
            let n = pinned.numel();
            if src.len() != n {
                return Err(TrainError::Torch(tch::TchError::Shape(format!("batch of {} values for a buffer of {n}", src.len()))));
            }
            // SAFETY: `pinned` is a contiguous f32 CPU tensor of n elements that nothing else
            // reads or writes now (its last copy is done: host_wait above).
            let dst = unsafe { std::slice::from_raw_parts_mut(pinned.data_ptr() as *mut f32, n) };
            dst.copy_from_slice(src);
            c.up.start(k, staging, pinned)?;
        }
        c.staged = Some(k);
        Ok(())
    }

    /// Copy `srcs` into `dsts` (same number of elements each): on the CPU directly; on CUDA
    /// from the staged slot (staging it now if [`Feeder::stage`] was not called), the current
    /// stream waiting for the upload on the device. After a [`Feeder::stage`], `srcs` is not
    /// read again: the caller passes the same batch it staged (d_step does).
    pub fn load(&mut self, dsts: &mut [&mut Tensor], srcs: &[&[f32]]) -> Result<(), TrainError> {
        if self.cuda.is_none() {
            for (dst, src) in dsts.iter_mut().zip(srcs) {
                crate::train::upload(dst, src)?;
            }
            return Ok(());
        }
        if self.cuda.as_ref().is_some_and(|c| c.staged.is_none()) {
            let shapes: Vec<Vec<i64>> = dsts.iter().map(|t| t.size()).collect();
            self.stage(srcs, &shapes)?;
        }
        let c = self.cuda.as_mut().expect("checked above");
        let k = c.staged.take().expect("staged above");
        c.up.device_wait(k)?;
        let slot = c.slots[k].as_ref().expect("a staged slot is allocated");
        for (dst, staging) in dsts.iter_mut().zip(&slot.staging) {
            dst.f_copy_(staging)?;
        }
        c.up.consumed(k)?;
        Ok(())
    }
}
