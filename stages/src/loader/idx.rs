//! The IDX loader: MNIST-style image files (`train-images-idx3-ubyte`, plain or gzipped).
//!
//! The whole image file is read into host memory at build time (60 000 MNIST digits are
//! 47 MB of u8). Images are grey: each batch has shape `[B, 1, rows, cols]`.
//!
//! IDX format: a big-endian magic `0x0000TTDD` (TT = data type code, DD = number of
//! dimensions), then DD big-endian u32 sizes, then the data, row-major. Images are
//! `0x00000803` (unsigned bytes, 3 dimensions: count, rows, cols), labels `0x00000801`.

use super::{check_batch, check_start, epoch_order, DataPosition, Emitter, Flow, DEFAULT_BATCH};
use crate::stage::{Stage, StageContext, StageError};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Which half of the data set to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Split {
    /// `train-images-idx3-ubyte` (60 000 images in MNIST).
    #[default]
    Train,
    /// `t10k-images-idx3-ubyte` (10 000 images in MNIST).
    Test,
}

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

/// Largest accepted `pad`.
pub const MAX_PAD: usize = 64;

/// `images` with `pad` zero pixels added on every side: `[n, h + 2·pad, w + 2·pad]`.
pub fn pad_images(images: IdxImages, pad: usize) -> IdxImages {
    if pad == 0 {
        return images;
    }
    let (h, w) = (images.h + 2 * pad, images.w + 2 * pad);
    let mut pixels = vec![0u8; images.n * h * w];
    for i in 0..images.n {
        let src = images.image(i);
        for r in 0..images.h {
            let dst = i * h * w + (r + pad) * w + pad;
            pixels[dst..dst + images.w].copy_from_slice(&src[r * images.w..(r + 1) * images.w]);
        }
    }
    IdxImages { n: images.n, h, w, pixels }
}

/// The images of an IDX image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub n: usize,
    /// Rows per image.
    pub h: usize,
    /// Columns per image.
    pub w: usize,
    /// `n · h · w` grey u8 pixels as stored (MNIST: 0 = background, 255 = ink),
    /// image-major then row-major.
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// The pixels of image `i` (`h · w` bytes, row-major). Panics if `i >= n`.
    pub fn image(&self, i: usize) -> &[u8] {
        let len = self.h * self.w;
        &self.pixels[i * len..(i + 1) * len]
    }
}

/// The labels of an IDX label file (`0x00000801`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxLabels {
    /// Number of labels.
    pub n: usize,
    /// One u8 label per image (0–9 for MNIST).
    pub labels: Vec<u8>,
}

/// Magic number of an IDX file of unsigned-byte images (3 dimensions).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned-byte labels (1 dimension).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Name of an IDX data type code, for messages.
fn dtype_name(code: u8) -> &'static str {
    match code {
        0x08 => "unsigned byte",
        0x09 => "signed byte",
        0x0B => "i16",
        0x0C => "i32",
        0x0D => "f32",
        0x0E => "f64",
        _ => "unknown",
    }
}

/// Open an IDX file for reading, gunzipping it when it starts with the gzip magic `1f 8b`.
/// Returns the reader and whether the file is gzipped.
fn open_idx(path: &Path) -> Result<(Box<dyn Read>, bool), StageError> {
    use std::io::Seek;
    let mut file = std::fs::File::open(path).map_err(|e| StageError::io(path, e))?;
    let mut head = [0u8; 2];
    let got = read_up_to(&mut file, &mut head).map_err(|e| StageError::io(path, e))?;
    file.seek(std::io::SeekFrom::Start(0)).map_err(|e| StageError::io(path, e))?;
    let reader = std::io::BufReader::new(file);
    if got == 2 && head == [0x1f, 0x8b] {
        Ok((Box::new(flate2::read::GzDecoder::new(reader)), true))
    } else {
        Ok((Box::new(reader), false))
    }
}

/// Read into `buf` until it is full or the reader ends; returns the number of bytes read.
fn read_up_to(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(k) => filled += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Turn a read error into a message: gzip problems say so.
fn read_error(path: &Path, gz: bool, e: std::io::Error) -> StageError {
    if gz {
        StageError::file(path, format!("corrupt or truncated gzip data: {e}"))
    } else {
        StageError::io(path, e)
    }
}

/// Read an IDX header with `dims` dimensions and the expected `magic`; returns the sizes.
fn read_header(path: &Path, r: &mut dyn Read, gz: bool, magic: u32, dims: usize) -> Result<Vec<usize>, StageError> {
    let mut head = [0u8; 4];
    let got = read_up_to(r, &mut head).map_err(|e| read_error(path, gz, e))?;
    if got < 4 {
        return Err(StageError::file(path, format!("too short for an IDX file ({got} bytes; expected magic 0x{magic:08X})")));
    }
    let found = u32::from_be_bytes(head);
    if found != magic {
        let dtype = head[2];
        let msg = if head[0] != 0 || head[1] != 0 {
            format!("not an IDX file: expected magic 0x{magic:08X}, found 0x{found:08X}")
        } else if dtype != 0x08 {
            format!(
                "unsupported IDX data type 0x{dtype:02X} ({}): expected magic 0x{magic:08X} \
                 (unsigned bytes), found 0x{found:08X}",
                dtype_name(dtype)
            )
        } else {
            format!(
                "expected magic 0x{magic:08X} ({dims} dimensions), found 0x{found:08X} ({} \
                 dimensions)",
                head[3]
            )
        };
        return Err(StageError::file(path, msg));
    }
    let mut sizes = Vec::with_capacity(dims);
    for _ in 0..dims {
        let mut b = [0u8; 4];
        let got = read_up_to(r, &mut b).map_err(|e| read_error(path, gz, e))?;
        if got < 4 {
            return Err(StageError::file(path, "header is truncated (ends within the sizes)"));
        }
        sizes.push(u32::from_be_bytes(b) as usize);
    }
    Ok(sizes)
}

/// Image shape `[1, rows, cols]` and count of the images file a config points at, from the
/// header alone (16 bytes; for `pipe check` and caps, before any data is read).
pub fn probe_shape(cfg: &IdxLoaderConfig) -> Result<([usize; 3], usize), StageError> {
    let path = find_images_file(&cfg.root, cfg.split)?;
    let (mut r, gz) = open_idx(&path)?;
    let s = read_header(&path, r.as_mut(), gz, IMAGES_MAGIC, 3)?;
    Ok(([1, s[1] + 2 * cfg.pad, s[2] + 2 * cfg.pad], s[0]))
}

/// Read exactly `len` data bytes (not more), or say how many there were.
fn read_data(path: &Path, r: &mut dyn Read, gz: bool, len: u64, what: impl FnOnce(u64) -> String) -> Result<Vec<u8>, StageError> {
    // Do not trust the declared size for the allocation: read what is there, up to `len`.
    let mut data = Vec::with_capacity(len.min(1 << 26) as usize);
    r.take(len).read_to_end(&mut data).map_err(|e| read_error(path, gz, e))?;
    if (data.len() as u64) < len {
        return Err(StageError::file(path, what(data.len() as u64)));
    }
    Ok(data)
}

/// Read an IDX image file (`0x00000803`: unsigned bytes, 3 dimensions), plain or gzipped
/// (detected from the content).
///
/// Errors, each naming the file: cannot be opened or read; wrong magic ("expected magic
/// 0x00000803, found 0x…"); an unsupported data type code; zero images or an empty image
/// size; fewer data bytes than the header declares ("declares 60000 images of 28×28 =
/// 47040000 bytes but has …"); corrupt or truncated gzip data. Bytes after the declared data
/// are ignored.
pub fn read_idx_images(path: &Path) -> Result<IdxImages, StageError> {
    let (mut r, gz) = open_idx(path)?;
    let sizes = read_header(path, &mut r, gz, IMAGES_MAGIC, 3)?;
    let (n, h, w) = (sizes[0], sizes[1], sizes[2]);
    if n == 0 {
        return Err(StageError::file(path, "declares 0 images"));
    }
    if h == 0 || w == 0 {
        return Err(StageError::file(path, format!("declares images of {h}×{w} pixels")));
    }
    let len = (n as u64).checked_mul(h as u64).and_then(|v| v.checked_mul(w as u64));
    let Some(len) = len.filter(|&l| usize::try_from(l).is_ok()) else {
        return Err(StageError::file(path, format!("declares {n} images of {h}×{w}: too large")));
    };
    let pixels = read_data(path, &mut r, gz, len, |got| format!("declares {n} images of {h}×{w} = {len} bytes but has {got}"))?;
    Ok(IdxImages { n, h, w, pixels })
}

/// Read an IDX label file (`0x00000801`: unsigned bytes, 1 dimension), plain or gzipped.
///
/// Errors as [`read_idx_images`]: wrong magic, unsupported type, fewer labels than declared
/// ("declares N labels but has M"), corrupt gzip.
pub fn read_idx_labels(path: &Path) -> Result<IdxLabels, StageError> {
    let (mut r, gz) = open_idx(path)?;
    let sizes = read_header(path, &mut r, gz, LABELS_MAGIC, 1)?;
    let n = sizes[0];
    let labels = read_data(path, &mut r, gz, n as u64, |got| format!("declares {n} labels but has {got}"))?;
    Ok(IdxLabels { n, labels })
}

/// The label file that goes with an image file by the standard names (`…-images-idx3-ubyte` →
/// `…-labels-idx1-ubyte`, with `.gz` or not), if there is one.
pub fn labels_file_for(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gz").unwrap_or(name);
    let labels = stem.replace("-images-idx3-ubyte", "-labels-idx1-ubyte").replace("-images.idx3-ubyte", "-labels.idx1-ubyte");
    if labels == stem {
        return None;
    }
    [labels.clone(), format!("{labels}.gz")].into_iter().map(|n| images.with_file_name(n)).find(|p| p.is_file())
}

/// The images are used without their labels (an unconditional GAN), but a label file next to
/// them that disagrees on the count means the files do not belong together: an error naming
/// both. A label file that cannot be read is an error too.
fn check_labels(images: &Path, n: usize) -> Result<(), StageError> {
    let Some(lp) = labels_file_for(images) else { return Ok(()) };
    let labels = read_idx_labels(&lp)?;
    if labels.n != n {
        return Err(StageError::file(
            images,
            format!("has {n} images but its label file {} has {} labels: the two files do not belong together", lp.display(), labels.n),
        ));
    }
    Ok(())
}

/// File names tried for the images of `split`, in order.
pub fn image_file_names(split: Split) -> Vec<String> {
    let stems: [&str; 2] = match split {
        Split::Train => ["train-images-idx3-ubyte", "train-images.idx3-ubyte"],
        Split::Test => ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
    };
    let mut names = Vec::new();
    for s in stems {
        names.push(s.to_string());
        names.push(format!("{s}.gz"));
    }
    names
}

/// Find the image file of `split` in `root` (or `root` itself if it is a file).
///
/// Errors when `root` does not exist, or when none of [`image_file_names`] is in it (the
/// message lists the names tried and the folder).
pub fn find_images_file(root: &Path, split: Split) -> Result<PathBuf, StageError> {
    if root.as_os_str().is_empty() {
        return Err(StageError::msg("idx loader: `root` is not set (the folder of the IDX files)"));
    }
    if root.is_file() {
        return Ok(root.to_path_buf());
    }
    if !root.is_dir() {
        return Err(StageError::file(root, "no such folder"));
    }
    let names = image_file_names(split);
    for name in &names {
        let p = root.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(StageError::file(root, format!("no IDX image file found in this folder (looked for {})", names.join(", "))))
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
        let mut emitter = Emitter::new(self.start.next_index, self.max_batches);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::test_util::{assert_resumes_exactly, run_stage, run_stage_taking};
    use std::io::Write;

    /// IDX image bytes for `n` images of `h`×`w`; pixel (i, k) = (i·16 + k) mod 256.
    fn idx_bytes(n: u32, h: u32, w: u32) -> Vec<u8> {
        let mut v = IMAGES_MAGIC.to_be_bytes().to_vec();
        for d in [n, h, w] {
            v.extend_from_slice(&d.to_be_bytes());
        }
        for i in 0..n as usize {
            for k in 0..(h * w) as usize {
                v.push(((i * 16 + k) % 256) as u8);
            }
        }
        v
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn cfg(root: &Path, batch: usize) -> IdxLoaderConfig {
        IdxLoaderConfig { root: root.to_path_buf(), batch, epochs: Some(1), shuffle: false, ..Default::default() }
    }

    #[test]
    fn plain_file_first_batch_values() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(10, 4, 4));
        let loader = build(&cfg(dir.path(), 4), 1, None, DataPosition::default()).unwrap();
        assert_eq!(loader.image_shape(), [1, 4, 4]);
        assert_eq!(loader.len(), 10);
        let out = run_stage(Box::new(loader));
        out.result.unwrap();
        // drop_last: 10 images → 2 full batches of 4.
        assert_eq!(out.batches.len(), 2);
        let b = &out.batches[0];
        assert_eq!((b.index, b.epoch, b.shape), (0, 0, [4, 1, 4, 4]));
        assert!(b.x_hat.is_none());
        for (j, &v) in b.x.iter().enumerate() {
            let (i, k) = (j / 16, j % 16);
            let p = ((i * 16 + k) % 256) as f32;
            assert_eq!(v, p / 127.5 - 1.0);
        }
        assert_eq!(out.batches[1].index, 1);
        assert_eq!(out.batches[1].x[0], 64.0 / 127.5 - 1.0);
    }

    #[test]
    fn gz_file_and_dotted_name_and_test_split() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "t10k-images.idx3-ubyte.gz", &gz(&idx_bytes(10, 4, 4)));
        let mut c = cfg(dir.path(), 3);
        c.split = Split::Test;
        c.drop_last = false;
        let loader = build(&c, 1, None, DataPosition::default()).unwrap();
        assert!(loader.path().ends_with("t10k-images.idx3-ubyte.gz"));
        let out = run_stage(Box::new(loader));
        out.result.unwrap();
        let sizes: Vec<usize> = out.batches.iter().map(|b| b.shape[0]).collect();
        assert_eq!(sizes, vec![3, 3, 3, 1]);
        assert_eq!(out.batches[3].x[0], (9.0 * 16.0 % 256.0) / 127.5 - 1.0);
        // The Train split is not there.
        let e = build(&cfg(dir.path(), 3), 1, None, DataPosition::default()).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte.gz") && e.contains("looked for"), "{e}");
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = idx_bytes(10, 4, 4);
        bytes.truncate(bytes.len() - 5);
        let p = write(dir.path(), "train-images-idx3-ubyte", &bytes);
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte"), "{e}");
        assert!(e.contains("declares 10 images of 4×4 = 160 bytes but has 155"), "{e}");
        // Also through gzip.
        std::fs::remove_file(&p).unwrap();
        write(dir.path(), "train-images-idx3-ubyte.gz", &gz(&bytes));
        let e = build(&cfg(dir.path(), 2), 1, None, DataPosition::default()).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte.gz") && e.contains("declares"), "{e}");
    }

    #[test]
    fn padding_adds_a_background_border() {
        let img = IdxImages { n: 2, h: 2, w: 3, pixels: (1..=12).collect() };
        let p = pad_images(img, 1);
        assert_eq!((p.n, p.h, p.w), (2, 4, 5));
        #[rustfmt::skip]
        let want0: Vec<u8> = vec![
            0, 0, 0, 0, 0,
            0, 1, 2, 3, 0,
            0, 4, 5, 6, 0,
            0, 0, 0, 0, 0,
        ];
        assert_eq!(p.image(0), want0.as_slice());
        assert_eq!(&p.image(1)[6..9], &[7, 8, 9]);
        // Through the loader: 28×28 → 32×32, shape reported before reading the data too.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), idx_bytes(4, 28, 28)).unwrap();
        let c = IdxLoaderConfig { root: dir.path().into(), batch: 2, pad: 2, ..Default::default() };
        assert_eq!(probe_shape(&c).unwrap().0, [1, 32, 32]);
        let l = build(&c, 0, Some(1), DataPosition::default()).unwrap();
        assert_eq!(l.image_shape(), [1, 32, 32]);
        let e = build(&IdxLoaderConfig { pad: 65, ..c }, 0, None, DataPosition::default()).unwrap_err().to_string();
        assert!(e.contains("`pad` is 65, expected 0 to 64"), "{e}");
    }

    #[test]
    fn wrong_magic_and_dtype_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = idx_bytes(2, 2, 2);
        bytes[0..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        let p = write(dir.path(), "a", &bytes);
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(e.contains("expected magic 0x00000803, found 0x12345678"), "{e}");
        // A label file where images are expected.
        bytes[0..4].copy_from_slice(&LABELS_MAGIC.to_be_bytes());
        let p = write(dir.path(), "b", &bytes);
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(e.contains("found 0x00000801"), "{e}");
        // f32 data.
        bytes[0..4].copy_from_slice(&0x0000_0D03u32.to_be_bytes());
        let p = write(dir.path(), "c", &bytes);
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(e.contains("unsupported IDX data type 0x0D"), "{e}");
        // Empty file.
        let p = write(dir.path(), "d", &[]);
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");
    }

    #[test]
    fn corrupt_gzip_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = gz(&idx_bytes(10, 4, 4));
        let n = bytes.len();
        for b in &mut bytes[12..n - 8] {
            *b ^= 0x5A;
        }
        let p = write(dir.path(), "train-images-idx3-ubyte.gz", &bytes);
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte.gz"), "{e}");
        assert!(e.contains("corrupt or truncated gzip data"), "{e}");
        // A gzip stream cut short.
        let good = gz(&idx_bytes(10, 4, 4));
        let p = write(dir.path(), "cut.gz", &good[..good.len() / 2]);
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(e.contains("cut.gz") && e.contains("gzip"), "{e}");
    }

    #[test]
    fn labels_reader() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = LABELS_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&3u32.to_be_bytes());
        v.extend_from_slice(&[7, 2, 1]);
        let p = write(dir.path(), "l.gz", &gz(&v));
        let l = read_idx_labels(&p).unwrap();
        assert_eq!(l, IdxLabels { n: 3, labels: vec![7, 2, 1] });
        v.pop();
        let p = write(dir.path(), "l2", &v);
        let e = read_idx_labels(&p).unwrap_err().to_string();
        assert!(e.contains("declares 3 labels but has 2"), "{e}");
    }

    #[test]
    fn missing_folder_and_too_few_images() {
        let dir = tempfile::tempdir().unwrap();
        let e = build(&cfg(&dir.path().join("nope"), 4), 1, None, DataPosition::default()).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("no such folder"), "{e}");
        write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(3, 2, 2));
        let e = build(&cfg(dir.path(), 4), 1, None, DataPosition::default()).unwrap_err().to_string();
        assert!(e.contains("only 3 images"), "{e}");
    }

    #[test]
    fn shuffle_is_seeded_per_epoch() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(16, 1, 1));
        let c = IdxLoaderConfig { epochs: Some(2), shuffle: true, ..cfg(dir.path(), 16) };
        let run = |seed| run_stage(Box::new(build(&c, seed, None, DataPosition::default()).unwrap()));
        let a = run(42);
        let b = run(42);
        a.result.unwrap();
        assert_eq!(a.batches.len(), 2);
        assert_eq!(a.batches, b.batches);
        assert_eq!((a.batches[1].index, a.batches[1].epoch), (1, 1));
        assert_ne!(a.batches[0].x, a.batches[1].x, "epochs should differ in order");
        let c2 = run(43);
        assert_ne!(a.batches[0].x, c2.batches[0].x);
        // Every image exactly once per epoch.
        let mut firsts: Vec<u8> = a.batches[0].x.iter().map(|&v| ((v + 1.0) * 127.5).round() as u8).collect();
        firsts.sort_unstable();
        assert_eq!(firsts, (0..16).map(|i| (i * 16 % 256) as u8).collect::<Vec<_>>());
    }

    #[test]
    fn stops_at_max_batches_and_when_outputs_close() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(10, 2, 2));
        let c = IdxLoaderConfig { epochs: None, ..cfg(dir.path(), 2) };
        let out = run_stage(Box::new(build(&c, 0, Some(12), DataPosition::default()).unwrap()));
        out.result.unwrap();
        assert_eq!(out.batches.len(), 12);
        assert_eq!(out.batches[11].epoch, 2);
        // Endless, downstream goes away after 3 batches: the loader ends cleanly.
        let out = run_stage_taking(Box::new(build(&c, 0, None, DataPosition::default()).unwrap()), 3);
        out.result.unwrap();
        assert_eq!(out.batches.len(), 3);
    }

    #[test]
    fn resuming_after_any_batch_gives_the_rest_of_the_run() {
        let dir = tempfile::tempdir().unwrap();
        // 10 distinct images; batch 3 leaves 1 over per epoch, batch 5 ends epochs exactly.
        write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(10, 2, 2));
        for (batch, drop_last) in [(3, true), (3, false), (5, true)] {
            let c = IdxLoaderConfig { epochs: Some(3), shuffle: true, drop_last, ..cfg(dir.path(), batch) };
            let run_from = |start| run_stage(Box::new(build(&c, 7, None, start).unwrap()));
            let full = run_from(DataPosition::default());
            full.result.unwrap();
            let next_pos: Vec<u64> = full.batches.iter().take(4).map(|b| b.next_pos).collect();
            let expected: &[u64] = match (batch, drop_last) {
                (3, true) => &[3, 6, 9, 3],
                (3, false) => &[3, 6, 9, 10],
                _ => &[5, 10, 5, 10],
            };
            assert_eq!(next_pos, expected, "batch {batch}, drop_last {drop_last}");
            let ends = assert_resumes_exactly(&full.batches, 10, run_from);
            assert_eq!(ends > 0, !(batch == 3 && drop_last), "batch {batch}, drop_last {drop_last}: {ends} epoch ends");
        }
        // A position at the very end of an epoch the run never stopped at (drop_last drops the
        // 10th image): the next epoch starts.
        let c = IdxLoaderConfig { epochs: Some(3), shuffle: true, ..cfg(dir.path(), 3) };
        let full = run_stage(Box::new(build(&c, 7, None, DataPosition::default()).unwrap())).batches;
        let out = run_stage(Box::new(build(&c, 7, None, DataPosition { next_index: 3, epoch: 0, pos: 10 }).unwrap()));
        out.result.unwrap();
        assert_eq!(out.batches, full[3..]);
    }

    #[test]
    fn resuming_keeps_max_batches_and_epochs_absolute() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(10, 2, 2));
        let c = IdxLoaderConfig { epochs: None, drop_last: false, ..cfg(dir.path(), 3) };
        let full = run_stage(Box::new(build(&c, 1, Some(8), DataPosition::default()).unwrap())).batches;
        assert_eq!(full.len(), 8);
        let start = full[4].position_after();
        assert_eq!(start, DataPosition { next_index: 5, epoch: 1, pos: 3 });
        let out = run_stage(Box::new(build(&c, 1, Some(8), start).unwrap()));
        out.result.unwrap();
        assert_eq!(out.batches.iter().map(|b| b.index).collect::<Vec<_>>(), vec![5, 6, 7]);
        assert_eq!(out.batches, full[5..]);
        // At or past either limit: nothing more, and no error.
        let out = run_stage(Box::new(build(&c, 1, Some(8), DataPosition { next_index: 8, ..start }).unwrap()));
        assert!(out.result.is_ok() && out.batches.is_empty());
        let c2 = IdxLoaderConfig { epochs: Some(2), ..c.clone() };
        let out = run_stage(Box::new(build(&c2, 1, None, DataPosition { next_index: 8, epoch: 2, pos: 0 }).unwrap()));
        assert!(out.result.is_ok() && out.batches.is_empty());
        let out = run_stage(Box::new(build(&c2, 1, None, DataPosition { next_index: 8, epoch: 1, pos: 10 }).unwrap()));
        assert!(out.result.is_ok() && out.batches.is_empty());
    }

    #[test]
    fn resuming_past_the_end_of_the_data_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(10, 2, 2));
        let c = cfg(dir.path(), 3);
        let start = DataPosition { next_index: 40, epoch: 4, pos: 11 };
        let e = build(&c, 1, None, start).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte"), "{e}");
        assert!(
            e.contains("cannot resume at image 11 of epoch 4: the data has only 10 images (was it changed since the checkpoint?)"),
            "{e}"
        );
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c: IdxLoaderConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, IdxLoaderConfig::default());
        assert_eq!((c.batch, c.epochs, c.drop_last, c.shuffle), (64, None, true, true));
        assert!(serde_json::from_str::<IdxLoaderConfig>(r#"{"bogus": 1}"#).is_err());
        let c: IdxLoaderConfig = serde_json::from_str(r#"{"split": "Test"}"#).unwrap();
        assert_eq!(c.split, Split::Test);
    }

    /// Manual check on the real data (run with `--ignored`).
    #[test]
    #[ignore]
    fn real_mnist_and_fashion() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
        for (name, n) in [("mnist", 10000), ("fashion-mnist", 60000)] {
            let t = std::time::Instant::now();
            let c = IdxLoaderConfig { root: data.join(name), ..Default::default() };
            let l = build(&c, 0, None, DataPosition::default()).unwrap();
            assert_eq!((l.len(), l.image_shape()), (n, [1, 28, 28]));
            eprintln!("{name}: {} images read in {:?}", l.len(), t.elapsed());
        }
    }
}
