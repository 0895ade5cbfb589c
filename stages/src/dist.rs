//! Data-parallel communication on PyTorch's own c10d, through the C++ shim (stages/csrc/dist.cpp):
//! a [`Store`] (c10d's TCPStore) for the rendezvous, and [`ProcessGroup`]s over it (Gloo on the
//! CPU; NCCL on CUDA in builds with CUDA's headers), each under its own key prefix so that
//! several run independently.
//!
//! Collectives are blocking: each call returns when the operation is complete on this rank (c10d's
//! `work->wait()`). As with c10d, every rank of a group must issue the same collectives in the
//! same order, with tensors of the same size and dtype; a group is `Sync` so that it can be shared,
//! but two threads of one rank calling collectives on the same group at once would pair them up
//! differently on different ranks.
//!
//! Faults: a peer whose process dies or drops its group closes its connections, and the others'
//! next (or pending) collective fails within milliseconds ("Connection closed by peer"); a peer
//! that stops taking part without closing makes them fail after the group's timeout ("Timed out
//! waiting 2000ms for recv operation to complete"). After either, the group is unusable: drop it.
//! Nothing here panics on such errors.
//!
//! Logging: c10's log level is read from `TORCH_CPP_LOG_LEVEL` (as in Python); unset, it is
//! ERROR rather than c10's WARNING, because c10d's warnings (connect retries, closed sockets)
//! repeat on every rank what the errors here already say.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::Arc;
use std::time::Duration;
use tch::Tensor;

extern "C" {
    fn pipe_dist_nccl_built() -> c_int;
    fn pipe_dist_store_new(
        addr: *const c_char,
        port: u16,
        world: i64,
        is_server: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn pipe_dist_store_free(s: *mut c_void);
    fn pipe_dist_group_new(
        store: *mut c_void,
        prefix: *const c_char,
        backend: c_int,
        rank: i64,
        world: i64,
        timeout_ms: i64,
        iface: *const c_char,
        host: *const c_char,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn pipe_dist_group_free(g: *mut c_void);
    fn pipe_dist_all_reduce(g: *mut c_void, t: *mut c_void, op: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_dist_broadcast(g: *mut c_void, t: *mut c_void, root: i64, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_dist_barrier(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn pipe_dist_average_grads(
        g: *mut c_void,
        params: *const *mut c_void,
        n: i64,
        world: i64,
        extra: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// An error of the communication layer: what was being done ("all_reduce", "TCPStore connect",
/// ...) and c10d's message, first line, without backtrace or source position, e.g.
/// `c10d all_reduce: Connection closed by peer [127.0.0.1]:1234`. Callers add what it was for
/// ("all-reduce of D's gradients").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("c10d {what}: {msg}")]
pub struct DistError {
    pub what: &'static str,
    pub msg: String,
}

fn call(what: &'static str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), DistError> {
    crate::train::cuda::call(what, f).map_err(|e| DistError { what, msg: e.msg })
}

fn bad(what: &'static str, msg: impl Into<String>) -> DistError {
    DistError { what, msg: msg.into() }
}

fn c_string(what: &'static str, s: &str) -> Result<CString, DistError> {
    CString::new(s).map_err(|_| bad(what, format!("{s:?} contains a NUL byte")))
}

/// Milliseconds of a timeout, at least 1 (c10d reads 0 as "no timeout" in places).
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// The communication library of a [`ProcessGroup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors, TCP.
    Gloo,
    /// NCCL: CUDA tensors (each rank's on its own device). Only in builds with CUDA's headers and
    /// the nvidia-nccl wheel's (see [`Backend::nccl_built`]); elsewhere [`ProcessGroup::new`]
    /// fails with "this build has no NCCL".
    Nccl,
}

impl Backend {
    /// Whether this build has NCCL.
    pub fn nccl_built() -> bool {
        // SAFETY: no arguments, no state.
        unsafe { pipe_dist_nccl_built() != 0 }
    }
}

/// Where and how to reach the rendezvous store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Host name or address of the server (torchrun's `MASTER_ADDR`).
    pub addr: String,
    /// Its TCP port (`MASTER_PORT`).
    pub port: u16,
    /// This process's rank, 0..world.
    pub rank: usize,
    /// Number of ranks (`WORLD_SIZE`), at least 1.
    pub world: usize,
    /// Whether this process hosts the server (rank 0, unless torchrun's agent hosts it:
    /// `TORCHELASTIC_USE_AGENT_STORE=True`).
    pub is_server: bool,
    /// How long to keep trying to connect, and, on the server, to wait for all `world` ranks to
    /// connect; also the timeout of the store's own operations.
    pub timeout: std::time::Duration,
}

struct StoreHandle(*mut c_void);

// SAFETY: c10d::Store is thread-safe (TCPStore serialises its client socket); the handle is only
// freed on drop, when no other reference to it is left.
unsafe impl Send for StoreHandle {}
unsafe impl Sync for StoreHandle {}

impl Drop for StoreHandle {
    fn drop(&mut self) {
        // SAFETY: made by pipe_dist_store_new, freed once.
        unsafe { pipe_dist_store_free(self.0) }
    }
}

/// A c10d TCPStore: a connection to the rendezvous server, and the server itself on the process
/// that hosts it (it serves as long as any clone of this handle or any group made from it lives).
/// Clones share the connection.
#[derive(Clone)]
pub struct Store {
    handle: Arc<StoreHandle>,
    cfg: Arc<StoreConfig>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({}:{}, rank {} of {})", self.cfg.addr, self.cfg.port, self.cfg.rank, self.cfg.world)
    }
}

impl Store {
    /// Connects to the store (starting its server first with `is_server`). The server waits until
    /// all `world` ranks have connected; a client retries until the server is there. Both give up
    /// after `cfg.timeout`.
    ///
    /// Errors ([`DistError`], what = "TCPStore connect"): `world` 0 or `rank` ≥ `world`; the port
    /// in use ("... EADDRINUSE ..."); no server or not all ranks within the timeout ("... timed
    /// out ..."); a host name that does not resolve.
    pub fn connect(cfg: &StoreConfig) -> Result<Store, DistError> {
        const WHAT: &str = "TCPStore connect";
        if cfg.world == 0 {
            return Err(bad(WHAT, "the world size is 0"));
        }
        if cfg.rank >= cfg.world {
            return Err(bad(WHAT, format!("rank {} is not below the world size {}", cfg.rank, cfg.world)));
        }
        let addr = c_string(WHAT, &cfg.addr)?;
        let mut out = std::ptr::null_mut();
        // SAFETY: the strings and out-pointer live for the call.
        call(WHAT, |e, n| unsafe {
            pipe_dist_store_new(addr.as_ptr(), cfg.port, cfg.world as i64, cfg.is_server as c_int, millis(cfg.timeout), &mut out, e, n)
        })?;
        Ok(Store { handle: Arc::new(StoreHandle(out)), cfg: Arc::new(cfg.clone()) })
    }

    /// The configuration it was connected with.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }
}

/// Whether `addr` names this machine's loopback interface.
fn is_loopback(addr: &str) -> bool {
    addr == "localhost" || addr.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
}

/// A process group: one communicator over all ranks of a [`Store`].
pub struct ProcessGroup {
    ptr: *mut c_void,
    rank: usize,
    world: usize,
    backend: Backend,
}

// SAFETY: c10d backends accept work from any thread (they queue it); the pointer is freed only
// on drop.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessGroup({:?}, rank {} of {})", self.backend, self.rank, self.world)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: made by pipe_dist_group_new, freed once. c10d's destructor waits for queued
        // work (none: every collective here is waited for) and closes the connections.
        unsafe { pipe_dist_group_free(self.ptr) }
    }
}

impl ProcessGroup {
    /// One group over `store`, keys under `prefix` (c10d::PrefixStore), so several groups (e.g.
    /// "train", "host") run independently. Every rank must create its groups in the same order:
    /// creation is a rendezvous that waits (up to `timeout`) for all ranks.
    ///
    /// `timeout` is also every collective's: a peer that stops taking part makes the others'
    /// collective fail after it (one that closes its connections: at once).
    ///
    /// Gloo's network device: the interface `GLOO_SOCKET_IFNAME` names when set (as in PyTorch);
    /// else 127.0.0.1 when the store's address is a loopback one; else the address this machine's
    /// host name resolves to (loopback if none). NCCL: each rank's tensors on its own CUDA device,
    /// made current by the caller.
    ///
    /// Errors (what = "new process group"): a prefix with a NUL byte; Nccl in a build without it;
    /// ranks missing within the timeout; no such interface.
    pub fn new(store: &Store, prefix: &str, backend: Backend, timeout: Duration) -> Result<ProcessGroup, DistError> {
        const WHAT: &str = "new process group";
        let prefix_c = c_string(WHAT, prefix)?;
        let iface = std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default();
        let host = if iface.is_empty() && is_loopback(&store.cfg.addr) { "127.0.0.1" } else { "" };
        let (iface, host) = (c_string(WHAT, &iface)?, c_string(WHAT, host)?);
        let code = match backend {
            Backend::Gloo => 0,
            Backend::Nccl => 1,
        };
        let (rank, world) = (store.cfg.rank, store.cfg.world);
        let mut out = std::ptr::null_mut();
        // SAFETY: the store handle, strings and out-pointer live for the call.
        call(WHAT, |e, n| unsafe {
            pipe_dist_group_new(
                store.handle.0,
                prefix_c.as_ptr(),
                code,
                rank as i64,
                world as i64,
                millis(timeout),
                iface.as_ptr(),
                host.as_ptr(),
                &mut out,
                e,
                n,
            )
        })?;
        Ok(ProcessGroup { ptr: out, rank, world, backend })
    }

    /// This process's rank in the group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The backend it was made with.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn all_reduce(&self, what: &'static str, t: &Tensor, op: c_int) -> Result<(), DistError> {
        // SAFETY: the group and tensor live for the call; the tensor is changed in place.
        call(what, |e, n| unsafe { pipe_dist_all_reduce(self.ptr, t.as_ptr() as *mut c_void, op, e, n) })
    }

    /// Replaces `t` on every rank with the element-wise sum over the ranks, in place; returns when
    /// done. Errors (what = "all_reduce"): a peer gone or timed out, tensors that differ between
    /// ranks in size or dtype (or hang until the timeout, as c10d may not notice).
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<(), DistError> {
        self.all_reduce("all_reduce", t, 0)
    }

    /// As [`ProcessGroup::all_reduce_sum`], with the element-wise maximum.
    pub fn all_reduce_max(&self, t: &Tensor) -> Result<(), DistError> {
        self.all_reduce("all_reduce max", t, 1)
    }

    /// Copies `t` of rank `root` into `t` on every other rank, in place. Errors (what =
    /// "broadcast"): `root` not a rank; as for [`ProcessGroup::all_reduce_sum`].
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), DistError> {
        const WHAT: &str = "broadcast";
        if root >= self.world {
            return Err(bad(WHAT, format!("root rank {root} is not below the world size {}", self.world)));
        }
        // SAFETY: the group and tensor live for the call; the tensor is changed in place.
        call(WHAT, |e, n| unsafe { pipe_dist_broadcast(self.ptr, t.as_ptr() as *mut c_void, root as i64, e, n) })
    }

    /// Returns when every rank has called it. Errors (what = "barrier"): a peer gone or timed out.
    pub fn barrier(&self) -> Result<(), DistError> {
        // SAFETY: the group lives for the call.
        call("barrier", |e, n| unsafe { pipe_dist_barrier(self.ptr, e, n) })
    }

    /// Average gradients of `params` over ranks: the gradients are flattened into one buffer
    /// (in the order of `params`, which must be the same on every rank, as must the parameters'
    /// shapes), all-reduced (SUM) in one collective, divided by the world size and copied back
    /// (StyleGAN3's pattern; DDP's buckets are not needed).
    ///
    /// A parameter whose gradient is undefined counts as zeros: the buffer also carries, per
    /// parameter, how many ranks had a gradient. Where at least one had, every rank ends with the
    /// average (a rank without one gets it set), so the optimisers step alike everywhere; where
    /// none had, it stays undefined everywhere.
    ///
    /// All parameters must share one dtype and device. Errors (what = "average_grads"): mixed
    /// dtypes or devices, a gradient whose size differs from its parameter's; as for
    /// [`ProcessGroup::all_reduce_sum`].
    ///
    /// `extra`: a 1-D tensor of the parameters' dtype and device carried in the same collective
    /// and replaced by its sum over the ranks (not divided), so that flags the ranks must agree
    /// on (a non-finite loss, a stop) cost no extra round trip.
    pub fn average_grads(&self, params: &[Tensor], extra: Option<&Tensor>) -> Result<(), DistError> {
        let ptrs: Vec<*mut c_void> = params.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let extra = extra.map_or(std::ptr::null_mut(), |t| t.as_ptr() as *mut c_void);
        // SAFETY: the group and every tensor live for the call.
        call("average_grads", |e, n| unsafe {
            pipe_dist_average_grads(self.ptr, ptrs.as_ptr(), ptrs.len() as i64, self.world as i64, extra, e, n)
        })
    }
}

#[cfg(test)]
mod tests;
