//! `pipe bench`: pipe's DRAGAN training step against the PyTorch reference, in one run.
//!
//! pipe's side is a real pipeline run (loader → augment with the DRAGAN perturbation → d_step
//! with the penalty → g_step), on random data of the reference's shape: MLP G and D (1024
//! hidden, 2 layers, latent 62) on 28×28 grey IDX images, or the DCGAN pair (width 64,
//! latent 100) on 64×64 RGB PNGs. Its speed is the steady rate between the row of step
//! `warmup` and the last row of its metrics.csv (so start-up and the first steps don't count).
//! The reference is `scripts/bench/ref_dragan.py` (PyTorch eager, same models, same step:
//! D-step with the penalty, then G-step), and on CUDA also `ref_dragan_tuned.py --graph --amp`
//! (cudnn.benchmark, channels_last, fused Adam, bf16, the whole step captured in a CUDA graph).
//! The last line printed is `ratio pipe/pytorch: X.XX`, pipe's steps/s over the strongest
//! reference's (above 1: pipe is faster).
//!
//! With `--nproc N` it measures data-parallel scaling instead ([`scaling`]): the same pipeline
//! on 1 rank and on N ranks (`pipe run --nproc N`), each rank with one libtorch thread and a
//! batch of `--batch` images (so the N-rank run's global batch is N × batch), and prints
//! images/s of each and their ratio.

use crate::run::{self, resolve_device, RunError, RunOptions};
use crate::spec::DeviceChoice;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

/// Which models to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// MLP G and D, 28×28 grey (the MNIST experiment).
    Mlp,
    /// DCGAN G and D, 64×64 RGB (the illustrations experiment).
    Dcgan,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::Mlp => "mlp",
            Arch::Dcgan => "dcgan",
        }
    }
}

/// Options of `pipe bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub device: DeviceChoice,
    pub arch: Arch,
    pub batch: usize,
    /// Timed steps (after `warmup`).
    pub steps: u64,
    pub warmup: u64,
    /// Python with torch for the reference (default: the set-up's venv, else `python3`).
    pub python: Option<PathBuf>,
    /// `--set` overrides of pipe's pipeline (e.g. `execution=Eager`, `precision=Fp32`).
    pub sets: Vec<String>,
    /// Ranks for a scaling measurement ([`scaling`]); 1: the comparison with PyTorch.
    pub nproc: usize,
}

/// One measured contender.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measured {
    pub name: String,
    pub steps_per_s: f64,
}

/// What `pipe bench` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub arch: &'static str,
    pub batch: usize,
    pub device: String,
    pub pipe: Measured,
    pub references: Vec<Measured>,
}

impl BenchReport {
    /// pipe's steps/s over the fastest reference's.
    pub fn ratio(&self) -> Option<f64> {
        self.references
            .iter()
            .map(|r| r.steps_per_s)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
            .map(|best| self.pipe.steps_per_s / best)
    }
}

fn failed(m: String) -> RunError {
    RunError::Failed(m)
}

/// Random training data of the reference's shape in `dir`: 8 batches of `batch` images.
fn write_data(dir: &Path, arch: Arch, batch: usize) -> Result<(), RunError> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let n = 8 * batch;
    let io = |e: std::io::Error| failed(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    match arch {
        Arch::Mlp => {
            let mut bytes = vec![0, 0, 8, 3];
            for d in [n as u32, 28, 28] {
                bytes.extend_from_slice(&d.to_be_bytes());
            }
            bytes.extend((0..n * 784).map(|_| rng.random::<u8>()));
            std::fs::write(dir.join("train-images-idx3-ubyte"), bytes).map_err(io)
        }
        Arch::Dcgan => {
            for i in 0..n {
                let px: Vec<u8> = (0..64 * 64 * 3).map(|_| rng.random::<u8>()).collect();
                let img = image::RgbImage::from_raw(64, 64, px).expect("64×64×3 bytes");
                img.save(dir.join(format!("{i:05}.png"))).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
            }
            Ok(())
        }
    }
}

/// The pipeline timed: the reference's models and step, no sampler, no checkpoints.
fn pipeline_text(arch: Arch, batch: usize, data: &Path, warmup: u64, device: &str) -> String {
    let (loader, model, latent) = match arch {
        Arch::Mlp => (format!("IdxLoader(root: {:?}, split: Train, batch: {batch})", data), "Mlp(hidden: 1024, layers: 2)", 62),
        Arch::Dcgan => (format!("FolderLoader(root: {:?}, size: 64, channels: Rgb, batch: {batch})", data), "Dcgan(width: 64)", 100),
    };
    format!(
        r#"Pipeline(
    name: "bench",
    seed: 0,
    device: {device},
    max_steps: 1,
    log_every: {warmup},
    checkpoint: None,
    stages: [
        (name: "loader", kind: {loader}),
        (name: "augment", input: ["loader"], kind: Augment(flip: false, perturb: Dragan(c: 0.5, sigma: Batch, noise: Uniform, interpolate: true))),
        (name: "d_step", input: ["augment"], kind: DStep(model: {model}, penalty: Dragan(lambda: 10.0, k: 1.0), optimizer: Adam(lr: 1e-4, beta1: 0.5, beta2: 0.9), n_critic: 1)),
        (name: "g_step", input: ["d_step"], kind: GStep(model: {model}, latent: {latent}, optimizer: Adam(lr: 1e-4, beta1: 0.5, beta2: 0.9))),
    ],
)
"#
    )
}

/// Steps per second between the row of step `from` and the last row of a metrics.csv.
fn steady_rate(metrics: &Path, from: u64) -> Result<f64, RunError> {
    let text = std::fs::read_to_string(metrics).map_err(|e| failed(format!("{}: {e}", metrics.display())))?;
    let rows: Vec<(u64, f64)> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect();
    let start = rows.iter().find(|r| r.0 == from).ok_or_else(|| failed(format!("{}: no row for step {from}", metrics.display())))?;
    let end = rows.last().expect("a row was found");
    if end.0 <= start.0 || end.1 <= start.1 {
        return Err(failed(format!("{}: too few steps timed", metrics.display())));
    }
    Ok((end.0 - start.0) as f64 / (end.1 - start.1))
}

/// The Python to run the reference with.
fn python(o: &BenchOptions) -> PathBuf {
    if let Some(p) = &o.python {
        return p.clone();
    }
    let venv = Path::new(".venv/bin/python");
    if venv.exists() {
        venv.to_path_buf()
    } else {
        PathBuf::from("python3")
    }
}

/// The `steps/s=` figure a reference script prints.
fn steps_per_s(text: &str) -> Option<f64> {
    text.split_whitespace().find_map(|w| w.strip_prefix("steps/s=")).and_then(|v| v.parse::<f64>().ok())
}

/// Run a reference script and read its `steps/s=` figure.
fn reference(o: &BenchOptions, script: &str, extra: &[&str], device: &str) -> Result<Measured, RunError> {
    let path = Path::new("scripts/bench").join(script);
    if !path.is_file() {
        return Err(RunError::Invalid(vec![format!(
            "{}: the reference script is missing (run pipe bench from the project folder)",
            path.display()
        )]));
    }
    let py = python(o);
    let mut cmd = std::process::Command::new(&py);
    cmd.arg(&path).args(["--arch", o.arch.name(), "--batch", &o.batch.to_string(), "--steps", &o.steps.to_string()]).args(extra);
    if script == "ref_dragan.py" {
        cmd.args(["--device", device]);
    }
    let out = cmd.output().map_err(|e| failed(format!("{}: cannot run the reference: {e}", py.display())))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(failed(format!("{} {}: failed: {}", py.display(), path.display(), err.lines().last().unwrap_or(""))));
    }
    let v = steps_per_s(&text).ok_or_else(|| failed(format!("{}: no steps/s= in its output: {text}", path.display())))?;
    let name = if extra.is_empty() { "pytorch eager".to_string() } else { format!("pytorch tuned ({})", extra.join(" ")) };
    Ok(Measured { name, steps_per_s: v })
}

/// Run the benchmark. Errors: bad options (exit 2), a failed run or reference (exit 1).
pub fn bench(o: &BenchOptions) -> Result<BenchReport, RunError> {
    if o.batch == 0 || o.steps < 2 || o.warmup == 0 {
        return Err(RunError::Invalid(vec!["--batch must be ≥ 1, --steps ≥ 2 and --warmup ≥ 1".into()]));
    }
    let device = resolve_device(o.device)?;
    let dev = if device.is_cuda() { "cuda" } else { "cpu" };
    let tmp = tempfile::tempdir().map_err(|e| failed(format!("temporary folder: {e}")))?;
    let data = tmp.path().join("data");
    write_data(&data, o.arch, o.batch)?;
    let file = tmp.path().join("bench.ron");
    std::fs::write(&file, pipeline_text(o.arch, o.batch, &data, o.warmup, dev)).map_err(|e| failed(format!("{}: {e}", file.display())))?;
    let run_dir = tmp.path().join("run");
    let opts = RunOptions {
        out: Some(run_dir.clone()),
        max_steps: Some(o.warmup + o.steps),
        silent: true,
        sets: o.sets.clone(),
        ..Default::default()
    };
    let p = run::prepare(&file, &opts)?;
    run::run(&p, &opts, Arc::new(AtomicUsize::new(0)))?;
    let speed = p.speed_settings().resolve(&crate::spec::speed_context(&p, device.is_cuda()));
    let pipe = Measured { name: format!("pipe ({speed})"), steps_per_s: steady_rate(&run_dir.join("metrics.csv"), o.warmup)? };
    let mut references = vec![reference(o, "ref_dragan.py", &[], dev)?];
    if device.is_cuda() {
        references.push(reference(o, "ref_dragan_tuned.py", &["--graph", "--amp"], dev)?);
    }
    Ok(BenchReport { arch: o.arch.name(), batch: o.batch, device: dev.into(), pipe, references })
}

/// One side of a scaling measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RanksMeasured {
    pub ranks: usize,
    pub steps_per_s: f64,
    /// Real images per second over all ranks: steps/s × ranks × batch per rank.
    pub images_per_s: f64,
}

/// What `pipe bench --nproc N` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScalingReport {
    pub arch: &'static str,
    /// Images per rank per step.
    pub batch: usize,
    pub one: RanksMeasured,
    pub many: RanksMeasured,
    /// The PyTorch reference (`scripts/bench/ref_dragan.py`, data-parallel under torchrun as
    /// NVlabs/stylegan3 does it) on 1 and on N ranks; None when its Python cannot be run.
    pub reference: Option<(RanksMeasured, RanksMeasured)>,
}

impl ScalingReport {
    /// Images/s of N ranks over images/s of 1 rank (N at best).
    pub fn speedup(&self) -> f64 {
        self.many.images_per_s / self.one.images_per_s
    }
}

/// Data-parallel scaling on the CPU: the bench pipeline (DRAGAN, loader → augment → d_step →
/// g_step) run by this program as a child process on 1 rank with a batch of `o.batch`, then with
/// `--nproc N` and a global batch of N × `o.batch`, every rank with one libtorch thread
/// (`OMP_NUM_THREADS=1`). Each run's rate is the steady one between the rows of step
/// `o.warmup` and the last (as for [`bench`]).
///
/// Errors: bad options or a device other than the CPU (exit 2; the GPU's ranks are one per
/// device, which this machine-local measurement does not cover), a failed run (exit 1).
pub fn scaling(o: &BenchOptions) -> Result<ScalingReport, RunError> {
    if o.batch == 0 || o.steps < 2 || o.warmup == 0 || o.nproc < 2 {
        return Err(RunError::Invalid(vec!["--batch must be ≥ 1, --steps ≥ 2, --warmup ≥ 1 and --nproc ≥ 2".into()]));
    }
    if resolve_device(o.device)?.is_cuda() {
        return Err(RunError::Invalid(vec![
            "--nproc with --device cuda: a rank per GPU is measured with torchrun (README, \"Several processes and machines\"); pipe bench --nproc runs on the CPU: add --device cpu".into(),
        ]));
    }
    let exe = std::env::current_exe().map_err(|e| failed(format!("cannot find this program's path: {e}")))?;
    let tmp = tempfile::tempdir().map_err(|e| failed(format!("temporary folder: {e}")))?;
    let data = tmp.path().join("data");
    write_data(&data, o.arch, o.batch * o.nproc)?;
    let mut measured = vec![];
    for ranks in [1, o.nproc] {
        let file = tmp.path().join(format!("bench{ranks}.ron"));
        let text = pipeline_text(o.arch, o.batch * ranks, &data, o.warmup, "cpu");
        std::fs::write(&file, text).map_err(|e| failed(format!("{}: {e}", file.display())))?;
        let run_dir = tmp.path().join(format!("run{ranks}"));
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("run").arg(&file).arg("--out").arg(&run_dir).args(["--max-steps", &(o.warmup + o.steps).to_string()]);
        for s in &o.sets {
            cmd.args(["--set", s]);
        }
        if ranks > 1 {
            cmd.args(["--nproc", &ranks.to_string()]);
        }
        cmd.env("OMP_NUM_THREADS", "1").env("MKL_NUM_THREADS", "1");
        let out = cmd.output().map_err(|e| failed(format!("{}: cannot start a run: {e}", exe.display())))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().filter(|l| l.starts_with("error") || l.contains("failed")).last().or(err.lines().last()).unwrap_or("");
            return Err(failed(format!("the {ranks}-rank run failed ({}): {last}", out.status)));
        }
        let steps_per_s = steady_rate(&run_dir.join("metrics.csv"), o.warmup)?;
        measured.push(RanksMeasured { ranks, steps_per_s, images_per_s: steps_per_s * (ranks * o.batch) as f64 });
    }
    let many = measured.pop().expect("two runs");
    let one = measured.pop().expect("two runs");
    let reference = scaling_reference(o).ok();
    Ok(ScalingReport { arch: o.arch.name(), batch: o.batch, one, many, reference })
}

/// The PyTorch reference's images/s on 1 rank and on `o.nproc` ranks (torchrun), one thread
/// each. Errors: the reference cannot be run (no Python with torch).
fn scaling_reference(o: &BenchOptions) -> Result<(RanksMeasured, RanksMeasured), RunError> {
    let py = python(o);
    let mut out = vec![];
    for ranks in [1, o.nproc] {
        let mut cmd = std::process::Command::new(&py);
        if ranks > 1 {
            let port = crate::launch::free_port().map_err(|e| failed(format!("a free port: {e}")))?;
            cmd.args(["-m", "torch.distributed.run", "--nproc-per-node", &ranks.to_string(), "--master-port", &port.to_string()]);
        }
        cmd.arg("scripts/bench/ref_dragan.py")
            .args(["--arch", o.arch.name(), "--batch", &o.batch.to_string(), "--steps", &o.steps.to_string(), "--device", "cpu"])
            .env("OMP_NUM_THREADS", "1")
            .env("MKL_NUM_THREADS", "1");
        let res = cmd.output().map_err(|e| failed(format!("{}: {e}", py.display())))?;
        let text = String::from_utf8_lossy(&res.stdout).into_owned();
        let steps_per_s = steps_per_s(&text).ok_or_else(|| failed(format!("the reference on {ranks} ranks printed no steps/s=")))?;
        out.push(RanksMeasured { ranks, steps_per_s, images_per_s: steps_per_s * (ranks * o.batch) as f64 });
    }
    let many = out.pop().expect("two runs");
    Ok((out.pop().expect("two runs"), many))
}
