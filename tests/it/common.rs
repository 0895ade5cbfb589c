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

/// The venv's Python, which scripts/setup.sh makes with torch, tensorboard and safetensors.
pub fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh first (it makes the venv with torch, tensorboard and safetensors)",
        p.display()
    );
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

/// The one tiny-model preset of the end-to-end tests: the CPU and MLPs of 32 units in one
/// hidden layer (a shipped pipeline's own models would take minutes per test).
pub const TINY: [&str; 6] =
    ["--device", "cpu", "--set", "d_step.model=Mlp(hidden: 32, layers: 1)", "--set", "g_step.model=Mlp(hidden: 32, layers: 1)"];

/// [`TINY`] followed by `extra` arguments.
pub fn tiny(extra: &[&'static str]) -> Vec<&'static str> {
    [&TINY[..], extra].concat()
}

/// One `pipe` command in a temporary folder of its own (removed when the builder is dropped):
/// arguments, environment, and (for `run`) the run folder `<tmp>/run` as `--out`.
pub struct Pipe {
    tmp: tempfile::TempDir,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Pipe {
    /// `pipe ARGS...` (no `--out`).
    pub fn new(args: &[&str]) -> Self {
        Pipe { tmp: tempfile::tempdir().expect("a temporary folder"), args: args.iter().map(|a| a.to_string()).collect(), envs: vec![] }
    }
    /// `pipe run FILE --out <tmp>/run` with the [`TINY`] preset.
    pub fn run_tiny(file: &str) -> Self {
        let mut p = Pipe::new(&["run", file]);
        let out = p.out().display().to_string();
        p = p.args(&["--out", &out]).args(&TINY);
        p
    }
    /// Append arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }
    /// Append `--set KV`.
    pub fn set(self, kv: &str) -> Self {
        self.args(&["--set", kv])
    }
    /// Set an environment variable for the process.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }
    /// The temporary folder (for inputs the test writes).
    pub fn tmp(&self) -> &Path {
        self.tmp.path()
    }
    /// The run folder, `<tmp>/run`.
    pub fn out(&self) -> PathBuf {
        self.tmp.path().join("run")
    }
    /// Run it to the end.
    pub fn go(&self) -> Finished {
        let mut c = pipe();
        c.args(&self.args);
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        Finished { output: c.output().expect("pipe starts"), args: self.args.join(" "), out: self.out() }
    }
}

/// A finished `pipe` command: its output and the run folder it used.
pub struct Finished {
    pub output: Output,
    pub args: String,
    pub out: PathBuf,
}

impl Finished {
    /// Assert the exit code; on a mismatch the message holds the command, its stderr and the
    /// run folder's files with their sizes.
    pub fn code(&self, want: i32) -> &Self {
        let got = self.output.status.code();
        assert!(
            got == Some(want),
            "`pipe {}` exited with {got:?}, expected {want}\nstderr:\n{}\nrun folder {}:\n{}",
            self.args,
            stderr(&self.output),
            self.out.display(),
            listing(&self.out)
        );
        self
    }
    /// Assert that stderr contains each of `parts` (the same report on failure).
    pub fn says(&self, parts: &[&str]) -> &Self {
        let e = stderr(&self.output);
        for p in parts {
            assert!(e.contains(p), "`{p}` not in the stderr of `pipe {}`:\n{e}\nrun folder:\n{}", self.args, listing(&self.out));
        }
        self
    }
    pub fn stderr(&self) -> String {
        stderr(&self.output)
    }
}

/// Every file under `dir` with its size, one per line (`(none)` when it does not exist).
pub fn listing(dir: &Path) -> String {
    if !dir.exists() {
        return "  (none)".into();
    }
    let mut lines: Vec<String> = walk(dir)
        .into_iter()
        .map(|p| {
            let size = std::fs::symlink_metadata(&p).map(|m| m.len()).unwrap_or(0);
            format!("  {} ({size} bytes)", p.strip_prefix(dir).unwrap_or(&p).display())
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Write a small MNIST-like IDX data set in `dir`: `n` grey `side`×`side` images of a bright
/// square at a place and size drawn from `seed` (so a GAN has something to learn), with their
/// labels (the square's size class, 0-9), as `train-images-idx3-ubyte` and
/// `train-labels-idx1-ubyte`. Returns `dir`. For tests that must pass before the real data is
/// downloaded.
pub fn synthetic_idx(dir: &Path, n: u32, side: u32, seed: u64) -> PathBuf {
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut pixels, mut labels) = (vec![], vec![]);
    for _ in 0..n {
        let size = rng.random_range(2..2 + side / 2);
        let (x0, y0) = (rng.random_range(0..=side - size), rng.random_range(0..=side - size));
        for y in 0..side {
            for x in 0..side {
                let inside = (x0..x0 + size).contains(&x) && (y0..y0 + size).contains(&y);
                pixels.push(if inside { 255 } else { 0 });
            }
        }
        labels.push((size * 10 / (side / 2 + 2)).min(9) as u8);
    }
    write_idx(&dir.join("train-images-idx3-ubyte"), 0x803, &[n, side, side], &pixels);
    write_idx(&dir.join("train-labels-idx1-ubyte"), 0x801, &[n], &labels);
    dir.to_path_buf()
}

/// Write an IDX file: the big-endian `magic` and `dims`, then `data` as it is (which may
/// disagree with the header, for the tests of broken files).
pub fn write_idx(path: &Path, magic: u32, dims: &[u32], data: &[u8]) {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    std::fs::write(path, v).unwrap();
}

/// A pipeline file in `dir` for tests without the real data: mnist_mlp.ron without its eval
/// stage, reading `root` (IDX files, e.g. from [`synthetic_idx`]). Returns its path.
pub fn pipeline_on(dir: &Path, root: &Path) -> PathBuf {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/mnist_mlp.ron")).unwrap();
    let text = without_eval(&text).replace("root: \"data/mnist\"", &format!("root: {:?}", root.display().to_string()));
    let file = dir.join("pipeline.ron");
    std::fs::write(&file, text).unwrap();
    file
}
