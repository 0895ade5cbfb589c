//! Caps: what a stage's port carries, checked before anything runs.
//!
//! Like GStreamer caps, each port declares the item kind and, for images, the shape (batch
//! symbolic), dtype, value range and device. The runner propagates caps from the sources
//! downstream and refuses a link whose caps don't fit, naming both stages and both caps.

use std::fmt;

/// Description of the items on one port.
#[derive(Debug, Clone, PartialEq)]
pub struct Caps {
    /// Item kind: `batch`, `d_done`, `images` or `frame`.
    pub item: &'static str,
    /// `[C, H, W]` of the images, where the item carries images and it is known.
    pub image: Option<[usize; 3]>,
    /// Element type: `f32` or `u8`.
    pub dtype: &'static str,
    /// Value range of the elements.
    pub range: (f32, f32),
    /// Whether batches carry DRAGAN points x̂.
    pub x_hat: bool,
    /// `cpu` or `device` (the training device).
    pub device: &'static str,
}

impl Caps {
    /// Real batches `[B, C, H, W]` f32 in [-1, 1] on the host.
    pub fn batch(image: [usize; 3], x_hat: bool) -> Caps {
        Caps { item: "batch", image: Some(image), dtype: "f32", range: (-1.0, 1.0), x_hat, device: "cpu" }
    }
    /// The end of the D steps of one generator step.
    pub fn d_done() -> Caps {
        Caps { item: "d_done", image: None, dtype: "f64", range: (f32::NEG_INFINITY, f32::INFINITY), x_hat: false, device: "cpu" }
    }
    /// Generated images `[n, C, H, W]` u8 on the host.
    pub fn images(image: [usize; 3]) -> Caps {
        Caps { item: "images", image: Some(image), dtype: "u8", range: (0.0, 255.0), x_hat: false, device: "cpu" }
    }
    /// RGB8 frames on the host.
    pub fn frame() -> Caps {
        Caps { item: "frame", image: None, dtype: "u8", range: (0.0, 255.0), x_hat: false, device: "cpu" }
    }
}

impl fmt::Display for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.item)?;
        if let Some([c, h, w]) = self.image {
            write!(f, "[B,{c},{h},{w}]")?;
        }
        write!(f, " {} in [{}, {}] on {}", self.dtype, self.range.0, self.range.1, self.device)?;
        if self.x_hat {
            write!(f, " with x̂")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn caps_print_readably() {
        assert_eq!(Caps::batch([1, 28, 28], true).to_string(), "batch[B,1,28,28] f32 in [-1, 1] on cpu with x̂");
        assert_eq!(Caps::images([3, 64, 64]).to_string(), "images[B,3,64,64] u8 in [0, 255] on cpu");
    }
}
