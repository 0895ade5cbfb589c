//! Watching a running pipeline from the runner's thread: the bus (progress, scores, warnings,
//! files written, EOS and errors), the progress display, metrics.csv, Ctrl-C, and the decision
//! of how the run ends.

use super::metrics::MetricsWriter;
use super::{json_line, round3, LogFormat, RunOptions};
use crate::spec::Pipeline;
use crossbeam_channel::{Receiver, Sender};
use indicatif::{ProgressBar, ProgressStyle};
use pipe_stages::core::item::{Record, StepReport};
use pipe_stages::core::ports::Output;
use pipe_stages::core::stage::BusMessage;
use pipe_stages::kinds::g_step::GStepConfig;
use pipe_stages::train::RunSettings;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The runner's handles on the stage threads: the bus they post to, and the flags that ask
/// them to stop (`drain`: finish what is in flight; `abort`: stop at once).
pub struct Control {
    pub bus: Receiver<BusMessage>,
    pub drain: Arc<AtomicBool>,
    pub abort: Arc<AtomicBool>,
    /// Stage threads still running.
    pub running: usize,
    /// The record channels of the stages that watch the run, dropped (ending them) once every
    /// other stage has finished.
    pub records: Vec<Sender<Record>>,
}

impl Control {
    /// Send a record to every stage that watches the run (one that has gone is skipped).
    fn record(&self, r: Record) {
        for tx in &self.records {
            let _ = tx.send(r.clone());
        }
    }
}

/// Seconds after the training stage ends before the stages still finishing (an evaluation of
/// the last step, the video) are named, at most: sooner with a shorter `--progress-every`.
const FINISHING_S: f64 = 5.0;

/// What the run came to, as seen on the bus.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Generator step reached and real images consumed by then (counted from the run's start).
    pub steps: u64,
    pub images: u64,
    /// The first failure: a stage's error, or metrics.csv that could not be written.
    pub failure: Option<String>,
    /// Stopped by a first Ctrl-C (drained).
    pub interrupted: bool,
    /// Files the stages wrote, by what they are (`last grid`, `video`, `GIF`, `checkpoint`): the
    /// latest of each, in the order first written.
    pub files: Vec<(String, PathBuf)>,
    pub warnings: usize,
}

impl Outcome {
    /// Record `path`, written by a stage, as the latest file of its label.
    fn wrote(&mut self, label: String, path: PathBuf) {
        match self.files.iter_mut().find(|(l, _)| *l == label) {
            Some(e) => e.1 = path,
            None => self.files.push((label, path)),
        }
    }
    /// Keep the first failure.
    fn fail(&mut self, msg: String) {
        self.failure.get_or_insert(msg);
    }
}

/// The label of a file stage `stage` wrote: what its kind declares it to be
/// ([`pipe_stages::kinds::Kind::outputs`]), `last grid` for a step picture, `checkpoint` for
/// the training state.
fn label(p: &Pipeline, run_dir: &Path, stage: &str, path: &Path) -> String {
    if path.extension().is_some_and(|e| e == "safetensors") {
        return "checkpoint".into();
    }
    let outputs = p.stages.iter().filter(|s| s.name == stage).flat_map(|s| s.kind.outputs());
    for o in outputs {
        match o {
            Output::File { path: f, what, .. } if run_dir.join(&f) == path => return what.to_string(),
            Output::StepFiles { dir, .. } if path.starts_with(run_dir.join(dir)) => return "last grid".into(),
            Output::FilesIn { dir, prefix, what, .. }
                if path.parent() == Some(&run_dir.join(dir))
                    && path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)) =>
            {
                return what.to_string()
            }
            _ => {}
        }
    }
    if path.extension().is_some_and(|e| e == "png") {
        "last grid".into()
    } else {
        format!("{stage} output")
    }
}

/// How a run's progress is shown ([`RunOptions`]'s `silent`, `quiet`, `log_format`,
/// `progress_every`): a bar on a terminal, a plain line every so many seconds otherwise, JSON
/// lines on stdout, or nothing.
struct Progress {
    bar: ProgressBar,
    /// Progress in words on stderr: the bar, or plain lines.
    shown: bool,
    /// Plain lines on stderr (stderr is not a terminal), at most one every `every` seconds.
    plain: bool,
    every: f64,
    json: bool,
    last_line: f64,
    max_steps: u64,
    /// This run's first step and its start, for the ETA.
    start_step: u64,
    start: Instant,
}

impl Progress {
    fn new(opts: &RunOptions, max_steps: u64, start_step: u64) -> Self {
        let json = !opts.silent && opts.log_format == LogFormat::Json;
        let shown = !opts.silent && !opts.quiet && !json;
        let bar = if shown { ProgressBar::new(max_steps) } else { ProgressBar::hidden() };
        bar.set_position(start_step);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}, ETA {eta}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Progress {
            bar,
            shown,
            plain: shown && !std::io::stderr().is_terminal(),
            every: opts.progress_every.unwrap_or(super::PROGRESS_EVERY_S),
            json,
            last_line: f64::NEG_INFINITY,
            max_steps,
            start_step,
            start: Instant::now(),
        }
    }

    /// Seconds left at this run's pace so far (None before a step of this run is done).
    fn eta(&self, step: u64) -> Option<f64> {
        let done = step.saturating_sub(self.start_step);
        let t = self.start.elapsed().as_secs_f64();
        (done > 0 && t > 0.0).then(|| self.max_steps.saturating_sub(step) as f64 * t / done as f64)
    }

    /// A logged step: the bar's message, a plain line when one is due, or a JSON line.
    fn logged(&mut self, r: &StepReport, t: f64, ips: f64, fid: Option<f64>) {
        let eta = self.eta(r.step);
        if self.json {
            let v = serde_json::json!({
                "event": "step", "step": r.step, "max_steps": self.max_steps, "elapsed_s": round3(t),
                "d_loss": finite(r.d_loss), "g_loss": finite(r.g_loss), "penalty": finite(r.penalty),
                "grad_norm": finite(r.grad_norm), "img_per_s": round3(ips), "images": r.images,
                "eta_s": eta.map(round3), "fid": fid,
            });
            json_line(&v);
            return;
        }
        let fid = fid.map(|f| format!("  FID {f:.2}")).unwrap_or_default();
        let msg = format!("d_loss {:.3}  g_loss {:.3}  {ips:.0} img/s{fid}", r.d_loss, r.g_loss);
        // The first logged step, then one every `every` seconds, and the last.
        if self.plain && (t - self.last_line >= self.every || r.step == self.max_steps) {
            self.last_line = t;
            let pct = 100.0 * r.step as f64 / self.max_steps.max(1) as f64;
            let eta = eta.map(|e| format!(", ETA {}", clock(e))).unwrap_or_default();
            crate::say!("step {}/{} ({pct:.0}%)  {msg}  [{}{eta}]", r.step, self.max_steps, clock(t));
        }
        self.bar.set_message(msg);
    }

    /// An evaluation's scores: a line above the bar, or a JSON line.
    fn scores(&self, step: u64, s: &pipe_stages::core::item::Scores) {
        if self.json {
            let v = serde_json::json!({
                "event": "scores", "step": step, "fid": finite(s.fid), "kid": finite(s.kid_mean), "kid_std": finite(s.kid_std),
                "is": s.is_fake.map(|p| p.0), "is_std": s.is_fake.map(|p| p.1),
            });
            json_line(&v);
            return;
        }
        let is = s.is_fake.map(|(m, sd)| format!("  IS {m:.2} ± {sd:.2}")).unwrap_or_default();
        let kid = if s.kid_subsets == 1 { format!("{:.5}", s.kid_mean) } else { format!("{:.5} ± {:.5}", s.kid_mean, s.kid_std) };
        if self.shown {
            self.say(format!("step {step}: FID {:.3}  KID {kid}{is}", s.fid));
        }
    }

    /// A line about the run's progress above the bar, or a plain line (none with `--quiet`,
    /// JSON or for a silent rank).
    fn note(&self, line: String) {
        if self.shown {
            self.say(line);
        }
    }

    /// Print a line above the bar.
    fn say(&self, line: String) {
        self.bar.suspend(|| crate::say!("{line}"));
    }
}

/// A JSON number, or null for NaN and infinities (which JSON cannot hold).
fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Seconds as `1h02m03s`, `2m03s` or `3s`.
fn clock(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, x) => format!("{x}s"),
        (0, m, x) => format!("{m}m{x:02}s"),
        (h, m, x) => format!("{h}h{m:02}m{x:02}s"),
    }
}

/// loss.png redrawn while the run goes on: at a logged step, when the last drawing is done and
/// at least [`LivePlot::EVERY`] has passed, on a thread of its own (the bus is not held up).
struct LivePlot {
    name: String,
    run_dir: PathBuf,
    last: Option<Instant>,
    drawing: Option<std::thread::JoinHandle<()>>,
}

impl LivePlot {
    /// Least time between two drawings.
    const EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    /// After a logged step's row is in metrics.csv: draw, if due.
    fn logged(&mut self) {
        if self.drawing.as_ref().is_some_and(|h| !h.is_finished()) || self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let (name, run_dir) = (self.name.clone(), self.run_dir.clone());
        // A failure shows at the end, when the final plot is drawn.
        self.drawing = Some(std::thread::spawn(move || {
            let _ = super::plot_losses(&name, &run_dir);
        }));
    }

    /// Wait for the drawing in progress (the final one writes the same file).
    fn finish(self) {
        if let Some(h) = self.drawing {
            let _ = h.join();
        }
    }
}

/// Watch the run until every stage thread has ended. Writes a metrics.csv row per logged step;
/// on a stage's failure or a first Ctrl-C asks the others to drain; on a second Ctrl-C, to
/// stop at once. Redraws loss.png as it goes (not when `opts.silent`).
pub fn watch(
    p: &Pipeline,
    run_dir: &Path,
    opts: &RunOptions,
    settings: &RunSettings,
    mut ctl: Control,
    metrics: &mut MetricsWriter,
    interrupts: &AtomicUsize,
) -> Outcome {
    let mut out = Outcome { steps: settings.start_step, images: settings.start_images, ..Default::default() };
    let mut progress = Progress::new(opts, p.max_steps, settings.start_step);
    let silent = opts.silent;
    let start = Instant::now();
    let elapsed = || settings.elapsed_before + start.elapsed().as_secs_f64();
    let mut last_log = (settings.elapsed_before, settings.start_images);
    let mut last_fid: Option<f64> = None;
    let mut plot = (!opts.silent).then(|| LivePlot { name: p.name.clone(), run_dir: run_dir.to_path_buf(), last: None, drawing: None });
    let mut seen_interrupts = 0;
    let mut drain_since: Option<Instant> = None;
    let mut named_stragglers = false;
    let mut finished: Vec<String> = vec![];
    // When the training ended, and whether the stages still finishing after it (an evaluation
    // of the last step, say) have been named.
    let trainer = p.stages.iter().find(|s| s.kind.config::<GStepConfig>().is_some()).map(|s| s.name.clone());
    let mut trained_at: Option<Instant> = None;
    let mut named_finishing = false;
    while ctl.running > 0 {
        crossbeam_channel::select! {
            recv(ctl.bus) -> m => match m {
                Ok(BusMessage::Progress { report, logged }) => {
                    out.steps = report.step;
                    out.images = report.images;
                    progress.bar.set_position(report.step);
                    if logged {
                        let t = elapsed();
                        let ips = (report.images - last_log.1) as f64 / (t - last_log.0).max(1e-9);
                        last_log = (t, report.images);
                        ctl.record(Record::Step { report, elapsed_s: t, img_per_s: ips });
                        if let Err(e) = metrics.row(row(&report, t, ips)) {
                            // Training on without a record would lose the run's history: stop.
                            out.fail(format!("cannot write {}: {e}", metrics.path().display()));
                            ctl.drain.store(true, Ordering::SeqCst);
                        }
                        progress.logged(&report, t, ips, last_fid);
                        if let Some(plot) = plot.as_mut() {
                            plot.logged();
                        }
                    }
                }
                Ok(BusMessage::Scores { step, scores }) => {
                    last_fid = scores.fid.is_finite().then_some(scores.fid);
                    progress.scores(step, &scores);
                    ctl.record(Record::Scores { step, scores });
                    if let Err(e) = metrics.scores(step, &scores) {
                        out.fail(format!("cannot write {}: {e}", metrics.path().display()));
                        ctl.drain.store(true, Ordering::SeqCst);
                    }
                }
                Ok(BusMessage::Warning { stage, msg }) => {
                    out.warnings += 1;
                    // Silent: a rank other than 0 (whose warnings rank 0 has too) or a tool.
                    if !silent {
                        progress.say(format!("warning: {stage}: {msg}"));
                    }
                }
                Ok(BusMessage::Wrote { stage, path }) => out.wrote(label(p, run_dir, &stage, &path), path),
                Ok(BusMessage::Eos { stage }) => {
                    ctl.running -= 1;
                    finished.push(stage);
                }
                Ok(BusMessage::Error { stage, msg }) => {
                    ctl.running -= 1;
                    finished.push(stage.clone());
                    out.fail(format!("stage `{stage}` failed: {msg}"));
                    ctl.drain.store(true, Ordering::SeqCst);
                }
                Err(_) => ctl.running = 0,
            },
            default(std::time::Duration::from_millis(100)) => {}
        }
        // The stages that watch the run have had every record once the others have finished.
        if !ctl.records.is_empty() && p.stages.iter().all(|s| s.kind.watches_run() || finished.contains(&s.name)) {
            ctl.records.clear();
        }
        // From the last step's report (g_step may then still wait for room in an evaluation's
        // queue), or from g_step's end for a run ended by its data.
        if out.steps >= p.max_steps || trainer.as_ref().is_some_and(|t| finished.contains(t)) {
            let since = *trained_at.get_or_insert_with(Instant::now);
            if !named_finishing && !ctl.drain.load(Ordering::SeqCst) && since.elapsed().as_secs_f64() >= progress.every.min(FINISHING_S) {
                named_finishing = true;
                let waiting: Vec<String> = p
                    .stages
                    .iter()
                    .filter(|s| !s.kind.watches_run() && !finished.contains(&s.name))
                    .map(|s| format!("{} ({})", s.name, s.kind.name()))
                    .collect();
                if !waiting.is_empty() {
                    progress.note(format!("training done at step {}; still finishing: {}", out.steps, waiting.join(", ")));
                }
            }
        }
        if ctl.drain.load(Ordering::SeqCst) {
            let since = *drain_since.get_or_insert_with(Instant::now);
            if since.elapsed().as_secs() >= 10 && !named_stragglers {
                named_stragglers = true;
                let waiting: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).filter(|n| !finished.iter().any(|f| f == n)).collect();
                progress.say(format!("still waiting for stages to stop: {} (interrupt again to stop at once)", waiting.join(", ")));
            }
        }
        let n = interrupts.load(Ordering::SeqCst);
        if n > seen_interrupts {
            seen_interrupts = n;
            if n == 1 {
                out.interrupted = true;
                ctl.drain.store(true, Ordering::SeqCst);
                if !silent {
                    progress.say("interrupted (Ctrl-C or a stop signal): finishing the current step, writing the last grid, the video and a checkpoint (interrupt again to stop at once)".into());
                }
            } else {
                ctl.abort.store(true, Ordering::SeqCst);
            }
        }
    }
    progress.bar.finish_and_clear();
    if let Some(plot) = plot {
        plot.finish();
    }
    out
}

/// The first seven cells of a metrics.csv row (grad_norm is empty when there is no penalty).
fn row(r: &StepReport, t: f64, ips: f64) -> String {
    let gn = if r.grad_norm.is_finite() { format!("{:.6}", r.grad_norm) } else { String::new() };
    format!("{},{t:.3},{:.6},{:.6},{:.6},{gn},{ips:.1}", r.step, r.d_loss, r.g_loss, r.penalty)
}
