//! Watching a running pipeline from the runner's thread: the bus (progress, scores, warnings,
//! files written, EOS and errors), the progress display, metrics.csv, Ctrl-C, and the decision
//! of how the run ends.

use super::metrics::MetricsWriter;
use crate::spec::Pipeline;
use crossbeam_channel::{Receiver, Sender};
use indicatif::{ProgressBar, ProgressStyle};
use pipe_stages::core::item::{Record, StepReport};
use pipe_stages::core::ports::Output;
use pipe_stages::core::stage::BusMessage;
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
            _ => {}
        }
    }
    if path.extension().is_some_and(|e| e == "png") {
        "last grid".into()
    } else {
        format!("{stage} output")
    }
}

/// The progress display: a bar on a terminal, a plain line every 10 s otherwise, nothing
/// when quiet.
struct Progress {
    bar: ProgressBar,
    plain: bool,
    last_line: f64,
    max_steps: u64,
}

impl Progress {
    fn new(quiet: bool, max_steps: u64, start: u64) -> Self {
        let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(max_steps) };
        bar.set_position(start);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Progress { bar, plain: !quiet && !std::io::stderr().is_terminal(), last_line: f64::NEG_INFINITY, max_steps }
    }
    /// A logged step: the bar's message, or a plain line at most every 10 s.
    fn logged(&mut self, step: u64, t: f64, msg: String) {
        if self.plain && t - self.last_line >= 10.0 {
            self.last_line = t;
            crate::say!("step {step}/{}  {msg}  {t:.0}s elapsed", self.max_steps);
        }
        self.bar.set_message(msg);
    }
    /// Print a line above the bar.
    fn say(&self, line: String) {
        self.bar.suspend(|| crate::say!("{line}"));
    }
}

/// Watch the run until every stage thread has ended. Writes a metrics.csv row per logged step;
/// on a stage's failure or a first Ctrl-C asks the others to drain; on a second Ctrl-C, to
/// stop at once.
pub fn watch(
    p: &Pipeline,
    run_dir: &Path,
    quiet: bool,
    settings: &RunSettings,
    mut ctl: Control,
    metrics: &mut MetricsWriter,
    interrupts: &AtomicUsize,
) -> Outcome {
    let mut out = Outcome { steps: settings.start_step, images: settings.start_images, ..Default::default() };
    let mut progress = Progress::new(quiet, p.max_steps, settings.start_step);
    let start = Instant::now();
    let elapsed = || settings.elapsed_before + start.elapsed().as_secs_f64();
    let mut last_log = (settings.elapsed_before, settings.start_images);
    let mut last_scores = String::new();
    let mut seen_interrupts = 0;
    let mut drain_since: Option<Instant> = None;
    let mut named_stragglers = false;
    let mut finished: Vec<String> = vec![];
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
                        progress.logged(report.step, t, format!("d_loss {:.3}  g_loss {:.3}  {ips:.0} img/s{last_scores}", report.d_loss, report.g_loss));
                    }
                }
                Ok(BusMessage::Scores { step, scores }) => {
                    let is = scores.is_fake.map(|(m, sd)| format!("  IS {m:.2} ± {sd:.2}")).unwrap_or_default();
                    last_scores = format!("  FID {:.2}", scores.fid);
                    let kid = if scores.kid_subsets == 1 { format!("{:.5}", scores.kid_mean) } else { format!("{:.5} ± {:.5}", scores.kid_mean, scores.kid_std) };
                    progress.say(format!("step {step}: FID {:.3}  KID {kid}{is}", scores.fid));
                    ctl.record(Record::Scores { step, scores });
                    if let Err(e) = metrics.scores(step, &scores) {
                        out.fail(format!("cannot write {}: {e}", metrics.path().display()));
                        ctl.drain.store(true, Ordering::SeqCst);
                    }
                }
                Ok(BusMessage::Warning { stage, msg }) => {
                    out.warnings += 1;
                    // Quiet: a rank other than 0 (whose warnings rank 0 has too) or a tool.
                    if !quiet {
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
                if !quiet {
                    progress.say("interrupted (Ctrl-C or a stop signal): finishing the current step, writing the last grid, the video and a checkpoint (interrupt again to stop at once)".into());
                }
            } else {
                ctl.abort.store(true, Ordering::SeqCst);
            }
        }
    }
    progress.bar.finish_and_clear();
    out
}

/// The first seven cells of a metrics.csv row (grad_norm is empty when there is no penalty).
fn row(r: &StepReport, t: f64, ips: f64) -> String {
    let gn = if r.grad_norm.is_finite() { format!("{:.6}", r.grad_norm) } else { String::new() };
    format!("{},{t:.3},{:.6},{:.6},{:.6},{gn},{ips:.1}", r.step, r.d_loss, r.g_loss, r.penalty)
}
