//! Build a checked pipeline into running stages, run it, and collect what it produces.
//!
//! Threads: one per stage, joined by bounded channels (capacity `queue_depth`). The runner's
//! own thread reads the bus (progress, warnings, files written), draws the progress bar,
//! writes metrics.csv, and decides how the run ends:
//! - every stage finished: success;
//! - a stage failed or panicked: the others are asked to drain (sources stop, the rest finish
//!   their inputs, so the video is finalised), then the run fails naming the stage;
//! - Ctrl-C once: drain, exit 130; twice: stop at once.

mod build;
pub mod folder;
mod hooks;
pub mod metrics;
mod monitor;
pub mod ranks;
mod resume;
pub mod stats;

pub use folder::{choose_run_dir, lock_run_dir};
pub use metrics::METRICS_HEADER;
pub use resume::find_resume;
pub use stats::{stats_table, StageReport};

use crate::spec::{self, DeviceChoice, Pipeline};
use crossbeam_channel::{bounded, Receiver, Sender};
use pipe_stages::core::stage::{Bus, BusMessage, Stage, StageContext, StageStats};
use pipe_stages::io::checkpoint::{self, Checkpoint, CheckpointConfig};
use pipe_stages::train::RunSettings;
use pipe_stages::Item;
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
    /// Print nothing but errors, and draw no live loss.png: a rank other than 0 (rank 0 speaks
    /// for the run) or a tool that runs a pipeline (`pipe bench`).
    pub silent: bool,
    /// `--quiet`: no progress bar or progress lines (warnings, errors and the summary stay).
    pub quiet: bool,
    /// `--log-format`: human-readable progress on stderr, or one JSON object per logged step
    /// (and per evaluation) on stdout.
    pub log_format: LogFormat,
    /// `--progress-every`: seconds between progress lines when stderr is not a terminal
    /// (default [`PROGRESS_EVERY_S`]).
    pub progress_every: Option<f64>,
    /// Continue a run from a checkpoint: `Some(None)` for the newest checkpoint of the
    /// pipeline's run folder (or of `--out`), `Some(Some(path))` for a run folder or a
    /// checkpoint file.
    pub resume: Option<Option<PathBuf>>,
    /// Write a checkpoint every this many generator steps (overrides the file's).
    pub checkpoint_every: Option<u64>,
}

/// Default seconds between progress lines when stderr is not a terminal (a log file, CI).
pub const PROGRESS_EVERY_S: f64 = 30.0;

/// How `pipe run` reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// A progress bar on a terminal (step, ETA, losses, img/s, latest FID); otherwise a line
    /// every `--progress-every` seconds. On stderr.
    #[default]
    Text,
    /// One JSON object per logged step (`"event": "step"`), per evaluation (`"scores"`) and at
    /// the end (`"done"`), one a line on stdout, for scripts. Warnings and errors stay on stderr.
    Json,
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

/// Load a pipeline file, apply `--set` overrides and command-line settings, and check it.
pub fn prepare(file: &Path, opts: &RunOptions) -> Result<Pipeline, RunError> {
    let (mut p, source) = spec::load(file).map_err(|es| RunError::Invalid(es.iter().map(|e| e.to_string()).collect()))?;
    let mut errs = vec![];
    for s in &opts.sets {
        if let Err(e) = spec::apply_override(&mut p, s) {
            errs.push(e.to_string());
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

/// Resolve the pipeline's speed settings for `device` into `settings` (refusing what the
/// device cannot do), and on CUDA make the training stream and turn on cuDNN's autotuner.
fn speed_up(p: &Pipeline, device: tch::Device, quiet: bool, settings: &mut RunSettings) -> Result<(), RunError> {
    let cx = spec::speed_context(p, device.is_cuda());
    let problems = p.speed_settings().problems(&cx);
    if !problems.is_empty() {
        return Err(RunError::Invalid(problems.into_iter().map(|b| b.msg).collect()));
    }
    settings.speed = p.speed_settings().resolve(&cx);
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::cudnn_set_benchmark(true);
        if cx.graphs_built {
            let stream = pipe_stages::train::cuda::CudaStream::new(i).map_err(|e| RunError::Failed(e.to_string()))?;
            settings.stream = Some(Arc::new(stream));
        }
        if !quiet {
            let name = pipe_stages::train::cuda::device_info(i).map(|d| d.name).unwrap_or_else(|_| "CUDA".into());
            crate::say!("training on cuda:{i} ({name}): {}", settings.speed);
        }
    }
    Ok(())
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
    /// Files the stages wrote, by what they are (`last grid`, `video`, `GIF`, `checkpoint`):
    /// the latest of each, in the order first written.
    pub files: Vec<(String, PathBuf)>,
    pub warnings: usize,
}

/// Build and run a prepared pipeline. `interrupts` counts Ctrl-C presses (set by the caller's
/// signal handler).
///
/// Errors: [`RunError::Invalid`] when the run cannot start (the run folder, a checkpoint, a
/// stage that cannot be built), [`RunError::Failed`] when a stage failed (the outputs so far
/// stay valid), [`RunError::Interrupted`] after a drained Ctrl-C.
pub fn run(p: &Pipeline, opts: &RunOptions, interrupts: Arc<AtomicUsize>) -> Result<Summary, RunError> {
    let device = resolve_device(p.device)?;
    // A data-parallel rank joins the others first (and checks they run the same pipeline).
    let ranks = ranks::join(p, device)?;
    let rank = ranks.as_ref().map_or(0, |r| r.env.rank);
    let worker = rank != 0;
    let worker_p;
    let p = if worker {
        worker_p = ranks::worker_pipeline(p);
        &worker_p
    } else {
        p
    };
    let quiet_opts;
    let opts = if worker {
        quiet_opts = RunOptions { silent: true, ..opts.clone() };
        &quiet_opts
    } else {
        opts
    };
    // Ranks other than 0 write nothing that lasts: their run folder is a temporary one (a
    // resumed run still reads rank 0's checkpoint).
    let scratch = if worker { Some(tempfile::tempdir().map_err(|e| RunError::Failed(format!("a temporary folder: {e}")))?) } else { None };
    let (run_dir, resume) = match &scratch {
        Some(t) if opts.resume.is_none() => (t.path().to_path_buf(), None),
        Some(t) => {
            let ck = open_run(p, opts).map_err(|e| match e {
                RunError::Invalid(mut v) => {
                    v.push(format!(
                        "rank {rank}: every rank reads the checkpoint it resumes from at the same path as rank 0; across machines, put the run folder on a shared file system or copy it to the same path"
                    ));
                    RunError::Invalid(v)
                }
                e => e,
            })?;
            (t.path().to_path_buf(), ck.1)
        }
        None => open_run(p, opts)?,
    };
    let existed = run_dir.exists();
    let lock = claim_run_dir(p, &run_dir)?;
    tch::manual_seed(p.seed as i64);
    if device.is_cuda() {
        tch::Cuda::manual_seed_all(p.seed);
    }
    let mut settings = RunSettings::new(device, Some(p.max_steps), p.log_every, p.seed);
    settings.on_nonfinite = p.on_nonfinite;
    speed_up(p, device, opts.silent, &mut settings)?;
    if let Some(r) = &ranks {
        settings.kill_at = hooks::kill_rank_hook(r.env.rank);
        settings.group = Some(r.group.clone());
        settings.host_group = Some(r.host_group.clone());
        // The gradient all-reduce runs inside each update: updates run eagerly.
        if settings.speed.graph {
            if p.execution == pipe_stages::train::speed::Execution::Graph {
                return Err(RunError::Invalid(vec![
                    "execution Graph with several ranks: the update all-reduces gradients between ranks, which pipe does not capture in a CUDA graph yet; use Auto or Eager".into(),
                ]));
            }
            settings.speed.graph = false;
        }
    }
    // Test hook: PIPE_TEST_NONFINITE=STAGE:STEP makes STAGE's loss NaN at that step
    // (STAGE:STEP.. from that step on; a suffix @RANK: on that rank only).
    settings.inject_nonfinite = hooks::test_hook("PIPE_TEST_NONFINITE", p, true, rank);
    hooks::warn_stage_hooks();
    let prefix_frames = match &resume {
        Some(ck) => continue_from(p, &run_dir, ck, &mut settings)?,
        None => vec![],
    };
    let stages = match build::build_stages(p, &settings, &run_dir, resume.as_ref(), &prefix_frames)
        .and_then(|b| record_pipeline(p, &run_dir).map(|_| b))
    {
        Ok(b) => b,
        Err(e) => {
            // Nothing ran: leave no half-made run folder behind (only empty folders we made).
            folder::remove_empty_step_dirs(p, &run_dir);
            if !existed {
                drop(lock);
                let _ = std::fs::remove_file(run_dir.join(folder::LOCK_FILE));
                let _ = std::fs::remove_dir(&run_dir);
            }
            return Err(if resume.is_some() { with_resume_hint(e) } else { e });
        }
    };
    // metrics.csv is opened before any stage thread starts: failing here returns with no thread
    // left running.
    let mut metrics = metrics::MetricsWriter::open(&run_dir, resume.is_some())
        .map_err(|e| RunError::Failed(format!("{}: {e}", run_dir.join("metrics.csv").display())))?;
    let started = Instant::now();
    let (ctl, threads) = spawn(p, stages)?;
    let mut outcome = monitor::watch(p, &run_dir, opts, &settings, ctl, &mut metrics, &interrupts);
    // Every stage's messages come before its Eos/Error, so nothing is left on the bus here.
    let stats = threads.join(p);
    if let Err(e) = metrics.flush() {
        outcome.failure.get_or_insert(format!("cannot write {}: {e}", metrics.path().display()));
    }
    drop(metrics);
    write_reports(p, &run_dir, &outcome, &stats, opts.stats);
    let summary = Summary {
        run_dir: run_dir.clone(),
        steps: outcome.steps,
        max_steps: p.max_steps,
        start_step: settings.start_step,
        images: outcome.images - settings.start_images,
        seconds: started.elapsed().as_secs_f64(),
        files: outcome.files,
        warnings: outcome.warnings,
    };
    if let Some(f) = outcome.failure {
        return Err(RunError::Failed(format!("{f}\n  outputs so far are in {}", run_dir.display())));
    }
    if resume.is_some() && outcome.steps == settings.start_step && !outcome.interrupted {
        return Err(RunError::Invalid(vec![format!(
            "--resume: nothing to train: the data ended at step {} (the loader's `epochs` limit); raise the loader's `epochs` to go on",
            outcome.steps
        )]));
    }
    drop(lock);
    if outcome.interrupted {
        if !worker {
            print_summary(&summary, "interrupted");
            if opts.log_format == LogFormat::Json {
                print_summary_json(&summary, "interrupted");
            }
        }
        return Err(RunError::Interrupted(run_dir));
    }
    Ok(summary)
}

/// `pipe run --nproc N`, before starting the ranks: what every rank would refuse, said once.
/// The device, a global batch that does not split over `n` ranks, and a `--resume` with
/// nothing to resume (`--overwrite` left to the ranks: it may change folders).
///
/// Errors: [`RunError::Invalid`] naming the problem.
pub fn check_ranks(p: &Pipeline, opts: &RunOptions, n: usize) -> Result<(), RunError> {
    resolve_device(p.device)?;
    if let Some(src) = p.stages.iter().find_map(|s| s.kind.source()) {
        let shard = pipe_stages::data::batches::Shard { rank: 0, world: n };
        if let Some(why) = shard.batch_problem(src.batch) {
            return Err(invalid(format!("--nproc {n}: {why}")));
        }
    }
    if let (Some(target), false) = (&opts.resume, opts.overwrite) {
        resume::find_resume(p, opts, target.as_deref())?;
    }
    Ok(())
}

/// The run folder and, for `--resume`, the checkpoint to continue from (its warnings printed).
fn open_run(p: &Pipeline, opts: &RunOptions) -> Result<(PathBuf, Option<Checkpoint>), RunError> {
    match &opts.resume {
        None => Ok((folder::choose_run_dir(p, opts)?, None)),
        Some(target) => {
            let (dir, ck, warnings) = resume::find_resume(p, opts, target.as_deref())?;
            if opts.silent {
                // A rank other than 0: rank 0 says it all.
                return Ok((dir, Some(ck)));
            }
            for w in warnings {
                crate::say!("warning: {w}");
            }
            crate::say!("resuming from {} (step {})", ck.path.display(), ck.manifest.step);
            if opts.overwrite && target.as_ref().is_none_or(|t| !t.is_file()) {
                crate::say!("warning: --overwrite has no effect with --resume: the run goes on in its folder");
            }
            Ok((dir, Some(ck)))
        }
    }
}

/// Create the run folder and take its lock (held until the returned file is dropped).
/// Errors: the folder cannot be made, another process uses it, or `checkpoints` there is not a
/// folder while the pipeline writes checkpoints.
fn claim_run_dir(p: &Pipeline, run_dir: &Path) -> Result<std::fs::File, RunError> {
    std::fs::create_dir_all(run_dir).map_err(|e| invalid(format!("--out {}: cannot create the run folder: {e}", run_dir.display())))?;
    let lock = folder::lock_run_dir(run_dir)?;
    let ck_dir = run_dir.join(checkpoint::DIR);
    if p.checkpoint.is_some() && ck_dir.exists() && !ck_dir.is_dir() {
        return Err(invalid(format!(
            "{}: is not a folder, so checkpoints cannot be written there: move it away or set `checkpoint: None`",
            ck_dir.display()
        )));
    }
    Ok(lock)
}

/// Set a resumed run up to continue checkpoint `ck`: its step, images and time, and the run
/// folder rewound to it ([`resume::rewind_run_dir`]). Returns the grids that open the frame
/// sinks.
fn continue_from(p: &Pipeline, run_dir: &Path, ck: &Checkpoint, settings: &mut RunSettings) -> Result<Vec<PathBuf>, RunError> {
    settings.start_step = ck.manifest.step;
    settings.start_images = ck.manifest.images;
    settings.elapsed_before = ck.manifest.elapsed_s;
    let (grids, missing) = resume::rewind_run_dir(p, run_dir, &ck.manifest)?;
    settings.sample_at_start = missing;
    Ok(grids)
}

/// Write the run's `pipeline.ron` (the pipeline as run, overrides applied).
fn record_pipeline(p: &Pipeline, run_dir: &Path) -> Result<(), RunError> {
    pipe_stages::io::atomic::write_bytes_atomic(&run_dir.join("pipeline.ron"), spec::to_ron(p).as_bytes())
        .map_err(|e| RunError::Failed(format!("{}: {e}", run_dir.display())))
}

/// The running stage threads and their counters.
struct Threads {
    handles: Vec<std::thread::JoinHandle<()>>,
    stats: Vec<(String, &'static str, Arc<StageStats>)>,
}

impl Threads {
    /// Wait for every stage thread; their statistics.
    fn join(self, p: &Pipeline) -> Vec<stats::StageReport> {
        for h in self.handles {
            let _ = h.join();
        }
        stats::stage_stats(&self.stats, &p.stages.iter().map(|s| s.queue.unwrap_or(p.queue_depth)).collect::<Vec<_>>())
    }
}

/// Link the built stages (a bounded channel into each stage with an input, sized by its
/// `queue` or the pipeline's `queue_depth`) and start a thread for each. A stage that returns
/// an error or panics posts an error on the bus; one that returns normally posts EOS.
fn spawn(p: &Pipeline, built: Vec<Box<dyn Stage>>) -> Result<(monitor::Control, Threads), RunError> {
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
    let injected = hooks::test_hook("PIPE_TEST_PANIC", p, false, 0).map(|(s, n, _)| (s, n));
    let mut threads = Threads { handles: vec![], stats: vec![] };
    let mut records = vec![];
    for ((s, stage), (input, outs)) in p.stages.iter().zip(built).zip(inputs.into_iter().zip(outputs)) {
        let stats = Arc::new(StageStats::default());
        threads.stats.push((s.name.clone(), s.kind.name(), stats.clone()));
        let ctx = StageContext {
            name: s.name.clone(),
            input,
            outputs: outs,
            bus: Bus::new(bus_tx.clone(), s.name.clone()),
            abort: abort.clone(),
            drain: drain.clone(),
            stats: stats.clone(),
            panic_after: injected.as_ref().filter(|(n, _)| *n == s.name).map(|(_, k)| *k),
            records: s.kind.watches_run().then(|| {
                let (tx, rx) = crossbeam_channel::unbounded();
                records.push(tx);
                rx
            }),
        };
        let bus = Bus::new(bus_tx.clone(), s.name.clone());
        let (name, kind) = (s.name.clone(), s.kind.name());
        let h = std::thread::Builder::new()
            .name(format!("pipe:{name}"))
            .spawn(move || {
                let t = Instant::now();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stage.run(ctx)));
                stats.run_ns.store(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                bus.post(match r {
                    Ok(Ok(())) => BusMessage::Eos { stage: name },
                    Ok(Err(e)) => BusMessage::Error { stage: name, msg: e.to_string() },
                    Err(panic) => BusMessage::Error {
                        stage: name,
                        msg: format!(
                            "{kind} panicked: {}",
                            pipe_stages::core::stage::first_line(pipe_stages::core::stage::panic_message(&*panic))
                        ),
                    },
                });
            })
            .map_err(|e| RunError::Failed(format!("cannot start a stage thread: {e}")))?;
        threads.handles.push(h);
    }
    let running = threads.handles.len();
    Ok((monitor::Control { bus: bus_rx, drain, abort, running, records }, threads))
}

/// After the stages ended: loss.png (when a step was taken), stats.json, and the `--stats`
/// table. Failures here are warnings: the run's results are already on disk.
fn write_reports(p: &Pipeline, run_dir: &Path, outcome: &monitor::Outcome, stats: &[stats::StageReport], print_stats: bool) {
    if outcome.steps > 0 {
        if let Err(e) = plot_losses(&p.name, run_dir) {
            crate::say!("warning: loss.png: {e}");
        }
    }
    let json = serde_json::to_string_pretty(stats).unwrap_or_default();
    if let Err(e) = pipe_stages::io::atomic::write_bytes_atomic(&run_dir.join("stats.json"), json.as_bytes()) {
        crate::say!("warning: stats.json: {e}");
    }
    if print_stats {
        crate::say!("{}", stats::stats_table(stats));
    }
}

/// Draw the loss.png of run `name` in `run_dir` from its metrics.csv (atomically: a reader sees
/// the old plot or the new one). Errors: see [`pipe_stages::io::plot::plot_metrics`].
pub(crate) fn plot_losses(name: &str, run_dir: &Path) -> Result<(), pipe_stages::io::plot::PlotError> {
    let title = format!("Training losses: {name}");
    pipe_stages::io::plot::plot_metrics(&run_dir.join("metrics.csv"), &run_dir.join("loss.png"), Some(&title))
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
    // The grid first and the checkpoint last, as before; the stages' files in between.
    let rank = |l: &str| match l {
        "last grid" => 0,
        "checkpoint" => 2,
        _ => 1,
    };
    let mut files: Vec<&(String, PathBuf)> = s.files.iter().collect();
    files.sort_by_key(|(l, _)| rank(l));
    for (label, path) in files {
        parts.push(format!("{label} {}", path.display()));
    }
    if s.warnings > 0 {
        parts.push(plural(s.warnings as u64, "warning"));
    }
    crate::say!("{}", parts.join("; "));
}

/// The summary as one JSON line on stdout (`--log-format json`): `"event"` (`done`,
/// `interrupted`), the steps, images, seconds, run folder and files written.
pub fn print_summary_json(s: &Summary, how: &str) {
    let files: serde_json::Map<String, serde_json::Value> =
        s.files.iter().map(|(l, p)| (l.clone(), p.display().to_string().into())).collect();
    let v = serde_json::json!({
        "event": how, "step": s.steps, "max_steps": s.max_steps, "start_step": s.start_step, "images": s.images,
        "seconds": round3(s.seconds), "run_dir": s.run_dir.display().to_string(), "files": files, "warnings": s.warnings,
    });
    json_line(&v);
}

/// One JSON object on its own line of stdout, flushed (a script reads it at once):
/// `--log-format json`'s events.
pub fn json_line(v: &serde_json::Value) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{v}");
    let _ = o.flush();
}

/// `v` rounded to 3 decimals (timings and speeds carry no more).
pub(crate) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

pub(crate) fn invalid(msg: String) -> RunError {
    RunError::Invalid(vec![msg])
}
