//! `TensorBoard(logdir: "tb")`: a sink that writes the run as a TensorBoard event file, so that
//! `tensorboard --logdir runs/NAME` (or W&B's TensorBoard import) shows it while it trains.
//!
//! What it writes, each at its generator step:
//! - scalars, from the run's records (the figures metrics.csv has): `loss/d_loss`,
//!   `loss/g_loss`, `loss/penalty`, `train/grad_norm` (when there is a penalty),
//!   `train/img_per_s`, and `eval/fid`, `eval/kid`, `eval/is` when an `Eval` stage scores;
//! - images: the sample grids it receives from a sampler (tag `samples`, PNG);
//! - text: the pipeline as run (tag `pipeline`, the run folder's pipeline.ron).
//!
//! The file is `<logdir>/events.out.tfevents.pipe.<unix seconds>`: TFRecord framing (length, masked CRC-32C
//! of the length, the record, masked CRC-32C of the record) around protobuf `Event` messages
//! (TensorFlow's `event.proto` and `summary.proto`; the few fields used are declared below with
//! prost's derive, so no `protoc` is needed). Each record is flushed when written, so a killed
//! run leaves at most a torn last record, which readers skip.
//!
//! A resumed run continues the log: the records of the steps up to the checkpoint's are copied
//! into a new file (named to sort after the old one, which is then removed), and a (tag, step)
//! the log already has is not written again, so no step appears twice. A TensorBoard watching
//! the folder moves on to the new file and, seeing the steps start again, drops what it showed
//! past them.
//!
//! Why our own writer: the format is small and stable, and the crates seen do not fit:
//! `tensorboard-rs` 0.5.9 pulls a third copy of `image` and protobuf 2, `tboard` 0.1.1 needs
//! `protoc` at build time.

use crate::core::item::{Frame, Item, Record};
use crate::core::ports::{ItemKind, Output, Ports};
use crate::core::problem::Problem;
use crate::core::stage::{Received, Stage, StageContext, StageError};
use crate::kinds::frames::check_frame;
use crate::kinds::{BuildContext, CheckContext, Kind};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The start of the event files' names inside `logdir`: `events.out.tfevents.pipe.<unix
/// seconds>` (TensorBoard reads files whose name holds `tfevents`). Each start or resume of a
/// run writes a new file whose name sorts after the earlier ones (which it replaces): a
/// TensorBoard that is watching then moves on to it.
pub const EVENTS_PREFIX: &str = "events.out.tfevents.pipe.";

/// Settings of the `TensorBoard` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TensorBoardConfig {
    /// The folder, inside the run folder, of the event file (`events.out.tfevents.pipe.*`).
    /// Default `tb`. Watch it with `tensorboard --logdir RUN_DIR` (or a folder of runs).
    pub logdir: PathBuf,
}

impl Default for TensorBoardConfig {
    fn default() -> Self {
        TensorBoardConfig { logdir: "tb".into() }
    }
}

impl Kind for TensorBoardConfig {
    const NAME: &'static str = "TensorBoard";
    const PORTS: Ports = Ports::sink(ItemKind::Frame, "frame: RGB8 picture on cpu (sample grids); and the run's records");

    fn validate(&self, _cx: &CheckContext<'_>) -> Vec<Problem> {
        crate::core::stage::check_inside_run(&self.logdir, "logdir", false).err().into_iter().collect()
    }

    fn outputs(&self) -> Vec<Output<'_>> {
        vec![Output::FilesIn { field: "logdir", dir: &self.logdir, prefix: EVENTS_PREFIX, what: "TensorBoard log", example: "tb" }]
    }

    fn watches_run(&self) -> bool {
        true
    }

    /// A resumed run keeps the file's records up to the checkpoint's step.
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Box<dyn Stage>, StageError> {
        let dir = cx.run_dir.join(&self.logdir);
        if dir.exists() && !dir.is_dir() {
            return Err(StageError::file(&dir, "`logdir` names a file here: expected a folder for the TensorBoard log (move the file away or choose another `logdir`)"));
        }
        std::fs::create_dir_all(&dir).map_err(|e| StageError::io(&dir, e))?;
        let start = cx.run.start_step;
        let writer = if cx.resume.is_some() { EventWriter::resume(&dir, start)? } else { EventWriter::create(&dir)? };
        Ok(Box::new(TensorBoard { writer, pipeline: cx.run_dir.join("pipeline.ron"), start }))
    }
}

/// The running stage.
struct TensorBoard {
    writer: EventWriter,
    /// The run's pipeline.ron, shown as text (written by the runner before the stages start).
    pipeline: PathBuf,
    /// The step the run starts from (0, or the checkpoint's).
    start: u64,
}

impl Stage for TensorBoard {
    fn run(mut self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        if let Ok(text) = std::fs::read_to_string(&self.pipeline) {
            // Indented: a code block in the text plugin's Markdown.
            let md: String = text.lines().map(|l| format!("    {l}\n")).collect();
            self.writer.write(self.start, vec![text_value("pipeline", &md)])?;
        }
        while let Some(r) = ctx.recv_any() {
            match r {
                Received::Item(Item::Frame(f)) => {
                    if let Err(e) = check_frame(&f, None) {
                        ctx.bus.warn(format!("frame of step {} left out: {e}", f.step));
                        continue;
                    }
                    self.writer.write(f.step, vec![image_value("samples", &f)?])?;
                }
                Received::Item(other) => return Err(crate::kinds::frames::wrong_item("TensorBoard", other.kind())),
                Received::Record(Record::Step { report: r, img_per_s, .. }) => {
                    let mut v = vec![
                        scalar("loss/d_loss", r.d_loss),
                        scalar("loss/g_loss", r.g_loss),
                        scalar("loss/penalty", r.penalty),
                        scalar("train/img_per_s", img_per_s),
                    ];
                    // NaN without a penalty (metrics.csv leaves it empty).
                    if r.grad_norm.is_finite() {
                        v.push(scalar("train/grad_norm", r.grad_norm));
                    }
                    self.writer.write(r.step, v)?;
                }
                Received::Record(Record::Scores { step, scores: s }) => {
                    let mut v = vec![scalar("eval/fid", s.fid), scalar("eval/kid", s.kid_mean)];
                    if let Some((m, _)) = s.is_fake {
                        v.push(scalar("eval/is", m));
                    }
                    self.writer.write(step, v)?;
                }
            }
        }
        ctx.bus.wrote(&self.writer.path);
        Ok(())
    }
}

// ---- the protobuf messages (the fields of TensorFlow's event.proto / summary.proto used here)

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// Generator step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

/// `Event.what`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// `brain.Event:2`: the first record of a file.
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    #[prost(oneof = "ValueKind", tags = "2, 4, 8")]
    pub value: Option<ValueKind>,
}

/// `Summary.Value.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(Image),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

/// `tensorflow.Summary.Image`: an encoded picture (PNG here).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 1 grey, 3 RGB, 4 RGBA.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// `tensorflow.SummaryMetadata`: which plugin shows the value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// `SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `tensorflow.TensorProto`, for a string (the text plugin's data).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// `DT_STRING` = 7.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto` (no dimensions: a scalar).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

/// `TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// A scalar summary value (stored as f32, as TensorBoard's `simple_value` is).
fn scalar(tag: &str, v: f64) -> Value {
    Value { tag: tag.into(), metadata: None, value: Some(ValueKind::SimpleValue(v as f32)) }
}

/// A text summary value (the text plugin's string tensor), Markdown.
fn text_value(tag: &str, md: &str) -> Value {
    Value {
        tag: tag.into(),
        metadata: Some(SummaryMetadata { plugin_data: Some(PluginData { plugin_name: "text".into(), content: vec![] }) }),
        value: Some(ValueKind::Tensor(TensorProto {
            dtype: 7,
            tensor_shape: Some(TensorShape { dim: vec![] }),
            string_val: vec![md.as_bytes().to_vec()],
        })),
    }
}

/// An image summary value: the frame as an RGB PNG. Errors: PNG encoding failed.
fn image_value(tag: &str, f: &Frame) -> Result<Value, StageError> {
    let mut png = vec![];
    crate::io::grid::encode_png(f, &mut png).map_err(|e| StageError::msg(format!("frame of step {}: PNG encoding failed: {e}", f.step)))?;
    Ok(Value {
        tag: tag.into(),
        metadata: None,
        value: Some(ValueKind::Image(Image { height: f.height as i32, width: f.width as i32, colorspace: 3, encoded_image_string: png })),
    })
}

// ---- TFRecord framing

/// The CRC mask of TFRecord files: `rotr(crc, 15) + 0xa282ead8` (wrapping).
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: u64 length (little-endian), masked CRC-32C of those 8 bytes, the data, masked
/// CRC-32C of the data.
fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The records of a TFRecord file's bytes, in order, up to the first torn or corrupt one (a
/// killed writer's last record), which ends the list.
pub fn read_records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = vec![];
    let mut at = 0usize;
    while bytes.len() - at >= 12 {
        let len_bytes = &bytes[at..at + 8];
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        if masked_crc(len_bytes) != crc {
            break;
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let Some(end) = usize::try_from(len).ok().and_then(|l| (at + 12).checked_add(l)).filter(|&e| e + 4 <= bytes.len()) else {
            break;
        };
        let data = &bytes[at + 12..end];
        let crc = u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes"));
        if masked_crc(data) != crc {
            break;
        }
        out.push(data);
        at = end + 4;
    }
    out
}

/// Seconds since the Unix epoch, now.
fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// An open event file, and the (tag, step) pairs the log already holds.
pub struct EventWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    written: HashSet<(String, i64)>,
}

/// A new event file's path in `dir`: `events.out.tfevents.pipe.<unix seconds>`, or one second
/// past the newest there when the clock says less (names sort by time: 10 digits).
fn new_file(dir: &Path) -> PathBuf {
    let newest = crate::core::ports::files_in(dir, EVENTS_PREFIX)
        .iter()
        .filter_map(|f| f.file_name()?.to_str()?.strip_prefix(EVENTS_PREFIX)?.parse::<u64>().ok())
        .max();
    let t = (now() as u64).max(newest.map_or(0, |n| n + 1));
    dir.join(format!("{EVENTS_PREFIX}{t:010}"))
}

impl EventWriter {
    /// A new event file in folder `dir`, starting with the file-version record; earlier event
    /// files of pipe's there are removed. Errors: the file cannot be created or written
    /// (naming it).
    pub fn create(dir: &Path) -> Result<Self, StageError> {
        let old = crate::core::ports::files_in(dir, EVENTS_PREFIX);
        let path = new_file(dir);
        let f = std::fs::File::create(&path).map_err(|e| StageError::io(&path, e))?;
        let mut w = EventWriter { path, file: std::io::BufWriter::new(f), written: HashSet::new() };
        w.append(&Event { wall_time: now(), step: 0, what: Some(What::FileVersion("brain.Event:2".into())) })?;
        remove(&old)?;
        Ok(w)
    }

    /// Continue the log in folder `dir` from generator step `start`: the records of its event
    /// files (oldest first) of steps ≤ `start`, less the pipeline text of step `start` (written
    /// again), go into a new file (written whole, then renamed into place), which replaces
    /// them and is opened to append. No readable record: a new log.
    /// Errors: the file cannot be written or opened, or an old one removed (naming it).
    pub fn resume(dir: &Path, start: u64) -> Result<Self, StageError> {
        let old = crate::core::ports::files_in(dir, EVENTS_PREFIX);
        let contents: Vec<Vec<u8>> = old.iter().filter_map(|f| std::fs::read(f).ok()).collect();
        let mut kept: Vec<&[u8]> = vec![];
        let mut written = HashSet::new();
        for rec in contents.iter().flat_map(|b| read_records(b)) {
            let Ok(ev) = <Event as prost::Message>::decode(rec) else { continue };
            match &ev.what {
                // One file-version record, at the start.
                Some(What::FileVersion(_)) if !kept.is_empty() => continue,
                _ if ev.step > start as i64 => continue,
                Some(What::Summary(s)) => {
                    if ev.step == start as i64 && s.value.iter().any(|v| v.tag == "pipeline") {
                        continue;
                    }
                    if s.value.iter().any(|v| written.contains(&(v.tag.clone(), ev.step))) {
                        continue;
                    }
                    written.extend(s.value.iter().map(|v| (v.tag.clone(), ev.step)));
                }
                _ => {}
            }
            kept.push(rec);
        }
        if kept.is_empty() {
            return Self::create(dir);
        }
        let path = new_file(dir);
        crate::io::atomic::write_atomic(&path, |w| {
            for rec in &kept {
                w.write_all(&frame_record(rec))?;
            }
            Ok(())
        })
        .map_err(|e| StageError::io(&path, e))?;
        remove(&old)?;
        let f = std::fs::OpenOptions::new().append(true).open(&path).map_err(|e| StageError::io(&path, e))?;
        Ok(EventWriter { path, file: std::io::BufWriter::new(f), written })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `values` at generator `step` as one event, leaving out the tags the file has at
    /// that step already, and flush. Errors: the file cannot be written (naming it).
    pub fn write(&mut self, step: u64, mut values: Vec<Value>) -> Result<(), StageError> {
        let step = step as i64;
        values.retain(|v| !self.written.contains(&(v.tag.clone(), step)));
        if values.is_empty() {
            return Ok(());
        }
        self.written.extend(values.iter().map(|v| (v.tag.clone(), step)));
        self.append(&Event { wall_time: now(), step, what: Some(What::Summary(Summary { value: values })) })
    }

    fn append(&mut self, ev: &Event) -> Result<(), StageError> {
        let rec = frame_record(&prost::Message::encode_to_vec(ev));
        self.file.write_all(&rec).and_then(|_| self.file.flush()).map_err(|e| StageError::io(&self.path, e))
    }
}

/// Remove the files `old` (earlier event files). Errors: one cannot be removed (naming it).
fn remove(old: &[PathBuf]) -> Result<(), StageError> {
    for f in old {
        std::fs::remove_file(f).map_err(|e| StageError::io(f, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::item::{Scores, StepReport};

    /// The (step, tags) of the events of the file at `path`, file-version record first.
    fn events(path: &Path) -> Vec<(i64, Vec<String>)> {
        let bytes = std::fs::read(path).unwrap();
        read_records(&bytes)
            .into_iter()
            .map(|r| {
                let ev = <Event as prost::Message>::decode(r).unwrap();
                let tags = match ev.what {
                    Some(What::Summary(s)) => s.value.into_iter().map(|v| v.tag).collect(),
                    Some(What::FileVersion(v)) => vec![v],
                    None => vec![],
                };
                (ev.step, tags)
            })
            .collect()
    }

    #[test]
    fn records_are_framed_with_masked_crc32c_and_torn_tails_dropped() {
        // CRC-32C's check value, and TFRecord's mask of it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
        let mut bytes = frame_record(b"first");
        bytes.extend(frame_record(b""));
        bytes.extend(frame_record(b"third record"));
        assert_eq!(bytes.len(), 16 * 3 + 5 + 12);
        assert_eq!(read_records(&bytes), [&b"first"[..], b"", b"third record"]);
        // A killed writer's half record, or a flipped bit, ends the list there.
        assert_eq!(read_records(&bytes[..bytes.len() - 3]), [&b"first"[..], b""]);
        let mut bad = bytes.clone();
        bad[16 + 5 + 16 + 2] ^= 1;
        assert_eq!(read_records(&bad), [&b"first"[..], b""]);
    }

    /// The one event file in `dir`.
    fn only_file(dir: &Path) -> PathBuf {
        let files = crate::core::ports::files_in(dir, EVENTS_PREFIX);
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 1, "nothing else (no temporary file)");
        files[0].clone()
    }

    #[test]
    fn a_resumed_log_keeps_the_steps_up_to_the_checkpoint_and_writes_none_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.write(0, vec![text_value("pipeline", "p")]).unwrap();
        for step in [10, 20, 30] {
            w.write(step, vec![scalar("loss/d_loss", 1.0), scalar("loss/g_loss", 2.0)]).unwrap();
        }
        // Written again at a step the file has: left out.
        w.write(20, vec![scalar("loss/d_loss", 5.0), scalar("eval/fid", 9.0)]).unwrap();
        let first = w.path().to_path_buf();
        drop(w);
        assert_eq!(only_file(dir.path()), first);
        assert!(first.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents.pipe."));
        let ev = events(&first);
        assert_eq!(ev.len(), 1 + 1 + 3 + 1);
        assert_eq!(ev[5], (20, vec!["eval/fid".to_string()]));
        // Resume from step 20 (the checkpoint's): step 30 goes, a torn tail does too, and the
        // log moves to a new file whose name sorts after the old one (which is gone).
        let mut bytes = std::fs::read(&first).unwrap();
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&first, bytes).unwrap();
        let mut w = EventWriter::resume(dir.path(), 20).unwrap();
        w.write(20, vec![scalar("loss/d_loss", 1.0), text_value("pipeline", "p2")]).unwrap();
        w.write(30, vec![scalar("loss/d_loss", 3.0)]).unwrap();
        let second = w.path().to_path_buf();
        drop(w);
        assert!(second > first, "{second:?} after {first:?}");
        assert_eq!(only_file(dir.path()), second);
        let ev = events(&second);
        let steps: Vec<i64> = ev.iter().map(|e| e.0).collect();
        assert_eq!(steps, [0, 0, 10, 20, 20, 20, 30]);
        assert_eq!(ev[6].1, ["loss/d_loss"]);
        // Resumed at step 20 again: step 30 goes, and so does the pipeline text of step 20
        // (the new run writes its own).
        let w = EventWriter::resume(dir.path(), 20).unwrap();
        drop(w);
        let steps: Vec<i64> = events(&only_file(dir.path())).iter().map(|e| e.0).collect();
        assert_eq!(steps, [0, 0, 10, 20, 20]);
        // A new log (a run started afresh) replaces the old one.
        drop(EventWriter::create(dir.path()).unwrap());
        assert_eq!(events(&only_file(dir.path())).len(), 1);
    }

    #[test]
    fn the_stage_logs_records_frames_and_the_pipeline_until_both_end() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pipeline.ron"), "Pipeline(name: \"t\")").unwrap();
        let run = crate::train::RunSettings::new(tch::Device::Cpu, Some(10), 5, 0);
        let mut cx = BuildContext::new("tb", dir.path(), &run);
        let stage = TensorBoardConfig::default().build(&mut cx).unwrap();
        let (in_tx, in_rx) = crossbeam_channel::bounded(4);
        let (rec_tx, rec_rx) = crossbeam_channel::unbounded();
        let (bus_tx, bus_rx) = crossbeam_channel::unbounded();
        let ctx = StageContext {
            name: "tb".into(),
            input: Some(in_rx),
            outputs: vec![],
            bus: crate::core::stage::Bus::new(bus_tx, "tb"),
            abort: Default::default(),
            drain: Default::default(),
            stats: Default::default(),
            panic_after: None,
            records: Some(rec_rx),
        };
        let report = |step| StepReport { step, d_loss: 0.5, g_loss: 1.5, penalty: 0.25, grad_norm: f64::NAN, images: step * 64 };
        in_tx.send(Item::Frame(Frame { step: 5, width: 3, height: 2, rgb: vec![200; 18] })).unwrap();
        drop(in_tx);
        let h = std::thread::spawn(move || stage.run(ctx));
        // Records still come after the input ended; the stage waits for them.
        std::thread::sleep(std::time::Duration::from_millis(200));
        rec_tx.send(Record::Step { report: report(5), elapsed_s: 1.0, img_per_s: 320.0 }).unwrap();
        let scores = Scores { fid: 12.5, kid_mean: 0.25, kid_std: 0.0, is_fake: None, is_real: None, kid_size: 1, kid_subsets: 1 };
        rec_tx.send(Record::Scores { step: 10, scores }).unwrap();
        drop(rec_tx);
        h.join().unwrap().unwrap();
        let path = only_file(&dir.path().join("tb"));
        let ev = events(&path);
        assert_eq!(ev[0], (0, vec!["brain.Event:2".to_string()]));
        assert_eq!(ev[1], (0, vec!["pipeline".to_string()]));
        assert_eq!(ev[2], (5, vec!["samples".to_string()]));
        // grad_norm is NaN (no penalty): left out.
        assert_eq!(ev[3].1, ["loss/d_loss", "loss/g_loss", "loss/penalty", "train/img_per_s"]);
        assert_eq!(ev[4], (10, vec!["eval/fid".to_string(), "eval/kid".to_string()]));
        // The image is a 3×2 PNG; the values are the records'.
        let bytes = std::fs::read(&path).unwrap();
        let recs = read_records(&bytes);
        let Some(What::Summary(s)) = <Event as prost::Message>::decode(recs[2]).unwrap().what else { panic!() };
        let Some(ValueKind::Image(im)) = &s.value[0].value else { panic!() };
        assert_eq!((im.width, im.height, im.colorspace), (3, 2, 3));
        let png = image::load_from_memory(&im.encoded_image_string).unwrap().to_rgb8();
        assert_eq!((png.width(), png.height(), png.get_pixel(1, 1).0), (3, 2, [200, 200, 200]));
        let Some(What::Summary(s)) = <Event as prost::Message>::decode(recs[3]).unwrap().what else { panic!() };
        let vals: Vec<Option<ValueKind>> = s.value.into_iter().map(|v| v.value).collect();
        assert_eq!(vals[1], Some(ValueKind::SimpleValue(1.5)));
        assert_eq!(vals[3], Some(ValueKind::SimpleValue(320.0)));
        assert!(bus_rx.try_iter().any(|m| matches!(m, crate::core::stage::BusMessage::Wrote { path: p, .. } if p == path)));
    }

    #[test]
    fn logdir_stays_inside_the_run_folder() {
        let cx = CheckContext { stage: "tb", log_every: 10, upstream_xhat: false, source: None };
        assert!(TensorBoardConfig::default().validate(&cx).is_empty());
        let p = TensorBoardConfig { logdir: "../tb".into() }.validate(&cx);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].field, "logdir");
        assert_eq!(TensorBoardConfig::default().outputs()[0].path(), Path::new("tb"));
    }
}
