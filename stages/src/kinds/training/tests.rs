//! The step stages' static-buffer updates (the capturable form, see [`crate::train::step`])
//! against the plain update they replaced, written out here as it was: from the same state and
//! seed, 20 generator steps give the same weights, bit for bit, for DRAGAN, WGAN-GP and WGAN
//! (weight clipping with RMSProp). (The plain update runs D over the real and the fake batch
//! together, as d_step does: `Net::forward_two`, tested against two calls in `train::models`.)

use crate::core::item::HostBatch;
use crate::io::checkpoint::step_seed;
use crate::kinds::d_step::{ClipConfig, Constraint, DStep, DStepConfig, GpConfig, Penalty};
use crate::kinds::g_step::{GStep, GStepConfig};
use crate::train::dragan::{gradient_penalty, interpolate};
use crate::train::losses::Loss;
use crate::train::models::{DModel, GModel, MlpConfig};
use crate::train::{build_models, AdamConfig, DSide, GSide, Optim, Optimizer, RmsPropConfig, RunSettings};
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

const B: usize = 4;
const LATENT: i64 = 3;
const IMAGE: [i64; 3] = [1, 6, 6];
const SEED: u64 = 11;

fn mlp() -> MlpConfig {
    MlpConfig { hidden: 16, layers: 2, batch_norm: false }
}

/// Batches of random "real" images in [-1, 1], with x̂ = x + 0.1·u when `x_hat`.
fn batches(x_hat: bool) -> Vec<HostBatch> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let n = B * 36;
    (0..4)
        .map(|i| {
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let h = x_hat.then(|| x.iter().map(|v| v + 0.1 * rng.random::<f32>()).collect());
            HostBatch { index: i, epoch: 0, next_pos: 0, shape: [B, 1, 6, 6], x, x_hat: h }
        })
        .collect()
}

/// Today's D update, as d_step did it before the static buffers: draws, forward passes,
/// penalty, backward, CPU non-finite check, optimiser step, clipping.
fn plain_d_update(side: &DSide, opt: &mut Optim, cfg: &DStepConfig, b: &HostBatch, step: u64, k: u32) {
    let x = Tensor::from_slice(&b.x).view([B as i64, 1, 6, 6]);
    tch::manual_seed(step_seed(SEED, step, k));
    let z = Tensor::zeros([B as i64, LATENT], (Kind::Float, Device::Cpu)).normal_(0.0, 1.0);
    let fake = tch::no_grad(|| side.g_view.forward(&z, true));
    let d = &side.d;
    let (d_real, d_fake) = d.forward_two(&x, &fake, true).unwrap();
    let loss = cfg.loss.d_loss(&d_real, &d_fake, &x, &fake).unwrap();
    let penalty = match &cfg.penalty {
        Penalty::None => Tensor::zeros([], (Kind::Float, Device::Cpu)),
        Penalty::Dragan(g) => {
            let xh = Tensor::from_slice(b.x_hat.as_ref().unwrap()).view([B as i64, 1, 6, 6]);
            gradient_penalty(|t| d.forward(t, true), &xh, g.lambda, g.k).unwrap().0
        }
        Penalty::WganGp(g) => {
            let eps = Tensor::rand([B as i64], (Kind::Float, Device::Cpu));
            let xh = interpolate(&x, &fake, &eps).unwrap();
            gradient_penalty(|t| d.forward(t, true), &xh, g.lambda, g.k).unwrap().0
        }
    };
    let total = &loss + &penalty;
    opt.zero_grad();
    total.backward();
    assert!(total.double_value(&[]).is_finite());
    opt.step().unwrap();
    if let Constraint::Clip(c) = &cfg.constraint {
        opt.clip(c.c).unwrap();
    }
}

/// Today's G update.
fn plain_g_update(side: &GSide, opt: &mut Optim, d_loss: &Loss, step: u64) {
    tch::manual_seed(step_seed(SEED, step, u32::MAX));
    let z = Tensor::zeros([B as i64, LATENT], (Kind::Float, Device::Cpu)).normal_(0.0, 1.0);
    let fake = side.g.forward(&z, true);
    let loss = d_loss.generator_default().g_loss(&side.d_view.forward(&fake, true)).unwrap();
    opt.zero_grad();
    loss.backward();
    opt.step().unwrap();
}

/// Largest |a − b| over every variable of two stores with the same names.
fn max_diff(a: &tch::nn::VarStore, b: &tch::nn::VarStore) -> f64 {
    let (va, vb) = (a.variables(), b.variables());
    assert_eq!(va.len(), vb.len());
    va.iter().map(|(n, t)| (t - &vb[n]).abs().max().double_value(&[])).fold(0.0, f64::max)
}

fn same_training(d_cfg: DStepConfig, g_opt: Optimizer) {
    let g_cfg = GStepConfig { model: GModel::Mlp(mlp()), latent: LATENT, optimizer: g_opt, loss: None, ema: None };
    let with_x_hat = matches!(d_cfg.penalty, Penalty::Dragan(_));
    let data = batches(with_x_hat);
    tch::manual_seed(3);
    let (d_new, g_new) = build_models(&g_cfg.model, &d_cfg.model, LATENT, IMAGE, Device::Cpu).unwrap();
    tch::manual_seed(3);
    let (d_old, g_old) = build_models(&g_cfg.model, &d_cfg.model, LATENT, IMAGE, Device::Cpu).unwrap();
    assert_eq!(max_diff(&d_new.d_vs, &d_old.d_vs), 0.0);
    let (mut d_opt, mut g_opt_old) = (d_cfg.optimizer.build(&d_old.d_vs).unwrap(), g_cfg.optimizer.build(&g_old.g_vs).unwrap());

    let run = RunSettings::new(Device::Cpu, Some(20), 1, SEED);
    let (tx, rx) = crossbeam_channel::bounded(1);
    let mut d_step = DStep::build(&d_cfg, run.clone(), d_new, LATENT, rx, None).unwrap();
    let mut g_step = GStep::build(&g_cfg, &d_cfg.loss, run, g_new, tx, None, B as i64, None).unwrap();
    d_step.start("d_step");
    g_step.start("g_step");
    let mut next = 0;
    for step in 1..=20u64 {
        for k in 0..d_cfg.n_critic {
            let b = &data[next % data.len()];
            next += 1;
            d_step.load(b).unwrap();
            d_step.update(step, k).unwrap();
            plain_d_update(&d_old, &mut d_opt, &d_cfg, b, step, k);
        }
        g_step.update(step).unwrap();
        plain_g_update(&g_old, &mut g_opt_old, &d_cfg.loss, step);
    }
    let (dd, dg) = (max_diff(d_step.d_vars(), &d_old.d_vs), max_diff(g_step.g_vars(), &g_old.g_vs));
    assert_eq!((dd, dg), (0.0, 0.0), "{:?}: D differs by {dd}, G by {dg}", d_cfg.penalty);
    // And training moved the weights (the comparison is not of two untouched models).
    tch::manual_seed(3);
    let (d_init, _) = build_models(&g_cfg.model, &d_cfg.model, LATENT, IMAGE, Device::Cpu).unwrap();
    assert!(max_diff(&d_init.d_vs, &d_old.d_vs) > 1e-4);
}

#[test]
fn static_buffer_updates_train_exactly_as_the_plain_ones() {
    if !crate::test_util::alone("kinds::training::tests::static_buffer_updates_train_exactly_as_the_plain_ones") {
        return;
    }
    let adam = || Optimizer::Adam(AdamConfig { lr: 1e-3, ..AdamConfig::default() });
    // DRAGAN.
    same_training(
        DStepConfig { model: DModel::Mlp(mlp()), penalty: Penalty::Dragan(GpConfig::default()), optimizer: adam(), ..Default::default() },
        adam(),
    );
    // WGAN-GP: ε drawn into its buffer, n_critic 2.
    same_training(
        DStepConfig {
            model: DModel::Mlp(mlp()),
            loss: Loss::Wasserstein,
            penalty: Penalty::WganGp(GpConfig::default()),
            optimizer: adam(),
            n_critic: 2,
            ..Default::default()
        },
        adam(),
    );
    // WGAN: weight clipping, RMSProp, no penalty.
    let rms = || Optimizer::RmsProp(RmsPropConfig { lr: 5e-4, ..RmsPropConfig::default() });
    same_training(
        DStepConfig {
            model: DModel::Mlp(mlp()),
            loss: Loss::Wasserstein,
            penalty: Penalty::None,
            constraint: Constraint::Clip(ClipConfig { c: 0.05 }),
            optimizer: rms(),
            n_critic: 3,
        },
        rms(),
    );
}
