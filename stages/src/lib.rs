//! The stage vocabulary of `pipe`.
//!
//! A pipeline is a graph of typed stages, each running on its own thread, joined by bounded
//! crossbeam channels carrying [`Item`]s. Sources (loaders) produce items until they end; the
//! end of stream (EOS) is the closing of a channel: a stage sees EOS when all its input senders
//! are dropped, finishes its work (a muxer finalises its file) and drops its own outputs.
//! Errors, warnings, progress and EOS notices go to the runner on the [`Bus`].
//!
//! Only the GPU step stages ([`kinds::d_step`], [`kinds::g_step`]) touch device tensors; every
//! other stage works on plain host memory.
//!
//! The layout, dependencies pointing one way (down this list):
//! - [`kinds`]: one file per stage kind, the [`kinds::Kind`] trait every kind implements, and
//!   the registry (one line per kind) that generates [`kinds::StageKind`];
//! - [`quality`]: FID, KID, IS and their feature extractors;
//! - [`train`]: models, losses, penalties, optimisers;
//! - [`io`]: atomic writes, checkpoints, grids, the loss plot;
//! - [`data`]: IDX and image decoding, what the loaders share;
//! - [`core`]: the stage contract, items, ports, caps, problems.

pub mod core;
pub mod data;
pub mod dist;
pub mod io;
pub mod kinds;
pub mod quality;
pub mod train;

pub use crate::core::item::{DataPosition, Scores};
pub use crate::core::item::{Frame, HostBatch, Images, Item};
pub use crate::core::stage::{Bus, BusMessage, Stage, StageContext, StageError};

/// Helpers of the unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    /// For a test that needs torch's global random generator to itself (other tests of this
    /// binary draw from it in parallel threads): outside, runs the test `name` (its full path)
    /// alone in a child process of this test binary, asserts it passed, and returns false;
    /// inside that child, returns true (run the test's body).
    pub fn alone(name: &str) -> bool {
        const VAR: &str = "PIPE_TEST_ALONE";
        if std::env::var(VAR).as_deref() == Ok(name) {
            return true;
        }
        let exe = std::env::current_exe().expect("the test binary");
        let out = std::process::Command::new(exe)
            .args(["--exact", name, "--test-threads=1", "--nocapture"])
            .env(VAR, name)
            .output()
            .expect("the test binary runs");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("1 passed"), "{name}, run alone:\n{text}");
        false
    }
}
