//! The `augment` stage: optional random horizontal flip, then the DRAGAN perturbation x̂.
//!
//! Input: `Item::Batch` (x `[B, C, H, W]` f32 in [-1, 1]). Output: the same batch, flipped
//! where drawn, with `x_hat` filled when `perturb` is `Dragan(..)`. Host memory only.
//! Randomness comes from generators seeded by (pipeline seed, batch index, image's position in
//! the global batch), so results depend neither on thread timing nor on how a data-parallel
//! run splits the batch over its ranks.
//!
//! In a data-parallel run, σ is measured on the global batch: each rank adds up its share's
//! [`sigma_sums`] and the ranks all-reduce them (on the run's "host" process group, in batch
//! order), so that 2 ranks × 32 images draw the same x̂ as 1 rank × 64.

use crate::dist::ProcessGroup;
use crate::train::dragan::{perturb_sample, sigma_from_sums, sigma_sums, Perturb};
use crate::core::item::{HostBatch, Item};
use crate::core::ports::{ItemKind, Ports};
use crate::core::problem::Problem;
use crate::kinds::{BuildContext, CheckContext};
use crate::core::stage::{Sent, Stage, StageContext, StageError};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Whether and how to draw DRAGAN points x̂ near each real batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum PerturbMode {
    /// No x̂ (for WGAN-GP, which draws its own, or no penalty).
    Off,
    /// DRAGAN's x̂ (Kodali et al. 2017): x_p = x + c·σ·u, x̂ = x + α(x_p − x).
    Dragan(Perturb),
}

/// Settings of the `augment` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Flip each image left–right with probability 1/2. Default false.
    pub flip: bool,
    /// DRAGAN perturbation. Default `Dragan(c: 0.5, sigma: Batch, noise: Uniform, interpolate: true)`.
    pub perturb: PerturbMode,
    /// Threads working on batches at once, 1 to 64 (default 2). Each batch's random draws
    /// depend only on the seed and its index, and batches leave in order, so the output is the
    /// same for any number of workers.
    pub workers: usize,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig { flip: false, perturb: PerturbMode::Dragan(Perturb::default()), workers: 2 }
    }
}

/// The running `augment` stage.
pub struct Augment {
    cfg: AugmentConfig,
    seed: u64,
    /// Data-parallel runs: the group σ's sums are all-reduced on (Gloo, host tensors), and this
    /// rank's place. None in a single process.
    group: Option<Arc<ProcessGroup>>,
    /// The length of σ's sums for this stage's images ([`sigma_sums`]).
    sums_len: usize,
}

impl Augment {
    /// Build the stage. Errors on a negative perturbation scale `c`.
    pub fn build(cfg: &AugmentConfig, seed: u64) -> Result<Self, StageError> {
        cfg.validate()?;
        Ok(Augment { cfg: cfg.clone(), seed, group: None, sums_len: 0 })
    }

    /// The same stage as one rank of a data-parallel run: σ over the global batch, measured with
    /// an all-reduce on `group` (a host group: Gloo), and each image's draws by its position in
    /// the global batch. `image_len`: C·H·W of the images.
    pub fn with_group(mut self, group: Option<Arc<ProcessGroup>>, image_len: usize) -> Self {
        self.group = group.filter(|g| g.world() > 1 && matches!(self.cfg.perturb, PerturbMode::Dragan(_)));
        self.sums_len = match &self.cfg.perturb {
            PerturbMode::Dragan(p) if p.sigma == crate::train::dragan::Sigma::Pixel => 2 * image_len + 1,
            _ => 3,
        };
        self
    }
}

impl AugmentConfig {
    /// Check the values: the perturbation scale `c` must be finite and ≥ 0.
    pub fn problems(&self) -> Vec<Problem> {
        let mut errs = vec![];
        if !(1..=64).contains(&self.workers) {
            errs.push(Problem::new("workers", format!("workers is {}, expected 1 to 64 threads", self.workers)));
        }
        if let PerturbMode::Dragan(p) = &self.perturb {
            if !(p.c >= 0.0 && p.c.is_finite()) {
                errs.push(Problem::new("perturb.c", format!("perturb c must be a finite number ≥ 0, got {}", p.c)));
            }
        }
        errs
    }

    /// [`Self::problems`] as one result: every message, one per line.
    pub fn validate(&self) -> Result<(), crate::core::problem::Problems> {
        crate::core::problem::to_result(self.problems())
    }
}

/// Flip image `i` of an NCHW buffer left–right, in place.
fn flip_lr(x: &mut [f32], shape: [usize; 4], i: usize) {
    let [_, c, h, w] = shape;
    let img = &mut x[i * c * h * w..(i + 1) * c * h * w];
    for row in img.chunks_mut(w) {
        row.reverse();
    }
    debug_assert_eq!(img.len(), c * h * w);
}

/// A generator for the draws of one image: `stream` 1 is its flip, 2 its DRAGAN point.
/// `pos` is the image's position in the global batch `index` (the same for any world size).
fn image_rng(seed: u64, index: u64, pos: u64, stream: u64) -> rand::rngs::StdRng {
    // splitmix64's finaliser, chained over the four numbers.
    let mix = |h: u64, v: u64| {
        let mut z = (h ^ v).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    rand::rngs::StdRng::seed_from_u64(mix(mix(mix(mix(0xA55A, seed), index), pos), stream))
}

/// First half of the stage's work on one batch: the flips, drawn per image; then the sums σ is
/// measured from ([`sigma_sums`], on the flipped images: flips move values between positions,
/// which matters to `Pixel`), or None when no x̂ is drawn. `first` is the position of the
/// batch's first image in the global batch (rank · B in a data-parallel run, else 0).
pub fn flip_and_sum(cfg: &AugmentConfig, seed: u64, first: usize, b: &mut HostBatch) -> Option<Vec<f64>> {
    let n = b.shape[0];
    if cfg.flip {
        for i in 0..n {
            if image_rng(seed, b.index, (first + i) as u64, 1).random::<bool>() {
                flip_lr(&mut b.x, b.shape, i);
            }
        }
    }
    match &cfg.perturb {
        PerturbMode::Off => None,
        PerturbMode::Dragan(p) => Some(sigma_sums(&b.x, n, p.sigma)),
    }
}

/// Second half: x̂ for every image, given σ's sums over the (global) batch, or none without
/// `perturb: Dragan`.
pub fn draw_x_hat(cfg: &AugmentConfig, seed: u64, first: usize, b: &mut HostBatch, sums: Option<&[f64]>) {
    b.x_hat = match (&cfg.perturb, sums) {
        (PerturbMode::Dragan(p), Some(sums)) => {
            let s = sigma_from_sums(sums, p.sigma);
            let len = b.x.len() / b.shape[0].max(1);
            let mut out = Vec::with_capacity(b.x.len());
            for (i, row) in b.x.chunks(len.max(1)).enumerate() {
                perturb_sample(row, p, &s, &mut image_rng(seed, b.index, (first + i) as u64, 2), &mut out);
            }
            Some(out)
        }
        _ => None,
    };
}

/// Apply the stage's transformation to one whole batch (a single process; public for tests and
/// benchmarks).
pub fn apply(cfg: &AugmentConfig, seed: u64, b: &mut HostBatch) {
    let sums = flip_and_sum(cfg, seed, 0, b);
    draw_x_hat(cfg, seed, 0, b, sums.as_deref());
}

/// σ's sums over the ranks, one all-reduce per batch in batch order, with an end protocol: the
/// last value of each all-reduce is 1 from a rank with a batch and 0 from a rank that ends, so
/// that no rank waits for a batch another rank will never send. Every rank issues the same
/// number of all-reduces: each batch's, and one more by a rank that ends first (none by a rank
/// that learns of the end from a batch's).
struct GlobalSums {
    group: Option<Arc<ProcessGroup>>,
    /// Another rank ended (or this one did): no more collectives.
    over: bool,
}

impl GlobalSums {
    /// The global sums of this batch's `local` ones; Ok(None) when another rank has ended.
    fn reduce(&mut self, local: Option<Vec<f64>>) -> Result<Option<Option<Vec<f64>>>, StageError> {
        let Some(g) = &self.group else { return Ok(Some(local)) };
        let Some(mut v) = local else { return Ok(Some(None)) };
        v.push(1.0);
        let t = tch::Tensor::from_slice(&v);
        g.all_reduce_sum(&t).map_err(|e| StageError::msg(format!("measuring DRAGAN's σ over {} ranks: {e}", g.world())))?;
        let mut out = vec![0f64; v.len()];
        t.f_copy_data(&mut out, v.len()).map_err(crate::train::TrainError::from)?;
        if out.pop() != Some(g.world() as f64) {
            self.over = true;
            return Ok(None);
        }
        Ok(Some(Some(out)))
    }

    /// This rank ends: tell the others (once), unless one already ended. `len`: the length of
    /// this stage's sums (the same on every rank). Errors are left alone: the others may be gone.
    fn end(&mut self, len: usize) {
        if let (Some(g), false) = (&self.group, self.over) {
            let _ = g.all_reduce_sum(&tch::Tensor::zeros([len as i64 + 1], (tch::Kind::Double, tch::Device::Cpu)));
        }
        self.over = true;
    }
}

impl Stage for Augment {
    fn run(self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        let mut global = GlobalSums { group: self.group.clone(), over: false };
        let result = self.serve(&ctx, &mut global);
        global.end(self.sums_len);
        result
    }
}

/// A batch between the two halves of the work: its arrival number, the batch, and σ's global
/// sums.
type Job = (u64, HostBatch, Option<Vec<f64>>);

impl Augment {
    fn serve(&self, ctx: &StageContext, global: &mut GlobalSums) -> Result<(), StageError> {
        let rank = self.group.as_ref().map_or(0, |g| g.rank());
        // The flips and σ's sums run here, in batch order (the all-reduce must be issued in the
        // same order on every rank); x̂, the costly part, on the workers.
        let mut prepare = |item: Item| -> Result<Option<(HostBatch, usize, Option<Vec<f64>>)>, StageError> {
            let Item::Batch(mut b) = item else {
                return Err(StageError::msg(format!("augment expects batches of real images, got `{}`", item.kind())));
            };
            let first = rank * b.shape[0];
            let local = flip_and_sum(&self.cfg, self.seed, first, &mut b);
            Ok(global.reduce(local)?.map(|sums| (b, first, sums)))
        };
        if self.cfg.workers <= 1 {
            while let Some(item) = ctx.recv() {
                let Some((mut b, first, sums)) = prepare(item)? else { break };
                draw_x_hat(&self.cfg, self.seed, first, &mut b, sums.as_deref());
                if ctx.send(Item::Batch(b)) == Sent::Closed {
                    break;
                }
            }
            return Ok(());
        }
        // Workers take batches as they come and hand them back tagged with their arrival
        // number; a sender thread passes them on in that order. The sender is a thread of its
        // own so that finished batches keep flowing to d_step while this thread waits in σ's
        // all-reduce: d_step may need one of them before the other ranks can take part in it
        // (waiting here with them in hand deadlocked two ranks).
        let n = self.cfg.workers;
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<(Job, usize)>(n);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<(u64, HostBatch)>(n);
        let closed = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..n {
                let (jobs_rx, done_tx, cfg, seed) = (jobs_rx.clone(), done_tx.clone(), &self.cfg, self.seed);
                scope.spawn(move || {
                    while let Ok(((k, mut b, sums), first)) = jobs_rx.recv() {
                        draw_x_hat(cfg, seed, first, &mut b, sums.as_deref());
                        if done_tx.send((k, b)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop((done_tx, jobs_rx));
            let closed = &closed;
            scope.spawn(move || {
                let mut ahead = std::collections::BTreeMap::new();
                let mut sent = 0u64;
                while let Ok((k, b)) = done_rx.recv() {
                    ahead.insert(k, b);
                    while let Some(b) = ahead.remove(&sent) {
                        sent += 1;
                        if ctx.send(Item::Batch(b)) == Sent::Closed {
                            // Dropping done_rx stops the workers, then this stage's input loop.
                            closed.store(true, std::sync::atomic::Ordering::SeqCst);
                            return;
                        }
                    }
                }
            });
            // Owned here, so that leaving (an error too) closes the workers' queue.
            let jobs_tx = jobs_tx;
            let mut taken = 0u64;
            while !closed.load(std::sync::atomic::Ordering::SeqCst) {
                match ctx.recv().map(&mut prepare) {
                    Some(Ok(Some((b, first, sums)))) => {
                        if jobs_tx.send(((taken, b, sums), first)).is_err() {
                            break;
                        }
                        taken += 1;
                    }
                    // Another rank ended: what is in the workers' hands still goes out.
                    Some(Ok(None)) | None => break,
                    Some(Err(e)) => return Err(e),
                }
            }
            Ok(())
        })
    }
}

impl crate::kinds::Kind for AugmentConfig {
    const NAME: &'static str = "Augment";
    const PORTS: Ports = Ports::filter(
        (ItemKind::Batch, "batch[B,C,H,W] f32 in [-1, 1] on cpu"),
        (ItemKind::Batch, "batch[B,C,H,W] f32 in [-1, 1] on cpu, with x̂ (same shape) when perturb is Dragan(..)"),
    );

    fn validate(&self, _cx: &CheckContext<'_>) -> Vec<Problem> {
        self.problems()
    }

    fn adds_xhat(&self) -> bool {
        matches!(self.perturb, PerturbMode::Dragan(_))
    }

    /// x̂ is only read by d_step's DRAGAN penalty: with another penalty it is not drawn (with
    /// a note saying so).
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Box<dyn Stage>, StageError> {
        use crate::kinds::d_step::Penalty;
        let mut c = self.clone();
        let penalty = cx.training.as_ref().map(|t| t.d_penalty.clone());
        if matches!(c.perturb, PerturbMode::Dragan(_)) && penalty.as_ref().is_some_and(|p| !matches!(p, Penalty::Dragan(_))) {
            (cx.note)(format!(
                "note: stage `{}`: perturb Dragan(..) is not drawn: d_step's penalty is {}, which does not use x̂",
                cx.stage,
                match penalty {
                    Some(Penalty::WganGp(_)) => "WganGp (it interpolates real and generated samples itself)",
                    _ => "None",
                }
            ));
            c.perturb = PerturbMode::Off;
        }
        let image_len = cx.image.iter().product();
        Ok(Box::new(Augment::build(&c, cx.seed)?.with_group(cx.run.host_group.clone(), image_len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::item::HostBatch;

    fn batch(index: u64) -> HostBatch {
        // 2 images, 1 channel, 2×3: rows [0 1 2] [3 4 5] and [6 7 8] [9 10 11], scaled to [-1,1].
        let x = (0..12).map(|v| v as f32 / 11.0 * 2.0 - 1.0).collect();
        HostBatch { index, epoch: 0, next_pos: 2 * (index + 1), shape: [2, 1, 2, 3], x, x_hat: None }
    }

    #[test]
    fn flip_reverses_rows_only() {
        let mut b = batch(0);
        flip_lr(&mut b.x, b.shape, 1);
        let orig = batch(0).x;
        assert_eq!(&b.x[..6], &orig[..6]);
        assert_eq!(&b.x[6..9], &[orig[8], orig[7], orig[6]]);
        assert_eq!(&b.x[9..12], &[orig[11], orig[10], orig[9]]);
    }

    #[test]
    fn off_by_default_flip_and_perturb_default_fill_x_hat() {
        let cfg = AugmentConfig::default();
        assert!(!cfg.flip);
        let mut b = batch(3);
        apply(&cfg, 42, &mut b);
        assert_eq!(b.x, batch(3).x, "no flip by default");
        let xh = b.x_hat.expect("x_hat filled");
        assert_eq!(xh.len(), 12);
        assert!(xh.iter().zip(&b.x).all(|(h, x)| h >= x), "one-sided noise moves x̂ up");
        let mut off = batch(3);
        apply(&AugmentConfig { flip: false, perturb: PerturbMode::Off, workers: 1 }, 42, &mut off);
        assert!(off.x_hat.is_none());
    }

    #[test]
    fn same_seed_and_index_give_the_same_draws() {
        let cfg = AugmentConfig { flip: true, ..Default::default() };
        let (mut a, mut b, mut c) = (batch(5), batch(5), batch(6));
        apply(&cfg, 1, &mut a);
        apply(&cfg, 1, &mut b);
        apply(&cfg, 1, &mut c);
        assert_eq!(a, b);
        assert_ne!(a.x_hat, c.x_hat);
        // Only x and x_hat change: the batch keeps its place in the data stream.
        let before = batch(5);
        assert_eq!((a.index, a.epoch, a.next_pos, a.shape), (before.index, before.epoch, before.next_pos, before.shape));
        assert_eq!(a.position_after(), before.position_after());
    }

    #[test]
    fn a_batch_split_over_ranks_gets_the_draws_of_the_whole() {
        use crate::train::dragan::Sigma;
        let x: Vec<f32> = (0..8 * 6).map(|v| ((v * 37) % 23) as f32 / 11.5 - 1.0).collect();
        let whole = HostBatch { index: 4, epoch: 0, next_pos: 8, shape: [8, 1, 2, 3], x: x.clone(), x_hat: None };
        for sigma in [Sigma::Batch, Sigma::Pixel] {
            let cfg = AugmentConfig { flip: true, perturb: PerturbMode::Dragan(Perturb { sigma, ..Default::default() }), workers: 1 };
            let mut one = whole.clone();
            apply(&cfg, 7, &mut one);
            // Two "ranks" of 4: each flips its own images and adds its sums; the sums are added
            // (the all-reduce); each draws x̂ for its own images.
            let mut halves: Vec<HostBatch> = (0..2)
                .map(|r| HostBatch { shape: [4, 1, 2, 3], x: x[r * 24..(r + 1) * 24].to_vec(), ..whole.clone() })
                .collect();
            let sums: Vec<Vec<f64>> = halves.iter_mut().enumerate().map(|(r, b)| flip_and_sum(&cfg, 7, 4 * r, b).unwrap()).collect();
            let total: Vec<f64> = sums[0].iter().zip(&sums[1]).map(|(a, b)| a + b).collect();
            for (r, b) in halves.iter_mut().enumerate() {
                draw_x_hat(&cfg, 7, 4 * r, b, Some(&total));
            }
            let joined_x: Vec<f32> = halves.iter().flat_map(|b| b.x.clone()).collect();
            let joined_h: Vec<f32> = halves.iter().flat_map(|b| b.x_hat.clone().unwrap()).collect();
            assert_eq!(joined_x, one.x, "{sigma:?}: the flips");
            assert_ne!(one.x, x, "some image was flipped");
            let h = one.x_hat.unwrap();
            for (a, b) in joined_h.iter().zip(&h) {
                assert!((a - b).abs() <= 1e-6, "{sigma:?}: x̂ {a} vs {b}");
            }
        }
    }

    /// Run the stage on `batches` (of varying cost) and collect what it sends.
    fn run_with(workers: usize, batches: &[HostBatch]) -> Vec<HostBatch> {
        use crate::core::stage::Bus;
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let (tx, rx) = crossbeam_channel::unbounded();
        let (otx, orx) = crossbeam_channel::unbounded();
        let (btx, _brx) = crossbeam_channel::unbounded();
        for b in batches {
            tx.send(Item::Batch(b.clone())).unwrap();
        }
        drop(tx);
        let ctx = StageContext {
            name: "augment".into(),
            input: Some(rx),
            outputs: vec![otx],
            bus: Bus::new(btx, "augment"),
            abort: Arc::new(AtomicBool::new(false)),
            drain: Arc::new(AtomicBool::new(false)),
            stats: Default::default(),
            panic_after: None,
            records: None,
        };
        let cfg = AugmentConfig { flip: true, workers, ..Default::default() };
        Box::new(Augment::build(&cfg, 9).unwrap()).run(ctx).unwrap();
        orx.try_iter()
            .map(|i| match i {
                Item::Batch(b) => b,
                other => panic!("{}", other.kind()),
            })
            .collect()
    }

    #[test]
    fn workers_give_the_same_batches_in_the_same_order() {
        // Batches of very different sizes, so that workers finish out of order.
        let batches: Vec<HostBatch> = (0..23u64)
            .map(|i| {
                let n = if i % 3 == 0 { 400 } else { 1 };
                let x: Vec<f32> = (0..n * 12).map(|v| ((v as u64 * 7 + i) % 19) as f32 / 9.0 - 1.0).collect();
                HostBatch { index: i, epoch: 0, next_pos: i + 1, shape: [n as usize, 1, 3, 4], x, x_hat: None }
            })
            .collect();
        let serial = run_with(1, &batches);
        assert_eq!(serial.len(), 23);
        assert!(serial.iter().all(|b| b.x_hat.is_some()));
        for w in [2, 3, 8] {
            assert_eq!(run_with(w, &batches), serial, "{w} workers");
        }
        assert!(AugmentConfig { workers: 0, ..Default::default() }.validate().unwrap_err().to_string().contains("workers is 0"));
    }
}
