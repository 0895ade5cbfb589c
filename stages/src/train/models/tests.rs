//! Tests of the parent module.

use super::*;
use tch::{nn::VarStore, Device, Kind};

#[test]
fn value_counts_match_the_built_models() {
    let cases: Vec<(GModel, DModel, i64, [i64; 3])> = vec![
        (
            GModel::Mlp(MlpConfig { hidden: 7, layers: 2, batch_norm: false }),
            DModel::Mlp(MlpConfig { hidden: 5, layers: 0, batch_norm: false }),
            3,
            [1, 4, 4],
        ),
        (
            GModel::Dcgan(DcganConfig { width: 4, batch_norm: None }),
            DModel::Dcgan(DcganConfig { width: 3, batch_norm: None }),
            6,
            [3, 16, 16],
        ),
        (
            GModel::Dcgan(DcganConfig { width: 8, batch_norm: None }),
            DModel::Dcgan(DcganConfig { width: 8, batch_norm: None }),
            10,
            [1, 8, 8],
        ),
        // MLP with batch norm in G (and D, as a method without a penalty may have it).
        (
            GModel::Mlp(MlpConfig { hidden: 6, layers: 2, batch_norm: true }),
            DModel::Mlp(MlpConfig { hidden: 5, layers: 1, batch_norm: true }),
            3,
            [1, 4, 4],
        ),
        // InfoGAN-style at 28×28 (not a DCGAN size) and at a non-square 8×12.
        (GModel::InfoGan(InfoGanConfig { width: 4, hidden: 9 }), DModel::InfoGan(InfoGanConfig { width: 3, hidden: 7 }), 5, [1, 28, 28]),
        (GModel::InfoGan(InfoGanConfig { width: 2, hidden: 3 }), DModel::InfoGan(InfoGanConfig { width: 2, hidden: 3 }), 4, [3, 8, 12]),
        // Batch norm switched the other way in both.
        (
            GModel::Dcgan(DcganConfig { width: 4, batch_norm: Some(false) }),
            DModel::Dcgan(DcganConfig { width: 4, batch_norm: Some(true) }),
            6,
            [3, 32, 32],
        ),
    ];
    for (g, d, latent, img) in cases {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        build_g(&(vs.root() / "g"), &g, latent, img).unwrap();
        let vd = nn::VarStore::new(tch::Device::Cpu);
        build_d(&(vd.root() / "d"), &d, img).unwrap();
        let count = |vs: &nn::VarStore| vs.variables().values().map(|t| t.numel() as u64).sum::<u64>();
        assert_eq!(g_values(&g, latent, img), Some(count(&vs)), "{g:?}");
        assert_eq!(d_values(&d, img), Some(count(&vd)), "{d:?}");
        let bn = |vs: &nn::VarStore| vs.variables().keys().filter(|k| k.contains(".bn")).count();
        let g_bn = match &g {
            GModel::Dcgan(c) => c.batch_norm != Some(false),
            GModel::Mlp(m) => m.batch_norm,
            GModel::InfoGan(_) => true,
        };
        let d_bn = d.has_batch_norm();
        assert_eq!(bn(&vs) > 0, g_bn, "{g:?}");
        assert_eq!(bn(&vd) > 0, d_bn, "{d:?}");
    }
}

#[test]
fn shape_checks_name_what_each_architecture_takes() {
    assert!(check_shape(Arch::Mlp, [1, 28, 28]).is_ok());
    assert!(check_shape(Arch::Dcgan, [1, 28, 28]).unwrap_err().to_string().contains("28×28"));
    assert!(check_shape(Arch::InfoGan, [1, 28, 28]).is_ok());
    assert!(check_shape(Arch::InfoGan, [3, 32, 64]).is_ok());
    let e = check_shape(Arch::InfoGan, [1, 30, 28]).unwrap_err().to_string();
    assert!(e.contains("multiples of 4") && e.contains("30×28"), "{e}");
    assert!(GModel::InfoGan(InfoGanConfig { width: 0, hidden: 5 }).problems()[0].msg.contains("width"));
    assert!(DModel::Mlp(MlpConfig { batch_norm: true, ..Default::default() }).has_batch_norm());
    assert!(!DModel::InfoGan(InfoGanConfig::default()).has_batch_norm());
}

#[test]
fn infogan_matches_lucic_mnist_layout() {
    // Lucic et al. 2018, Table 3 (MNIST): G FC 1024, FC 7·7·128, deconv 64, deconv 1;
    // D conv 64, conv 128, FC 1024, FC 1.
    let vs = VarStore::new(Device::Cpu);
    build_g(&vs.root().sub("g"), &GModel::InfoGan(InfoGanConfig::default()), 62, [1, 28, 28]).unwrap();
    build_d(&vs.root().sub("d"), &DModel::InfoGan(InfoGanConfig::default()), [1, 28, 28]).unwrap();
    let vars = vs.variables();
    assert_eq!(vars["g.fc0.weight"].size(), vec![1024, 62]);
    assert_eq!(vars["g.fc1.weight"].size(), vec![7 * 7 * 128, 1024]);
    assert_eq!(vars["g.up0.weight"].size(), vec![128, 64, 4, 4]);
    assert_eq!(vars["g.up1.weight"].size(), vec![64, 1, 4, 4]);
    assert_eq!(vars["d.conv0.weight"].size(), vec![64, 1, 4, 4]);
    assert_eq!(vars["d.conv1.weight"].size(), vec![128, 64, 4, 4]);
    assert_eq!(vars["d.fc0.weight"].size(), vec![1024, 7 * 7 * 128]);
    assert_eq!(vars["d.out.weight"].size(), vec![1, 1024]);
}

#[test]
fn dcgan_depth_accepts_powers_of_two_times_four() {
    assert_eq!(dcgan_depth(64), Ok(4));
    assert_eq!(dcgan_depth(8), Ok(1));
    assert_eq!(dcgan_depth(32), Ok(3));
    let e = dcgan_depth(28).unwrap_err().to_string();
    assert!(e.contains("28×28"), "{e}");
    assert!(dcgan_depth(48).is_err());
}

#[test]
fn shapes_flow_through_every_architecture() {
    for (g, d, img) in [
        (
            GModel::Mlp(MlpConfig { hidden: 16, layers: 2, batch_norm: false }),
            DModel::Mlp(MlpConfig { hidden: 16, layers: 2, batch_norm: false }),
            [1i64, 28, 28],
        ),
        (GModel::Dcgan(DcganConfig { width: 4, batch_norm: None }), DModel::Dcgan(DcganConfig { width: 4, batch_norm: None }), [3, 64, 64]),
        (GModel::Dcgan(DcganConfig { width: 4, batch_norm: None }), DModel::Dcgan(DcganConfig { width: 4, batch_norm: None }), [1, 16, 16]),
        (
            GModel::Mlp(MlpConfig { hidden: 16, layers: 2, batch_norm: true }),
            DModel::Mlp(MlpConfig { hidden: 16, layers: 1, batch_norm: false }),
            [1, 28, 28],
        ),
        (GModel::InfoGan(InfoGanConfig { width: 4, hidden: 16 }), DModel::InfoGan(InfoGanConfig { width: 4, hidden: 16 }), [1, 28, 28]),
    ] {
        let vs = VarStore::new(Device::Cpu);
        let gn = build_g(&vs.root().sub("g"), &g, 8, img).unwrap();
        let dn = build_d(&vs.root().sub("d"), &d, img).unwrap();
        let z = Tensor::randn([5, 8], (Kind::Float, Device::Cpu));
        let x = gn.forward(&z, true);
        assert_eq!(x.size(), vec![5, img[0], img[1], img[2]]);
        assert!(x.abs().max().double_value(&[]) <= 1.0);
        assert_eq!(dn.forward(&x, true).size(), vec![5, 1]);
    }
}

#[test]
fn weights_follow_pytorch_default_bounds() {
    let vs = VarStore::new(Device::Cpu);
    build_d(&vs.root().sub("d"), &DModel::Dcgan(DcganConfig { width: 8, batch_norm: None }), [3, 16, 16]).unwrap();
    build_g(&vs.root().sub("g"), &GModel::Mlp(MlpConfig { hidden: 32, layers: 1, batch_norm: false }), 10, [1, 4, 4]).unwrap();
    let vars = vs.variables();
    // (name, fan_in): bound 1/√fan_in for weights and biases, and the draws fill most of it.
    // For n draws from U(−b, b), P(max |w| ≤ f·b) = fⁿ: the floor f = 1e-9^(1/n) makes a false
    // failure a one-in-a-billion event (f ≈ 0.07 for d.conv0.bias's 8 values, 0.95 for 384).
    for (name, fan_in) in
        [("d.conv0.weight", 3 * 16), ("d.conv0.bias", 3 * 16), ("d.conv1.weight", 8 * 16), ("g.fc0.weight", 10), ("g.out.bias", 32)]
    {
        let b = 1.0 / (fan_in as f64).sqrt();
        let m = vars[name].abs().max().double_value(&[]);
        let floor = b * 1e-9f64.powf(1.0 / vars[name].numel() as f64);
        assert!(m <= b + 1e-6 && m > floor, "{name}: max |w| {m}, bound {b}, floor {floor}");
    }
}

#[test]
fn dcgan_64_matches_reference_layout() {
    // Reference (shared/bench/ref_dragan.py): G 100→512→256→128→64→3, D 3→64→128→256→512→1.
    let vs = VarStore::new(Device::Cpu);
    build_g(&vs.root().sub("g"), &GModel::Dcgan(DcganConfig::default()), 100, [3, 64, 64]).unwrap();
    build_d(&vs.root().sub("d"), &DModel::Dcgan(DcganConfig::default()), [3, 64, 64]).unwrap();
    let vars = vs.variables();
    assert_eq!(vars["g.up0.weight"].size(), vec![100, 512, 4, 4]);
    assert_eq!(vars["g.up4.weight"].size(), vec![64, 3, 4, 4]);
    assert!(!vars.contains_key("g.up0.bias"));
    assert_eq!(vars["d.conv0.weight"].size(), vec![64, 3, 4, 4]);
    assert_eq!(vars["d.conv3.weight"].size(), vec![512, 256, 4, 4]);
    assert_eq!(vars["d.out.weight"].size(), vec![1, 512, 4, 4]);
    let n_params = |p: &str| -> i64 { vars.iter().filter(|(k, _)| k.starts_with(p)).map(|(_, v)| v.numel() as i64).sum() };
    // G: 100·512·16 + 256·... = 3,576,704 with BN affine (not running stats);
    // D: (3·64·16+64) + (64·128·16+128) + (128·256·16+256) + (256·512·16+512) + (512·16+1)
    //    = 3,136 + 131,200 + 524,544 + 2,097,664 + 8,193 = 2,764,737.
    let g_bn_running: i64 =
        vars.iter().filter(|(k, _)| k.starts_with("g.bn") && k.contains("running")).map(|(_, v)| v.numel() as i64).sum();
    assert_eq!(n_params("g.") - g_bn_running, 3_576_704);
    assert_eq!(n_params("d."), 2_764_737);
}

/// D's weight gradients of loss + penalty on `x` (penalty at `xh`), with the penalty's forward
/// pass `fused` (ATen's leaky ReLU) or masked ([`Net::forward_for_input_grad`]). Both variants
/// run on the same D and the same inputs: nothing is drawn here, since other tests of this
/// binary draw from libtorch's one global generator at the same time (re-seeding it for each
/// variant raced with them).
fn penalty_grads(vs: &VarStore, d: &Net, x: &Tensor, xh: &Tensor, fused: bool) -> (Vec<Tensor>, f64) {
    for v in vs.variables().values() {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let f = |t: &Tensor| if fused { d.forward(t, true) } else { d.forward_for_input_grad(t, true) };
    let (p, _) = crate::train::dragan::gradient_penalty(f, xh, 10.0, 1.0).unwrap();
    let total = d.forward(x, true).mean(Kind::Float) + &p;
    total.backward();
    let mut vars: Vec<_> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    (vars.iter().map(|(_, v)| v.grad().copy()).collect(), p.double_value(&[]))
}

#[test]
fn masked_leaky_relu_gives_the_fused_kernels_values_and_penalty_gradients() {
    let cases = [
        (DModel::Mlp(MlpConfig { hidden: 32, layers: 2, batch_norm: false }), [1, 8, 8]),
        (DModel::Dcgan(DcganConfig { width: 4, batch_norm: None }), [3, 16, 16]),
    ];
    for (cfg, image) in cases {
        let vs = VarStore::new(Device::Cpu);
        let d = build_d(&vs.root(), &cfg, image).unwrap();
        let x = Tensor::randn([5, image[0], image[1], image[2]], (Kind::Float, Device::Cpu));
        let (a, b) = (d.forward(&x, true), d.forward_for_input_grad(&x, true));
        assert!(a.equal(&b), "{cfg:?}: masked forward differs");
        // ∇ₓD, as the penalty takes it, is the same too.
        let xr = x.set_requires_grad(true);
        let out = d.forward(&xr, true).sum(Kind::Float);
        let g1 = Tensor::run_backward(&[&out], &[&xr], false, false).remove(0);
        let out2 = d.forward_for_input_grad(&xr, true).sum(Kind::Float);
        let g2 = Tensor::run_backward(&[&out2], &[&xr], false, false).remove(0);
        assert!(g1.equal(&g2), "{cfg:?}: ∇ₓD differs");

        let x6 = Tensor::randn([6, image[0], image[1], image[2]], (Kind::Float, Device::Cpu));
        let xh = (&x6 + Tensor::rand_like(&x6) * 0.3).detach();
        let (fused, pf) = penalty_grads(&vs, &d, &x6, &xh, true);
        let (masked, pm) = penalty_grads(&vs, &d, &x6, &xh, false);
        assert_eq!(pf, pm, "{cfg:?}: penalty differs");
        assert!(pf > 0.0);
        for (i, (f, m)) in fused.iter().zip(&masked).enumerate() {
            let rel = (f - m).abs().max().double_value(&[]) / f.abs().max().double_value(&[]).max(1e-30);
            assert!(rel <= 1e-6, "{cfg:?}: weight gradient {i} differs by {rel:e} (relative)");
        }
    }
}

#[test]
fn forward_two_is_two_forwards_in_one_batch() {
    let cases = [
        (DModel::Mlp(MlpConfig { hidden: 32, layers: 2, batch_norm: false }), [1, 8, 8], true),
        (DModel::Dcgan(DcganConfig { width: 4, batch_norm: None }), [3, 16, 16], true),
        (DModel::Mlp(MlpConfig { hidden: 32, layers: 2, batch_norm: true }), [1, 8, 8], false),
    ];
    for (cfg, image, joint) in cases {
        // In f64: one batch of 8 and two of 5 and 3 sum in different orders, and in f32 a bias
        // gradient (a sum of terms of both signs) differed by 2e-5 of its largest value now and
        // then; in f64 that rounding is 1e-16-sized, far below the bound.
        let mut vs = VarStore::new(Device::Cpu);
        let d = build_d(&vs.root(), &cfg, image).unwrap();
        vs.set_kind(Kind::Double);
        let a = Tensor::randn([5, image[0], image[1], image[2]], (Kind::Double, Device::Cpu));
        let b = Tensor::randn([3, image[0], image[1], image[2]], (Kind::Double, Device::Cpu));
        // D's weight gradients of a loss on both outputs, joint and as two calls.
        let grads = |two: bool| {
            for v in vs.variables().values() {
                let mut g = v.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let (ya, yb) = if two { d.forward_two(&a, &b, true).unwrap() } else { (d.forward(&a, true), d.forward(&b, true)) };
            assert_eq!((ya.size(), yb.size()), (vec![5, 1], vec![3, 1]));
            (ya.softplus().mean(Kind::Double) + (-&yb).softplus().mean(Kind::Double)).backward();
            (vs.trainable_variables().iter().map(|t| t.grad().copy()).collect::<Vec<_>>(), ya.detach(), yb.detach())
        };
        let (g2, a2, b2) = grads(true);
        let (g1, a1, b1) = grads(false);
        if joint {
            // One batch: the same values to f64 rounding.
            let rel = |p: &Tensor, q: &Tensor| (p - q).abs().max().double_value(&[]) / q.abs().max().double_value(&[]).max(1e-300);
            assert!(
                rel(&a2, &a1) <= 1e-12 && rel(&b2, &b1) <= 1e-12,
                "{cfg:?}: outputs differ by {:e}, {:e}",
                rel(&a2, &a1),
                rel(&b2, &b1)
            );
            for (i, (p, q)) in g2.iter().zip(&g1).enumerate() {
                assert!(rel(p, q) <= 1e-10, "{cfg:?}: gradient {i} differs by {:e} (relative)", rel(p, q));
            }
        } else {
            // Batch norm: two calls, each normalised by its own batch, exactly as before.
            assert!(a2.equal(&a1) && b2.equal(&b1), "{cfg:?}: batch norm must see each batch alone");
        }
    }
}
