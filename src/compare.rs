//! `pipe compare RUN_A RUN_B`: did two runs train the same networks? Compares the weights of
//! their latest checkpoints tensor by tensor, and the means of their loss curves
//! (metrics.csv). Used to check that a faster way of running a step (a CUDA graph, bf16) gives
//! the same training as the plain one (scripts/gpu_check.sh), and by users after any change.

use pipe_stages::io::checkpoint::{self, Checkpoint};
use std::path::{Path, PathBuf};

/// What to compare and the limits that make the comparison fail.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub a: PathBuf,
    pub b: PathBuf,
    /// Fail when some weight tensor differs by more than this, relative (see [`weight_diff`]).
    pub weights_tol: Option<f64>,
    /// Fail when the mean of d_loss or of g_loss differs by more than this fraction.
    pub loss_tol: Option<f64>,
    /// First generator step of the loss means (earlier rows are left out).
    pub loss_from: u64,
}

/// Why a comparison could not be made or failed (exit 2 for unreadable inputs, 1 for a
/// difference over a limit).
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A run folder or checkpoint that cannot be read, or runs of different networks.
    #[error("{0}")]
    Unreadable(String),
    /// A difference over a limit: the report, then why it failed.
    #[error("{report}\n{why}")]
    Over { report: String, why: String },
}

impl CompareError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CompareError::Unreadable(_) => 2,
            CompareError::Over { .. } => 1,
        }
    }
}

/// The largest relative difference over the tensors both checkpoints hold under `g.`, `d.` and
/// `g_ema.`: for each tensor, max |a − b| / max |a| (the largest magnitude of A's tensor; 1e-12
/// when that is 0). Returns (difference, tensor name, tensors compared).
///
/// Errors: the checkpoints hold different tensor names or shapes (other networks).
pub fn weight_diff(a: &Checkpoint, b: &Checkpoint) -> Result<(f64, String, usize), String> {
    let nets = |c: &Checkpoint| -> Vec<String> {
        c.tensors.keys().filter(|k| ["g.", "d.", "g_ema."].iter().any(|p| k.starts_with(p))).cloned().collect()
    };
    let (na, nb) = (nets(a), nets(b));
    if na != nb {
        let only_a: Vec<&String> = na.iter().filter(|n| !nb.contains(n)).take(3).collect();
        let only_b: Vec<&String> = nb.iter().filter(|n| !na.contains(n)).take(3).collect();
        return Err(format!(
            "{} and {} hold different networks (only in the first: {only_a:?}; only in the second: {only_b:?})",
            a.path.display(),
            b.path.display()
        ));
    }
    let mut worst = (0.0f64, String::new());
    for n in &na {
        let (ta, tb) = (&a.tensors[n], &b.tensors[n]);
        if ta.size() != tb.size() {
            return Err(format!("tensor {n}: shape {:?} in {} but {:?} in {}", ta.size(), a.path.display(), tb.size(), b.path.display()));
        }
        let scale = ta.abs().max().double_value(&[]).max(1e-12);
        let d = (ta - tb).abs().max().double_value(&[]) / scale;
        // NaN anywhere makes the runs differ.
        let d = if d.is_nan() { f64::INFINITY } else { d };
        if d > worst.0 || worst.1.is_empty() {
            worst = (d, n.clone());
        }
    }
    Ok((worst.0, worst.1, na.len()))
}

/// Mean d_loss and g_loss over the rows of `<run>/metrics.csv` from generator step `from` on,
/// the number of rows, and how many of them hold a non-finite loss (NaN or ±Inf: a step an
/// `on_nonfinite: Skip` run skipped); those values are left out of the means. Errors: no
/// metrics.csv, or no row from `from` on.
pub fn loss_means(run: &Path, from: u64) -> Result<(f64, f64, usize, usize), String> {
    let path = run.join("metrics.csv");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).ok_or_else(|| format!("{}: no `{name}` column", path.display()));
    let (cs, cd, cg) = (col("step")?, col("d_loss")?, col("g_loss")?);
    let (mut sd, mut sg, mut nd, mut ng, mut n, mut bad) = (0.0, 0.0, 0usize, 0usize, 0usize, 0usize);
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        let (Some(step), Some(d), Some(g)) = (num(cs), num(cd), num(cg)) else { continue };
        if step as u64 >= from {
            n += 1;
            if !(d.is_finite() && g.is_finite()) {
                bad += 1;
            }
            if d.is_finite() {
                sd += d;
                nd += 1;
            }
            if g.is_finite() {
                sg += g;
                ng += 1;
            }
        }
    }
    if n == 0 {
        return Err(format!("{}: no logged step from step {from} on", path.display()));
    }
    Ok((sd / nd.max(1) as f64, sg / ng.max(1) as f64, n, bad))
}

/// The checkpoint of a run folder (its newest) or a checkpoint file.
fn checkpoint_of(p: &Path) -> Result<Checkpoint, String> {
    if p.is_dir() {
        let dir = if p.join("checkpoints").is_dir() { p.join("checkpoints") } else { p.to_path_buf() };
        checkpoint::latest(&dir).map(|(c, _)| c).map_err(|e| e.to_string())
    } else {
        checkpoint::read(p).map_err(|e| e.to_string())
    }
}

/// A fraction as a percentage with two significant digits (0.00012 → "0.012%").
fn pct(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{:.1}%", 100.0 * x);
    }
    let digits = (1 - (100.0 * x).abs().log10().floor() as i32).max(1) as usize;
    format!("{:.*}%", digits, 100.0 * x)
}

/// Relative difference of two means: |a − b| / max(|a|, |b|) (0 when both are 0).
fn rel(a: f64, b: f64) -> f64 {
    let s = a.abs().max(b.abs());
    if s == 0.0 {
        0.0
    } else {
        (a - b).abs() / s
    }
}

/// Compare two runs; returns the report (one line per comparison made).
///
/// Errors: [`CompareError::Unreadable`] for inputs that cannot be read or compared,
/// [`CompareError::Over`] when a difference is over its limit.
pub fn compare(o: &CompareOptions) -> Result<String, CompareError> {
    let mut report = vec![];
    let mut over = vec![];
    let ca = checkpoint_of(&o.a).map_err(CompareError::Unreadable)?;
    let cb = checkpoint_of(&o.b).map_err(CompareError::Unreadable)?;
    if ca.manifest.step != cb.manifest.step {
        report.push(format!("note: the checkpoints are of different steps ({} and {})", ca.manifest.step, cb.manifest.step));
    }
    let (d, name, n) = weight_diff(&ca, &cb).map_err(CompareError::Unreadable)?;
    report.push(format!("weights: largest relative difference {d:.3e} ({name}) over {n} tensors at step {}", ca.manifest.step));
    if let Some(t) = o.weights_tol.filter(|t| !(d <= *t)) {
        over.push(format!("the weights differ by {d:.3e} ({name}), over the limit {t:e}"));
    }
    let runs = [&o.a, &o.b].map(|p| if p.is_dir() { Some(p.as_path()) } else { None });
    if let [Some(ra), Some(rb)] = runs {
        match (loss_means(ra, o.loss_from), loss_means(rb, o.loss_from)) {
            (Ok((da, ga, n, bad_a)), Ok((db, gb, _, bad_b))) => {
                let (rd, rg) = (rel(da, db), rel(ga, gb));
                let skipped = if bad_a + bad_b > 0 {
                    format!(" (rows with a non-finite loss, left out: {bad_a} and {bad_b})")
                } else {
                    String::new()
                };
                report.push(format!(
                    "loss means from step {}: d_loss {da:.4} vs {db:.4} ({}), g_loss {ga:.4} vs {gb:.4} ({}), {n} rows{skipped}",
                    o.loss_from,
                    pct(rd),
                    pct(rg)
                ));
                if let Some(t) = o.loss_tol.filter(|t| !(rd <= *t && rg <= *t)) {
                    over.push(format!("the loss means differ by {} / {}, over the limit {}", pct(rd), pct(rg), pct(t)));
                }
                if o.loss_tol.is_some() && bad_a != bad_b {
                    over.push(format!("one run logged {bad_a} non-finite losses, the other {bad_b}"));
                }
            }
            (Err(e), _) | (_, Err(e)) if o.loss_tol.is_some() => return Err(CompareError::Unreadable(e)),
            _ => {}
        }
    }
    let report = report.join("\n");
    if over.is_empty() {
        Ok(report)
    } else {
        Err(CompareError::Over { report, why: over.join("\n") })
    }
}
