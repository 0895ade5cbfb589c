//! The IDX loader: MNIST-style image files (`train-images-idx3-ubyte`, plain or gzipped).
//!
//! The whole image file is read into host memory at build time (60 000 MNIST digits are
//! 47 MB of u8). Images are grey: each batch has shape `[B, 1, rows, cols]`.
//!
//! IDX format: a big-endian magic `0x0000TTDD` (TT = data type code, DD = number of
//! dimensions), then DD big-endian u32 sizes, then the data, row-major. Images are
//! `0x00000803` (unsigned bytes, 3 dimensions: count, rows, cols), labels `0x00000801`.

use crate::data::batches::{check_batch, check_start, epoch_order, DataPosition, Emitter, Flow, DEFAULT_BATCH};
use crate::core::stage::{Stage, StageContext, StageError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use crate::data::idx::{find_images_file, image_file_names, labels_file_for, pad_images, read_idx_images, read_idx_labels, IdxImages, IdxLabels, Split, IMAGES_MAGIC, LABELS_MAGIC, MAX_PAD};
use crate::data::idx::{check_labels, open_idx, read_header};

/// Configuration of the IDX loader (the `idx` stage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct IdxLoaderConfig {
    /// Folder holding the IDX files (default: empty path, which must be set). The loader looks
    /// for `train-images-idx3-ubyte` (Train) or `t10k-images-idx3-ubyte` (Test), also with a
    /// dot (`train-images.idx3-ubyte`) and/or a `.gz` suffix. A path to an IDX file itself is
    /// accepted too.
    pub root: PathBuf,
    /// Which file to read (default `Train`).
    pub split: Split,
    /// Images per batch (default 64).
    pub batch: usize,
    /// Number of passes over the data; `None` = endless (default `None`).
    pub epochs: Option<u32>,
    /// Only emit full batches: the images left over at the end of an epoch are dropped
    /// (default `true`). With `false` the last batch of an epoch may be smaller.
    pub drop_last: bool,
    /// Visit the images in a fresh seeded random order each epoch (default `true`); otherwise
    /// in file order.
    pub shuffle: bool,
    /// Pixels of background (value 0, i.e. −1 after scaling) added on every side, 0 to 64
    /// (default 0). `pad: 2` makes 28×28 MNIST-style images 32×32, a size a DCGAN takes.
    pub pad: usize,
}

impl Default for IdxLoaderConfig {
    fn default() -> Self {
        IdxLoaderConfig {
            root: PathBuf::new(),
            split: Split::Train,
            batch: DEFAULT_BATCH,
            epochs: None,
            drop_last: true,
            shuffle: true,
            pad: 0,
        }
    }
}

/// Image shape `[1, rows, cols]` and count of the images file a config points at, from the
/// header alone (16 bytes; for `pipe check` and caps, before any data is read).
pub fn probe_shape(cfg: &IdxLoaderConfig) -> Result<([usize; 3], usize), StageError> {
    let path = find_images_file(&cfg.root, cfg.split)?;
    let (mut r, gz) = open_idx(&path)?;
    let s = read_header(&path, r.as_mut(), gz, IMAGES_MAGIC, 3)?;
    Ok(([1, s[1] + 2 * cfg.pad, s[2] + 2 * cfg.pad], s[0]))
}


/// The IDX loader stage, holding all images in memory.
#[derive(Debug)]
pub struct IdxLoader {
    path: PathBuf,
    images: IdxImages,
    batch: usize,
    epochs: Option<u32>,
    drop_last: bool,
    shuffle: bool,
    seed: u64,
    max_batches: Option<u64>,
    start: DataPosition,
    /// This rank's slice of each batch (data-parallel runs).
    shard: crate::data::batches::Shard,
}

/// Open and read the IDX images of `cfg`, ready to run from position `start`
/// ([`DataPosition::default()`] for the beginning; see [resuming](super#resuming)).
///
/// `seed` drives the per-epoch shuffling; `max_batches` (if set) stops the loader once the
/// batch index reaches it (an absolute count: `start.next_index` batches are taken as done).
/// Errors: the file cannot be found or read or is malformed (see [`read_idx_images`]), `batch`
/// is 0, `drop_last` is set and there are fewer images than one batch, or `start.pos` is past
/// the number of images ("cannot resume at image …", naming the file).
pub fn build(cfg: &IdxLoaderConfig, seed: u64, max_batches: Option<u64>, start: DataPosition) -> Result<IdxLoader, StageError> {
    if cfg.pad > MAX_PAD {
        return Err(StageError::msg(format!("idx loader: `pad` is {}, expected 0 to {MAX_PAD} pixels", cfg.pad)));
    }
    let path = find_images_file(&cfg.root, cfg.split)?;
    let images = pad_images(read_idx_images(&path)?, cfg.pad);
    check_labels(&path, images.n)?;
    check_batch(&path, images.n, cfg.batch, cfg.drop_last)?;
    check_start(&path, images.n, &start)?;
    Ok(IdxLoader {
        path,
        images,
        batch: cfg.batch,
        epochs: cfg.epochs,
        drop_last: cfg.drop_last,
        shuffle: cfg.shuffle,
        seed,
        max_batches,
        shard: Default::default(),
        start,
    })
}

impl IdxLoader {
    /// Shape of one image, `[C, H, W]` = `[1, rows, cols]`.
    pub fn image_shape(&self) -> [usize; 3] {
        [1, self.images.h, self.images.w]
    }

    /// Number of images in the file.
    pub fn len(&self) -> usize {
        self.images.n
    }

    /// True when there are no images (never, for a built loader).
    pub fn is_empty(&self) -> bool {
        self.images.n == 0
    }

    /// The file the images were read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        if self.drop_last {
            self.images.n / self.batch
        } else {
            self.images.n.div_ceil(self.batch)
        }
    }
}

impl Stage for IdxLoader {
    /// Emit batches `[B, 1, H, W]` in [-1, 1], from the start position on, until the epochs or
    /// `max_batches` are done, the outputs close, or a stop is asked for.
    fn run(self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        let mut emitter = Emitter::new(self.start.next_index, self.max_batches).sharded(self.shard);
        let n = self.images.n;
        let img_len = self.images.h * self.images.w;
        let mut buf = Vec::with_capacity(self.batch * img_len);
        let mut epoch = self.start.epoch;
        // Where the first epoch starts (checked ≤ n at build); later epochs start at 0.
        let mut from = usize::try_from(self.start.pos).unwrap_or(n).min(n);
        loop {
            if self.epochs.is_some_and(|e| epoch >= e) || emitter.should_stop(&ctx) {
                return Ok(());
            }
            let order = epoch_order(n, self.seed, epoch, self.shuffle);
            for chunk in order[from..].chunks(self.batch) {
                if chunk.len() < self.batch && self.drop_last {
                    break;
                }
                buf.clear();
                for &i in chunk {
                    buf.extend_from_slice(self.images.image(i));
                }
                from += chunk.len();
                let shape = [chunk.len(), 1, self.images.h, self.images.w];
                if emitter.emit(&ctx, epoch, from as u64, shape, &buf) == Flow::Stop {
                    return Ok(());
                }
            }
            from = 0;
            epoch = match epoch.checked_add(1) {
                Some(e) => e,
                None => return Ok(()),
            };
        }
    }
}

impl crate::kinds::Kind for IdxLoaderConfig {
    const NAME: &'static str = "IdxLoader";
    const PORTS: crate::core::ports::Ports =
        crate::core::ports::Ports::source(crate::core::ports::ItemKind::Batch, "batch[B,1,H,W] f32 in [-1, 1] on cpu (H, W from the file)");

    fn validate(&self, cx: &crate::kinds::CheckContext<'_>) -> Vec<crate::core::problem::Problem> {
        crate::data::batches::common_problems(cx.stage, &self.root, self.batch, self.epochs)
    }

    fn source(&self) -> Option<crate::kinds::SourceInfo<'_>> {
        Some(crate::kinds::SourceInfo { root: &self.root, batch: self.batch, labelled: true })
    }

    /// Reads the images file's 16-byte header.
    fn probe_shape(&self) -> Option<Result<[usize; 3], StageError>> {
        Some(probe_shape(self).map(|(s, _)| s))
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
