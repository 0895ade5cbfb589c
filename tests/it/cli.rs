//! End-to-end tests of the `pipe` command: the shipped pipelines on the real data (set up by
//! scripts/setup.sh; those tests start with `mnist_root()`), and the engine on data made here
//! (synthetic IDX digits, image folders), which needs no download. CPU only, small step counts.

use std::path::Path;
use std::process::Command;

use crate::common;
use crate::common::{metrics, mnist_root, pipe, run, stderr, wait_for_rows};

/// mnist_mlp.ron without its eval stage, on synthetic 28×28 digits written in `dir`: for the
/// tests of the engine, which need no download (see `common::synthetic_idx`).
fn synthetic_mnist(dir: &Path) -> String {
    let data = common::synthetic_idx(&dir.join("idx"), 512, 28, 3);
    common::pipeline_on(dir, &data).display().to_string()
}

#[test]
fn mnist_mlp_50_steps_writes_every_output() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = run(&[
        "run",
        "pipelines/mnist_mlp.ron",
        "--device",
        "cpu",
        "--max-steps",
        "50",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "log_every=10",
        "--set",
        "sampler.every=20",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("done: 50 steps"), "{}", stderr(&o));

    // metrics.csv: header, rows at steps 1, 10, ..., 50, finite losses, gradient norms near 1.
    let (header, rows) = metrics(&out);
    assert_eq!(header, "step,elapsed_s,d_loss,g_loss,penalty,grad_norm,img_per_s,fid,kid,is");
    let steps: Vec<f64> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(steps, vec![1.0, 10.0, 20.0, 30.0, 40.0, 50.0]);
    for r in &rows {
        assert_eq!(r.len(), 10);
        // The eval stage scores the last step only (every 2000).
        let scored = r[0] == 50.0;
        assert!(r[..7].iter().all(|v| v.is_finite()) && r[7..].iter().all(|v| v.is_finite() == scored), "{r:?}");
        assert!(r[2] > 0.0 && r[3] > 0.0 && r[4] >= 0.0, "losses positive: {r:?}");
        assert!(r[5] > 0.0 && r[5] < 20.0, "gradient norm at x̂: {r:?}");
        assert!(r[6] > 0.0, "img/s: {r:?}");
    }
    // At the start D is random: its loss is about 2·ln 2 and the penalty pulls ‖∇D‖ towards 1.
    assert!((rows[0][2] - 2.0 * 2f64.ln()).abs() < 0.7, "first d_loss {}", rows[0][2]);
    assert!(rows[5][4] < rows[0][4], "the penalty falls: {} → {}", rows[0][4], rows[5][4]);

    // Sample grids at 20, 40 and the last step (50): 8×8 tiles of 28 px, 2 px padding.
    let mut grids: Vec<String> =
        std::fs::read_dir(out.join("samples")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    grids.sort();
    assert_eq!(grids, vec!["step_00000020.png", "step_00000040.png", "step_00000050.png"]);
    let g = image::open(out.join("samples/step_00000050.png")).unwrap().to_rgb8();
    assert_eq!(g.dimensions(), (8 * 30 + 2, 8 * 30 + 2));
    let distinct: std::collections::HashSet<_> = g.pixels().map(|p| p.0).collect();
    assert!(distinct.len() > 50, "the grid has varied pixels, not a blank picture");

    // The video decodes and holds one frame per grid.
    #[cfg(feature = "video")]
    {
        let info = pipe_stages::kinds::video::probe(&out.join("progress.mp4")).expect("progress.mp4 decodes");
        assert_eq!(info.frames, 3);
        assert_eq!(info.codec, "h264");
        assert_eq!((info.width, info.height), (242, 242));
    }

    // loss.png and the pipeline as run, with overrides applied.
    let plot = image::open(out.join("loss.png")).unwrap();
    assert_eq!((plot.width(), plot.height()), (1000, 900), "losses and, below, the FID of the last step");
    let ron = std::fs::read_to_string(out.join("pipeline.ron")).unwrap();
    let p = pipe::spec::parse(&ron, "pipeline.ron").map_err(|e| format!("{e:?}")).expect("pipeline.ron parses");
    assert_eq!(p.max_steps, 50);
    assert_eq!(p.log_every, 10);
    assert!(ron.contains("every: 20"), "{ron}");
}

#[test]
fn two_seeded_cpu_runs_give_identical_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let file = synthetic_mnist(tmp.path());
    // Losses (step, d_loss, g_loss, penalty, grad_norm) of a 20-step run with `seed`.
    let losses = |name: &str, seed: u64| {
        let out = tmp.path().join(name);
        let seed = format!("seed={seed}");
        let o = run(&[
            "run",
            &file,
            "--device",
            "cpu",
            "--max-steps",
            "20",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "log_every=5",
            "--set",
            &seed,
            "--set",
            "d_step.model=Mlp(hidden: 64)",
            "--set",
            "g_step.model=Mlp(hidden: 64)",
        ]);
        assert_eq!(o.status.code(), Some(0));
        metrics(&out).1.iter().map(|r| (r[0], r[2], r[3], r[4], r[5])).collect::<Vec<_>>()
    };
    let a = losses("a", 7);
    assert_eq!(a.len(), 5);
    assert_eq!(a, losses("b", 7));
    // A different seed gives different losses (the comparison above can fail).
    assert_ne!(a, losses("c", 8));
}

/// Write a folder of small RGBA PNGs (coloured discs on transparency) and one corrupt file.
fn png_folder(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..n {
        let img = image::RgbaImage::from_fn(20, 20, |x, y| {
            let (dx, dy) = (x as i32 - 10, y as i32 - 10);
            if dx * dx + dy * dy < 49 {
                image::Rgba([(i * 40 % 256) as u8, 200, 50, 255])
            } else {
                image::Rgba([0, 0, 0, 0])
            }
        });
        let p = if i % 2 == 0 { dir.join(format!("{i}.png")) } else { dir.join("sub").join(format!("{i}.png")) };
        img.save(p).unwrap();
    }
    std::fs::write(dir.join("broken.png"), b"this is not a png").unwrap();
}

#[test]
fn stages_swap_in_ron_alone_penalties_and_loaders() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("imgs");
    png_folder(&folder, 12);
    let small = ["--set", "d_step.model=Mlp(hidden: 32)", "--set", "g_step.model=Mlp(hidden: 32)", "--set", "log_every=1"];
    // Folder loader in place of IDX, 16×16 grey; each penalty in turn.
    for (penalty, perturb) in [("Dragan(lambda: 10.0)", "Dragan()"), ("WganGp(lambda: 10.0, k: 1.0)", "Off"), ("None", "Off")] {
        let out = tmp.path().join(format!("run-{}", &penalty[..4]));
        let file = tmp.path().join("p.ron");
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/mnist_mlp.ron")).unwrap();
        let text = common::without_eval(&text).replace(
            r#"(name: "loader", kind: IdxLoader(root: "data/mnist", split: Train, batch: 64)),"#,
            &format!(r#"(name: "loader", kind: FolderLoader(root: "{}", size: 16, channels: Grey, batch: 4)),"#, folder.display()),
        );
        std::fs::write(&file, text).unwrap();
        let mut args = vec!["run", file.to_str().unwrap(), "--device", "cpu", "--max-steps", "6", "--out", out.to_str().unwrap()];
        args.extend(small);
        let pen = format!("d_step.penalty={penalty}");
        let per = format!("augment.perturb={perturb}");
        args.extend(["--set", &pen, "--set", &per]);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(0), "{penalty}");
        assert!(stderr(&o).contains("broken.png"), "the corrupt file is named in a warning: {}", stderr(&o));
        let (_, rows) = metrics(&out);
        assert_eq!(rows.len(), 6);
        let last = rows.last().unwrap();
        if penalty == "None" {
            assert_eq!(last[4], 0.0, "no penalty");
            assert!(last[5].is_nan(), "no gradient norm without a penalty (an empty field)");
        } else {
            assert!(last[4] > 0.0, "{penalty}: penalty {}", last[4]);
        }
        let g = image::open(out.join("samples/step_00000006.png")).unwrap();
        assert_eq!(g.width(), 8 * 18 + 2);
    }
}

#[test]
fn bad_pipeline_files_and_arguments_exit_2_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("bad.ron");
    std::fs::write(&f, "Pipeline(\n  name: \"x\",\n  stages: [ (name: \"loader\", kind: IdxLoadr(root: \"x\")) ],\n)\n").unwrap();
    let o = run(&["check", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("bad.ron:3:"), "position: {e}");
    assert!(e.contains("IdxLoadr"), "{e}");

    // A model that can't take the data: DCGAN on 28×28 digits, refused before training.
    let file = synthetic_mnist(tmp.path());
    let o = run(&[
        "run",
        file.as_str(),
        "--device",
        "cpu",
        "--set",
        "d_step.model=Dcgan(width: 8)",
        "--out",
        tmp.path().join("r").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("`loader`") && e.contains("`d_step`") && e.contains("28×28"), "{e}");

    let o = run(&["run", file.as_str(), "--set", "nosuch.field=1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no stage named `nosuch`"), "{}", stderr(&o));

    let o = run(&["run", file.as_str(), "--set", "d_step.penalty=Dragan(lambda: -1.0)"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("lambda must be ≥ 0"), "{}", stderr(&o));

    let o = run(&[
        "run",
        "pipelines/mnist_mlp.ron",
        "--set",
        "loader.root=/nonexistent/folder",
        "--device",
        "cpu",
        "--out",
        tmp.path().join("r2").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/folder"), "{}", stderr(&o));

    let o = run(&["run", "pipelines/mnist_mlp.ron", "--frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn shipped_pipelines_pass_check() {
    let files = ["mnist_mlp", "mnist_dcgan", "irasutoya_mlp", "irasutoya", "irasutoya_small", "fashion_dcgan"]
        .map(|n| format!("pipelines/{n}.ron"));
    let mut args = vec!["check"];
    args.extend(files.iter().map(String::as_str));
    let o = run(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = s.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), files.len(), "{s}");
    for (f, l) in files.iter().zip(&lines) {
        assert!(l.starts_with(&format!("{f}: ok (")), "{s}");
        assert!(l.contains("loader → augment → d_step → g_step → sampler → video → tensorboard"), "{s}");
        // The full-size illustration DCGAN also writes a GIF: a third sink on the sampler.
        assert_eq!(l.ends_with("sampler → video → tensorboard → gif)"), f.ends_with("/irasutoya.ron"), "{s}");
    }
}

/// mnist_mlp (without its eval stage, on synthetic digits) with a Gif stage beside the video.
fn mnist_with_gif(dir: &Path, gif: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(synthetic_mnist(dir)).unwrap();
    let video = r#"(name: "video", input: ["sampler"], kind: Video(path: "progress.mp4", fps: 4)),"#;
    assert!(text.contains(video));
    let text = common::without_eval(&text).replace(video, &format!("{video}\n        (name: \"gif\", input: [\"sampler\"], kind: {gif}),"));
    let file = dir.join("gif.ron");
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn a_gif_stage_writes_a_capped_gif_ending_with_the_last_grid() {
    use image::AnimationDecoder;
    let tmp = tempfile::tempdir().unwrap();
    let file = mnist_with_gif(tmp.path(), "Gif(max_frames: 5)");
    let out = tmp.path().join("run");
    let o = run(&[
        "run",
        file.to_str().unwrap(),
        "--device",
        "cpu",
        "--max-steps",
        "16",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "sampler.every=2",
        "--set",
        "d_step.model=Mlp(hidden: 32)",
        "--set",
        "g_step.model=Mlp(hidden: 32)",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let gif = out.join("progress.gif");
    assert!(stderr(&o).contains(&format!("GIF {}", gif.display())), "the summary names the GIF: {}", stderr(&o));
    assert!(!out.join("progress.gif.partial").exists());
    let mut grids: Vec<_> = std::fs::read_dir(out.join("samples")).unwrap().map(|e| e.unwrap().path()).collect();
    grids.sort();
    assert_eq!(grids.len(), 8, "grids at steps 2, 4, …, 16");
    // 8 grids, at most 5 frames: every 2nd (⌈7 / 4⌉), then the last.
    let frames = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(std::fs::File::open(&gif).unwrap()))
        .unwrap()
        .into_frames()
        .collect_frames()
        .unwrap();
    assert!((2..=5).contains(&frames.len()), "{} frames", frames.len());
    assert_eq!(frames.len(), 5);
    let delays: Vec<u32> = frames.iter().map(|f| f.delay().numer_denom_ms()).map(|(n, d)| n / d).collect();
    assert_eq!(delays, vec![250, 250, 250, 250, 2000]);
    // The last frame is the last grid (242×242, under max_side: not scaled), the first the
    // first; GIF's palette may move colours a little.
    assert!(grids.last().unwrap().ends_with("step_00000016.png"));
    let worst = |frame: &image::RgbaImage, png: &Path| {
        let grid = image::open(png).unwrap().to_rgb8();
        assert_eq!(frame.dimensions(), grid.dimensions());
        let spots =
            [(0, 0), (15, 15), (40, 100), (121, 121), (200, 37), (241, 241)].into_iter().chain((0..242).map(|i| (i, (i * 7) % 242)));
        spots
            .flat_map(|(x, y)| (0..3).map(move |c| (x, y, c)))
            .map(|(x, y, c)| (i32::from(frame.get_pixel(x, y).0[c]) - i32::from(grid.get_pixel(x, y).0[c])).abs())
            .max()
            .unwrap()
    };
    let last = worst(frames.last().unwrap().buffer(), grids.last().unwrap());
    assert!(last <= 8, "last frame vs the last grid: largest difference {last}");
    let first = worst(frames[0].buffer(), &grids[0]);
    assert!(first <= 8, "first frame vs the first grid: largest difference {first}");
}

#[test]
fn check_refuses_a_gif_over_run_files_or_with_another_extension() {
    let tmp = tempfile::tempdir().unwrap();
    let file = mnist_with_gif(tmp.path(), "Gif(max_frames: 5)");
    let f = file.to_str().unwrap();
    let o = run(&["check", f]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for (set, wants) in [
        (
            r#"gif.path="metrics.csv""#,
            vec!["stage `gif` (Gif): path metrics.csv would overwrite the run's own metrics.csv", "`path` is \"metrics.csv\""],
        ),
        (r#"gif.path="x.mp4""#, vec!["stage `gif` (Gif): `path` is \"x.mp4\": the stage writes an animated GIF, so give it a .gif name"]),
        (r#"gif.path="progress.mp4""#, vec!["stages `video` and `gif` both write progress.mp4"]),
        ("gif.max_side=8", vec!["stage `gif` (Gif): `max_side` is 8, expected 16 to 4096 pixels"]),
    ] {
        let o = run(&["check", f, "--set", set]);
        assert_eq!(o.status.code(), Some(2), "{set}");
        for want in wants {
            assert!(stderr(&o).contains(want), "{set}: `{want}` not in {}", stderr(&o));
        }
    }
    let o = run(&["stages", "Gif"]);
    assert_eq!(o.status.code(), Some(0));
    let d = common::stdout(&o);
    assert!(d.contains("input:  frame: RGB8 picture on cpu") && d.contains("max_frames: integer") && d.contains("default: 24"), "{d}");
}

#[test]
fn fashion_dcgan_pads_28_to_32_and_trains() {
    assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist").exists(), "run scripts/setup.sh");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = run(&[
        "run",
        "pipelines/fashion_dcgan.ron",
        "--device",
        "cpu",
        "--max-steps",
        "20",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "loader.pad=2",
        "--set",
        "d_step.model=Dcgan(width: 8)",
        "--set",
        "g_step.model=Dcgan(width: 8)",
        "--set",
        "sampler.every=10",
        "--set",
        "eval.n=100",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // 8×8 tiles of 32 px (28 padded by 2 on each side) with 2 px between them.
    let g = image::open(out.join("samples/step_00000020.png")).unwrap();
    assert_eq!((g.width(), g.height()), (8 * 32 + 9 * 2, 8 * 32 + 9 * 2));
    let (_, rows) = metrics(&out);
    assert!(rows.iter().all(|r| r[2].is_finite() && r[3].is_finite()), "{rows:?}");
}

#[test]
fn mnist_dcgan_trains_infogan_style_nets_on_28_by_28_digits() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = run(&[
        "run",
        "pipelines/mnist_dcgan.ron",
        "--device",
        "cpu",
        "--max-steps",
        "20",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "d_step.model=InfoGan(width: 4, hidden: 16)",
        "--set",
        "g_step.model=InfoGan(width: 4, hidden: 16)",
        "--set",
        "sampler.every=10",
        "--set",
        "log_every=10",
        "--set",
        "eval.every=10",
        "--set",
        "eval.n=200",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // 8×8 tiles of 28 px (no padding needed) with 2 px between them.
    let g = image::open(out.join("samples/step_00000020.png")).unwrap();
    assert_eq!((g.width(), g.height()), (8 * 28 + 9 * 2, 8 * 28 + 9 * 2));
    let (_, rows) = metrics(&out);
    assert_eq!(rows.iter().map(|r| r[0]).collect::<Vec<_>>(), vec![1.0, 10.0, 20.0]);
    // The eval stage scored steps 10 and 20 (LeNet FID ≥ 0, IS in [1, 10]).
    for r in &rows[1..] {
        assert!(r[2].is_finite() && r[3].is_finite() && r[7] >= 0.0 && (1.0..=10.0).contains(&r[9]), "{r:?}");
    }
    // A DCGAN cannot take 28×28: the caps check says what InfoGan would.
    let o = run(&["check", "pipelines/mnist_dcgan.ron", "--set", "d_step.model=Dcgan(width: 8)"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("stage `d_step` (DStep): caps mismatch: model Dcgan takes batch[B,C,S,S] with S = 4·2^k"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_previous_run_is_never_mixed_with_a_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let file = synthetic_mnist(tmp.path());
    let out = tmp.path().join("run");
    let small = ["--device", "cpu", "--max-steps", "2", "--set", "d_step.model=Mlp(hidden: 16)", "--set", "g_step.model=Mlp(hidden: 16)"];
    let mut args = vec!["run", file.as_str(), "--out", out.to_str().unwrap()];
    args.extend(small);
    assert_eq!(run(&args).status.code(), Some(0));
    // Same --out again: refused, the first run untouched.
    let o = run(&args);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already holds a run") && stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    assert!(out.join("samples/step_00000002.png").exists());
    // --overwrite replaces it.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let mut args2 = args.clone();
    args2.extend(["--overwrite", "--set", "sampler.every=1"]);
    assert_eq!(run(&args2).status.code(), Some(0));
    assert!(out.join("samples/step_00000001.png").exists());
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine", "files that aren't run outputs stay");
    // The default folder moves on to runs/<name>-2 when runs/<name> holds a run.
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(cwd.join("pipelines")).unwrap();
    std::fs::copy(&file, cwd.join("pipelines/m.ron")).unwrap();
    for expect in ["runs/mnist_mlp", "runs/mnist_mlp-2"] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pipe"));
        let mut a = vec!["run", "pipelines/m.ron"];
        a.extend(small);
        let o = c.current_dir(&cwd).args(&a).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(stderr(&o).contains(&format!("outputs in {expect}/")), "{}", stderr(&o));
        assert!(cwd.join(expect).join("metrics.csv").exists());
    }
}

/// `pipe` starts without LD_LIBRARY_PATH (libtorch's folder is embedded) and keeps
/// libtorch_cuda in its link, without which CUDA silently disappears on a GPU machine.
#[test]
fn binary_embeds_libtorch_and_links_torch_cuda() {
    let out = Command::new("readelf").args(["-d", env!("CARGO_BIN_EXE_pipe")]).output().expect("readelf (binutils) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[libtorch_cuda.so]"), "libtorch_cuda.so must be NEEDED:\n{text}");
    let runpath = text.lines().find(|l| l.contains("RUNPATH") || l.contains("RPATH")).expect("an rpath");
    assert!(runpath.contains("torch/lib"), "{runpath}");
    let o = pipe().env_remove("LD_LIBRARY_PATH").arg("--version").output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("pipe "));
}

#[test]
fn when_the_data_ends_the_last_step_is_logged_and_sampled() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("imgs");
    png_folder(&folder, 10); // 10 good images + 1 corrupt: batch 4 → 2 steps per epoch
    let out = tmp.path().join("run");
    let root = format!("loader.root={}", folder.display());
    let o = run(&[
        "run",
        "pipelines/irasutoya_mlp.ron",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
        "--set",
        &root,
        "--set",
        "loader.size=8",
        "--set",
        "loader.batch=4",
        "--set",
        "loader.epochs=2",
        "--set",
        "log_every=100",
        "--set",
        "d_step.model=Mlp(hidden: 8)",
        "--set",
        "g_step.model=Mlp(hidden: 8)",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let e = stderr(&o);
    assert!(e.contains("done: 4 of 20000 steps") && e.contains("stopped early"), "{e}");
    let (_, rows) = metrics(&out);
    assert_eq!(rows.iter().map(|r| r[0]).collect::<Vec<_>>(), vec![1.0, 4.0], "first and last step logged");
    assert!(out.join("samples/step_00000004.png").exists());
}

#[test]
fn ctrl_c_drains_exits_130_and_leaves_a_playable_video() {
    let tmp = tempfile::tempdir().unwrap();
    let file = synthetic_mnist(tmp.path());
    let out = tmp.path().join("run");
    let mut child = pipe()
        .args(["run", file.as_str(), "--device", "cpu", "--max-steps", "100000", "--out", out.to_str().unwrap()])
        .args([
            "--set",
            "log_every=5",
            "--set",
            "sampler.every=10",
            "--set",
            "d_step.model=Mlp(hidden: 32)",
            "--set",
            "g_step.model=Mlp(hidden: 32)",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_rows(&out, 4, &mut child);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
    // The last step is in metrics.csv and has its grid; the video holds every grid.
    let (_, rows) = metrics(&out);
    let last = rows.last().unwrap()[0] as u64;
    assert!(out.join(format!("samples/step_{last:08}.png")).exists(), "grid of the last step {last}");
    let grids = std::fs::read_dir(out.join("samples")).unwrap().count() as u64;
    assert!(!out.join("progress.mp4.partial").exists());
    #[cfg(feature = "video")]
    assert_eq!(pipe_stages::kinds::video::probe(&out.join("progress.mp4")).expect("playable").frames, grids);
    assert!(out.join("loss.png").exists());
}

#[test]
fn a_second_signal_stops_at_once_without_crashing() {
    let tmp = tempfile::tempdir().unwrap();
    let file = synthetic_mnist(tmp.path());
    // Tries 0–2: a second signal 0.3 s after the first stops at once. Try 3: two signals
    // sent together (as GNU timeout signals a process and then its group) are one request,
    // and the run drains.
    for i in 0..4 {
        let out = tmp.path().join(format!("run{i}"));
        let mut child = pipe()
            .args(["run", file.as_str(), "--device", "cpu", "--max-steps", "100000", "--out", out.to_str().unwrap()])
            .args(["--set", "log_every=5"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_rows(&out, 2, &mut child);
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        if i < 3 {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(130), "try {i}: {:?} {}", o.status, stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
        let at_once = stderr(&o).contains("stopped at once (second interrupt)");
        if i < 3 {
            // Unless the drain had already ended within the 0.3 s.
            assert!(at_once || stderr(&o).contains("interrupted: "), "try {i}: {}", stderr(&o));
        } else {
            assert!(!at_once && stderr(&o).contains("interrupted: "), "try {i}: {}", stderr(&o));
        }
    }
}
