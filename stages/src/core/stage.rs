//! The stage contract: how a stage runs, receives, sends and reports.

use crate::core::item::{Item, Record, StepReport};
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// An error that stops a stage (and with it the pipeline). The runner prefixes it with the
/// stage name, so messages here say what went wrong and, for files, which file.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{0}")]
    Msg(String),
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    /// A libtorch error; shown without libtorch's C++ backtrace (first line only).
    #[error("torch: {}", first_line(&.0.to_string()))]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// Settings out of range (every problem, one per line).
    #[error("{0}")]
    Config(#[from] crate::core::problem::Problems),
    /// Models that cannot be built, optimiser state that does not fit, a non-finite loss.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// A checkpoint that cannot be written, or does not fit the models.
    #[error(transparent)]
    Checkpoint(#[from] crate::io::checkpoint::CheckpointError),
    /// The video cannot be encoded (naming the file), or FFmpeg does not start or has no libx264.
    #[error(transparent)]
    Video(#[from] crate::kinds::video::VideoError),
}

/// The first line of a message, without libtorch's appended C++ backtrace ("Exception raised
/// from ..."), unless RUST_BACKTRACE is set.
pub fn first_line(m: &str) -> String {
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
        return m.to_string();
    }
    m.lines().next().unwrap_or("").trim_end().to_string()
}

/// The text of a panic payload (`panic!` with a `String` or a `&str`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload.downcast_ref::<String>().map(|s| s.as_str()).or_else(|| payload.downcast_ref::<&str>().copied()).unwrap_or("(no message)")
}

impl StageError {
    pub fn msg(m: impl Into<String>) -> Self {
        StageError::Msg(m.into())
    }
    pub fn file(path: impl AsRef<std::path::Path>, msg: impl Into<String>) -> Self {
        StageError::File { path: path.as_ref().display().to_string(), msg: msg.into() }
    }
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        StageError::Io { path: path.as_ref().display().to_string(), source }
    }
}

/// Check that a configured output path stays inside the run folder: relative, without `..`,
/// and (for files) naming a file. `field` names the setting in the message and the problem.
pub fn check_inside_run(p: &std::path::Path, field: &str, file: bool) -> Result<(), crate::core::problem::Problem> {
    use std::path::Component;
    let problem = |msg: String| Err(crate::core::problem::Problem::new(field, msg));
    if p.as_os_str().is_empty() {
        return problem(format!("`{field}` is empty: expected a {} inside the run folder", if file { "file name" } else { "folder name" }));
    }
    if p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return problem(format!(
            "`{field}` is {:?}: outputs stay inside the run folder, so give a relative path without `..` (use --out to choose the run folder)",
            p.display().to_string()
        ));
    }
    if file && p.file_name().is_none() {
        return problem(format!("`{field}` must name a file"));
    }
    Ok(())
}

/// Messages from stages to the runner.
#[derive(Debug, Clone)]
pub enum BusMessage {
    /// Something the user should know that does not stop the run (a skipped file, say).
    Warning { stage: String, msg: String },
    /// A generator step finished; `logged` steps carry figures read from the device (and are
    /// the only steps an eval stage scores).
    Progress { report: StepReport, logged: bool },
    /// Sample-quality scores of generator step `step`, from an eval stage.
    Scores { step: u64, scores: crate::core::item::Scores },
    /// A file the run produced (a sample grid, the video), for the summary.
    Wrote { stage: String, path: std::path::PathBuf },
    /// A stage finished normally (its inputs ended, or it is a source that ran out). Posted by
    /// the runner's thread wrapper when `Stage::run` returns `Ok`.
    Eos { stage: String },
    /// A stage failed (returned an error or panicked): the pipeline drains and the run fails.
    Error { stage: String, msg: String },
}

/// The sending side of the pipeline bus. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    tx: Sender<BusMessage>,
    stage: String,
}

impl Bus {
    pub fn new(tx: Sender<BusMessage>, stage: impl Into<String>) -> Self {
        Bus { tx, stage: stage.into() }
    }
    /// Name of the stage this bus handle belongs to.
    pub fn stage(&self) -> &str {
        &self.stage
    }
    pub fn warn(&self, msg: impl Into<String>) {
        let _ = self.tx.send(BusMessage::Warning { stage: self.stage.clone(), msg: msg.into() });
    }
    pub fn wrote(&self, path: impl Into<std::path::PathBuf>) {
        let _ = self.tx.send(BusMessage::Wrote { stage: self.stage.clone(), path: path.into() });
    }
    /// Post a message, waiting while the bus is full (the runner drains it continuously).
    pub fn post(&self, m: BusMessage) {
        let _ = self.tx.send(m);
    }
    /// Post a message unless the bus is full (for frequent, droppable progress messages).
    pub fn offer(&self, m: BusMessage) {
        let _ = self.tx.try_send(m);
    }
}

/// Per-stage counters, updated by [`StageContext`] as items pass and read by the runner:
/// nanoseconds blocked waiting for input and for output, items in and out, and the input
/// queue depth seen at each receive.
#[derive(Debug, Default)]
pub struct StageStats {
    pub wait_in_ns: AtomicU64,
    pub wait_out_ns: AtomicU64,
    pub items_in: AtomicU64,
    pub items_out: AtomicU64,
    /// Sum and maximum of the input queue length seen at each receive.
    pub depth_sum: AtomicU64,
    pub depth_max: AtomicU64,
    /// Wall time of the stage's `run`, set by the runner when it returns.
    pub run_ns: AtomicU64,
    /// Time d_step spends waiting for g_step to finish the previous generator step (the
    /// hand-over that keeps their steps alternating), not for data.
    pub wait_handover_ns: AtomicU64,
}

impl StageStats {
    /// Count `d` as time d_step waited for g_step's hand-over.
    pub fn add_wait_handover(&self, d: std::time::Duration) {
        self.wait_handover_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
    /// Count `d` as time blocked waiting for input.
    pub fn add_wait_in(&self, d: std::time::Duration) {
        self.wait_in_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
    fn add_wait_out(&self, d: std::time::Duration) {
        self.wait_out_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Everything a running stage gets from the runner.
pub struct StageContext {
    /// Stage name from the pipeline file.
    pub name: String,
    /// Merged input stream (all links into this stage). Disconnected = EOS.
    pub input: Option<Receiver<Item>>,
    /// One sender per outgoing link; [`StageContext::send`] sends to all.
    pub outputs: Vec<Sender<Item>>,
    pub bus: Bus,
    /// Set by the runner on an immediate stop (second Ctrl-C, another stage failed).
    pub abort: Arc<AtomicBool>,
    /// Set by the runner on a graceful stop (first Ctrl-C): sources stop producing, the
    /// rest drain.
    pub drain: Arc<AtomicBool>,
    /// Counters for the per-stage statistics.
    pub stats: Arc<StageStats>,
    /// Fault injection for tests: panic in `recv` after this many items (set by the runner
    /// from the environment variable `PIPE_TEST_PANIC=STAGE:N`; None normally).
    pub panic_after: Option<u64>,
    /// The run's records, for a stage that watches the run ([`crate::kinds::Kind::watches_run`]);
    /// None for the others. It ends (disconnects) once every stage that does not watch the run
    /// has finished, so no record is missed. Read it with [`StageContext::recv_any`].
    pub records: Option<Receiver<Record>>,
}

/// What [`StageContext::recv_any`] received.
#[derive(Debug)]
pub enum Received {
    /// An item from the input link.
    Item(Item),
    /// A record of the run.
    Record(Record),
}

/// Outcome of sending to the outputs.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// At least one downstream stage took the item.
    Ok,
    /// Every downstream stage has gone away: stop producing.
    Closed,
}

impl StageContext {
    /// Receive the next input item; `None` at EOS or on abort.
    pub fn recv(&self) -> Option<Item> {
        let rx = self.input.as_ref()?;
        self.before_recv(rx);
        let t = std::time::Instant::now();
        let r = loop {
            if self.abort.load(Ordering::Relaxed) {
                break None;
            }
            match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(item) => break Some(item),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break None,
            }
        };
        if r.is_some() {
            self.stats.add_wait_in(t.elapsed());
            self.stats.items_in.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Before a receive from the input link: the injected test fault, when due, and the queue
    /// depth for the statistics.
    fn before_recv(&self, rx: &Receiver<Item>) {
        let n = self.stats.items_in.load(Ordering::Relaxed);
        if self.panic_after.is_some_and(|k| n >= k) {
            panic!("injected test fault (PIPE_TEST_PANIC) after {n} items");
        }
        let depth = rx.len() as u64;
        self.stats.depth_sum.fetch_add(depth, Ordering::Relaxed);
        self.stats.depth_max.fetch_max(depth, Ordering::Relaxed);
    }

    /// Receive the next input item or run record, whichever comes first; `None` once both have
    /// ended (or there are neither), or on abort. For stages that watch the run; the others use
    /// [`StageContext::recv`].
    pub fn recv_any(&self) -> Option<Received> {
        let mut input = self.input.as_ref();
        let mut records = self.records.as_ref();
        if let Some(rx) = input {
            self.before_recv(rx);
        }
        // Time waiting for either counts as waiting for input (not as busy) in the statistics.
        let t = std::time::Instant::now();
        loop {
            if self.abort.load(Ordering::Relaxed) {
                return None;
            }
            let (no_items, no_records) = (crossbeam_channel::never(), crossbeam_channel::never());
            crossbeam_channel::select! {
                recv(input.unwrap_or(&no_items)) -> m => match m {
                    Ok(item) => {
                        self.stats.add_wait_in(t.elapsed());
                        self.stats.items_in.fetch_add(1, Ordering::Relaxed);
                        return Some(Received::Item(item));
                    }
                    Err(_) => input = None,
                },
                recv(records.unwrap_or(&no_records)) -> m => match m {
                    Ok(r) => {
                        self.stats.add_wait_in(t.elapsed());
                        return Some(Received::Record(r));
                    }
                    Err(_) => records = None,
                },
                default(std::time::Duration::from_millis(100)) => {}
            }
            if input.is_none() && records.is_none() {
                return None;
            }
        }
    }

    /// Send an item downstream, blocking while the link is full (back-pressure).
    /// Returns [`Sent::Closed`] when no downstream stage takes items any more, or on abort.
    pub fn send(&self, item: Item) -> Sent {
        let t = std::time::Instant::now();
        let r = match self.outputs.as_slice() {
            [] => Sent::Closed,
            [only] => self.send_to(only, item),
            _ => self.send_each(item),
        };
        self.stats.add_wait_out(t.elapsed());
        if r == Sent::Ok {
            self.stats.items_out.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn send_each(&self, item: Item) -> Sent {
        // Fan-out: frames and sample images are copied to every output; other items go to
        // the first output only (the graph check allows fan-out only for those kinds).
        let copies: Vec<Item> = match &item {
            Item::Frame(f) => (1..self.outputs.len()).map(|_| Item::Frame(f.clone())).collect(),
            Item::Images(im) => (1..self.outputs.len()).map(|_| Item::Images(im.clone())).collect(),
            Item::EvalImages(im) => (1..self.outputs.len()).map(|_| Item::EvalImages(im.clone())).collect(),
            _ => return self.send_to(&self.outputs[0], item),
        };
        let mut any = self.send_to(&self.outputs[0], item) == Sent::Ok;
        for (tx, it) in self.outputs[1..].iter().zip(copies) {
            any |= self.send_to(tx, it) == Sent::Ok;
        }
        if any {
            Sent::Ok
        } else {
            Sent::Closed
        }
    }

    fn send_to(&self, tx: &Sender<Item>, mut item: Item) -> Sent {
        loop {
            if self.abort.load(Ordering::Relaxed) {
                return Sent::Closed;
            }
            match tx.send_timeout(item, std::time::Duration::from_millis(100)) {
                Ok(()) => return Sent::Ok,
                Err(crossbeam_channel::SendTimeoutError::Timeout(it)) => item = it,
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return Sent::Closed,
            }
        }
    }

    /// True once a graceful stop was asked for (sources should stop producing).
    pub fn draining(&self) -> bool {
        self.drain.load(Ordering::Relaxed) || self.abort.load(Ordering::Relaxed)
    }

    /// True once an immediate stop was asked for.
    pub fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }
}

/// A stage ready to run: built and checked, owning its buffers and models.
pub trait Stage: Send {
    /// Run until the inputs end (EOS), the outputs close, or a stop is asked for.
    fn run(self: Box<Self>, ctx: StageContext) -> Result<(), StageError>;
}
