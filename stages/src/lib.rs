//! The stage vocabulary of `pipe`.
//!
//! A pipeline is a graph of typed stages, each running on its own thread, joined by bounded
//! crossbeam channels carrying [`Item`]s. Sources (loaders) produce items until they end; the
//! end of stream (EOS) is the closing of a channel: a stage sees EOS when all its input senders
//! are dropped, finishes its work (a muxer finalises its file) and drops its own outputs.
//! Errors, warnings, progress and EOS notices go to the runner on the [`Bus`].
//!
//! Only the GPU step stages ([`d_step`], [`g_step`]) touch device tensors; every other stage works
//! on plain host memory.

pub mod adam;
pub mod atomic;
pub mod augment;
pub mod caps;
pub mod checkpoint;
pub mod d_step;
pub mod dragan;
pub mod eval;
pub mod features;
pub mod fid;
pub mod g_step;
pub mod gif;
pub mod grid;
pub mod item;
pub mod lenet;
pub mod loader;
pub mod losses;
pub mod models;
pub mod plot;
pub mod problem;
pub mod quality;
pub mod rmsprop;
pub mod sampler;
pub mod shim;
pub mod stage;
pub mod train;
pub mod video;

pub use item::{DataPosition, Scores};
pub use item::{Frame, HostBatch, Images, Item};
pub use stage::{Bus, BusMessage, Stage, StageContext, StageError};
