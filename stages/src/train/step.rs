//! How a step stage runs its update: eagerly every time, or (`execution: Graph`) eagerly for a
//! few warm-up updates, then captured once as a CUDA graph and replayed.
//!
//! An update is split in two by the step stages:
//! - the *draws*, run eagerly before every update: seeding torch's generator with
//!   [`crate::io::checkpoint::step_seed`] and filling the static latent (and WGAN-GP's ε)
//!   buffers, and [`crate::train::FiniteGuard::begin`];
//! - the *body*: forward passes, the penalty's double backward, the backward pass, the
//!   non-finite check, the optimiser step, and copies of the losses into static output buffers.
//!   It reads only static device buffers, never synchronises with the host (on a GPU) and draws
//!   no random numbers, so it can be captured.
//!
//! Eager and graph runs do the same arithmetic on the same buffers in the same order, so they
//! train the same networks (scripts/gpu_check.sh checks 10 steps agree within 1e-5).

use crate::core::stage::StageError;
use crate::train::cuda::CudaGraph;
use crate::train::speed::Speed;
use crate::train::TrainError;

/// Eager updates before the capture (cuDNN's and cuBLAS's first calls allocate workspaces and
/// pick algorithms; PyTorch's recipe warms up the same way).
pub const WARMUP_UPDATES: u32 = 3;

/// How one update ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ran {
    /// The body ran on the host, launching its kernels one by one.
    Eager,
    /// The body was captured, then the graph replayed once.
    Captured,
    /// The captured graph was replayed; the body did not run on the host, so host-side
    /// bookkeeping (the optimiser's step count) is the caller's.
    Replayed,
}

/// Runs one stage's updates as the speed settings say.
#[derive(Default)]
pub struct StepRunner {
    graph: Option<CudaGraph>,
    warmup_left: u32,
    /// On a failed capture, go on eagerly (`execution: Auto`) instead of failing.
    fallback: bool,
    /// Why the capture failed, when it fell back (for the stage's warning; taken once).
    pub fell_back: Option<String>,
}

impl StepRunner {
    /// A runner for `speed`: with `speed.graph`, a CUDA graph to capture after
    /// [`WARMUP_UPDATES`] eager updates. Errors: the graph cannot be made (a build without
    /// CUDA's headers).
    pub fn new(speed: &Speed) -> Result<Self, TrainError> {
        let mut fell_back = None;
        let graph = match speed.graph.then(CudaGraph::new).transpose() {
            Ok(g) => g,
            // Auto: no graph, eager updates, and the reason for the stage's warning.
            Err(e) if speed.graph_fallback => {
                fell_back = Some(e.to_string());
                None
            }
            Err(e) => return Err(e.into()),
        };
        Ok(StepRunner { graph, warmup_left: WARMUP_UPDATES, fallback: speed.graph_fallback, fell_back })
    }

    /// Run one update's body: eagerly, or captured, or as a replay of the captured graph (the
    /// body is then not called).
    pub fn run(&mut self, body: impl FnOnce() -> Result<(), StageError>) -> Result<Ran, StageError> {
        match &mut self.graph {
            None => body().map(|_| Ran::Eager),
            Some(_) if self.warmup_left > 0 => {
                self.warmup_left -= 1;
                body().map(|_| Ran::Eager)
            }
            Some(g) if !g.is_captured() => {
                // The body runs on the host once, inside the capture.
                let mut body = Some(body);
                let captured = g.capture(|| body.take().map_or(Ok(()), |b| b()).map_err(CaptureFailed::Body));
                match captured {
                    Ok(()) => Ok(Ran::Captured),
                    Err(CaptureFailed::Body(e)) => Err(e),
                    Err(CaptureFailed::Cuda(e)) if self.fallback => {
                        // Auto: go on without the graph. The body's work was only recorded, not
                        // done (or not at all if capture never began): run it eagerly.
                        self.graph = None;
                        self.fell_back = Some(e.to_string());
                        match body.take() {
                            Some(b) => b().map(|_| Ran::Eager),
                            None => Err(StageError::msg(format!(
                                "{e}: the update was recorded but not run; set `execution: Eager` in the pipeline"
                            ))),
                        }
                    }
                    Err(CaptureFailed::Cuda(e)) => Err(StageError::Train(TrainError::Cuda(e))),
                }
            }
            Some(g) => g.replay().map(|_| Ran::Replayed).map_err(|e| StageError::Train(TrainError::Cuda(e))),
        }
    }

    /// Whether updates run as graph replays from now on.
    pub fn replaying(&self) -> bool {
        self.graph.as_ref().is_some_and(|g| g.is_captured())
    }
}

/// The warning of a stage whose capture failed under `execution: Auto` (it goes on eagerly).
pub fn fell_back_warning(why: &str) -> String {
    format!("the CUDA graph capture failed, so this stage goes on eagerly (set `execution: Eager` to skip the attempt): {why}")
}

/// A capture that failed: in the body, or in CUDA.
enum CaptureFailed {
    Body(StageError),
    Cuda(crate::train::cuda::CudaError),
}

impl From<crate::train::cuda::CudaError> for CaptureFailed {
    fn from(e: crate::train::cuda::CudaError) -> Self {
        CaptureFailed::Cuda(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eager_runs_the_body_every_time_and_a_graph_needs_cuda() {
        let mut r = StepRunner::new(&Speed::default()).unwrap();
        let mut n = 0;
        for _ in 0..5 {
            assert_eq!(r.run(|| Ok(n += 1)).unwrap(), Ran::Eager);
        }
        assert_eq!(n, 5);
        assert!(!r.replaying());
        let e = r.run(|| Err(StageError::msg("body failed"))).unwrap_err();
        assert_eq!(e.to_string(), "body failed");
        // A graph runner: its warm-up updates are eager; where CUDA is missing (this machine, or
        // a build without CUDA's headers) the capture fails with CUDA's reason, not a panic.
        let graph = Speed { graph: true, ..Speed::default() };
        match StepRunner::new(&graph) {
            Ok(mut r) => {
                for _ in 0..WARMUP_UPDATES {
                    assert_eq!(r.run(|| Ok(())).unwrap(), Ran::Eager);
                }
                if !tch::Cuda::is_available() {
                    let e = r.run(|| Ok(())).unwrap_err().to_string();
                    assert!(e.starts_with("CUDA graph capture: "), "{e}");
                    assert!(!r.replaying());
                }
            }
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("without CUDA's headers") || e.starts_with("CUDA graph: "), "{e}");
            }
        }
        // Under `execution: Auto`, a graph that cannot be made or captured falls back to eager
        // updates, with the reason kept for the stage's warning.
        if tch::Cuda::is_available() {
            return;
        }
        // Where the graph cannot even be made (no GPU here), the runner goes on eagerly too.
        let mut r = StepRunner::new(&Speed { graph: true, graph_fallback: true, ..Speed::default() }).unwrap();
        let mut n = 0;
        for _ in 0..WARMUP_UPDATES + 2 {
            assert_eq!(r.run(|| Ok(n += 1)).unwrap(), Ran::Eager);
        }
        assert_eq!(n, WARMUP_UPDATES + 2, "every update ran");
        let why = r.fell_back.take().expect("the reason is kept");
        assert!(fell_back_warning(&why).contains("goes on eagerly") && why.starts_with("CUDA graph"), "{why}");
        assert!(r.fell_back.is_none(), "warned once");
        assert!(!r.replaying());
    }
}
