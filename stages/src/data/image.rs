//! Decoding image files for the folder loader and the evaluation's real images: reading any
//! common format, compositing transparency onto a background, grey or RGB, and fitting to a
//! square. Works on host memory only.

use crate::core::stage::StageError;
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageBuffer, ImageDecoder, ImageReader, Limits, Pixel};
use image::{RgbImage, RgbaImage};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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

/// Why an image file could not be decoded ([`decode`]). The message does not name the file
/// (the caller does).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// [`DecodeOptions::size`] is 0.
    #[error("size must be at least 1")]
    ZeroSize,
    /// The file cannot be read.
    #[error("cannot read: {0}")]
    Read(std::io::Error),
    /// The file is empty.
    #[error("empty file (0 bytes)")]
    Empty,
    /// The file cannot be opened.
    #[error("cannot open: {0}")]
    Open(std::io::Error),
    /// Neither the content nor the extension says what image format it is.
    #[error("not a recognised image format")]
    UnknownFormat,
    /// The image is corrupt, truncated, or too large for the decoder's memory limit.
    #[error("cannot decode: {0}")]
    Decode(image::ImageError),
    /// The image declares a width or height of 0.
    #[error("image has no pixels ({width}×{height})")]
    NoPixels { width: u32, height: u32 },
    /// The image declares more pixels than [`DecodeOptions::max_pixels`].
    #[error("image is {width}×{height} = {pixels} pixels, more than max_pixels = {max_pixels}")]
    TooLarge { width: u32, height: u32, pixels: u64, max_pixels: u64 },
    /// The decoder panicked (a bug in it, on a hostile file).
    #[error("the image decoder panicked")]
    Panicked,
}

/// Read an image file (format guessed from its content, then its extension) as straight-alpha
/// RGBA8, turned upright by its EXIF orientation if it has one. GIF and animated WebP give
/// their first frame; 16-bit images are rounded to 8 bits; CMYK JPEGs are converted to RGB.
fn read_rgba(path: &Path, max_pixels: u64) -> Result<RgbaImage, DecodeError> {
    let meta = std::fs::metadata(path).map_err(DecodeError::Read)?;
    if meta.len() == 0 {
        return Err(DecodeError::Empty);
    }
    let reader = ImageReader::open(path).map_err(DecodeError::Open)?.with_guessed_format().map_err(DecodeError::Read)?;
    let mut reader = reader;
    if reader.format().is_none() {
        return Err(DecodeError::UnknownFormat);
    }
    let mut limits = Limits::default();
    // Room for the decoded image at up to 8 bytes a pixel (RGBA16) plus decoder buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(DecodeError::Decode)?;
    // EXIF orientation (JPEG, WebP, TIFF): how the camera held the picture.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(DecodeError::NoPixels { width, height });
    }
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(DecodeError::TooLarge { width, height, pixels, max_pixels });
    }
    let mut img = DynamicImage::from_decoder(decoder).map_err(DecodeError::Decode)?;
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
/// Errors ([`DecodeError`], a message without the path): the file cannot be read, is empty,
/// is not a recognised image, is corrupt or truncated, or declares more than `max_pixels`
/// pixels; `size` is 0.
pub fn decode(path: &Path, opts: &DecodeOptions) -> Result<Vec<u8>, DecodeError> {
    if opts.size == 0 {
        return Err(DecodeError::ZeroSize);
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
