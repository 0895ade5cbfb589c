//! What the loader stages share. The loaders are the sources of real images:
//!
//! * [`crate::kinds::idx_loader`]: MNIST-style IDX files (`train-images-idx3-ubyte`, optionally
//!   gzipped), grey.
//! * [`crate::kinds::folder_loader`]: a folder tree of image files (png, jpg, jpeg, gif, webp,
//!   bmp), decoded by a pool of worker threads, resized to a square, grey or RGB.
//!
//! Both emit [`Item::Batch`] items holding a [`HostBatch`]: NCHW `f32` in [-1, 1], pixel u8
//! `p` mapped to `p / 127.5 - 1`. They stop once the batch index reaches `max_batches`, after
//! the configured number of epochs, when every downstream stage has gone away, or when the
//! runner asks for a stop; dropping the context then closes the outputs (EOS).
//!
//! # Resuming
//!
//! Both loaders can start from a saved [`DataPosition`] (the `start` argument of their
//! `build`): the next batch's index, the epoch and the position in that epoch's visiting order.
//! The batches of a run started at `batch.position_after()` ([`HostBatch::position_after`]) of
//! some batch of an earlier run with the same data, seed and configuration are exactly the
//! batches that followed it in the earlier run (same index, epoch, `next_pos` and values).
//! The folder loader does not read or decode the files before the position, so a resumed run
//! starts as fast as a fresh one. `max_batches` and `epochs` stay absolute counts (the batches
//! and epochs before `start` count too); a `start` at or past either limit gives no batches,
//! without an error. A `pos` past the end of an epoch (more than the number of images) is an
//! error of `build`: the data was most likely changed since the position was saved.
//!
//! The helpers here are shared by both loaders: the per-epoch order ([`epoch_order`]), the
//! u8 → [-1, 1] conversion ([`pixels_to_unit`]), the batch-count and start-position checks and
//! the emitter that numbers batches and applies the stop conditions.

pub use crate::core::item::DataPosition;
use crate::core::item::{HostBatch, Item};
use crate::core::stage::{Sent, StageContext, StageError};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Default number of images per batch for both loaders.
pub const DEFAULT_BATCH: usize = 64;

/// Multiplier mixing the epoch number into the seed (the 64-bit golden ratio).
const EPOCH_MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// The order in which the `n` images are visited in epoch `epoch`.
///
/// Without `shuffle` this is `0..n`. With it, a permutation of `0..n` drawn from
/// `StdRng::seed_from_u64(seed ^ epoch · 0x9E3779B97F4A7C15)` (wrapping multiply): the same
/// `(n, seed, epoch)` always gives the same order, and different epochs give different ones.
pub fn epoch_order(n: usize, seed: u64, epoch: u32, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(EPOCH_MIX));
        order.shuffle(&mut rng);
    }
    order
}

/// Map u8 pixels to `f32` in [-1, 1]: `p as f32 / 127.5 - 1.0` (0 → -1, 255 → 1).
pub fn pixels_to_unit(pixels: &[u8]) -> Vec<f32> {
    pixels.iter().map(|&p| p as f32 / 127.5 - 1.0).collect()
}

/// Check the batch settings against the number of images a loader found.
///
/// Errors when `batch` is 0, or when `drop_last` is set and there are fewer than `batch`
/// images (no full batch could ever be made). `what` names the data (a file or a folder) in
/// the message.
pub(crate) fn check_batch(what: &std::path::Path, n: usize, batch: usize, drop_last: bool) -> Result<(), StageError> {
    if batch == 0 {
        return Err(StageError::msg("batch must be at least 1"));
    }
    if n == 0 {
        return Err(StageError::file(what, "no images"));
    }
    if drop_last && n < batch {
        return Err(StageError::file(
            what,
            format!(
                "only {n} images, fewer than one batch of {batch} (set a smaller batch, \
                 or drop_last: false)"
            ),
        ));
    }
    Ok(())
}

/// Check a start position against the number of images `n` a loader found: a `pos` past the
/// end of an epoch is an error naming `what` (a file or a folder), as the data has most likely
/// changed since the position was saved. (A start at or past the `epochs` or `max_batches`
/// limit is not an error: the loader just has nothing more to give.)
pub(crate) fn check_start(what: &std::path::Path, n: usize, start: &DataPosition) -> Result<(), StageError> {
    if start.pos > n as u64 {
        return Err(StageError::file(
            what,
            format!(
                "cannot resume at image {} of epoch {}: the data has only {n} images (was it changed since the checkpoint?)",
                start.pos, start.epoch
            ),
        ));
    }
    Ok(())
}

/// Whether a loader should keep producing after an emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Stop,
}

/// This process's place in a data-parallel run: rank `rank` of `world` processes (ranks
/// 0..world). A single process is rank 0 of 1.
///
/// The loaders build the same global batches on every rank, in the same order (the order of a
/// single-process run with the same pipeline), and each rank keeps its own slice: images
/// `[rank·b, (rank+1)·b)` of each global batch of `world·b` images. A global batch that cannot
/// be split evenly (the short last batch of an epoch without `drop_last`) is skipped by every
/// rank, since ranks must step together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { rank: 0, world: 1 }
    }
}

impl Shard {
    /// The images of a global batch of `n` this rank keeps, as a range of positions in it;
    /// None when `n` does not split evenly over the ranks.
    pub fn slice(&self, n: usize) -> Option<std::ops::Range<usize>> {
        if self.world <= 1 {
            return Some(0..n);
        }
        if n % self.world != 0 {
            return None;
        }
        let b = n / self.world;
        Some(self.rank * b..(self.rank + 1) * b)
    }

    /// Problems with a global batch of `batch` for this world size (`field` names it).
    pub fn batch_problem(&self, batch: usize) -> Option<String> {
        (self.world > 1 && (batch % self.world != 0 || batch < self.world)).then(|| {
            format!(
                "batch is {batch}, split over {} ranks: the batch is the global batch, so it must be a multiple of the world size (each rank takes batch / world images)",
                self.world
            )
        })
    }
}

/// Sends batches, numbering them across epochs from a start index and applying the stop
/// conditions (`max_batches` reached, outputs closed, drain/abort asked for). In a
/// data-parallel run it sends this rank's slice of each batch ([`Shard`]).
pub(crate) struct Emitter {
    next_index: u64,
    max_batches: Option<u64>,
    shard: Shard,
}

impl Emitter {
    /// An emitter whose first batch has index `next_index`; it is done once the index reaches
    /// `max_batches` (an absolute count, batches before `next_index` included).
    pub(crate) fn new(next_index: u64, max_batches: Option<u64>) -> Self {
        Emitter { next_index, max_batches, shard: Shard::default() }
    }

    /// The same, sending only `shard`'s slice of each batch.
    pub(crate) fn sharded(mut self, shard: Shard) -> Self {
        self.shard = shard;
        self
    }

    /// True once the next batch index has reached `max_batches`.
    pub(crate) fn done(&self) -> bool {
        self.max_batches.is_some_and(|m| self.next_index >= m)
    }

    /// True when the loader should stop before producing anything more. In a data-parallel
    /// run a drain does not stop the loader: d_step decides with the other ranks at which step
    /// to stop, then closes its input, which stops the loader.
    pub(crate) fn should_stop(&self, ctx: &StageContext) -> bool {
        self.done() || (ctx.draining() && self.shard.world <= 1)
    }

    /// Convert `pixels` (NCHW u8, `shape.iter().product()` values) and send them as one batch
    /// of epoch `epoch` ending at position `next_pos` of that epoch's order (see
    /// [`HostBatch::next_pos`]). Returns [`Flow::Stop`] when the loader should stop.
    pub(crate) fn emit(&mut self, ctx: &StageContext, epoch: u32, next_pos: u64, shape: [usize; 4], pixels: &[u8]) -> Flow {
        if self.should_stop(ctx) {
            return Flow::Stop;
        }
        debug_assert_eq!(pixels.len(), shape.iter().product::<usize>());
        let Some(mine) = self.shard.slice(shape[0]) else {
            // A short batch that does not split over the ranks: every rank skips it alike.
            return Flow::Continue;
        };
        let len = shape[1] * shape[2] * shape[3];
        let pixels = &pixels[mine.start * len..mine.end * len];
        let shape = [mine.len(), shape[1], shape[2], shape[3]];
        let batch = HostBatch { index: self.next_index, epoch, next_pos, shape, x: pixels_to_unit(pixels), x_hat: None };
        if ctx.send(Item::Batch(batch)) == Sent::Closed {
            return Flow::Stop;
        }
        self.next_index += 1;
        if self.should_stop(ctx) {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }
}

/// Helpers for the loader unit tests: run a stage on a thread with a hand-made context.
#[cfg(test)]
pub(crate) mod test_util {
    use super::DataPosition;
    use crate::core::item::{HostBatch, Item};
    use crate::core::stage::{Bus, BusMessage, Stage, StageContext, StageError};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// What a stage run produced.
    pub struct RunOutput {
        pub batches: Vec<HostBatch>,
        pub warnings: Vec<String>,
        pub result: Result<(), StageError>,
    }

    /// Run `stage` to completion, collecting every batch and every bus warning.
    pub fn run_stage(stage: Box<dyn Stage>) -> RunOutput {
        run_stage_taking(stage, usize::MAX)
    }

    /// Run `stage`, but drop the output receiver after `take` items (downstream goes away).
    pub fn run_stage_taking(stage: Box<dyn Stage>, take: usize) -> RunOutput {
        let (tx, rx) = crossbeam_channel::bounded(4);
        let (btx, brx) = crossbeam_channel::unbounded();
        let ctx = StageContext {
            name: "loader".into(),
            input: None,
            outputs: vec![tx],
            bus: Bus::new(btx, "loader"),
            abort: Arc::new(AtomicBool::new(false)),
            drain: Arc::new(AtomicBool::new(false)),
            stats: Default::default(),
            panic_after: None,
            records: None,
        };
        let handle = std::thread::spawn(move || stage.run(ctx));
        let mut batches = Vec::new();
        while batches.len() < take {
            match rx.recv() {
                Ok(Item::Batch(b)) => batches.push(b),
                Ok(other) => panic!("unexpected item {}", other.kind()),
                Err(_) => break,
            }
        }
        drop(rx);
        let result = handle.join().expect("stage thread panicked");
        let warnings = brx
            .try_iter()
            .filter_map(|m| match m {
                BusMessage::Warning { msg, .. } => Some(msg),
                _ => None,
            })
            .collect();
        RunOutput { batches, warnings, result }
    }

    /// The resume property: for every batch k of the uninterrupted run `full` (which must have
    /// started at the default position), a run started at `full[k].position_after()` gives
    /// exactly `full[k + 1..]`. `run_from` runs the loader from a position. Returns how many
    /// resumed runs started exactly at the end of an epoch.
    pub fn assert_resumes_exactly(full: &[HostBatch], n: u64, run_from: impl Fn(DataPosition) -> RunOutput) -> usize {
        assert!(!full.is_empty());
        let again = run_from(DataPosition::default());
        again.result.unwrap();
        assert!(again.batches == full, "a run from the default position differs from the full run");
        let mut at_epoch_end = 0;
        for (k, b) in full.iter().enumerate() {
            let start = b.position_after();
            assert_eq!(start, DataPosition { next_index: b.index + 1, epoch: b.epoch, pos: b.next_pos });
            assert!(b.next_pos <= n, "batch {k}: next_pos {} > {n}", b.next_pos);
            at_epoch_end += usize::from(b.next_pos == n);
            let out = run_from(start);
            if let Err(e) = out.result {
                panic!("resumed after batch {k} ({start:?}): {e}");
            }
            let rest = &full[k + 1..];
            let got: Vec<_> = out.batches.iter().map(|b| (b.index, b.epoch, b.next_pos, b.shape)).collect();
            let want: Vec<_> = rest.iter().map(|b| (b.index, b.epoch, b.next_pos, b.shape)).collect();
            assert_eq!(got, want, "resumed after batch {k} ({start:?})");
            for (g, w) in out.batches.iter().zip(rest) {
                assert!(g == w, "resumed after batch {k} ({start:?}): batch {} differs in its values", w.index);
            }
        }
        at_epoch_end
    }
}

/// Problems every loader checks (`stage`, its name, goes in the hint): a batch of 0, `epochs: 0`,
/// and a `root` that is not a folder (relative paths are taken from the current folder).
pub fn common_problems(stage: &str, root: &std::path::Path, batch: usize, epochs: Option<u32>) -> Vec<crate::core::problem::Problem> {
    use crate::core::problem::Problem;
    let mut v = vec![];
    if batch == 0 {
        v.push(Problem::new("batch", "batch must be ≥ 1"));
    }
    if epochs == Some(0) {
        v.push(Problem::new("epochs", "epochs is 0: nothing would be trained (use a number ≥ 1, or None for no limit)"));
    }
    if !root.as_os_str().is_empty() && !root.is_dir() {
        let hint = if root.is_relative() {
            let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
            format!(
                " (relative to the current folder {cwd}: run pipe from the project folder, or set an absolute path with --set {}.root=PATH)",
                stage
            )
        } else {
            String::new()
        };
        v.push(Problem::new("root", format!("root {} is not a folder{hint}", root.display())));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_deterministic_and_differs_between_epochs() {
        let a0 = epoch_order(100, 7, 0, true);
        let b0 = epoch_order(100, 7, 0, true);
        assert_eq!(a0, b0);
        let a1 = epoch_order(100, 7, 1, true);
        assert_ne!(a0, a1);
        let other_seed = epoch_order(100, 8, 0, true);
        assert_ne!(a0, other_seed);
        let mut sorted = a1.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(epoch_order(5, 7, 3, false), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn pixels_map_to_unit_range() {
        assert_eq!(pixels_to_unit(&[0, 255]), vec![-1.0, 1.0]);
        let mid = pixels_to_unit(&[127, 128]);
        assert!(mid[0] < 0.0 && mid[1] > 0.0);
    }

    #[test]
    fn check_batch_rejects_too_few_images() {
        let p = std::path::Path::new("/data/x");
        assert!(check_batch(p, 10, 4, true).is_ok());
        assert!(check_batch(p, 3, 4, false).is_ok());
        let e = check_batch(p, 3, 4, true).unwrap_err().to_string();
        assert!(e.contains("/data/x") && e.contains("only 3 images"), "{e}");
        assert!(check_batch(p, 3, 0, false).is_err());
    }
}
