//! Helpers shared by the end-to-end tests: run the `pipe` binary from the project folder and
//! read what it wrote.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `pipe` binary, run from the project folder.
pub fn pipe() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pipe"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    // What a user sees by default (with it set, panics would print their backtrace).
    c.env_remove("RUST_BACKTRACE");
    // One intra-op thread per process: the tests run many `pipe` processes at once on a small
    // machine, and the tests that compare runs bit for bit need sums in the same order.
    c.env("OMP_NUM_THREADS", "1").env("MKL_NUM_THREADS", "1");
    c
}

/// Run `pipe ARGS`, printing its stderr when it fails.
pub fn run(args: &[&str]) -> Output {
    let out = pipe().args(args).output().expect("pipe starts");
    if !out.status.success() {
        eprintln!("stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// data/mnist, set up by scripts/setup.sh.
pub fn mnist_root() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    assert!(p.join("train-images-idx3-ubyte").exists(), "data/mnist is missing: run scripts/setup.sh first");
    p
}

/// Read metrics.csv into (header, rows of numbers).
pub fn metrics(dir: &Path) -> (String, Vec<Vec<f64>>) {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).expect("metrics.csv");
    let mut lines = text.lines();
    let header = lines.next().expect("header").to_string();
    // Empty fields (grad_norm without a penalty) read as NaN.
    let rows =
        lines.map(|l| l.split(',').map(|v| if v.is_empty() { f64::NAN } else { v.parse::<f64>().expect("number") }).collect()).collect();
    (header, rows)
}

/// Wait until metrics.csv in `dir` has `n` rows (the run still going).
pub fn wait_for_rows(dir: &Path, n: usize, child: &mut std::process::Child) {
    let t = std::time::Instant::now();
    loop {
        let rows = std::fs::read_to_string(dir.join("metrics.csv")).map(|t| t.lines().count().saturating_sub(1)).unwrap_or(0);
        if rows >= n {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it was interrupted");
        assert!(t.elapsed().as_secs() < 120, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A shipped pipeline's text without its `eval` stage (from its comment to the stage's end),
/// for tests that change the data to something its LeNet features can't take.
pub fn without_eval(text: &str) -> String {
    let Some(start) = text.find("        // FID, KID and IS") else { return text.to_string() };
    let stage = start + text[start..].find("(name: \"eval\"").expect("an eval stage after its comment");
    let end = stage + text[stage..].find("\n        )),\n").expect("the end of the eval stage") + "\n        )),\n".len();
    format!("{}{}", &text[..start], &text[end..])
}
