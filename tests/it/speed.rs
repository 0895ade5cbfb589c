//! The speed settings on a machine without a GPU (what a CPU can check of the GPU path), and
//! the tools the GPU check uses: `pipe devices` and `pipe compare`.

use crate::common::{pipeline_on, stdout, synthetic_idx, Pipe};

/// A tiny 12-step run on synthetic digits with a checkpoint at the end; returns the builder
/// (its folder holds the run).
fn tiny_run(data_seed: u64, sets: &[&str]) -> Pipe {
    let p = Pipe::new(&[]);
    let data = synthetic_idx(&p.tmp().join("idx"), 200, 28, data_seed);
    let file = pipeline_on(p.tmp(), &data);
    let mut run = Pipe::run_tiny(file.to_str().unwrap()).args(&["--max-steps", "12", "--checkpoint-every", "12"]).set("log_every=1");
    for s in sets {
        run = run.set(s);
    }
    // The data in `p`'s folder is read now; the run folder outlives it.
    run.go().code(0);
    run
}

#[test]
fn graph_and_bf16_are_refused_on_the_cpu_with_the_reason() {
    let p = Pipe::new(&[]);
    let data = synthetic_idx(&p.tmp().join("idx"), 100, 28, 1);
    let file = pipeline_on(p.tmp(), &data);
    let f = file.to_str().unwrap();
    let check = Pipe::new(&["check", f, "--set", "device=cpu", "--set", "execution=Graph", "--set", "precision=Bf16"]).go();
    check.code(2).says(&[
        "execution Graph needs a CUDA device (a CUDA graph replays GPU kernels), but this run trains on the CPU: use Auto or Eager",
        "precision Bf16 is for CUDA devices",
    ]);
    // A misspelt value names the choices.
    Pipe::new(&["check", f, "--set", "execution=Fast"]).go().code(2).says(&["execution", "Graph"]);
    // Explicit CPU-safe settings pass, and `pipe run` refuses Graph the same way.
    Pipe::new(&["check", f, "--set", "execution=Eager", "--set", "precision=Fp32", "--set", "memory_format=ChannelsLast"]).go().code(0);
    Pipe::run_tiny(f).set("execution=Graph").go().code(2).says(&["execution Graph needs a CUDA device"]);
}

#[test]
fn devices_lists_the_cpu_and_says_when_there_is_no_gpu() {
    let done = Pipe::new(&["devices"]).go();
    done.code(0);
    let out = stdout(&done.output);
    assert!(out.starts_with("cpu: "), "{out}");
    if !tch::Cuda::is_available() {
        assert!(out.contains("no CUDA device visible"), "{out}");
    }
}

#[test]
fn compare_finds_identical_runs_identical_and_other_seeds_different() {
    let a = tiny_run(3, &[]);
    // Auto on the CPU is Eager, Fp32, Contiguous: the same training, bit for bit.
    let b = tiny_run(3, &["execution=Eager", "precision=Fp32", "memory_format=Contiguous"]);
    let (ra, rb) = (a.out(), b.out());
    let same = Pipe::new(&["compare", ra.to_str().unwrap(), rb.to_str().unwrap(), "--weights-tol", "0", "--loss-tol", "0"]).go();
    same.code(0);
    let out = stdout(&same.output);
    assert!(out.contains("weights: largest relative difference 0.000e0"), "{out}");
    assert!(out.contains("(0.0%)"), "{out}");
    // Another pipeline seed: other weights, over a tight limit (exit 1, naming it).
    let c = tiny_run(3, &["seed=9"]);
    let rc = c.out();
    let differ = Pipe::new(&["compare", ra.to_str().unwrap(), rc.to_str().unwrap(), "--weights-tol", "1e-5"]).go();
    differ.code(1).says(&["the weights differ by", "over the limit 1e-5"]);
    // Not a run: exit 2, naming the folder.
    let missing = Pipe::new(&["compare", ra.to_str().unwrap(), "/nonexistent/run"]).go();
    missing.code(2).says(&["/nonexistent/run"]);
}
