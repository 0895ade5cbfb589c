//! The `gif` stage: writes the sample grids it receives as [`Item::Frame`]s into an animated
//! GIF (`progress.gif`) that loops forever, small enough to put in a README or a chat.
//!
//! Two caps keep the file small however long the run:
//!
//! - a frame-count cap, `max_frames`: the runner tells the stage how many grids it expects
//!   (`expected_frames`, resume prefix frames included); the stage keeps every `stride`-th
//!   frame in arrival order, `stride = ⌈(expected − 1) / (max_frames − 1)⌉` ([`stride`]), and
//!   always the very last frame it receives. The cap is hard: once `max_frames − 1` frames are
//!   written, only the last frame still is, so a run that sends more grids than expected still
//!   gives at most `max_frames` frames;
//! - a frame-size cap, `max_side`: a grid whose larger side exceeds it is downscaled (triangle
//!   filter) to that side, keeping its aspect ratio ([`scaled_size`]).
//!
//! Every frame lasts `1000 / fps` ms (GIF counts in 10 ms steps, so this is rounded down to
//! them); the last one stays `hold_last_ms` (at least as long as the others). Colours are
//! quantised to a 256-colour palette per frame (NeuQuant, as the `image` crate does).
//!
//! The stage holds the newest frame back until the next arrives (to know whether it is the
//! last). After every frame written, the file on disk is a complete GIF: the frame is followed
//! by the GIF trailer, which the next frame overwrites. The file is written as `<path>.partial`
//! until its first frame is complete, then renamed to `<path>` and appended to in place, so a
//! GIF already at `<path>` (a resumed run's earlier one) is only replaced by a valid new one.
//! The held frame is written however the stage ends: at the end of its input, on an immediate
//! stop (abort), on an error, and from a drop guard if the stage thread panics. A GIF on disk
//! is reported with `wrote` on the bus; if no frame ever arrives no file is written (and a
//! warning says so).

use crate::item::{Frame, Item};
use crate::problem::Problem;
use crate::stage::{Stage, StageContext, StageError};
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, RgbImage};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Largest accepted `fps` (frames of 20 ms; browsers slow shorter GIF frames down).
pub const MAX_FPS: u32 = 50;
/// Smallest accepted `max_frames` (the first kept frame and the last).
pub const MIN_FRAMES: u32 = 2;
/// Largest accepted `max_frames`.
pub const MAX_FRAMES: u32 = 1000;
/// Smallest accepted `max_side`, in pixels.
pub const MIN_SIDE: u32 = 16;
/// Largest accepted `max_side`, in pixels.
pub const MAX_SIDE: u32 = 4096;
/// Largest accepted `hold_last_ms`, in milliseconds.
pub const MAX_HOLD_LAST_MS: u32 = 60_000;

/// Speed of the colour quantiser (NeuQuant samples every `SPEED`-th pixel; 1 is the slowest
/// and best, 30 the fastest).
const SPEED: i32 = 10;
/// The byte that ends a GIF file.
const TRAILER: u8 = 0x3B;

/// Settings of the `gif` stage (the `gif: (...)` block of a pipeline file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GifConfig {
    /// Output file (an animated GIF, looping forever); a relative path is taken from the run
    /// folder, and must end in `.gif`. Its folder is created if missing. Default `progress.gif`.
    pub path: PathBuf,
    /// Frames per second: each frame lasts `1000 / fps` ms (rounded down to GIF's 10 ms
    /// steps), 1 to 50. Default 4.
    pub fps: u32,
    /// Most frames in the GIF, 2 to 1000: of more grids than that, evenly spaced ones are kept
    /// (every `⌈(expected − 1) / (max_frames − 1)⌉`-th), and always the last. Default 24
    /// (a GIF frame of 512×512 pixels takes about 90 kB for grids of finished-looking images
    /// and up to 270 kB for the noisy grids of early training).
    pub max_frames: u32,
    /// Largest side of a frame, in pixels, 16 to 4096: a larger grid is downscaled to it,
    /// keeping its aspect ratio. Default 512.
    pub max_side: u32,
    /// How long the last frame stays before the GIF loops, in milliseconds, 0 to 60000 (at
    /// least one frame's time, `1000 / fps` ms). Default 2000.
    pub hold_last_ms: u32,
}

impl Default for GifConfig {
    fn default() -> Self {
        GifConfig { path: PathBuf::from("progress.gif"), fps: 4, max_frames: 24, max_side: 512, hold_last_ms: 2000 }
    }
}

impl GifConfig {
    /// Check the values without touching the disk: fps 1 to 50, max_frames 2 to 1000,
    /// max_side 16 to 4096 pixels, hold_last_ms at most 60000, and `path` a relative `.gif`
    /// file path inside the run folder (no `..`). Every problem is reported, one per line,
    /// naming its field and the expected range.
    pub fn problems(&self) -> Vec<Problem> {
        let mut errs = vec![];
        if self.fps == 0 || self.fps > MAX_FPS {
            errs.push(Problem::new("fps", format!("`fps` is {}, expected 1 to {MAX_FPS}", self.fps)));
        }
        if !(MIN_FRAMES..=MAX_FRAMES).contains(&self.max_frames) {
            errs.push(Problem::new("max_frames", format!("`max_frames` is {}, expected {MIN_FRAMES} to {MAX_FRAMES}", self.max_frames)));
        }
        if !(MIN_SIDE..=MAX_SIDE).contains(&self.max_side) {
            errs.push(Problem::new("max_side", format!("`max_side` is {}, expected {MIN_SIDE} to {MAX_SIDE} pixels", self.max_side)));
        }
        if self.hold_last_ms > MAX_HOLD_LAST_MS {
            errs.push(Problem::new(
                "hold_last_ms",
                format!("`hold_last_ms` is {}, expected 0 to {MAX_HOLD_LAST_MS} ms", self.hold_last_ms),
            ));
        }
        errs.extend(crate::stage::check_inside_run(&self.path, "path", true).err());
        if !self.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gif")) {
            errs.push(Problem::new(
                "path",
                format!("`path` is {:?}: the stage writes an animated GIF, so give it a .gif name", self.path.display().to_string()),
            ));
        }
        errs
    }

    /// [`Self::problems`] as one result: every message, one per line.
    pub fn validate(&self) -> Result<(), String> {
        crate::problem::to_result(self.problems())
    }

    /// How long each frame but the last is shown, in milliseconds: `1000 / fps`.
    pub fn frame_delay_ms(&self) -> u32 {
        1000 / self.fps.max(1)
    }

    /// How long the last frame is shown, in milliseconds: `hold_last_ms`, at least
    /// [`GifConfig::frame_delay_ms`].
    pub fn last_delay_ms(&self) -> u32 {
        self.hold_last_ms.max(self.frame_delay_ms())
    }
}

/// Which received frames are kept: every `stride`-th (counting from the first, 0-based), with
/// `stride = ⌈(expected − 1) / (max_frames − 1)⌉`, at least 1: of the `expected − 1` frames
/// before the last, at most `max_frames − 1` are kept, and with the last that makes at most
/// `max_frames` (all of them when `expected ≤ max_frames`).
pub fn stride(expected: u64, max_frames: u32) -> u64 {
    expected.saturating_sub(1).div_ceil(u64::from(max_frames.saturating_sub(1).max(1))).max(1)
}

/// Size of a `width`×`height` frame in the GIF, in pixels: unchanged when both sides are at
/// most `max_side`, else scaled so that the larger side is `max_side`, keeping the aspect ratio
/// (the other side rounded, at least 1).
pub fn scaled_size(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let big = width.max(height);
    if big <= max_side || big == 0 {
        return (width, height);
    }
    let scale = |v: u32| ((u64::from(v) * u64::from(max_side) + u64::from(big) / 2) / u64::from(big)).max(1) as u32;
    (scale(width), scale(height))
}

/// A built `gif` stage.
#[derive(Debug)]
pub struct Gif {
    cfg: GifConfig,
    path: PathBuf,
    expected_frames: u64,
    /// Grid PNGs encoded before the frames received (a resumed run's earlier grids).
    prefix: Vec<PathBuf>,
}

impl Gif {
    /// Final path of the GIF (`cfg.path` resolved against the run folder).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path the GIF is written to until its first frame is complete: `<path>.partial`.
    pub fn partial_path(&self) -> PathBuf {
        partial_path(&self.path)
    }

    /// The settings this stage was built with.
    pub fn config(&self) -> &GifConfig {
        &self.cfg
    }

    /// Frames the stage expects to receive in all (prefix frames included), which sets the
    /// stride of the frame-count cap.
    pub fn expected_frames(&self) -> u64 {
        self.expected_frames
    }

    /// Start the GIF with these pictures (PNG files, in order) before the frames the stage
    /// receives: a resumed run passes its earlier sample grids, so the GIF covers the whole run.
    /// They count as received frames for the frame-count cap. A file that cannot be read is
    /// skipped with a warning.
    pub fn with_prefix(mut self, pngs: Vec<PathBuf>) -> Self {
        self.prefix = pngs;
        self
    }
}

fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Builds a `gif` stage writing `run_dir.join(&cfg.path)`, creating the folder of that file.
/// `expected_frames`: how many frames the stage will receive in all (the run's grids, and a
/// resumed run's prefix frames), for the frame-count cap; an estimate is fine (the cap holds
/// even when more arrive, and fewer only make the GIF shorter).
///
/// Errors: a setting out of range ([`StageError::Msg`], every problem, one per line); the folder
/// cannot be created ([`StageError::Io`] naming it).
pub fn build(cfg: &GifConfig, run_dir: &Path, expected_frames: u64) -> Result<Gif, StageError> {
    cfg.validate().map_err(StageError::Msg)?;
    let path = run_dir.join(&cfg.path);
    if path.file_name().is_none() {
        return Err(StageError::file(&path, "`path` must name a file"));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| StageError::io(dir, e))?;
    }
    Ok(Gif { cfg: cfg.clone(), path, expected_frames, prefix: vec![] })
}

fn wrong_item(kind: &str) -> StageError {
    StageError::msg(format!("the gif stage takes `frame` items (sample grids from a sampler), got a `{kind}` item"))
}

/// Checks that a frame holds `width·height·3` bytes and is not empty.
fn check_frame(f: &Frame) -> Result<(), String> {
    if f.width == 0 || f.height == 0 {
        return Err(format!("empty frame ({}×{})", f.width, f.height));
    }
    let need = (f.width as usize).checked_mul(f.height as usize).and_then(|v| v.checked_mul(3));
    if need != Some(f.rgb.len()) {
        return Err(format!("frame of {}×{} has {} bytes of RGB, expected {}", f.width, f.height, f.rgb.len(), need.unwrap_or(0)));
    }
    Ok(())
}

/// The open GIF file, shared between the encoder (through [`SharedFile`]) and the writer,
/// which adds the trailer after each frame. The stage runs on one thread.
type Handle = Rc<RefCell<BufWriter<File>>>;

/// The encoder's view of the shared file.
struct SharedFile(Handle);

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

/// An open GIF with at least its header written.
struct Out {
    file: Handle,
    enc: GifEncoder<SharedFile>,
    /// Size of every frame, in pixels (the first frame's, capped by `max_side`).
    size: (u32, u32),
    /// Frames complete on disk.
    frames: u32,
    /// The file has been renamed from `<path>.partial` to `<path>`.
    renamed: bool,
}

/// The frame-count cap and the file, without the stage around them: frames go in one at a
/// time ([`GifWriter::push`]) and the GIF on disk is complete after each one written.
pub(crate) struct GifWriter {
    cfg: GifConfig,
    path: PathBuf,
    partial: PathBuf,
    stride: u64,
    /// Frames received so far.
    received: u64,
    /// The newest frame, not written yet, and whether it is a kept one.
    held: Option<(Frame, bool)>,
    out: Option<Out>,
    /// Warnings for the bus, taken by [`GifWriter::take_warnings`].
    warnings: Vec<String>,
    warned_resized: bool,
    /// A GIF of this writer's is at the final path.
    on_disk: bool,
}

impl GifWriter {
    pub(crate) fn new(cfg: &GifConfig, path: &Path, expected_frames: u64) -> Self {
        GifWriter {
            cfg: cfg.clone(),
            path: path.to_path_buf(),
            partial: partial_path(path),
            stride: stride(expected_frames, cfg.max_frames),
            received: 0,
            held: None,
            out: None,
            warnings: vec![],
            warned_resized: false,
            on_disk: false,
        }
    }

    /// Take the next frame. The frame held before it is written if it is a kept one (every
    /// `stride`-th received) and fewer than `max_frames − 1` frames are written.
    ///
    /// Errors: a malformed frame (the frame is dropped), a file that cannot be written (naming
    /// it; the GIF on disk keeps the frames written before).
    pub(crate) fn push(&mut self, frame: Frame) -> Result<(), StageError> {
        check_frame(&frame).map_err(|e| StageError::msg(format!("frame of step {}: {e}", frame.step)))?;
        let keep = self.received % self.stride == 0;
        self.received += 1;
        if let Some((prev, kept)) = self.held.replace((frame, keep)) {
            if kept && self.written() + 1 < self.cfg.max_frames {
                self.write(&prev, self.cfg.frame_delay_ms())?;
            }
        }
        Ok(())
    }

    /// Write the held frame (the last received) with the `hold_last_ms` delay and close the
    /// file. Safe to call again (then it does nothing).
    ///
    /// Errors: the file cannot be written (naming it).
    pub(crate) fn finish(&mut self) -> Result<(), StageError> {
        let r = match self.held.take() {
            Some((last, _)) => self.write(&last, self.cfg.last_delay_ms()),
            None => Ok(()),
        };
        if let Some(out) = self.out.take() {
            // The encoder's own trailer (on drop) lands on the one already there.
            drop(out.enc);
            let flushed = out.file.borrow_mut().flush();
            if let (Err(e), Ok(())) = (flushed, &r) {
                return Err(StageError::io(self.current_path(out.renamed), e));
            }
        }
        r
    }

    /// Frames complete in the GIF on disk.
    pub(crate) fn written(&self) -> u32 {
        self.out.as_ref().map_or(0, |o| o.frames)
    }

    /// A GIF is at the final path (its first frame was complete and renamed there).
    pub(crate) fn on_disk(&self) -> bool {
        self.on_disk
    }

    /// Warnings gathered since the last call.
    pub(crate) fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    fn current_path(&self, renamed: bool) -> &Path {
        if renamed {
            &self.path
        } else {
            &self.partial
        }
    }

    /// Open `<path>.partial` and start a GIF of the size that `first` gets.
    fn open(&self, first: &Frame) -> Result<Out, StageError> {
        let file =
            File::options().write(true).create(true).truncate(true).open(&self.partial).map_err(|e| StageError::io(&self.partial, e))?;
        // A buffer larger than an encoded frame (at most ~1 MB at max_side 1024), so that a
        // frame reaches the file in one write at the flush after it, over the old trailer and
        // with its own: a kill in between leaves the GIF as it was, not a frame cut short.
        let file = Rc::new(RefCell::new(BufWriter::with_capacity(4 << 20, file)));
        let mut enc = GifEncoder::new_with_speed(SharedFile(file.clone()), SPEED);
        enc.set_repeat(Repeat::Infinite).map_err(|e| StageError::file(&self.partial, e.to_string()))?;
        Ok(Out { file, enc, size: scaled_size(first.width, first.height, self.cfg.max_side), frames: 0, renamed: false })
    }

    /// Append one frame shown for `delay_ms`, then the trailer, so the file is a complete GIF.
    /// On an error the file is put back as it was (the frames before, and the trailer).
    fn write(&mut self, f: &Frame, delay_ms: u32) -> Result<(), StageError> {
        if self.out.is_none() {
            self.out = Some(self.open(f)?);
        }
        let out = self.out.as_mut().expect("opened above");
        let (w, h) = out.size;
        let mut img = RgbImage::from_raw(f.width, f.height, f.rgb.clone()).expect("checked by check_frame");
        if (f.width, f.height) != (w, h) {
            if scaled_size(f.width, f.height, self.cfg.max_side) != (w, h) && !self.warned_resized {
                self.warned_resized = true;
                self.warnings.push(format!("frame of step {} is {}×{} but the GIF is {w}×{h}: scaled to fit", f.step, f.width, f.height));
            }
            img = image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle);
        }
        let rgba = image::DynamicImage::ImageRgb8(img).into_rgba8();
        let frame = image::Frame::from_parts(rgba, 0, 0, Delay::from_numer_denom_ms(delay_ms, 1));
        let path = if out.renamed { &self.path } else { &self.partial };
        // Where this frame starts: on the trailer of the frames before (0 for the first).
        let start =
            if out.frames == 0 { None } else { Some(out.file.borrow_mut().stream_position().map_err(|e| StageError::io(path, e))?) };
        let encoded = out.enc.encode_frame(frame).map_err(|e| e.to_string()).and_then(|()| {
            let mut fh = out.file.borrow_mut();
            fh.write_all(&[TRAILER])
                .and_then(|()| fh.flush())
                .and_then(|()| fh.seek(SeekFrom::Current(-1)))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        if let Err(e) = encoded {
            match start {
                Some(at) => {
                    // Back to the frames before: cut the partial frame off, restore the trailer.
                    let mut fh = out.file.borrow_mut();
                    let _ = fh.seek(SeekFrom::Start(at));
                    let _ = fh.get_ref().set_len(at + 1);
                    let _ = fh.write_all(&[TRAILER]).and_then(|()| fh.flush());
                    let _ = fh.seek(SeekFrom::Start(at));
                }
                None => {
                    // Not even one frame: no GIF (an older one at the final path stays).
                    self.out = None;
                    let _ = std::fs::remove_file(&self.partial);
                }
            }
            return Err(StageError::file(path, e));
        }
        out.frames += 1;
        if !out.renamed {
            std::fs::rename(&self.partial, &self.path)
                .map_err(|e| StageError::file(&self.partial, format!("cannot rename to {}: {e}", self.path.display())))?;
            out.renamed = true;
            self.on_disk = true;
        }
        Ok(())
    }
}

impl Drop for GifWriter {
    /// The drop guard: a stage thread that panics still gets its held frame written.
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl Stage for Gif {
    /// Writes the kept [`Item::Frame`]s (the prefix PNGs first), then the last one with the
    /// `hold_last_ms` delay when the input ends, on abort and on error; posts `wrote` with the
    /// final path when a GIF is there.
    ///
    /// Errors: an item other than a frame, a malformed frame, a file that cannot be written
    /// (naming it). The GIF on disk stays complete; the first error wins.
    fn run(self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        let mut writer = GifWriter::new(&self.cfg, &self.path, self.expected_frames);
        let mut prefix = self.prefix.iter();
        let result: Result<(), StageError> = loop {
            let Some(item) = crate::video::next_frame(&mut prefix, &ctx, "GIF") else { break Ok(()) };
            let frame = match item {
                Item::Frame(f) => f,
                other => break Err(wrong_item(other.kind())),
            };
            let pushed = writer.push(frame);
            for w in writer.take_warnings() {
                ctx.bus.warn(w);
            }
            if let Err(e) = pushed {
                break Err(e);
            }
        };
        let finished = writer.finish();
        for w in writer.take_warnings() {
            ctx.bus.warn(w);
        }
        if writer.on_disk() {
            ctx.bus.wrote(&self.path);
        } else if result.is_ok() && finished.is_ok() {
            ctx.bus.warn(format!("no frames arrived: {} was not written", self.path.display()));
        }
        result.and(finished)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::HostBatch;
    use crate::stage::{Bus, BusMessage};
    use crossbeam_channel::{bounded, unbounded};
    use image::AnimationDecoder;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// A frame in one solid colour that depends on `k`.
    fn solid(step: u64, w: u32, h: u32, k: u32) -> Frame {
        Frame { step, width: w, height: h, rgb: colour(k).repeat((w * h) as usize) }
    }

    fn colour(k: u32) -> [u8; 3] {
        [(k * 37 % 256) as u8, (255 - k * 11 % 256) as u8, (k * 101 % 256) as u8]
    }

    /// The frames of a GIF file: (RGBA picture, delay in ms).
    fn decode(path: &Path) -> Vec<(image::RgbaImage, u32)> {
        let f = std::io::BufReader::new(File::open(path).unwrap());
        let d = image::codecs::gif::GifDecoder::new(f).unwrap();
        d.into_frames()
            .collect_frames()
            .unwrap()
            .into_iter()
            .map(|fr| {
                let (n, dd) = fr.delay().numer_denom_ms();
                (fr.into_buffer(), n / dd)
            })
            .collect()
    }

    fn close(a: &[u8], b: &[u8], tol: i32) -> bool {
        a.iter().zip(b).all(|(&x, &y)| (i32::from(x) - i32::from(y)).abs() <= tol)
    }

    fn run_stage(gif: Gif, items: Vec<Item>) -> (Result<(), StageError>, Vec<BusMessage>) {
        let (tx, rx) = bounded(2);
        let (btx, brx) = unbounded();
        let ctx = StageContext {
            name: "gif".into(),
            input: Some(rx),
            outputs: vec![],
            bus: Bus::new(btx, "gif"),
            abort: Arc::new(AtomicBool::new(false)),
            drain: Arc::new(AtomicBool::new(false)),
            stats: Default::default(),
            panic_after: None,
        };
        let handle = std::thread::spawn(move || Box::new(gif).run(ctx));
        for it in items {
            if tx.send(it).is_err() {
                break;
            }
        }
        drop(tx);
        let r = handle.join().unwrap();
        (r, brx.try_iter().collect())
    }

    #[test]
    fn config_defaults_and_validation_name_every_field() {
        let d = GifConfig::default();
        assert_eq!((d.path.as_path(), d.fps, d.max_frames, d.max_side, d.hold_last_ms), (Path::new("progress.gif"), 4, 24, 512, 2000));
        let j: GifConfig = serde_json::from_str(r#"{"max_frames": 10}"#).unwrap();
        assert_eq!(j, GifConfig { max_frames: 10, ..Default::default() });
        assert!(serde_json::from_str::<GifConfig>(r#"{"frames": 10}"#).is_err());
        assert!(d.validate().is_ok());
        let bad = GifConfig { path: "x.mp4".into(), fps: 0, max_frames: 1, max_side: 8, hold_last_ms: 60_001 };
        let e = bad.validate().unwrap_err();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 5, "{e}");
        for want in [
            "`fps` is 0, expected 1 to 50",
            "`max_frames` is 1, expected 2 to 1000",
            "`max_side` is 8, expected 16 to 4096 pixels",
            "`hold_last_ms` is 60001, expected 0 to 60000 ms",
            "`path` is \"x.mp4\"",
        ] {
            assert!(lines.iter().any(|l| l.contains(want)), "{want}: {e}");
        }
        let e = GifConfig { fps: 51, max_frames: 1001, max_side: 4097, ..Default::default() }.validate().unwrap_err();
        assert!(e.contains("`fps` is 51") && e.contains("`max_frames` is 1001") && e.contains("`max_side` is 4097"), "{e}");
        assert!(GifConfig { path: "../a.gif".into(), ..Default::default() }.validate().unwrap_err().contains("without `..`"));
        assert!(GifConfig { path: "".into(), ..Default::default() }.validate().unwrap_err().contains("`path` is empty"));
        let run = tempfile::tempdir().unwrap();
        assert!(build(&GifConfig { fps: 0, ..Default::default() }, run.path(), 10).is_err());
        let g = build(&GifConfig { path: "out/g.GIF".into(), ..Default::default() }, run.path(), 10).unwrap();
        assert!(run.path().join("out").is_dir());
        assert_eq!(g.path(), run.path().join("out/g.GIF"));
        assert_eq!(g.partial_path(), run.path().join("out/g.GIF.partial"));
        assert_eq!(g.expected_frames(), 10);
    }

    #[test]
    fn stride_and_sizes() {
        assert_eq!(stride(100, 10), 11);
        assert_eq!(stride(10, 10), 1);
        assert_eq!(stride(11, 10), 2);
        assert_eq!(stride(40, 40), 1);
        assert_eq!(stride(79, 40), 2);
        assert_eq!(stride(0, 40), 1);
        assert_eq!(stride(1, 40), 1);
        assert_eq!(stride(1000, 2), 999);
        // However many are expected, the kept ones before the last and the last fit the cap.
        for m in [2u32, 3, 5, 10, 40] {
            for e in 1..500u64 {
                let kept = (e - 1).div_ceil(stride(e, m)) + 1;
                assert!(kept <= u64::from(m), "expected {e}, max_frames {m}: {kept}");
                if e <= u64::from(m) {
                    assert_eq!(kept, e);
                }
            }
        }
        assert_eq!(scaled_size(1000, 500, 512), (512, 256));
        assert_eq!(scaled_size(500, 1000, 512), (256, 512));
        assert_eq!(scaled_size(242, 242, 512), (242, 242));
        assert_eq!(scaled_size(1090, 1090, 512), (512, 512));
        assert_eq!(scaled_size(4000, 3, 16), (16, 1));
        let c = GifConfig { fps: 3, hold_last_ms: 0, ..Default::default() };
        assert_eq!((c.frame_delay_ms(), c.last_delay_ms()), (333, 333));
    }

    #[test]
    fn a_hundred_frames_make_at_most_max_frames_ending_with_the_last() {
        let run = tempfile::tempdir().unwrap();
        let cfg = GifConfig { max_frames: 10, ..Default::default() };
        let gif = build(&cfg, run.path(), 100).unwrap();
        let path = gif.path().to_path_buf();
        let items = (0..100).map(|k| Item::Frame(solid(k as u64 + 1, 40, 30, k))).collect();
        let (r, bus) = run_stage(gif, items);
        r.unwrap();
        assert!(bus.iter().any(|m| matches!(m, BusMessage::Wrote { path: p, .. } if *p == path)), "{bus:?}");
        assert!(!run.path().join("progress.gif.partial").exists());
        let frames = decode(&path);
        // Stride ⌈99 / 9⌉ = 11: frames 0, 11, …, 88, and the last (99).
        let want: Vec<u32> = (0..100).step_by(11).collect();
        assert_eq!(want.last(), Some(&99));
        assert_eq!(frames.len(), want.len());
        assert_eq!(frames.len(), 10);
        for ((img, delay), (i, &k)) in frames.iter().zip(want.iter().enumerate()) {
            assert_eq!(img.dimensions(), (40, 30));
            assert!(
                close(&img.get_pixel(5, 5).0[..3], &colour(k), 8),
                "frame {i} (input {k}): {:?} vs {:?}",
                img.get_pixel(5, 5),
                colour(k)
            );
            assert_eq!(*delay, if i == 9 { 2000 } else { 250 }, "frame {i}");
        }
    }

    #[test]
    fn the_cap_holds_when_more_frames_arrive_than_expected() {
        let run = tempfile::tempdir().unwrap();
        let cfg = GifConfig { max_frames: 5, hold_last_ms: 0, fps: 10, ..Default::default() };
        // Expected 10 (stride ⌈9 / 4⌉ = 3), but 30 arrive: frames 0, 3, 6, 9 and then only the last.
        let gif = build(&cfg, run.path(), 10).unwrap();
        let path = gif.path().to_path_buf();
        let (r, _) = run_stage(gif, (0..30).map(|k| Item::Frame(solid(k as u64, 20, 20, k))).collect());
        r.unwrap();
        let frames = decode(&path);
        assert_eq!(frames.len(), 5);
        for (img, k) in frames.iter().zip([0, 3, 6, 9, 29]) {
            assert!(close(&img.0.get_pixel(3, 3).0[..3], &colour(k), 8), "input {k}");
        }
        // hold_last_ms 0: the last frame lasts as long as the others.
        assert!(frames.iter().all(|f| f.1 == 100), "{:?}", frames.iter().map(|f| f.1).collect::<Vec<_>>());
        // Fewer than expected: every kept one and the last.
        let run = tempfile::tempdir().unwrap();
        let gif = build(&cfg, run.path(), 10).unwrap();
        let path = gif.path().to_path_buf();
        let (r, _) = run_stage(gif, (0..5).map(|k| Item::Frame(solid(k as u64, 20, 20, k))).collect());
        r.unwrap();
        assert_eq!(decode(&path).len(), 3, "frames 0, 3 and 4");
        // A single frame.
        let run = tempfile::tempdir().unwrap();
        let gif = build(&GifConfig::default(), run.path(), 10).unwrap();
        let path = gif.path().to_path_buf();
        run_stage(gif, vec![Item::Frame(solid(1, 20, 20, 1))]).0.unwrap();
        assert_eq!(decode(&path).iter().map(|f| f.1).collect::<Vec<_>>(), vec![2000]);
    }

    #[test]
    fn large_frames_are_downscaled_keeping_the_aspect_ratio() {
        let run = tempfile::tempdir().unwrap();
        let gif = build(&GifConfig::default(), run.path(), 2).unwrap();
        let path = gif.path().to_path_buf();
        // Left half one colour, right half another.
        let half = |k: u32| {
            let mut f = solid(k as u64, 1000, 500, k);
            for y in 0..500usize {
                for x in 500..1000usize {
                    f.rgb[(y * 1000 + x) * 3..][..3].copy_from_slice(&colour(k + 50));
                }
            }
            f
        };
        let (r, bus) = run_stage(gif, vec![Item::Frame(half(1)), Item::Frame(half(2))]);
        r.unwrap();
        assert!(!bus.iter().any(|m| matches!(m, BusMessage::Warning { .. })), "same-size frames need no warning: {bus:?}");
        let frames = decode(&path);
        assert_eq!(frames.len(), 2);
        for (i, (img, _)) in frames.iter().enumerate() {
            let k = i as u32 + 1;
            assert_eq!(img.dimensions(), (512, 256));
            assert!(close(&img.get_pixel(100, 128).0[..3], &colour(k), 8), "{:?}", img.get_pixel(100, 128));
            assert!(close(&img.get_pixel(400, 128).0[..3], &colour(k + 50), 8), "{:?}", img.get_pixel(400, 128));
        }
    }

    #[test]
    fn a_frame_of_another_size_is_scaled_to_the_gif_with_a_warning() {
        let run = tempfile::tempdir().unwrap();
        let gif = build(&GifConfig::default(), run.path(), 3).unwrap();
        let path = gif.path().to_path_buf();
        let items = vec![Item::Frame(solid(1, 64, 48, 1)), Item::Frame(solid(2, 100, 30, 2)), Item::Frame(solid(3, 64, 48, 3))];
        let (r, bus) = run_stage(gif, items);
        r.unwrap();
        let warnings: Vec<&String> =
            bus.iter().filter_map(|m| if let BusMessage::Warning { msg, .. } = m { Some(msg) } else { None }).collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("100×30") && warnings[0].contains("64×48"), "{warnings:?}");
        let frames = decode(&path);
        assert_eq!(frames.len(), 3);
        assert!(frames.iter().all(|f| f.0.dimensions() == (64, 48)));
        assert!(close(&frames[1].0.get_pixel(30, 20).0[..3], &colour(2), 8));
    }

    #[test]
    fn the_file_is_a_complete_gif_after_every_frame() {
        let run = tempfile::tempdir().unwrap();
        let path = run.path().join("progress.gif");
        let partial = partial_path(&path);
        // An older GIF at the final path stays until the new one has a frame.
        std::fs::write(&path, b"old").unwrap();
        let cfg = GifConfig { hold_last_ms: 1000, ..Default::default() };
        let mut w = GifWriter::new(&cfg, &path, 6);
        w.push(solid(1, 32, 24, 1)).unwrap();
        // The first frame is held until the next one arrives.
        assert_eq!(w.written(), 0);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(!partial.exists());
        for k in 2..=6u32 {
            w.push(solid(k as u64, 32, 24, k)).unwrap();
            assert_eq!(w.written(), k - 1);
            assert!(!partial.exists());
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes.last(), Some(&TRAILER));
            let frames = decode(&path);
            assert_eq!(frames.len(), k as usize - 1, "after frame {k}");
            let (img, delay) = frames.last().unwrap();
            assert!(close(&img.get_pixel(1, 1).0[..3], &colour(k - 1), 8));
            assert_eq!(*delay, 250);
        }
        // A malformed frame is refused; the GIF on disk is untouched.
        let before = std::fs::read(&path).unwrap();
        let e = w.push(Frame { step: 9, width: 4, height: 4, rgb: vec![0; 3] }).unwrap_err().to_string();
        assert!(e.contains("step 9"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        w.finish().unwrap();
        let frames = decode(&path);
        assert_eq!(frames.len(), 6);
        assert_eq!(frames.last().unwrap().1, 1000);
        assert!(close(&frames[5].0.get_pixel(1, 1).0[..3], &colour(6), 8));
        // Finishing again (the drop guard) changes nothing.
        let bytes = std::fs::read(&path).unwrap();
        w.finish().unwrap();
        drop(w);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn dropping_a_writer_writes_the_held_frame() {
        // What runs when the stage thread panics.
        let run = tempfile::tempdir().unwrap();
        let path = run.path().join("p.gif");
        let mut w = GifWriter::new(&GifConfig::default(), &path, 3);
        w.push(solid(1, 16, 16, 1)).unwrap();
        w.push(solid(2, 16, 16, 2)).unwrap();
        drop(w);
        let frames = decode(&path);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].1, 2000);
    }

    #[test]
    fn prefix_frames_start_the_gif_and_count_for_the_cap() {
        let run = tempfile::tempdir().unwrap();
        let samples = run.path().join("samples");
        std::fs::create_dir_all(&samples).unwrap();
        let mut pngs = vec![];
        for k in 1..=4u32 {
            let f = solid(k as u64 * 10, 24, 24, k);
            let p = samples.join(format!("step_{:08}.png", k * 10));
            RgbImage::from_raw(24, 24, f.rgb).unwrap().save(&p).unwrap();
            pngs.push(p);
        }
        // A missing one is skipped with a warning.
        pngs.insert(2, samples.join("step_00000025.png"));
        // An older GIF is replaced.
        std::fs::write(run.path().join("progress.gif"), b"old").unwrap();
        let cfg = GifConfig { max_frames: 4, ..Default::default() };
        // 4 prefix + 2 new = 6 expected: stride ⌈5 / 3⌉ = 2 → frames 0, 2, 4 and the last (5).
        let gif = build(&cfg, run.path(), 6).unwrap().with_prefix(pngs);
        let path = gif.path().to_path_buf();
        let (r, bus) = run_stage(gif, vec![Item::Frame(solid(50, 24, 24, 5)), Item::Frame(solid(60, 24, 24, 6))]);
        r.unwrap();
        assert!(bus
            .iter()
            .any(|m| matches!(m, BusMessage::Warning { msg, .. } if msg.contains("step_00000025.png") && msg.contains("GIF"))));
        let frames = decode(&path);
        assert_eq!(frames.len(), 4);
        for (img, k) in frames.iter().zip([1, 3, 5, 6]) {
            assert!(close(&img.0.get_pixel(2, 2).0[..3], &colour(k), 8), "input {k}");
        }
    }

    #[test]
    fn wrong_items_and_no_frames() {
        let run = tempfile::tempdir().unwrap();
        let gif = build(&GifConfig::default(), run.path(), 3).unwrap();
        let path = gif.path().to_path_buf();
        let batch = HostBatch { index: 0, epoch: 0, next_pos: 1, shape: [1, 1, 1, 1], x: vec![0.0], x_hat: None };
        let (r, bus) = run_stage(gif, vec![Item::Frame(solid(1, 16, 16, 1)), Item::Batch(batch)]);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("gif") && e.contains("`frame`") && e.contains("`batch`"), "{e}");
        // The frame before the error is in the GIF.
        assert_eq!(decode(&path).len(), 1);
        assert!(bus.iter().any(|m| matches!(m, BusMessage::Wrote { .. })));

        let run = tempfile::tempdir().unwrap();
        let gif = build(&GifConfig::default(), run.path(), 3).unwrap();
        let (r, bus) = run_stage(gif, vec![]);
        r.unwrap();
        assert!(!run.path().join("progress.gif").exists());
        assert!(bus.iter().any(|m| matches!(m, BusMessage::Warning { msg, .. } if msg.contains("no frames"))));
        assert!(!bus.iter().any(|m| matches!(m, BusMessage::Wrote { .. })));
    }

    #[test]
    fn a_full_disk_leaves_no_broken_gif() {
        // Writing to /dev/full fails with ENOSPC, as a full disk does.
        if !Path::new("/dev/full").exists() {
            return;
        }
        let run = tempfile::tempdir().unwrap();
        let path = run.path().join("progress.gif");
        std::os::unix::fs::symlink("/dev/full", partial_path(&path)).unwrap();
        let mut w = GifWriter::new(&GifConfig::default(), &path, 3);
        w.push(solid(1, 16, 16, 1)).unwrap();
        let e = w.push(solid(2, 16, 16, 2)).unwrap_err().to_string();
        assert!(e.contains("progress.gif.partial") && e.contains("No space left"), "{e}");
        assert!(!path.exists());
        assert!(!w.on_disk());
    }
}
