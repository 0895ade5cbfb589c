//! A run as one rank of a data-parallel run: joining the other ranks (c10d's TCP store and a
//! Gloo or NCCL group), checking they run the same pipeline, and what a rank other than 0 leaves
//! out (it trains, and writes nothing: rank 0 alone writes grids, video, GIF, metrics,
//! checkpoints and evaluations).

use super::RunError;
use crate::launch::RankEnv;
use crate::spec::{self, Pipeline};
use pipe_stages::dist::{Backend, ProcessGroup, Store, StoreConfig};
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// How long a rank waits for the others to join the store (all ranks start at about the same
/// time; this covers slow starts and loading).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one collective may wait for a rank that is alive but not taking part (a rank that
/// dies is noticed at once: its connections close). `PIPE_DIST_TIMEOUT` (seconds) overrides it.
pub const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// This process's part in a data-parallel run.
pub struct Ranks {
    pub env: RankEnv,
    /// The group the step stages average over.
    pub group: Arc<ProcessGroup>,
    /// The group of the host stages (Gloo whatever the device): augment's σ.
    pub host_group: Arc<ProcessGroup>,
}

/// Join the ranks named by the environment (torchrun's variables, or `pipe run --nproc`), or
/// `Ok(None)` for a single-process run. Backend: Gloo on the CPU, NCCL on CUDA.
///
/// Errors: the environment is malformed ([`crate::launch::LaunchError`], exit 2); the store
/// cannot be started or reached (port in use, master unreachable: c10d's message); the ranks
/// run different pipelines (a hash of the pipeline as every rank resolved it, compared with an
/// all-reduce).
pub fn join(p: &Pipeline, device: Device) -> Result<Option<Ranks>, RunError> {
    let env = match RankEnv::from_env() {
        Ok(Some(env)) => env,
        Ok(None) => return Ok(None),
        Err(e) => return Err(RunError::Invalid(vec![e.to_string()])),
    };
    let timeout = match std::env::var("PIPE_DIST_TIMEOUT") {
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => Duration::from_secs_f64(s),
            _ => return Err(RunError::Invalid(vec![format!("PIPE_DIST_TIMEOUT={v:?}: expected seconds, more than 0")])),
        },
        Err(_) => COLLECTIVE_TIMEOUT,
    };
    let who = format!("rank {} of {}", env.rank, env.world);
    let cfg = StoreConfig {
        addr: env.master_addr.clone(),
        port: env.master_port,
        rank: env.rank,
        world: env.world,
        is_server: env.serves_store(),
        timeout: JOIN_TIMEOUT,
    };
    let failed = |what: &str, e: &dyn std::fmt::Display| RunError::Failed(format!("{who}: {what}: {e}"));
    let store = Store::connect(&cfg).map_err(|e| failed(&format!("joining the ranks at {}:{}", env.master_addr, env.master_port), &e))?;
    let backend = if device.is_cuda() { Backend::Nccl } else { Backend::Gloo };
    let group = ProcessGroup::new(&store, "train", backend, timeout).map_err(|e| failed("making the process group", &e))?;
    let host_group = ProcessGroup::new(&store, "host", Backend::Gloo, timeout).map_err(|e| failed("making the host process group", &e))?;
    // The same pipeline on every rank: compare a CRC-32 of it (max of h and of −h).
    let h = crc32fast::hash(spec::to_ron(p).as_bytes()) as i64;
    let t = Tensor::from_slice(&[h, -h]).to_kind(Kind::Int64);
    group.all_reduce_max(&t).map_err(|e| failed("comparing the pipelines", &e))?;
    if t.int64_value(&[0]) != h || -t.int64_value(&[1]) != h {
        return Err(RunError::Invalid(vec![format!(
            "{who}: the ranks run different pipelines (this rank's CRC-32 {h:08x}): start every rank with the same file and the same --set options"
        )]));
    }
    Ok(Some(Ranks { env, group: Arc::new(group), host_group: Arc::new(host_group) }))
}

/// The pipeline a rank other than 0 runs: the training stages only (sources, Augment, DStep,
/// GStep), no checkpoints. Its sinks would only write what rank 0 writes.
pub fn worker_pipeline(p: &Pipeline) -> Pipeline {
    let mut w = p.clone();
    w.stages.retain(|s| s.kind.source().is_some() || matches!(s.kind.name(), "Augment" | "DStep" | "GStep"));
    w.checkpoint = None;
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_keep_the_training_stages_only() {
        let (p, _) = spec::parse::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/mnist_mlp.ron"))).unwrap();
        let w = worker_pipeline(&p);
        let kinds: Vec<&str> = w.stages.iter().map(|s| s.kind.name()).collect();
        assert_eq!(kinds, ["IdxLoader", "Augment", "DStep", "GStep"]);
        assert!(w.checkpoint.is_none());
        assert!(p.stages.len() > w.stages.len());
    }
}
