//! Two ranks as two threads of this process, over loopback Gloo.

use super::*;
use std::time::Instant;
use tch::{Device, Kind};

/// A port nothing listens on (bound to port 0 and released: another process could take it in
/// between, an accepted risk).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn config(port: u16, rank: usize, world: usize, timeout: Duration) -> StoreConfig {
    StoreConfig { addr: "127.0.0.1".into(), port, rank, world, is_server: rank == 0, timeout }
}

const T: Duration = Duration::from_secs(20);

/// Runs `f(rank, group)` on 2 ranks (threads) over a fresh store and a Gloo group "train";
/// returns each rank's result, rank 0 first.
fn two_ranks<R: Send>(timeout: Duration, f: impl Fn(usize, ProcessGroup) -> R + Sync) -> Vec<R> {
    let port = free_port();
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn(move || {
                    let store = Store::connect(&config(port, rank, 2, T)).unwrap();
                    let pg = ProcessGroup::new(&store, "train", Backend::Gloo, timeout).unwrap();
                    assert_eq!((pg.rank(), pg.world()), (rank, 2));
                    f(rank, pg)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn all_reduce_broadcast_barrier() {
    let out = two_ranks(T, |rank, pg| {
        let r = rank as f32;
        let sum = Tensor::from_slice(&[1.0 + r, 10.0 * r, -3.0, 0.5]);
        pg.all_reduce_sum(&sum).unwrap();
        let max = Tensor::from_slice(&[r, -r, 7.0 * (1.0 - r), 2.0]);
        pg.all_reduce_max(&max).unwrap();
        // Non-contiguous: a transposed 2×3 goes through a contiguous copy and back.
        let nc = Tensor::from_slice(&[1.0f32, 2., 3., 4., 5., 6.]).reshape([2, 3]).tr() * (rank as f64 + 1.0);
        assert!(!nc.is_contiguous());
        pg.all_reduce_sum(&nc).unwrap();
        // Broadcast from rank 1 (not the store's server).
        let b = if rank == 1 { Tensor::from_slice(&[4.0f32, 5.0, 6.0]) } else { Tensor::zeros([3], (Kind::Float, Device::Cpu)) };
        pg.broadcast(&b, 1).unwrap();
        pg.barrier().unwrap();
        let e = pg.broadcast(&b, 2).unwrap_err();
        assert!(e.to_string().contains("root rank 2"), "{e}");
        (values(&sum), values(&max), values(&nc), values(&b))
    });
    for (sum, max, nc, b) in out {
        assert_eq!(sum, [3.0, 10.0, -6.0, 1.0]);
        assert_eq!(max, [1.0, 0.0, 7.0, 2.0]);
        assert_eq!(nc, [3.0, 12.0, 6.0, 15.0, 9.0, 18.0]);
        assert_eq!(b, [4.0, 5.0, 6.0]);
    }
}

/// The gradients of a small model on rank `rank`'s data: w (3×2) and b (2) used by both ranks,
/// u (4) only by rank 1, v (2) by neither, z (1) defined but zero on rank 0 only.
fn model_grads(rank: usize) -> Vec<Tensor> {
    let p = |shape: &[i64], v: f64| Tensor::full(shape, v, (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let (w, b, u, v, z) = (p(&[3, 2], 0.5), p(&[2], 0.25), p(&[4], 1.0), p(&[2], 1.0), p(&[1], 2.0));
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, -1.0, 0.0, 2.0]).reshape([2, 3]) * (rank as f64 + 1.0);
    let y = x.matmul(&w) + &b;
    let mut loss = (&y * &y).sum(Kind::Float);
    if rank == 1 {
        loss += (&u * 3.0).sum(Kind::Float);
    } else {
        loss += (&z * 0.0).sum(Kind::Float);
    }
    loss.backward();
    vec![w, b, u, v, z]
}

#[test]
fn average_grads_exact() {
    // What each rank's gradients are alone (computed here, on one thread).
    let (g0, g1): (Vec<Tensor>, Vec<Tensor>) = (model_grads(0), model_grads(1));
    assert!(!g0[2].grad().defined() && g1[2].grad().defined(), "u: only rank 1 has a gradient");
    assert!(!g0[3].grad().defined() && !g1[3].grad().defined(), "v: neither has");
    assert!(g0[4].grad().defined() && !g1[4].grad().defined(), "z: only rank 0 has (zeros)");
    let expect: Vec<Option<Vec<f32>>> = (0..5)
        .map(|i| {
            let (a, b) = (g0[i].grad(), g1[i].grad());
            match (a.defined(), b.defined()) {
                (false, false) => None,
                (true, false) => Some(values(&(a / 2.0))),
                (false, true) => Some(values(&(b / 2.0))),
                (true, true) => Some(values(&((a + b) / 2.0))),
            }
        })
        .collect();
    assert_eq!(expect[2], Some(vec![1.5; 4]));
    assert_eq!(expect[4], Some(vec![0.0]));
    let out = two_ranks(T, |rank, pg| {
        let params = model_grads(rank);
        let before: Vec<f32> = values(&params[0].grad());
        pg.average_grads(&params, None).unwrap();
        pg.average_grads(&[], None).unwrap();
        let after: Vec<Option<Vec<f32>>> = params.iter().map(|p| p.grad().defined().then(|| values(&p.grad()))).collect();
        (before, after)
    });
    assert_ne!(out[0].0, out[1].0, "the ranks' gradients differ before");
    for (rank, (_, after)) in out.iter().enumerate() {
        assert_eq!(after, &expect, "rank {rank}: the exact averages, u and z set where missing, v left undefined");
    }
}

#[test]
fn two_groups_concurrently() {
    let port = free_port();
    let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn(move || {
                    let store = Store::connect(&config(port, rank, 2, T)).unwrap();
                    let train = ProcessGroup::new(&store, "train", Backend::Gloo, T).unwrap();
                    let host = ProcessGroup::new(&store.clone(), "host", Backend::Gloo, T).unwrap();
                    drop(store); // the groups keep it alive
                    let run = |pg: &ProcessGroup, base: f32| {
                        let mut out = Vec::new();
                        for i in 0..50 {
                            let t = Tensor::from_slice(&[base + i as f32 + rank as f32]);
                            pg.all_reduce_sum(&t).unwrap();
                            out.push(values(&t)[0]);
                        }
                        out
                    };
                    std::thread::scope(|s2| {
                        let (run, train, host) = (&run, &train, &host);
                        let a = s2.spawn(move || run(train, 0.0));
                        let b = s2.spawn(move || run(host, 1000.0));
                        vec![a.join().unwrap(), b.join().unwrap()]
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r[0], (0..50).map(|i| (2 * i + 1) as f32).collect::<Vec<_>>());
        assert_eq!(r[1], (0..50).map(|i| (2000 + 2 * i + 1) as f32).collect::<Vec<_>>());
    }
}

/// Rank 1 drops its group after a barrier; rank 0's next all-reduce fails at once (the group's
/// timeout is 20 s), naming the closed connection.
#[test]
fn peer_drops_group() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    let out = two_ranks(T, |rank, pg| {
        pg.barrier().unwrap();
        if rank == 1 {
            drop(pg);
            tx.send(()).unwrap();
            return None;
        }
        rx.lock().unwrap().recv().unwrap();
        let t = Tensor::ones([1 << 16], (Kind::Float, Device::Cpu));
        let start = Instant::now();
        let r = pg.all_reduce_sum(&t);
        let second = pg.all_reduce_sum(&t);
        Some((r, second, start.elapsed()))
    });
    let (r, second, took) = out.into_iter().next().unwrap().unwrap();
    let e = r.unwrap_err();
    eprintln!("peer dropped: {e} (after {took:?})");
    assert!(took < Duration::from_secs(5), "{took:?}: {e}");
    assert_eq!(e.what, "all_reduce");
    assert!(e.msg.contains("Connection closed by peer") || e.msg.contains("imed out"), "{e}");
    assert!(!e.msg.contains("pair.cc") && !e.msg.contains('\n'), "one line, no source position: {e}");
    assert!(second.is_err(), "the group stays broken");
}

/// Rank 0 is already waiting in an all-reduce when rank 1 drops its group: the wait ends in an
/// error at once, not at the 20 s timeout.
#[test]
fn peer_drops_group_while_waiting() {
    let out = two_ranks(T, |rank, pg| {
        pg.barrier().unwrap();
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(300));
            drop(pg);
            return None;
        }
        let start = Instant::now();
        let r = pg.all_reduce_sum(&Tensor::ones([4], (Kind::Float, Device::Cpu)));
        Some((r, start.elapsed()))
    });
    let (r, took) = out.into_iter().next().unwrap().unwrap();
    let e = r.unwrap_err();
    eprintln!("peer dropped while waiting: {e} (after {took:?})");
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(5), "{took:?}: {e}");
    assert!(e.msg.contains("Connection closed by peer"), "{e}");
}

/// Rank 1 stays but does not take part: rank 0's all-reduce fails after the group's timeout.
#[test]
fn stuck_peer_times_out() {
    let timeout = Duration::from_millis(1500);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    let out = two_ranks(timeout, |rank, pg| {
        pg.barrier().unwrap();
        if rank == 1 {
            rx.lock().unwrap().recv().unwrap(); // until rank 0 is done
            return None;
        }
        let start = Instant::now();
        let r = pg.all_reduce_sum(&Tensor::ones([4], (Kind::Float, Device::Cpu)));
        let took = start.elapsed();
        tx.send(()).unwrap();
        Some((r, took))
    });
    let (r, took) = out.into_iter().next().unwrap().unwrap();
    let e = r.unwrap_err();
    eprintln!("stuck peer: {e} (after {took:?})");
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(5), "{took:?}: {e}");
    assert!(e.msg.contains("imed out"), "{e}");
}

#[test]
fn port_in_use() {
    let busy = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let start = Instant::now();
    let e = Store::connect(&config(port, 0, 1, Duration::from_secs(2))).unwrap_err();
    eprintln!("port in use: {e} (after {:?})", start.elapsed());
    assert_eq!(e.what, "TCPStore connect");
    assert!(e.msg.contains("EADDRINUSE") || e.msg.contains("in use"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn no_server_times_out() {
    let port = free_port();
    let start = Instant::now();
    let e = Store::connect(&config(port, 1, 2, Duration::from_millis(800))).unwrap_err();
    let took = start.elapsed();
    eprintln!("no server: {e} (after {took:?})");
    assert_eq!(e.what, "TCPStore connect");
    assert!(e.msg.to_lowercase().contains("timed out") || e.msg.contains("timeout"), "{e}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn bad_arguments() {
    let e = Store::connect(&config(1, 0, 0, T)).unwrap_err();
    assert!(e.to_string().contains("world size is 0"), "{e}");
    let e = Store::connect(&config(1, 2, 2, T)).unwrap_err();
    assert!(e.to_string().contains("rank 2 is not below"), "{e}");
    // A world of one: collectives are identities; NCCL where the build lacks it says so.
    let store = Store::connect(&config(free_port(), 0, 1, T)).unwrap();
    let pg = ProcessGroup::new(&store, "solo", Backend::Gloo, T).unwrap();
    let t = Tensor::from_slice(&[2.0f32, 3.0]);
    pg.all_reduce_sum(&t).unwrap();
    assert_eq!(values(&t), [2.0, 3.0]);
    if !Backend::nccl_built() {
        let e = ProcessGroup::new(&store, "gpu", Backend::Nccl, T).unwrap_err();
        assert!(e.to_string().contains("this build has no NCCL"), "{e}");
    } else if !tch::Cuda::is_available() {
        // NCCL built in, no GPU: c10d refuses with an error, no abort.
        let e = ProcessGroup::new(&store, "gpu", Backend::Nccl, T).unwrap_err();
        eprintln!("NCCL without a GPU: {e}");
        assert_eq!(e.what, "new process group");
    }
    let e = ProcessGroup::new(&store, "a\0b", Backend::Gloo, T).unwrap_err();
    assert!(e.to_string().contains("NUL"), "{e}");
}

#[test]
fn batch_norm_running_statistics_are_averaged_over_the_ranks() {
    use tch::nn::{self, ModuleT};
    let out = two_ranks(T, |rank, pg| {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root() / "lin", 3, 4, Default::default());
        let bn = nn::batch_norm1d(vs.root() / "bn", 4, Default::default());
        // Each rank's own share of the batch: different statistics.
        let x = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0, 0.0, 1.0, -1.0, 2.0, 2.5]).reshape([3, 3]) * (1.0 + 2.0 * rank as f64);
        let _ = bn.forward_t(&lin.forward_t(&x, true), true);
        let local = (values(&bn.running_mean), values(&bn.running_var));
        let weights = values(&lin.ws);
        let mut run = crate::train::RunSettings::new(Device::Cpu, None, 1, 0);
        run.group = Some(std::sync::Arc::new(pg));
        crate::train::average_buffers(&run, &vs, "test statistics").unwrap();
        (local, (values(&bn.running_mean), values(&bn.running_var)), weights, values(&lin.ws))
    });
    let mean = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect::<Vec<f32>>();
    let want = (mean(&out[0].0 .0, &out[1].0 .0), mean(&out[0].0 .1, &out[1].0 .1));
    assert_ne!(out[0].0, out[1].0, "the ranks' own statistics differ");
    for (_, after, w_before, w_after) in &out {
        for (a, b) in after.0.iter().zip(&want.0).chain(after.1.iter().zip(&want.1)) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(w_before, w_after, "trainable weights are left alone");
    }
}

#[test]
fn average_grads_carries_votes_exactly() {
    let n = 300_000i64;
    let out = two_ranks(T, |rank, pg| {
        let p = Tensor::zeros([n], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        // Gradient i on rank r: i·(r + 1), so the average is 1.5·i, exact in f32 below 2²⁴.
        let w = Tensor::arange(n, (Kind::Float, Device::Cpu)) * (rank as f64 + 1.0);
        (&p * &w).sum(Kind::Float).backward();
        let votes = Tensor::from_slice(&[rank as f32, 1.0, 0.0]);
        pg.average_grads(&[p.shallow_clone()], Some(&votes)).unwrap();
        let g = p.grad();
        let expect = Tensor::arange(n, (Kind::Float, Device::Cpu)) * 1.5;
        ((g - expect).abs().max().double_value(&[]), values(&votes))
    });
    for (diff, votes) in out {
        assert_eq!(diff, 0.0);
        assert_eq!(votes, [1.0, 2.0, 0.0], "the votes are summed, not averaged");
    }
}
