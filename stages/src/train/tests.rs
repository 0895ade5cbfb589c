//! Tests of the parent module.

use super::*;
use crate::train::models::MlpConfig;

#[test]
fn clipping_bounds_every_weight_after_a_step_and_leaves_batch_norm_statistics() {
    // A DCGAN D with batch norm: weights start above c = 0.01 (bound 1/√48 ≈ 0.14), and the
    // running statistics (not weights) must stay as they are.
    let cfg = DModel::Dcgan(crate::train::models::DcganConfig { width: 4, batch_norm: Some(true) });
    let (ds, _) = build_models(&GModel::Dcgan(Default::default()), &cfg, 4, [3, 16, 16], Device::Cpu).unwrap();
    let mut opt = Optimizer::RmsProp(RmsPropConfig::default()).build(&ds.d_vs).unwrap();
    let x = Tensor::randn([5, 3, 16, 16], (tch::Kind::Float, Device::Cpu));
    opt.zero_grad();
    ds.d.forward(&x, true).mean(tch::Kind::Float).backward();
    opt.step().unwrap();
    let vars = ds.d_vs.variables();
    let var_before: Tensor = vars["bn1.running_var"].copy();
    assert!(vars["conv0.weight"].abs().max().double_value(&[]) > 0.05);
    opt.clip(0.01).unwrap();
    for (name, t) in &vars {
        let m = t.abs().max().double_value(&[]);
        if name.contains("running") || name.contains("num_batches") {
            continue;
        }
        assert!(m <= 0.01 + 1e-9, "{name}: max |w| {m}");
    }
    assert!((vars["conv0.weight"].abs().max().double_value(&[]) - 0.01).abs() < 1e-9, "the bound is reached");
    assert!(vars["bn1.running_var"].equal(&var_before), "running statistics are not clipped");
    // Values inside the bound are kept exactly.
    let small = vars["conv1.bias"].shallow_clone();
    let inside: Vec<f64> = (0..small.numel() as i64).map(|i| small.double_value(&[i])).collect();
    opt.clip(0.01).unwrap();
    assert_eq!(inside, (0..small.numel() as i64).map(|i| small.double_value(&[i])).collect::<Vec<_>>());
}

#[test]
fn views_alias_the_owner_weights_and_are_frozen() {
    let m = MlpConfig { hidden: 8, layers: 1, batch_norm: false };
    let (ds, gs) = build_models(&GModel::Mlp(m.clone()), &DModel::Mlp(m), 4, [1, 4, 4], Device::Cpu).unwrap();
    let own = gs.g_vs.variables();
    for (name, v) in ds.g_view_vs.variables() {
        assert!(!v.requires_grad(), "{name} in the view must be frozen");
        assert_eq!(v.data_ptr(), own[&name].data_ptr(), "{name} must share storage");
    }
    // An update of D is seen by the D view.
    let mut d_vars = ds.d_vs.variables();
    let w = d_vars.get_mut("out.weight").unwrap();
    tch::no_grad(|| {
        let _ = w.fill_(0.25);
    });
    assert_eq!(gs.d_view_vs.variables()["out.weight"].double_value(&[0, 0]), 0.25);
}

#[test]
fn optimizer_values_are_checked() {
    assert!(Optimizer::default().problems().is_empty());
    let bad = Optimizer::Adam(AdamConfig { lr: 0.0, ..Default::default() });
    assert!(crate::core::problem::to_result(bad.problems()).unwrap_err().to_string().contains("lr must be a finite number > 0, got 0"));
    // Every problem, one per line.
    let bad = Optimizer::Adam(AdamConfig { lr: -1.0, beta1: 2.0, eps: 0.0, ..Default::default() });
    assert_eq!(crate::core::problem::to_result(bad.problems()).unwrap_err().0.len(), 3);
    let bad = Optimizer::Adam(AdamConfig { beta2: 1.0, ..Default::default() });
    assert!(crate::core::problem::to_result(bad.problems()).unwrap_err().to_string().contains("beta2"));
}
