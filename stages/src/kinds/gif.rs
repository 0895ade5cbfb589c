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

use crate::core::item::{Frame, Item};
use crate::core::ports::{ItemKind, Output, Ports};
use crate::core::problem::Problem;
use crate::kinds::{BuildContext, CheckContext};
use crate::core::stage::{Stage, StageContext, StageError};
use super::frames::{check_frame, partial_path, wrong_item};
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
        errs.extend(crate::core::stage::check_inside_run(&self.path, "path", true).err());
        if !self.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gif")) {
            errs.push(Problem::new(
                "path",
                format!("`path` is {:?}: the stage writes an animated GIF, so give it a .gif name", self.path.display().to_string()),
            ));
        }
        errs
    }

    /// [`Self::problems`] as one result: every message, one per line.
    pub fn validate(&self) -> Result<(), crate::core::problem::Problems> {
        crate::core::problem::to_result(self.problems())
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

/// Builds a `gif` stage writing `run_dir.join(&cfg.path)`, creating the folder of that file.
/// `expected_frames`: how many frames the stage will receive in all (the run's grids, and a
/// resumed run's prefix frames), for the frame-count cap; an estimate is fine (the cap holds
/// even when more arrive, and fewer only make the GIF shorter).
///
/// Errors: a setting out of range ([`StageError::Msg`], every problem, one per line); the folder
/// cannot be created ([`StageError::Io`] naming it).
pub fn build(cfg: &GifConfig, run_dir: &Path, expected_frames: u64) -> Result<Gif, StageError> {
    cfg.validate()?;
    let path = run_dir.join(&cfg.path);
    if path.file_name().is_none() {
        return Err(StageError::file(&path, "`path` must name a file"));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| StageError::io(dir, e))?;
    }
    Ok(Gif { cfg: cfg.clone(), path, expected_frames, prefix: vec![] })
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
        check_frame(&frame, None).map_err(|e| StageError::msg(format!("frame of step {}: {e}", frame.step)))?;
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
            let Some(item) = crate::kinds::video::next_frame(&mut prefix, &ctx, "GIF") else { break Ok(()) };
            let frame = match item {
                Item::Frame(f) => f,
                other => break Err(wrong_item("gif", other.kind())),
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

impl crate::kinds::Kind for GifConfig {
    const NAME: &'static str = "Gif";
    const PORTS: Ports = Ports::sink(ItemKind::Frame, "frame: RGB8 picture on cpu");

    fn validate(&self, _cx: &CheckContext<'_>) -> Vec<Problem> {
        self.problems()
    }

    fn outputs(&self) -> Vec<Output<'_>> {
        vec![Output::File { field: "path", path: self.path.as_path().into(), what: "GIF", example: "progress.gif" }]
    }

    /// A resumed run's GIF starts with the earlier grids; the frame-count cap's stride comes
    /// from [`BuildContext::expected_frames`].
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(build(self, cx.run_dir, cx.expected_frames)?.with_prefix(cx.prefix_frames.to_vec())))
    }
}

#[cfg(test)]
mod tests;
