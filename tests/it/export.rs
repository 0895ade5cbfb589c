//! `pipe export`: the exported generator, loaded in PyTorch from `generator.safetensors`
//! (through `examples/pytorch/pipe_models.py`, strictly) and from `generator.pt`
//! (TorchScript), computes pipe's own images for the same latents, for batches of 1 and 7;
//! the exported discriminator computes pipe's logits. Tiny models, a few steps on the CPU.

use std::path::Path;

use crate::common::{listing, pipeline_on, python, stderr, synthetic_idx, Pipe};
use pipe_stages::core::item::Images;
use pipe_stages::io::grid::make_grid;
use pipe_stages::kinds::d_step::DStepConfig;
use pipe_stages::kinds::g_step::{fixed_latent, to_u8};
use pipe_stages::kinds::sampler::PAD_VALUE;
use pipe_stages::train::models::build_d;
use tch::{nn, Device, Tensor};

/// Largest |PyTorch − pipe| accepted for images in [-1, 1] and for D's logits.
const TOL: f64 = 1e-6;

/// pipe's images (and D's logits on them) for fixed latents of batches of 1 and 7, from the
/// newest checkpoint of `run`, written as `z{n}`, `x{n}`, `d{n}` into `path`.
fn pipe_reference(run: &Path, no_ema: bool, path: &Path) -> &'static str {
    let ck = pipe::sample::open_checkpoint(run).unwrap();
    let g = pipe::sample::generator(&ck, Device::Cpu, no_ema).unwrap();
    let p = pipe::sample::stored_pipeline(&ck).unwrap();
    let d_cfg = p.stages.iter().find_map(|s| s.kind.config::<DStepConfig>()).unwrap();
    let d_vs = nn::VarStore::new(Device::Cpu);
    let d = build_d(&d_vs.root(), &d_cfg.model, ck.manifest.image).unwrap();
    ck.load_vars("d.", &d_vs).unwrap();
    let latent = ck.manifest.latent;
    let mut named = vec![];
    for n in [1usize, 7] {
        let z = Tensor::from_slice(&fixed_latent(40 + n as u64, n, latent)).view([n as i64, latent]);
        let x = tch::no_grad(|| g.net.forward(&z, false));
        let logits = tch::no_grad(|| d.forward(&x, false));
        named.push((format!("z{n}"), z));
        named.push((format!("x{n}"), x));
        named.push((format!("d{n}"), logits));
    }
    Tensor::write_safetensors(&named, path).unwrap();
    g.weights
}

/// Run tests/it/export_check.py on an export folder and a reference file: its JSON report
/// (the images PyTorch drew from grid_latents.safetensors go to `grid_out`).
fn check_in_pytorch(export: &Path, reference: &Path, grid_out: &Path) -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(python())
        .arg(root.join("tests/it/export_check.py"))
        .arg(root.join("examples/pytorch"))
        .arg(export)
        .arg(reference)
        .arg(grid_out)
        .env("OMP_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .output()
        .expect("python starts");
    assert!(out.status.success(), "export_check.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Export `run` into `<tmp>/<name>`, compare in PyTorch with pipe's outputs, and return the
/// report (asserting every difference ≤ [`TOL`] and the shapes and ranges).
fn export_and_check(run: &Pipe, name: &str, extra: &[&str], image: [i64; 3]) -> serde_json::Value {
    let dir = run.tmp().join(name);
    let run_dir = run.out();
    let mut args = vec!["export", run_dir.to_str().unwrap(), "--out", dir.to_str().unwrap()];
    args.extend(extra);
    let done = Pipe::new(&args).go();
    done.code(0).says(&[
        "wrote generator.safetensors, generator.pt, discriminator.safetensors, pipe_models.py, grid_latents.safetensors, README.txt into",
    ]);
    for f in
        ["generator.safetensors", "generator.pt", "discriminator.safetensors", "pipe_models.py", "grid_latents.safetensors", "README.txt"]
    {
        assert!(dir.join(f).is_file(), "{f}:\n{}", listing(&dir));
    }
    assert_eq!(
        std::fs::read(dir.join("pipe_models.py")).unwrap(),
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/pytorch/pipe_models.py")).unwrap(),
        "the export carries examples/pytorch/pipe_models.py"
    );
    let reference = run.tmp().join(format!("{name}_pipe.safetensors"));
    let weights = pipe_reference(&run.out(), extra.contains(&"--no-ema"), &reference);
    let grid_out = run.tmp().join(format!("{name}_grid.safetensors"));
    let r = check_in_pytorch(&dir, &reference, &grid_out);
    eprintln!(
        "{name}: {}",
        serde_json::json!({"safetensors": r["safetensors"], "torchscript": r["torchscript"], "discriminator": r["discriminator"]})
    );
    assert_eq!(r["meta"]["weights"], weights);
    assert_eq!(r["meta"]["image_shape"], image.map(|v| v.to_string()).join(","));
    for n in ["1", "7"] {
        for file in ["safetensors", "torchscript", "discriminator"] {
            let d = r[file][n].as_f64().unwrap_or_else(|| panic!("no {file} difference for a batch of {n}: {r}"));
            assert!(d <= TOL, "{name}: {file}, batch of {n}: max |PyTorch − pipe| = {d:e} > {TOL:e}");
        }
        let want: Vec<i64> = [n.parse().unwrap()].into_iter().chain(image).collect();
        assert_eq!(r["shape"][n], serde_json::json!([want, want]), "{name}: batch of {n}");
        let (lo, hi) = (r["range"][n][0].as_f64().unwrap(), r["range"][n][1].as_f64().unwrap());
        assert!((-1.0..=1.0).contains(&lo) && (-1.0..=1.0).contains(&hi) && lo < hi, "{name}: values in [{lo}, {hi}]");
    }
    // The grid latents redraw the run's last sample grid (drawn with the weights exported
    // unless --no-ema left out the EMA the grids use), pixel for pixel, through both files.
    let meta = &r["grid_meta"];
    let (grid, pad): (usize, usize) = (meta["grid"].as_str().unwrap().parse().unwrap(), meta["pad"].as_str().unwrap().parse().unwrap());
    assert_eq!(meta["samples"], "samples/step_NNNNNNNN.png");
    let step: u64 = r["meta"]["step"].as_str().unwrap().parse().unwrap();
    let png = image::open(run_dir.join(format!("samples/step_{step:08}.png"))).unwrap().to_rgb8();
    let drawn = Tensor::read_safetensors(&grid_out).unwrap();
    for (key, x) in &drawn {
        let s = x.size();
        assert_eq!(s, [(grid * grid) as i64, image[0], image[1], image[2]], "{name}: {key}");
        let images =
            Images { step, shape: [s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize], data: to_u8(x).unwrap(), last: true };
        let frame = make_grid(&images, grid, pad, PAD_VALUE);
        let same = (frame.width, frame.height) == png.dimensions() && frame.rgb == png.as_raw().as_slice();
        let ema_kept = pipe::sample::open_checkpoint(&run_dir).unwrap().manifest.ema;
        if weights == "g_ema" || !ema_kept {
            assert!(same, "{name}: PyTorch's G({key} of grid_latents) is not the grid of step {step}");
        } else {
            assert!(!same, "{name}: G's own weights should not redraw the EMA's grid");
        }
    }
    r
}

#[test]
fn mlp_with_batch_norm_and_ema_loads_in_pytorch_and_matches_pipe() {
    let p = Pipe::new(&[]);
    let data = synthetic_idx(&p.tmp().join("idx"), 256, 12, 5);
    let file = pipeline_on(p.tmp(), &data);
    let run = Pipe::run_tiny(file.to_str().unwrap())
        .args(&["--max-steps", "6"])
        .set("g_step.model=Mlp(hidden: 32, layers: 2, batch_norm: true)")
        .set("g_step.ema=(decay: 0.5)")
        .set("loader.batch=16")
        .set("sampler.every=6");
    run.go().code(0);
    let r = export_and_check(&run, "export", &[], [1, 12, 12]);
    assert_eq!(r["meta"]["class"], "MlpGenerator");
    assert_eq!(r["meta"]["kwargs"], r#"{"latent":62,"image_shape":[1,12,12],"hidden":32,"layers":2,"batch_norm":true}"#);
    assert_eq!(r["meta"]["weights"], "g_ema");
    assert_eq!(r["meta"]["step"], "6");
    let readme = std::fs::read_to_string(run.tmp().join("export/README.txt")).unwrap();
    for part in [
        "Generator: MlpGenerator(latent=62, image_shape=(1, 12, 12), hidden=32, layers=2, batch_norm=True)",
        "Weights: the EMA of G's weights (g_ema: decay 0.5, averaging from step 0).",
        "Input: z of shape [N, 62], float32",
        "Output: images [N, 1, 12, 12] (grey, NCHW), float32, in [-1, 1].",
        "Pixels: ((x.clamp(-1, 1) + 1) * 127.5).round() as uint8",
        "g = torch.jit.load(\"generator.pt\")",
        "g = load_generator(\"generator.safetensors\")",
        "grid_latents.safetensors   z [64, 62]: the latents of the run's sample grids",
        "G(z) with\n                             these weights draws the grid of step 6 exactly as pipe\n                             did (samples/step_00000006.png, when the sampler drew one then).",
        "z = load_file(\"grid_latents.safetensors\")[\"z\"]",
    ] {
        assert!(readme.contains(part), "`{part}` not in README.txt:\n{readme}");
    }

    // --no-ema: G's own weights, which differ from the EMA's after 6 steps at decay 0.5.
    let raw = export_and_check(&run, "raw", &["--no-ema"], [1, 12, 12]);
    assert_eq!(raw["meta"]["weights"], "g");
    let a = Tensor::read_safetensors(run.tmp().join("export/generator.safetensors")).unwrap();
    let b = Tensor::read_safetensors(run.tmp().join("raw/generator.safetensors")).unwrap();
    let w = |v: &[(String, Tensor)]| v.iter().find(|(n, _)| n == "fc0.weight").unwrap().1.shallow_clone();
    assert!((w(&a) - w(&b)).abs().max().double_value(&[]) > 0.0, "the EMA and G's own weights differ");
    let readme = std::fs::read_to_string(run.tmp().join("raw/README.txt")).unwrap();
    assert!(readme.contains("Weights: G's own weights (g), by --no-ema; the run also kept an EMA of G."), "{readme}");
    assert!(readme.contains("the EMA weights (an export without --no-ema) draws the grid of step 6"), "{readme}");
}

#[test]
fn dcgan_on_rgb_images_loads_in_pytorch_and_matches_pipe() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/illustrations");
    assert!(root.is_dir(), "data/illustrations is missing: run scripts/setup.sh first");
    // Batch norm in G (the Dcgan default), no EMA: G's own weights are exported.
    let run = Pipe::run_tiny("pipelines/irasutoya_small.ron")
        .args(&["--max-steps", "4"])
        .set("loader.size=16")
        .set("loader.batch=8")
        .set("d_step.model=Dcgan(width: 8)")
        .set("g_step.model=Dcgan(width: 8)")
        .set("g_step.latent=10")
        .set("g_step.ema=None")
        .set("sampler.every=4")
        .set("sampler.grid=2");
    run.go().code(0);
    let r = export_and_check(&run, "export", &[], [3, 16, 16]);
    assert_eq!(r["meta"]["class"], "DcganGenerator");
    assert_eq!(r["meta"]["kwargs"], r#"{"latent":10,"image_shape":[3,16,16],"width":8,"batch_norm":true}"#);
    assert_eq!(r["meta"]["weights"], "g");
    let readme = std::fs::read_to_string(run.tmp().join("export/README.txt")).unwrap();
    assert!(readme.contains("Weights: G's own weights (g); the run kept no EMA of G."), "{readme}");
    assert!(readme.contains("Output: images [N, 3, 16, 16] (RGB, NCHW)"), "{readme}");
    assert!(readme.contains("DcganDiscriminator(image_shape=(3, 16, 16), width=8, batch_norm=False)"), "{readme}");
}

#[test]
fn infogan_with_ema_loads_in_pytorch_and_matches_pipe() {
    // irasutoya_small's (and mnist_dcgan's) networks, tiny.
    let p = Pipe::new(&[]);
    let data = synthetic_idx(&p.tmp().join("idx"), 256, 16, 9);
    let file = pipeline_on(p.tmp(), &data);
    let run = Pipe::run_tiny(file.to_str().unwrap())
        .args(&["--max-steps", "5"])
        .set("d_step.model=InfoGan(width: 4, hidden: 16)")
        .set("g_step.model=InfoGan(width: 4, hidden: 16)")
        .set("g_step.ema=(decay: 0.5, start: 2)")
        .set("loader.batch=16")
        .set("sampler.every=5");
    run.go().code(0);
    let r = export_and_check(&run, "export", &[], [1, 16, 16]);
    assert_eq!(r["meta"]["class"], "InfoGanGenerator");
    assert_eq!(r["meta"]["kwargs"], r#"{"latent":62,"image_shape":[1,16,16],"width":4,"hidden":16}"#);
    assert_eq!(r["meta"]["weights"], "g_ema");
}

#[test]
fn bad_checkpoints_and_outputs_are_refused_clearly() {
    let p = Pipe::new(&[]);
    let tmp = p.tmp();
    let out = tmp.join("out");
    let out_s = out.to_str().unwrap();
    let export = |ck: &str, out: &str| Pipe::new(&["export", ck, "--out", out]).go();
    let no_panic = |o: &crate::common::Finished| assert!(!o.stderr().contains("panicked"), "{}", o.stderr());

    // A path that does not exist.
    let missing = tmp.join("nothing/here");
    let o = export(missing.to_str().unwrap(), out_s);
    o.code(2).says(&[&format!("error: {}: no such checkpoint file or run folder", missing.display())]);
    no_panic(&o);
    // A folder with no checkpoint, and a run folder whose checkpoints folder is empty.
    let empty = tmp.join("empty");
    std::fs::create_dir_all(empty.join("sub")).unwrap();
    let o = export(empty.to_str().unwrap(), out_s);
    o.code(2).says(&[&format!("error: {}: no checkpoints (step_*.safetensors) found", empty.display())]);
    std::fs::create_dir_all(empty.join("checkpoints")).unwrap();
    let o = export(empty.to_str().unwrap(), out_s);
    o.code(2).says(&[&format!("error: {}: no checkpoints (step_*.safetensors) found", empty.join("checkpoints").display())]);
    // A file that is not a checkpoint.
    let o = export("pipelines/mnist_mlp.ron", out_s);
    o.code(2).says(&["pipelines/mnist_mlp.ron: not a readable checkpoint"]);
    no_panic(&o);
    assert!(!out.exists(), "nothing is written for a bad checkpoint:\n{}", listing(&out));

    // A good checkpoint, but --out is a file, or lies under one.
    let data = synthetic_idx(&tmp.join("idx"), 64, 8, 1);
    let file = pipeline_on(tmp, &data);
    let run = Pipe::run_tiny(file.to_str().unwrap()).args(&["--max-steps", "2"]).set("loader.batch=16");
    run.go().code(0);
    let file_out = tmp.join("a_file");
    std::fs::write(&file_out, "x").unwrap();
    let o = export(run.out().to_str().unwrap(), file_out.to_str().unwrap());
    o.code(2).says(&[&format!(
        "error: --out {}: is a file; give a folder to write the export into (it is created if missing)",
        file_out.display()
    )]);
    assert_eq!(std::fs::read(&file_out).unwrap(), b"x", "the file is left as it was");
    let under = file_out.join("export");
    let o = export(run.out().to_str().unwrap(), under.to_str().unwrap());
    o.code(2).says(&[&format!("error: --out {}: cannot create the folder:", under.display())]);
    no_panic(&o);
    // --out is required.
    let o = Pipe::new(&["export", run.out().to_str().unwrap()]).go();
    o.code(2);
    assert!(stderr(&o.output).contains("--out <OUT>"), "{}", o.stderr());
}
