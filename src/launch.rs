//! Data-parallel launch: the ranks' environment (as `torchrun` sets it) and `pipe run --nproc N`,
//! which starts N ranks of the same run on this machine.
//!
//! Each rank is a `pipe run` process. Rank 0 hosts c10d's TCP store at `MASTER_ADDR:MASTER_PORT`;
//! the others connect to it (see `pipe_stages::dist`). `torchrun --no-python` sets the same
//! variables, so `torchrun --no-python --nnodes 2 --nproc-per-node 4 ... pipe run FILE` runs
//! across machines with no change to pipe.

use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What went wrong reading the ranks' environment or starting the ranks.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// An environment variable is missing or malformed (its name, value and what was expected).
    #[error("{name}={value:?}: {expected}")]
    Env { name: &'static str, value: String, expected: String },
    /// A variable the data-parallel launch needs is not set.
    #[error("{name} is not set, but WORLD_SIZE is {world}: a data-parallel rank needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun sets them; or use `pipe run FILE --nproc N`)")]
    Missing { name: &'static str, world: usize },
    /// `--nproc` out of range.
    #[error("--nproc {0}: expected 1 to 1024 processes")]
    Nproc(usize),
    /// A rank could not be started, or the launcher could not find a free port.
    #[error("{0}")]
    Io(String),
}

/// One rank's place in a data-parallel run, read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    /// Global rank, 0..world.
    pub rank: usize,
    /// Number of ranks in all.
    pub world: usize,
    /// Rank on this machine (`LOCAL_RANK`; the GPU a CUDA rank trains on), default `rank`.
    pub local_rank: usize,
    /// Host of rank 0's store.
    pub master_addr: String,
    pub master_port: u16,
    /// `TORCHELASTIC_USE_AGENT_STORE=True`: torchrun's agent already serves the store, so rank
    /// 0 connects to it as a client instead of starting one.
    pub agent_store: bool,
}

impl RankEnv {
    /// Read torchrun's variables through `get` (the process environment in [`RankEnv::from_env`]).
    /// `Ok(None)`: not a data-parallel launch (`WORLD_SIZE` unset, or 1 with no `RANK`).
    ///
    /// Errors ([`LaunchError`]): a world size of 0 or a number that does not parse, a rank
    /// outside 0..world, a missing `RANK`, `MASTER_ADDR` or `MASTER_PORT`, a port that is not
    /// 1 to 65535.
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>, LaunchError> {
        let Some(w) = get("WORLD_SIZE") else { return Ok(None) };
        let world = number("WORLD_SIZE", &w, "expected the number of ranks, at least 1")?;
        if world == 0 {
            return Err(LaunchError::Env { name: "WORLD_SIZE", value: w, expected: "expected the number of ranks, at least 1".into() });
        }
        let Some(r) = get("RANK") else {
            return if world == 1 { Ok(None) } else { Err(LaunchError::Missing { name: "RANK", world }) };
        };
        let rank = number("RANK", &r, &format!("expected a rank 0 to {}", world - 1))?;
        if rank >= world {
            return Err(LaunchError::Env {
                name: "RANK",
                value: r,
                expected: format!("expected a rank 0 to {} (WORLD_SIZE is {world})", world - 1),
            });
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", &v, "expected this machine's rank, 0 or more")?,
            None => rank,
        };
        let master_addr = get("MASTER_ADDR").filter(|a| !a.is_empty()).ok_or(LaunchError::Missing { name: "MASTER_ADDR", world })?;
        let p = get("MASTER_PORT").ok_or(LaunchError::Missing { name: "MASTER_PORT", world })?;
        let master_port = match p.trim().parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(LaunchError::Env { name: "MASTER_PORT", value: p, expected: "expected a TCP port, 1 to 65535".into() }),
        };
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        Ok(Some(RankEnv { rank, world, local_rank, master_addr, master_port, agent_store }))
    }

    /// [`RankEnv::read`] on this process's environment.
    pub fn from_env() -> Result<Option<RankEnv>, LaunchError> {
        RankEnv::read(|k| std::env::var(k).ok())
    }

    /// Whether this rank serves the store (rank 0, unless torchrun's agent does).
    pub fn serves_store(&self) -> bool {
        self.rank == 0 && !self.agent_store
    }
}

/// Whether this process is a data-parallel rank other than 0 (`RANK` set and not 0): it prints
/// no progress or summary (rank 0 speaks for the run).
pub fn is_worker() -> bool {
    std::env::var("RANK").ok().and_then(|r| r.trim().parse::<usize>().ok()).is_some_and(|r| r != 0)
        && std::env::var("WORLD_SIZE").ok().and_then(|w| w.trim().parse::<usize>().ok()).is_some_and(|w| w > 1)
}

fn number(name: &'static str, value: &str, expected: &str) -> Result<usize, LaunchError> {
    value.trim().parse::<usize>().map_err(|_| LaunchError::Env { name, value: value.to_string(), expected: expected.to_string() })
}

/// A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it; rank 0 binds it soon
/// after, so a race with another program is possible but unlikely).
pub fn free_port() -> Result<u16, LaunchError> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| LaunchError::Io(format!("finding a free port on 127.0.0.1: {e}")))?;
    l.local_addr().map(|a| a.port()).map_err(|e| LaunchError::Io(format!("finding a free port on 127.0.0.1: {e}")))
}

/// How long the launcher waits for the other ranks after one failed before it kills them. They
/// normally stop by themselves within milliseconds (their peer's connection closes); a rank
/// stuck outside a collective gets this long.
pub const GRACE: Duration = Duration::from_secs(30);

/// Start `n` ranks of `exe args...` on this machine and wait for them.
///
/// Each rank gets `RANK` = `LOCAL_RANK` = i, `WORLD_SIZE` = `LOCAL_WORLD_SIZE` = n,
/// `MASTER_ADDR=127.0.0.1`, `MASTER_PORT` = a free port, and, unless already set,
/// `OMP_NUM_THREADS` = cores / n (at least 1), so the ranks do not oversubscribe the CPU. The
/// ranks run in their own process group: an interrupt (`interrupts` counts them; Ctrl-C) is
/// forwarded to every rank once per interrupt, so each drains (the first) or stops at once
/// (the second) as a single run would.
///
/// Returns the launcher's exit code: 0 when every rank succeeded; otherwise the first failed
/// rank's code (130 after an interrupt), with a line naming it on stderr. When a rank fails,
/// the others get [`GRACE`] to stop on their own, then are killed.
pub fn launch(exe: &Path, args: &[String], n: usize, interrupts: Arc<AtomicUsize>) -> Result<i32, LaunchError> {
    if n == 0 || n > 1024 {
        return Err(LaunchError::Nproc(n));
    }
    let port = free_port()?;
    let threads = std::thread::available_parallelism().map_or(1, |c| c.get()).div_euclid(n).max(1);
    let mut ranks: Vec<Child> = Vec::with_capacity(n);
    for i in 0..n {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env("RANK", i.to_string())
            .env("LOCAL_RANK", i.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            cmd.env("OMP_NUM_THREADS", threads.to_string());
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        match cmd.spawn() {
            Ok(c) => ranks.push(c),
            Err(e) => {
                for c in &mut ranks {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(LaunchError::Io(format!("starting rank {i} ({}): {e}", exe.display())));
            }
        }
    }
    let mut status: Vec<Option<ExitStatus>> = vec![None; n];
    let mut forwarded = 0usize;
    let mut first_failure: Option<(usize, ExitStatus, Instant)> = None;
    loop {
        let asked = interrupts.load(Ordering::SeqCst);
        while forwarded < asked {
            for (c, s) in ranks.iter().zip(&status) {
                if s.is_none() {
                    // SAFETY: kill(2) on a child we started and have not reaped.
                    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
                }
            }
            forwarded += 1;
        }
        for (i, c) in ranks.iter_mut().enumerate() {
            if status[i].is_none() {
                if let Ok(Some(s)) = c.try_wait() {
                    status[i] = Some(s);
                    if !s.success() && first_failure.is_none() {
                        // After an interrupt, 130 is a rank that drained as asked, not a failure.
                        let drained = forwarded > 0 && s.code() == Some(130);
                        if !drained {
                            eprintln!("pipe: rank {i} of {n} {}; stopping the other ranks", describe(s));
                        }
                        first_failure = Some((i, s, Instant::now()));
                    }
                }
            }
        }
        if status.iter().all(Option::is_some) {
            break;
        }
        if let Some((_, _, at)) = first_failure {
            if at.elapsed() > GRACE {
                for (i, c) in ranks.iter_mut().enumerate() {
                    if status[i].is_none() {
                        eprintln!("pipe: rank {i} still running {} s after a rank failed: killing it", GRACE.as_secs());
                        let _ = c.kill();
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(match first_failure {
        None => 0,
        Some((_, s, _)) => s.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(1)),
    })
}

/// "exited with status 2", "was killed by signal 9 (SIGKILL)".
fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}{}", if sig == libc::SIGKILL { " (SIGKILL)" } else { "" }),
        _ => "ended".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<Option<RankEnv>, LaunchError> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        RankEnv::read(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables_are_read_and_checked() {
        assert_eq!(read(&[]).unwrap(), None);
        assert_eq!(read(&[("WORLD_SIZE", "1")]).unwrap(), None);
        let full = [("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "29500")];
        let r = read(&full).unwrap().unwrap();
        assert_eq!(r, RankEnv { rank: 3, world: 4, local_rank: 1, master_addr: "node0".into(), master_port: 29500, agent_store: false });
        assert!(!r.serves_store());
        let r0 = read(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert!(r0.agent_store && !r0.serves_store() && r0.local_rank == 0);

        let err = |v: &[(&str, &str)]| read(v).unwrap_err().to_string();
        assert_eq!(err(&[("WORLD_SIZE", "0")]), "WORLD_SIZE=\"0\": expected the number of ranks, at least 1");
        assert!(err(&[("WORLD_SIZE", "two")]).starts_with("WORLD_SIZE=\"two\""));
        assert!(err(&[("WORLD_SIZE", "2")]).starts_with("RANK is not set, but WORLD_SIZE is 2"));
        assert_eq!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]),
            "RANK=\"2\": expected a rank 0 to 1 (WORLD_SIZE is 2)"
        );
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "1")]).starts_with("MASTER_ADDR is not set"));
        assert_eq!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")]),
            "MASTER_PORT=\"70000\": expected a TCP port, 1 to 65535"
        );
    }

    #[test]
    fn launcher_reports_the_failed_rank_and_its_status() {
        // Two "ranks" of a shell: rank 1 fails with 3, rank 0 succeeds.
        let sh = Path::new("/bin/sh");
        let args = vec!["-c".to_string(), "test \"$RANK\" = 1 && exit 3; test \"$WORLD_SIZE\" = 2 && test -n \"$MASTER_PORT\"".to_string()];
        let code = launch(sh, &args, 2, Arc::default()).unwrap();
        assert_eq!(code, 3);
        let ok = vec!["-c".to_string(), "test \"$LOCAL_RANK\" = \"$RANK\" && test \"$MASTER_ADDR\" = 127.0.0.1".to_string()];
        assert_eq!(launch(sh, &ok, 3, Arc::default()).unwrap(), 0);
        assert_eq!(launch(sh, &ok, 0, Arc::default()).unwrap_err().to_string(), "--nproc 0: expected 1 to 1024 processes");
    }
}
