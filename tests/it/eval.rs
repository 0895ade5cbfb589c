//! `pipe eval`: FID and KID on Inception features between real data and generated samples.

use crate::common;
use crate::common::{mnist_root, run, stderr, stdout};

#[test]
fn eval_compares_sources_and_caches_features() {
    mnist_root();
    assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/inception/inception_fid.pt").exists(), "run scripts/setup.sh");
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let eval = |real: &str, fake: &str, seed: &str, json: &std::path::Path| {
        let mut c = common::pipe();
        c.env("PIPE_CACHE", &cache).args([
            "eval",
            "--real",
            real,
            "--fake",
            fake,
            "--n",
            "24",
            "--kid-size",
            "12",
            "--kid-subsets",
            "5",
            "--seed",
            seed,
            "--device",
            "cpu",
            "--json",
        ]);
        c.arg(json).output().unwrap()
    };
    // Digits against other digits, and against emoji: the second is much farther.
    let same = tmp.path().join("same.json");
    let o = eval("data/mnist", "data/mnist", "1", &same);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let other = tmp.path().join("other.json");
    let o = eval("data/mnist", "data/illustrations", "2", &other);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("FID "), "{}", stdout(&o));
    let read = |p: &std::path::Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let (a, b) = (read(&same), read(&other));
    assert_eq!(a["n_real"], 24);
    assert_eq!(a["kid_subset_size"], 12);
    let (fa, fb) = (a["fid"].as_f64().unwrap(), b["fid"].as_f64().unwrap());
    assert!(fa > 0.0 && fb > 2.0 * fa, "digits vs digits {fa}, digits vs emoji {fb}");
    assert!(b["kid_mean"].as_f64().unwrap() > a["kid_mean"].as_f64().unwrap());
    // Features are cached by content: the same real subset (seed 1) is found again.
    let cached = std::fs::read_dir(cache.join("features")).unwrap().count();
    assert!(cached >= 3, "{cached} cached feature files");
    let again = tmp.path().join("again.json");
    let o = eval("data/mnist", "data/mnist", "1", &again);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(read(&again)["fid"], a["fid"], "same inputs, same answer (from the cache)");
    assert_eq!(std::fs::read_dir(cache.join("features")).unwrap().count(), cached, "nothing new computed");

    // A checkpoint as the fake side; a source that is not images.
    let runs = tmp.path().join("run");
    let o = run(&[
        "run",
        "pipelines/mnist_mlp.ron",
        "--out",
        runs.to_str().unwrap(),
        "--device",
        "cpu",
        "--max-steps",
        "10",
        "--set",
        "d_step.model=Mlp(hidden: 16, layers: 1)",
        "--set",
        "g_step.model=Mlp(hidden: 16, layers: 1)",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let ck = tmp.path().join("ck.json");
    let o = eval("data/mnist", runs.to_str().unwrap(), "1", &ck);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(read(&ck)["fake"].as_str().unwrap().contains("step 10, 24 generated samples"));
    let o = eval("data/mnist", "README.md", "1", &ck);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("README.md"), "{}", stderr(&o));
}

/// Tiny models for the runs below.
use crate::common::TINY;

#[test]
fn classifier_features_eval_command_and_eval_stage() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let clf = tmp.path().join("lenet.safetensors");
    let clf_s = clf.to_str().unwrap();

    // Train: one epoch on 9,000 digits, tested on 1,000 held out.
    let o = run(&["train-classifier", "--data", "data/mnist", "--out", clf_s, "--epochs", "1", "--holdout", "1000"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let e = stderr(&o);
    let acc: f64 = e.split("test accuracy ").last().unwrap().split('%').next().unwrap().parse().unwrap();
    assert!(acc > 85.0, "one epoch should already classify most digits: {e}");
    assert!(e.contains("1000 images held out from") && e.contains("trained on 9000 images"), "{e}");
    // No test split and a hold-out too big: refused, saying why.
    let o = run(&["train-classifier", "--data", "data/mnist", "--out", clf_s, "--holdout", "6000"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("has no test split") && stderr(&o).contains("got 6000"), "{}", stderr(&o));

    // `pipe eval --features lenet`: digits against digits, and against clothes.
    let eval = |fake: &str, json: &std::path::Path| {
        let mut c = common::pipe();
        c.env("PIPE_CACHE", tmp.path().join("cache")).args([
            "eval",
            "--features",
            "lenet",
            "--classifier",
            clf_s,
            "--real",
            "data/mnist",
            "--fake",
            fake,
            "--n",
            "500",
            "--kid-subsets",
            "10",
            "--kid-size",
            "200",
            "--json",
        ]);
        c.arg(json).output().unwrap()
    };
    let read = |p: &std::path::Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let (same, other) = (tmp.path().join("same.json"), tmp.path().join("other.json"));
    let o = eval("data/mnist", &same);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("LeNet features") && stdout(&o).contains("IS "), "{}", stdout(&o));
    let o = eval("data/fashion-mnist", &other);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (a, b) = (read(&same), read(&other));
    assert_eq!(a["features"], "lenet");
    let (fa, fb) = (a["fid"].as_f64().unwrap(), b["fid"].as_f64().unwrap());
    assert!(fa >= 0.0 && fb > 5.0 * fa, "digits vs digits {fa}, digits vs clothes {fb}");
    // Real digits are evenly and (even after one epoch) fairly confidently classified: the
    // IS-style score is well above 1, at most 10; clothes seen by a digit classifier less so.
    let is_real = a["is_real"][0].as_f64().unwrap();
    assert!(is_real > 4.0 && is_real <= 10.0, "{a}");
    assert!(b["is_fake"][0].as_f64().unwrap() < is_real, "{b}");
    // Colour images are not for LeNet.
    let o = eval("data/illustrations", &tmp.path().join("c.json"));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--fake: LeNet features are for grey") && stderr(&o).contains("Inception"), "{}", stderr(&o));
    let o = run(&["eval", "--features", "lenet", "--classifier", "nope.safetensors", "--real", "data/mnist", "--fake", "data/mnist"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nope.safetensors: no such classifier; train one with `pipe train-classifier"), "{}", stderr(&o));

    // The eval stage: scores every 10 steps and at the last (25), in metrics.csv and loss.png.
    let out = tmp.path().join("run");
    let features = format!("eval.features=Lenet(classifier: {clf_s:?})");
    let mut args = vec!["run", "pipelines/mnist_mlp.ron", "--out", out.to_str().unwrap(), "--max-steps", "25"];
    args.extend(TINY);
    args.extend([
        "--set",
        "log_every=5",
        "--set",
        "eval.every=10",
        "--set",
        "eval.n=300",
        "--set",
        "eval.kid_size=100",
        "--set",
        &features,
    ]);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for step in [10, 20, 25] {
        assert!(stderr(&o).contains(&format!("step {step}: FID ")), "{}", stderr(&o));
    }
    let text = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), "step,elapsed_s,d_loss,g_loss,penalty,grad_norm,img_per_s,fid,kid,is");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.iter().map(|r| r[0]).collect::<Vec<_>>(), ["1", "5", "10", "15", "20", "25"], "rows in step order, once each");
    for r in &rows {
        assert_eq!(r.len(), 10, "{r:?}");
        let scored = ["10", "20", "25"].contains(&r[0]);
        assert_eq!(!r[7].is_empty(), scored, "{r:?}");
        if scored {
            let (fid, is): (f64, f64) = (r[7].parse().unwrap(), r[9].parse().unwrap());
            // An untrained tiny G: far from the digits.
            assert!(fid > 1.0 && (1.0..=10.0).contains(&is), "{r:?}");
            r[8].parse::<f64>().unwrap();
        }
    }
    let png = image::open(out.join("loss.png")).unwrap();
    assert_eq!((png.width(), png.height()), pipe_stages::io::plot::PLOT_SIZE_WITH_FID);

    // Checked before anything runs: the schedule against log_every, the classifier, the images.
    let mut args = vec!["check", "pipelines/mnist_mlp.ron", "--set", "eval.every=15", "--set", "log_every=10"];
    let o = run(&args);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("`every` is 15, expected a multiple of the pipeline's log_every (10)"), "{}", stderr(&o));
    args.truncate(2);
    args.extend(["--set", "eval.features=Lenet(classifier: \"missing.safetensors\")"]);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("classifier missing.safetensors does not exist; train it with `pipe train-classifier"), "{}", stderr(&o));
    // LeNet features on the colour illustrations: refused when the stage is built.
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/irasutoya_small.ron")).unwrap();
    let end = text.rfind("],").unwrap();
    let stage = format!(
        "    (name: \"eval\", input: [\"g_step\"], kind: Eval(real: \"data/mnist\", features: Lenet(classifier: {clf_s:?}))),\n    "
    );
    let file = tmp.path().join("colour.ron");
    std::fs::write(&file, format!("{}{stage}{}", &text[..end], &text[end..])).unwrap();
    let o = run(&["check", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("stage `eval` (Eval): features Lenet take grey 28×28 or 32×32 images, but stage `loader` produces batch[B,3,32,32]"),
        "{}",
        stderr(&o)
    );
    // A missing classifier: the hint trains it on the pipeline's own data, not on `real`.
    let o = run(&["check", "pipelines/fashion_dcgan.ron", "--set", "eval.features=Lenet(classifier: \"gone.safetensors\")"]);
    assert!(
        stderr(&o).contains("train it with `pipe train-classifier --data data/fashion-mnist --out gone.safetensors`"),
        "{}",
        stderr(&o)
    );

    // `pipe eval` refuses bad options before any work, naming them.
    let base = ["eval", "--real", "data/mnist", "--fake", "data/mnist"];
    let folder = tmp.path().to_str().unwrap();
    for (extra, says) in [
        (&["--kid-size", "1"][..], "--kid-size 1: expected at least 2"),
        (&["--kid-subsets", "0"][..], "--kid-subsets 0: expected 1 to 1000"),
        (&["--features", "lenet"][..], "--features lenet needs --classifier FILE"),
        (&["--classifier", clf_s][..], "is for --features lenet"),
        (&["--json", folder][..], "is a folder"),
    ] {
        let o = run(&[&base[..], extra].concat());
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{extra:?}: {}", stderr(&o));
    }
    // A run folder is a source while it has checkpoints; without, it is not a data set.
    let lenet = ["--features", "lenet", "--classifier", clf_s, "--n", "50", "--json"];
    let json = tmp.path().join("run.json");
    let o = run(&[&["eval", "--real", "data/mnist", "--fake", out.to_str().unwrap()][..], &lenet, &[json.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    std::fs::remove_dir_all(out.join("checkpoints")).unwrap();
    let o = run(&[&["eval", "--real", "data/mnist", "--fake", out.to_str().unwrap()][..], &lenet, &[json.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is a run folder, not a data set (and it has no checkpoints yet"), "{}", stderr(&o));
}
