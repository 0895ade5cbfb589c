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
//!
//! Errors of this module are [`VideoError`]s.

use crate::core::item::{Frame, Item};
use crate::core::ports::{ItemKind, Output, Ports};
use crate::core::problem::Problem;
use crate::kinds::{BuildContext, CheckContext};
use crate::core::stage::{Stage, StageContext, StageError};
use super::frames::{check_frame, partial_path, wrong_item, FrameError};
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

/// Why a video could not be written or read, or a PNG read as a frame. The encoder's own
/// errors name no file: the stage and [`encode_mp4`] wrap them in [`VideoError::InFile`] with
/// the file being written; the decoder's name the video.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    /// An error about the file `path` (`<path>: <error>`).
    #[error("{}: {source}", path.display())]
    InFile { path: PathBuf, source: Box<VideoError> },
    /// A picture that cannot be read as a frame ([`read_frame`]).
    #[error("{0}")]
    Image(#[from] image::ImageError),
    /// A malformed frame given to [`encode_mp4`] (`path`: the video).
    #[error("{}: frame {step}: {source}", path.display())]
    Frame { path: PathBuf, step: u64, source: FrameError },
    /// [`encode_mp4`] was given no frames (`path`: the video).
    #[error("{}: no frames to encode", .0.display())]
    NoFrames(PathBuf),
    /// This build has no `video` feature; `doing` is `read` or `write`.
    #[error("{}: cannot {doing} videos: {NO_VIDEO_WARNING}", path.display())]
    NoVideo { path: PathBuf, doing: &'static str },
    /// An FFmpeg call failed; `what` says which (`cannot write the MP4 header`).
    #[cfg(feature = "video")]
    #[error("{what}: {source}")]
    Ffmpeg { what: &'static str, source: ffmpeg_next::Error },
    /// This FFmpeg has no libx264 encoder.
    #[error("this FFmpeg has no libx264 encoder (install an FFmpeg built with libx264)")]
    NoX264,
    /// An `fps` FFmpeg cannot take.
    #[error("fps {0} is too large")]
    Fps(u32),
    /// libx264 refused to open for this size.
    #[cfg(feature = "video")]
    #[error("cannot open the libx264 encoder for {width}×{height}: {source}")]
    OpenEncoder { width: u32, height: u32, source: ffmpeg_next::Error },
    /// The MP4 has no stream after its header was written.
    #[error("the MP4 has no stream after its header")]
    NoStream,
    /// No scaler from frames of `width`×`height` to the video size.
    #[cfg(feature = "video")]
    #[error("cannot set up a scaler from {width}×{height}: {source}")]
    Scaler { width: u32, height: u32, source: ffmpeg_next::Error },
    /// The encoder refused frame number `frame` (0-based).
    #[cfg(feature = "video")]
    #[error("the H.264 encoder refused frame {frame}: {source}")]
    Refused { frame: i64, source: ffmpeg_next::Error },
    /// The video was already finalised.
    #[error("the video file is already closed")]
    Closed,
    /// The finalised `<path>.partial` cannot be renamed to `path`.
    #[error("cannot rename to {}: {source}", path.display())]
    Rename { path: PathBuf, source: std::io::Error },
    /// The video `path` cannot be opened.
    #[cfg(feature = "video")]
    #[error("{}: cannot open: {source}", path.display())]
    Open { path: PathBuf, source: ffmpeg_next::Error },
    /// The file `path` has no video stream.
    #[error("{}: no video stream", .0.display())]
    NoVideoStream(PathBuf),
    /// No decoder for the video's codec.
    #[cfg(feature = "video")]
    #[error("{}: cannot open a {codec} decoder: {source}", path.display())]
    Decoder { path: PathBuf, codec: String, source: ffmpeg_next::Error },
    /// Decoding the video `path` failed.
    #[cfg(feature = "video")]
    #[error("{}: decoding failed: {source}", path.display())]
    Decode { path: PathBuf, source: ffmpeg_next::Error },
    /// [`decode_frame`] was asked for a frame past the end.
    #[error("{}: has {frames} frames, frame {index} does not exist", path.display())]
    NoSuchFrame { path: PathBuf, frames: u64, index: u64 },
}

impl VideoError {
    /// This error as one about the file `path` ([`VideoError::InFile`]).
    pub fn in_file(self, path: &Path) -> Self {
        VideoError::InFile { path: path.to_path_buf(), source: Box::new(self) }
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
/// be created ([`StageError::Io`] naming it); FFmpeg does not start or has no libx264 encoder
/// ([`StageError::Video`]).
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
    enc::check_encoder()?;
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
///
/// Errors: [`VideoError::Image`], the file cannot be read or decoded.
pub fn read_frame(path: &Path) -> Result<Frame, VideoError> {
    let img = image::open(path)?.to_rgb8();
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
/// Errors (naming the file): the file cannot be opened or has no video stream, decoding
/// fails, or this build has no `video` feature ([`VideoError::NoVideo`], the only one here).
#[cfg(not(feature = "video"))]
pub fn probe(path: &Path) -> Result<VideoInfo, VideoError> {
    Err(VideoError::NoVideo { path: path.to_path_buf(), doing: "read" })
}

/// Decodes frame `index` (0-based) of a video file as an RGB8 [`Frame`] (its `step` is
/// `index`).
///
/// Errors (naming the file): as [`probe`], and an `index` past the last frame.
#[cfg(not(feature = "video"))]
pub fn decode_frame(path: &Path, index: u64) -> Result<Frame, VideoError> {
    let _ = index;
    Err(VideoError::NoVideo { path: path.to_path_buf(), doing: "read" })
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
                    Err(e) => break Err(e.in_file(&partial).into()),
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
                Err(e) => break Err(e.in_file(&partial).into()),
            }
        };
        let finished = match writer.take() {
            // On an immediate stop the held copies of the last frame are skipped.
            Some(mut w) => match w.finish(!ctx.aborted()) {
                Ok(()) => {
                    ctx.bus.wrote(&self.path);
                    Ok(())
                }
                Err(e) => Err(e.in_file(&partial).into()),
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
/// Errors: no frames ([`VideoError::NoFrames`]), a malformed frame ([`VideoError::Frame`]),
/// an FFmpeg error ([`VideoError::InFile`] naming the `.partial` file), or a build without the
/// `video` feature ([`VideoError::NoVideo`]).
#[cfg(feature = "video")]
pub fn encode_mp4(path: &Path, cfg: &VideoConfig, frames: impl IntoIterator<Item = Frame>) -> Result<(), VideoError> {
    let partial = partial_path(path);
    let mut writer: Option<enc::Mp4Writer> = None;
    for f in frames {
        check_frame(&f, Some(16384)).map_err(|e| VideoError::Frame { path: path.to_path_buf(), step: f.step, source: e })?;
        if writer.is_none() {
            writer = Some(enc::Mp4Writer::create(&partial, path, cfg, &f).map_err(|e| e.in_file(&partial))?);
        }
        if let Some(w) = writer.as_mut() {
            w.push(&f).map_err(|e| e.in_file(&partial))?;
        }
    }
    match writer {
        Some(mut w) => w.finish(true).map_err(|e| e.in_file(&partial)),
        None => Err(VideoError::NoFrames(path.to_path_buf())),
    }
}

/// Without the `video` feature: always an error ([`VideoError::NoVideo`]).
#[cfg(not(feature = "video"))]
pub fn encode_mp4(path: &Path, cfg: &VideoConfig, frames: impl IntoIterator<Item = Frame>) -> Result<(), VideoError> {
    let _ = (cfg, frames.into_iter().next());
    Err(VideoError::NoVideo { path: path.to_path_buf(), doing: "write" })
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
        vec![Output::File { field: "path", path: self.path.as_path().into(), what: "video", example: "progress.mp4" }]
    }

    /// A resumed run's video starts with the earlier grids ([`BuildContext::prefix_frames`]).
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(build(self, cx.run_dir)?.with_prefix(cx.prefix_frames.to_vec())))
    }
}

#[cfg(test)]
mod tests;
