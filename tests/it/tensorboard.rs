//! The `TensorBoard` stage, read back with TensorBoard's own reader (the `tensorboard` package
//! in the venv scripts/setup.sh makes): scalars equal metrics.csv's, grids keep their size, a
//! resumed run continues the log with no step twice.

use crate::common::*;
use std::path::Path;

/// What TensorBoard's `EventAccumulator` reads from `logdir`: one line per scalar
/// (`S tag step value`), image (`I tag step width height`) and text (`T tag step first-line`).
fn tensorboard_read(logdir: &Path) -> Vec<String> {
    let script = r#"
import sys, warnings
warnings.filterwarnings("ignore")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"images": 0, "scalars": 0, "tensors": 0})
ea.Reload()
tags = ea.Tags()
for t in tags["scalars"]:
    for e in ea.Scalars(t):
        print("S", t, e.step, repr(e.value))
for t in tags["images"]:
    for e in ea.Images(t):
        print("I", t, e.step, e.width, e.height)
for t in tags["tensors"]:
    for e in ea.Tensors(t):
        print("T", t, e.step, e.tensor_proto.string_val[0].decode().strip().splitlines()[0])
"#;
    let out = std::process::Command::new(python()).arg("-c").arg(script).arg(logdir).output().expect("python starts");
    assert!(out.status.success(), "TensorBoard's reader failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.to_string()).collect()
}

/// pipelines/mnist_mlp.ron, which has a TensorBoard stage writing to `tb`.
fn pipeline_with_tensorboard() -> &'static str {
    let file = "pipelines/mnist_mlp.ron";
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    assert!(text.contains("kind: TensorBoard(logdir: \"tb\")"));
    file
}

/// The scalars TensorBoard read, as (tag, step, value).
fn scalars(lines: &[String]) -> Vec<(String, u64, f64)> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("S "))
        .map(|l| {
            let v: Vec<&str> = l.split(' ').collect();
            (v[0].to_string(), v[1].parse().unwrap(), v[2].parse().unwrap())
        })
        .collect()
}

#[test]
fn tensorboard_reads_the_scalars_grids_and_pipeline_a_run_logged() {
    let _ = mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline_with_tensorboard();
    let out = tmp.path().join("run");
    let f = Pipe::new(&["run", file, "--out", out.to_str().unwrap(), "--max-steps", "60"])
        .args(&TINY)
        .set("log_every=10")
        .set("sampler.every=30")
        .set("eval.every=30")
        .set("eval.n=200")
        .go();
    f.code(0).says(&["TensorBoard log"]);
    let lines = tensorboard_read(&out.join("tb"));
    let tb = scalars(&lines);
    // Every metrics.csv cell is in TensorBoard at its step (f32 there, six decimals in the CSV).
    let (header, rows) = metrics(&out);
    let cols: Vec<&str> = header.split(',').collect();
    let tag_of = |c: &str| match c {
        "d_loss" | "g_loss" | "penalty" => Some(format!("loss/{c}")),
        "grad_norm" | "img_per_s" => Some(format!("train/{c}")),
        "fid" | "kid" | "is" => Some(format!("eval/{c}")),
        _ => None,
    };
    let mut n = 0;
    for row in &rows {
        let step = row[0] as u64;
        for (c, v) in cols.iter().zip(row) {
            let Some(tag) = tag_of(c) else { continue };
            let found: Vec<f64> = tb.iter().filter(|(t, s, _)| *t == tag && *s == step).map(|e| e.2).collect();
            if v.is_nan() {
                assert!(found.is_empty(), "{tag} at step {step}: {found:?}, metrics.csv has none");
                continue;
            }
            // The CSV rounds img/s to 0.1, FID to 4 decimals, the rest to 6; TensorBoard holds f32.
            let tol = if *c == "img_per_s" { 0.05 } else { 5e-5 } + 1e-6 * v.abs();
            assert_eq!(found.len(), 1, "{tag} at step {step}: {found:?}");
            assert!((found[0] - v).abs() <= tol, "{tag} at step {step}: TensorBoard {} vs metrics.csv {v}", found[0]);
            n += 1;
        }
    }
    // Steps 1, 10, ..., 60: 7 rows of 5 training figures, and FID, KID and IS at 30 and 60.
    assert_eq!(rows.len(), 7);
    assert_eq!(n, 7 * 5 + 2 * 3);
    assert_eq!(tb.len(), n, "TensorBoard has scalars metrics.csv has not: {tb:?}");
    // The grids: 8×8 of 28×28 with 2-pixel gaps (and border), at their steps.
    let grids: Vec<&String> = lines.iter().filter(|l| l.starts_with("I ")).collect();
    assert_eq!(grids, ["I samples 30 242 242", "I samples 60 242 242"]);
    let png = image::open(out.join("samples/step_00000060.png")).unwrap();
    assert_eq!((png.width(), png.height()), (242, 242));
    assert!(lines.contains(&"T pipeline 0 Pipeline(".to_string()), "{lines:?}");
}

#[test]
fn a_resumed_run_continues_the_tensorboard_log_with_no_step_twice() {
    let _ = mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline_with_tensorboard();
    let out = tmp.path().join("run");
    let run = |extra: &[&str]| {
        Pipe::new(&["run", file, "--out", out.to_str().unwrap()])
            .args(&TINY)
            .set("log_every=10")
            .set("sampler.every=20")
            .set("eval.every=1000")
            .set("eval.n=100")
            .args(extra)
            .go()
    };
    // To step 50 with a checkpoint at 40; then from 40 to 70.
    run(&["--max-steps", "50", "--checkpoint-every", "40"]).code(0);
    let ck = out.join("checkpoints/step_00000040.safetensors");
    assert!(ck.exists());
    let first = event_files(&out.join("tb"));
    assert_eq!(first.len(), 1, "{first:?}");
    run(&["--max-steps", "70", "--resume", ck.to_str().unwrap()]).code(0).says(&["resumed"]);
    // The log moved to a new file, named to sort after the old one (gone): a TensorBoard
    // watching the folder moves on to it.
    let second = event_files(&out.join("tb"));
    assert!(second.len() == 1 && second[0] > first[0], "{first:?} then {second:?}");
    let lines = tensorboard_read(&out.join("tb"));
    let tb = scalars(&lines);
    let d: Vec<u64> = tb.iter().filter(|(t, _, _)| t == "loss/d_loss").map(|e| e.1).collect();
    assert_eq!(d, [1, 10, 20, 30, 40, 50, 60, 70]);
    // Each (tag, step) once, and the values of steps 41-70 are the resumed run's (metrics.csv's).
    let mut seen = std::collections::HashSet::new();
    for (t, s, _) in &tb {
        assert!(seen.insert((t.clone(), *s)), "{t} at step {s} twice");
    }
    let (_, rows) = metrics(&out);
    let at50 = rows.iter().find(|r| r[0] == 50.0).unwrap();
    let tb50 = tb.iter().find(|(t, s, _)| t == "loss/d_loss" && *s == 50).unwrap().2;
    assert!((tb50 - at50[2]).abs() <= 5e-6, "{tb50} vs {}", at50[2]);
    let grids: Vec<&String> = lines.iter().filter(|l| l.starts_with("I ")).collect();
    assert_eq!(grids, ["I samples 20 242 242", "I samples 40 242 242", "I samples 60 242 242", "I samples 70 242 242"]);
    // The pipeline text of each start: step 0 and step 40.
    let texts: Vec<&String> = lines.iter().filter(|l| l.starts_with("T ")).collect();
    assert_eq!(texts, ["T pipeline 0 Pipeline(", "T pipeline 40 Pipeline("]);
    // --overwrite starts the log afresh, in a new file.
    run(&["--max-steps", "20", "--overwrite"]).code(0);
    let third = event_files(&out.join("tb"));
    assert!(third.len() == 1 && third[0] > second[0], "{second:?} then {third:?}");
    let d: Vec<u64> = scalars(&tensorboard_read(&out.join("tb"))).iter().filter(|(t, _, _)| t == "loss/d_loss").map(|e| e.1).collect();
    assert_eq!(d, [1, 10, 20]);
}

/// The event files in `dir`, in name order.
fn event_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}
