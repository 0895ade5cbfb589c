//! What the frame sinks ([`super::video`] and [`super::gif`]) share: the name of the file
//! they write while encoding, the check of each incoming frame, and the error for an item
//! that is not a frame.

use crate::core::item::Frame;
use crate::core::stage::StageError;
use std::path::{Path, PathBuf};

/// The file a frame sink writes while encoding: `path` with `.partial` appended
/// (`progress.mp4.partial`). It is renamed to `path` once the file is finalised, so `path`
/// is always either absent or a whole, playable file.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// What is wrong with a frame ([`check_frame`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A side is 0.
    #[error("empty frame ({width}×{height})")]
    Empty { width: u32, height: u32 },
    /// A side is larger than the sink takes.
    #[error("frame of {width}×{height} is too large (at most {max_side} pixels a side)")]
    TooLarge { width: u32, height: u32, max_side: u32 },
    /// `rgb` does not hold `width·height·3` bytes (`expected` is 0 when that overflows).
    #[error("frame of {width}×{height} has {len} bytes of RGB, expected {expected}")]
    WrongLength { width: u32, height: u32, len: usize, expected: usize },
}

/// Checks that a frame is not empty, holds exactly `width·height·3` bytes of RGB, and (when
/// `max_side` is given) is at most `max_side` pixels a side.
///
/// Errors: [`FrameError::Empty`], [`FrameError::TooLarge`], [`FrameError::WrongLength`]
/// (`frame of 4×4 has 47 bytes of RGB, expected 48`).
pub fn check_frame(f: &Frame, max_side: Option<u32>) -> Result<(), FrameError> {
    let (width, height) = (f.width, f.height);
    if width == 0 || height == 0 {
        return Err(FrameError::Empty { width, height });
    }
    if let Some(m) = max_side {
        if width > m || height > m {
            return Err(FrameError::TooLarge { width, height, max_side: m });
        }
    }
    let need = (width as usize).checked_mul(height as usize).and_then(|v| v.checked_mul(3));
    if need != Some(f.rgb.len()) {
        return Err(FrameError::WrongLength { width, height, len: f.rgb.len(), expected: need.unwrap_or(0) });
    }
    Ok(())
}

/// The error of a frame sink (`what`: "video", "gif") given an item of kind `kind`.
pub fn wrong_item(what: &str, kind: &str) -> StageError {
    StageError::msg(format!("the {what} stage takes `frame` items (sample grids from a sampler), got a `{kind}` item"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_checked_and_partials_named() {
        let f = |w, h, n| Frame { step: 0, width: w, height: h, rgb: vec![0; n] };
        assert_eq!(check_frame(&f(2, 2, 12), None), Ok(()));
        assert_eq!(check_frame(&f(0, 2, 0), None).unwrap_err().to_string(), "empty frame (0×2)");
        assert_eq!(check_frame(&f(2, 2, 11), None).unwrap_err().to_string(), "frame of 2×2 has 11 bytes of RGB, expected 12");
        assert!(check_frame(&f(5, 1, 15), Some(4)).unwrap_err().to_string().contains("too large"));
        assert_eq!(partial_path(Path::new("a/b.mp4")), PathBuf::from("a/b.mp4.partial"));
        assert!(wrong_item("gif", "batch").to_string().contains("gif stage takes `frame` items"));
    }
}
