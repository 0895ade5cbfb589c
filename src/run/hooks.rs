//! Fault injection for the tests (the `fault-injection` cargo feature).

use crate::spec::Pipeline;

/// A test hook `VAR=STAGE:N` (or `STAGE:N..` when `onward` is allowed): the stage (one of
/// `p`'s), N, and whether it holds from N on. A malformed value is ignored with a warning.
/// Only in builds with the `fault-injection` feature (the tests'); other builds ignore the
/// variable, with a warning.
#[cfg(feature = "fault-injection")]
pub(super) fn test_hook(var: &str, p: &Pipeline, onward: bool, rank: usize) -> Option<(String, u64, bool)> {
    let v = std::env::var(var).ok()?;
    // `...@RANK`: for that rank of a data-parallel run only.
    let v = match v.rsplit_once('@') {
        Some((spec, r)) if r.parse::<usize>().is_ok() => {
            if r.parse::<usize>() != Ok(rank) {
                return None;
            }
            spec.to_string()
        }
        _ => v,
    };
    let r = v.split_once(':').and_then(|(s, n)| {
        let (n, on) = match n.strip_suffix("..") {
            Some(n) if onward => (n, true),
            _ => (n, false),
        };
        n.parse().ok().filter(|_| p.stages.iter().any(|st| st.name == s)).map(|n| (s.to_string(), n, on))
    });
    if r.is_none() {
        crate::say!(
            "warning: {var}={v} ignored: expected STAGE:N{} with a stage of this pipeline",
            if onward { " or STAGE:N.." } else { "" }
        );
    }
    r
}

/// `PIPE_TEST_KILL_RANK=RANK:STEP`: the generator step after which rank RANK kills itself
/// (SIGKILL), if this is that rank. Fault-injection builds only (elsewhere None, with the
/// warning of [`warn_stage_hooks`]-style hooks).
#[cfg(feature = "fault-injection")]
pub(super) fn kill_rank_hook(rank: usize) -> Option<u64> {
    let v = std::env::var("PIPE_TEST_KILL_RANK").ok()?;
    let (r, s) = v.split_once(':')?;
    (r.parse::<usize>().ok()? == rank).then(|| s.parse().ok()).flatten()
}

#[cfg(not(feature = "fault-injection"))]
pub(super) fn kill_rank_hook(_rank: usize) -> Option<u64> {
    if std::env::var_os("PIPE_TEST_KILL_RANK").is_some() {
        crate::say!("warning: PIPE_TEST_KILL_RANK ignored: this build of pipe has no fault-injection hooks");
    }
    None
}

/// Without the `fault-injection` feature there are no test hooks: `VAR` is ignored, with a
/// warning when it is set.
#[cfg(not(feature = "fault-injection"))]
pub(super) fn test_hook(var: &str, _p: &Pipeline, _onward: bool, _rank: usize) -> Option<(String, u64, bool)> {
    if std::env::var_os(var).is_some() {
        crate::say!("warning: {var} ignored: this build of pipe has no fault-injection hooks (the tests build them in with --features fault-injection)");
    }
    None
}

/// The hooks of the stages' own code (`PIPE_TEST_FULL_DISK`, read by `pipe_stages::io::atomic`):
/// in a build without them, a warning when one is set.
pub(super) fn warn_stage_hooks() {
    #[cfg(not(feature = "fault-injection"))]
    if std::env::var_os("PIPE_TEST_FULL_DISK").is_some() {
        crate::say!("warning: PIPE_TEST_FULL_DISK ignored: this build of pipe has no fault-injection hooks (the tests build them in with --features fault-injection)");
    }
}
