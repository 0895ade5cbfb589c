//! `pipe export`: a checkpoint's generator (and discriminator) as files PyTorch loads.
//!
//! Into the folder `--out` it writes:
//!
//! | file | what |
//! |---|---|
//! | `generator.safetensors` | G's variables (the EMA's when the run kept one, unless `--no-ema`), batch-norm running statistics included, named as the modules of `pipe_models.py` name them; the constructor arguments in the metadata |
//! | `discriminator.safetensors` | D's variables, the same way |
//! | `generator.pt` | G traced with libtorch's TorchScript tracer in eval mode: z `[N, latent]` → images `[N, C, H, W]` in [-1, 1], any N |
//! | `pipe_models.py` | a copy of `examples/pytorch/pipe_models.py`: the plain PyTorch modules and `load_generator` |
//! | `grid_latents.safetensors` | `z` `[grid², latent]` f32: the latents of the run's sample grids (`samples/step_N.png`), so that G(z) in PyTorch redraws them; metadata `grid`, `pad`, `seed`, `samples`. Not written for a pipeline without a Sampler stage |
//! | `README.txt` | what the files hold and how to load them |
//!
//! G is rebuilt on the CPU as `pipe sample` rebuilds it ([`crate::sample::generator`]). The
//! traced module is loaded back from the file and run on batches of 1 and 7 latents; its
//! images must match G's, else nothing is reported written (exit 1).
//!
//! Safetensors metadata (string → string): `format` = `pipe-export`, `version`, `role`
//! (`generator` or `discriminator`), `class` (a class of `pipe_models.py`), `kwargs` (its
//! constructor arguments as a JSON object), `weights` (`g_ema`, `g` or `d`), `step`,
//! `pipeline`, `checkpoint` (file name), `latent`, `image_shape` (`C,H,W`), `value_range`
//! (`-1,1`), `pipe_version`. PyTorch's batch-norm modules hold a `num_batches_tracked`
//! buffer that pipe does not keep: it is written as an int64 0 (PyTorch reads it only with
//! `momentum=None`).

use crate::run::RunError;
use crate::sample::{generator, open_checkpoint, run_sampler, stored_pipeline, Generator};
use pipe_stages::io::atomic::{write_bytes_atomic, write_path_atomic};
use pipe_stages::io::checkpoint::Checkpoint;
use pipe_stages::kinds::d_step::DStepConfig;
use pipe_stages::kinds::g_step::fixed_latent;
use pipe_stages::kinds::sampler::SamplerConfig;
use pipe_stages::train::models::{build_d, DModel, GModel};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{nn, CModule, Device, Kind, Tensor};

/// The plain PyTorch modules, copied into every export.
pub const PIPE_MODELS_PY: &str = include_str!("../examples/pytorch/pipe_models.py");

/// Batch sizes the traced module is checked with after it is written.
pub const CHECK_BATCHES: [usize; 2] = [1, 7];

/// Largest difference accepted between the traced module and G (images in [-1, 1]).
const TRACE_TOL: f64 = 1e-6;

/// Options of `pipe export`.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// A checkpoint file, a run folder or a `checkpoints` folder (its newest readable one).
    pub checkpoint: PathBuf,
    /// The folder to write into (created if missing; files of an earlier export are replaced).
    pub out: PathBuf,
    /// Export G's own weights even when the checkpoint has EMA weights.
    pub no_ema: bool,
}

/// What `pipe export` wrote.
#[derive(Debug)]
pub struct ExportReport {
    pub out: PathBuf,
    pub checkpoint: PathBuf,
    pub step: u64,
    /// `g_ema` or `g`.
    pub weights: &'static str,
    /// The file names written into `out`.
    pub files: Vec<&'static str>,
    /// Largest |traced module − G| over the check batches.
    pub trace_diff: f64,
}

fn invalid(m: String) -> RunError {
    RunError::Invalid(vec![m])
}

/// The class of `pipe_models.py` for G and its constructor arguments.
fn g_class(model: &GModel, latent: i64, image: [i64; 3]) -> (&'static str, Value) {
    match model {
        GModel::Mlp(m) => (
            "MlpGenerator",
            json!({"latent": latent, "image_shape": image, "hidden": m.hidden, "layers": m.layers, "batch_norm": m.batch_norm}),
        ),
        GModel::Dcgan(d) => (
            "DcganGenerator",
            json!({"latent": latent, "image_shape": image, "width": d.width, "batch_norm": d.batch_norm.unwrap_or(true)}),
        ),
        GModel::InfoGan(g) => ("InfoGanGenerator", json!({"latent": latent, "image_shape": image, "width": g.width, "hidden": g.hidden})),
    }
}

/// The class of `pipe_models.py` for D and its constructor arguments.
fn d_class(model: &DModel, image: [i64; 3]) -> (&'static str, Value) {
    match model {
        DModel::Mlp(m) => {
            ("MlpDiscriminator", json!({"image_shape": image, "hidden": m.hidden, "layers": m.layers, "batch_norm": m.batch_norm}))
        }
        DModel::Dcgan(d) => {
            ("DcganDiscriminator", json!({"image_shape": image, "width": d.width, "batch_norm": d.batch_norm == Some(true)}))
        }
        DModel::InfoGan(g) => ("InfoGanDiscriminator", json!({"image_shape": image, "width": g.width, "hidden": g.hidden})),
    }
}

/// `Class(a=1, image_shape=(1, 28, 28), batch_norm=True)`: the constructor call in Python.
fn py_call(class: &str, kwargs: &Value) -> String {
    fn py(v: &Value) -> String {
        match v {
            Value::Bool(b) => if *b { "True" } else { "False" }.into(),
            Value::Array(a) => format!("({})", a.iter().map(py).collect::<Vec<_>>().join(", ")),
            other => other.to_string(),
        }
    }
    let args = kwargs.as_object().map(|o| o.iter().map(|(k, v)| format!("{k}={}", py(v))).collect::<Vec<_>>().join(", "));
    format!("{class}({})", args.unwrap_or_default())
}

/// A safetensors file of `vs`'s variables (f32, on the host), plus an int64 0
/// `<module>.num_batches_tracked` beside each batch norm's running statistics, with `meta` in
/// its header.
fn safetensors_of(vs: &nn::VarStore, meta: HashMap<String, String>) -> Result<Vec<u8>, String> {
    let mut named: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = vec![];
    for (name, t) in vs.variables() {
        let t = t.f_detach().and_then(|t| t.f_to_device(Device::Cpu)).and_then(|t| t.f_to_kind(Kind::Float)).map_err(|e| e.to_string())?;
        let flat = t.f_contiguous().and_then(|t| t.f_view([-1])).map_err(|e| e.to_string())?;
        let values = Vec::<f32>::try_from(&flat).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        if let Some(module) = name.strip_suffix(".running_mean") {
            named.push((format!("{module}.num_batches_tracked"), safetensors::Dtype::I64, vec![], 0i64.to_le_bytes().to_vec()));
        }
        named.push((name, safetensors::Dtype::F32, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut views = vec![];
    for (name, dtype, shape, bytes) in &named {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| format!("tensor `{name}`: {e}"))?;
        views.push((name.as_str(), view));
    }
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}

/// The metadata shared by both safetensors files.
fn common_meta(ck: &Checkpoint, pipeline: &str) -> HashMap<String, String> {
    let m = &ck.manifest;
    let file = ck.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    [
        ("format", "pipe-export".to_string()),
        ("version", "1".into()),
        ("step", m.step.to_string()),
        ("pipeline", pipeline.to_string()),
        ("checkpoint", file),
        ("latent", m.latent.to_string()),
        ("image_shape", m.image.map(|v| v.to_string()).join(",")),
        ("value_range", "-1,1".into()),
        ("pipe_version", env!("CARGO_PKG_VERSION").into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Trace `g` (eval mode) with a batch of 4 latents.
fn trace(g: &Generator, latent: i64) -> Result<CModule, tch::TchError> {
    let z = Tensor::f_from_slice(&fixed_latent(0, 4, latent))?.f_view([4, latent])?;
    let net = &g.net;
    let mut closure = |inputs: &[Tensor]| vec![net.forward(&inputs[0], false)];
    CModule::create_by_tracing("PipeGenerator", "forward", &[z], &mut closure)
}

/// Largest |module(z) − G(z)| over batches of [`CHECK_BATCHES`] latents; errors when the
/// module fails on one of them or gives another shape.
fn check_traced(module: &CModule, g: &Generator, latent: i64) -> Result<f64, String> {
    let mut worst = 0.0f64;
    for (i, &n) in CHECK_BATCHES.iter().enumerate() {
        let z = Tensor::f_from_slice(&fixed_latent(1000 + i as u64, n, latent))
            .and_then(|t| t.f_view([n as i64, latent]))
            .map_err(|e| e.to_string())?;
        let want = tch::no_grad(|| g.net.forward(&z, false));
        let got = tch::no_grad(|| module.forward_ts(&[&z])).map_err(|e| format!("a batch of {n}: {e}"))?;
        if got.size() != want.size() {
            return Err(format!("a batch of {n} gives shape {:?}, G gives {:?}", got.size(), want.size()));
        }
        let d = (got - want).abs().max().double_value(&[]);
        worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
    }
    Ok(worst)
}

/// The discriminator of a checkpoint on the CPU, and its `d_step` model setting.
fn discriminator(ck: &Checkpoint) -> Result<(nn::VarStore, DModel), RunError> {
    let p = stored_pipeline(ck)?;
    let d = p
        .stages
        .iter()
        .find_map(|s| s.kind.config::<DStepConfig>())
        .ok_or_else(|| invalid(format!("{}: the stored pipeline has no d_step", ck.path.display())))?;
    let vs = nn::VarStore::new(Device::Cpu);
    build_d(&vs.root(), &d.model, ck.manifest.image).map_err(|e| invalid(format!("{}: {e}", ck.path.display())))?;
    ck.load_vars("d.", &vs).map_err(|e| invalid(e.to_string()))?;
    Ok((vs, d.model.clone()))
}

/// `grid_latents.safetensors`: the latents `z` `[grid², latent]` (f32) the run's sample grids
/// are drawn from ([`fixed_latent`] of the run's seed), with their layout in the metadata.
fn grid_latents(ck: &Checkpoint, sampler: &SamplerConfig) -> Result<Vec<u8>, String> {
    let m = &ck.manifest;
    let (grid, pad, dir) = (sampler.grid, sampler.pad, &sampler.dir);
    let n = grid * grid;
    let z = fixed_latent(m.seed, n, m.latent);
    let bytes: Vec<u8> = z.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, m.latent as usize], &bytes).map_err(|e| e.to_string())?;
    let meta: HashMap<String, String> = [
        ("format", "pipe-export".to_string()),
        ("role", "grid_latents".into()),
        ("grid", grid.to_string()),
        ("pad", pad.to_string()),
        ("seed", m.seed.to_string()),
        ("samples", format!("{}/step_NNNNNNNN.png", dir.display())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    safetensors::serialize([("z", view)], Some(meta)).map_err(|e| e.to_string())
}

/// README.txt of an export; `sampler` is the run's ([`run_sampler`]), when it has one.
#[allow(clippy::too_many_arguments)]
fn readme(
    ck: &Checkpoint,
    sampler: Option<&SamplerConfig>,
    g_call: &str,
    d_call: &str,
    weights: &str,
    no_ema: bool,
    ema: Option<(f64, u64)>,
    trace_diff: f64,
) -> String {
    let m = &ck.manifest;
    let [c, h, w] = m.image;
    let latent = m.latent;
    let which = match (weights, ema) {
        ("g_ema", Some((decay, start))) if m.step < start => format!(
            "the EMA of G's weights (g_ema: decay {decay}, averaging from step {start}; until then it copies G: at step {} it equals G)",
            m.step
        ),
        ("g_ema", Some((decay, start))) => format!("the EMA of G's weights (g_ema: decay {decay}, averaging from step {start})"),
        (_, Some(_)) if no_ema => "G's own weights (g), by --no-ema; the run also kept an EMA of G".into(),
        _ => "G's own weights (g); the run kept no EMA of G".into(),
    };
    // The grids are drawn with the EMA generator when the run kept one.
    let grid_weights = match (weights, ema.is_some()) {
        ("g_ema", _) | ("g", false) => "these weights",
        _ => "the EMA weights (an export without --no-ema)",
    };
    let (grid_line, grid_snippet) = match sampler {
        Some(&SamplerConfig { grid, pad, dir: ref samples, .. }) => (
            format!(
                "  grid_latents.safetensors   z [{n}, {latent}]: the latents of the run's sample grids
                             ({samples}/step_NNNNNNNN.png, {grid} x {grid} tiles, {pad} px of padding;
                             image i is the tile in row i // {grid}, column i % {grid}). G(z) with
                             {grid_weights} draws the grid of step {step} exactly as pipe
                             did ({samples}/step_{step:08}.png, when the sampler drew one then).
",
                n = grid * grid,
                samples = samples.display(),
                step = m.step,
            ),
            format!(
                "
    from safetensors.torch import load_file
    z = load_file(\"grid_latents.safetensors\")[\"z\"]
    x = g(z).detach()  # the {n} images of the run's sample grids, in tile order
",
                n = grid * grid
            ),
        ),
        None => ("  (no grid_latents.safetensors: the pipeline has no Sampler stage, so no sample grids)\n".to_string(), String::new()),
    };
    let colours = if c == 1 {
        "grey"
    } else if c == 3 {
        "RGB"
    } else {
        "channels"
    };
    format!(
        "Exported by `pipe export` (pipe {version}) from {path}
(pipeline `{name}`, step {step}).

Generator: {g_call}
Weights: {which}.
Input: z of shape [N, {latent}], float32, drawn from N(0, I) as in training.
Output: images [N, {c}, {h}, {w}] ({colours}, NCHW), float32, in [-1, 1].
Pixels: ((x.clamp(-1, 1) + 1) * 127.5).round() as uint8, as pipe's own grids.

Files:
  generator.safetensors      G's weights, batch-norm running statistics included; the
                             constructor arguments in its metadata (`class`, `kwargs`).
  generator.pt               G as TorchScript, traced on the CPU in eval mode (batch norm
                             uses the running statistics); any batch size. Its weights are
                             constants of the graph (it has no parameters). Checked after
                             writing on batches of 1 and 7 against pipe's G: max |difference|
                             {diff}.
  discriminator.safetensors  D's weights (images [N, {c}, {h}, {w}] in [-1, 1] -> logits [N, 1]):
                             {d_call}
  pipe_models.py             the plain PyTorch modules these weights load into (strict).
{grid_line}
From this folder, with torch and safetensors installed:

    import torch
    g = torch.jit.load(\"generator.pt\")
    z = torch.randn(16, {latent})
    x = g(z)  # [16, {c}, {h}, {w}] in [-1, 1]
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    import torch
    from pipe_models import load_generator  # pipe_models.py of this folder
    g = load_generator(\"generator.safetensors\")  # eval mode
    x = g(torch.randn(16, {latent})).detach()  # [16, {c}, {h}, {w}] in [-1, 1]
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
{grid_snippet}",
        version = env!("CARGO_PKG_VERSION"),
        path = ck.path.display(),
        name = name_of(ck),
        step = m.step,
        diff = fmt_diff(trace_diff),
    )
}

/// A difference for a message: `0` when none, else 2 significant digits (`3.1e-8`).
pub fn fmt_diff(d: f64) -> String {
    if d == 0.0 {
        "0".into()
    } else {
        format!("{d:.1e}")
    }
}

/// The pipeline's name, from the stored pipeline (empty when it does not parse).
fn name_of(ck: &Checkpoint) -> String {
    stored_pipeline(ck).map(|p| p.name).unwrap_or_default()
}

/// Run `pipe export`.
///
/// Errors: `--out` is not a folder or cannot be created, or the checkpoint is missing,
/// unreadable or not loadable (exit 2); tracing, checking or writing failed (exit 1).
pub fn export(o: &ExportOptions) -> Result<ExportReport, RunError> {
    if o.out.exists() && !o.out.is_dir() {
        return Err(invalid(format!(
            "--out {}: is a file; give a folder to write the export into (it is created if missing)",
            o.out.display()
        )));
    }
    let ck = open_checkpoint(&o.checkpoint)?;
    let m = &ck.manifest;
    let mut g = generator(&ck, Device::Cpu, o.no_ema)?;
    // Constants of a trace must not require gradients: the tracer refuses them.
    g.vs.freeze();
    let (d_vs, d_model) = discriminator(&ck)?;
    std::fs::create_dir_all(&o.out).map_err(|e| invalid(format!("--out {}: cannot create the folder: {e}", o.out.display())))?;
    let fail = |file: &str, e: String| RunError::Failed(format!("{}: {e}", o.out.join(file).display()));
    let pipeline = name_of(&ck);

    let (g_name, g_kwargs) = g_class(&g.config.model, m.latent, m.image);
    let mut meta = common_meta(&ck, &pipeline);
    meta.extend([
        ("role".to_string(), "generator".to_string()),
        ("class".into(), g_name.into()),
        ("kwargs".into(), g_kwargs.to_string()),
        ("weights".into(), g.weights.into()),
    ]);
    let bytes = safetensors_of(&g.vs, meta).map_err(|e| fail("generator.safetensors", e))?;
    write_bytes_atomic(&o.out.join("generator.safetensors"), &bytes).map_err(|e| fail("generator.safetensors", e.to_string()))?;

    let (d_name, d_kwargs) = d_class(&d_model, m.image);
    let mut meta = common_meta(&ck, &pipeline);
    meta.extend([
        ("role".to_string(), "discriminator".to_string()),
        ("class".into(), d_name.into()),
        ("kwargs".into(), d_kwargs.to_string()),
        ("weights".into(), "d".into()),
    ]);
    let bytes = safetensors_of(&d_vs, meta).map_err(|e| fail("discriminator.safetensors", e))?;
    write_bytes_atomic(&o.out.join("discriminator.safetensors"), &bytes).map_err(|e| fail("discriminator.safetensors", e.to_string()))?;

    let pt = o.out.join("generator.pt");
    let traced = trace(&g, m.latent).map_err(|e| fail("generator.pt", format!("tracing G: {e}")))?;
    write_path_atomic(&pt, |tmp| traced.save(tmp).map_err(std::io::Error::other)).map_err(|e| fail("generator.pt", e.to_string()))?;
    let loaded = CModule::load(&pt).map_err(|e| fail("generator.pt", format!("reading it back: {e}")))?;
    let trace_diff = check_traced(&loaded, &g, m.latent).map_err(|e| fail("generator.pt", format!("the traced module: {e}")))?;
    if trace_diff > TRACE_TOL {
        return Err(fail("generator.pt", format!("the traced module differs from G by {trace_diff:.3e} (more than {TRACE_TOL:e})")));
    }

    write_bytes_atomic(&o.out.join("pipe_models.py"), PIPE_MODELS_PY.as_bytes()).map_err(|e| fail("pipe_models.py", e.to_string()))?;
    let mut files = vec!["generator.safetensors", "generator.pt", "discriminator.safetensors", "pipe_models.py"];
    let sampler = run_sampler(&ck);
    if let Some(sampler) = &sampler {
        let bytes = grid_latents(&ck, sampler).map_err(|e| fail("grid_latents.safetensors", e))?;
        write_bytes_atomic(&o.out.join("grid_latents.safetensors"), &bytes).map_err(|e| fail("grid_latents.safetensors", e.to_string()))?;
        files.push("grid_latents.safetensors");
    }
    files.push("README.txt");
    let ema = g.config.ema.as_ref().filter(|_| m.ema).map(|e| (e.decay, e.start));
    let mut text =
        readme(&ck, sampler.as_ref(), &py_call(g_name, &g_kwargs), &py_call(d_name, &d_kwargs), g.weights, o.no_ema, ema, trace_diff);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    write_bytes_atomic(&o.out.join("README.txt"), text.as_bytes()).map_err(|e| fail("README.txt", e.to_string()))?;

    Ok(ExportReport { out: o.out.clone(), checkpoint: ck.path.clone(), step: m.step, weights: g.weights, files, trace_diff })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipe_stages::train::models::{DcganConfig, InfoGanConfig, MlpConfig};

    #[test]
    fn constructor_calls_read_as_python() {
        let (c, k) = g_class(&GModel::Mlp(MlpConfig { hidden: 32, layers: 2, batch_norm: true }), 62, [1, 28, 28]);
        assert_eq!(py_call(c, &k), "MlpGenerator(latent=62, image_shape=(1, 28, 28), hidden=32, layers=2, batch_norm=True)");
        let (c, k) = g_class(&GModel::Dcgan(DcganConfig { width: 8, batch_norm: None }), 100, [3, 16, 16]);
        assert_eq!(py_call(c, &k), "DcganGenerator(latent=100, image_shape=(3, 16, 16), width=8, batch_norm=True)");
        let (c, k) = d_class(&DModel::Dcgan(DcganConfig { width: 8, batch_norm: None }), [3, 16, 16]);
        assert_eq!(py_call(c, &k), "DcganDiscriminator(image_shape=(3, 16, 16), width=8, batch_norm=False)");
        let (c, k) = d_class(&DModel::InfoGan(InfoGanConfig { width: 4, hidden: 16 }), [1, 32, 32]);
        assert_eq!(k.to_string(), r#"{"image_shape":[1,32,32],"width":4,"hidden":16}"#);
        assert_eq!(c, "InfoGanDiscriminator");
    }

    #[test]
    fn batch_norm_gets_a_num_batches_tracked_beside_its_statistics() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _bn = nn::batch_norm1d(vs.root() / "bn0", 3, Default::default());
        let _fc = nn::linear(vs.root() / "fc0", 2, 3, Default::default());
        let bytes = safetensors_of(&vs, [("k".to_string(), "v".to_string())].into()).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(
            names,
            ["bn0.bias", "bn0.num_batches_tracked", "bn0.running_mean", "bn0.running_var", "bn0.weight", "fc0.bias", "fc0.weight"]
        );
        let n = st.tensor("bn0.num_batches_tracked").unwrap();
        assert_eq!((n.dtype(), n.shape(), n.data()), (safetensors::Dtype::I64, &[][..], &[0u8; 8][..]));
        assert_eq!(st.tensor("fc0.weight").unwrap().shape(), &[3, 2]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["k"], "v");
    }
}
