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

use crate::item::{Frame, Item};
use crate::problem::Problem;
use crate::stage::{Stage, StageContext, StageError};
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

fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Builds a `video` stage writing `run_dir.join(&cfg.path)`, creating the folder of that
/// file. With the `video` feature it also checks that FFmpeg starts and has libx264.
///
/// Errors: `fps`, `crf` or `hold_last` out of range ([`StageError::Msg`]); the folder cannot
/// be created ([`StageError::Io`] naming it); no libx264 encoder in this FFmpeg.
pub fn build(cfg: &VideoConfig, run_dir: &Path) -> Result<Video, StageError> {
    cfg.validate().map_err(StageError::Msg)?;
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
        errs.extend(crate::stage::check_inside_run(&self.path, "path", true).err());
        if !self.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("mp4")) {
            errs.push(Problem::new(
                "path",
                format!("`path` is {:?}: the video is an MP4, so give it a .mp4 name", self.path.display().to_string()),
            ));
        }
        errs
    }

    /// [`Self::problems`] as one result: every message, one per line.
    pub fn validate(&self) -> Result<(), String> {
        crate::problem::to_result(self.problems())
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

fn wrong_item(kind: &str) -> StageError {
    StageError::msg(format!("the video stage takes `frame` items (sample grids from a sampler), got a `{kind}` item"))
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
                return Err(wrong_item(item.kind()));
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
                other => break Err(wrong_item(other.kind())),
            };
            if let Err(e) = check_frame(&frame) {
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
        check_frame(&f).map_err(|e| format!("{}: frame {}: {e}", path.display(), f.step))?;
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

/// Checks that a frame holds `width·height·3` bytes and is not empty.
#[cfg(feature = "video")]
fn check_frame(f: &Frame) -> Result<(), String> {
    let need = (f.width as usize).checked_mul(f.height as usize).and_then(|v| v.checked_mul(3));
    if f.width == 0 || f.height == 0 {
        return Err(format!("empty frame ({}×{})", f.width, f.height));
    }
    if f.width > 16384 || f.height > 16384 {
        return Err(format!("frame of {}×{} is too large for H.264", f.width, f.height));
    }
    if need != Some(f.rgb.len()) {
        return Err(format!("frame of {}×{} has {} bytes of RGB, expected {}", f.width, f.height, f.rgb.len(), need.unwrap_or(0)));
    }
    Ok(())
}

#[cfg(feature = "video")]
pub use enc::{decode_frame, probe};

#[cfg(feature = "video")]
mod enc {
    use super::{VideoConfig, VideoInfo};
    use crate::item::Frame;
    use ff::format::Pixel;
    use ff::software::scaling::{context::Context as Scaler, flag::Flags as ScaleFlags};
    use ff::{codec, encoder, format, frame, Dictionary, Packet, Rational};
    use ffmpeg_next as ff;
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    /// Initialises FFmpeg once and silences its logging below errors.
    pub(super) fn init() -> Result<(), String> {
        static INIT: OnceLock<Result<(), String>> = OnceLock::new();
        INIT.get_or_init(|| {
            ff::init().map_err(|e| format!("FFmpeg failed to start: {e}"))?;
            ff::util::log::set_level(ff::util::log::Level::Error);
            Ok(())
        })
        .clone()
    }

    /// Checks that FFmpeg starts and has the libx264 encoder.
    pub(super) fn check_encoder() -> Result<(), String> {
        init()?;
        x264().map(|_| ())
    }

    fn x264() -> Result<ff::Codec, String> {
        encoder::find_by_name("libx264")
            .ok_or_else(|| "this FFmpeg has no libx264 encoder (install an FFmpeg built with libx264)".to_string())
    }

    fn even(v: u32) -> u32 {
        v + (v & 1)
    }

    /// An open MP4 being written; finalised by [`Mp4Writer::finish`] or, failing that, on drop.
    pub(super) struct Mp4Writer {
        octx: Option<format::context::Output>,
        encoder: encoder::Video,
        /// RGB24 → YUV420P at the video size.
        scaler: Scaler,
        /// Source-size scaler for frames of another size: (width, height, scaler).
        other: Option<(u32, u32, Scaler)>,
        width: u32,
        height: u32,
        enc_tb: Rational,
        ost_tb: Rational,
        /// Next pts (= frames sent so far).
        pts: i64,
        hold_last: u32,
        last: Option<frame::Video>,
        partial: PathBuf,
        path: PathBuf,
        done: bool,
    }

    impl Mp4Writer {
        /// Opens `partial` for writing an MP4 sized after `first` (rounded up to even sides).
        pub(super) fn create(partial: &Path, path: &Path, cfg: &VideoConfig, first: &Frame) -> Result<Self, String> {
            init()?;
            let w = Self::open(partial, path, cfg, first);
            if w.is_err() {
                let _ = std::fs::remove_file(partial);
            }
            w
        }

        fn open(partial: &Path, path: &Path, cfg: &VideoConfig, first: &Frame) -> Result<Self, String> {
            let (width, height) = (even(first.width), even(first.height));
            let fps = i32::try_from(cfg.fps).map_err(|_| format!("fps {} is too large", cfg.fps))?;
            let enc_tb = Rational(1, fps);
            let codec = x264()?;
            let mut octx = format::output_as(partial, "mp4").map_err(|e| format!("cannot create the video file: {e}"))?;
            let global_header = octx.format().flags().contains(format::Flags::GLOBAL_HEADER);
            let mut enc = codec::context::Context::new_with_codec(codec)
                .encoder()
                .video()
                .map_err(|e| format!("cannot set up the H.264 encoder: {e}"))?;
            enc.set_width(width);
            enc.set_height(height);
            enc.set_format(Pixel::YUV420P);
            enc.set_time_base(enc_tb);
            enc.set_frame_rate(Some(Rational(fps, 1)));
            enc.set_colorspace(ff::color::Space::SMPTE170M);
            enc.set_color_range(ff::color::Range::MPEG);
            if global_header {
                enc.set_flags(codec::Flags::GLOBAL_HEADER);
            }
            let mut opts = Dictionary::new();
            opts.set("crf", &cfg.crf.to_string());
            opts.set("preset", "medium");
            let encoder = enc.open_with(opts).map_err(|e| format!("cannot open the libx264 encoder for {width}×{height}: {e}"))?;
            {
                let mut ost = octx.add_stream(codec).map_err(|e| format!("cannot add a video stream: {e}"))?;
                ost.set_parameters(&encoder);
                ost.set_time_base(enc_tb);
                ost.set_avg_frame_rate(Rational(fps, 1));
                ost.set_rate(Rational(fps, 1));
            }
            let mut mux_opts = Dictionary::new();
            mux_opts.set("movflags", "+faststart");
            octx.write_header_with(mux_opts).map_err(|e| format!("cannot write the MP4 header: {e}"))?;
            let ost_tb = octx.stream(0).map(|s| s.time_base()).ok_or_else(|| "the MP4 has no stream after its header".to_string())?;
            let scaler =
                Scaler::get(Pixel::RGB24, width, height, Pixel::YUV420P, width, height, ScaleFlags::BILINEAR | ScaleFlags::ACCURATE_RND)
                    .map_err(|e| format!("cannot set up the RGB→YUV converter: {e}"))?;
            Ok(Mp4Writer {
                octx: Some(octx),
                encoder,
                scaler,
                other: None,
                width,
                height,
                enc_tb,
                ost_tb,
                pts: 0,
                hold_last: cfg.hold_last,
                last: None,
                partial: partial.to_path_buf(),
                path: path.to_path_buf(),
                done: false,
            })
        }

        /// Video size (even width, even height).
        pub(super) fn size(&self) -> (u32, u32) {
            (self.width, self.height)
        }

        /// Encodes one frame (already checked: `rgb` holds `width·height·3` bytes). Returns
        /// whether it had to be scaled (its size rounds to another size than the video's).
        pub(super) fn push(&mut self, f: &Frame) -> Result<bool, String> {
            let mut yuv = frame::Video::new(Pixel::YUV420P, self.width, self.height);
            let scaled = even(f.width) != self.width || even(f.height) != self.height;
            if scaled {
                let mut rgb = frame::Video::new(Pixel::RGB24, f.width, f.height);
                fill_rgb(&mut rgb, f);
                let reuse = matches!(&self.other, Some((w, h, _)) if *w == f.width && *h == f.height);
                if !reuse {
                    let s = Scaler::get(
                        Pixel::RGB24,
                        f.width,
                        f.height,
                        Pixel::YUV420P,
                        self.width,
                        self.height,
                        ScaleFlags::BILINEAR | ScaleFlags::ACCURATE_RND,
                    )
                    .map_err(|e| format!("cannot set up a scaler from {}×{}: {e}", f.width, f.height))?;
                    self.other = Some((f.width, f.height, s));
                }
                if let Some((_, _, s)) = &mut self.other {
                    s.run(&rgb, &mut yuv).map_err(|e| format!("cannot convert a frame to YUV: {e}"))?;
                }
            } else {
                let mut rgb = frame::Video::new(Pixel::RGB24, self.width, self.height);
                fill_rgb(&mut rgb, f);
                self.scaler.run(&rgb, &mut yuv).map_err(|e| format!("cannot convert a frame to YUV: {e}"))?;
            }
            yuv.set_color_space(ff::color::Space::SMPTE170M);
            yuv.set_color_range(ff::color::Range::MPEG);
            self.send(&mut yuv)?;
            self.last = Some(yuv);
            Ok(scaled)
        }

        fn send(&mut self, yuv: &mut frame::Video) -> Result<(), String> {
            yuv.set_pts(Some(self.pts));
            self.pts += 1;
            self.encoder.send_frame(yuv).map_err(|e| format!("the H.264 encoder refused frame {}: {e}", self.pts - 1))?;
            self.write_packets()
        }

        fn write_packets(&mut self) -> Result<(), String> {
            let Some(octx) = self.octx.as_mut() else {
                return Err("the video file is already closed".into());
            };
            let mut pkt = Packet::empty();
            loop {
                match self.encoder.receive_packet(&mut pkt) {
                    Ok(()) => {
                        pkt.set_stream(0);
                        if pkt.duration() <= 0 {
                            pkt.set_duration(1);
                        }
                        pkt.rescale_ts(self.enc_tb, self.ost_tb);
                        pkt.write_interleaved(octx).map_err(|e| format!("cannot write to the video file: {e}"))?;
                    }
                    Err(ff::Error::Other { errno: ff::util::error::EAGAIN }) | Err(ff::Error::Eof) => return Ok(()),
                    Err(e) => return Err(format!("the H.264 encoder failed: {e}")),
                }
            }
        }

        /// Appends `hold_last` copies of the last frame (if `hold`), flushes the encoder,
        /// writes the MP4 trailer, closes the file and renames `<path>.partial` to `<path>`.
        /// Idempotent.
        pub(super) fn finish(&mut self, hold: bool) -> Result<(), String> {
            if self.done {
                return Ok(());
            }
            self.done = true;
            let mut first_err: Option<String> = None;
            if let Some(mut last) = self.last.take() {
                for _ in 0..if hold { self.hold_last } else { 0 } {
                    if let Err(e) = self.send(&mut last) {
                        first_err.get_or_insert(e);
                        break;
                    }
                }
            }
            if let Err(e) = self.encoder.send_eof() {
                first_err.get_or_insert(format!("cannot flush the H.264 encoder: {e}"));
            } else if let Err(e) = self.write_packets() {
                first_err.get_or_insert(e);
            }
            match self.octx.as_mut() {
                Some(octx) => {
                    if let Err(e) = octx.write_trailer() {
                        first_err.get_or_insert(format!("cannot write the MP4 trailer: {e}"));
                    }
                }
                None => {
                    first_err.get_or_insert("the video file is already closed".into());
                }
            }
            // Close the file before renaming it.
            drop(self.octx.take());
            if let Some(e) = first_err {
                return Err(e);
            }
            std::fs::rename(&self.partial, &self.path).map_err(|e| format!("cannot rename to {}: {e}", self.path.display()))
        }
    }

    impl Drop for Mp4Writer {
        fn drop(&mut self) {
            // A stage that unwinds (panic) still leaves a playable video.
            let _ = self.finish(false);
        }
    }

    /// Copies `f` into the RGB24 frame `dst` (at least as large as `f`), repeating the last
    /// column and row of `f` into any extra columns / rows.
    fn fill_rgb(dst: &mut frame::Video, f: &Frame) {
        let (dw, dh) = (dst.width() as usize, dst.height() as usize);
        let (fw, fh) = (f.width as usize, f.height as usize);
        if fw == 0 || fh == 0 {
            return;
        }
        let stride = dst.stride(0);
        let data = dst.data_mut(0);
        for y in 0..dh {
            let sy = y.min(fh - 1);
            let src = &f.rgb[sy * fw * 3..(sy + 1) * fw * 3];
            let row = &mut data[y * stride..y * stride + dw * 3];
            let n = fw.min(dw) * 3;
            row[..n].copy_from_slice(&src[..n]);
            let edge = [src[n - 3], src[n - 2], src[n - 1]];
            for px in row[n..].chunks_exact_mut(3) {
                px.copy_from_slice(&edge);
            }
        }
    }

    /// Opens `path`, finds its best video stream and calls `each` with every decoded frame
    /// (in decoding output order, i.e. presentation order) until it returns `false`.
    fn decode_each(
        path: &Path,
        mut each: impl FnMut(&frame::Video, &ff::decoder::Video) -> Result<bool, String>,
    ) -> Result<(String, u32, u32), String> {
        init()?;
        let name = path.display();
        let mut ictx = format::input(&path).map_err(|e| format!("{name}: cannot open: {e}"))?;
        let (index, params) = {
            let st = ictx.streams().best(ff::media::Type::Video).ok_or_else(|| format!("{name}: no video stream"))?;
            (st.index(), st.parameters())
        };
        let codec = params.id().name().to_string();
        let mut decoder = codec::context::Context::from_parameters(params)
            .and_then(|c| c.decoder().video())
            .map_err(|e| format!("{name}: cannot open a {codec} decoder: {e}"))?;
        let mut decoded = frame::Video::empty();
        let mut going = true;
        let mut receive = |decoder: &mut ff::decoder::Video, going: &mut bool| -> Result<(), String> {
            while *going {
                match decoder.receive_frame(&mut decoded) {
                    Ok(()) => *going = each(&decoded, decoder)?,
                    Err(ff::Error::Other { errno: ff::util::error::EAGAIN }) | Err(ff::Error::Eof) => break,
                    Err(e) => return Err(format!("{name}: decoding failed: {e}")),
                }
            }
            Ok(())
        };
        for (stream, packet) in ictx.packets() {
            if stream.index() != index {
                continue;
            }
            decoder.send_packet(&packet).map_err(|e| format!("{name}: decoding failed: {e}"))?;
            receive(&mut decoder, &mut going)?;
            if !going {
                break;
            }
        }
        if going {
            decoder.send_eof().map_err(|e| format!("{name}: decoding failed: {e}"))?;
            receive(&mut decoder, &mut going)?;
        }
        Ok((codec, decoder.width(), decoder.height()))
    }

    /// Reads a video file and counts its frames by decoding them all (frame counts from the
    /// container's metadata are not trusted).
    ///
    /// Errors (a message naming the file): the file cannot be opened or has no video stream,
    /// or decoding fails.
    pub fn probe(path: &Path) -> Result<VideoInfo, String> {
        let mut frames = 0u64;
        let mut size = (0, 0);
        let (codec, dw, dh) = decode_each(path, |f, _| {
            frames += 1;
            size = (f.width(), f.height());
            Ok(true)
        })?;
        if frames == 0 {
            size = (dw, dh);
        }
        Ok(VideoInfo { frames, width: size.0, height: size.1, codec })
    }

    /// Decodes frame `index` (0-based, presentation order) of a video file as an RGB8
    /// [`Frame`] of the decoded size (its `step` is `index`).
    ///
    /// Errors (a message naming the file): as [`probe`], and an `index` past the last frame.
    pub fn decode_frame(path: &Path, index: u64) -> Result<Frame, String> {
        let mut n = 0u64;
        let mut out: Option<Frame> = None;
        decode_each(path, |f, _| {
            if n == index {
                out = Some(to_rgb(f).map_err(|e| format!("{}: {e}", path.display()))?);
                return Ok(false);
            }
            n += 1;
            Ok(true)
        })?;
        let mut frame = out.ok_or_else(|| format!("{}: has {n} frames, frame {index} does not exist", path.display()))?;
        frame.step = index;
        Ok(frame)
    }

    fn to_rgb(f: &frame::Video) -> Result<Frame, String> {
        let (w, h) = (f.width(), f.height());
        let mut s = Scaler::get(f.format(), w, h, Pixel::RGB24, w, h, ScaleFlags::BILINEAR | ScaleFlags::ACCURATE_RND)
            .map_err(|e| format!("cannot set up a YUV→RGB converter: {e}"))?;
        let mut rgb = frame::Video::empty();
        s.run(f, &mut rgb).map_err(|e| format!("cannot convert a frame to RGB: {e}"))?;
        let stride = rgb.stride(0);
        let data = rgb.data(0);
        let row = w as usize * 3;
        let mut out = Vec::with_capacity(row * h as usize);
        for y in 0..h as usize {
            out.extend_from_slice(&data[y * stride..y * stride + row]);
        }
        Ok(Frame { step: 0, width: w, height: h, rgb: out })
    }
}

#[cfg(test)]
// Some helpers are only used by the tests of the encoder (feature `video`).
#[cfg_attr(not(feature = "video"), allow(dead_code, unused_imports))]
mod tests {
    use super::*;
    use crate::item::HostBatch;
    use crate::stage::{Bus, BusMessage};
    use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Harness {
        tx: Option<Sender<Item>>,
        bus: Receiver<BusMessage>,
        abort: Arc<AtomicBool>,
        handle: std::thread::JoinHandle<Result<(), StageError>>,
    }

    fn start(stage: Video) -> Harness {
        let (tx, rx) = bounded(2);
        let (btx, brx) = unbounded();
        let abort = Arc::new(AtomicBool::new(false));
        let ctx = StageContext {
            name: "video".into(),
            input: Some(rx),
            outputs: vec![],
            bus: Bus::new(btx, "video"),
            abort: abort.clone(),
            drain: Arc::new(AtomicBool::new(false)),
            stats: Default::default(),
            panic_after: None,
        };
        let handle = std::thread::spawn(move || Box::new(stage).run(ctx));
        Harness { tx: Some(tx), bus: brx, abort, handle }
    }

    fn wrote(bus: &Receiver<BusMessage>) -> Vec<PathBuf> {
        bus.try_iter()
            .filter_map(|m| match m {
                BusMessage::Wrote { path, .. } => Some(path),
                _ => None,
            })
            .collect()
    }

    /// A frame in four solid quadrants whose colours depend on `k`.
    fn quadrants(step: u64, w: u32, h: u32, k: u8) -> Frame {
        let cols = quad_colours(k);
        let mut rgb = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let q = usize::from(x >= w / 2) + 2 * usize::from(y >= h / 2);
                rgb.extend_from_slice(&cols[q]);
            }
        }
        Frame { step, width: w, height: h, rgb }
    }

    fn quad_colours(k: u8) -> [[u8; 3]; 4] {
        [[200, 30u8.wrapping_add(k * 10), 40], [20, 180, 60u8.wrapping_add(k * 20)], [50u8.wrapping_add(k * 15), 60, 220], [128, 128, 128]]
    }

    fn pixel(f: &Frame, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * f.width + x) * 3) as usize;
        [f.rgb[i], f.rgb[i + 1], f.rgb[i + 2]]
    }

    fn close(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
        a.iter().zip(b).all(|(&x, y)| (i32::from(x) - i32::from(y)).abs() <= tol)
    }

    #[test]
    fn config_defaults_and_validation() {
        let d = VideoConfig::default();
        assert_eq!((d.path.as_path(), d.fps, d.crf, d.hold_last), (Path::new("progress.mp4"), 4, 18, 0));
        let j: VideoConfig = serde_json::from_str(r#"{"fps": 10}"#).unwrap();
        assert_eq!(j, VideoConfig { fps: 10, ..Default::default() });
        assert!(serde_json::from_str::<VideoConfig>(r#"{"fsp": 10}"#).is_err());
        let run = tempfile::tempdir().unwrap();
        for bad in [
            VideoConfig { fps: 0, ..Default::default() },
            VideoConfig { crf: 52, ..Default::default() },
            VideoConfig { hold_last: MAX_HOLD_LAST + 1, ..Default::default() },
        ] {
            assert!(build(&bad, run.path()).is_err(), "{bad:?}");
        }
        let v = build(&VideoConfig { path: "out/v.mp4".into(), ..Default::default() }, run.path()).unwrap();
        assert!(run.path().join("out").is_dir());
        assert_eq!(v.path(), run.path().join("out/v.mp4"));
        assert_eq!(v.partial_path(), run.path().join("out/v.mp4.partial"));
    }

    #[cfg(not(feature = "video"))]
    #[test]
    fn without_the_feature_the_stage_warns_and_drains() {
        let run = tempfile::tempdir().unwrap();
        let mut h = start(build(&VideoConfig::default(), run.path()).unwrap());
        let tx = h.tx.take().unwrap();
        for k in 0..3 {
            tx.send(Item::Frame(quadrants(k, 8, 8, 0))).unwrap();
        }
        drop(tx);
        h.handle.join().unwrap().unwrap();
        let warnings: Vec<String> = h
            .bus
            .try_iter()
            .filter_map(|m| match m {
                BusMessage::Warning { msg, .. } => Some(msg),
                _ => None,
            })
            .collect();
        assert_eq!(warnings, vec![NO_VIDEO_WARNING.to_string()]);
        assert!(!run.path().join("progress.mp4").exists());
        assert!(probe(&run.path().join("progress.mp4")).is_err());
        assert!(decode_frame(&run.path().join("progress.mp4"), 0).is_err());
    }

    #[cfg(feature = "video")]
    fn encode(dir: &Path, name: &str, frames: Vec<Frame>, hold_last: u32) -> (PathBuf, Vec<BusMessage>) {
        let cfg = VideoConfig { path: name.into(), hold_last, ..Default::default() };
        let mut h = start(build(&cfg, dir).unwrap());
        let tx = h.tx.take().unwrap();
        for f in frames {
            tx.send(Item::Frame(f)).unwrap();
        }
        drop(tx);
        h.handle.join().unwrap().unwrap();
        (dir.join(name), h.bus.try_iter().collect())
    }

    #[cfg(feature = "video")]
    #[test]
    fn even_frames_encode_and_decode() {
        let run = tempfile::tempdir().unwrap();
        let frames: Vec<Frame> = (0..5).map(|k| quadrants(500 * (k + 1), 242, 242, k as u8)).collect();
        let (path, bus) = encode(run.path(), "progress.mp4", frames.clone(), 0);
        assert!(bus.iter().any(|m| matches!(m, BusMessage::Wrote { path: p, .. } if *p == path)));
        assert!(!run.path().join("progress.mp4.partial").exists());
        let info = probe(&path).unwrap();
        assert_eq!(info, VideoInfo { frames: 5, width: 242, height: 242, codec: "h264".into() });
        for k in [0u64, 2, 4] {
            let f = decode_frame(&path, k).unwrap();
            assert_eq!((f.width, f.height, f.step), (242, 242, k));
            let cols = quad_colours(k as u8);
            for (q, (x, y)) in [(60, 60), (180, 60), (60, 180), (180, 180)].into_iter().enumerate() {
                let got = pixel(&f, x, y);
                assert!(close(got, cols[q], 8), "frame {k} quadrant {q}: {got:?} vs {:?}", cols[q]);
            }
            // Whole-frame error is small too.
            let mad: f64 = f.rgb.iter().zip(&frames[k as usize].rgb).map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs()).sum::<f64>()
                / f.rgb.len() as f64;
            assert!(mad < 6.0, "frame {k}: mean abs difference {mad}");
        }
        assert!(decode_frame(&path, 5).unwrap_err().contains("5 frames"));
        // 5 frames at 4 fps last 1.25 s (each frame, the last included, lasts 1/fps).
        let secs = ffmpeg_next::format::input(&path).unwrap().duration() as f64 / 1e6;
        assert!((secs - 1.25).abs() < 0.01, "duration {secs} s");
    }

    #[cfg(feature = "video")]
    #[test]
    fn odd_frames_are_padded_to_even() {
        let run = tempfile::tempdir().unwrap();
        let frames: Vec<Frame> = (0..5).map(|k| quadrants(k + 1, 35, 21, k as u8)).collect();
        let (path, _) = encode(run.path(), "odd.mp4", frames, 0);
        let info = probe(&path).unwrap();
        assert_eq!(info, VideoInfo { frames: 5, width: 36, height: 22, codec: "h264".into() });
        let f = decode_frame(&path, 3).unwrap();
        let cols = quad_colours(3);
        // Padding repeats the last column and row: bottom-right quadrant colour.
        for (x, y) in [(30, 18), (35, 18), (30, 21), (35, 21)] {
            assert!(close(pixel(&f, x, y), cols[3], 10), "({x}, {y}): {:?}", pixel(&f, x, y));
        }
        assert!(close(pixel(&f, 5, 4), cols[0], 12), "{:?}", pixel(&f, 5, 4));
    }

    #[cfg(feature = "video")]
    #[test]
    fn hold_last_and_resized_frames() {
        let run = tempfile::tempdir().unwrap();
        let frames = vec![quadrants(1, 64, 48, 0), quadrants(2, 100, 30, 1), quadrants(3, 64, 48, 2)];
        let (path, bus) = encode(run.path(), "hold.mp4", frames, 3);
        let warnings: Vec<&String> = bus
            .iter()
            .filter_map(|m| match m {
                BusMessage::Warning { msg, .. } => Some(msg),
                _ => None,
            })
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("100×30") && warnings[0].contains("scaled"));
        let info = probe(&path).unwrap();
        assert_eq!((info.frames, info.width, info.height), (6, 64, 48));
        let last = decode_frame(&path, 5).unwrap();
        assert!(close(pixel(&last, 10, 10), quad_colours(2)[0], 10));
    }

    #[cfg(feature = "video")]
    #[test]
    fn input_dropped_midway_still_finalises() {
        let run = tempfile::tempdir().unwrap();
        let mut h = start(build(&VideoConfig::default(), run.path()).unwrap());
        let tx = h.tx.take().unwrap();
        for k in 0..3 {
            tx.send(Item::Frame(quadrants(k, 128, 96, k as u8))).unwrap();
        }
        // The upstream goes away without ever ending its stream properly.
        drop(tx);
        h.handle.join().unwrap().unwrap();
        let path = run.path().join("progress.mp4");
        assert_eq!(wrote(&h.bus), vec![path.clone()]);
        assert_eq!(probe(&path).unwrap().frames, 3);
        assert!(!run.path().join("progress.mp4.partial").exists());
    }

    #[cfg(feature = "video")]
    #[test]
    fn abort_and_errors_still_finalise() {
        // Abort while the upstream is still connected (held frames are skipped then).
        let run = tempfile::tempdir().unwrap();
        let cfg = VideoConfig { hold_last: 5, ..Default::default() };
        let mut h = start(build(&cfg, run.path()).unwrap());
        let tx = h.tx.take().unwrap();
        for k in 0..2 {
            tx.send(Item::Frame(quadrants(k, 64, 64, 0))).unwrap();
        }
        // Wait until both frames are taken (the link holds 2) before aborting.
        while !tx.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        h.abort.store(true, Ordering::Relaxed);
        h.handle.join().unwrap().unwrap();
        drop(tx);
        assert_eq!(probe(&run.path().join("progress.mp4")).unwrap().frames, 2);

        // A wrong item: an error naming the stage and kinds, and a finalised video.
        let run = tempfile::tempdir().unwrap();
        let mut h = start(build(&VideoConfig::default(), run.path()).unwrap());
        let tx = h.tx.take().unwrap();
        tx.send(Item::Frame(quadrants(1, 64, 64, 0))).unwrap();
        let batch = HostBatch { index: 0, epoch: 0, next_pos: 1, shape: [1, 1, 1, 1], x: vec![0.0], x_hat: None };
        tx.send(Item::Batch(batch)).unwrap();
        let e = h.handle.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("video") && e.contains("`frame`") && e.contains("`batch`"), "{e}");
        assert_eq!(probe(&run.path().join("progress.mp4")).unwrap().frames, 1);

        // A malformed frame.
        let run = tempfile::tempdir().unwrap();
        let mut h = start(build(&VideoConfig::default(), run.path()).unwrap());
        let tx = h.tx.take().unwrap();
        tx.send(Item::Frame(quadrants(1, 64, 64, 0))).unwrap();
        tx.send(Item::Frame(Frame { step: 7, width: 4, height: 4, rgb: vec![0; 3] })).unwrap();
        let e = h.handle.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("step 7"), "{e}");
        assert_eq!(probe(&run.path().join("progress.mp4")).unwrap().frames, 1);
    }

    #[cfg(feature = "video")]
    #[test]
    fn no_frames_no_file_and_probe_errors_name_the_file() {
        let run = tempfile::tempdir().unwrap();
        let (path, bus) = encode(run.path(), "none.mp4", vec![], 0);
        assert!(!path.exists());
        assert!(bus.iter().any(|m| matches!(m, BusMessage::Warning { msg, .. } if msg.contains("no frames"))));
        let e = probe(&path).unwrap_err();
        assert!(e.contains("none.mp4"), "{e}");
        let junk = run.path().join("junk.mp4");
        std::fs::write(&junk, b"not a video at all").unwrap();
        assert!(probe(&junk).unwrap_err().contains("junk.mp4"));
        assert!(decode_frame(&junk, 0).unwrap_err().contains("junk.mp4"));
    }

    #[cfg(feature = "video")]
    #[test]
    fn dropping_a_writer_finalises_it() {
        // The drop guard (what runs if the stage thread panics).
        let run = tempfile::tempdir().unwrap();
        let path = run.path().join("p.mp4");
        let partial = partial_path(&path);
        let first = quadrants(1, 32, 32, 0);
        let mut w = enc::Mp4Writer::create(&partial, &path, &VideoConfig::default(), &first).unwrap();
        w.push(&first).unwrap();
        w.push(&quadrants(2, 32, 32, 1)).unwrap();
        drop(w);
        assert_eq!(probe(&path).unwrap().frames, 2);
        assert!(!partial.exists());
    }
}
