//! The `pipe` command line. Exit codes: 0 success, 1 the run failed, 2 bad arguments or
//! pipeline file, 130 interrupted (Ctrl-C) after draining.

use clap::{Parser, Subcommand};
use pipe::run::{self, RunError, RunOptions};
use pipe::spec::DeviceChoice;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "pipe",
    version,
    about = "Train GANs (DRAGAN and friends) as a pipeline of stages wired in RON",
    after_help = "Exit codes: 0 success, 1 the run failed, 2 bad arguments or pipeline file, 130 interrupted (Ctrl-C)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train: run a pipeline file and write sample grids, metrics.csv, loss.png and progress.mp4.
    Run {
        /// The pipeline file (RON), e.g. pipelines/irasutoya.ron.
        file: PathBuf,
        /// Run folder (default runs/<pipeline name>/).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Generator steps to train (overrides the file's max_steps).
        #[arg(long)]
        max_steps: Option<u64>,
        /// Training device (default: the file's `device`, normally auto = CUDA if available).
        #[arg(long, value_enum)]
        device: Option<DeviceChoice>,
        /// Replace the outputs of a previous run in the run folder (otherwise an explicit --out
        /// holding a run is refused, and the default folder moves on to runs/<name>-2/).
        #[arg(long)]
        overwrite: bool,
        /// Print per-stage statistics at the end (items, busy and waiting fractions, queue
        /// depth); they are always written to the run folder as stats.json.
        #[arg(long)]
        stats: bool,
        /// Override a setting: STAGE.FIELD=VALUE (e.g. loader.root=data/mnist, d_step.n_critic=5)
        /// or FIELD=VALUE for a top-level one (seed=3). Repeatable.
        #[arg(long = "set", value_name = "STAGE.FIELD=VALUE")]
        sets: Vec<String>,
        /// Continue a run from a checkpoint: a run folder, a checkpoint file, or nothing for
        /// this pipeline's latest run. The outputs go on in that run's folder; --max-steps
        /// counts from the start of the run.
        #[arg(long, value_name = "RUN_DIR|CHECKPOINT", num_args = 0..=1)]
        resume: Option<Option<PathBuf>>,
        /// Write a checkpoint every N generator steps (overrides the file's `checkpoint`).
        #[arg(long, value_name = "N")]
        checkpoint_every: Option<u64>,
        /// Train data-parallel on N processes of this machine (ranks 0..N, c10d over loopback;
        /// the pipeline's batch is the global batch, split over the ranks). See the README's
        /// "Several processes and machines".
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
        /// No progress bar or progress lines (warnings, errors and the closing summary stay).
        #[arg(long, short)]
        quiet: bool,
        /// `json`: one JSON object a line on stdout for each logged step ("event": "step"),
        /// evaluation ("scores") and the end ("done"), for scripts; `text` (default): a
        /// progress bar on a terminal, a line every --progress-every seconds otherwise.
        #[arg(long, value_enum, default_value = "text")]
        log_format: run::LogFormat,
        /// Seconds between progress lines when stderr is not a terminal (a log file, CI,
        /// nohup). Default 30.
        #[arg(long, value_name = "SECONDS")]
        progress_every: Option<f64>,
    },
    /// Generate from a checkpoint: a grid of samples (PNG), or with --walk a latent-space walk
    /// video (MP4). Uses the generator EMA when the checkpoint has one.
    Sample {
        /// A checkpoint file, or a run folder (its newest checkpoint).
        checkpoint: PathBuf,
        /// Output file: .png for a grid, .mp4 with --walk.
        #[arg(long)]
        out: PathBuf,
        /// Images per grid (per frame of a walk), 1 to 4096 [default: the run's sample grid, as
        /// the training drew it (its sampler's grid² images and padding), else 64].
        #[arg(long)]
        n: Option<usize>,
        /// Seed of the latents (default: the pipeline's, which gives the training grids' latents).
        #[arg(long)]
        seed: Option<u64>,
        /// Write a latent-space walk video: spherical interpolation through random latents.
        #[arg(long)]
        walk: bool,
        /// Frames of the walk, 2 to 100000.
        #[arg(long, default_value_t = 120)]
        frames: usize,
        /// Random latents the walk passes through before it loops back to the first, 2 to 1000.
        #[arg(long, default_value_t = 4)]
        keys: usize,
        /// Frames per second of the walk video, 1 to 240.
        #[arg(long, default_value_t = 30)]
        fps: u32,
        /// Device to generate on.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Use G's own weights even when the checkpoint has EMA weights.
        #[arg(long)]
        no_ema: bool,
    },
    /// Export a checkpoint's generator (and discriminator) for PyTorch: safetensors weights and
    /// a TorchScript module.
    ///
    /// Writes generator.safetensors (G's weights: the EMA's when the run kept one),
    /// generator.pt (TorchScript: z [N, latent] → images [N, C, H, W] in [-1, 1]),
    /// discriminator.safetensors, pipe_models.py (the PyTorch modules the weights load into),
    /// grid_latents.safetensors (the latents of the run's sample grids: G(z) redraws them) and
    /// README.txt.
    Export {
        /// A checkpoint file, or a run folder (its newest checkpoint).
        checkpoint: PathBuf,
        /// The folder to write into (created if missing; files of an earlier export are replaced).
        #[arg(long)]
        out: PathBuf,
        /// Export G's own weights even when the checkpoint has EMA weights.
        #[arg(long)]
        no_ema: bool,
    },
    /// Sample quality: FID and KID between two image sources on Inception-v3 features (or a
    /// LeNet classifier's, which adds an IS-style score); prints them and writes a JSON report.
    /// A source is an IDX file (or a folder holding one), a folder of images, or a checkpoint /
    /// run folder (which generates the samples).
    Eval {
        /// Real images: IDX file or folder, image folder (or a checkpoint / run folder).
        #[arg(long)]
        real: PathBuf,
        /// Generated images: a checkpoint or run folder (or any source, to compare data sets).
        #[arg(long)]
        fake: PathBuf,
        /// Images per side (a seeded subset of a data set; generated samples of a checkpoint).
        #[arg(long, default_value_t = 10_000)]
        n: usize,
        /// Features: inception (Inception-v3 pool3, the FID standard) or lenet (a classifier
        /// trained by `pipe train-classifier`, for MNIST-like data; give it with --classifier).
        #[arg(long, default_value = "inception", value_parser = ["inception", "lenet"])]
        features: String,
        /// The classifier file for --features lenet (set-up trains data/lenet/mnist.safetensors
        /// and data/lenet/fashion-mnist.safetensors).
        #[arg(long)]
        classifier: Option<PathBuf>,
        /// Seed of the subsets and latents.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Side of the square that folder images are decoded to.
        #[arg(long, default_value_t = 64)]
        size: u32,
        /// KID subsets and subset size (capped by the number of images).
        #[arg(long, default_value_t = 100)]
        kid_subsets: usize,
        /// Images per KID subset (capped by the number of images; one subset when it is all).
        #[arg(long, default_value_t = 1000)]
        kid_size: usize,
        /// The JSON report.
        #[arg(long, default_value = "eval.json")]
        json: PathBuf,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
    /// Train the LeNet classifier behind `--features lenet` and the eval stage's `Lenet`
    /// features, on labelled IDX data; tests it on the data's test split (t10k-…) or, without
    /// one, on images held out of the training file; writes a safetensors file.
    TrainClassifier {
        /// IDX data: a folder with train-images/labels (and t10k-… for testing), or an images file.
        #[arg(long)]
        data: PathBuf,
        /// The classifier file to write.
        #[arg(long)]
        out: PathBuf,
        /// Passes over the training images.
        #[arg(long, default_value_t = 12)]
        epochs: usize,
        /// Images held out for testing when the data has no test split.
        #[arg(long, default_value_t = 2000)]
        holdout: usize,
        #[arg(long, default_value_t = 128)]
        batch: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Random affine distortions (rotation ±12°, scale 0.9–1.1, shift ±2 px) of the training
        /// images: auto = only for fewer than 20,000 of them.
        #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
        distort: String,
    },
    /// Time pipe's DRAGAN training step against the PyTorch reference (scripts/bench) in one
    /// run, same models and step. The last line is `ratio pipe/pytorch: X.XX` (pipe's steps/s
    /// over the strongest reference's; on CUDA that is the tuned, graph-captured one).
    Bench {
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        #[arg(long, value_enum, default_value_t = pipe::bench::Arch::Mlp)]
        arch: pipe::bench::Arch,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Timed steps (each side).
        #[arg(long, default_value_t = 200)]
        steps: u64,
        /// pipe steps before timing starts.
        #[arg(long, default_value_t = 10)]
        warmup: u64,
        /// Python with torch for the reference (default: .venv/bin/python, else python3).
        #[arg(long)]
        python: Option<PathBuf>,
        /// Override a setting of pipe's timed pipeline (e.g. execution=Eager, precision=Fp32).
        /// Repeatable.
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        sets: Vec<String>,
        /// Measure data-parallel scaling instead: 1 rank against N ranks (`pipe run --nproc N`),
        /// one libtorch thread and --batch images per rank, on the CPU; prints images/s.
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
    },
    /// Compare two runs: the weights of their latest checkpoints (largest relative difference
    /// of any tensor) and the means of their losses in metrics.csv. Exit 1 when a difference
    /// is over its limit, 2 when the runs cannot be read or hold other networks.
    Compare {
        /// A run folder (its newest checkpoint) or a checkpoint file.
        a: PathBuf,
        /// The other run folder or checkpoint file.
        b: PathBuf,
        /// Fail when a weight tensor differs by more than this, relative to its largest
        /// magnitude (e.g. 1e-5).
        #[arg(long)]
        weights_tol: Option<f64>,
        /// Fail when the mean d_loss or g_loss differs by more than this fraction (e.g. 0.2).
        #[arg(long)]
        loss_tol: Option<f64>,
        /// First generator step of the loss means.
        #[arg(long, default_value_t = 0)]
        loss_from: u64,
    },
    /// List the devices pipe can train on: the CPU, and each CUDA device with its name,
    /// compute capability, memory, bf16 and whether this build can capture CUDA graphs.
    Devices,
    /// List the stage kinds, or describe one: its ports (caps) and every field with type,
    /// default and doc.
    Stages {
        /// A stage kind, e.g. DStep.
        kind: Option<String>,
    },
    /// Print a pipeline as a Graphviz DOT graph (`pipe graph FILE | dot -Tpng > graph.png`).
    Graph {
        /// The pipeline file (RON).
        file: PathBuf,
        /// Override a setting before drawing, as for `pipe run`. Repeatable.
        #[arg(long = "set", value_name = "STAGE.FIELD=VALUE")]
        sets: Vec<String>,
    },
    /// Check pipeline files without running them: syntax, fields, links, values.
    Check {
        /// Pipeline files (RON) to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Override a setting before checking, as for `pipe run`. Repeatable.
        #[arg(long = "set", value_name = "STAGE.FIELD=VALUE")]
        sets: Vec<String>,
    },
}

fn main() {
    // MKL's default "dynamic" mode picks its thread count from the machine's load, which can
    // change the order of floating-point sums between two runs; fixed, the same run gives the
    // same numbers (exact resume, `pipe sample` equal to the training grid). A user's own
    // setting wins. Set before libtorch does any work.
    if std::env::var_os("MKL_DYNAMIC").is_none() {
        std::env::set_var("MKL_DYNAMIC", "FALSE");
    }
    // Past a file-size limit (ulimit -f) a write then fails with EFBIG, reported like a full
    // disk, instead of the signal killing the process with nothing finalised.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    quiet_panics();
    let cli = Cli::parse();
    let code = std::panic::catch_unwind(|| dispatch(cli)).unwrap_or(1);
    std::process::exit(code);
}

/// `pipe eval`: FID, KID and IS of two image sets; the exit code.
#[allow(clippy::too_many_arguments)]
fn cmd_eval(
    real: PathBuf,
    fake: PathBuf,
    n: usize,
    features: String,
    classifier: Option<PathBuf>,
    seed: u64,
    size: u32,
    kid_subsets: usize,
    kid_size: usize,
    json: PathBuf,
    device: DeviceChoice,
) -> i32 {
    let features = match (features.as_str(), classifier) {
        ("lenet", Some(classifier)) => pipe_stages::quality::Features::Lenet { classifier },
        ("lenet", None) => {
            pipe::say!("error: --features lenet needs --classifier FILE (e.g. data/lenet/mnist.safetensors, made by the set-up)");
            return 2;
        }
        (_, Some(c)) => {
            pipe::say!("error: --classifier {} is for --features lenet; the features are inception", c.display());
            return 2;
        }
        _ => pipe_stages::quality::Features::Inception,
    };
    let o = pipe::eval::EvalOptions { real, fake, n, seed, size, kid_subsets, kid_size, json, device, features };
    match pipe::eval::eval(&o) {
        Ok(r) => {
            let is = match (r.is_fake, r.is_real) {
                (Some((f, fs)), Some((re, rs))) => format!("  IS {f:.3} ± {fs:.3} (real {re:.3} ± {rs:.3})"),
                _ => String::new(),
            };
            let kid = if r.kid_subsets == 1 {
                format!("KID {:.5} (one subset: all images)", r.kid_mean)
            } else {
                format!("KID {:.5} ± {:.5}", r.kid_mean, r.kid_std)
            };
            pipe::out!(
                "FID {:.3}  {kid}{is}  ({} features, {} real, {} fake)\n",
                r.fid,
                if r.features == "lenet" { "LeNet" } else { "Inception" },
                r.n_real,
                r.n_fake
            );
            pipe::say!("real: {}\nfake: {}\nreport: {} ({:.1}s)", r.real, r.fake, o.json.display(), r.seconds);
            0
        }
        Err(e) => report(e),
    }
}

/// `pipe train-classifier`: train and save the LeNet classifier; the exit code.
fn cmd_train_classifier(data: PathBuf, out: PathBuf, epochs: usize, holdout: usize, batch: usize, seed: u64, distort: String) -> i32 {
    if epochs == 0 || batch == 0 {
        pipe::say!("error: --epochs and --batch must be at least 1");
        return 2;
    }
    if out.is_dir() {
        pipe::say!("error: --out {}: is a folder; give the classifier's file name", out.display());
        return 2;
    }
    let distort = match distort.as_str() {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    };
    let o = pipe_stages::quality::lenet::TrainOptions { data, epochs, holdout, batch, seed, distort };
    let t0 = std::time::Instant::now();
    match pipe_stages::train::catch_torch(|| {
        pipe_stages::quality::lenet::train(&o, |l| pipe::say!("{l}")).map_err(|e| pipe_stages::StageError::msg(e.to_string()))
    }) {
        Ok(net) => match net.save(&out) {
            Ok(()) => {
                pipe::say!(
                    "wrote {}: test accuracy {:.2}% on {}, trained on {} images in {:.0}s",
                    out.display(),
                    net.info.test_accuracy * 100.0,
                    net.info.test,
                    net.info.train_n,
                    t0.elapsed().as_secs_f64()
                );
                0
            }
            Err(e) => {
                pipe::say!("error: {e}");
                1
            }
        },
        Err(e) => {
            pipe::say!("error: {e}");
            2
        }
    }
}

fn dispatch(cli: Cli) -> i32 {
    match cli.cmd {
        Cmd::Run {
            file,
            out,
            max_steps,
            device,
            overwrite,
            stats,
            sets,
            resume,
            checkpoint_every,
            nproc,
            quiet,
            log_format,
            progress_every,
        } => {
            if let Some(e) = progress_every.filter(|e| !(e.is_finite() && *e >= 0.0)) {
                pipe::say!("error: --progress-every {e}: expected a number of seconds ≥ 0");
                return 2;
            }
            let json = log_format == run::LogFormat::Json;
            let opts = RunOptions {
                out,
                max_steps,
                device,
                sets,
                overwrite,
                stats,
                quiet,
                log_format,
                progress_every,
                resume,
                checkpoint_every,
                silent: false,
            };
            let interrupts = Arc::new(AtomicUsize::new(0));
            if let Some(n) = nproc.filter(|&n| n != 1) {
                // What the ranks would all refuse is said once, here: the pipeline, the device,
                // a batch that does not split over the ranks, the checkpoint to resume.
                if let Err(e) = run::prepare(&file, &opts).and_then(|p| run::check_ranks(&p, &opts, n)) {
                    return report_run(e, json);
                }
                return launch_ranks(n, interrupts);
            }
            let n = interrupts.clone();
            let mut first: Option<std::time::Instant> = None;
            let _ = keeping_nohup(|| {
                ctrlc::set_handler(move || {
                    // Signals within SAME_STOP_S of the first are one request: a supervisor
                    // (GNU timeout, say) signals the process and then its whole group.
                    let now = std::time::Instant::now();
                    if first.is_some_and(|t| now.duration_since(t).as_secs_f64() < SAME_STOP_S) {
                        return;
                    }
                    first.get_or_insert(now);
                    if n.fetch_add(1, Ordering::SeqCst) >= 1 {
                        // Rank 0 speaks for a data-parallel run.
                        if !pipe::launch::is_worker() {
                            pipe::say!(
                            "stopped at once (second interrupt): the video is not finalised (a GIF sink's file and the TensorBoard log stay readable up to their last frame or event); the sample grids, metrics.csv and checkpoints so far are kept"
                        );
                        }
                        // _exit, not exit: running libtorch's static destructors while stage threads
                        // are inside libtorch can crash. Files already written stay as they are.
                        unsafe { libc::_exit(130) };
                    }
                })
            });
            match run::prepare(&file, &opts).and_then(|p| run::run(&p, &opts, interrupts)) {
                Ok(s) => {
                    if !pipe::launch::is_worker() {
                        run::print_summary(&s, "done");
                        if json {
                            run::print_summary_json(&s, "done");
                        }
                    }
                    0
                }
                Err(e) => report_run(e, json),
            }
        }
        Cmd::Sample { checkpoint, out, n, seed, walk, frames, keys, fps, device, no_ema } => {
            let o = pipe::sample::SampleOptions { checkpoint, n, seed, out, walk, frames, keys, fps, device, no_ema };
            match pipe::sample::sample(&o) {
                Ok(r) => {
                    let what = if o.walk { format!("a {}-frame latent walk", r.frames) } else { format!("a grid of {}", r.n) };
                    pipe::say!(
                        "wrote {} ({what}) from {} (step {}, {} weights)",
                        r.out.display(),
                        r.checkpoint.display(),
                        r.step,
                        r.weights
                    );
                    0
                }
                Err(e) => report(e),
            }
        }
        Cmd::Export { checkpoint, out, no_ema } => match pipe::export::export(&pipe::export::ExportOptions { checkpoint, out, no_ema }) {
            Ok(r) => {
                pipe::say!(
                    "wrote {} into {} from {} (step {}, {} weights); generator.pt matches G to {} on batches of {}",
                    r.files.join(", "),
                    r.out.display(),
                    r.checkpoint.display(),
                    r.step,
                    r.weights,
                    pipe::export::fmt_diff(r.trace_diff),
                    pipe::export::CHECK_BATCHES.map(|n| n.to_string()).join(" and ")
                );
                0
            }
            Err(e) => report(e),
        },
        Cmd::Eval { real, fake, n, features, classifier, seed, size, kid_subsets, kid_size, json, device } => {
            cmd_eval(real, fake, n, features, classifier, seed, size, kid_subsets, kid_size, json, device)
        }
        Cmd::Bench { device, arch, batch, steps, warmup, python, sets, nproc } => {
            let o = pipe::bench::BenchOptions { device, arch, batch, steps, warmup, python, sets, nproc: nproc.unwrap_or(1) };
            if nproc.is_some() {
                return match pipe::bench::scaling(&o) {
                    Ok(r) => {
                        pipe::out!("arch {} batch {} per rank on cpu, 1 thread per rank\n", r.arch, r.batch);
                        let line = |m: &pipe::bench::RanksMeasured, who: &str| {
                            let what = format!("{} rank{}", m.ranks, if m.ranks == 1 { "" } else { "s" });
                            pipe::out!("  {what:<12} {:>8.2} steps/s {:>10.0} images/s{who}\n", m.steps_per_s, m.images_per_s);
                        };
                        line(&r.one, "");
                        line(&r.many, "");
                        if let Some((one, many)) = &r.reference {
                            line(one, "  (pytorch, stylegan3-style all-reduce)");
                            line(many, "  (pytorch, stylegan3-style all-reduce)");
                            let up = many.images_per_s / one.images_per_s;
                            pipe::out!("pytorch speed-up {} ranks / 1 rank: {up:.2}× images/s\n", many.ranks);
                        }
                        pipe::out!("speed-up {} ranks / 1 rank: {:.2}× images/s\n", r.many.ranks, r.speedup());
                        0
                    }
                    Err(e) => report(e),
                };
            }
            match pipe::bench::bench(&o) {
                Ok(r) => {
                    pipe::out!("arch {} batch {} on {}\n", r.arch, r.batch, r.device);
                    pipe::out!("  {:<40} {:>10.2} steps/s\n", r.pipe.name, r.pipe.steps_per_s);
                    for m in &r.references {
                        pipe::out!("  {:<40} {:>10.2} steps/s\n", m.name, m.steps_per_s);
                    }
                    for m in &r.references {
                        pipe::out!("ratio pipe/{}: {:.2}\n", m.name.replace(' ', "-"), r.pipe.steps_per_s / m.steps_per_s);
                    }
                    pipe::out!("ratio pipe/pytorch: {:.2}\n", r.ratio().unwrap_or(f64::NAN));
                    0
                }
                Err(e) => report(e),
            }
        }
        Cmd::Compare { a, b, weights_tol, loss_tol, loss_from } => {
            cmd_compare(pipe::compare::CompareOptions { a, b, weights_tol, loss_tol, loss_from })
        }
        Cmd::Devices => cmd_devices(),
        Cmd::TrainClassifier { data, out, epochs, holdout, batch, seed, distort } => {
            cmd_train_classifier(data, out, epochs, holdout, batch, seed, distort)
        }
        Cmd::Stages { kind: None } => {
            pipe::out!("{}", pipe::describe::list());
            0
        }
        Cmd::Stages { kind: Some(k) } => match pipe::describe::describe(&k) {
            Ok(text) => {
                pipe::out!("{text}");
                0
            }
            Err(e) => {
                pipe::say!("error: {e}");
                2
            }
        },
        Cmd::Graph { file, sets } => match run::prepare(&file, &RunOptions { sets, ..Default::default() }) {
            Ok(p) => {
                pipe::out!("{}", pipe::describe::dot(&p));
                0
            }
            Err(e) => report(e),
        },
        Cmd::Check { files, sets } => {
            let opts = RunOptions { sets, ..Default::default() };
            let mut code = 0;
            for f in files {
                match run::prepare(&f, &opts) {
                    Ok(p) => pipe::out!(
                        "{}: ok ({} stages: {})\n",
                        f.display(),
                        p.stages.len(),
                        p.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(" → ")
                    ),
                    Err(e) => code = code.max(report(e)),
                }
            }
            code
        }
    }
}

/// Panics in stage and worker threads are caught and reported by the runner as the stage's
/// error (one line); the default hook would also print them with libtorch's C++ trace. With
/// RUST_BACKTRACE set, the default hook runs as usual.
fn quiet_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            return default(info);
        }
        if std::thread::current().name() == Some("main") {
            let msg = pipe_stages::core::stage::panic_message(info.payload());
            pipe::say!("error: internal error: {} (set RUST_BACKTRACE=1 for details)", pipe_stages::core::stage::first_line(msg));
        }
    }));
}

/// [`report`] for `pipe run`; with `--log-format json` also a JSON line on stdout,
/// `{"event":"error","exit_code":N,"errors":[...]}` (an interrupted run has its
/// `"interrupted"` line already).
fn report_run(e: RunError, json: bool) -> i32 {
    let errors: Vec<String> = match &e {
        RunError::Invalid(errs) => errs.clone(),
        RunError::Failed(m) => vec![m.clone()],
        RunError::Interrupted(_) => vec![],
    };
    if json && !errors.is_empty() && !pipe::launch::is_worker() {
        run::json_line(&serde_json::json!({ "event": "error", "exit_code": e.exit_code(), "errors": errors }));
    }
    report(e)
}

/// Seconds after a first stop signal within which another counts as the same request.
const SAME_STOP_S: f64 = 0.1;

/// Install a signal handler with `set` (ctrlc's, which takes SIGHUP too), keeping SIGHUP
/// ignored when the process started with it ignored: a run started under `nohup` goes on when
/// its terminal closes, and so do the ranks it starts (they inherit it).
fn keeping_nohup<T>(set: impl FnOnce() -> T) -> T {
    // SAFETY: reading and setting a signal's disposition; no handler of ours is involved.
    let ignored = unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    };
    let r = set();
    if ignored {
        unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    }
    r
}

fn report(e: RunError) -> i32 {
    match &e {
        RunError::Invalid(errs) => {
            for m in errs {
                pipe::say!("error: {m}");
            }
        }
        RunError::Failed(m) => pipe::say!("error: {m}"),
        RunError::Interrupted(_) => {}
    }
    e.exit_code()
}

/// `pipe compare`: print the report; exit 1 over a limit, 2 unreadable.
fn cmd_compare(o: pipe::compare::CompareOptions) -> i32 {
    match pipe::compare::compare(&o) {
        Ok(r) => {
            pipe::out!("{r}\n");
            0
        }
        Err(e) => {
            if let pipe::compare::CompareError::Over { report, why } = &e {
                pipe::out!("{report}\n");
                pipe::say!("error: {why}");
            } else {
                pipe::say!("error: {e}");
            }
            e.exit_code()
        }
    }
}

/// `pipe devices`: one line for the CPU, one per CUDA device (`cuda:N NAME, ...`).
fn cmd_devices() -> i32 {
    use pipe_stages::train::cuda;
    pipe::out!("cpu: {} threads for libtorch\n", tch::get_num_threads());
    let n = if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 };
    if n == 0 {
        pipe::out!("no CUDA device visible (libtorch sees none: no GPU, no driver, or a CPU-only libtorch)\n");
    }
    for i in 0..n.max(0) as usize {
        match cuda::device_info(i) {
            Ok(d) => pipe::out!(
                "cuda:{i} {}, compute capability {}.{}, {:.0} GiB, bf16 {}, CUDA graphs {}\n",
                d.name,
                d.capability.0,
                d.capability.1,
                d.memory as f64 / (1u64 << 30) as f64,
                if d.bf16() { "yes" } else { "no" },
                if cuda::built_with_cuda() { "yes" } else { "no (built without CUDA's headers)" }
            ),
            Err(e) => pipe::out!("cuda:{i} (no details: {e})\n"),
        }
    }
    0
}

/// `pipe run ... --nproc N`: start N ranks of the same command line (without `--nproc`) and
/// wait for them. A second interrupt is forwarded too (the ranks then stop at once).
fn launch_ranks(n: usize, interrupts: Arc<AtomicUsize>) -> i32 {
    let counter = interrupts.clone();
    let _ = keeping_nohup(|| {
        ctrlc::set_handler(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        })
    });
    let mut args: Vec<String> = vec![];
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--nproc" {
            it.next();
        } else if !a.starts_with("--nproc=") {
            args.push(a);
        }
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            pipe::say!("error: cannot find this program's path to start the ranks: {e}");
            return 1;
        }
    };
    match pipe::launch::launch(&exe, &args, n, interrupts) {
        Ok(code) => code,
        Err(e) => {
            pipe::say!("error: {e}");
            2
        }
    }
}
