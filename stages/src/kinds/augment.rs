//! The `augment` stage: optional random horizontal flip, then the DRAGAN perturbation x̂.
//!
//! Input: `Item::Batch` (x `[B, C, H, W]` f32 in [-1, 1]). Output: the same batch, flipped
//! where drawn, with `x_hat` filled when `perturb` is `Dragan(..)`. Host memory only.
//! Randomness comes from a generator seeded by (pipeline seed, batch index), so results do not
//! depend on thread timing.

use crate::train::dragan::{perturb, Perturb};
use crate::core::item::{HostBatch, Item};
use crate::core::ports::{ItemKind, Ports};
use crate::core::problem::Problem;
use crate::kinds::{BuildContext, CheckContext};
use crate::core::stage::{Sent, Stage, StageContext, StageError};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

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
}

impl Augment {
    /// Build the stage. Errors on a negative perturbation scale `c`.
    pub fn build(cfg: &AugmentConfig, seed: u64) -> Result<Self, StageError> {
        cfg.validate()?;
        Ok(Augment { cfg: cfg.clone(), seed })
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

/// Apply the stage's transformation to one batch (public for tests and benchmarks).
pub fn apply(cfg: &AugmentConfig, seed: u64, b: &mut crate::core::item::HostBatch) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xA55A_0000_0000_0000 ^ b.index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let n = b.shape[0];
    if cfg.flip {
        for i in 0..n {
            if rng.random::<bool>() {
                flip_lr(&mut b.x, b.shape, i);
            }
        }
    }
    b.x_hat = match &cfg.perturb {
        PerturbMode::Off => None,
        PerturbMode::Dragan(p) => Some(perturb(&b.x, n, p, &mut rng)),
    };
}

impl Stage for Augment {
    fn run(self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        if self.cfg.workers <= 1 {
            while let Some(item) = ctx.recv() {
                let Item::Batch(mut b) = item else {
                    return Err(StageError::msg(format!("augment expects batches of real images, got `{}`", item.kind())));
                };
                apply(&self.cfg, self.seed, &mut b);
                if ctx.send(Item::Batch(b)) == Sent::Closed {
                    break;
                }
            }
            return Ok(());
        }
        // Workers take batches as they come and hand them back tagged with their arrival
        // number; they leave in that order.
        let n = self.cfg.workers;
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<(u64, HostBatch)>(n);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<(u64, HostBatch)>(n);
        std::thread::scope(|scope| {
            for _ in 0..n {
                let (jobs_rx, done_tx, cfg, seed) = (jobs_rx.clone(), done_tx.clone(), &self.cfg, self.seed);
                scope.spawn(move || {
                    while let Ok((k, mut b)) = jobs_rx.recv() {
                        apply(cfg, seed, &mut b);
                        if done_tx.send((k, b)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(done_tx);
            let mut ahead = std::collections::BTreeMap::new();
            let (mut sent, mut taken) = (0u64, 0u64);
            let mut input_open = true;
            let mut result = Ok(());
            let mut closed = false;
            while !closed && (input_open || sent < taken) {
                // Keep up to n batches in the workers' hands.
                if input_open && taken - sent < n as u64 {
                    match ctx.recv() {
                        Some(Item::Batch(b)) => {
                            let _ = jobs_tx.send((taken, b));
                            taken += 1;
                            continue;
                        }
                        Some(other) => {
                            result = Err(StageError::msg(format!("augment expects batches of real images, got `{}`", other.kind())));
                            break;
                        }
                        None => input_open = false,
                    }
                }
                if sent == taken {
                    continue;
                }
                let Ok((k, b)) = done_rx.recv() else { break };
                ahead.insert(k, b);
                while let Some(b) = ahead.remove(&sent) {
                    sent += 1;
                    if ctx.send(Item::Batch(b)) == Sent::Closed {
                        closed = true;
                        break;
                    }
                }
            }
            drop(jobs_tx);
            result
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
        Ok(Box::new(Augment::build(&c, cx.seed)?))
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
