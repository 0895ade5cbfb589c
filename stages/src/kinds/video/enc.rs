//! The H.264 encoder and decoder of the video stage, through FFmpeg (the `video` feature).

use super::{VideoConfig, VideoError, VideoInfo};
use crate::core::item::Frame;
use ff::format::Pixel;
use ff::software::scaling::{context::Context as Scaler, flag::Flags as ScaleFlags};
use ff::{codec, encoder, format, frame, Dictionary, Packet, Rational};
use ffmpeg_next as ff;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// An FFmpeg error `e` of the call `what` (`cannot write the MP4 header`).
fn ffmpeg(what: &'static str) -> impl FnOnce(ff::Error) -> VideoError {
    move |source| VideoError::Ffmpeg { what, source }
}

/// Initialises FFmpeg once and silences its logging below errors.
pub(super) fn init() -> Result<(), VideoError> {
    static INIT: OnceLock<Result<(), ff::Error>> = OnceLock::new();
    (*INIT.get_or_init(|| {
        ff::init()?;
        ff::util::log::set_level(ff::util::log::Level::Error);
        Ok(())
    }))
    .map_err(ffmpeg("FFmpeg failed to start"))
}

/// Checks that FFmpeg starts and has the libx264 encoder.
pub(super) fn check_encoder() -> Result<(), VideoError> {
    init()?;
    x264().map(|_| ())
}

fn x264() -> Result<ff::Codec, VideoError> {
    encoder::find_by_name("libx264").ok_or(VideoError::NoX264)
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
    pub(super) fn create(partial: &Path, path: &Path, cfg: &VideoConfig, first: &Frame) -> Result<Self, VideoError> {
        init()?;
        let w = Self::open(partial, path, cfg, first);
        if w.is_err() {
            let _ = std::fs::remove_file(partial);
        }
        w
    }

    fn open(partial: &Path, path: &Path, cfg: &VideoConfig, first: &Frame) -> Result<Self, VideoError> {
        let (width, height) = (even(first.width), even(first.height));
        let fps = i32::try_from(cfg.fps).map_err(|_| VideoError::Fps(cfg.fps))?;
        let enc_tb = Rational(1, fps);
        let codec = x264()?;
        let mut octx = format::output_as(partial, "mp4").map_err(ffmpeg("cannot create the video file"))?;
        let global_header = octx.format().flags().contains(format::Flags::GLOBAL_HEADER);
        let mut enc = codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()
            .map_err(ffmpeg("cannot set up the H.264 encoder"))?;
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
        let encoder = enc.open_with(opts).map_err(|source| VideoError::OpenEncoder { width, height, source })?;
        {
            let mut ost = octx.add_stream(codec).map_err(ffmpeg("cannot add a video stream"))?;
            ost.set_parameters(&encoder);
            ost.set_time_base(enc_tb);
            ost.set_avg_frame_rate(Rational(fps, 1));
            ost.set_rate(Rational(fps, 1));
        }
        let mut mux_opts = Dictionary::new();
        mux_opts.set("movflags", "+faststart");
        octx.write_header_with(mux_opts).map_err(ffmpeg("cannot write the MP4 header"))?;
        let ost_tb = octx.stream(0).map(|s| s.time_base()).ok_or(VideoError::NoStream)?;
        let scaler =
            Scaler::get(Pixel::RGB24, width, height, Pixel::YUV420P, width, height, ScaleFlags::BILINEAR | ScaleFlags::ACCURATE_RND)
                .map_err(ffmpeg("cannot set up the RGB→YUV converter"))?;
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
    pub(super) fn push(&mut self, f: &Frame) -> Result<bool, VideoError> {
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
                .map_err(|source| VideoError::Scaler { width: f.width, height: f.height, source })?;
                self.other = Some((f.width, f.height, s));
            }
            if let Some((_, _, s)) = &mut self.other {
                s.run(&rgb, &mut yuv).map_err(ffmpeg("cannot convert a frame to YUV"))?;
            }
        } else {
            let mut rgb = frame::Video::new(Pixel::RGB24, self.width, self.height);
            fill_rgb(&mut rgb, f);
            self.scaler.run(&rgb, &mut yuv).map_err(ffmpeg("cannot convert a frame to YUV"))?;
        }
        yuv.set_color_space(ff::color::Space::SMPTE170M);
        yuv.set_color_range(ff::color::Range::MPEG);
        self.send(&mut yuv)?;
        self.last = Some(yuv);
        Ok(scaled)
    }

    fn send(&mut self, yuv: &mut frame::Video) -> Result<(), VideoError> {
        yuv.set_pts(Some(self.pts));
        self.pts += 1;
        self.encoder.send_frame(yuv).map_err(|source| VideoError::Refused { frame: self.pts - 1, source })?;
        self.write_packets()
    }

    fn write_packets(&mut self) -> Result<(), VideoError> {
        let Some(octx) = self.octx.as_mut() else {
            return Err(VideoError::Closed);
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
                    pkt.write_interleaved(octx).map_err(ffmpeg("cannot write to the video file"))?;
                }
                Err(ff::Error::Other { errno: ff::util::error::EAGAIN }) | Err(ff::Error::Eof) => return Ok(()),
                Err(e) => return Err(ffmpeg("the H.264 encoder failed")(e)),
            }
        }
    }

    /// Appends `hold_last` copies of the last frame (if `hold`), flushes the encoder,
    /// writes the MP4 trailer, closes the file and renames `<path>.partial` to `<path>`.
    /// Idempotent.
    pub(super) fn finish(&mut self, hold: bool) -> Result<(), VideoError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let mut first_err: Option<VideoError> = None;
        if let Some(mut last) = self.last.take() {
            for _ in 0..if hold { self.hold_last } else { 0 } {
                if let Err(e) = self.send(&mut last) {
                    first_err.get_or_insert(e);
                    break;
                }
            }
        }
        if let Err(e) = self.encoder.send_eof() {
            first_err.get_or_insert(ffmpeg("cannot flush the H.264 encoder")(e));
        } else if let Err(e) = self.write_packets() {
            first_err.get_or_insert(e);
        }
        match self.octx.as_mut() {
            Some(octx) => {
                if let Err(e) = octx.write_trailer() {
                    first_err.get_or_insert(ffmpeg("cannot write the MP4 trailer")(e));
                }
            }
            None => {
                first_err.get_or_insert(VideoError::Closed);
            }
        }
        // Close the file before renaming it.
        drop(self.octx.take());
        if let Some(e) = first_err {
            return Err(e);
        }
        std::fs::rename(&self.partial, &self.path).map_err(|source| VideoError::Rename { path: self.path.clone(), source })
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
    mut each: impl FnMut(&frame::Video, &ff::decoder::Video) -> Result<bool, VideoError>,
) -> Result<(String, u32, u32), VideoError> {
    init()?;
    let mut ictx = format::input(&path).map_err(|source| VideoError::Open { path: path.to_path_buf(), source })?;
    let (index, params) = {
        let st = ictx.streams().best(ff::media::Type::Video).ok_or_else(|| VideoError::NoVideoStream(path.to_path_buf()))?;
        (st.index(), st.parameters())
    };
    let codec = params.id().name().to_string();
    let mut decoder = codec::context::Context::from_parameters(params)
        .and_then(|c| c.decoder().video())
        .map_err(|source| VideoError::Decoder { path: path.to_path_buf(), codec: codec.clone(), source })?;
    let failed = |source| VideoError::Decode { path: path.to_path_buf(), source };
    let mut decoded = frame::Video::empty();
    let mut going = true;
    let mut receive = |decoder: &mut ff::decoder::Video, going: &mut bool| -> Result<(), VideoError> {
        while *going {
            match decoder.receive_frame(&mut decoded) {
                Ok(()) => *going = each(&decoded, decoder)?,
                Err(ff::Error::Other { errno: ff::util::error::EAGAIN }) | Err(ff::Error::Eof) => break,
                Err(e) => return Err(failed(e)),
            }
        }
        Ok(())
    };
    for (stream, packet) in ictx.packets() {
        if stream.index() != index {
            continue;
        }
        decoder.send_packet(&packet).map_err(failed)?;
        receive(&mut decoder, &mut going)?;
        if !going {
            break;
        }
    }
    if going {
        decoder.send_eof().map_err(failed)?;
        receive(&mut decoder, &mut going)?;
    }
    Ok((codec, decoder.width(), decoder.height()))
}

/// Reads a video file and counts its frames by decoding them all (frame counts from the
/// container's metadata are not trusted).
///
/// Errors, each naming the file: the file cannot be opened ([`VideoError::Open`]) or has no
/// video stream ([`VideoError::NoVideoStream`]), no decoder for its codec
/// ([`VideoError::Decoder`]), or decoding fails ([`VideoError::Decode`]).
pub fn probe(path: &Path) -> Result<VideoInfo, VideoError> {
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
/// Errors, each naming the file: as [`probe`]; an `index` past the last frame
/// ([`VideoError::NoSuchFrame`]); a frame that cannot be converted to RGB
/// ([`VideoError::InFile`]).
pub fn decode_frame(path: &Path, index: u64) -> Result<Frame, VideoError> {
    let mut n = 0u64;
    let mut out: Option<Frame> = None;
    decode_each(path, |f, _| {
        if n == index {
            out = Some(to_rgb(f).map_err(|e| e.in_file(path))?);
            return Ok(false);
        }
        n += 1;
        Ok(true)
    })?;
    let mut frame = out.ok_or_else(|| VideoError::NoSuchFrame { path: path.to_path_buf(), frames: n, index })?;
    frame.step = index;
    Ok(frame)
}

fn to_rgb(f: &frame::Video) -> Result<Frame, VideoError> {
    let (w, h) = (f.width(), f.height());
    let mut s = Scaler::get(f.format(), w, h, Pixel::RGB24, w, h, ScaleFlags::BILINEAR | ScaleFlags::ACCURATE_RND)
        .map_err(ffmpeg("cannot set up a YUV→RGB converter"))?;
    let mut rgb = frame::Video::empty();
    s.run(f, &mut rgb).map_err(ffmpeg("cannot convert a frame to RGB"))?;
    let stride = rgb.stride(0);
    let data = rgb.data(0);
    let row = w as usize * 3;
    let mut out = Vec::with_capacity(row * h as usize);
    for y in 0..h as usize {
        out.extend_from_slice(&data[y * stride..y * stride + row]);
    }
    Ok(Frame { step: 0, width: w, height: h, rgb: out })
}
