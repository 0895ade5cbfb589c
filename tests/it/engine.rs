//! The pipeline engine as a user meets it: checks before anything runs (with file:line:col),
//! self-description, failure of a stage mid-run, per-stage statistics, flat memory.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::{pipe, stderr, stdout};

fn shipped(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines").join(name)).unwrap()
}

/// Write `text` to a file in `dir` and run `pipe check` on it.
fn check(dir: &Path, text: &str) -> (Output, PathBuf) {
    let f = dir.join("p.ron");
    std::fs::write(&f, text).unwrap();
    (pipe().args(["check", f.to_str().unwrap()]).output().unwrap(), f)
}

/// Assert a check fails with exit 2 and an error at `line:col` containing every part.
fn assert_error_at(o: &Output, f: &Path, line: usize, col: usize, parts: &[&str]) {
    assert_eq!(o.status.code(), Some(2), "{}", stderr(o));
    let e = stderr(o);
    let at = format!("{}:{line}:{col}: ", f.display());
    let msg = e.lines().find(|l| l.contains(&at)).unwrap_or_else(|| panic!("no error at {line}:{col} in:\n{e}"));
    for p in parts {
        assert!(msg.contains(p), "`{p}` missing in: {msg}");
    }
}

const MNIST: &str = "pipelines/mnist_mlp.ron";

#[test]
fn each_validation_error_is_reported_with_its_position() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = shipped("mnist_mlp.ron");
    let line_of = |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let col_of = |text: &str, needle: &str, word: &str| {
        let l = text.lines().find(|l| l.contains(needle)).unwrap();
        l[..l.find(word).unwrap()].chars().count() + 1
    };

    // RON syntax error.
    let t = base.replace("seed: 0,", "seed: 0,,");
    let (o, f) = check(d, &t);
    assert_error_at(&o, &f, line_of(&t, "seed: 0,,"), col_of(&t, "seed: 0,,", ",,") + 1, &["Expected identifier"]);

    // Unknown stage kind: the known kinds listed, the nearest suggested.
    let t = base.replace("kind: Sampler(", "kind: Samplr(");
    let (o, f) = check(d, &t);
    let l = line_of(&t, "Samplr(");
    assert_error_at(
        &o,
        &f,
        l,
        col_of(&t, "Samplr(", "Samplr"),
        &["stage `sampler`", "`Samplr`", "`IdxLoader`", "`Video`", "did you mean `Sampler`?"],
    );

    // Unknown field, with the nearest; two stages wrong at once: both reported.
    let t = base.replace("n_critic: 1,", "n_critc: 1,").replace("latent: 62,", "latnt: 62,");
    let (o, f) = check(d, &t);
    assert_error_at(&o, &f, line_of(&t, "n_critc"), col_of(&t, "n_critc", "n_critc"), &["`n_critc`", "did you mean `n_critic`?"]);
    assert_error_at(&o, &f, line_of(&t, "latnt"), col_of(&t, "latnt", "latnt"), &["`latnt`", "did you mean `latent`?"]);

    // Missing field: a stage without a kind.
    let t = base.replace(
        r#"(name: "video", input: ["sampler"], kind: Video(path: "progress.mp4", fps: 4)),"#,
        r#"(name: "video", input: ["sampler"]),"#,
    );
    let (o, f) = check(d, &t);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains(&format!("{}:{}:", f.display(), line_of(&t, r#"(name: "video""#))) && stderr(&o).contains("kind"),
        "{}",
        stderr(&o)
    );

    // Wrong value type.
    let t = base.replace("n_critic: 1,", "n_critic: \"one\",");
    let (o, f) = check(d, &t);
    assert_error_at(&o, &f, line_of(&t, "n_critic: \"one\""), col_of(&t, "n_critic: \"one\"", "\"one\""), &["stage `d_step`", "Expected"]);

    // Out-of-range values: λ < 0 and lr ≤ 0 both reported, each at its own field inside the
    // setting (`lambda` in `Dragan(..)`, `lr` in `Adam(..)`).
    let t = base
        .replace("penalty: Dragan(lambda: 10.0, k: 1.0)", "penalty: Dragan(lambda: -1.0, k: 1.0)")
        .replace("latent: 62,\n            optimizer: Adam(lr: 2e-4,", "latent: 62,\n            optimizer: Adam(lr: 0.0,");
    let (o, f) = check(d, &t);
    assert_error_at(
        &o,
        &f,
        line_of(&t, "lambda: -1.0"),
        col_of(&t, "lambda: -1.0", "lambda"),
        &["stage `d_step`", "lambda must be ≥ 0, got -1"],
    );
    assert_error_at(
        &o,
        &f,
        line_of(&t, "Adam(lr: 0.0"),
        col_of(&t, "Adam(lr: 0.0", "lr"),
        &["stage `g_step`", "lr must be a finite number > 0, got 0"],
    );

    // A link to a stage that doesn't exist.
    let t = base.replace(r#"input: ["augment"]"#, r#"input: ["augmnt"]"#);
    let (o, f) = check(d, &t);
    assert_error_at(
        &o,
        &f,
        line_of(&t, "augmnt"),
        col_of(&t, "augmnt", "input"),
        &["input `augmnt` doesn't match any stage", "did you mean `augment`?"],
    );

    // A cycle.
    let t = base.replace(r#"(name: "augment", input: ["loader"]"#, r#"(name: "augment", input: ["d_step"]"#);
    let (o, f) = check(d, &t);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is part of a cycle") && stderr(&o).contains(&format!("{}:", f.display())), "{}", stderr(&o));

    // A required port left unconnected.
    let t = base.replace(r#"(name: "g_step", input: ["d_step"], kind"#, r#"(name: "g_step", kind"#);
    let (o, f) = check(d, &t);
    assert_error_at(
        &o,
        &f,
        line_of(&t, r#"(name: "g_step""#),
        col_of(&t, r#"(name: "g_step""#, "name"),
        &["`g_step` (GStep) has no input", "input: [\"d_step\"]"],
    );

    // Caps mismatch: 28×28 grey digits into a DCGAN; both stages and both caps named.
    let t = base.replace("model: Mlp(hidden: 512, layers: 2),\n            penalty", "model: Dcgan(width: 8),\n            penalty");
    let (o, f) = check(d, &t);
    assert_error_at(
        &o,
        &f,
        line_of(&t, "model: Dcgan(width: 8)"),
        col_of(&t, "model: Dcgan(width: 8)", "model"),
        &[
            "caps mismatch",
            "`loader` produces batch[B,1,28,28] f32 in [-1, 1] on cpu",
            "`d_step` (DStep): caps mismatch: model Dcgan takes batch[B,C,S,S]",
        ],
    );
}

/// Positions come from the parser's view of the file: a comment or a string that names a
/// setting never stands in for it (issue 15).
#[test]
fn positions_ignore_comments_and_strings_that_name_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let base = shipped("mnist_mlp.ron");
    let t = base
        .replacen("n_critic: 1,", "// note: n_critic: 5 is the paper's; lr: 1 /* n_critic: 2 */\n            n_critic: 0,", 1)
        .replacen("Pipeline(", "/* log_every: 3, n_critic: 4 */ Pipeline(", 1)
        .replacen("log_every: 50,", "log_every: 0, // log_every: 50 was here", 1);
    let (o, f) = check(tmp.path(), &t);
    let line_col = |needle: &str, word: &str| {
        let l = t.lines().position(|l| l.contains(needle)).unwrap();
        (l + 1, t.lines().nth(l).unwrap().find(word).unwrap() + 1)
    };
    let (l, c) = line_col("n_critic: 0,", "n_critic");
    assert_error_at(&o, &f, l, c, &["stage `d_step` (DStep): n_critic must be 1 to 1000, got 0"]);
    let (l, c) = line_col("log_every: 0,", "log_every");
    assert_error_at(&o, &f, l, c, &["log_every must be at least 1, got 0"]);

    // Two stages of one name: each problem is placed in its own stage, not the first.
    let video = r#"(name: "video", input: ["sampler"], kind: Video(path: "progress.mp4", fps: 4)),"#;
    let t = base.replacen(
        video,
        &format!("{video}\n        (name: \"video\", input: [\"sampler\"], kind: Video(path: \"other.mp4\", fps: 0)),"),
        1,
    );
    assert!(t.contains("other.mp4"), "the shipped file's video line changed");
    let (o, f) = check(tmp.path(), &t);
    let l = t.lines().position(|l| l.contains("other.mp4")).unwrap() + 1;
    let line = t.lines().nth(l - 1).unwrap();
    assert_error_at(&o, &f, l, line.find("fps: 0").unwrap() + 1, &["`fps` is 0"]);
    assert_error_at(&o, &f, l, line.find("name").unwrap() + 1, &["stage name `video` is used twice"]);
}

#[test]
fn overrides_are_checked_like_the_file() {
    for (set, want) in [
        ("d_step.penalty=Dragan(lambda: -1.0)", "lambda must be ≥ 0"),
        ("d_step.n_critc=5", "did you mean `n_critic`?"),
        ("d_stp.n_critic=5", "no stage named `d_stp`"),
        ("d_step.model=Dcgan(width: 8)", "caps mismatch"),
        ("video.path=\"metrics.csv\"", "would overwrite the run's own metrics.csv"),
        ("video.path=\"samples/v.mp4\"", "inside the samples folder"),
    ] {
        let o = pipe().args(["check", MNIST, "--set", set]).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{set}");
        assert!(stderr(&o).contains(want), "{set}: {}", stderr(&o));
        let o = pipe().args(["run", MNIST, "--device", "cpu", "--set", set]).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{set}");
    }
}

#[test]
fn every_problem_of_one_stage_is_reported_and_attributed_to_the_override() {
    let o = pipe()
        .args(["check", MNIST, "--set", "d_step.penalty=Dragan(lambda: -1.0)", "--set", "d_step.n_critic=0"])
        .args(["--set", "d_step.optimizer=Adam(lr: -1.0, beta1: 2.0)"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    // Each problem names the override that gave the value.
    let adam = "d_step.optimizer=Adam(lr: -1.0, beta1: 2.0)";
    for (want, set) in [
        ("lambda must be ≥ 0", "d_step.penalty=Dragan(lambda: -1.0)"),
        ("n_critic must be 1 to 1000, got 0", "d_step.n_critic=0"),
        ("lr must be a finite number > 0", adam),
        ("beta1 must be in [0, 1), got 2", adam),
    ] {
        let line = e.lines().find(|l| l.contains(want)).unwrap_or_else(|| panic!("`{want}` missing in:\n{e}"));
        assert!(line.contains(&format!("mnist_mlp.ron (from --set {set}): stage `d_step`")), "{line}");
    }
    // The same field set twice: the last --set is the one that took effect, and is named.
    let o = pipe().args(["check", MNIST, "--set", "d_step.n_critic=0", "--set", "d_step.n_critic=2000"]).output().unwrap();
    assert!(
        stderr(&o)
            .contains("mnist_mlp.ron (from --set d_step.n_critic=2000): stage `d_step` (DStep): n_critic must be 1 to 1000, got 2000"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn stages_and_graph_describe_themselves() {
    let o = pipe().args(["stages"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    // One line per registered kind, in registry order (a kind added to the registry shows up
    // here with no change to this test).
    let out = stdout(&o);
    let names: Vec<&str> = out.lines().map(|l| l.split_whitespace().next().unwrap_or("")).collect();
    assert_eq!(names, pipe_stages::kinds::StageKind::NAMES, "{out}");
    assert!(pipe_stages::kinds::StageKind::NAMES.len() >= 9);
    assert!(stdout(&o).lines().any(|l| l.starts_with("Gif ")), "{}", stdout(&o));
    let o = pipe().args(["stages", "FolderLoader"]).output().unwrap();
    let s = stdout(&o);
    assert!(s.contains("output: batch[B,C,S,S] f32 in [-1, 1] on cpu (C from channels, S = size)"), "{s}");
    assert!(s.contains("root: text") && s.contains("fit: Fit: Pad | Crop") && s.contains("default: 64"), "{s}");
    let o = pipe().args(["stages", "Vidoe"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("did you mean `Video`?"), "{}", stderr(&o));
    let o = pipe().args(["graph", MNIST]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("\"augment\" -> \"d_step\" [label=\"batch\"];"), "{}", stdout(&o));
    // --set applies (and is checked) as for pipe run.
    let o = pipe().args(["graph", MNIST, "--set", "d_step.n_critic=0"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("n_critic must be 1 to 1000, got 0"), "{}", stderr(&o));
}

fn mnist_ok() {
    assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist/train-images-idx3-ubyte").exists(), "run scripts/setup.sh first");
}

// Needs the fault-injection hooks (scripts/test.sh builds them in).
#[cfg(feature = "fault-injection")]
#[test]
fn a_stage_that_panics_stops_the_run_with_exit_1_and_a_playable_video() {
    mnist_ok();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = pipe()
        .env("PIPE_TEST_PANIC", "g_step:25")
        .env_remove("RUST_BACKTRACE")
        .args(["run", MNIST, "--device", "cpu", "--max-steps", "1000", "--out", out.to_str().unwrap()])
        .args([
            "--set",
            "sampler.every=10",
            "--set",
            "log_every=5",
            "--set",
            "d_step.model=Mlp(hidden: 32)",
            "--set",
            "g_step.model=Mlp(hidden: 32)",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("stage `g_step` failed: GStep panicked: injected test fault"), "{e}");
    assert!(!e.contains("stack backtrace"), "no backtrace without RUST_BACKTRACE: {e}");
    // Grids of steps 10 and 20 were written before the panic at the 26th item; the video holds them.
    assert!(out.join("samples/step_00000020.png").exists());
    #[cfg(feature = "video")]
    assert_eq!(pipe_stages::kinds::video::probe(&out.join("progress.mp4")).expect("playable").frames, 2);
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(csv.lines().count() >= 5, "{csv}");
}

#[test]
fn stats_show_where_the_time_goes() {
    mnist_ok();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = pipe()
        .args(["run", MNIST, "--device", "cpu", "--max-steps", "30", "--stats", "--out", out.to_str().unwrap()])
        .args(["--set", "d_step.model=Mlp(hidden: 32)", "--set", "g_step.model=Mlp(hidden: 32)", "--set", "sampler.every=10"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("bottleneck"), "{}", stderr(&o));
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    let stages = stats.as_array().unwrap();
    assert_eq!(stages.len(), 8, "seven stages (TensorBoard the seventh) and mnist_mlp's eval");
    for s in stages {
        let sum =
            ["busy", "waiting_for_input", "waiting_for_output", "waiting_for_handover"].iter().map(|k| s[k].as_f64().unwrap()).sum::<f64>();
        assert!((sum - 1.0).abs() < 1e-6, "{s}");
        assert!(s["queue_max"].as_u64().unwrap() <= s["queue_capacity"].as_u64().unwrap(), "{s}");
    }
    let by = |n: &str| stages.iter().find(|s| s["stage"] == n).unwrap().clone();
    assert_eq!(by("loader")["items_out"], 30);
    assert_eq!(by("d_step")["items_in"], 30);
    assert_eq!(by("g_step")["items_in"], 30);
    // Grids at 10, 20, 30, plus the eval images of step 30, which g_step's fan-out also hands
    // the sampler (it passes them by); the eval stage sees the same four.
    assert_eq!(by("sampler")["items_in"], 4);
    assert_eq!(by("sampler")["items_out"], 3);
    assert_eq!(by("eval")["items_in"], 4);
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap()
}

#[test]
fn memory_stays_flat_from_step_200_to_2000() {
    mnist_ok();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut child = pipe()
        .args(["run", MNIST, "--device", "cpu", "--max-steps", "2400", "--out", out.to_str().unwrap()])
        .args([
            "--set",
            "log_every=50",
            "--set",
            "sampler.every=100",
            "--set",
            "d_step.model=Mlp(hidden: 64)",
            "--set",
            "g_step.model=Mlp(hidden: 64)",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let step = || -> u64 {
        std::fs::read_to_string(out.join("metrics.csv"))
            .ok()
            .and_then(|t| t.lines().last().and_then(|l| l.split(',').next()).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    };
    let mut at_200 = None;
    let mut at_2000 = None;
    let t = std::time::Instant::now();
    while at_2000.is_none() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t.elapsed().as_secs() < 600, "too slow");
        let s = step();
        if s >= 200 && at_200.is_none() {
            at_200 = Some(rss_kib(child.id()));
        }
        if s >= 2000 {
            at_2000 = Some(rss_kib(child.id()));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.wait();
    let (a, b) = (at_200.unwrap() as f64, at_2000.unwrap() as f64);
    eprintln!("RSS at step 200: {a} KiB, at step 2000: {b} KiB ({:+.1}%)", 100.0 * (b / a - 1.0));
    assert!(b <= 1.10 * a, "RSS grew from {a} KiB to {b} KiB");
}
