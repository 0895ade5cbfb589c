//! The shipped method pipelines (vanilla GAN, WGAN, WGAN-GP, loss-sensitive, least squares,
//! hinge, and DRAGAN itself): each passes `pipe check` and trains 20 steps on the CPU.
//!
//! The runs shrink the DCGANs (width 8 instead of 64) and the batch (8 instead of 64) with
//! `--set`, so that all seven fit in CI; the method blocks (loss, penalty, constraint,
//! optimiser, n_critic) are the shipped ones.

use crate::common::*;
use std::path::Path;

const METHODS: [&str; 8] = [
    "irasutoya",
    "irasutoya_gan",
    "irasutoya_gan_minimax",
    "irasutoya_wgan",
    "irasutoya_wgan_gp",
    "irasutoya_loss_sensitive",
    "irasutoya_least_squares",
    "irasutoya_hinge",
];

fn train(name: &str, out: &Path) -> std::process::Output {
    run(&[
        "run",
        &format!("pipelines/{name}.ron"),
        "--device",
        "cpu",
        "--max-steps",
        "20",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "d_step.model=Dcgan(width: 8)",
        "--set",
        "g_step.model=Dcgan(width: 8)",
        "--set",
        "loader.batch=8",
        "--set",
        "sampler.every=10",
    ])
}

#[test]
fn every_method_pipeline_checks_and_trains_20_steps() {
    assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/illustrations").exists(), "run scripts/setup.sh");
    let files: Vec<String> = METHODS.iter().map(|n| format!("pipelines/{n}.ron")).collect();
    let mut args = vec!["check"];
    args.extend(files.iter().map(String::as_str));
    let o = run(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).matches(": ok (").count(), METHODS.len(), "{}", stdout(&o));

    let tmp = tempfile::tempdir().unwrap();
    // Row 1 of each run: (d_loss, g_loss, penalty).
    let mut first = std::collections::BTreeMap::new();
    for name in METHODS {
        let out = tmp.path().join(name);
        let o = train(name, &out);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        let (header, rows) = metrics(&out);
        assert!(header.starts_with("step,elapsed_s,d_loss,g_loss,penalty,grad_norm"), "{header}");
        assert_eq!(rows.iter().map(|r| r[0] as u64).collect::<Vec<_>>(), [1, 20], "{name}: logged steps");
        for r in &rows {
            assert!(r[2].is_finite() && r[3].is_finite() && r[4].is_finite(), "{name}: {r:?}");
        }
        assert!(out.join("samples/step_00000020.png").exists(), "{name}");
        assert!(out.join("progress.gif").exists(), "{name}");
        // Without DRAGAN's penalty nothing reads augment's x̂, and the run says it skips it.
        let dragan = matches!(name, "irasutoya" | "irasutoya_hinge");
        assert_eq!(stderr(&o).contains("perturb Dragan(..) is not drawn"), !dragan, "{name}: {}", stderr(&o));
        first.insert(name, (rows[0][2], rows[0][3], rows[0][4], rows[0][5]));
    }

    // Penalties: positive where there is one (logged with D's gradient norm), 0 otherwise.
    for name in ["irasutoya", "irasutoya_hinge", "irasutoya_wgan_gp"] {
        let (_, _, pen, norm) = first[name];
        assert!(pen > 0.0 && norm.is_finite() && norm > 0.0, "{name}: penalty {pen}, grad norm {norm}");
    }
    for name in ["irasutoya_gan", "irasutoya_wgan", "irasutoya_loss_sensitive", "irasutoya_least_squares"] {
        let (_, _, pen, norm) = first[name];
        assert!(pen == 0.0 && norm.is_nan(), "{name}: penalty {pen}, grad norm {norm}");
    }
    // The two vanilla runs share everything up to G's loss: the same first D loss; the
    // non-saturating G loss E softplus(−f) is > 0, the minimax one −E softplus(f) < 0.
    let (ns, mm) = (first["irasutoya_gan"], first["irasutoya_gan_minimax"]);
    assert_eq!(ns.0, mm.0);
    assert!(ns.1 > 0.0 && mm.1 < 0.0, "{ns:?} {mm:?}");
    // Losses that cannot be negative.
    for name in ["irasutoya_least_squares", "irasutoya_loss_sensitive", "irasutoya_hinge"] {
        assert!(first[name].0 >= 0.0, "{name}: {:?}", first[name]);
    }

    // WGAN's clipping bounds every weight and bias of D after the last step (and binds: some
    // sit at ±c, as PyTorch's default initialisation draws larger ones).
    let ck = pipe_stages::io::checkpoint::read(&tmp.path().join("irasutoya_wgan/checkpoints/step_00000020.safetensors")).unwrap();
    let d: Vec<_> = ck.tensors.iter().filter(|(k, _)| k.starts_with("d.")).collect();
    assert!(!d.is_empty());
    let mut at_bound = 0;
    for (k, t) in d {
        let m = t.abs().max().double_value(&[]);
        assert!(m <= 0.01 + 1e-7, "{k}: max |w| = {m}");
        at_bound += i64::from((m - 0.01).abs() < 1e-7);
    }
    assert!(at_bound > 0, "no D tensor reaches the clipping bound");
    assert_eq!(ck.manifest.d_adam_steps, 100, "WGAN: 5 critic updates per generator step");
    // RMSProp's state (v only) is what the checkpoint holds for both networks.
    assert!(ck.tensors.keys().any(|k| k.starts_with("d_adam.v.")) && !ck.tensors.keys().any(|k| k.starts_with("d_adam.m.")));
}

#[test]
fn resuming_a_wgan_run_matches_a_straight_one() {
    // RMSProp's state and the clipping survive a checkpoint: 10 + 10 steps = 20 steps.
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let go = |dir: &Path, extra: &[&str]| {
        let mut args = vec![
            "run",
            "pipelines/irasutoya_wgan.ron",
            "--device",
            "cpu",
            "--out",
            dir.to_str().unwrap(),
            "--set",
            "d_step.model=Dcgan(width: 4)",
            "--set",
            "g_step.model=Dcgan(width: 4)",
            "--set",
            "loader.batch=4",
            "--set",
            "log_every=5",
            "--set",
            "sampler.every=10",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    assert_eq!(go(&a, &["--max-steps", "10"]).status.code(), Some(0));
    // g_step's loss left out on resume is the same loss (Wasserstein): no "settings differ".
    let o = go(&a, &["--max-steps", "20", "--resume", a.to_str().unwrap(), "--set", "g_step.loss=None"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("settings that differ"), "{}", stderr(&o));
    assert_eq!(go(&b, &["--max-steps", "20"]).status.code(), Some(0));
    let losses = |d: &Path| metrics(d).1.iter().map(|r| (r[0], r[2], r[3])).collect::<Vec<_>>();
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(losses(&a).len(), 5, "rows 1, 5, 10, 15, 20");
    // Fewer critic updates per step after the resume (5 → 1): the loader's budget of batches
    // counts the ones read before the checkpoint plus 1 per step still to go.
    let o = go(&a, &["--max-steps", "25", "--resume", a.to_str().unwrap(), "--set", "d_step.n_critic=1"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let ck = pipe_stages::io::checkpoint::read(&a.join("checkpoints/step_00000025.safetensors")).unwrap();
    assert_eq!((ck.manifest.step, ck.manifest.data.next_index), (25, 20 * 5 + 5));
    // Resuming RMSProp's state into Adam is refused, naming both.
    let o = go(&a, &["--max-steps", "40", "--resume", a.to_str().unwrap(), "--set", "g_step.optimizer=Adam(lr: 1e-4)"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the checkpoint holds RmsProp state for g_step.optimizer, but the pipeline asks for Adam"),
        "{}",
        stderr(&o)
    );
}
