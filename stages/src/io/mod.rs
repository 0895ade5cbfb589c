//! What a run writes to disk: atomic file replacement ([`atomic`]), checkpoints of the training
//! state ([`checkpoint`]), sample-grid pictures ([`grid`]) and the loss plot ([`plot`]).

pub mod atomic;
pub mod checkpoint;
pub mod grid;
pub mod plot;
