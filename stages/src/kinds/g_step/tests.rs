//! Tests of the parent module.

use super::*;
use crate::train::models::{DModel, MlpConfig};
use crate::train::build_models;

#[test]
fn slerp_keeps_endpoints_norm_and_halves_the_angle() {
    let a = [3.0f32, 0.0, 0.0];
    let b = [0.0f32, 3.0, 0.0];
    assert_eq!(slerp(&a, &b, 0.0), a.to_vec());
    let end = slerp(&a, &b, 1.0);
    assert!(end.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6), "{end:?}");
    let mid = slerp(&a, &b, 0.5);
    // On the circle of radius 3, at 45°: (3/√2, 3/√2, 0).
    let h = 3.0 / 2f32.sqrt();
    assert!((mid[0] - h).abs() < 1e-5 && (mid[1] - h).abs() < 1e-5 && mid[2].abs() < 1e-6, "{mid:?}");
    // Parallel latents fall back to a straight line.
    assert_eq!(slerp(&[1.0, 1.0], &[2.0, 2.0], 0.5), vec![1.5, 1.5]);
}

#[test]
fn ema_copies_before_start_then_averages() {
    let m = MlpConfig { hidden: 4, layers: 1, batch_norm: false };
    let (_d, side) = build_models(&GModel::Mlp(m.clone()), &DModel::Mlp(m.clone()), 3, [1, 2, 2], tch::Device::Cpu).unwrap();
    let mut ema = Ema::new(&EmaConfig { decay: 0.75, start: 2 }, &GModel::Mlp(m), &side).unwrap();
    let set_g = |v: f64| {
        for (_, mut t) in side.g_vs.variables() {
            tch::no_grad(|| {
                let _ = t.fill_(v);
            });
        }
    };
    let ema_w = |ema: &Ema| ema.vs.variables()["out.weight"].double_value(&[0, 0]);
    set_g(1.0);
    ema.update(1).unwrap(); // before start: a copy
    assert_eq!(ema_w(&ema), 1.0);
    set_g(3.0);
    ema.update(2).unwrap(); // 0.75·1 + 0.25·3
    assert!((ema_w(&ema) - 1.5).abs() < 1e-6);
    ema.update(3).unwrap(); // 0.75·1.5 + 0.25·3
    assert!((ema_w(&ema) - 1.875).abs() < 1e-6);
    // The EMA's variables are its own (not G's) and frozen.
    assert!(ema.vs.variables().values().all(|t| !t.requires_grad()));
    assert_eq!(side.g_vs.variables()["out.weight"].double_value(&[0, 0]), 3.0);
}
