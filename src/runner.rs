//! Build a checked pipeline into running stages, run it, and collect what it produces.
//!
//! Threads: one per stage, joined by bounded channels (capacity `queue_depth`). The runner's
//! own thread reads the bus (progress, warnings, files written), draws the progress bar,
//! writes metrics.csv, and decides how the run ends:
//! - every stage finished: success;
//! - a stage failed or panicked: the others are asked to drain (sources stop, the rest finish
//!   their inputs, so the video is finalised), then the run fails naming the stage;
//! - Ctrl-C once: drain, exit 130; twice: stop at once.

use crate::spec::{self, DeviceChoice, Pipeline, StageKind, RUN_FILES};
use anyhow::Context as _;
use crossbeam_channel::{bounded, Receiver, Sender};
use indicatif::{ProgressBar, ProgressStyle};
use pipe_stages::augment::Augment;
use pipe_stages::checkpoint::{self, Checkpoint, CheckpointConfig, CheckpointPlan};
use pipe_stages::d_step::DStep;
use pipe_stages::eval::EvalStage;
use pipe_stages::g_step::{GStep, SampleSchedule};
use pipe_stages::gif;
use pipe_stages::loader::{folder, idx};
use pipe_stages::sampler;
use pipe_stages::stage::{Bus, BusMessage, Stage, StageContext, StageStats};
use pipe_stages::train::{build_models, RunSettings};
use pipe_stages::video;
use pipe_stages::Item;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Options of `pipe run` that act on the pipeline.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub out: Option<PathBuf>,
    pub max_steps: Option<u64>,
    pub device: Option<DeviceChoice>,
    pub sets: Vec<String>,
    /// Replace the outputs of a previous run in the run folder.
    pub overwrite: bool,
    /// Print the per-stage statistics at the end.
    pub stats: bool,
    /// Hide the progress bar (tests).
    pub quiet: bool,
    /// Continue a run from a checkpoint: `Some(None)` for the newest checkpoint of the
    /// pipeline's run folder (or of `--out`), `Some(Some(path))` for a run folder or a
    /// checkpoint file.
    pub resume: Option<Option<PathBuf>>,
    /// Write a checkpoint every this many generator steps (overrides the file's).
    pub checkpoint_every: Option<u64>,
}

/// How a run ended badly, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad pipeline file or arguments (exit 2). One message per problem.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    /// Failure during the run (exit 1).
    #[error("{0}")]
    Failed(String),
    /// Stopped by Ctrl-C after draining (exit 130).
    #[error("interrupted; outputs so far are in {}", .0.display())]
    Interrupted(PathBuf),
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Invalid(_) => 2,
            RunError::Failed(_) => 1,
            RunError::Interrupted(_) => 130,
        }
    }
}

impl From<anyhow::Error> for RunError {
    fn from(e: anyhow::Error) -> Self {
        RunError::Failed(format!("{e:#}"))
    }
}

/// Load a pipeline file, apply `--set` overrides and command-line settings, and check it.
pub fn prepare(file: &Path, opts: &RunOptions) -> Result<Pipeline, RunError> {
    let (mut p, source) = spec::load(file).map_err(|es| RunError::Invalid(es.iter().map(|e| e.to_string()).collect()))?;
    let mut errs = vec![];
    for s in &opts.sets {
        if let Err(e) = spec::apply_override(&mut p, s) {
            errs.push(e);
        }
    }
    if let Some(m) = opts.max_steps {
        if m == 0 {
            errs.push("--max-steps must be ≥ 1".into());
        } else {
            p.max_steps = m;
        }
    }
    if let Some(d) = opts.device {
        p.device = d;
    }
    if let Some(n) = opts.checkpoint_every {
        if n == 0 {
            errs.push("--checkpoint-every must be ≥ 1".into());
        } else {
            p.checkpoint = Some(CheckpointConfig { every: n, ..p.checkpoint.clone().unwrap_or_default() });
        }
    }
    let f = file.display().to_string();
    // Each problem is placed at its setting: in the file (line and column from the parser's
    // positions), or on the command line when a --set gave that setting (or the one holding it).
    let set_by: Vec<(Option<&str>, &str, &str)> =
        opts.sets.iter().filter_map(|s| spec::override_target(s).map(|(stage, field)| (stage, field, s.as_str()))).collect();
    for e in spec::check(&p) {
        // The last --set of a field is the one that took effect.
        let by_set = set_by
            .iter()
            .rev()
            .find(|(stage, field, _)| *stage == e.stage.as_deref() && (e.field == *field || e.field.starts_with(&format!("{field}."))));
        errs.push(match (by_set, source.locate(&e)) {
            (Some((_, _, set)), _) => format!("{f} (from --set {set}): {e}"),
            (None, Some((l, c))) => format!("{f}:{l}:{c}: {e}"),
            (None, None) => format!("{f}: {e}"),
        });
    }
    if errs.is_empty() {
        Ok(p)
    } else {
        Err(RunError::Invalid(errs))
    }
}

/// Resolve the device choice. Asking for CUDA without a GPU is an error.
pub fn resolve_device(d: DeviceChoice) -> Result<tch::Device, RunError> {
    match d {
        DeviceChoice::Cpu => Ok(tch::Device::Cpu),
        DeviceChoice::Auto => Ok(if tch::Cuda::is_available() { tch::Device::Cuda(0) } else { tch::Device::Cpu }),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
        DeviceChoice::Cuda => {
            Err(RunError::Invalid(vec!["--device cuda: no CUDA device is available here (use --device cpu or auto)".into()]))
        }
    }
}

/// Name of the lock file in a run folder.
const LOCK_FILE: &str = ".pipe.lock";

/// Take the run folder's lock (an advisory `flock`, released by the kernel when the process
/// ends, however it ends), so two processes never write one run. Keep the returned file open
/// for the whole run.
///
/// Errors (exit 2): another `pipe` holds it (naming its process id), or the lock file cannot be
/// made.
pub fn lock_run_dir(dir: &Path) -> Result<std::fs::File, RunError> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| RunError::Invalid(vec![format!("{}: cannot make the run folder's lock file: {e}", path.display())]))?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(RunError::Invalid(vec![format!(
            "{}: the run folder is in use by another pipe process{}: wait for it to finish, or choose another --out",
            dir.display(),
            holder.trim().parse::<u32>().map(|pid| format!(" (pid {pid})")).unwrap_or_default()
        )]));
    }
    let _ = f.set_len(0);
    let _ = write!(f, "{}", std::process::id());
    Ok(f)
}

/// True while another process holds `dir`'s lock.
fn in_use(dir: &Path) -> bool {
    dir.join(LOCK_FILE).exists() && lock_run_dir(dir).is_err()
}

fn holds_a_run(dir: &Path) -> bool {
    dir.join("pipeline.ron").exists() || dir.join("metrics.csv").exists()
}

/// Remove the outputs of a previous run of `p` from `dir`: the fixed files, the videos, and the
/// `step_*.png` grids in the samples folder (the folder too, if that leaves it empty). Nothing
/// else is touched.
fn remove_run_outputs(p: &Pipeline, dir: &Path) -> std::io::Result<()> {
    // The previous run's own pipeline.ron says where its outputs went (its paths may differ).
    if let Ok((old, _)) = spec::load(&dir.join("pipeline.ron")) {
        if old != *p {
            remove_run_outputs(&old, dir)?;
        }
    }
    let mut files: Vec<PathBuf> = RUN_FILES.iter().map(|f| dir.join(f)).collect();
    let ck_dir = dir.join(checkpoint::DIR);
    files.extend(checkpoint::list(&ck_dir).into_iter().map(|(_, f)| f));
    for s in &p.stages {
        match &s.kind {
            StageKind::Video(v) => files.push(dir.join(&v.path)),
            StageKind::Gif(g) => files.push(dir.join(&g.path)),
            StageKind::Sampler(c) => {
                let sd = dir.join(&c.dir);
                if let Ok(rd) = std::fs::read_dir(&sd) {
                    for e in rd.flatten() {
                        let n = e.file_name().to_string_lossy().into_owned();
                        if n.starts_with("step_") && n.ends_with(".png") {
                            files.push(e.path());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    for f in files {
        if f.is_file() {
            std::fs::remove_file(&f)?;
        }
    }
    for s in &p.stages {
        if let StageKind::Sampler(c) = &s.kind {
            let _ = std::fs::remove_dir(dir.join(&c.dir)); // only if empty
        }
    }
    let _ = std::fs::remove_dir(&ck_dir); // only if empty
    Ok(())
}

/// `--overwrite`: remove the previous run's outputs from `dir`, unless a process is using it.
fn overwrite_run(p: &Pipeline, dir: &Path) -> Result<(), RunError> {
    let bad = |m: String| RunError::Invalid(vec![m]);
    if in_use(dir) {
        return Err(bad(format!("--overwrite {}: the run folder is in use by another pipe process", dir.display())));
    }
    remove_run_outputs(p, dir).map_err(|e| bad(format!("--overwrite {}: cannot remove the previous run: {e}", dir.display())))
}

/// A test hook `VAR=STAGE:N` (or `STAGE:N..` when `onward` is allowed): the stage (one of
/// `p`'s), N, and whether it holds from N on. A malformed value is ignored with a warning.
/// Only in builds with the `fault-injection` feature (the tests'); other builds ignore the
/// variable, with a warning.
#[cfg(feature = "fault-injection")]
fn test_hook(var: &str, p: &Pipeline, onward: bool) -> Option<(String, u64, bool)> {
    let v = std::env::var(var).ok()?;
    let r = v.split_once(':').and_then(|(s, n)| {
        let (n, on) = match n.strip_suffix("..") {
            Some(n) if onward => (n, true),
            _ => (n, false),
        };
        n.parse().ok().filter(|_| p.stages.iter().any(|st| st.name == s)).map(|n| (s.to_string(), n, on))
    });
    if r.is_none() {
        crate::say!(
            "warning: {var}={v} ignored: expected STAGE:N{} with a stage of this pipeline",
            if onward { " or STAGE:N.." } else { "" }
        );
    }
    r
}

/// Without the `fault-injection` feature there are no test hooks: `VAR` is ignored, with a
/// warning when it is set.
#[cfg(not(feature = "fault-injection"))]
fn test_hook(var: &str, _p: &Pipeline, _onward: bool) -> Option<(String, u64, bool)> {
    if std::env::var_os(var).is_some() {
        crate::say!("warning: {var} ignored: this build of pipe has no fault-injection hooks (the tests build them in with --features fault-injection)");
    }
    None
}

/// The run folder: `--out`, else `runs/<name>/`. A previous run is never mixed with a new one:
/// the default folder moves on to `runs/<name>-2/`, `-3`, ...; an explicit `--out` holding a run
/// is refused unless `--overwrite`, which removes that run's outputs (and only those) first.
pub fn choose_run_dir(p: &Pipeline, opts: &RunOptions) -> Result<PathBuf, RunError> {
    let bad = |m: String| RunError::Invalid(vec![m]);
    match &opts.out {
        Some(dir) => {
            if dir.exists() && !dir.is_dir() {
                return Err(bad(format!("--out {}: exists and is not a folder", dir.display())));
            }
            if holds_a_run(dir) {
                if !opts.overwrite {
                    return Err(bad(format!(
                        "--out {}: already holds a run (pipeline.ron, metrics.csv); choose another folder or add --overwrite to replace it",
                        dir.display()
                    )));
                }
                overwrite_run(p, dir)?;
            }
            Ok(dir.clone())
        }
        None => {
            let base = PathBuf::from("runs").join(&p.name);
            match (holds_a_run(&base), opts.overwrite) {
                (false, _) => Ok(base),
                (true, true) => choose_run_dir(p, &RunOptions { out: Some(base), ..opts.clone() }),
                (true, false) => {
                    Ok((2..).map(|i| PathBuf::from("runs").join(format!("{}-{i}", p.name))).find(|d| !holds_a_run(d)).expect("a free name"))
                }
            }
        }
    }
}

/// The run folder and checkpoint a `--resume` continues from, with warnings to show (damaged
/// newer checkpoints skipped, settings that differ from the checkpoint's).
///
/// `target`: a checkpoint file (inside `<run>/checkpoints/`, or anywhere with `--out` naming
/// the run folder), a run folder, or its `checkpoints` folder; `None`: `--out`, else the run
/// folder of this pipeline (`runs/<name>`, `runs/<name>-2`, ...) with the newest checkpoint.
///
/// Errors (exit 2): nothing to resume there, every checkpoint unreadable, the checkpoint
/// already at or past max_steps, `--out` naming another run folder.
pub fn find_resume(p: &Pipeline, opts: &RunOptions, target: Option<&Path>) -> Result<(PathBuf, Checkpoint, Vec<String>), RunError> {
    let bad = |m: String| RunError::Invalid(vec![m]);
    let (run_dir, found) = match target {
        Some(f) if f.is_file() => {
            let ck = checkpoint::read(f).map_err(|e| bad(format!("--resume {e}")))?;
            let parent = f.parent().filter(|d| d.file_name().is_some_and(|n| n == checkpoint::DIR)).and_then(Path::parent);
            let run_dir = match (&opts.out, parent) {
                (Some(o), _) => {
                    let own = parent.is_some_and(|r| same_dir(r, o));
                    if holds_a_run(o) && !own {
                        if !opts.overwrite {
                            return Err(bad(format!(
                                "--resume {} --out {}: that folder holds another run, which the checkpoint does not come from; choose an empty --out, or add --overwrite to replace that run",
                                f.display(),
                                o.display()
                            )));
                        }
                        overwrite_run(p, o)?;
                    }
                    o.clone()
                }
                (None, Some(r)) => {
                    if r.as_os_str().is_empty() {
                        PathBuf::from(".")
                    } else {
                        r.to_path_buf()
                    }
                }
                (None, None) => {
                    return Err(bad(format!(
                        "--resume {}: the checkpoint is not in a run's `{}` folder; say where the run's outputs go with --out RUN_DIR",
                        f.display(),
                        checkpoint::DIR
                    )))
                }
            };
            (run_dir, Ok((ck, vec![])))
        }
        Some(d) if d.is_dir() => {
            let run_dir = if d.file_name().is_some_and(|n| n == checkpoint::DIR) && !d.join(checkpoint::DIR).is_dir() {
                d.parent().map(Path::to_path_buf).unwrap_or_default()
            } else {
                d.to_path_buf()
            };
            if let Some(o) = opts.out.as_ref().filter(|o| **o != run_dir) {
                return Err(bad(format!(
                    "--resume {} and --out {} name different run folders: the outputs of a resumed run go on in its own folder",
                    d.display(),
                    o.display()
                )));
            }
            let found = checkpoint::latest(&run_dir.join(checkpoint::DIR));
            (run_dir, found)
        }
        Some(x) => return Err(bad(format!("--resume {}: no such file or folder", x.display()))),
        None => {
            let candidates: Vec<PathBuf> = match &opts.out {
                Some(o) => vec![o.clone()],
                None => {
                    let base = PathBuf::from("runs").join(&p.name);
                    let mut v = vec![base];
                    v.extend((2..).map(|i| PathBuf::from("runs").join(format!("{}-{i}", p.name))).take_while(|d| d.exists()));
                    v
                }
            };
            // The folder whose newest checkpoint file was written last.
            let newest = candidates
                .iter()
                .filter_map(|d| {
                    let (_, f) = checkpoint::list(&d.join(checkpoint::DIR)).pop()?;
                    Some((std::fs::metadata(&f).and_then(|m| m.modified()).ok()?, d.clone()))
                })
                .max();
            let Some((_, run_dir)) = newest else {
                let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
                return Err(bad(format!(
                    "--resume: found no run of `{}` with checkpoints (looked in {}); give the run folder or checkpoint file: --resume PATH",
                    p.name,
                    looked.join(", ")
                )));
            };
            let found = checkpoint::latest(&run_dir.join(checkpoint::DIR));
            (run_dir, found)
        }
    };
    let (ck, mut warnings) = found.map_err(|e| bad(format!("--resume: {e}")))?;
    let m = &ck.manifest;
    if m.step >= p.max_steps {
        return Err(bad(format!(
            "--resume {}: the checkpoint is at step {} and max_steps is {}: nothing to train (raise it with --max-steps N; it counts from the start of the run)",
            ck.path.display(),
            m.step,
            p.max_steps
        )));
    }
    let old = spec::parse(&m.pipeline, &ck.path.display().to_string()).ok();
    let old_name = old.as_ref().map(|o| o.name.clone()).unwrap_or_else(|| "?".into());
    // Data and latent of another shape: say so in those words before any tensor is compared.
    let latent = p.stages.iter().find_map(|s| if let StageKind::GStep(c) = &s.kind { Some(c.latent) } else { None });
    if let (Ok((shape, _)), Some(latent)) = (spec::loader_shape(p), latent) {
        let shape = shape.map(|v| v as i64);
        if shape != m.image || latent != m.latent {
            let [c, h, w] = m.image;
            return Err(bad(format!(
                "--resume {}: the checkpoint is from pipeline `{old_name}` with images {c}×{h}×{w} and latent {}; this pipeline (`{}`) has images {}×{}×{} and latent {latent}: it cannot continue that run",
                ck.path.display(),
                m.latent,
                p.name,
                shape[0],
                shape[1],
                shape[2]
            )));
        }
    }
    // Say what differs from the run that wrote the checkpoint (allowed: a new learning rate,
    // say), field by field, apart from the settings expected to change.
    if let Some(old) = old {
        // A g_step loss left out means the one that goes with d_step's: compare it as such.
        let (old, p) = (&spec::with_resolved_g_loss(old.clone()), &spec::with_resolved_g_loss(p.clone()));
        let mut diff = vec![];
        if old.seed != p.seed {
            diff.push(format!("seed {} → {} (the random draws will not continue the old series)", old.seed, p.seed));
        }
        for s in &p.stages {
            match old.stages.iter().find(|o| o.name == s.name) {
                Some(o) if o.kind != s.kind => {
                    let (a, b) = (serde_json::to_value(&o.kind).unwrap_or_default(), serde_json::to_value(&s.kind).unwrap_or_default());
                    json_diff(&s.name, &a, &b, &mut diff);
                }
                None => diff.push(format!("stage `{}` is new", s.name)),
                _ => {}
            }
        }
        if !diff.is_empty() {
            warnings.push(format!("resuming with settings that differ from the checkpoint's: {}", diff.join("; ")));
        }
    }
    Ok((run_dir, ck, warnings))
}

/// The leaves where `a` and `b` differ, as `path old → new` (the kind's variant name left out
/// of the path: `d_step.optimizer.Adam.lr` reads `d_step.optimizer.lr`).
fn json_diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) if x.len() == 1 && y.len() == 1 && x.keys().eq(y.keys()) => {
            let (k, v) = x.iter().next().expect("one key");
            // An enum variant ({"Adam": {...}}): keep the path, look inside.
            if k.chars().next().is_some_and(char::is_uppercase) {
                json_diff(path, v, &y[k], out)
            } else {
                json_diff(&format!("{path}.{k}"), v, &y[k], out)
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => json_diff(&format!("{path}.{k}"), v, w, out),
                    None => out.push(format!("{path}.{k} removed")),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{path}.{k} = {}", y[k]));
            }
        }
        _ if a != b => out.push(format!("{path} {a} → {b}")),
        _ => {}
    }
}

/// Are `a` and `b` the same folder?
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Bring the run folder back to the state of checkpoint `m`'s step for a resumed run:
/// metrics.csv keeps its rows up to that step (later ones came from after the checkpoint), and
/// gets that step's row back from the manifest if the process died before writing it; sample
/// grids and checkpoints of later steps are removed. Returns the grids kept (oldest first),
/// which open the resumed video, and whether the grid of the checkpoint step is due but missing.
fn rewind_run_dir(p: &Pipeline, run_dir: &Path, m: &checkpoint::Manifest) -> Result<(Vec<PathBuf>, bool), RunError> {
    let step = m.step;
    let metrics = run_dir.join("metrics.csv");
    if let Ok(text) = std::fs::read_to_string(&metrics) {
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut lines = text.lines();
        let header = lines.next().map(str::trim_end);
        if header == Some(METRICS_HEADER) || header == Some(METRICS_HEADER_V0) {
            // Rows of the older header get the eval columns, empty.
            let fill = if header == Some(METRICS_HEADER_V0) { ",,," } else { "" };
            let mut kept = format!("{METRICS_HEADER}\n");
            let mut has_step = false;
            for l in lines {
                match l.split(',').next().and_then(|v| v.parse::<u64>().ok()) {
                    Some(s) if s <= step => {
                        has_step |= s == step;
                        kept += &format!("{l}{fill}\n");
                    }
                    _ => {}
                }
            }
            if let (false, Some(l)) = (has_step, m.losses) {
                let gn = l.grad_norm.map(|g| format!("{g:.6}")).unwrap_or_default();
                kept += &format!("{step},{:.3},{:.6},{:.6},{:.6},{gn},,,,\n", m.elapsed_s, l.d_loss, l.g_loss, l.penalty);
            }
            pipe_stages::atomic::write_bytes_atomic(&metrics, kept.as_bytes())
                .map_err(|e| RunError::Failed(format!("{}: {e}", metrics.display())))?;
        } else {
            // Not ours to cut: keep it aside and start a new one.
            let aside = run_dir.join("metrics.csv.old");
            std::fs::rename(&metrics, &aside).map_err(|e| RunError::Failed(format!("{}: {e}", metrics.display())))?;
            crate::say!("warning: {} did not start with pipe's header; moved to {} and started afresh", metrics.display(), aside.display());
        }
    }
    // Checkpoints after `step` belong to the abandoned continuation; so do temporary files.
    checkpoint::remove_partials(&run_dir.join(checkpoint::DIR), u64::MAX);
    for (s, f) in checkpoint::list(&run_dir.join(checkpoint::DIR)) {
        if s > step {
            std::fs::remove_file(&f).map_err(|e| RunError::Failed(format!("{}: cannot remove a later checkpoint: {e}", f.display())))?;
        }
    }
    let mut grids = vec![];
    for s in &p.stages {
        if let StageKind::Sampler(c) = &s.kind {
            let dir = run_dir.join(&c.dir);
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(n) = name.strip_prefix("step_").and_then(|r| r.strip_suffix(".png")).and_then(|n| n.parse::<u64>().ok()) else {
                    continue;
                };
                if n > step {
                    let _ = std::fs::remove_file(e.path());
                } else {
                    grids.push((n, e.path()));
                }
            }
        }
    }
    grids.sort();
    let due = p.stages.iter().any(|s| matches!(&s.kind, StageKind::Sampler(c) if step % c.every.max(1) == 0 || m.last));
    let missing = due && grids.last().is_none_or(|(s, _)| *s != step);
    Ok((grids.into_iter().map(|(_, f)| f).collect(), missing))
}

/// What a finished run produced.
#[derive(Debug)]
pub struct Summary {
    pub run_dir: PathBuf,
    /// The generator step reached.
    pub steps: u64,
    /// Steps asked for (max_steps).
    pub max_steps: u64,
    /// The step this run started from (0, or the checkpoint's step when resumed).
    pub start_step: u64,
    /// Real images consumed by this run (since `start_step`).
    pub images: u64,
    /// Wall time of this run, seconds.
    pub seconds: f64,
    pub last_grid: Option<PathBuf>,
    pub video: Option<PathBuf>,
    /// The animated GIF written by a `Gif` stage.
    pub gif: Option<PathBuf>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    pub warnings: usize,
}

/// Header of metrics.csv. `fid`, `kid` (mean over the subsets) and `is` (IS-style score, mean
/// over the splits) are filled at the steps an eval stage scored, empty elsewhere.
pub const METRICS_HEADER: &str = "step,elapsed_s,d_loss,g_loss,penalty,grad_norm,img_per_s,fid,kid,is";

/// The header of runs written before the eval columns (their rows get three empty cells).
const METRICS_HEADER_V0: &str = "step,elapsed_s,d_loss,g_loss,penalty,grad_norm,img_per_s";

/// metrics.csv as it is written: a row per logged step, at once (so a killed run loses no
/// row a checkpoint covers), with its `fid,kid,is` cells empty; an eval stage's scores, which
/// come a moment later, are then filled into their step's row by rewriting the file
/// atomically (it is small: a row per logged step).
struct MetricsWriter {
    path: PathBuf,
    w: std::io::BufWriter<std::fs::File>,
}

impl MetricsWriter {
    /// A logged step's row (the first seven cells).
    fn row(&mut self, cells: String) -> std::io::Result<()> {
        writeln!(self.w, "{cells},,,")?;
        self.w.flush()
    }
    /// Fill the eval cells of `step`'s row (no change if there is no such row).
    fn scores(&mut self, step: u64, s: &pipe_stages::item::Scores) -> std::io::Result<()> {
        self.w.flush()?;
        let text = std::fs::read_to_string(&self.path)?;
        let is = s.is_fake.map(|(m, _)| format!("{m:.4}")).unwrap_or_default();
        let prefix = format!("{step},");
        let mut out = String::with_capacity(text.len() + 64);
        let mut found = false;
        for line in text.lines() {
            if !found && line.starts_with(&prefix) {
                found = true;
                let cells: Vec<&str> = line.split(',').collect();
                out += &format!("{},{:.4},{:.6},{is}\n", cells[..7.min(cells.len())].join(","), s.fid, s.kid_mean);
            } else {
                out += line;
                out.push('\n');
            }
        }
        if !found {
            return Ok(());
        }
        pipe_stages::atomic::write_bytes_atomic(&self.path, out.as_bytes())?;
        // The old file was replaced: append to the new one from now on.
        self.w = std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(&self.path)?);
        Ok(())
    }
}

/// Build and run a prepared pipeline. `interrupts` counts Ctrl-C presses (set by the caller's
/// signal handler).
pub fn run(p: &Pipeline, opts: &RunOptions, interrupts: Arc<AtomicUsize>) -> Result<Summary, RunError> {
    let device = resolve_device(p.device)?;
    let (run_dir, resume) = match &opts.resume {
        None => (choose_run_dir(p, opts)?, None),
        Some(target) => {
            let (dir, ck, warnings) = find_resume(p, opts, target.as_deref())?;
            for w in warnings {
                crate::say!("warning: {w}");
            }
            crate::say!("resuming from {} (step {})", ck.path.display(), ck.manifest.step);
            (dir, Some(ck))
        }
    };
    let existed = run_dir.exists();
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| RunError::Invalid(vec![format!("--out {}: cannot create the run folder: {e}", run_dir.display())]))?;
    let lock = lock_run_dir(&run_dir)?;
    if resume.is_some() && opts.overwrite && opts.resume.as_ref().is_some_and(|t| t.as_ref().is_none_or(|t| !t.is_file())) {
        crate::say!("warning: --overwrite has no effect with --resume: the run goes on in its folder");
    }
    let ck_dir = run_dir.join(checkpoint::DIR);
    if p.checkpoint.is_some() && ck_dir.exists() && !ck_dir.is_dir() {
        return Err(RunError::Invalid(vec![format!(
            "{}: is not a folder, so checkpoints cannot be written there: move it away or set `checkpoint: None`",
            ck_dir.display()
        )]));
    }

    tch::manual_seed(p.seed as i64);
    if device.is_cuda() {
        tch::Cuda::manual_seed_all(p.seed);
    }
    let mut settings = RunSettings::new(device, Some(p.max_steps), p.log_every, p.seed);
    settings.on_nonfinite = p.on_nonfinite;
    // Test hook: PIPE_TEST_NONFINITE=STAGE:STEP makes STAGE's loss NaN at that step
    // (STAGE:STEP.. from that step on).
    settings.inject_nonfinite = test_hook("PIPE_TEST_NONFINITE", p, true);
    let mut prefix_frames = vec![];
    if let Some(ck) = &resume {
        settings.start_step = ck.manifest.step;
        settings.start_images = ck.manifest.images;
        settings.elapsed_before = ck.manifest.elapsed_s;
        let (grids, missing) = rewind_run_dir(p, &run_dir, &ck.manifest)?;
        prefix_frames = grids;
        settings.sample_at_start = missing;
    }
    let built = match build_stages(p, &settings, &run_dir, resume.as_ref(), prefix_frames).and_then(|b| {
        pipe_stages::atomic::write_bytes_atomic(&run_dir.join("pipeline.ron"), spec::to_ron(p).as_bytes())
            .map(|_| b)
            .map_err(|e| RunError::Failed(format!("{}: {e}", run_dir.display())))
    }) {
        Ok(b) => b,
        Err(e) => {
            // Nothing ran: leave no half-made run folder behind (only empty folders we made).
            for s in &p.stages {
                if let StageKind::Sampler(c) = &s.kind {
                    let _ = std::fs::remove_dir(run_dir.join(&c.dir));
                }
            }
            if !existed {
                drop(lock);
                let _ = std::fs::remove_file(run_dir.join(LOCK_FILE));
                let _ = std::fs::remove_dir(&run_dir);
            }
            return Err(if resume.is_some() { with_resume_hint(e) } else { e });
        }
    };

    // metrics.csv is opened before any stage thread starts: failing here returns with no thread
    // left running.
    let metrics_path = run_dir.join("metrics.csv");
    // A resumed run appends to the rows kept up to its checkpoint.
    let append = resume.is_some() && std::fs::metadata(&metrics_path).is_ok_and(|m| m.len() > 0);
    let metrics_err = |e: std::io::Error| RunError::Failed(format!("{}: {e}", metrics_path.display()));
    let mut metrics = MetricsWriter {
        path: metrics_path.clone(),
        w: std::io::BufWriter::new(if append {
            std::fs::OpenOptions::new().append(true).open(&metrics_path).map_err(metrics_err)?
        } else {
            std::fs::File::create(&metrics_path).map_err(metrics_err)?
        }),
    };
    if !append {
        writeln!(metrics.w, "{METRICS_HEADER}").map_err(metrics_err)?;
    }

    // Links.
    let (bus_tx, bus_rx) = bounded::<BusMessage>(1024);
    let drain = Arc::new(AtomicBool::new(false));
    let abort = Arc::new(AtomicBool::new(false));
    let mut inputs: Vec<Option<Receiver<Item>>> = vec![];
    let mut senders: Vec<Option<Sender<Item>>> = vec![];
    for s in &p.stages {
        if s.input.is_empty() {
            inputs.push(None);
            senders.push(None);
        } else {
            let (tx, rx) = bounded(s.queue.unwrap_or(p.queue_depth));
            inputs.push(Some(rx));
            senders.push(Some(tx));
        }
    }
    let mut outputs: Vec<Vec<Sender<Item>>> = vec![vec![]; p.stages.len()];
    for (i, s) in p.stages.iter().enumerate() {
        for up in &s.input {
            let j = p.stages.iter().position(|o| &o.name == up).expect("checked");
            outputs[j].push(senders[i].clone().expect("stage with input has a sender"));
        }
    }
    drop(senders);

    // Test hook: PIPE_TEST_PANIC=STAGE:N makes STAGE panic after receiving N items.
    let injected = test_hook("PIPE_TEST_PANIC", p, false).map(|(s, n, _)| (s, n));
    let mut handles = vec![];
    let mut all_stats = vec![];
    for ((s, stage), (input, outs)) in p.stages.iter().zip(built).zip(inputs.into_iter().zip(outputs)) {
        let stats = Arc::new(StageStats::default());
        all_stats.push((s.name.clone(), s.kind.name(), stats.clone()));
        let ctx = StageContext {
            name: s.name.clone(),
            input,
            outputs: outs,
            bus: Bus::new(bus_tx.clone(), s.name.clone()),
            abort: abort.clone(),
            drain: drain.clone(),
            stats: stats.clone(),
            panic_after: injected.as_ref().filter(|(n, _)| *n == s.name).map(|(_, k)| *k),
        };
        let bus = Bus::new(bus_tx.clone(), s.name.clone());
        let name = s.name.clone();
        let kind = s.kind.name();
        let h = std::thread::Builder::new()
            .name(format!("pipe:{name}"))
            .spawn(move || {
                let t = Instant::now();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stage.run(ctx)));
                stats.run_ns.store(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                let r = match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(panic) => {
                        Err(format!("{kind} panicked: {}", pipe_stages::stage::first_line(pipe_stages::stage::panic_message(&*panic))))
                    }
                };
                bus.post(match r {
                    Ok(()) => BusMessage::Eos { stage: name },
                    Err(msg) => BusMessage::Error { stage: name, msg },
                });
            })
            .context("cannot start a stage thread")?;
        handles.push(h);
    }
    drop(bus_tx);

    // Observe.
    let bar = if opts.quiet { ProgressBar::hidden() } else { ProgressBar::new(p.max_steps) };
    bar.set_position(settings.start_step);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let mut last_scores = String::new();
    let start = Instant::now();
    let elapsed = |start: Instant| settings.elapsed_before + start.elapsed().as_secs_f64();
    let mut last_log = (settings.elapsed_before, settings.start_images);
    let mut steps = settings.start_step;
    let mut images = settings.start_images;
    let mut checkpoint_written = None;
    let mut failure: Option<String> = None;
    let mut remaining = handles.len();
    let mut last_grid = None;
    let mut video = None;
    let mut gif = None;
    let mut warnings = 0usize;
    let mut interrupted = false;
    let plain_progress = !std::io::stderr().is_terminal();
    let mut last_line = f64::NEG_INFINITY;
    let mut seen_interrupts = 0;
    let mut drain_since: Option<Instant> = None;
    let mut named_stragglers = false;
    let mut finished_stages: Vec<String> = vec![];
    while remaining > 0 {
        crossbeam_channel::select! {
            recv(bus_rx) -> m => match m {
                Ok(BusMessage::Progress { report, logged }) => {
                    steps = report.step;
                    images = report.images;
                    bar.set_position(steps);
                    if logged {
                        let t = elapsed(start);
                        let ips = (report.images - last_log.1) as f64 / (t - last_log.0).max(1e-9);
                        last_log = (t, report.images);
                        // grad_norm is empty when there is no penalty (no x̂).
                        let gn = if report.grad_norm.is_finite() { format!("{:.6}", report.grad_norm) } else { String::new() };
                        let cells = format!("{},{:.3},{:.6},{:.6},{:.6},{gn},{:.1}", report.step, t, report.d_loss, report.g_loss, report.penalty, ips);
                        if let Err(e) = metrics.row(cells) {
                            // Training on without a record would lose the run's history: stop.
                            if failure.is_none() {
                                failure = Some(format!("cannot write {}: {e}", metrics_path.display()));
                            }
                            drain.store(true, Ordering::SeqCst);
                        }
                        let msg = format!("d_loss {:.3}  g_loss {:.3}  {:.0} img/s{last_scores}", report.d_loss, report.g_loss, ips);
                        if plain_progress && !opts.quiet && t - last_line >= 10.0 {
                            // No terminal (a log file, CI): a plain line every 10 s instead of a bar.
                            last_line = t;
                            crate::say!("step {}/{}  {msg}  {:.0}s elapsed", report.step, p.max_steps, t);
                        }
                        bar.set_message(msg);
                    }
                }
                Ok(BusMessage::Scores { step, scores }) => {
                    let is = scores.is_fake.map(|(m, sd)| format!("  IS {m:.2} ± {sd:.2}")).unwrap_or_default();
                    last_scores = format!("  FID {:.2}", scores.fid);
                    let kid = if scores.kid_subsets == 1 { format!("{:.5}", scores.kid_mean) } else { format!("{:.5} ± {:.5}", scores.kid_mean, scores.kid_std) };
                    bar.suspend(|| crate::say!("step {step}: FID {:.3}  KID {kid}{is}", scores.fid));
                    if let Err(e) = metrics.scores(step, &scores) {
                        if failure.is_none() {
                            failure = Some(format!("cannot write {}: {e}", metrics_path.display()));
                        }
                        drain.store(true, Ordering::SeqCst);
                    }
                }
                Ok(BusMessage::Warning { stage, msg }) => {
                    warnings += 1;
                    bar.suspend(|| crate::say!("warning: {stage}: {msg}"));
                }
                Ok(BusMessage::Wrote { stage, path }) => {
                    if path.extension().is_some_and(|e| e == "png") {
                        last_grid = Some(path);
                    } else if path.extension().is_some_and(|e| e == "safetensors") {
                        checkpoint_written = Some(path);
                    } else if p.stages.iter().any(|s| s.name == stage && matches!(s.kind, StageKind::Gif(_))) {
                        gif = Some(path);
                    } else {
                        video = Some(path);
                    }
                }
                Ok(BusMessage::Eos { stage }) => {
                    remaining -= 1;
                    finished_stages.push(stage);
                }
                Ok(BusMessage::Error { stage, msg }) => {
                    remaining -= 1;
                    finished_stages.push(stage.clone());
                    if failure.is_none() {
                        failure = Some(format!("stage `{stage}` failed: {msg}"));
                    }
                    drain.store(true, Ordering::SeqCst);
                }
                Err(_) => remaining = 0,
            },
            default(std::time::Duration::from_millis(100)) => {}
        }
        if drain.load(Ordering::SeqCst) {
            let since = *drain_since.get_or_insert_with(Instant::now);
            if since.elapsed().as_secs() >= 10 && !named_stragglers {
                named_stragglers = true;
                let waiting: Vec<&str> =
                    p.stages.iter().map(|s| s.name.as_str()).filter(|n| !finished_stages.iter().any(|f| f == n)).collect();
                bar.suspend(|| crate::say!("still waiting for stages to stop: {} (interrupt again to stop at once)", waiting.join(", ")));
            }
        }
        let n = interrupts.load(Ordering::SeqCst);
        if n > seen_interrupts {
            seen_interrupts = n;
            if n == 1 {
                interrupted = true;
                drain.store(true, Ordering::SeqCst);
                bar.suspend(|| {
                    crate::say!("interrupted (Ctrl-C or a stop signal): finishing the current step, writing the last grid, the video and a checkpoint (interrupt again to stop at once)")
                });
            } else {
                abort.store(true, Ordering::SeqCst);
            }
        }
    }
    // Every stage's messages come before its Eos/Error, so nothing is left on the bus here.
    for h in handles {
        let _ = h.join();
    }
    bar.finish_and_clear();
    if let Err(e) = metrics.w.flush() {
        failure.get_or_insert(format!("cannot write {}: {e}", metrics_path.display()));
    }
    drop(metrics);
    if steps > 0 {
        if let Err(e) =
            pipe_stages::plot::plot_metrics(&metrics_path, &run_dir.join("loss.png"), Some(&format!("Training losses: {}", p.name)))
        {
            crate::say!("warning: loss.png: {e}");
        }
    }
    let stats = stage_stats(&all_stats, &p.stages.iter().map(|s| s.queue.unwrap_or(p.queue_depth)).collect::<Vec<_>>());
    if let Err(e) = pipe_stages::atomic::write_bytes_atomic(
        &run_dir.join("stats.json"),
        serde_json::to_string_pretty(&stats).unwrap_or_default().as_bytes(),
    ) {
        crate::say!("warning: stats.json: {e}");
    }
    if opts.stats {
        crate::say!("{}", stats_table(&stats));
    }
    let summary = Summary {
        run_dir: run_dir.clone(),
        steps,
        max_steps: p.max_steps,
        start_step: settings.start_step,
        images: images - settings.start_images,
        seconds: start.elapsed().as_secs_f64(),
        last_grid,
        video,
        gif,
        checkpoint: checkpoint_written,
        warnings,
    };
    if let Some(f) = failure {
        return Err(RunError::Failed(format!("{f}\n  outputs so far are in {}", run_dir.display())));
    }
    if resume.is_some() && steps == settings.start_step && !interrupted {
        return Err(RunError::Invalid(vec![format!(
            "--resume: nothing to train: the data ended at step {steps} (the loader's `epochs` limit); raise the loader's `epochs` to go on"
        )]));
    }
    drop(lock);
    if interrupted {
        print_summary(&summary, "interrupted");
        return Err(RunError::Interrupted(run_dir));
    }
    Ok(summary)
}

/// A checkpoint that does not fit the pipeline's models is most often a pipeline run with
/// `--set` overrides resumed without them: say how to resume it.
fn with_resume_hint(e: RunError) -> RunError {
    match e {
        RunError::Invalid(mut v) if v.iter().any(|m| m.contains("written for a different model")) => {
            v.push("if the run was trained with --set overrides, repeat them, or resume from the run's own copy of the pipeline: pipe run RUN_DIR/pipeline.ron --resume RUN_DIR".into());
            RunError::Invalid(v)
        }
        e => e,
    }
}

/// Print the one-line summary of a run.
pub fn print_summary(s: &Summary, how: &str) {
    let plural = |n: u64, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let done = if s.steps < s.max_steps { format!("{} of {}", s.steps, plural(s.max_steps, "step")) } else { plural(s.steps, "step") };
    let done = if s.start_step > 0 { format!("{done} (steps {}–{} in this run, resumed)", s.start_step + 1, s.steps) } else { done };
    let mut parts = vec![format!("{how}: {done} in {:.1}s ({:.0} img/s)", s.seconds, s.images as f64 / s.seconds.max(1e-9))];
    if s.steps < s.max_steps && how == "done" {
        parts.push("stopped early: the loader's data ended (its `epochs` limit)".into());
    }
    parts.push(format!("outputs in {}/", s.run_dir.display()));
    if let Some(g) = &s.last_grid {
        parts.push(format!("last grid {}", g.display()));
    }
    if let Some(v) = &s.video {
        parts.push(format!("video {}", v.display()));
    }
    if let Some(g) = &s.gif {
        parts.push(format!("GIF {}", g.display()));
    }
    if let Some(c) = &s.checkpoint {
        parts.push(format!("checkpoint {}", c.display()));
    }
    if s.warnings > 0 {
        parts.push(plural(s.warnings as u64, "warning"));
    }
    crate::say!("{}", parts.join("; "));
}

fn invalid(msg: String) -> RunError {
    RunError::Invalid(vec![msg])
}

/// Build every stage in file order. The loader is opened first: its image shape sizes the
/// models, and a model that can't take it is refused here, naming both stages.
/// `resume`: the checkpoint a resumed run continues from (loaders start at its data position,
/// the step stages load their state from it); `prefix_frames`: the grid PNGs that open the
/// videos and GIFs of a resumed run.
fn build_stages(
    p: &Pipeline,
    run: &RunSettings,
    run_dir: &Path,
    resume: Option<&Checkpoint>,
    prefix_frames: Vec<PathBuf>,
) -> Result<Vec<Box<dyn Stage>>, RunError> {
    let start = resume.map(|c| c.manifest.data).unwrap_or_default();
    let d_spec = p.stages.iter().find_map(|s| if let StageKind::DStep(c) = &s.kind { Some((s, c)) } else { None }).expect("checked");
    let g_spec = p.stages.iter().find_map(|s| if let StageKind::GStep(c) = &s.kind { Some((s, c)) } else { None }).expect("checked");
    let n_critic = d_spec.1.n_critic as u64;
    // Batches are numbered across the whole run (a resumed one included): those read before the
    // checkpoint, then n_critic per step still to go (n_critic may differ from the first run's).
    let max_batches = Some(start.next_index + p.max_steps.saturating_sub(run.start_step) * n_critic);

    // Sources first.
    let mut sources: Vec<Option<Box<dyn Stage>>> = vec![];
    let mut shape: Option<([usize; 3], usize)> = None;
    for s in &p.stages {
        let stage: Option<Box<dyn Stage>> = match &s.kind {
            StageKind::IdxLoader(c) => {
                let l = idx::build(c, p.seed, max_batches, start).map_err(|e| invalid(format!("stage `{}` (IdxLoader): {e}", s.name)))?;
                shape.get_or_insert((l.image_shape(), c.batch));
                Some(Box::new(l))
            }
            StageKind::FolderLoader(c) => {
                let l =
                    folder::build(c, p.seed, max_batches, start).map_err(|e| invalid(format!("stage `{}` (FolderLoader): {e}", s.name)))?;
                shape.get_or_insert((l.image_shape(), c.batch));
                Some(Box::new(l))
            }
            _ => None,
        };
        sources.push(stage);
    }
    // The loader's shape against the models was checked by spec::check (caps).
    let (image, batch) = shape.expect("checked: a pipeline has a loader");
    let image_i64 = [image[0] as i64, image[1] as i64, image[2] as i64];
    if run.device == tch::Device::Cpu {
        check_model_memory(&g_spec.1.model, &d_spec.1.model, g_spec.1.latent, image_i64, g_spec.1.ema.is_some())?;
    }
    // A model too big for the memory makes libtorch fail inside tch (a panic): caught here.
    let (d_side, g_side) = pipe_stages::train::catch_torch(|| {
        build_models(&g_spec.1.model, &d_spec.1.model, g_spec.1.latent, image_i64, run.device).map_err(pipe_stages::StageError::Msg)
    })
    .map_err(|e| {
        let e = e.to_string();
        if pipe_stages::train::is_oom(&e) {
            RunError::Failed(format!("out of memory building the models (d_step and g_step `model`): choose smaller models; {e}"))
        } else {
            invalid(format!("models: {e}"))
        }
    })?;
    let mut run = run.clone();
    run.checkpoint = p.checkpoint.as_ref().map(|c| {
        Arc::new(CheckpointPlan {
            dir: run_dir.join(checkpoint::DIR),
            every: c.every,
            keep: c.keep,
            pipeline: spec::to_ron(p),
            image: image_i64,
            latent: g_spec.1.latent,
        })
    });
    let run = &run;
    let (baton_tx, baton_rx) = bounded::<()>(1);
    let schedule = p.stages.iter().find_map(|s| match &s.kind {
        StageKind::Sampler(c) if s.input.contains(&g_spec.0.name) => Some(SampleSchedule { n: c.grid * c.grid, every: c.every }),
        _ => None,
    });
    let eval_schedule = p.stages.iter().find_map(|s| match &s.kind {
        StageKind::Eval(c) if s.input.contains(&g_spec.0.name) => Some(SampleSchedule { n: c.n, every: c.every }),
        _ => None,
    });
    let mut d_side = Some(d_side);
    let mut g_side = Some(g_side);
    let mut baton_rx = Some(baton_rx);
    let mut baton_tx = Some(baton_tx);
    let mut stages = vec![];
    for (s, src) in p.stages.iter().zip(sources) {
        let ctx = |e: pipe_stages::StageError| invalid(format!("stage `{}` ({}): {e}", s.name, s.kind.name()));
        let st: Box<dyn Stage> = match (&s.kind, src) {
            (_, Some(src)) => src,
            (StageKind::Augment(c), None) => {
                // x̂ is only read by the DRAGAN penalty: don't draw it for nothing.
                let mut c = c.clone();
                if matches!(c.perturb, pipe_stages::augment::PerturbMode::Dragan(_))
                    && !matches!(d_spec.1.penalty, pipe_stages::d_step::Penalty::Dragan(_))
                {
                    crate::say!(
                        "note: stage `{}`: perturb Dragan(..) is not drawn: d_step's penalty is {}, which does not use x̂",
                        s.name,
                        match d_spec.1.penalty {
                            pipe_stages::d_step::Penalty::WganGp(_) => "WganGp (it interpolates real and generated samples itself)",
                            _ => "None",
                        }
                    );
                    c.perturb = pipe_stages::augment::PerturbMode::Off;
                }
                Box::new(Augment::build(&c, p.seed).map_err(ctx)?)
            }
            (StageKind::DStep(c), None) => Box::new(
                DStep::build(
                    c,
                    run.clone(),
                    d_side.take().expect("one d_step"),
                    g_spec.1.latent,
                    baton_rx.take().expect("one d_step"),
                    resume,
                )
                .map_err(ctx)?,
            ),
            (StageKind::GStep(c), None) => {
                let g = GStep::build(
                    c,
                    &d_spec.1.loss,
                    run.clone(),
                    g_side.take().expect("one g_step"),
                    baton_tx.take().expect("one g_step"),
                    schedule,
                    batch as i64,
                    resume,
                )
                .map_err(ctx)?;
                Box::new(match eval_schedule {
                    Some(e) => g.with_eval(e).map_err(ctx)?,
                    None => g,
                })
            }
            (StageKind::Eval(c), None) => {
                let e = EvalStage::build(c, image, p.seed, |w| crate::say!("warning: stage `{}`: {w}", s.name)).map_err(ctx)?;
                Box::new(e)
            }
            (StageKind::Sampler(c), None) => Box::new(sampler::build(c, run_dir).map_err(ctx)?),
            (StageKind::Video(c), None) => Box::new(video::build(c, run_dir).map_err(ctx)?.with_prefix(prefix_frames.clone())),
            (StageKind::Gif(c), None) => {
                let expected = prefix_frames.len() as u64
                    + expected_grids(run.start_step, p.max_steps, schedule.as_ref().map(|s| s.every), run.sample_at_start);
                Box::new(gif::build(c, run_dir, expected).map_err(ctx)?.with_prefix(prefix_frames.clone()))
            }
            (StageKind::IdxLoader(_) | StageKind::FolderLoader(_), None) => {
                unreachable!("sources are built above")
            }
        };
        stages.push(st);
    }
    Ok(stages)
}

/// Sample grids a run makes after step `start` up to `max_steps` with a sampler every `every`
/// steps (None: no sampler on g_step): one at each multiple of `every` and one at the last step,
/// plus the grid of step `start` when a resumed run makes it again (`at_start`).
fn expected_grids(start: u64, max_steps: u64, every: Option<u64>, at_start: bool) -> u64 {
    let Some(every) = every.map(|e| e.max(1)) else { return 0 };
    let mut n = u64::from(at_start);
    if max_steps > start {
        n += max_steps / every - start / every + u64::from(max_steps % every != 0);
    }
    n
}

/// Refuse models whose weights and optimiser state alone would not fit in the memory
/// available now (Linux's MemAvailable): building them would get the process killed by the
/// kernel instead of failing cleanly. Each trained value takes 5 floats (weight, gradient,
/// Adam's two moments and its scratch), 6 for G with an EMA. No check where MemAvailable
/// cannot be read.
fn check_model_memory(
    g: &pipe_stages::models::GModel,
    d: &pipe_stages::models::DModel,
    latent: i64,
    image: [i64; 3],
    ema: bool,
) -> Result<(), RunError> {
    let (Some(gv), Some(dv)) = (pipe_stages::models::g_values(g, latent, image), pipe_stages::models::d_values(d, image)) else {
        return Ok(());
    };
    let need = (gv * if ema { 6 } else { 5 } + dv * 5) * 4;
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match avail {
        Some(a) if need > a => Err(RunError::Invalid(vec![format!(
            "the models need about {:.1} GB for weights, gradients and Adam's state (G {} and D {} values), more than the {:.1} GB of memory available: choose smaller models (d_step and g_step `model`)",
            need as f64 / 1e9,
            gv,
            dv,
            a as f64 / 1e9
        )])),
        _ => Ok(()),
    }
}

/// Statistics of one stage over a run (stats.json).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageReport {
    pub stage: String,
    pub kind: String,
    /// Items received and sent.
    pub items_in: u64,
    pub items_out: u64,
    /// Wall time of the stage, seconds.
    pub seconds: f64,
    /// Fractions of that time working, blocked waiting for input, blocked waiting for room
    /// downstream, and (d_step only) waiting for g_step to finish the previous generator step;
    /// they add up to 1. A data-starved d_step shows a high `waiting_for_input`.
    pub busy: f64,
    pub waiting_for_input: f64,
    pub waiting_for_output: f64,
    pub waiting_for_handover: f64,
    /// Input queue length seen at each receive: mean and maximum, and the capacity.
    pub queue_mean: f64,
    pub queue_max: u64,
    pub queue_capacity: usize,
}

fn stage_stats(all: &[(String, &'static str, Arc<StageStats>)], capacity: &[usize]) -> Vec<StageReport> {
    all.iter()
        .zip(capacity)
        .map(|((name, kind, s), &capacity)| {
            let secs = s.run_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let frac = |ns: u64| if secs > 0.0 { (ns as f64 / 1e9 / secs).min(1.0) } else { 0.0 };
            let wi = frac(s.wait_in_ns.load(Ordering::Relaxed));
            let wo = frac(s.wait_out_ns.load(Ordering::Relaxed));
            let wh = frac(s.wait_handover_ns.load(Ordering::Relaxed));
            let n_in = s.items_in.load(Ordering::Relaxed);
            StageReport {
                stage: name.clone(),
                kind: kind.to_string(),
                items_in: n_in,
                items_out: s.items_out.load(Ordering::Relaxed),
                seconds: secs,
                busy: (1.0 - wi - wo - wh).max(0.0),
                waiting_for_input: wi,
                waiting_for_output: wo,
                waiting_for_handover: wh,
                queue_mean: s.depth_sum.load(Ordering::Relaxed) as f64 / n_in.max(1) as f64,
                queue_max: s.depth_max.load(Ordering::Relaxed),
                queue_capacity: capacity,
            }
        })
        .collect()
}

/// The per-stage statistics as a table, the busiest stage marked as the bottleneck.
pub fn stats_table(stats: &[StageReport]) -> String {
    let busiest = stats.iter().max_by(|a, b| a.busy.total_cmp(&b.busy)).map(|s| s.stage.clone());
    let mut out = format!(
        "{:<12} {:<13} {:>8} {:>8} {:>6} {:>9} {:>9} {:>10} {:>7}\n",
        "stage", "kind", "in", "out", "busy", "wait in", "wait out", "hand-over", "queue"
    );
    for s in stats {
        out += &format!(
            "{:<12} {:<13} {:>8} {:>8} {:>5.0}% {:>8.0}% {:>8.0}% {:>9.0}% {:>3.1}/{}{}\n",
            s.stage,
            s.kind,
            s.items_in,
            s.items_out,
            100.0 * s.busy,
            100.0 * s.waiting_for_input,
            100.0 * s.waiting_for_output,
            100.0 * s.waiting_for_handover,
            s.queue_mean,
            s.queue_capacity,
            if Some(&s.stage) == busiest.as_ref() { "  ← bottleneck" } else { "" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_grids_count_multiples_and_the_last_step() {
        // A fresh run: 20, 40 and the last step 50.
        assert_eq!(expected_grids(0, 50, Some(20), false), 3);
        // The last step a multiple of `every`: no extra grid.
        assert_eq!(expected_grids(0, 200, Some(20), false), 10);
        // Resumed at 30 (its grids are prefix frames): 40, 50; with the checkpoint step's grid made again, one more.
        assert_eq!(expected_grids(30, 50, Some(20), false), 2);
        assert_eq!(expected_grids(30, 50, Some(20), true), 3);
        assert_eq!(expected_grids(40, 40, Some(20), false), 0);
        assert_eq!(expected_grids(0, 5, Some(500), false), 1);
        assert_eq!(expected_grids(0, 50, None, false), 0);
    }

    #[test]
    fn metrics_rows_are_written_at_once_and_scores_filled_in_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        std::fs::write(&path, format!("{METRICS_HEADER}\n")).unwrap();
        let mut m =
            MetricsWriter { path: path.clone(), w: std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(&path).unwrap()) };
        m.row("10,1.0,1,2,3,4,5".into()).unwrap();
        m.row("20,2.0,1,2,3,4,5".into()).unwrap();
        // Both rows are on disk before any score (a killed run keeps them).
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
        let s = pipe_stages::item::Scores {
            fid: 12.5,
            kid_mean: 0.25,
            kid_std: 0.01,
            is_fake: Some((7.0, 0.1)),
            is_real: None,
            kid_size: 10,
            kid_subsets: 3,
        };
        m.scores(10, &s).unwrap();
        m.row("30,3.0,1,2,3,4,5".into()).unwrap();
        m.scores(99, &s).unwrap(); // no such row: nothing changes
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, [METRICS_HEADER, "10,1.0,1,2,3,4,5,12.5000,0.250000,7.0000", "20,2.0,1,2,3,4,5,,,", "30,3.0,1,2,3,4,5,,,"]);
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
