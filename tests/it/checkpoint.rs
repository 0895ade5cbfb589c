//! Checkpoints, exact resume, the generator EMA and `pipe sample`, end to end on CPU with tiny
//! models.

use std::path::{Path, PathBuf};

use crate::common;
use crate::common::{metrics, mnist_root, pipe, run, stderr, wait_for_rows};

/// Tiny MNIST MLP settings: hidden 64, log every 10, a grid every 20 steps.
/// The tiny-model preset, logging every 10 steps and sampling every 20.
const TINY: [&str; 10] = [
    common::TINY[0],
    common::TINY[1],
    common::TINY[2],
    common::TINY[3],
    common::TINY[4],
    common::TINY[5],
    "--set",
    "log_every=10",
    "--set",
    "sampler.every=20",
];
fn mnist_run(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["run", "pipelines/mnist_mlp.ron", "--out", out.to_str().unwrap()];
    args.extend(TINY);
    args.extend(extra);
    run(&args)
}

/// metrics.csv without the timing columns (elapsed_s, img_per_s): step, d_loss, g_loss,
/// penalty, grad_norm as written.
fn losses(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            [f[0], f[2], f[3], f[4], f[5]].join(",")
        })
        .collect()
}

fn checkpoint_steps(dir: &Path) -> Vec<u64> {
    pipe_stages::io::checkpoint::list(&dir.join("checkpoints")).into_iter().map(|(s, _)| s).collect()
}

fn grid(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("samples/step_{step:08}.png"))
}

#[test]
fn resume_continues_exactly_like_a_straight_run() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // A: 100 steps (checkpoints at 50 and 100), then resumed up to 200.
    let o = mnist_run(&a, &["--max-steps", "100", "--checkpoint-every", "50"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("checkpoint"), "{}", stderr(&o));
    assert_eq!(checkpoint_steps(&a), vec![50, 100]);
    let o = mnist_run(&a, &["--max-steps", "200", "--checkpoint-every", "50", "--resume"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
    assert!(stderr(&o).contains("done: 200 steps (steps 101–200 in this run, resumed)"), "{}", stderr(&o));
    // keep: 3 (the default).
    assert_eq!(checkpoint_steps(&a), vec![100, 150, 200]);
    // B: 200 steps straight.
    let o = mnist_run(&b, &["--max-steps", "200", "--checkpoint-every", "50"]);
    assert_eq!(o.status.code(), Some(0));

    // Identical losses, row for row, over the whole series 1, 10, ..., 200.
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 22, "header + 21 rows: {la:?}");
    assert_eq!(la, lb);
    // elapsed_s goes on from the first part of the run instead of restarting.
    let (_, rows) = metrics(&a);
    assert!(rows.windows(2).all(|w| w[1][1] >= w[0][1]), "elapsed_s never goes back: {rows:?}");
    // The same grids, and the video covers the whole run: 10 grids → 10 frames.
    for step in [100, 120, 200] {
        assert_eq!(std::fs::read(grid(&a, step)).unwrap(), std::fs::read(grid(&b, step)).unwrap(), "grid of step {step}");
    }
    #[cfg(feature = "video")]
    {
        let (va, vb) = (a.join("progress.mp4"), b.join("progress.mp4"));
        assert_eq!(pipe_stages::kinds::video::probe(&va).unwrap().frames, 10);
        for i in [0, 4, 5, 9] {
            assert_eq!(
                pipe_stages::kinds::video::decode_frame(&va, i).unwrap().rgb,
                pipe_stages::kinds::video::decode_frame(&vb, i).unwrap().rgb,
                "frame {i}"
            );
        }
    }
    // The loss plot was redrawn over the whole run.
    assert!(a.join("loss.png").exists());

    // Nothing left to train: a clear refusal.
    let o = mnist_run(&a, &["--max-steps", "150", "--resume"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("the checkpoint is at step 200 and max_steps is 150: nothing to train"), "{}", stderr(&o));
}

#[test]
fn resume_from_an_older_checkpoint_drops_the_later_rows_and_grids() {
    // As after a crash: the run got to step 60 but the newest checkpoint is at 40.
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let o = mnist_run(&a, &["--max-steps", "60", "--checkpoint-every", "40"]);
    assert_eq!(o.status.code(), Some(0));
    std::fs::remove_file(a.join("checkpoints/step_00000060.safetensors")).unwrap();
    // Named explicitly this time: the checkpoint file.
    let ck = a.join("checkpoints/step_00000040.safetensors");
    let o = mnist_run(&a, &["--max-steps", "80", "--checkpoint-every", "40", "--resume", ck.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    let o = mnist_run(&b, &["--max-steps", "80"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(losses(&a), losses(&b));
    // The abandoned continuation's checkpoints went with its rows: a later plain --resume
    // goes on from 80, not from anything left over.
    assert_eq!(checkpoint_steps(&a), vec![40, 80]);
    assert_eq!(std::fs::read(grid(&a, 60)).unwrap(), std::fs::read(grid(&b, 60)).unwrap());
    #[cfg(feature = "video")]
    assert_eq!(pipe_stages::kinds::video::probe(&a.join("progress.mp4")).unwrap().frames, 4);
    // Branching from 40 again: the checkpoint of 80 is not the new branch's, and not lost
    // either: it is moved aside, with a warning, byte for byte.
    let kept = std::fs::read(a.join("checkpoints/step_00000080.safetensors")).unwrap();
    let o = mnist_run(&a, &["--max-steps", "60", "--checkpoint-every", "40", "--resume", ck.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let aside = a.join("abandoned/after_step_00000040");
    assert!(
        stderr(&o).contains(&format!(
            "warning: resuming from step 40: the later checkpoints (steps 80) belong to the continuation this resume abandons; moved to {}",
            aside.display()
        )),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(aside.join("step_00000080.safetensors")).unwrap(), kept);
    assert_eq!(checkpoint_steps(&a), vec![40, 60]);
}

#[test]
fn a_grid_and_row_lost_after_the_checkpoint_are_restored() {
    // Killed between writing the checkpoint of step 40 and writing its grid and metrics row.
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    assert_eq!(mnist_run(&a, &["--max-steps", "40", "--checkpoint-every", "20"]).status.code(), Some(0));
    std::fs::remove_file(grid(&a, 40)).unwrap();
    let text = std::fs::read_to_string(a.join("metrics.csv")).unwrap();
    let cut: String = text.lines().filter(|l| !l.starts_with("40,")).map(|l| format!("{l}\n")).collect();
    std::fs::write(a.join("metrics.csv"), cut).unwrap();
    assert_eq!(mnist_run(&a, &["--max-steps", "60", "--checkpoint-every", "20", "--resume"]).status.code(), Some(0));
    assert_eq!(mnist_run(&b, &["--max-steps", "60", "--checkpoint-every", "20"]).status.code(), Some(0));
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(std::fs::read(grid(&a, 40)).unwrap(), std::fs::read(grid(&b, 40)).unwrap());
    #[cfg(feature = "video")]
    assert_eq!(pipe_stages::kinds::video::probe(&a.join("progress.mp4")).unwrap().frames, 3);
}

#[test]
fn folder_dcgan_with_n_critic_and_ema_resumes_exactly() {
    // The other loader, batch norm in G, two D updates per step (two batches each), WGAN-GP's
    // random ε, and the EMA: all carried across the checkpoint.
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/illustrations");
    assert!(root.is_dir(), "data/illustrations is missing: run scripts/setup.sh first");
    let set = [
        "--device",
        "cpu",
        "--set",
        "loader.size=16",
        "--set",
        "loader.batch=16",
        "--set",
        "d_step.model=Dcgan(width: 8)",
        "--set",
        "g_step.model=Dcgan(width: 8)",
        "--set",
        "d_step.n_critic=2",
        "--set",
        "d_step.penalty=WganGp(lambda: 10.0)",
        "--set",
        "augment.perturb=Off",
        "--set",
        "g_step.ema=(decay: 0.9, start: 5)",
        "--set",
        "log_every=5",
        "--set",
        "sampler.every=10",
        "--set",
        "sampler.grid=4",
    ];
    let go = |out: &Path, extra: &[&str]| {
        let mut args = vec!["run", "pipelines/irasutoya_small.ron", "--out", out.to_str().unwrap()];
        args.extend(set);
        args.extend(extra);
        run(&args)
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    assert_eq!(go(&a, &["--max-steps", "15"]).status.code(), Some(0));
    assert_eq!(go(&a, &["--max-steps", "30", "--resume", a.to_str().unwrap()]).status.code(), Some(0));
    assert_eq!(go(&b, &["--max-steps", "30"]).status.code(), Some(0));
    assert_eq!(losses(&a), losses(&b));
    // Grids come from the EMA, and match too.
    assert_eq!(std::fs::read(grid(&a, 30)).unwrap(), std::fs::read(grid(&b, 30)).unwrap());
    let ck = pipe_stages::io::checkpoint::read(&a.join("checkpoints/step_00000030.safetensors")).unwrap();
    assert!(ck.manifest.ema);
    assert_eq!(ck.manifest.data.next_index, 60, "two batches per step");
    assert_eq!(ck.manifest.d_adam_steps, 60);
    assert_eq!(ck.manifest.g_adam_steps, 30);
    assert!(ck.tensors.keys().any(|k| k.starts_with("g_ema.") && k.contains("bn")), "EMA of batch-norm G");

    // `pipe sample` draws with the EMA by default: the training grid of that step, exactly.
    let png = tmp.path().join("s.png");
    let o = run(&["sample", a.to_str().unwrap(), "--n", "16", "--device", "cpu", "--out", png.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("step 30, g_ema weights"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&png).unwrap(), std::fs::read(grid(&a, 30)).unwrap());
    // --no-ema uses G itself: a different picture.
    let raw = tmp.path().join("raw.png");
    let o = run(&["sample", a.to_str().unwrap(), "--n", "16", "--no-ema", "--device", "cpu", "--out", raw.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("g weights"), "{}", stderr(&o));
    assert_ne!(std::fs::read(&raw).unwrap(), std::fs::read(&png).unwrap());
}

#[test]
fn sample_writes_grids_and_latent_walks() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    assert_eq!(mnist_run(&a, &["--max-steps", "40"]).status.code(), Some(0));
    let ck = a.join("checkpoints/step_00000040.safetensors");
    // The default seed is the pipeline's: the training grid of that step, exactly.
    let png = tmp.path().join("out/grid.png");
    let o = run(&["sample", ck.to_str().unwrap(), "--out", png.to_str().unwrap(), "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::read(&png).unwrap(), std::fs::read(grid(&a, 40)).unwrap());
    // Another seed, another count: 9 images in 3 columns of 28 px with 2 px padding.
    let nine = tmp.path().join("nine.png");
    let o = run(&["sample", ck.to_str().unwrap(), "--n", "9", "--seed", "5", "--out", nine.to_str().unwrap(), "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(0));
    let img = image::open(&nine).unwrap();
    assert_eq!((img.width(), img.height()), (3 * 28 + 4 * 2, 3 * 28 + 4 * 2));
    // A run with a 3×3 grid and 5 px padding: by default pipe sample draws that grid, exactly.
    let c = tmp.path().join("c");
    assert_eq!(mnist_run(&c, &["--max-steps", "10", "--set", "sampler.grid=3", "--set", "sampler.pad=5"]).status.code(), Some(0));
    let small = tmp.path().join("small.png");
    let o = run(&["sample", c.to_str().unwrap(), "--out", small.to_str().unwrap(), "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("(a grid of 9)"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&small).unwrap(), std::fs::read(grid(&c, 10)).unwrap());
    // A latent walk: 12 frames of the 8×8 grid.
    #[cfg(feature = "video")]
    {
        let mp4 = tmp.path().join("walk.mp4");
        let o = run(&[
            "sample",
            a.to_str().unwrap(),
            "--walk",
            "--frames",
            "12",
            "--keys",
            "3",
            "--out",
            mp4.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let info = pipe_stages::kinds::video::probe(&mp4).unwrap();
        assert_eq!((info.frames, info.width, info.height), (12, 242, 242));
        // Frames move: the first and a middle frame differ, neighbours differ less.
        let f = |i| pipe_stages::kinds::video::decode_frame(&mp4, i).unwrap().rgb;
        let dist = |x: &[u8], y: &[u8]| x.iter().zip(y).map(|(a, b)| (*a as i64 - *b as i64).abs()).sum::<i64>();
        let (f0, f1, f6) = (f(0), f(1), f(6));
        assert!(dist(&f0, &f1) < dist(&f0, &f6), "neighbouring frames are closer than distant ones");
        assert!(dist(&f0, &f6) > 0);
    }
    // Wrong output kinds are refused before anything runs.
    let o = run(&["sample", ck.to_str().unwrap(), "--out", tmp.path().join("x.mp4").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("give a .png name (or add --walk for a video)"), "{}", stderr(&o));
    let o = run(&["sample", ck.to_str().unwrap(), "--n", "0", "--out", png.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--n 0: expected 1 to 4096"), "{}", stderr(&o));
}

#[test]
fn damaged_or_foreign_checkpoints_are_refused_clearly() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    assert_eq!(mnist_run(&a, &["--max-steps", "20", "--checkpoint-every", "10"]).status.code(), Some(0));
    let newest = a.join("checkpoints/step_00000020.safetensors");
    let bytes = std::fs::read(&newest).unwrap();

    // A checkpoint of another model: exit 2, naming the tensor and both shapes.
    let o = run(&[
        "run",
        "pipelines/mnist_mlp.ron",
        "--out",
        a.to_str().unwrap(),
        "--device",
        "cpu",
        "--set",
        "d_step.model=Mlp(hidden: 64, layers: 1)",
        "--set",
        "g_step.model=Mlp(hidden: 32, layers: 1)",
        "--max-steps",
        "30",
        "--resume",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("the checkpoint was written for a different model"), "{e}");
    assert!(e.contains("tensor `d.fc0.weight`: the checkpoint has shape [32, 784], this pipeline's model has [64, 784]"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(
        e.contains("repeat them, or resume from the run's own copy of the pipeline: pipe run RUN_DIR/pipeline.ron --resume RUN_DIR"),
        "{e}"
    );
    // Another image size: said in those words, before any tensor is compared.
    let o = run(&[
        "run",
        "pipelines/irasutoya_small.ron",
        "--out",
        a.to_str().unwrap(),
        "--device",
        "cpu",
        "--max-steps",
        "30",
        "--resume",
        newest.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("the checkpoint is from pipeline `mnist_mlp` with images 1×28×28 and latent 62; this pipeline (`irasutoya_small`) has images 3×32×32 and latent 100"),
        "{}",
        stderr(&o)
    );

    // Truncated: `pipe sample` says so (exit 2)...
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let png = tmp.path().join("s.png");
    let o = run(&["sample", newest.to_str().unwrap(), "--out", png.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("step_00000020.safetensors: not a readable checkpoint: the file is truncated or corrupt"),
        "{}",
        stderr(&o)
    );
    // ... and a resume falls back to the previous checkpoint, with a warning.
    let o = mnist_run(&a, &["--max-steps", "30", "--resume"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming from") && stderr(&o).contains("step_00000010.safetensors (step 10)"), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: step_00000020") || stderr(&o).contains("truncated or corrupt"), "{}", stderr(&o));

    // One flipped bit in the tensor data: caught by the checksum.
    let ck = a.join("checkpoints/step_00000030.safetensors");
    let mut b = std::fs::read(&ck).unwrap();
    let n = b.len();
    b[n - 10] ^= 0x40;
    std::fs::write(&ck, &b).unwrap();
    let o = run(&["sample", ck.to_str().unwrap(), "--out", png.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("corrupt checkpoint: the tensor data does not match its checksum"), "{}", stderr(&o));

    // Not a checkpoint at all, and nothing to resume.
    let o = run(&["sample", "pipelines/mnist_mlp.ron", "--out", png.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a readable checkpoint"), "{}", stderr(&o));
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = mnist_run(&empty, &["--max-steps", "30", "--resume"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--resume: found no run of `mnist_mlp` with checkpoints (looked in "), "{}", stderr(&o));
}

#[test]
fn killed_run_resumes_from_its_last_checkpoint_with_a_playable_video() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut child = pipe()
        .args(["run", "pipelines/mnist_mlp.ron", "--max-steps", "100000", "--checkpoint-every", "10", "--out", out.to_str().unwrap()])
        .args(TINY)
        .args(["--set", "sampler.every=10"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_rows(&out, 6, &mut child);
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let (_, before) = metrics(&out);
    let ck = *checkpoint_steps(&out).last().expect("a checkpoint was written");
    let target = ck + 20;
    let o = run(&[
        "run",
        "pipelines/mnist_mlp.ron",
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        &target.to_string(),
        "--resume",
        "--device",
        "cpu",
        "--set",
        "d_step.model=Mlp(hidden: 32, layers: 1)",
        "--set",
        "g_step.model=Mlp(hidden: 32, layers: 1)",
        "--set",
        "log_every=10",
        "--set",
        "sampler.every=10",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let (_, after) = metrics(&out);
    let steps: Vec<u64> = after.iter().map(|r| r[0] as u64).collect();
    let want: Vec<u64> = std::iter::once(1).chain((10..=target).step_by(10)).collect();
    assert_eq!(steps, want, "one series, no duplicates from the killed part");
    // Rows up to the checkpoint are the killed run's own.
    for (x, y) in before.iter().zip(&after).take_while(|(x, _)| x[0] as u64 <= ck) {
        assert_eq!(x[2..6], y[2..6]);
    }
    #[cfg(feature = "video")]
    assert_eq!(pipe_stages::kinds::video::probe(&out.join("progress.mp4")).expect("playable").frames, target / 10);
}

#[test]
fn checkpoint_settings_are_checked_and_can_be_turned_off() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let o = run(&["check", "pipelines/mnist_mlp.ron", "--set", "checkpoint=(every: 0, keep: 0)"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("checkpoint `every` must be at least 1"), "{}", stderr(&o));
    assert!(stderr(&o).contains("checkpoint `keep` must be at least 1"), "{}", stderr(&o));
    let o = mnist_run(&tmp.path().join("x"), &["--max-steps", "10", "--checkpoint-every", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--checkpoint-every must be ≥ 1"), "{}", stderr(&o));
    // None: no checkpoints at all.
    let off = tmp.path().join("off");
    assert_eq!(mnist_run(&off, &["--max-steps", "10", "--set", "checkpoint=None"]).status.code(), Some(0));
    assert!(!off.join("checkpoints").exists());
    // --overwrite removes a run's checkpoints along with its other outputs.
    let on = tmp.path().join("on");
    assert_eq!(mnist_run(&on, &["--max-steps", "20", "--checkpoint-every", "10"]).status.code(), Some(0));
    assert_eq!(checkpoint_steps(&on), vec![10, 20]);
    assert_eq!(mnist_run(&on, &["--max-steps", "5", "--overwrite"]).status.code(), Some(0));
    assert_eq!(checkpoint_steps(&on), vec![5]);
}

#[test]
fn one_run_folder_one_process_and_runs_are_never_mixed() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    // A long run holds its folder: a second process is refused, naming the holder.
    let mut child = pipe()
        .args(["run", "pipelines/mnist_mlp.ron", "--max-steps", "100000", "--checkpoint-every", "10", "--out", a.to_str().unwrap()])
        .args(TINY)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_rows(&a, 3, &mut child);
    let o = mnist_run(&a, &["--max-steps", "100000", "--resume"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains(&format!("the run folder is in use by another pipe process (pid {})", child.id())), "{}", stderr(&o));
    let o = mnist_run(&a, &["--max-steps", "10", "--overwrite"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("in use by another pipe process"), "{}", stderr(&o));
    child.kill().unwrap();
    child.wait().unwrap();
    // Once it is gone (even killed), the folder is free again. (Steps counted from its last
    // checkpoint: how far the killed run got depends on the machine's speed.)
    let ck = *checkpoint_steps(&a).last().expect("a checkpoint was written");
    let end = ck + 20;
    let o = mnist_run(&a, &["--max-steps", &end.to_string(), "--checkpoint-every", "10", "--resume"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // A checkpoint from elsewhere into a folder holding another run: refused without --overwrite.
    let b = tmp.path().join("b");
    assert_eq!(mnist_run(&b, &["--max-steps", "20", "--set", "seed=9"]).status.code(), Some(0));
    let loose = tmp.path().join("best.safetensors");
    std::fs::copy(a.join(format!("checkpoints/step_{end:08}.safetensors")), &loose).unwrap();
    let (next, last) = ((end + 20).to_string(), end + 30);
    let o = mnist_run(&b, &["--max-steps", &next, "--resume", loose.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("that folder holds another run, which the checkpoint does not come from"), "{}", stderr(&o));
    let o = mnist_run(&b, &["--max-steps", &next, "--resume", loose.to_str().unwrap(), "--overwrite"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (_, rows) = metrics(&b);
    assert_eq!(rows.first().map(|r| r[0]), Some((end + 10) as f64), "only the resumed run's rows: {rows:?}");

    // Changed settings are named field by field.
    let o = mnist_run(
        &b,
        &["--max-steps", &last.to_string(), "--resume", "--set", "d_step.optimizer=Adam(lr: 1e-4, beta1: 0.5, beta2: 0.999)"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("resuming with settings that differ from the checkpoint's: d_step.optimizer.lr 0.0002 → 0.0001"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn resuming_a_run_whose_data_ended_says_so() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    // 10,000 digits, batch 64 (drop_last): one epoch is 156 steps.
    let o = mnist_run(&a, &["--max-steps", "400", "--set", "loader.epochs=1"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("done: 156 of 400 steps"), "{}", stderr(&o));
    let o = mnist_run(&a, &["--max-steps", "400", "--set", "loader.epochs=1", "--resume"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nothing to train: the data ended at step 156"), "{}", stderr(&o));
    let o = mnist_run(&a, &["--max-steps", "170", "--set", "loader.epochs=2", "--resume"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("done: 170 steps"), "{}", stderr(&o));
}
