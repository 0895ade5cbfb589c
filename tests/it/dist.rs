//! Data-parallel runs on the CPU (Gloo over loopback): `pipe run --nproc N` and torchrun's
//! environment variables.

use crate::common::{pipe, synthetic_idx};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The penalty of a test pipeline.
#[derive(Clone, Copy)]
enum Method {
    /// WGAN-GP: x̂ between real and generated samples, drawn by d_step.
    WganGp,
    /// DRAGAN: x̂ near the real data, drawn by augment with σ of the global batch (and random
    /// flips, on two workers, to exercise their per-image draws).
    Dragan,
}

/// A pipeline on `root` with MLP G and D (no batch norm, so each sample's output is its own
/// and 2 × 32 is the same maths as 1 × 64), global batch 64, checkpoint at `steps`.
///
/// Adam's `eps` is 1: Adam's first steps move each weight by ±lr whatever the size of its
/// gradient (m̂/√v̂ = ±1), so a gradient that is 1e-9 in one summation order and −1e-9 in the
/// other moves a weight by 2·lr. A large eps makes the update proportional to the gradient,
/// so what is compared is the gradient the ranks agree on, not the sign of float noise.
fn pipeline(dir: &Path, root: &Path, steps: u64, method: Method) -> PathBuf {
    let (augment, input, loss, penalty) = match method {
        Method::WganGp => ("", "loader", "Wasserstein", "WganGp(lambda: 10.0, k: 1.0)"),
        Method::Dragan => (
            r#"(name: "augment", input: ["loader"], kind: Augment(flip: true, workers: 2, perturb: Dragan(c: 0.5, sigma: Batch, noise: Uniform, interpolate: true))),"#,
            "augment",
            "Logistic",
            "Dragan(lambda: 10.0, k: 1.0)",
        ),
    };
    let text = format!(
        r#"Pipeline(
    name: "dp", seed: 3, device: cpu, max_steps: {steps}, log_every: 5,
    checkpoint: (every: {steps}, keep: 2),
    stages: [
        (name: "loader", kind: IdxLoader(root: {root:?}, split: Train, batch: 64)),
        {augment}
        (name: "d_step", input: ["{input}"], kind: DStep(model: Mlp(hidden: 32, layers: 2), loss: {loss},
            penalty: {penalty}, optimizer: Adam(lr: 1e-3, beta1: 0.5, beta2: 0.9, eps: 1.0), n_critic: 2)),
        (name: "g_step", input: ["d_step"], kind: GStep(model: Mlp(hidden: 32, layers: 2), latent: 8,
            optimizer: Adam(lr: 1e-3, beta1: 0.5, beta2: 0.9, eps: 1.0))),
        (name: "sampler", input: ["g_step"], kind: Sampler(grid: 4, every: 10)),
    ],
)"#,
        root = root.display().to_string()
    );
    let f = dir.join("dp.ron");
    std::fs::write(&f, text).unwrap();
    f
}

fn wgan_gp(dir: &Path, root: &Path, steps: u64) -> PathBuf {
    pipeline(dir, root, steps, Method::WganGp)
}

/// `pipe compare` of two run folders passes with weights within 1e-5 and logged losses within
/// 1e-4 (relative), at step `step`.
fn assert_same_training(a: &Path, b: &Path, step: u64, what: &str) {
    let o = pipe().args(["compare"]).arg(a).arg(b).args(["--weights-tol", "1e-5", "--loss-tol", "1e-4"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{what}:\n{out}");
    assert!(out.contains(&format!("at step {step}")), "{out}");
}

fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{:?} failed ({}):\n{err}", cmd, o.status);
    err
}

#[test]
fn two_ranks_of_32_train_as_one_rank_of_64() {
    let t = tempfile::tempdir().unwrap();
    let root = synthetic_idx(&t.path().join("data"), 256, 8, 5);
    for (name, method) in [("wgan_gp", Method::WganGp), ("dragan", Method::Dragan)] {
        let dir = t.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let file = pipeline(&dir, &root, 20, method);
        let (one, two) = (dir.join("one"), dir.join("two"));
        run_ok(pipe().args(["run"]).arg(&file).arg("--out").arg(&one));
        let err = run_ok(pipe().args(["run"]).arg(&file).arg("--out").arg(&two).args(["--nproc", "2"]));
        // Rank 0 alone writes: one summary line, one run folder with everything in it.
        assert_eq!(err.matches("done: 20 steps").count(), 1, "{err}");
        for f in ["metrics.csv", "pipeline.ron", "samples/step_00000020.png", "checkpoints/step_00000020.safetensors"] {
            assert!(two.join(f).exists(), "{f} missing");
        }
        assert_same_training(&one, &two, 20, &format!("{name}: 2 × 32 differs from 1 × 64"));
        // Images are counted over all ranks: 20 steps × n_critic 2 × 64.
        let images =
            |d: &Path| pipe_stages::io::checkpoint::read(&d.join("checkpoints/step_00000020.safetensors")).unwrap().manifest.images;
        assert_eq!((images(&one), images(&two)), (2560, 2560));
    }
}

#[test]
fn a_resumed_run_equals_a_straight_one_with_any_world_size() {
    let t = tempfile::tempdir().unwrap();
    let root = synthetic_idx(&t.path().join("data"), 256, 8, 9);
    let file = pipeline(t.path(), &root, 20, Method::Dragan);
    let straight = t.path().join("straight");
    run_ok(pipe().args(["run"]).arg(&file).arg("--out").arg(&straight).args(["--nproc", "2"]));
    // 2 ranks to step 10, then on to 20 with 2 ranks, and with 1 (the global batch stays 64).
    for (name, nproc) in [("two", "2"), ("one", "1")] {
        let run = t.path().join(name);
        let ck = ["--checkpoint-every", "10"];
        run_ok(pipe().args(["run"]).arg(&file).arg("--out").arg(&run).args(["--nproc", "2", "--max-steps", "10"]).args(ck));
        assert!(run.join("checkpoints/step_00000010.safetensors").exists());
        let err = run_ok(pipe().args(["run"]).arg(&file).arg("--resume").arg(&run).args(["--nproc", nproc, "--max-steps", "20"]).args(ck));
        assert_eq!(err.matches("resuming from").count(), 1, "rank 0 alone says so:\n{err}");
        assert_same_training(&straight, &run, 20, &format!("10 steps on 2 ranks + 10 on {nproc} differ from 20 straight"));
    }
}

#[test]
fn torchrun_style_environment_launches_the_ranks() {
    let t = tempfile::tempdir().unwrap();
    let root = synthetic_idx(&t.path().join("data"), 128, 8, 6);
    let file = wgan_gp(t.path(), &root, 4);
    let port = pipe::launch::free_port().unwrap().to_string();
    let out = t.path().join("run");
    let start = |rank: &str| {
        pipe()
            .args(["run"])
            .arg(&file)
            .arg("--out")
            .arg(&out)
            .envs([("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (r0, r1) = (start("0"), start("1"));
    let (o0, o1) = (r0.wait_with_output().unwrap(), r1.wait_with_output().unwrap());
    assert!(o0.status.success() && o1.status.success(), "{}\n{}", String::from_utf8_lossy(&o0.stderr), String::from_utf8_lossy(&o1.stderr));
    assert!(out.join("checkpoints/step_00000004.safetensors").exists());
    // The environment is checked: a world size of 0, a rank out of range.
    for (k, v, says) in [
        ("WORLD_SIZE", "0", "WORLD_SIZE=\"0\": expected the number of ranks, at least 1"),
        ("RANK", "5", "RANK=\"5\": expected a rank 0 to 1"),
    ] {
        let mut env = vec![("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port.as_str())];
        env.retain(|e| e.0 != k);
        env.push((k, v));
        let o = pipe().args(["run"]).arg(&file).arg("--out").arg(t.path().join("bad")).envs(env).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn a_killed_rank_stops_the_others_and_the_launcher_names_it() {
    let t = tempfile::tempdir().unwrap();
    let root = synthetic_idx(&t.path().join("data"), 256, 8, 7);
    let file = wgan_gp(t.path(), &root, 100000);
    let out = t.path().join("run");
    // Rank 1 is killed (SIGKILL) at its 5th step by the test hook; rank 0 must stop at once,
    // naming the closed connection, and the launcher must name rank 1.
    let started = std::time::Instant::now();
    let o = pipe()
        .args(["run"])
        .arg(&file)
        .arg("--out")
        .arg(&out)
        .args(["--nproc", "2", "--set", "checkpoint=(every: 2, keep: 2)"])
        .env("PIPE_TEST_KILL_RANK", "1:5")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(started.elapsed().as_secs() < 60, "took {:?}", started.elapsed());
    assert!(err.contains("rank 1 of 2 was killed by signal 9 (SIGKILL)"), "{err}");
    assert!(err.contains("Connection closed by peer") || err.contains("Connection reset"), "{err}");
    // The last checkpoint rank 0 wrote loads.
    let o = pipe().args(["sample"]).arg(&out).arg("--out").arg(t.path().join("s.png")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn ctrl_c_on_the_launcher_drains_every_rank_to_the_same_step() {
    let t = tempfile::tempdir().unwrap();
    let root = synthetic_idx(&t.path().join("data"), 256, 8, 8);
    let file = wgan_gp(t.path(), &root, 100000);
    let out = t.path().join("run");
    let mut child =
        pipe().args(["run"]).arg(&file).arg("--out").arg(&out).args(["--nproc", "2"]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    crate::common::wait_for_rows(&out, 3, &mut child);
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    // Both ranks stop after the same step (they agree on it), so no collective is left
    // unpaired: exit 130, no rank reported failed, and rank 0's last checkpoint is written.
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(!err.contains("stopping the other ranks") && !err.contains("error"), "{err}");
    let ck: Vec<_> = std::fs::read_dir(out.join("checkpoints")).unwrap().flatten().collect();
    assert_eq!(ck.len(), 1, "{err}");
}

#[test]
fn a_non_finite_loss_on_one_rank_is_skipped_or_stopped_on_all() {
    let t = tempfile::tempdir().unwrap();
    let root = synthetic_idx(&t.path().join("data"), 256, 8, 10);
    let file = pipeline(t.path(), &root, 12, Method::Dragan);
    // Skip: a NaN discriminator loss at step 5 on rank 1 alone skips that update on both ranks,
    // as a single process with the NaN skips it (both critic updates of step 5: n_critic is 2).
    let skip = ["--set", "on_nonfinite=Skip"];
    let (one, two) = (t.path().join("one"), t.path().join("two"));
    let err = run_ok(pipe().args(["run"]).arg(&file).arg("--out").arg(&one).args(skip).env("PIPE_TEST_NONFINITE", "d_step:5"));
    assert!(err.contains("step 5: non-finite discriminator loss or gradient: update skipped"), "{err}");
    let err = run_ok(
        pipe().args(["run"]).arg(&file).arg("--out").arg(&two).args(["--nproc", "2"]).args(skip).env("PIPE_TEST_NONFINITE", "d_step:5@1"),
    );
    assert_eq!(err.matches("update skipped (2 so far)").count(), 1, "rank 0 says it once:\n{err}");
    assert_same_training(&one, &two, 12, "a NaN on rank 1 skipped like a NaN in one process");
    // Stop (the default): every rank stops at that update, rank 0 naming the other rank.
    let o = pipe()
        .args(["run"])
        .arg(&file)
        .arg("--out")
        .arg(t.path().join("stop"))
        .args(["--nproc", "2"])
        .env("PIPE_TEST_NONFINITE", "g_step:7@1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("step 7: non-finite generator loss on another rank"), "{err}");
    assert!(!err.contains("Connection closed"), "the ranks stop together, not by losing each other:\n{err}");
}

#[test]
fn ranks_with_different_pipelines_refuse_to_start() {
    let t = tempfile::tempdir().unwrap();
    let root = synthetic_idx(&t.path().join("data"), 128, 8, 11);
    let file = wgan_gp(t.path(), &root, 4);
    let port = pipe::launch::free_port().unwrap().to_string();
    let start = |rank: &str, extra: &[&str]| {
        pipe()
            .args(["run"])
            .arg(&file)
            .arg("--out")
            .arg(t.path().join(format!("run{rank}")))
            .args(extra)
            .envs([("RANK", rank), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Rank 1 was started with another learning rate.
    let (r0, r1) = (start("0", &[]), start("1", &["--set", "g_step.optimizer=Adam(lr: 2e-3, beta1: 0.5, beta2: 0.9, eps: 1.0)"]));
    for o in [r0.wait_with_output().unwrap(), r1.wait_with_output().unwrap()] {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("the ranks run different pipelines") && err.contains("same --set options"), "{err}");
    }
}

#[test]
fn what_every_rank_would_refuse_is_said_once_before_they_start() {
    let t = tempfile::tempdir().unwrap();
    let root = synthetic_idx(&t.path().join("data"), 128, 8, 12);
    let file = wgan_gp(t.path(), &root, 4);
    for (args, says) in [
        (vec!["--nproc", "3"], "--nproc 3: batch is 64, split over 3 ranks"),
        (vec!["--nproc", "2", "--resume", "/nonexistent/run"], "--resume /nonexistent/run: no such file or folder"),
    ] {
        let out = t.path().join("run");
        let o = pipe().args(["run"]).arg(&file).arg("--out").arg(&out).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.matches(says).count(), 1, "said once:\n{err}");
        assert!(!err.contains("stopping the other ranks") && !out.exists(), "no rank started:\n{err}");
    }
}
