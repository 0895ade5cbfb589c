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

#[test]
fn the_device_record_names_the_first_non_finite_step_without_reading_back_each_update() {
    // The GPU path of `on_nonfinite: Stop`, run on the CPU: the first bad step is kept in a
    // device tensor, in place (capturable), and read only by `verify`.
    let run = RunSettings::new(Device::Cpu, None, 1, 0);
    let mut guard = FiniteGuard::new(&run, "d_step").record_on_device();
    let vs = nn::VarStore::new(Device::Cpu);
    let mut opt = Optimizer::default().build(&vs).unwrap();
    for (step, v) in [(1, 0.5), (2, 1.0), (3, f64::NAN), (4, f64::INFINITY), (5, 2.0)] {
        guard.begin(step, Device::Cpu).unwrap();
        let loss = Tensor::from(v as f32);
        // No error at the bad step itself: nothing is read back.
        assert_eq!(guard.check(&loss, &mut opt, step, "discriminator loss").unwrap(), Verdict::Step);
        if step == 2 {
            guard.verify("discriminator loss").unwrap();
        }
    }
    let e = guard.verify("discriminator loss").unwrap_err().to_string();
    assert!(e.starts_with("step 3: non-finite discriminator loss: lower the learning rate"), "{e}");
    // Without the device record (the CPU path), the bad step stops at once, with its value.
    let mut cpu = FiniteGuard::new(&run, "d_step");
    cpu.begin(7, Device::Cpu).unwrap();
    let e = cpu.check(&Tensor::from(f32::NAN), &mut opt, 7, "generator loss").unwrap_err().to_string();
    assert!(e.starts_with("step 7: non-finite generator loss (NaN)"), "{e}");
}

#[test]
fn the_test_hook_poisons_only_its_steps_and_leaves_others_bit_identical() {
    let mut run = RunSettings::new(Device::Cpu, None, 1, 0);
    run.inject_nonfinite = Some(("g_step".into(), 3, false));
    let mut guard = FiniteGuard::new(&run, "g_step");
    let loss = Tensor::from(1.2345f32);
    for (step, nan) in [(2, false), (3, true), (4, false)] {
        guard.begin(step, Device::Cpu).unwrap();
        let v = guard.maybe_poison(loss.shallow_clone()).double_value(&[]);
        assert_eq!(v.is_nan(), nan, "step {step}");
        if !nan {
            assert_eq!(v, 1.2345f32 as f64);
        }
    }
}

#[test]
fn channels_last_models_compute_what_contiguous_ones_do() {
    if !crate::test_util::alone("train::tests::channels_last_models_compute_what_contiguous_ones_do") {
        return;
    }
    // DCGAN G and D with every 4-D weight laid out channels_last (memory_format ChannelsLast);
    // the views alias the same storage, and outputs match the contiguous models.
    let (g_cfg, d_cfg) = (GModel::Dcgan(Default::default()), DModel::Dcgan(Default::default()));
    tch::manual_seed(1);
    let (d_cl, g_cl) = build_models_laid_out(&g_cfg, &d_cfg, 8, [3, 16, 16], Device::Cpu, true).unwrap();
    tch::manual_seed(1);
    let (d_c, g_c) = build_models(&g_cfg, &d_cfg, 8, [3, 16, 16], Device::Cpu).unwrap();
    let w = &d_cl.d_vs.variables()["conv0.weight"];
    assert!(crate::train::cuda::is_channels_last(w));
    assert!(!crate::train::cuda::is_channels_last(&d_c.d_vs.variables()["conv0.weight"]));
    assert!(crate::train::cuda::is_channels_last(&g_cl.d_view_vs.variables()["conv0.weight"]), "the view shares the layout");
    let z = Tensor::randn([4, 8], (tch::Kind::Float, Device::Cpu));
    let (a, b) = (g_cl.g.forward(&z, false), g_c.g.forward(&z, false));
    assert!((&a - &b).abs().max().double_value(&[]) < 1e-5);
    let (da, db) = (d_cl.d.forward(&a, true), d_c.d.forward(&b, true));
    assert!((&da - &db).abs().max().double_value(&[]) < 1e-4, "{da} {db}");
    // 1-D and 2-D variables keep their layout (biases, MLP weights).
    let (d_mlp, _) =
        build_models_laid_out(&GModel::Mlp(MlpConfig::default()), &DModel::Mlp(MlpConfig::default()), 4, [1, 4, 4], Device::Cpu, true)
            .unwrap();
    assert!(d_mlp.d_vs.variables().values().all(|t| t.is_contiguous()));
}

#[test]
fn bf16_autocast_switches_on_for_the_thread_and_back_off() {
    use crate::train::cuda::Bf16Autocast;
    assert!(!Bf16Autocast::active());
    {
        let _on = Bf16Autocast::on().unwrap();
        assert!(Bf16Autocast::active());
        // CUDA autocast leaves CPU arithmetic alone.
        let x = Tensor::randn([2, 3], (tch::Kind::Float, Device::Cpu));
        assert_eq!(x.matmul(&x.tr()).kind(), tch::Kind::Float);
        let other = std::thread::spawn(Bf16Autocast::active).join().unwrap();
        assert!(!other, "autocast is per thread");
    }
    assert!(!Bf16Autocast::active());
}
