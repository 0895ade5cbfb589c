//! Sample grids: tiling a batch of generated images into one RGB picture, and writing
//! pictures as PNG files atomically.

use crate::core::item::{Frame, Images};
use std::path::Path;

/// Largest side of a grid picture, in pixels. Bigger grids are refused by [`check_images`]
/// (PNG encoders and H.264 encoders cannot take them anyway).
pub const MAX_SIDE: usize = 16384;

/// Width and height in pixels of the grid [`make_grid`] draws for `shape` (`[n, c, h, w]`),
/// `ncol` columns (0 is taken as 1) and `pad` pixels of padding, or `None` when a side
/// would overflow `usize`.
///
/// Width is `ncol·w + (ncol+1)·pad`; height is `nrow·h + (nrow+1)·pad` with
/// `nrow = ceil(n / ncol)` (so 0 rows, height `pad`, for an empty batch).
pub fn grid_size(shape: [usize; 4], ncol: usize, pad: usize) -> Option<(usize, usize)> {
    let [n, _, h, w] = shape;
    let ncol = ncol.max(1);
    let nrow = n.div_ceil(ncol);
    let width = ncol.checked_mul(w)?.checked_add(ncol.checked_add(1)?.checked_mul(pad)?)?;
    let height = nrow.checked_mul(h)?.checked_add(nrow.checked_add(1)?.checked_mul(pad)?)?;
    Some((width, height))
}

/// Why a batch of images cannot be tiled into a grid ([`check_images`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GridError {
    /// Neither 1 nor 3 channels.
    #[error("images have {0} channels, expected 1 (grey) or 3 (RGB)")]
    Channels(usize),
    /// No image, or images of no pixels.
    #[error("empty image batch (shape {0:?})")]
    Empty([usize; 4]),
    /// `data` does not hold `n·c·h·w` bytes (`expected` is None when that overflows).
    #[error(
        "image data has {len} bytes, shape {shape:?} needs {}",
        .expected.map_or_else(|| "more than fits in memory".to_string(), |e| e.to_string())
    )]
    Length { len: usize, shape: [usize; 4], expected: Option<usize> },
    /// The grid would be larger than [`MAX_SIDE`] on a side (`size` is None when a side
    /// overflows).
    #[error(
        "a grid of {n} images of {w}×{h} in {ncol} columns with padding {pad} would be {}, more than {MAX_SIDE} pixels a side",
        .size.map_or_else(|| "enormous".to_string(), |(gw, gh)| format!("{gw}×{gh}"))
    )]
    TooLarge { n: usize, w: usize, h: usize, ncol: usize, pad: usize, size: Option<(usize, usize)> },
}

/// Checks that `images` can be tiled by [`make_grid`]: 1 or 3 channels, `data` holding exactly
/// `n·c·h·w` bytes, at least one image of non-zero size, and a grid of `ncol` columns with
/// `pad` pixels of padding no larger than [`MAX_SIDE`] on either side.
///
/// Errors: [`GridError::Channels`], [`GridError::Empty`], [`GridError::Length`],
/// [`GridError::TooLarge`], each a sentence saying what is wrong.
pub fn check_images(images: &Images, ncol: usize, pad: usize) -> Result<(), GridError> {
    let [n, c, h, w] = images.shape;
    if c != 1 && c != 3 {
        return Err(GridError::Channels(c));
    }
    if n == 0 || h == 0 || w == 0 {
        return Err(GridError::Empty(images.shape));
    }
    let expected = n.checked_mul(c).and_then(|v| v.checked_mul(h)).and_then(|v| v.checked_mul(w));
    if expected != Some(images.data.len()) {
        return Err(GridError::Length { len: images.data.len(), shape: images.shape, expected });
    }
    match grid_size(images.shape, ncol, pad) {
        Some((gw, gh)) if gw <= MAX_SIDE && gh <= MAX_SIDE => Ok(()),
        size => Err(GridError::TooLarge { n, w, h, ncol: ncol.max(1), pad, size }),
    }
}

/// Tiles the `n` images of `images` (NCHW `u8`, 1 or 3 channels) into one RGB8 picture.
///
/// Images are placed row by row, `ncol` per row (0 is taken as 1), in the order of the
/// batch; there are `pad` pixels of colour `(pad_value, pad_value, pad_value)` between tiles
/// and around the border, and cells of an incomplete last row are filled with that colour
/// too. Grey images (1 channel) are replicated to R, G and B. The picture size is given by
/// [`grid_size`]; image `i` has its top-left pixel at
/// `(x, y) = (pad + (i % ncol)·(w + pad), pad + (i / ncol)·(h + pad))`.
///
/// The returned frame's `step` is `images.step`.
///
/// This function does not fail: a malformed batch (see [`check_images`], which callers should
/// use first) is drawn as well as possible without panicking: missing bytes read as 0, a
/// channel count other than 1 or 3 uses the first channel (or the first three), and a grid
/// whose size overflows gives a 0×0 frame.
pub fn make_grid(images: &Images, ncol: usize, pad: usize, pad_value: u8) -> Frame {
    let [n, c, h, w] = images.shape;
    let ncol = ncol.max(1);
    let empty = Frame { step: images.step, width: 0, height: 0, rgb: Vec::new() };
    let Some((gw, gh)) = grid_size(images.shape, ncol, pad) else {
        return empty;
    };
    let (Ok(width), Ok(height)) = (u32::try_from(gw), u32::try_from(gh)) else {
        return empty;
    };
    let Some(len) = gw.checked_mul(gh).and_then(|v| v.checked_mul(3)) else {
        return empty;
    };
    let mut rgb = vec![pad_value; len];
    if w == 0 || h == 0 {
        return Frame { step: images.step, width, height, rgb };
    }
    let plane = h.saturating_mul(w);
    let image_len = plane.saturating_mul(c);
    // Source channel for each output channel R, G, B (None: no channel at all).
    let src_channel = |k: usize| -> Option<usize> {
        match c {
            0 => None,
            1 | 2 => Some(0),
            _ => Some(k),
        }
    };
    for i in 0..n {
        let x0 = pad + (i % ncol) * (w + pad);
        let y0 = pad + (i / ncol) * (h + pad);
        let base = i.saturating_mul(image_len);
        for y in 0..h {
            let row = ((y0 + y) * gw + x0) * 3;
            for x in 0..w {
                let px = row + x * 3;
                for k in 0..3 {
                    let v = match src_channel(k) {
                        Some(ch) => {
                            let idx = base.saturating_add(ch.saturating_mul(plane)).saturating_add(y * w + x);
                            images.data.get(idx).copied().unwrap_or(0)
                        }
                        None => pad_value,
                    };
                    rgb[px + k] = v;
                }
            }
        }
    }
    Frame { step: images.step, width, height, rgb }
}

/// Encodes `frame` (RGB8) as a PNG into `out`.
///
/// Errors: the encoding error (a frame whose `rgb` does not hold `width·height·3` bytes, or of
/// size 0) or the writer's, as an [`std::io::Error`].
pub fn encode_png(frame: &Frame, out: impl std::io::Write) -> std::io::Result<()> {
    use image::ImageEncoder;
    let expected = (frame.width as usize).checked_mul(frame.height as usize).and_then(|v| v.checked_mul(3));
    if frame.width == 0 || frame.height == 0 || expected != Some(frame.rgb.len()) {
        return Err(std::io::Error::other(format!(
            "cannot write a {}×{} picture from {} bytes of RGB",
            frame.width,
            frame.height,
            frame.rgb.len()
        )));
    }
    image::codecs::png::PngEncoder::new(out)
        .write_image(&frame.rgb, frame.width, frame.height, image::ExtendedColorType::Rgb8)
        .map_err(std::io::Error::other)
}

/// Writes `frame` (RGB8) as a PNG file at `path`, atomically: the picture is written to a
/// temporary file in the same folder ([`crate::io::atomic`]), which is then renamed over
/// `path`, so readers never see a half-written PNG. The temporary file is removed on error.
///
/// Errors: those of [`encode_png`], and the I/O error (creating, writing, renaming) as an
/// [`std::io::Error`]; callers attach the path.
pub fn write_png_atomic(frame: &Frame, path: &Path) -> std::io::Result<()> {
    crate::io::atomic::write_atomic(path, |out| encode_png(frame, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn px(f: &Frame, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * f.width + x) * 3) as usize;
        [f.rgb[i], f.rgb[i + 1], f.rgb[i + 2]]
    }

    #[test]
    fn grey_images_tile_with_padding() {
        // 3 grey 2×2 images, 2 columns, pad 1 → 2 rows: 2·2+3 = 7 wide, 2·2+3 = 7 high.
        let mut data = Vec::new();
        for i in 0..3u8 {
            data.extend_from_slice(&[10 * i + 1, 10 * i + 2, 10 * i + 3, 10 * i + 4]);
        }
        let im = Images { step: 7, shape: [3, 1, 2, 2], data, last: false };
        assert!(check_images(&im, 2, 1).is_ok());
        let f = make_grid(&im, 2, 1, 200);
        assert_eq!((f.width, f.height, f.step), (7, 7, 7));
        assert_eq!(f.rgb.len(), 7 * 7 * 3);
        // Border and gaps are padding.
        for (x, y) in [(0, 0), (3, 1), (6, 6), (1, 3), (0, 5), (6, 2)] {
            assert_eq!(px(&f, x, y), [200; 3], "({x}, {y})");
        }
        // Image 0 at (1,1), image 1 at (4,1), image 2 at (1,4).
        assert_eq!(px(&f, 1, 1), [1; 3]);
        assert_eq!(px(&f, 2, 1), [2; 3]);
        assert_eq!(px(&f, 1, 2), [3; 3]);
        assert_eq!(px(&f, 2, 2), [4; 3]);
        assert_eq!(px(&f, 4, 1), [11; 3]);
        assert_eq!(px(&f, 5, 2), [14; 3]);
        assert_eq!(px(&f, 1, 4), [21; 3]);
        assert_eq!(px(&f, 2, 5), [24; 3]);
        // The empty cell of the last row is padding.
        assert_eq!(px(&f, 4, 4), [200; 3]);
        assert_eq!(px(&f, 5, 5), [200; 3]);
    }

    #[test]
    fn rgb_images_keep_channels() {
        // 2 RGB 1×2 images (h=1, w=2), 2 columns, pad 0.
        let data = vec![
            1, 2, // R of image 0
            3, 4, // G
            5, 6, // B
            11, 12, 13, 14, 15, 16, // image 1
        ];
        let im = Images { step: 1, shape: [2, 3, 1, 2], data, last: true };
        let f = make_grid(&im, 2, 0, 0);
        assert_eq!((f.width, f.height), (4, 1));
        assert_eq!(px(&f, 0, 0), [1, 3, 5]);
        assert_eq!(px(&f, 1, 0), [2, 4, 6]);
        assert_eq!(px(&f, 2, 0), [11, 13, 15]);
        assert_eq!(px(&f, 3, 0), [12, 14, 16]);
    }

    #[test]
    fn one_column_and_zero_columns() {
        let im = Images { step: 1, shape: [2, 1, 1, 1], data: vec![5, 6], last: false };
        let a = make_grid(&im, 1, 2, 0);
        let b = make_grid(&im, 0, 2, 0);
        assert_eq!(a, b);
        assert_eq!((a.width, a.height), (5, 8));
        assert_eq!(px(&a, 2, 2), [5; 3]);
        assert_eq!(px(&a, 2, 5), [6; 3]);
    }

    #[test]
    fn malformed_input_is_reported_not_panicked() {
        let short = Images { step: 1, shape: [2, 1, 2, 2], data: vec![1; 5], last: false };
        assert!(check_images(&short, 2, 1).unwrap_err().to_string().contains("5 bytes"));
        let f = make_grid(&short, 2, 1, 9);
        assert_eq!((f.width, f.height), (7, 4));
        let two = Images { step: 1, shape: [1, 2, 1, 1], data: vec![1, 2], last: false };
        assert!(check_images(&two, 1, 0).unwrap_err().to_string().contains("2 channels"));
        let _ = make_grid(&two, 1, 0, 0);
        let huge = Images { step: 1, shape: [usize::MAX, 1, usize::MAX, 2], data: vec![], last: false };
        assert!(check_images(&huge, 8, 2).is_err());
        let f = make_grid(&huge, 8, 2, 0);
        assert_eq!((f.width, f.height), (0, 0));
        let big = Images { step: 1, shape: [1, 1, 20000, 1], data: vec![0; 20000], last: false };
        assert!(check_images(&big, 1, 0).unwrap_err().to_string().contains("16384"));
        let empty = Images { step: 1, shape: [0, 3, 4, 4], data: vec![], last: false };
        assert!(check_images(&empty, 8, 2).is_err());
    }

    #[test]
    fn png_is_written_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        let f = Frame { step: 3, width: 3, height: 2, rgb: (0..18).collect() };
        write_png_atomic(&f, &path).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (3, 2));
        assert_eq!(back.into_raw(), f.rgb);
        // Only the PNG is left, no temporary file.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.png")]);
        // A bad frame is an error, and leaves nothing behind.
        let bad = Frame { step: 3, width: 3, height: 2, rgb: vec![0; 5] };
        assert!(write_png_atomic(&bad, &dir.path().join("b.png")).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A missing folder is an error.
        assert!(write_png_atomic(&f, &dir.path().join("no/such/c.png")).is_err());
    }
}
