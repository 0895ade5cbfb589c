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
//! run. A run resumed from a saved position (see [resuming](crate::data::batches#resuming)) neither reads
//! nor decodes the files before that position, so it does not know which of them were bad.

use crate::data::batches::{check_batch, check_start, epoch_order, DataPosition, Emitter, Flow, DEFAULT_BATCH};
use crate::core::stage::{Stage, StageContext, StageError};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

pub use crate::data::image::{decode, list_images, Channels, DecodeError, DecodeOptions, Fit, EXTENSIONS};

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


impl From<&FolderLoaderConfig> for DecodeOptions {
    fn from(c: &FolderLoaderConfig) -> Self {
        DecodeOptions { size: c.size, channels: c.channels, fit: c.fit, background: c.background, max_pixels: c.max_pixels }
    }
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
    /// This rank's slice of each batch (data-parallel runs).
    shard: crate::data::batches::Shard,
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
        shard: Default::default(),
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

/// A decode result: CHW bytes, or why the file could not be decoded (shared, as the cache
/// hands a result out again).
type Decoded = Result<Vec<u8>, Arc<DecodeError>>;

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
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(path, &opts).map_err(Arc::new)))
                                .unwrap_or_else(|_| Err(Arc::new(DecodeError::Panicked)))
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
        let mut emitter = Emitter::new(self.start.next_index, self.max_batches).sharded(self.shard);
        let img_len = self.image_shape().iter().product::<usize>();
        let [c, h, w] = self.image_shape();
        let window = (self.batch * 3).max(self.workers * 4);
        // Why each file found bad was (it is not tried again).
        let mut bad: Vec<Option<Arc<DecodeError>>> = vec![None; self.files.len()];
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
                let result = match &bad[idx] {
                    Some(reason) => Some(Err(reason.clone())),
                    None => {
                        pool.submit(next_seq, idx);
                        None
                    }
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
                            if ctx.draining() && self.shard.world <= 1 {
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
                Some(Err(reason)) if bad[slot.idx].is_none() => {
                    let why = reason.to_string();
                    bad[slot.idx] = Some(reason);
                    let path = &self.files[slot.idx];
                    match self.on_bad_file {
                        OnBadFile::Fail => return Err(StageError::file(path, why.trim_end())),
                        OnBadFile::Skip => {
                            // One line per file for the first few; after that only the count.
                            if skipped.len() < MAX_LISTED_BAD {
                                ctx.bus.warn(format!("skipping {}: {}", path.display(), why.trim_end()));
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

impl crate::kinds::Kind for FolderLoaderConfig {
    const NAME: &'static str = "FolderLoader";
    const PORTS: crate::core::ports::Ports = crate::core::ports::Ports::source(
        crate::core::ports::ItemKind::Batch,
        "batch[B,C,S,S] f32 in [-1, 1] on cpu (C from channels, S = size)",
    );

    fn validate(&self, cx: &crate::kinds::CheckContext<'_>) -> Vec<crate::core::problem::Problem> {
        use crate::core::problem::Problem;
        let mut v = vec![];
        if self.size == 0 || self.size > 4096 {
            v.push(Problem::new("size", format!("size is {}, expected 1 to 4096 pixels", self.size)));
        }
        if self.workers > 1024 {
            v.push(Problem::new("workers", format!("workers is {}, expected 0 to 1024", self.workers)));
        }
        if self.max_pixels == 0 {
            v.push(Problem::new("max_pixels", "max_pixels is 0, expected at least 1"));
        }
        v.extend(crate::data::batches::common_problems(cx.stage, &self.root, self.batch, self.epochs));
        v
    }

    fn source(&self) -> Option<crate::kinds::SourceInfo<'_>> {
        Some(crate::kinds::SourceInfo { root: &self.root, batch: self.batch, labelled: false })
    }

    /// From the settings alone (`channels`, `size`): every image is resized to it.
    fn probe_shape(&self) -> Option<Result<[usize; 3], StageError>> {
        Some(Ok(shape_of(self)))
    }

    fn build(&self, cx: &mut crate::kinds::BuildContext<'_>) -> Result<Box<dyn Stage>, StageError> {
        let shard = cx.run.shard();
        if let Some(why) = shard.batch_problem(self.batch) {
            return Err(StageError::msg(why));
        }
        let mut loader = build(self, cx.seed, cx.max_batches, cx.data_start)?;
        loader.shard = shard;
        Ok(Box::new(loader))
    }
}

#[cfg(test)]
mod tests;
