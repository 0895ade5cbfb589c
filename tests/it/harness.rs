//! The test harness itself, and runs on data the tests make (no download needed).

use crate::common::{listing, pipeline_on, synthetic_idx, Pipe};

#[test]
fn a_tiny_run_on_synthetic_digits_writes_every_output() {
    let p = Pipe::new(&[]);
    let data = synthetic_idx(&p.tmp().join("idx"), 300, 28, 7);
    let file = pipeline_on(p.tmp(), &data);
    let run =
        Pipe::run_tiny(file.to_str().unwrap()).args(&["--max-steps", "20"]).set("sampler.every=10").set("checkpoint=(every: 10, keep: 2)");
    let done = run.go();
    done.code(0).says(&["done: 20 steps"]);
    for f in [
        "pipeline.ron",
        "metrics.csv",
        "loss.png",
        "stats.json",
        "samples/step_00000010.png",
        "samples/step_00000020.png",
        "checkpoints/step_00000020.safetensors",
    ] {
        assert!(run.out().join(f).is_file(), "{f}:\n{}", listing(&run.out()));
    }
    // The synthetic images are what the loader reads: 28×28 grey.
    let grid = image::open(run.out().join("samples/step_00000020.png")).unwrap();
    assert!(grid.width() > 28 && grid.height() > 28);
}

#[test]
fn a_failed_expectation_lists_the_run_folder() {
    let p = Pipe::new(&[]);
    let data = synthetic_idx(&p.tmp().join("idx"), 100, 28, 1);
    let file = pipeline_on(p.tmp(), &data);
    // A value out of range: exit 2, and nothing is written.
    let run = Pipe::run_tiny(file.to_str().unwrap()).set("d_step.n_critic=0");
    let done = run.go();
    done.code(2).says(&["n_critic must be 1 to 1000, got 0"]);
    let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        done.code(0);
    }))
    .unwrap_err();
    let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("exited with Some(2), expected 0") && msg.contains("n_critic") && msg.contains("run folder"), "{msg}");
    assert!(msg.contains("(none)"), "the run folder was never made: {msg}");
}

#[test]
fn synthetic_idx_files_have_the_declared_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let d = synthetic_idx(dir.path(), 5, 12, 3);
    let images = std::fs::read(d.join("train-images-idx3-ubyte")).unwrap();
    let labels = std::fs::read(d.join("train-labels-idx1-ubyte")).unwrap();
    assert_eq!(images.len(), 16 + 5 * 12 * 12);
    assert_eq!(labels.len(), 8 + 5);
    assert_eq!(&images[..4], &[0, 0, 8, 3]);
    assert!(labels[8..].iter().all(|l| *l <= 9));
    // Each image has a square of 255s and a background of 0s.
    for i in 0..5 {
        let img = &images[16 + i * 144..16 + (i + 1) * 144];
        assert!(img.contains(&255) && img.contains(&0));
    }
}
