//! Reading data: image decoding ([`image`]), IDX files ([`idx`]), and what both loaders share ([`batches`]):
//! the per-epoch order, pixel scaling, batch numbering and the stop conditions.

pub mod batches;
pub mod idx;
pub mod image;
