//! The `video` stage: encodes the sample grids it receives as [`Item::Frame`]s into an H.264
//! MP4 (`progress.mp4`), one frame per grid.
//!
//! With the `video` feature (the default) frames are encoded with FFmpeg's libx264 through
//! `ffmpeg-next`: yuv420p (converted from RGB by FFmpeg's software scaler, BT.601 limited
//! range, tagged as such), constant quality `crf`, `fps` frames per second (pts = frame
//! number, time base 1/fps), MP4 with `+faststart`. The video size is the first frame's size
//! rounded up to even numbers (H.264 4:2:0 needs even sides); a frame of odd size is padded by
//! repeating its last column / row (for sample grids that is the padding colour). A later
//! frame whose size rounds to a different size is scaled to the video size (with a warning
//! on the bus).
//!
//! The file is written as `<path>.partial` and renamed to `<path>` once finalised (encoder
//! flushed, trailer written). Finalising happens however the stage ends: at the end of its
//! input (EOS), on an immediate stop (abort), on an error (a wrong item, say), and even if the
//! stage thread panics (from a drop guard), so `progress.mp4`, when it exists, always plays.
//! A finalised video is reported with `wrote` on the bus. If no frame ever arrives no file is
//! written (and a warning says so).
//!
//! Without the `video` feature the stage still exists: it warns once that this build has no
//! video encoder and drains its input; [`probe`] and [`decode_frame`] return errors.

use crate::core::item::{Frame, Item};
use crate::core::ports::{ItemKind, Output, Ports};
use crate::core::problem::Problem;
use crate::kinds::{BuildContext, CheckContext};
use crate::core::stage::{Stage, StageContext, StageError};
use super::frames::{check_frame, partial_path, wrong_item};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Largest accepted `fps`.
pub const MAX_FPS: u32 = 240;
/// Largest accepted `crf` (x264's worst quality).
pub const MAX_CRF: u32 = 51;
/// Largest accepted `hold_last`.
pub const MAX_HOLD_LAST: u32 = 10_000;

/// The warning the stage posts when this build has no video encoder.
pub const NO_VIDEO_WARNING: &str =
    "this build has no video encoder (built without the `video` feature): frames are only written as sample PNGs";

/// Settings of the `video` stage (the `video: (...)` block of a pipeline file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct VideoConfig {
    /// Output file (H.264 in an MP4 container); a relative path is taken from the run folder.
    /// Its folder is created if missing. Default `progress.mp4`.
    pub path: PathBuf,
    /// Frames per second of the video (each sample grid is one frame), 1 to 240. Default 4.
    pub fps: u32,
    /// x264 constant rate factor, 0 (lossless) to 51 (worst); 18 is visually near-lossless.
    /// Default 18.
    pub crf: u32,
    /// Extra copies of the last frame appended at the end, so the final samples stay on
    /// screen (`hold_last / fps` seconds), 0 to 10000; skipped on an immediate stop (abort).
    /// Default 0.
    pub hold_last: u32,
}

impl Default for VideoConfig {
    fn default() -> Self {
        VideoConfig { path: PathBuf::from("progress.mp4"), fps: 4, crf: 18, hold_last: 0 }
    }
}

/// What [`probe`] found in a video file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoInfo {
    /// Number of frames of the first video stream, counted by decoding every frame.
    pub frames: u64,
    /// Picture width in pixels, as decoded.
    pub width: u32,
    /// Picture height in pixels, as decoded.
    pub height: u32,
    /// FFmpeg's short name of the codec (`h264` for the videos this stage writes).
    pub codec: String,
}

/// A built `video` stage.
#[derive(Debug)]
pub struct Video {
    cfg: VideoConfig,
    path: PathBuf,
    /// Grid PNGs encoded before the frames received (a resumed run's earlier grids).
    prefix: Vec<PathBuf>,
}

impl Video {
    /// Final path of the video (`cfg.path` resolved against the run folder).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the video with these pictures (PNG files, in order) before the frames the stage
    /// receives: a resumed run passes its earlier sample grids, so the MP4 covers the whole
    /// run. A file that cannot be read is skipped with a warning.
    pub fn with_prefix(mut self, pngs: Vec<PathBuf>) -> Self {
        self.prefix = pngs;
        self
    }

    /// The settings this stage was built with.
    pub fn config(&self) -> &VideoConfig {
        &self.cfg
    }

    /// Path the video is written to before it is finalised: `<path>.partial`.
    pub fn partial_path(&self) -> PathBuf {
        partial_path(&self.path)
    }
}

/// Builds a `video` stage writing `run_dir.join(&cfg.path)`, creating the folder of that
/// file. With the `video` feature it also checks that FFmpeg starts and has libx264.
///
/// Errors: `fps`, `crf` or `hold_last` out of range ([`StageError::Msg`]); the folder cannot
/// be created ([`StageError::Io`] naming it); no libx264 encoder in this FFmpeg.
pub fn build(cfg: &VideoConfig, run_dir: &Path) -> Result<Video, StageError> {
    cfg.validate()?;
    let path = run_dir.join(&cfg.path);
    if path.file_name().is_none() {
        return Err(StageError::file(&path, "`path` must name a file"));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| StageError::io(dir, e))?;
    }
    #[cfg(feature = "video")]
    enc::check_encoder().map_err(StageError::msg)?;
    Ok(Video { cfg: cfg.clone(), path, prefix: vec![] })
}

impl VideoConfig {
    /// Check the values without touching the disk: fps 1 to 240, crf 0 to 51, hold_last at most
    /// 10000, and `path` a relative file path inside the run folder (no `..`).
    pub fn problems(&self) -> Vec<Problem> {
        let mut errs = vec![];
        if self.fps == 0 || self.fps > MAX_FPS {
            errs.push(Problem::new("fps", format!("`fps` is {}, expected 1 to {MAX_FPS}", self.fps)));
        }
        if self.crf > MAX_CRF {
            errs.push(Problem::new("crf", format!("`crf` is {}, expected 0 to {MAX_CRF}", self.crf)));
        }
        if self.hold_last > MAX_HOLD_LAST {
            errs.push(Problem::new("hold_last", format!("`hold_last` is {}, expected 0 to {MAX_HOLD_LAST}", self.hold_last)));
        }
        errs.extend(crate::core::stage::check_inside_run(&self.path, "path", true).err());
        if !self.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("mp4")) {
            errs.push(Problem::new(
                "path",
                format!("`path` is {:?}: the video is an MP4, so give it a .mp4 name", self.path.display().to_string()),
            ));
        }
        errs
    }

    /// [`Self::problems`] as one result: every message, one per line.
    pub fn validate(&self) -> Result<(), crate::core::problem::Problems> {
        crate::core::problem::to_result(self.problems())
    }
}

/// The next item of a frame sink (video, GIF): a resumed run's earlier grid PNGs first, as
/// frames (an unreadable one is left out, with a warning that it is missing from the `what`),
/// then the stage's input. None at the end of the input.
pub fn next_frame(prefix: &mut std::slice::Iter<'_, PathBuf>, ctx: &StageContext, what: &str) -> Option<Item> {
    for png in prefix.by_ref() {
        match read_frame(png) {
            Ok(f) => return Some(Item::Frame(f)),
            Err(e) => ctx.bus.warn(format!("{}: left out of the {what}: {e}", png.display())),
        }
    }
    ctx.recv()
}

/// A PNG as a video frame (RGB8); its step is taken from a `step_<n>.png` name, else 0.
pub fn read_frame(path: &Path) -> Result<Frame, String> {
    let img = image::open(path).map_err(|e| e.to_string())?.to_rgb8();
    let step = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.strip_prefix("step_")).and_then(|n| n.parse().ok()).unwrap_or(0);
    Ok(Frame { step, width: img.width(), height: img.height(), rgb: img.into_raw() })
}

#[cfg(not(feature = "video"))]
impl Stage for Video {
    /// Without the `video` feature: warns once ([`NO_VIDEO_WARNING`]) and drains the input.
    ///
    /// Errors: an item other than a frame.
    fn run(self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        ctx.bus.warn(NO_VIDEO_WARNING);
        while let Some(item) = ctx.recv() {
            if !matches!(item, Item::Frame(_)) {
                return Err(wrong_item("video", item.kind()));
            }
        }
        Ok(())
    }
}

/// Reads a video file and counts its frames by decoding them all.
///
/// Errors (a message naming the file): the file cannot be opened or has no video stream,
/// decoding fails, or this build has no `video` feature.
#[cfg(not(feature = "video"))]
pub fn probe(path: &Path) -> Result<VideoInfo, String> {
    Err(format!("{}: cannot read videos: {NO_VIDEO_WARNING}", path.display()))
}

/// Decodes frame `index` (0-based) of a video file as an RGB8 [`Frame`] (its `step` is
/// `index`).
///
/// Errors (a message naming the file): as [`probe`], and an `index` past the last frame.
#[cfg(not(feature = "video"))]
pub fn decode_frame(path: &Path, index: u64) -> Result<Frame, String> {
    let _ = index;
    Err(format!("{}: cannot read videos: {NO_VIDEO_WARNING}", path.display()))
}

#[cfg(feature = "video")]
impl Stage for Video {
    /// Encodes every [`Item::Frame`] received; finalises the MP4 when the input ends, on abort
    /// and on error, then posts `wrote` with the final path.
    ///
    /// Errors: an item other than a frame, a malformed frame, an FFmpeg error (naming the file).
    /// The video is finalised before an error is returned; the first error wins.
    fn run(self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        let partial = self.partial_path();
        let mut writer: Option<enc::Mp4Writer> = None;
        let mut warned_scaled = false;
        let mut prefix = self.prefix.iter();
        let result: Result<(), StageError> = loop {
            let Some(item) = next_frame(&mut prefix, &ctx, "video") else { break Ok(()) };
            let frame = match item {
                Item::Frame(f) => f,
                other => break Err(wrong_item("video", other.kind())),
            };
            if let Err(e) = check_frame(&frame, Some(16384)) {
                break Err(StageError::msg(format!("frame of step {}: {e}", frame.step)));
            }
            if writer.is_none() {
                match enc::Mp4Writer::create(&partial, &self.path, &self.cfg, &frame) {
                    Ok(w) => writer = Some(w),
                    Err(e) => break Err(StageError::file(&partial, e)),
                }
            }
            let Some(w) = writer.as_mut() else {
                break Err(StageError::file(&partial, "the video writer is missing"));
            };
            match w.push(&frame) {
                Ok(scaled) => {
                    if scaled && !warned_scaled {
                        warned_scaled = true;
                        let (vw, vh) = w.size();
                        ctx.bus.warn(format!(
                            "frame of step {} is {}×{} but the video is {vw}×{vh}: scaled to fit",
                            frame.step, frame.width, frame.height
                        ));
                    }
                }
                Err(e) => break Err(StageError::file(&partial, e)),
            }
        };
        let finished = match writer.take() {
            // On an immediate stop the held copies of the last frame are skipped.
            Some(mut w) => match w.finish(!ctx.aborted()) {
                Ok(()) => {
                    ctx.bus.wrote(&self.path);
                    Ok(())
                }
                Err(e) => Err(StageError::file(&partial, e)),
            },
            None => {
                if result.is_ok() {
                    ctx.bus.warn(format!("no frames arrived: {} was not written", self.path.display()));
                }
                Ok(())
            }
        };
        result.and(finished)
    }
}

/// Encode `frames` into an H.264 MP4 at `path` as the stage does (written as
/// `<path>.partial`, renamed when finalised). For tools such as `pipe sample --walk`.
///
/// Errors: no frames, a malformed frame, an FFmpeg error (naming the file), or a build
/// without the `video` feature.
#[cfg(feature = "video")]
pub fn encode_mp4(path: &Path, cfg: &VideoConfig, frames: impl IntoIterator<Item = Frame>) -> Result<(), String> {
    let partial = partial_path(path);
    let mut writer: Option<enc::Mp4Writer> = None;
    for f in frames {
        check_frame(&f, Some(16384)).map_err(|e| format!("{}: frame {}: {e}", path.display(), f.step))?;
        if writer.is_none() {
            writer = Some(enc::Mp4Writer::create(&partial, path, cfg, &f).map_err(|e| format!("{}: {e}", partial.display()))?);
        }
        if let Some(w) = writer.as_mut() {
            w.push(&f).map_err(|e| format!("{}: {e}", partial.display()))?;
        }
    }
    match writer {
        Some(mut w) => w.finish(true).map_err(|e| format!("{}: {e}", partial.display())),
        None => Err(format!("{}: no frames to encode", path.display())),
    }
}

/// Without the `video` feature: always an error.
#[cfg(not(feature = "video"))]
pub fn encode_mp4(path: &Path, cfg: &VideoConfig, frames: impl IntoIterator<Item = Frame>) -> Result<(), String> {
    let _ = (cfg, frames.into_iter().next());
    Err(format!("{}: cannot write videos: {NO_VIDEO_WARNING}", path.display()))
}

#[cfg(feature = "video")]
pub use enc::{decode_frame, probe};

#[cfg(feature = "video")]
mod enc;

impl crate::kinds::Kind for VideoConfig {
    const NAME: &'static str = "Video";
    const PORTS: Ports = Ports::sink(ItemKind::Frame, "frame: RGB8 picture on cpu");

    fn validate(&self, _cx: &CheckContext<'_>) -> Vec<Problem> {
        self.problems()
    }

    fn outputs(&self) -> Vec<Output<'_>> {
        vec![Output::File { field: "path", path: &self.path, what: "video", example: "progress.mp4" }]
    }

    /// A resumed run's video starts with the earlier grids ([`BuildContext::prefix_frames`]).
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(build(self, cx.run_dir)?.with_prefix(cx.prefix_frames.to_vec())))
    }
}

#[cfg(test)]
mod tests;
