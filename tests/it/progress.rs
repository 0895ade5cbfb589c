//! How a run reports itself while it goes: JSON lines for scripts, plain lines every N seconds
//! when stderr is not a terminal, `--quiet`, and loss.png redrawn during the run.

use crate::common::*;

/// `pipe run` of mnist_mlp.ron, tiny, 100 steps logged every 10, an evaluation at 50 and 100
/// (the builder holds the run folder).
fn tiny_mnist(extra: &[&str]) -> (Pipe, Finished) {
    let _ = mnist_root();
    let p = Pipe::run_tiny("pipelines/mnist_mlp.ron")
        .args(&["--max-steps", "100"])
        .set("log_every=10")
        .set("eval.every=50")
        .set("eval.n=100")
        .set("sampler.every=50");
    let p = p.args(extra);
    let f = p.go();
    (p, f)
}

/// The lines of stderr that report progress (`step N/M ...`).
fn progress_lines(stderr: &str) -> Vec<String> {
    stderr.lines().filter(|l| l.starts_with("step ") && l.contains('/')).map(|l| l.to_string()).collect()
}

#[test]
fn json_log_format_writes_one_object_per_logged_step_evaluation_and_the_end() {
    let (_p, f) = tiny_mnist(&["--log-format", "json"]);
    f.code(0);
    let out = stdout(&f.output);
    let objs: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("each stdout line is JSON")).collect();
    let of = |e: &str| objs.iter().filter(|o| o["event"] == e).collect::<Vec<_>>();
    let steps: Vec<u64> = of("step").iter().map(|o| o["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
    // The same figures as metrics.csv (6 decimals there).
    let (_, rows) = metrics(&f.out);
    for (o, r) in of("step").iter().zip(&rows) {
        assert_eq!(o["step"].as_f64().unwrap(), r[0]);
        assert!((o["d_loss"].as_f64().unwrap() - r[2]).abs() < 1e-6, "{o} vs {r:?}");
        assert!((o["g_loss"].as_f64().unwrap() - r[3]).abs() < 1e-6, "{o} vs {r:?}");
        assert_eq!(o["max_steps"], 100);
        assert!(o["eta_s"].as_f64().unwrap() >= 0.0 && o["img_per_s"].as_f64().unwrap() > 0.0, "{o}");
    }
    let scores = of("scores");
    assert_eq!(scores.iter().map(|o| o["step"].as_u64().unwrap()).collect::<Vec<_>>(), [50, 100]);
    let fid50 = scores[0]["fid"].as_f64().unwrap();
    assert!(fid50.is_finite() && fid50 > 0.0);
    // Each step carries the latest FID printed before it (none before the first evaluation).
    let mut latest = serde_json::Value::Null;
    for o in &objs {
        match o["event"].as_str() {
            Some("scores") => latest = o["fid"].clone(),
            Some("step") => assert_eq!(o["fid"], latest, "{o}"),
            _ => {}
        }
    }
    assert!(of("step")[0]["fid"].is_null());
    let done = of("done");
    assert_eq!(done.len(), 1);
    assert_eq!((done[0]["step"].as_u64(), done[0]["images"].as_u64()), (Some(100), Some(6400)));
    assert!(done[0]["files"]["TensorBoard log"].as_str().unwrap().contains("tb/events.out.tfevents.pipe."));
    // No progress lines on stderr: JSON takes their place. The summary stays.
    assert!(progress_lines(&f.stderr()).is_empty(), "{}", f.stderr());
    f.says(&["done: 100 steps"]);
}

#[test]
fn without_a_terminal_progress_lines_come_every_n_seconds_and_quiet_has_none() {
    // stderr is a pipe here. With lines at most every hour, a run of seconds prints its
    // first logged step and its last (the default, 30 s, could print more on a slow machine).
    let (_p, f) = tiny_mnist(&["--progress-every", "3600"]);
    f.code(0);
    let lines = progress_lines(&f.stderr());
    assert_eq!(lines.len(), 2, "{}", f.stderr());
    assert!(lines[0].starts_with("step 1/100 (1%)  d_loss ") && lines[0].contains(" img/s") && lines[0].contains("ETA"), "{lines:?}");
    // (The latest FID rides along once the step-50 evaluation is in; it runs beside the
    // training, so whether it is in by step 100 depends on the machine.)
    assert!(lines[1].starts_with("step 100/100 (100%)"), "{lines:?}");
    assert!(f.stderr().contains("step 50: FID ") && f.stderr().contains("step 100: FID "), "{}", f.stderr());
    // Every logged step with --progress-every 0. The last step's evaluation, of 2,000 images
    // here, outlasts the training: the stages still finishing are named at once (after 5 s
    // by default) rather than leaving a silent wait.
    let (_p, f) = tiny_mnist(&["--progress-every", "0", "--set", "eval.n=2000"]);
    f.code(0);
    assert_eq!(progress_lines(&f.stderr()).len(), 11, "{}", f.stderr());
    let err = f.stderr();
    let finishing: Vec<&str> = err.lines().filter(|l| l.starts_with("training done")).collect();
    assert_eq!(finishing.len(), 1, "{err}");
    assert!(
        finishing[0].starts_with("training done at step 100; still finishing: ") && finishing[0].contains("eval (Eval)"),
        "{finishing:?}"
    );
    let (at, scored) = (err.find("training done").unwrap(), err.find("step 100: FID").unwrap());
    assert!(at < scored, "named before the last evaluation's line: {err}");
    // --quiet: none, and no evaluation lines; the summary stays.
    let (_p, f) = tiny_mnist(&["--quiet"]);
    f.code(0).says(&["done: 100 steps"]);
    assert!(progress_lines(&f.stderr()).is_empty() && !f.stderr().contains("FID"), "{}", f.stderr());
    // A bad interval is refused.
    Pipe::new(&["run", "pipelines/mnist_mlp.ron", "--progress-every=-1"]).go().code(2).says(&["--progress-every"]);
}

#[test]
fn loss_png_is_drawn_while_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let root = synthetic_idx(tmp.path(), 256, 28, 1);
    let file = pipeline_on(tmp.path(), &root);
    let out = tmp.path().join("run");
    let mut child = pipe()
        .args(["run", file.to_str().unwrap(), "--out", out.to_str().unwrap(), "--max-steps", "1000000"])
        .args(&TINY)
        .args(["--set", "log_every=5"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_rows(&out, 2, &mut child);
    // Drawn at the first logged steps, then at most every 5 s, while the run goes on.
    let t = std::time::Instant::now();
    while !out.join("loss.png").exists() {
        assert!(t.elapsed().as_secs() < 30, "no loss.png 30 s into the run");
        assert!(child.try_wait().unwrap().is_none(), "the run ended");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let first = std::fs::metadata(out.join("loss.png")).unwrap().modified().unwrap();
    let img = image::open(out.join("loss.png")).expect("a whole PNG");
    assert_eq!((img.width(), img.height()), (1000, 600));
    // Redrawn later, still during the run.
    let t = std::time::Instant::now();
    while std::fs::metadata(out.join("loss.png")).unwrap().modified().unwrap() == first {
        assert!(t.elapsed().as_secs() < 30, "loss.png not redrawn within 30 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(child.try_wait().unwrap().is_none(), "the run ended");
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    image::open(out.join("loss.png")).expect("a whole PNG at the end");
}

#[test]
fn a_run_under_nohup_survives_a_hangup_and_json_reports_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = synthetic_idx(tmp.path(), 256, 28, 1);
    let file = pipeline_on(tmp.path(), &root);
    let start = |out: &std::path::Path, nohup: bool| {
        let mut c = pipe();
        c.args(["run", file.to_str().unwrap(), "--out", out.to_str().unwrap(), "--max-steps", "1000000"])
            .args(&TINY)
            .args(["--set", "log_every=5"])
            .stderr(std::process::Stdio::null());
        use std::os::unix::process::CommandExt;
        // With nohup, what nohup does: SIGHUP ignored, for the process and what it starts.
        // Without, SIGHUP's default, whatever this test was started with (CI may ignore it).
        let disposition = if nohup { libc::SIG_IGN } else { libc::SIG_DFL };
        unsafe {
            c.pre_exec(move || {
                libc::signal(libc::SIGHUP, disposition);
                Ok(())
            });
        }
        c.spawn().unwrap()
    };
    // Under nohup a hangup changes nothing; the run stops on SIGINT as usual.
    let out = tmp.path().join("nohup");
    let mut child = start(&out, true);
    wait_for_rows(&out, 2, &mut child);
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "a run under nohup stopped on SIGHUP");
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    // Without nohup, a hangup stops it as Ctrl-C does (drained, exit 130).
    let out = tmp.path().join("hup");
    let mut child = start(&out, false);
    wait_for_rows(&out, 2, &mut child);
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    // --log-format json: a run that cannot start says so on stdout too.
    let f = Pipe::new(&["run", "pipelines/mnist_mlp.ron", "--log-format", "json", "--set", "d_step.n_critic=0"]).go();
    f.code(2);
    let v: serde_json::Value = serde_json::from_str(stdout(&f.output).trim()).expect("one JSON line");
    assert_eq!((v["event"].as_str(), v["exit_code"].as_i64()), (Some("error"), Some(2)));
    assert!(v["errors"][0].as_str().unwrap().contains("n_critic"), "{v}");
}
