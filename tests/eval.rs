//! `pipe eval`: FID and KID on Inception features between real data and generated samples.

mod common;
use common::{mnist_root, run, stderr, stdout};

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
