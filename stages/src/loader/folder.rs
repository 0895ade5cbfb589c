//! The image-folder loader: every png, jpg, jpeg, gif, webp and bmp file under a folder.
//!
//! The folder is listed (recursively, following symbolic links) when the stage is built; the
//! images are decoded while it runs, by a pool of worker threads, a few batches ahead of the
//! batch being assembled. Each image is composited onto a background colour (transparent
//! pixels become the background), converted to grey or kept RGB, and resized to a
//! `size`×`size` square keeping its aspect ratio (padded or cropped). Batches have shape
//! `[B, C, size, size]` with C = 1 (Grey) or 3 (Rgb), values in [-1, 1].
//!
//! The batch contents depend only on the file listing, the seed and the configuration, never
//! on thread timing: results are reassembled in the order the files were scheduled.
//!
//! Files that cannot be decoded are skipped with a warning (or stop the run, with
//! `on_bad_file: Fail`); a file found bad once is not tried again in later epochs of the same
//! run. A run resumed from a saved position (see [resuming](super#resuming)) neither reads
//! nor decodes the files before that position, so it does not know which of them were bad.

use super::{check_batch, check_start, epoch_order, DataPosition, Emitter, Flow, DEFAULT_BATCH};
use crate::stage::{Stage, StageContext, StageError};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageBuffer, ImageDecoder, ImageReader, Limits, Pixel};
use image::{RgbImage, RgbaImage};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// File extensions (compared case-insensitively) the loader picks up.
pub const EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "gif", "webp", "bmp"];

/// Colour channels of the output images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Channels {
    /// One channel: luma of the composited RGB image, as `image`'s `to_luma8` computes it.
    Grey,
    /// Three channels, R, G, B (default).
    #[default]
    Rgb,
}

impl Channels {
    /// Number of channels, 1 or 3.
    pub fn count(self) -> usize {
        match self {
            Channels::Grey => 1,
            Channels::Rgb => 3,
        }
    }
}

/// How a non-square image is made square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Fit {
    /// Scale to fit inside the square and pad the rest with the background colour, centred
    /// (default). Nothing of the image is lost.
    #[default]
    Pad,
    /// Scale to cover the square and cut off what sticks out, centred.
    Crop,
}

/// What to do with a file that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub enum OnBadFile {
    /// Warn on the bus, naming the file and the reason, and go on with the next file
    /// (default). A summary warning at the end gives the count.
    #[default]
    Skip,
    /// Stop the run with an error naming the file.
    Fail,
}

/// Configuration of the image-folder loader (the `folder` stage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FolderLoaderConfig {
    /// Folder searched recursively for images (default: empty path, which must be set).
    pub root: PathBuf,
    /// Side of the square output images, in pixels (default 64).
    pub size: u32,
    /// Grey (1 channel) or Rgb (3 channels) output (default `Rgb`).
    pub channels: Channels,
    /// `Pad` (fit inside, pad with `background`) or `Crop` (cover, centre-crop); default `Pad`.
    pub fit: Fit,
    /// Background colour, RGB u8: transparent pixels are composited onto it and `Pad` fills
    /// with it (default `(255, 255, 255)`, white).
    pub background: [u8; 3],
    /// Decoding threads; 0 = the number of CPUs (default 0). At least one is used.
    pub workers: usize,
    /// Images whose declared width × height exceeds this many pixels are refused before any
    /// pixel memory is allocated (default 67 108 864 = 64 Mi pixels).
    pub max_pixels: u64,
    /// `Skip` (warn and go on) or `Fail` (stop with an error) on unreadable files; default
    /// `Skip`.
    pub on_bad_file: OnBadFile,
    /// Images per batch (default 64).
    pub batch: usize,
    /// Number of passes over the data; `None` = endless (default `None`).
    pub epochs: Option<u32>,
    /// Only emit full batches: the images left over at the end of an epoch are dropped
    /// (default `true`). With `false` the last batch of an epoch may be smaller.
    pub drop_last: bool,
    /// Visit the files in a fresh seeded random order each epoch (default `true`); otherwise
    /// in sorted path order.
    pub shuffle: bool,
    /// Keep the decoded images in memory (u8, as they go into batches) when all of them take
    /// at most this many MiB, so that each file is read and decoded once, in the first epoch
    /// (default 2048; 0 = decode every epoch). Unreadable files are remembered as such.
    pub cache_mib: u64,
}

/// Default for [`FolderLoaderConfig::max_pixels`]: 64 Mi pixels.
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;

impl Default for FolderLoaderConfig {
    fn default() -> Self {
        FolderLoaderConfig {
            root: PathBuf::new(),
            size: 64,
            channels: Channels::Rgb,
            fit: Fit::Pad,
            background: [255, 255, 255],
            workers: 0,
            max_pixels: DEFAULT_MAX_PIXELS,
            on_bad_file: OnBadFile::Skip,
            batch: DEFAULT_BATCH,
            epochs: None,
            drop_last: true,
            shuffle: true,
            cache_mib: 2048,
        }
    }
}

/// How [`decode`] turns a file into a square image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Side of the output square, pixels (≥ 1).
    pub size: u32,
    /// Grey or RGB output.
    pub channels: Channels,
    /// Pad or crop to make it square.
    pub fit: Fit,
    /// Background RGB for transparency and padding.
    pub background: [u8; 3],
    /// Largest accepted declared width × height.
    pub max_pixels: u64,
}

impl From<&FolderLoaderConfig> for DecodeOptions {
    fn from(c: &FolderLoaderConfig) -> Self {
        DecodeOptions { size: c.size, channels: c.channels, fit: c.fit, background: c.background, max_pixels: c.max_pixels }
    }
}

/// Read an image file (format guessed from its content, then its extension) as straight-alpha
/// RGBA8, turned upright by its EXIF orientation if it has one. GIF and animated WebP give
/// their first frame; 16-bit images are rounded to 8 bits; CMYK JPEGs are converted to RGB.
fn read_rgba(path: &Path, max_pixels: u64) -> Result<RgbaImage, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() == 0 {
        return Err("empty file (0 bytes)".into());
    }
    let reader =
        ImageReader::open(path).map_err(|e| format!("cannot open: {e}"))?.with_guessed_format().map_err(|e| format!("cannot read: {e}"))?;
    let mut reader = reader;
    if reader.format().is_none() {
        return Err("not a recognised image format".into());
    }
    let mut limits = Limits::default();
    // Room for the decoded image at up to 8 bytes a pixel (RGBA16) plus decoder buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| format!("cannot decode: {e}"))?;
    // EXIF orientation (JPEG, WebP, TIFF): how the camera held the picture.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(format!("image has no pixels ({w}×{h})"));
    }
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(format!("image is {w}×{h} = {pixels} pixels, more than max_pixels = {max_pixels}"));
    }
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| format!("cannot decode: {e}"))?;
    img.apply_orientation(orientation);
    Ok(img.into_rgba8())
}

/// Composite straight-alpha RGBA onto an opaque background: `c·a + bg·(1 − a)`, rounded.
fn composite(img: &RgbaImage, bg: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    for p in img.pixels() {
        let a = p[3] as u32;
        match a {
            255 => out.extend_from_slice(&p.0[..3]),
            0 => out.extend_from_slice(&bg),
            _ => {
                for c in 0..3 {
                    let v = p[c] as u32 * a + bg[c] as u32 * (255 - a);
                    out.push(((v + 127) / 255) as u8);
                }
            }
        }
    }
    // The length is exactly w·h·3 by construction.
    RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h))
}

/// Make `img` a `size`×`size` square: `Pad` scales it to fit and centres it on `bg`, `Crop`
/// cuts the centred square of side min(w, h) and scales that. No resampling when the size is
/// already right.
fn fit_square<P>(img: ImageBuffer<P, Vec<u8>>, size: u32, fit: Fit, bg: P) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = img.dimensions();
    if w == size && h == size {
        return img;
    }
    let filter = FilterType::CatmullRom;
    match fit {
        Fit::Crop => {
            let side = w.min(h);
            let (x0, y0) = ((w - side) / 2, (h - side) / 2);
            let square = image::imageops::crop_imm(&img, x0, y0, side, side).to_image();
            if side == size {
                square
            } else {
                image::imageops::resize(&square, size, size, filter)
            }
        }
        Fit::Pad => {
            let long = w.max(h) as u64;
            let scaled = |d: u32| -> u32 { (((d as u64 * size as u64 * 2 + long) / (2 * long)) as u32).clamp(1, size) };
            let (nw, nh) = (scaled(w), scaled(h));
            let inner = if (nw, nh) == (w, h) { img } else { image::imageops::resize(&img, nw, nh, filter) };
            let mut canvas = ImageBuffer::from_pixel(size, size, bg);
            let (x0, y0) = ((size - nw) / 2, (size - nh) / 2);
            image::imageops::replace(&mut canvas, &inner, x0 as i64, y0 as i64);
            canvas
        }
    }
}

/// Decode one image file into a `size`×`size` square, CHW u8 (`channels · size · size` bytes:
/// plane R, then G, then B; or one grey plane).
///
/// Steps: read (format guessed from the content; EXIF orientation applied; GIF → first frame;
/// 16-bit → 8-bit; CMYK → RGB),
/// composite onto `background` (straight alpha), convert to grey if asked (`image`'s
/// `to_luma8`), then pad or crop to the square (Catmull-Rom resampling, none when the image
/// already has the right size).
///
/// Errors (as a message without the path): the file cannot be read, is empty, is not a
/// recognised image, is corrupt or truncated, or declares more than `max_pixels` pixels.
pub fn decode(path: &Path, opts: &DecodeOptions) -> Result<Vec<u8>, String> {
    if opts.size == 0 {
        return Err("size must be at least 1".into());
    }
    let rgba = read_rgba(path, opts.max_pixels)?;
    let rgb = composite(&rgba, opts.background);
    drop(rgba);
    match opts.channels {
        Channels::Grey => {
            let grey: GrayImage = DynamicImage::ImageRgb8(rgb).to_luma8();
            let bg = image::Rgb(opts.background).to_luma();
            Ok(fit_square(grey, opts.size, opts.fit, bg).into_raw())
        }
        Channels::Rgb => {
            let sq = fit_square(rgb, opts.size, opts.fit, image::Rgb(opts.background));
            let plane = opts.size as usize * opts.size as usize;
            let mut chw = vec![0u8; 3 * plane];
            for (i, px) in sq.as_raw().chunks_exact(3).enumerate() {
                chw[i] = px[0];
                chw[plane + i] = px[1];
                chw[2 * plane + i] = px[2];
            }
            Ok(chw)
        }
    }
}

/// True when `path` has one of the [`EXTENSIONS`] (case-insensitive).
fn has_image_extension(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// List the image files under `root`, recursively, following symbolic links, sorted by path.
/// Returns the files and the warnings for entries that could not be read (a symlink loop, a
/// folder without permission).
///
/// Errors when `root` is not a folder or holds no image file.
pub fn list_images(root: &Path) -> Result<(Vec<PathBuf>, Vec<String>), StageError> {
    if root.as_os_str().is_empty() {
        return Err(StageError::msg("folder loader: `root` is not set (the folder of images)"));
    }
    if !root.is_dir() {
        let msg = if root.exists() { "not a folder" } else { "no such folder" };
        return Err(StageError::file(root, msg));
    }
    let mut files = Vec::new();
    let mut warnings = Vec::new();
    // Hidden files and folders (".thumbs/", macOS "._x.png" resource forks) are not images.
    let visible = |e: &walkdir::DirEntry| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.');
    for entry in walkdir::WalkDir::new(root).follow_links(true).into_iter().filter_entry(visible) {
        match entry {
            Ok(e) => {
                if e.file_type().is_file() && has_image_extension(e.path()) {
                    files.push(e.into_path());
                }
            }
            Err(e) => warnings.push(format!("skipping part of {}: {e}", root.display())),
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(StageError::msg(format!("no images ({}) found under {}", EXTENSIONS.join(", "), root.display())));
    }
    Ok((files, warnings))
}

/// Image shape `[C, size, size]` a config produces, without touching the disk.
pub fn shape_of(cfg: &FolderLoaderConfig) -> [usize; 3] {
    [cfg.channels.count(), cfg.size as usize, cfg.size as usize]
}

/// Bad files warned about one by one before the loader only counts them.
pub const MAX_LISTED_BAD: usize = 20;

/// The image-folder loader stage.
#[derive(Debug)]
pub struct FolderLoader {
    root: PathBuf,
    files: Arc<Vec<PathBuf>>,
    walk_warnings: Vec<String>,
    opts: DecodeOptions,
    workers: usize,
    on_bad_file: OnBadFile,
    batch: usize,
    epochs: Option<u32>,
    drop_last: bool,
    shuffle: bool,
    seed: u64,
    max_batches: Option<u64>,
    start: DataPosition,
    /// Decoded images by file index, when the whole set fits in `cache_mib`.
    cache: Option<Arc<Vec<OnceLock<Decoded>>>>,
}

/// List the images of `cfg`, ready to run from position `start` ([`DataPosition::default()`]
/// for the beginning; see [resuming](super#resuming)). Decoding happens in `run`, and starts
/// at `start`: the files before it are not read.
///
/// `seed` drives the per-epoch shuffling; `max_batches` (if set) stops the loader once the
/// batch index reaches it (an absolute count: `start.next_index` batches are taken as done).
/// Errors: `root` is not a folder, holds no image files, `size`, `batch` or `max_pixels` is 0,
/// `drop_last` is set and there are fewer files than one batch, or `start.pos` is past the
/// number of files ("cannot resume at image …", naming `root`). Unreadable parts of the tree
/// are reported as warnings when the stage runs.
pub fn build(cfg: &FolderLoaderConfig, seed: u64, max_batches: Option<u64>, start: DataPosition) -> Result<FolderLoader, StageError> {
    if cfg.size == 0 {
        return Err(StageError::msg("folder loader: size must be at least 1"));
    }
    if cfg.max_pixels == 0 {
        return Err(StageError::msg("folder loader: max_pixels must be at least 1"));
    }
    let (files, walk_warnings) = list_images(&cfg.root)?;
    check_batch(&cfg.root, files.len(), cfg.batch, cfg.drop_last)?;
    check_start(&cfg.root, files.len(), &start)?;
    let workers = if cfg.workers == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { cfg.workers };
    let image_bytes = cfg.channels.count() as u64 * cfg.size as u64 * cfg.size as u64;
    let fits = (files.len() as u64).saturating_mul(image_bytes) <= cfg.cache_mib.saturating_mul(1 << 20);
    let cache = fits.then(|| Arc::new((0..files.len()).map(|_| OnceLock::new()).collect()));
    Ok(FolderLoader {
        root: cfg.root.clone(),
        files: Arc::new(files),
        walk_warnings,
        opts: DecodeOptions::from(cfg),
        workers: workers.max(1),
        on_bad_file: cfg.on_bad_file,
        batch: cfg.batch,
        epochs: cfg.epochs,
        drop_last: cfg.drop_last,
        shuffle: cfg.shuffle,
        seed,
        max_batches,
        start,
        cache,
    })
}

impl FolderLoader {
    /// Shape of one output image, `[C, size, size]` with C = 1 (Grey) or 3 (Rgb).
    pub fn image_shape(&self) -> [usize; 3] {
        let s = self.opts.size as usize;
        [self.opts.channels.count(), s, s]
    }

    /// Number of image files found (some may turn out unreadable when decoded).
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when no files were found (never, for a built loader).
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The image files, sorted.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Number of decoding threads the loader will start.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Whether decoded images are kept in memory (the set fits in `cache_mib`).
    pub fn caches(&self) -> bool {
        self.cache.is_some()
    }
}

/// A decode result: CHW bytes, or why the file could not be decoded.
type Decoded = Result<Vec<u8>, String>;

/// Decoding threads. Jobs are `(sequence number, file index)`; results come back tagged with
/// the sequence number, in any order. Dropping the pool stops and joins the threads.
struct Pool {
    jobs: Option<Sender<(u64, usize)>>,
    results: Receiver<(u64, Decoded)>,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    /// With `cache`, a file decoded once is served from memory after that.
    fn start(
        workers: usize,
        files: Arc<Vec<PathBuf>>,
        opts: DecodeOptions,
        cache: Option<Arc<Vec<OnceLock<Decoded>>>>,
    ) -> Result<Pool, StageError> {
        let (jtx, jrx) = crossbeam_channel::unbounded::<(u64, usize)>();
        let (rtx, rrx) = crossbeam_channel::unbounded::<(u64, Decoded)>();
        let stop = Arc::new(AtomicBool::new(false));
        let mut pool = Pool { jobs: Some(jtx), results: rrx, stop: stop.clone(), handles: vec![] };
        for i in 0..workers {
            let (jrx, rtx, stop, files, cache) = (jrx.clone(), rtx.clone(), stop.clone(), files.clone(), cache.clone());
            let handle = std::thread::Builder::new()
                .name(format!("loader-decode-{i}"))
                .spawn(move || {
                    while let Ok((seq, idx)) = jrx.recv() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let path = &files[idx];
                        let fresh = || {
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(path, &opts)))
                                .unwrap_or_else(|_| Err("the image decoder panicked".into()))
                        };
                        let r = match &cache {
                            Some(c) => c[idx].get_or_init(fresh).clone(),
                            None => fresh(),
                        };
                        if rtx.send((seq, r)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| StageError::msg(format!("cannot start a decoding thread: {e}")))?;
            pool.handles.push(handle);
        }
        Ok(pool)
    }

    fn submit(&self, seq: u64, idx: usize) {
        if let Some(j) = &self.jobs {
            // The workers hold the receiver until the pool is dropped.
            let _ = j.send((seq, idx));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Yields `(epoch, position in the epoch's order, file index)` for every scheduled file, epoch
/// after epoch, from a start position on.
struct Schedule {
    n: usize,
    seed: u64,
    shuffle: bool,
    epochs: Option<u32>,
    epoch: u32,
    /// The order of `epoch`, drawn when the first of its files is asked for.
    order: Option<Vec<usize>>,
    /// Position in `order` of the next file.
    pos: usize,
}

impl Schedule {
    /// The files of `n`, from position `start.pos` of epoch `start.epoch` on.
    fn new(n: usize, seed: u64, shuffle: bool, epochs: Option<u32>, start: DataPosition) -> Self {
        let pos = usize::try_from(start.pos).unwrap_or(usize::MAX);
        Schedule { n, seed, shuffle, epochs, epoch: start.epoch, order: None, pos }
    }
}

impl Iterator for Schedule {
    type Item = (u32, usize, usize);
    fn next(&mut self) -> Option<(u32, usize, usize)> {
        if self.pos >= self.n {
            // The epoch is over (or the start was at its very end): go on with the next one.
            self.epoch = self.epoch.checked_add(1)?;
            self.order = None;
            self.pos = 0;
        }
        if self.epochs.is_some_and(|e| self.epoch >= e) {
            return None;
        }
        let order = self.order.get_or_insert_with(|| epoch_order(self.n, self.seed, self.epoch, self.shuffle));
        let idx = *order.get(self.pos)?;
        self.pos += 1;
        Some((self.epoch, self.pos - 1, idx))
    }
}

/// One scheduled file awaiting (or holding) its decode result.
struct Slot {
    epoch: u32,
    /// Position of the file in the epoch's order.
    pos: usize,
    idx: usize,
    result: Option<Decoded>,
}

/// Per-epoch counts, to detect an epoch that could not make a single batch.
#[derive(Default)]
struct EpochTally {
    good: usize,
    batches: usize,
    /// The epoch was entered part way (a resumed run's first epoch): it need not make a batch.
    partial: bool,
}

impl FolderLoader {
    /// Batches the run, given a started pool. `skipped` collects the files found bad.
    fn drive(&self, ctx: &StageContext, pool: &Pool, skipped: &mut Vec<PathBuf>) -> Result<(), StageError> {
        let mut emitter = Emitter::new(self.start.next_index, self.max_batches);
        let img_len = self.image_shape().iter().product::<usize>();
        let [c, h, w] = self.image_shape();
        let window = (self.batch * 3).max(self.workers * 4);
        let mut bad = vec![false; self.files.len()];
        let mut sched = Schedule::new(self.files.len(), self.seed, self.shuffle, self.epochs, self.start);
        let mut pending: VecDeque<Slot> = VecDeque::with_capacity(window);
        let mut base: u64 = 0; // sequence number of pending[0]
        let mut next_seq: u64 = 0;
        let mut buf: Vec<u8> = Vec::with_capacity(self.batch * img_len);
        let mut in_buf = 0usize;
        let mut epoch: Option<u32> = None;
        let mut tally = EpochTally::default();

        loop {
            if emitter.should_stop(ctx) {
                return Ok(());
            }
            // Keep the window full.
            while pending.len() < window {
                let Some((e, pos, idx)) = sched.next() else { break };
                let result = if bad[idx] {
                    Some(Err(String::new()))
                } else {
                    pool.submit(next_seq, idx);
                    None
                };
                pending.push_back(Slot { epoch: e, pos, idx, result });
                next_seq += 1;
            }
            let Some(front) = pending.front() else { break };
            // Wait for the oldest result, storing the others as they come.
            if front.result.is_none() {
                loop {
                    match pool.results.recv_timeout(Duration::from_millis(100)) {
                        Ok((seq, r)) => {
                            let k = (seq - base) as usize;
                            if let Some(s) = pending.get_mut(k) {
                                s.result = Some(r);
                            }
                            if k == 0 {
                                break;
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            if ctx.draining() {
                                return Ok(());
                            }
                        }
                        Err(RecvTimeoutError::Disconnected) => return Err(StageError::msg("the decoding threads stopped unexpectedly")),
                    }
                }
            }
            let Some(slot) = pending.pop_front() else {
                break;
            };
            base += 1;
            // Epoch boundary: flush and check the epoch that ended.
            if epoch != Some(slot.epoch) {
                if let Some(done) = epoch {
                    if self.finish_epoch(ctx, &mut emitter, done, &mut buf, &mut in_buf, &tally, skipped)? == Flow::Stop {
                        return Ok(());
                    }
                }
                epoch = Some(slot.epoch);
                tally = EpochTally { partial: slot.pos > 0, ..Default::default() };
            }
            match slot.result {
                Some(Ok(px)) => {
                    buf.extend_from_slice(&px);
                    in_buf += 1;
                    tally.good += 1;
                    if in_buf == self.batch {
                        let flow = emitter.emit(ctx, slot.epoch, slot.pos as u64 + 1, [in_buf, c, h, w], &buf);
                        buf.clear();
                        in_buf = 0;
                        tally.batches += 1;
                        if flow == Flow::Stop {
                            return Ok(());
                        }
                    }
                }
                Some(Err(reason)) if !bad[slot.idx] => {
                    bad[slot.idx] = true;
                    let path = &self.files[slot.idx];
                    match self.on_bad_file {
                        OnBadFile::Fail => return Err(StageError::file(path, reason.trim_end())),
                        OnBadFile::Skip => {
                            // One line per file for the first few; after that only the count.
                            if skipped.len() < MAX_LISTED_BAD {
                                ctx.bus.warn(format!("skipping {}: {}", path.display(), reason.trim_end()));
                            } else if skipped.len() == MAX_LISTED_BAD {
                                ctx.bus.warn("more unreadable files: counted, not listed (the total comes at the end)");
                            }
                            skipped.push(path.clone());
                        }
                    }
                }
                // Known bad (already reported), or not decoded: nothing to add.
                Some(Err(_)) | None => {}
            }
        }
        if let Some(done) = epoch {
            self.finish_epoch(ctx, &mut emitter, done, &mut buf, &mut in_buf, &tally, skipped)?;
        }
        Ok(())
    }

    /// End of epoch `epoch`: emit the partial batch (without `drop_last`; its `next_pos` is the
    /// epoch's length, as every file of the epoch was visited), drop it (with), and fail if a
    /// whole epoch could not make a single batch (no epoch ever will). A resumed run's partial
    /// first epoch may make none.
    #[allow(clippy::too_many_arguments)]
    fn finish_epoch(
        &self,
        ctx: &StageContext,
        emitter: &mut Emitter,
        epoch: u32,
        buf: &mut Vec<u8>,
        in_buf: &mut usize,
        tally: &EpochTally,
        skipped: &[PathBuf],
    ) -> Result<Flow, StageError> {
        let mut flow = Flow::Continue;
        let mut batches = tally.batches;
        if *in_buf > 0 && !self.drop_last {
            let [c, h, w] = self.image_shape();
            flow = emitter.emit(ctx, epoch, self.files.len() as u64, [*in_buf, c, h, w], buf);
            batches += 1;
        }
        buf.clear();
        *in_buf = 0;
        if batches == 0 && !tally.partial && flow == Flow::Continue && !emitter.should_stop(ctx) {
            let n = self.files.len();
            return Err(if tally.good == 0 {
                StageError::file(&self.root, format!("none of the {n} image files could be decoded ({})", first_few(skipped)))
            } else {
                StageError::file(
                    &self.root,
                    format!(
                        "only {} of {n} image files could be decoded, fewer than one batch of {} \
                         (set a smaller batch, or drop_last: false)",
                        tally.good, self.batch
                    ),
                )
            });
        }
        Ok(flow)
    }
}

/// "first: a, b, c" for the first three paths.
fn first_few(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().take(3).map(|p| p.display().to_string()).collect();
    format!("first: {}", names.join(", "))
}

impl Stage for FolderLoader {
    /// Decode and emit batches `[B, C, size, size]` in [-1, 1], from the start position on,
    /// until the epochs or `max_batches` are done, the outputs close, or a stop is asked for.
    /// Warns about unreadable parts of the tree and skipped files; fails on a bad file with
    /// `Fail`, or when a whole epoch cannot make a single batch.
    fn run(self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        if self.on_bad_file == OnBadFile::Fail {
            if let Some(w) = self.walk_warnings.first() {
                return Err(StageError::msg(format!("{} (on_bad_file: Fail)", w.replacen("skipping part of", "cannot read part of", 1))));
            }
        }
        for w in &self.walk_warnings {
            ctx.bus.warn(w.clone());
        }
        if self.max_batches.is_some_and(|m| self.start.next_index >= m) || self.epochs.is_some_and(|e| self.start.epoch >= e) {
            return Ok(());
        }
        let pool = Pool::start(self.workers, self.files.clone(), self.opts, self.cache.clone())?;
        let mut skipped = Vec::new();
        let result = self.drive(&ctx, &pool, &mut skipped);
        drop(pool);
        if !skipped.is_empty() {
            let n = skipped.len();
            ctx.bus.warn(format!("skipped {n} unreadable file{} ({})", if n == 1 { "" } else { "s" }, first_few(&skipped)));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::HostBatch;
    use crate::loader::test_util::{assert_resumes_exactly, run_stage, run_stage_taking};
    use image::{ImageFormat, Rgb, Rgba};

    fn opts(size: u32, channels: Channels, fit: Fit) -> DecodeOptions {
        DecodeOptions { size, channels, fit, background: [255, 255, 255], max_pixels: 1 << 20 }
    }

    /// CHW bytes → the RGB triple of pixel (x, y).
    fn px(chw: &[u8], size: u32, x: u32, y: u32) -> [u8; 3] {
        let plane = (size * size) as usize;
        let i = (y * size + x) as usize;
        [chw[i], chw[plane + i], chw[2 * plane + i]]
    }

    fn cfg(root: &Path, batch: usize) -> FolderLoaderConfig {
        FolderLoaderConfig { root: root.to_path_buf(), size: 8, batch, epochs: Some(1), workers: 2, ..Default::default() }
    }

    /// A solid RGB PNG of `w`×`h`.
    fn solid_png(path: &Path, w: u32, h: u32, c: [u8; 3]) {
        RgbImage::from_pixel(w, h, Rgb(c)).save_with_format(path, ImageFormat::Png).unwrap();
    }

    #[test]
    fn rgba_png_transparency_is_composited_onto_background() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        let img = RgbaImage::from_raw(2, 2, vec![255, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255, 128, 0, 255, 0, 255]).unwrap();
        img.save(&p).unwrap();
        let out = decode(&p, &opts(2, Channels::Rgb, Fit::Pad)).unwrap();
        assert_eq!(out.len(), 12);
        assert_eq!(px(&out, 2, 0, 0), [255, 0, 0]);
        assert_eq!(px(&out, 2, 1, 0), [255, 255, 255]);
        // 0·128/255 + 255·127/255 = 127.0 (rounded); blue 255 either way.
        assert_eq!(px(&out, 2, 0, 1), [127, 127, 255]);
        assert_eq!(px(&out, 2, 1, 1), [0, 255, 0]);
        // Another background.
        let o = DecodeOptions { background: [10, 20, 30], ..opts(2, Channels::Rgb, Fit::Pad) };
        assert_eq!(px(&decode(&p, &o).unwrap(), 2, 1, 0), [10, 20, 30]);
    }

    #[test]
    fn palette_png_with_transparent_entry() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pal.png");
        {
            let f = std::fs::File::create(&p).unwrap();
            let mut enc = png::Encoder::new(std::io::BufWriter::new(f), 2, 2);
            enc.set_color(png::ColorType::Indexed);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_palette(vec![10, 20, 30, 0, 0, 0, 200, 100, 0]);
            enc.set_trns(vec![255, 0, 255]);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[0, 1, 2, 1]).unwrap();
        }
        let out = decode(&p, &opts(2, Channels::Rgb, Fit::Pad)).unwrap();
        assert_eq!(px(&out, 2, 0, 0), [10, 20, 30]);
        assert_eq!(px(&out, 2, 1, 0), [255, 255, 255]);
        assert_eq!(px(&out, 2, 0, 1), [200, 100, 0]);
        assert_eq!(px(&out, 2, 1, 1), [255, 255, 255]);
    }

    #[test]
    fn grey_png_as_rgb_and_grey() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.png");
        GrayImage::from_raw(2, 2, vec![0, 50, 100, 255]).unwrap().save(&p).unwrap();
        let rgb = decode(&p, &opts(2, Channels::Rgb, Fit::Pad)).unwrap();
        assert_eq!(rgb, [0, 50, 100, 255].repeat(3));
        let grey = decode(&p, &opts(2, Channels::Grey, Fit::Pad)).unwrap();
        assert_eq!(grey, vec![0, 50, 100, 255]);
        // Colour → grey uses image's luma.
        let q = dir.path().join("c.png");
        solid_png(&q, 2, 2, [255, 0, 0]);
        let expected = DynamicImage::ImageRgb8(RgbImage::from_pixel(1, 1, Rgb([255, 0, 0]))).to_luma8().get_pixel(0, 0)[0];
        assert_eq!(decode(&q, &opts(2, Channels::Grey, Fit::Pad)).unwrap(), vec![expected; 4]);
    }

    #[test]
    fn sixteen_bit_png_is_rounded_to_eight_bits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("16.png");
        let img: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_raw(2, 1, vec![65535, 0, 100 * 257, 128 * 257, 257, 0]).unwrap();
        img.save(&p).unwrap();
        let out = decode(&p, &opts(2, Channels::Rgb, Fit::Pad)).unwrap();
        // 2×1 padded into 2×2: the image is row 0 (offset (2 − 1) / 2 = 0), row 1 background.
        assert_eq!(px(&out, 2, 0, 0), [255, 0, 100]);
        assert_eq!(px(&out, 2, 1, 0), [128, 1, 0]);
        assert_eq!(px(&out, 2, 0, 1), [255, 255, 255]);
        // Grey 16-bit with alpha.
        let q = dir.path().join("la16.png");
        let la: ImageBuffer<image::LumaA<u16>, Vec<u16>> = ImageBuffer::from_raw(1, 1, vec![60 * 257, 65535]).unwrap();
        la.save(&q).unwrap();
        assert_eq!(decode(&q, &opts(1, Channels::Grey, Fit::Pad)).unwrap(), vec![60]);
    }

    #[test]
    fn jpeg_gif_webp_bmp_decode() {
        let dir = tempfile::tempdir().unwrap();
        let c = [200u8, 100, 50];
        let img = RgbImage::from_pixel(8, 8, Rgb(c));
        let near = |out: &[u8]| {
            for (k, chunk) in out.chunks(64).enumerate() {
                for &v in chunk {
                    assert!((v as i32 - c[k] as i32).abs() <= 4, "channel {k}: {v} vs {}", c[k]);
                }
            }
        };
        let jpg = dir.path().join("a.jpg");
        img.save(&jpg).unwrap();
        near(&decode(&jpg, &opts(8, Channels::Rgb, Fit::Pad)).unwrap());
        let bmp = dir.path().join("a.bmp");
        img.save(&bmp).unwrap();
        assert_eq!(decode(&bmp, &opts(8, Channels::Rgb, Fit::Pad)).unwrap()[0], 200);
        let webp = dir.path().join("a.webp");
        DynamicImage::ImageRgb8(img.clone()).to_rgba8().save(&webp).unwrap();
        assert_eq!(decode(&webp, &opts(8, Channels::Rgb, Fit::Pad)).unwrap()[0], 200);
        // A PNG named .jpg: the format comes from the content.
        let lying = dir.path().join("really-png.jpg");
        img.save_with_format(&lying, ImageFormat::Png).unwrap();
        assert_eq!(decode(&lying, &opts(8, Channels::Rgb, Fit::Pad)).unwrap()[0], 200);
        // GIF: the first of two frames.
        let gif = dir.path().join("anim.gif");
        {
            let f = std::fs::File::create(&gif).unwrap();
            let mut enc = image::codecs::gif::GifEncoder::new(f);
            let f1 = RgbaImage::from_pixel(4, 4, Rgba([255, 0, 0, 255]));
            let f2 = RgbaImage::from_pixel(4, 4, Rgba([0, 0, 255, 255]));
            enc.encode_frames(vec![image::Frame::new(f1), image::Frame::new(f2)]).unwrap();
        }
        let out = decode(&gif, &opts(4, Channels::Rgb, Fit::Pad)).unwrap();
        assert_eq!(px(&out, 4, 1, 1), [255, 0, 0]);
    }

    #[test]
    fn non_square_pad_and_crop() {
        let dir = tempfile::tempdir().unwrap();
        // 4×2 red: padded into 4×4, rows 0 and 3 background, rows 1–2 red (no resampling).
        let p = dir.path().join("wide.png");
        solid_png(&p, 4, 2, [255, 0, 0]);
        let o = DecodeOptions { background: [0, 0, 255], ..opts(4, Channels::Rgb, Fit::Pad) };
        let out = decode(&p, &o).unwrap();
        for x in 0..4 {
            assert_eq!(px(&out, 4, x, 0), [0, 0, 255]);
            assert_eq!(px(&out, 4, x, 1), [255, 0, 0]);
            assert_eq!(px(&out, 4, x, 2), [255, 0, 0]);
            assert_eq!(px(&out, 4, x, 3), [0, 0, 255]);
        }
        // 2×16 tall, downscaled to 1×8 inside 8×8: columns 0..3 and 4..7 — centred at x = 3.
        let t = dir.path().join("tall.png");
        solid_png(&t, 2, 16, [0, 255, 0]);
        let out = decode(&t, &opts(8, Channels::Rgb, Fit::Pad)).unwrap();
        for y in 0..8 {
            assert_eq!(px(&out, 8, 0, y), [255, 255, 255]);
            assert_eq!(px(&out, 8, 7, y), [255, 255, 255]);
            let c = px(&out, 8, 3, y);
            assert!(c[0] <= 1 && c[1] >= 254 && c[2] <= 1, "{c:?}");
        }
        // Crop: 6×2 blue | red | green → the centre 2×2 is red.
        let s = dir.path().join("stripes.png");
        let mut img = RgbImage::new(6, 2);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = match x / 2 {
                0 => Rgb([0, 0, 255]),
                1 => Rgb([255, 0, 0]),
                _ => Rgb([0, 255, 0]),
            };
        }
        img.save(&s).unwrap();
        let out = decode(&s, &opts(2, Channels::Rgb, Fit::Crop)).unwrap();
        assert_eq!(out, [255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0]);
        // Crop with resampling: 12×4 → centre 4×4 (red) → 2×2.
        let big = image::imageops::resize(&img, 12, 4, FilterType::Nearest);
        let b = dir.path().join("stripes-big.png");
        big.save(&b).unwrap();
        let out = decode(&b, &opts(2, Channels::Rgb, Fit::Crop)).unwrap();
        assert!(out[..4].iter().all(|&v| v >= 250), "{out:?}");
        assert!(out[4..].iter().all(|&v| v <= 5), "{out:?}");
    }

    #[test]
    fn bad_files_and_limits_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(4, Channels::Rgb, Fit::Pad);
        let empty = dir.path().join("empty.png");
        std::fs::write(&empty, b"").unwrap();
        assert!(decode(&empty, &o).unwrap_err().contains("empty"));
        let text = dir.path().join("text.png");
        std::fs::write(&text, b"hello, this is not an image at all").unwrap();
        assert!(!decode(&text, &o).unwrap_err().is_empty());
        let good = dir.path().join("good.png");
        solid_png(&good, 64, 64, [1, 2, 3]);
        let bytes = std::fs::read(&good).unwrap();
        let trunc = dir.path().join("trunc.png");
        std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
        assert!(decode(&trunc, &o).is_err());
        let big = DecodeOptions { max_pixels: 1000, ..o };
        let e = decode(&good, &big).unwrap_err();
        assert!(e.contains("64×64 = 4096 pixels") && e.contains("max_pixels"), "{e}");
    }

    /// A folder of `n` distinct images of assorted sizes (some need resampling).
    fn varied_folder(dir: &Path, n: u32) {
        for i in 0..n {
            let (w, h) = (5 + i % 7, 3 + (i * 3) % 11);
            let img =
                RgbaImage::from_fn(w, h, |x, y| Rgba([(x * 40 + i * 7) as u8, (y * 30 + i) as u8, (i * 13) as u8, 128 + (i % 128) as u8]));
            let sub = dir.join(format!("d{}", i % 3));
            std::fs::create_dir_all(&sub).unwrap();
            img.save(sub.join(format!("img{i:03}.png"))).unwrap();
        }
    }

    #[test]
    fn decoded_images_are_kept_when_the_set_fits() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..4u8 {
            solid_png(&dir.path().join(format!("c{i}.png")), 8, 8, [i, 2 * i, 3 * i]);
        }
        // 4 files of 3·8·8 bytes fit in 1 MiB; in 0 they don't.
        let on = build(&FolderLoaderConfig { cache_mib: 1, ..cfg(dir.path(), 2) }, 0, None, DataPosition::default()).unwrap();
        let off = build(&FolderLoaderConfig { cache_mib: 0, ..cfg(dir.path(), 2) }, 0, None, DataPosition::default()).unwrap();
        assert!(on.caches() && !off.caches());
        let fetch = |pool: &Pool, seq: u64| {
            pool.submit(seq, 0);
            pool.results.recv().unwrap()
        };
        let cached = Pool::start(1, on.files.clone(), on.opts, on.cache.clone()).unwrap();
        let plain = Pool::start(1, off.files.clone(), off.opts, None).unwrap();
        let first = fetch(&cached, 0).1.unwrap();
        assert!(fetch(&plain, 0).1.is_ok());
        // The file goes away: the cache still serves it (decoded once), the plain pool can't.
        std::fs::remove_file(&on.files[0]).unwrap();
        assert_eq!(fetch(&cached, 1).1.unwrap(), first);
        assert!(fetch(&plain, 1).1.is_err());
        // A whole run from the cache gives the same batches as one without.
        let c = FolderLoaderConfig { epochs: Some(3), ..cfg(dir.path(), 1) };
        for i in 0..4u8 {
            solid_png(&dir.path().join(format!("c{i}.png")), 8, 8, [i, 2 * i, 3 * i]);
        }
        let a = run_stage(Box::new(build(&FolderLoaderConfig { cache_mib: 1, ..c.clone() }, 7, None, DataPosition::default()).unwrap()));
        let b = run_stage(Box::new(build(&FolderLoaderConfig { cache_mib: 0, ..c }, 7, None, DataPosition::default()).unwrap()));
        assert_eq!(a.batches.len(), 12);
        assert_eq!(a.batches, b.batches);
    }

    #[test]
    fn loader_skips_bad_files_with_warnings() {
        let dir = tempfile::tempdir().unwrap();
        for (i, c) in [[255u8, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]].iter().enumerate() {
            solid_png(&dir.path().join(format!("ok{i}.png")), 8, 8, *c);
        }
        std::fs::write(dir.path().join("zero.png"), b"").unwrap();
        std::fs::write(dir.path().join("junk.JPG"), b"not a jpeg").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
        let c = FolderLoaderConfig { epochs: Some(2), ..cfg(dir.path(), 2) };
        let loader = build(&c, 5, None, DataPosition::default()).unwrap();
        assert_eq!(loader.len(), 6);
        assert_eq!(loader.image_shape(), [3, 8, 8]);
        let out = run_stage(Box::new(loader));
        out.result.unwrap();
        assert_eq!(out.batches.len(), 4, "4 good files, batch 2, 2 epochs");
        let epochs: Vec<u32> = out.batches.iter().map(|b| b.epoch).collect();
        assert_eq!(epochs, vec![0, 0, 1, 1]);
        let idx: Vec<u64> = out.batches.iter().map(|b| b.index).collect();
        assert_eq!(idx, vec![0, 1, 2, 3]);
        assert!(out.batches.iter().all(|b| b.shape == [2, 3, 8, 8] && b.x.len() == 2 * 192));
        // One warning per bad file (not repeated in epoch 2), then the summary.
        assert_eq!(out.warnings.len(), 3, "{:?}", out.warnings);
        assert!(out.warnings.iter().any(|w| w.contains("zero.png") && w.contains("empty")));
        assert!(out.warnings.iter().any(|w| w.contains("junk.JPG")));
        let last = out.warnings.last().unwrap();
        assert!(last.starts_with("skipped 2 unreadable files (first: "), "{last}");

        // Fail: the run stops with an error naming the bad file.
        let c = FolderLoaderConfig { on_bad_file: OnBadFile::Fail, shuffle: false, ..c };
        let out = run_stage(Box::new(build(&c, 5, None, DataPosition::default()).unwrap()));
        let e = out.result.unwrap_err().to_string();
        assert!(e.contains("junk.JPG"), "{e}");
    }

    #[test]
    fn all_bad_or_too_few_good_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        std::fs::write(dir.path().join("b.png"), b"y").unwrap();
        let c = FolderLoaderConfig { epochs: None, ..cfg(dir.path(), 1) };
        let out = run_stage(Box::new(build(&c, 0, None, DataPosition::default()).unwrap()));
        let e = out.result.unwrap_err().to_string();
        assert!(e.contains("none of the 2 image files could be decoded"), "{e}");
        // One good file, batch 2 with drop_last: no batch can ever be made.
        solid_png(&dir.path().join("c.png"), 8, 8, [0, 0, 0]);
        let c = FolderLoaderConfig { epochs: None, ..cfg(dir.path(), 2) };
        let out = run_stage(Box::new(build(&c, 0, None, DataPosition::default()).unwrap()));
        let e = out.result.unwrap_err().to_string();
        assert!(e.contains("only 1 of 3"), "{e}");
    }

    #[test]
    fn no_images_and_missing_root_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"hi").unwrap();
        let e = build(&cfg(dir.path(), 1), 0, None, DataPosition::default()).unwrap_err().to_string();
        assert!(e.starts_with("no images (png, jpg, jpeg, gif, webp, bmp) found under"), "{e}");
        let e = build(&cfg(&dir.path().join("nope"), 1), 0, None, DataPosition::default()).unwrap_err().to_string();
        assert!(e.contains("no such folder"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn symlink_loop_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        solid_png(&sub.join("a.png"), 8, 8, [1, 1, 1]);
        std::os::unix::fs::symlink(dir.path(), sub.join("loop")).unwrap();
        let loader = build(&cfg(dir.path(), 1), 0, None, DataPosition::default()).unwrap();
        assert_eq!(loader.len(), 1);
        let out = run_stage(Box::new(loader));
        out.result.unwrap();
        assert_eq!(out.batches.len(), 1);
        assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
        assert!(out.warnings[0].contains("loop"), "{:?}", out.warnings);
    }

    #[test]
    fn grey_batches_and_partial_last_batch() {
        let dir = tempfile::tempdir().unwrap();
        varied_folder(dir.path(), 5);
        let c = FolderLoaderConfig { channels: Channels::Grey, size: 6, drop_last: false, ..cfg(dir.path(), 2) };
        let loader = build(&c, 1, None, DataPosition::default()).unwrap();
        assert_eq!(loader.image_shape(), [1, 6, 6]);
        let out = run_stage(Box::new(loader));
        out.result.unwrap();
        let shapes: Vec<[usize; 4]> = out.batches.iter().map(|b| b.shape).collect();
        assert_eq!(shapes, vec![[2, 1, 6, 6], [2, 1, 6, 6], [1, 1, 6, 6]]);
        assert!(out.batches.iter().flat_map(|b| &b.x).all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn decoding_order_is_deterministic_with_many_workers() {
        let dir = tempfile::tempdir().unwrap();
        varied_folder(dir.path(), 40);
        std::fs::write(dir.path().join("d1").join("broken.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
        let c = FolderLoaderConfig { workers: 4, batch: 6, epochs: Some(3), ..cfg(dir.path(), 6) };
        let a = run_stage(Box::new(build(&c, 99, None, DataPosition::default()).unwrap()));
        let b = run_stage(Box::new(build(&c, 99, None, DataPosition::default()).unwrap()));
        a.result.unwrap();
        assert_eq!(a.batches.len(), 3 * (40 / 6));
        assert_eq!(a.batches, b.batches);
        // Same bytes with a single worker.
        let one = FolderLoaderConfig { workers: 1, ..c.clone() };
        let s = run_stage(Box::new(build(&one, 99, None, DataPosition::default()).unwrap()));
        assert_eq!(a.batches, s.batches);
        // Epochs differ in order; another seed differs.
        assert_ne!(a.batches[0].x, a.batches[6].x);
        let other = run_stage(Box::new(build(&c, 100, None, DataPosition::default()).unwrap()));
        assert_ne!(a.batches[0].x, other.batches[0].x);
    }

    #[test]
    fn stops_at_max_batches_and_when_outputs_close() {
        let dir = tempfile::tempdir().unwrap();
        varied_folder(dir.path(), 7);
        let c = FolderLoaderConfig { epochs: None, ..cfg(dir.path(), 3) };
        let out = run_stage(Box::new(build(&c, 0, Some(5), DataPosition::default()).unwrap()));
        out.result.unwrap();
        let ep: Vec<u32> = out.batches.iter().map(|b| b.epoch).collect();
        assert_eq!(ep, vec![0, 0, 1, 1, 2]);
        let out = run_stage_taking(Box::new(build(&c, 0, None, DataPosition::default()).unwrap()), 2);
        out.result.unwrap();
        assert_eq!(out.batches.len(), 2);
    }

    #[test]
    fn resuming_after_any_batch_gives_the_rest_of_the_run() {
        let dir = tempfile::tempdir().unwrap();
        // 11 good files and 2 bad ones: 13 files, batch 3 never divides the good count evenly.
        varied_folder(dir.path(), 11);
        std::fs::write(dir.path().join("d0").join("bad-a.png"), b"not a png").unwrap();
        std::fs::write(dir.path().join("d2").join("bad-b.png"), b"").unwrap();
        let seed = 3;
        for drop_last in [true, false] {
            let c = FolderLoaderConfig { epochs: Some(3), shuffle: true, drop_last, ..cfg(dir.path(), 3) };
            let run_from = |start| run_stage(Box::new(build(&c, seed, None, start).unwrap()));
            let full = run_from(DataPosition::default());
            full.result.unwrap();
            assert_eq!(full.batches.len(), if drop_last { 3 * 3 } else { 3 * 4 });
            assert_eq!(full.warnings.len(), 3, "{:?}", full.warnings);
            let files = build(&c, seed, None, DataPosition::default()).unwrap().files().to_vec();
            let n = files.len();
            assert_eq!(n, 13);
            // Bad files lie both before and after some of the resume positions (in the epoch).
            let bad: Vec<usize> = files.iter().enumerate().filter(|(_, f)| f.to_string_lossy().contains("bad-")).map(|(i, _)| i).collect();
            let around = |b: &HostBatch| {
                let order = epoch_order(n, seed, b.epoch, true);
                let at: Vec<u64> = bad.iter().map(|&i| order.iter().position(|&o| o == i).unwrap() as u64).collect();
                (at.iter().any(|&p| p < b.next_pos), at.iter().any(|&p| p >= b.next_pos))
            };
            assert!(full.batches.iter().any(|b| around(b) == (true, true)), "no resume point between the bad files");
            assert!(full.batches.iter().any(|b| around(b) == (false, true)), "no resume point before both bad files");
            let ends = assert_resumes_exactly(&full.batches, n as u64, run_from);
            assert_eq!(ends > 0, !drop_last, "{ends} resume points at an epoch's end");
            // A position at the very end of an epoch (with drop_last, no batch ends there).
            let first_of_1 = full.batches.iter().position(|b| b.epoch == 1).unwrap();
            let start = DataPosition { next_index: first_of_1 as u64, epoch: 0, pos: n as u64 };
            let out = run_from(start);
            out.result.unwrap();
            assert!(out.batches == full.batches[first_of_1..], "resumed at the end of epoch 0");
        }
    }

    #[test]
    fn resuming_does_not_read_the_files_before_the_position() {
        let dir = tempfile::tempdir().unwrap();
        varied_folder(dir.path(), 9);
        let c = FolderLoaderConfig { epochs: Some(2), shuffle: false, on_bad_file: OnBadFile::Fail, ..cfg(dir.path(), 2) };
        let full = run_stage(Box::new(build(&c, 0, None, DataPosition::default()).unwrap()));
        full.result.unwrap();
        // Spoil the files before position 6 of epoch 1 (file order, no shuffle): with `Fail`,
        // reading any of them would stop the run.
        let start = full.batches[6].position_after();
        assert_eq!(start, DataPosition { next_index: 7, epoch: 1, pos: 6 });
        let files = build(&c, 0, None, DataPosition::default()).unwrap().files().to_vec();
        for f in &files[..6] {
            std::fs::write(f, b"spoilt").unwrap();
        }
        let out = run_stage(Box::new(build(&c, 0, None, start).unwrap()));
        out.result.unwrap();
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        assert!(out.batches == full.batches[7..]);
    }

    #[test]
    fn resuming_near_an_epoch_end_with_drop_last_is_no_error() {
        let dir = tempfile::tempdir().unwrap();
        varied_folder(dir.path(), 7);
        // 8 files in path order, the last one bad. Batch 3, drop_last: from positions 5 to 8,
        // at most 2 good files are left in the epoch.
        std::fs::create_dir(dir.path().join("e")).unwrap();
        std::fs::write(dir.path().join("e").join("bad.png"), b"junk").unwrap();
        let c = FolderLoaderConfig { epochs: Some(1), shuffle: false, ..cfg(dir.path(), 3) };
        for pos in [5, 6, 7, 8] {
            let out = run_stage(Box::new(build(&c, 0, None, DataPosition { next_index: 2, epoch: 0, pos }).unwrap()));
            out.result.unwrap_or_else(|e| panic!("pos {pos}: {e}"));
            assert!(out.batches.is_empty());
        }
        // With a second epoch, the whole of it follows.
        let c2 = FolderLoaderConfig { epochs: Some(2), ..c.clone() };
        let full = run_stage(Box::new(build(&c2, 0, None, DataPosition::default()).unwrap())).batches;
        assert_eq!(full.len(), 4);
        let out = run_stage(Box::new(build(&c2, 0, None, DataPosition { next_index: 2, epoch: 0, pos: 7 }).unwrap()));
        out.result.unwrap();
        assert!(out.batches == full[2..]);
        // A whole epoch that cannot make a batch still is an error.
        let c3 = FolderLoaderConfig { batch: 8, epochs: Some(2), ..c.clone() };
        let out = run_stage(Box::new(build(&c3, 0, None, DataPosition { next_index: 0, epoch: 0, pos: 7 }).unwrap()));
        let e = out.result.unwrap_err().to_string();
        assert!(e.contains("only 7 of 8"), "{e}");
    }

    #[test]
    fn resuming_keeps_max_batches_absolute_and_checks_the_position() {
        let dir = tempfile::tempdir().unwrap();
        varied_folder(dir.path(), 7);
        let c = FolderLoaderConfig { epochs: None, ..cfg(dir.path(), 3) };
        let full = run_stage(Box::new(build(&c, 0, Some(8), DataPosition::default()).unwrap())).batches;
        assert_eq!(full.len(), 8);
        let start = full[4].position_after();
        assert_eq!(start.next_index, 5);
        let out = run_stage(Box::new(build(&c, 0, Some(8), start).unwrap()));
        out.result.unwrap();
        assert_eq!(out.batches.iter().map(|b| b.index).collect::<Vec<_>>(), vec![5, 6, 7]);
        assert!(out.batches == full[5..]);
        // At or past a limit: nothing, no error.
        let out = run_stage(Box::new(build(&c, 0, Some(8), DataPosition { next_index: 9, ..start }).unwrap()));
        assert!(out.result.is_ok() && out.batches.is_empty());
        let c1 = FolderLoaderConfig { epochs: Some(2), ..c.clone() };
        let out = run_stage(Box::new(build(&c1, 0, None, DataPosition { next_index: 4, epoch: 2, pos: 0 }).unwrap()));
        assert!(out.result.is_ok() && out.batches.is_empty());
        // Past the end of an epoch: the data changed.
        let e = build(&c, 0, None, DataPosition { next_index: 3, epoch: 1, pos: 8 }).unwrap_err().to_string();
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
        assert!(
            e.contains("cannot resume at image 8 of epoch 1: the data has only 7 images (was it changed since the checkpoint?)"),
            "{e}"
        );
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c: FolderLoaderConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, FolderLoaderConfig::default());
        assert_eq!((c.size, c.channels, c.fit, c.background), (64, Channels::Rgb, Fit::Pad, [255; 3]));
        assert_eq!((c.workers, c.on_bad_file, c.batch), (0, OnBadFile::Skip, 64));
        assert!(serde_json::from_str::<FolderLoaderConfig>(r#"{"colour": 1}"#).is_err());
        let c: FolderLoaderConfig = serde_json::from_str(r#"{"channels": "Grey", "fit": "Crop", "on_bad_file": "Fail"}"#).unwrap();
        assert_eq!((c.channels, c.fit, c.on_bad_file), (Channels::Grey, Fit::Crop, OnBadFile::Fail));
    }

    /// Manual timing on the real illustrations (run with `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn real_illustrations_epoch_time() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/illustrations");
        for (workers, size) in [(1, 64), (2, 64), (2, 48)] {
            let c = FolderLoaderConfig { root: root.clone(), workers, size, epochs: Some(1), ..Default::default() };
            let loader = build(&c, 0, None, DataPosition::default()).unwrap();
            let n = loader.len();
            let t = std::time::Instant::now();
            let out = run_stage(Box::new(loader));
            let dt = t.elapsed();
            out.result.unwrap();
            eprintln!(
                "workers={workers}, size={size}: {n} files, {} batches of {:?} in {dt:?} ({:.0} images/s), \
                 warnings {:?}",
                out.batches.len(),
                out.batches[0].shape,
                (out.batches.len() * 64) as f64 / dt.as_secs_f64(),
                out.warnings
            );
        }
    }
}
