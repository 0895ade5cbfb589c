//! Reading IDX files (the MNIST format: a big-endian header, then unsigned bytes), plain or
//! gzipped, for the IDX loader, the evaluation's real images and the LeNet classifier.
//! Every error names the file and says what was expected.

use crate::core::stage::StageError;
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
pub fn dtype_name(code: u8) -> &'static str {
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
pub fn open_idx(path: &Path) -> Result<(Box<dyn Read>, bool), StageError> {
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
pub fn read_up_to(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
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
pub fn read_error(path: &Path, gz: bool, e: std::io::Error) -> StageError {
    if gz {
        StageError::file(path, format!("corrupt or truncated gzip data: {e}"))
    } else {
        StageError::io(path, e)
    }
}

/// Read an IDX header with `dims` dimensions and the expected `magic`; returns the sizes.
pub fn read_header(path: &Path, r: &mut dyn Read, gz: bool, magic: u32, dims: usize) -> Result<Vec<usize>, StageError> {
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

/// Read exactly `len` data bytes (not more), or say how many there were.
pub fn read_data(path: &Path, r: &mut dyn Read, gz: bool, len: u64, what: impl FnOnce(u64) -> String) -> Result<Vec<u8>, StageError> {
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
pub fn check_labels(images: &Path, n: usize) -> Result<(), StageError> {
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
