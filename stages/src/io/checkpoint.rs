//! Checkpoints: the whole training state in one safetensors file, written atomically.
//!
//! A checkpoint `<run>/checkpoints/step_<step:08>.safetensors` holds, as `f32` tensors:
//!
//! | names          | what                                                        |
//! |----------------|-------------------------------------------------------------|
//! | `g.*`, `d.*`   | every variable of G and D (weights, biases, batch-norm statistics) |
//! | `g_adam.m.*`, `g_adam.v.*`, `d_adam.m.*`, `d_adam.v.*` | Adam's first and second moments |
//! | `g_ema.*`      | the generator EMA's variables, when the EMA is on            |
//!
//! and, in the safetensors header metadata under the key `pipe`, a JSON [`Manifest`]: the step,
//! images seen, elapsed time, Adam step counts, the loader position, the image shape and latent
//! size, the resolved pipeline (RON) and a CRC-32 of the tensor data.
//!
//! **Random state.** Every random draw of a run is a pure function of the pipeline seed and a
//! counter: weights at step 0 from the seed; the loader's order from (seed, epoch); the DRAGAN
//! perturbation from (seed, batch index); the latents z and WGAN-GP's ε of each step from
//! (seed, step, D update) through [`step_seed`]. So the random state at a step is fully given by
//! the manifest's `seed`, `step` and `data` position, and a resumed run draws exactly what an
//! uninterrupted one would.
//!
//! **Atomic writes.** The file is written as `.<name>.<random>.partial` ([`crate::io::atomic`]), flushed to disk (fsync), then
//! renamed over the final name, and the folder is synced: a crash or a full disk leaves either
//! the previous checkpoints untouched or a complete new one, never a half-written latest file.
//! A checkpoint with non-finite weights is never written.
//!
//! Errors of this module are [`CheckpointError`]s.

use crate::core::item::DataPosition;
use crate::core::problem::Problem;
use crate::core::stage::first_line;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

/// Folder of the checkpoints inside a run folder.
pub const DIR: &str = "checkpoints";
/// Value of [`Manifest::format`].
pub const FORMAT: &str = "pipe-checkpoint";
/// Version of the layout described above.
pub const VERSION: u32 = 1;
/// Key of the manifest in the safetensors metadata.
const META_KEY: &str = "pipe";

/// Why a checkpoint could not be written, read or loaded. Each names the file (or folder) at
/// fault, apart from the manifest that cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A tensor to save cannot be copied to the host.
    #[error("checkpoint tensor `{name}`: {}", first_line(&.source.to_string()))]
    Host { name: String, source: tch::TchError },
    /// A tensor to save holds NaN or ±Inf: nothing was written.
    #[error("step {step}: tensor `{name}` holds NaN or infinite values; checkpoint not written (the earlier ones are kept)")]
    NonFinite { step: u64, name: String },
    /// The manifest cannot be encoded as JSON.
    #[error("checkpoint manifest: {0}")]
    Manifest(serde_json::Error),
    /// The tensors cannot be laid out as safetensors.
    #[error("checkpoint of step {step}: {source}")]
    Serialize { step: u64, source: safetensors::SafeTensorError },
    /// The checkpoint folder cannot be created.
    #[error("{}: cannot create the checkpoint folder: {source}", dir.display())]
    CreateDir { dir: PathBuf, source: std::io::Error },
    /// The file cannot be written (a full disk, say); the earlier checkpoints are kept.
    #[error("{}: cannot write the checkpoint: {source} (the earlier checkpoints are kept)", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    /// The file cannot be read.
    #[error("{}: cannot read the checkpoint: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is truncated or not safetensors.
    #[error("{}: not a readable checkpoint: the file is truncated or corrupt ({source})", path.display())]
    Corrupt { path: PathBuf, source: safetensors::SafeTensorError },
    /// The safetensors header cannot be read.
    #[error("{}: not a readable checkpoint ({source})", path.display())]
    Header { path: PathBuf, source: safetensors::SafeTensorError },
    /// A safetensors file without a pipe manifest.
    #[error("{}: a safetensors file, but not a pipe checkpoint (it has no `{META_KEY}` manifest)", .0.display())]
    NoManifest(PathBuf),
    /// The manifest is not valid JSON of a [`Manifest`].
    #[error("{}: the checkpoint's manifest is unreadable: {source}", path.display())]
    BadManifest { path: PathBuf, source: serde_json::Error },
    /// A checkpoint of another format or version.
    #[error("{}: checkpoint format {format:?} version {version}, this pipe reads {FORMAT:?} version {VERSION}", path.display())]
    Version { path: PathBuf, format: String, version: u32 },
    /// A tensor cannot be read from the file.
    #[error("{}: tensor `{name}`: {source}", path.display())]
    Tensor { path: PathBuf, name: String, source: safetensors::SafeTensorError },
    /// A tensor is not `f32`.
    #[error("{}: tensor `{name}` is {dtype:?}, expected F32", path.display())]
    Dtype { path: PathBuf, name: String, dtype: safetensors::Dtype },
    /// A tensor cannot be made into (or copied as) a libtorch tensor.
    #[error("{}: tensor `{name}`: {}", path.display(), first_line(&.source.to_string()))]
    Torch { path: PathBuf, name: String, source: tch::TchError },
    /// The tensor data does not match the manifest's CRC-32.
    #[error("{}: corrupt checkpoint: the tensor data does not match its checksum", .0.display())]
    Checksum(PathBuf),
    /// No checkpoint file in the folder.
    #[error("{}: no checkpoints (step_*.safetensors) found", .0.display())]
    NoCheckpoints(PathBuf),
    /// Checkpoints in the folder, none of them readable (each reason, newest first).
    #[error("{}: no readable checkpoint:\n  {}", dir.display(), .skipped.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    NoneReadable { dir: PathBuf, skipped: Vec<CheckpointError> },
    /// The checkpoint's tensors do not fit the model (one line per problem, at most 8 and a
    /// count of the others).
    #[error("{}: the checkpoint was written for a different model:\n  {}", path.display(), .problems.join("\n  "))]
    OtherModel { path: PathBuf, problems: Vec<String> },
}

/// When to write checkpoints (the `checkpoint` field of a pipeline; `None` writes none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Write one every this many generator steps, and always after the last step (whether the
    /// run reached max_steps, its data ended, or it was stopped with Ctrl-C). At least 1.
    /// Default 1000.
    pub every: u64,
    /// Keep the newest this many; older ones are deleted once a new one is safely written.
    /// At least 1. Default 3.
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { every: 1000, keep: 3 }
    }
}

impl CheckpointConfig {
    /// Check the values: `every` ≥ 1, `keep` ≥ 1.
    pub fn problems(&self) -> Vec<Problem> {
        let mut errs = vec![];
        if self.every == 0 {
            errs.push(Problem::new("every", "checkpoint `every` must be at least 1 (generator steps between checkpoints)"));
        }
        if self.keep == 0 {
            errs.push(Problem::new("keep", "checkpoint `keep` must be at least 1 (or write `checkpoint: None` for no checkpoints)"));
        }
        errs
    }

    /// [`Self::problems`] as one result: every message, one per line.
    pub fn validate(&self) -> Result<(), crate::core::problem::Problems> {
        crate::core::problem::to_result(self.problems())
    }
}

/// Where and how often the step stages write checkpoints during a run.
#[derive(Debug, Clone)]
pub struct CheckpointPlan {
    /// The checkpoint folder (`<run>/checkpoints`).
    pub dir: PathBuf,
    pub every: u64,
    pub keep: usize,
    /// The resolved pipeline (RON), stored in every manifest.
    pub pipeline: String,
    /// Image shape `[C, H, W]` the models were built for.
    pub image: [i64; 3],
    /// Latent size of G.
    pub latent: i64,
}

impl CheckpointPlan {
    /// Is a checkpoint due after generator step `step`? (`last`: no step follows.)
    pub fn due(&self, step: u64, last: bool) -> bool {
        last || step % self.every.max(1) == 0
    }
}

/// The JSON manifest stored in a checkpoint's header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Layout version, [`VERSION`].
    pub version: u32,
    /// Generator steps completed.
    pub step: u64,
    /// Real images consumed by D so far.
    pub images: u64,
    /// Training time so far, seconds (over every run that led here).
    pub elapsed_s: f64,
    /// The pipeline seed (with `step` and `data`, the whole random state; see the module docs).
    pub seed: u64,
    /// Where the loader resumes: the batch after the last one D consumed.
    pub data: DataPosition,
    /// Adam updates taken by G's and D's optimisers (t of Adam's bias correction).
    pub g_adam_steps: u64,
    pub d_adam_steps: u64,
    /// Image shape `[C, H, W]`.
    pub image: [i64; 3],
    /// Latent size.
    pub latent: i64,
    /// Whether `g_ema.*` tensors are present.
    pub ema: bool,
    /// The resolved pipeline of the run, as RON.
    pub pipeline: String,
    /// CRC-32 (IEEE) of the tensors' bytes, in name order.
    pub crc32: u32,
    /// Version of pipe that wrote it.
    pub pipe_version: String,
    /// Written after the last step of a run (not on the `every` schedule).
    #[serde(default)]
    pub last: bool,
    /// The losses of this step when it was a logged one, so a resumed run can restore its
    /// metrics.csv row if the process was killed before writing it.
    #[serde(default)]
    pub losses: Option<Losses>,
}

/// The logged figures of one step (see `StepReport`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Losses {
    pub d_loss: f64,
    pub g_loss: f64,
    pub penalty: f64,
    /// `None` without a gradient penalty.
    pub grad_norm: Option<f64>,
}

/// A checkpoint read back: its manifest and its tensors (host `f32`, by name).
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub manifest: Manifest,
    pub tensors: BTreeMap<String, Tensor>,
}

/// The seed of the random draws of D update `k` (0-based, < n_critic) or of the G update
/// (`k = u32::MAX`) of generator step `step` (1-based), for a pipeline seed `seed`. The step
/// stages call `tch::manual_seed` with it before drawing z (and WGAN-GP's ε), so the draws
/// depend on nothing but the seed and the step: runs repeat exactly, and resume exactly.
pub fn step_seed(seed: u64, step: u64, k: u32) -> i64 {
    // SplitMix64 finaliser over the mixed inputs.
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// File name of the checkpoint of step `step`.
pub fn file_name(step: u64) -> String {
    format!("step_{step:08}.safetensors")
}

/// The step of a checkpoint file name (`step_00001000.safetensors` → 1000); `None` for any
/// other name, also one pipe does not write (`step_7.safetensors`, `step_+0000007.safetensors`),
/// so that pruning never takes a file of the user's.
pub fn step_of(name: &str) -> Option<u64> {
    let step: u64 = name.strip_prefix("step_")?.strip_suffix(".safetensors")?.parse().ok()?;
    (file_name(step) == name).then_some(step)
}

/// The checkpoints in `dir`, oldest (lowest step) first. Missing folder: none.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| step_of(&e.file_name().to_string_lossy()).map(|s| (s, e.path())))
        .collect();
    v.sort();
    v
}

/// Copies of `vs`'s variables on the host as `f32`, named `<prefix><name>`.
pub fn host_vars(vs: &nn::VarStore, prefix: &str) -> Result<Vec<(String, Tensor)>, tch::TchError> {
    let mut out = vec![];
    for (name, t) in vs.variables() {
        out.push((format!("{prefix}{name}"), t.f_detach()?.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A safetensors file of f32 tensors `(name, little-endian bytes, shape)` with `meta` in its
/// header (checkpoints, classifier files).
pub(crate) fn serialize_f32<N: AsRef<str>>(
    named: &[(N, Vec<u8>, Vec<usize>)],
    meta: HashMap<String, String>,
) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let mut views = vec![];
    for (name, bytes, shape) in named {
        views.push((name.as_ref(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)?));
    }
    safetensors::serialize(views, Some(meta))
}

/// A host f32 tensor of `shape` from little-endian bytes (a safetensors view's data).
pub(crate) fn f32_tensor(data: &[u8], shape: &[i64]) -> Result<Tensor, tch::TchError> {
    let values: Vec<f32> = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Tensor::f_from_slice(&values)?.f_reshape(shape)
}

/// The raw little-endian bytes of a host `f32` tensor.
pub(crate) fn f32_bytes(t: &Tensor) -> Result<Vec<u8>, tch::TchError> {
    let flat = t.f_contiguous().and_then(|t| t.f_view([-1]))?;
    let v = Vec::<f32>::try_from(&flat)?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Write a checkpoint of `step` into `dir` (created if missing) atomically, then prune: all
/// but the newest `keep` checkpoints are deleted, whatever schedule wrote them (one written
/// when a run stopped early, or under another `every`, counts like any other: a resume with a
/// different `--checkpoint-every` never deletes more than `keep` asks), and leftover temporary
/// files of earlier steps.
/// `manifest.crc32` is filled in here. Returns the file written.
///
/// Errors (nothing is written, earlier checkpoints stay): a tensor holds NaN or ±Inf
/// ([`CheckpointError::NonFinite`], naming it), the folder or file cannot be written (a full
/// disk, say: [`CheckpointError::CreateDir`], [`CheckpointError::Write`], naming it); a tensor
/// or the manifest that cannot be encoded ([`CheckpointError::Host`],
/// [`CheckpointError::Manifest`], [`CheckpointError::Serialize`]).
pub fn write(dir: &Path, mut manifest: Manifest, tensors: &[(String, Tensor)], keep: usize) -> Result<PathBuf, CheckpointError> {
    let mut named: Vec<(&str, Vec<u8>, Vec<usize>)> = vec![];
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut crc = crc32fast::Hasher::new();
    for (name, t) in sorted {
        let bytes = f32_bytes(t).map_err(|source| CheckpointError::Host { name: name.clone(), source })?;
        if bytes.chunks_exact(4).any(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()) {
            return Err(CheckpointError::NonFinite { step: manifest.step, name: name.clone() });
        }
        crc.update(&bytes);
        named.push((name, bytes, t.size().iter().map(|&d| d as usize).collect()));
    }
    manifest.crc32 = crc.finalize();
    let meta: HashMap<String, String> =
        [(META_KEY.to_string(), serde_json::to_string(&manifest).map_err(CheckpointError::Manifest)?)].into();
    let data = serialize_f32(&named, meta).map_err(|source| CheckpointError::Serialize { step: manifest.step, source })?;
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::CreateDir { dir: dir.to_path_buf(), source })?;
    let path = dir.join(file_name(manifest.step));
    if let Err(source) = crate::io::atomic::write_bytes_atomic(&path, &data) {
        return Err(CheckpointError::Write { path, source });
    }
    let all = list(dir);
    if all.len() > keep {
        for (_, old) in &all[..all.len() - keep] {
            let _ = std::fs::remove_file(old);
        }
    }
    remove_partials(dir, manifest.step);
    Ok(path)
}

/// Remove the temporary files of checkpoints of steps before `before` (left by a process killed
/// while writing one).
pub fn remove_partials(dir: &Path, before: u64) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if crate::io::atomic::target_of_temp(&n).and_then(step_of).is_some_and(|s| s < before) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Read a checkpoint file and check it: a safetensors file whose manifest is a pipe
/// checkpoint of a known version, `f32` tensors only, and data matching its CRC-32.
///
/// Errors, each naming the file: it cannot be read ([`CheckpointError::Read`]); it is
/// truncated or not safetensors ([`CheckpointError::Corrupt`], [`CheckpointError::Header`]);
/// it has no pipe manifest or one of another version ([`CheckpointError::NoManifest`],
/// [`CheckpointError::BadManifest`], [`CheckpointError::Version`]); a tensor is unreadable or
/// not `f32` ([`CheckpointError::Tensor`], [`CheckpointError::Dtype`],
/// [`CheckpointError::Torch`]); the data does not match the checksum
/// ([`CheckpointError::Checksum`]).
pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let p = || path.to_path_buf();
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read { path: p(), source })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|source| CheckpointError::Corrupt { path: p(), source })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|source| CheckpointError::Header { path: p(), source })?;
    let json = meta.metadata().as_ref().and_then(|m| m.get(META_KEY)).ok_or_else(|| CheckpointError::NoManifest(p()))?;
    let manifest: Manifest = serde_json::from_str(json).map_err(|source| CheckpointError::BadManifest { path: p(), source })?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(CheckpointError::Version { path: p(), format: manifest.format, version: manifest.version });
    }
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut crc = crc32fast::Hasher::new();
    let mut tensors = BTreeMap::new();
    for name in names {
        let view = st.tensor(&name).map_err(|source| CheckpointError::Tensor { path: p(), name: name.clone(), source })?;
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(CheckpointError::Dtype { path: p(), name, dtype: view.dtype() });
        }
        crc.update(view.data());
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = f32_tensor(view.data(), &shape).map_err(|source| CheckpointError::Torch { path: p(), name: name.clone(), source })?;
        tensors.insert(name, t);
    }
    if crc.finalize() != manifest.crc32 {
        return Err(CheckpointError::Checksum(p()));
    }
    Ok(Checkpoint { path: path.to_path_buf(), manifest, tensors })
}

/// The newest checkpoint in `dir` that reads back whole. Newer files that fail to read are
/// skipped and returned as warnings (so a damaged latest file falls back to the one before).
///
/// Errors: no checkpoint in `dir` ([`CheckpointError::NoCheckpoints`], naming it), or none of
/// them readable ([`CheckpointError::NoneReadable`], with each reason).
pub fn latest(dir: &Path) -> Result<(Checkpoint, Vec<String>), CheckpointError> {
    let all = list(dir);
    if all.is_empty() {
        return Err(CheckpointError::NoCheckpoints(dir.to_path_buf()));
    }
    let mut skipped = vec![];
    for (_, path) in all.iter().rev() {
        match read(path) {
            Ok(c) => return Ok((c, skipped.iter().map(|e: &CheckpointError| e.to_string()).collect())),
            Err(e) => skipped.push(e),
        }
    }
    Err(CheckpointError::NoneReadable { dir: dir.to_path_buf(), skipped })
}

impl Checkpoint {
    /// Copy the tensors `<prefix><name>` into the variables of `vs` (in place, so views
    /// aliasing them see the values). Every variable must be present with the same shape, and
    /// the checkpoint must hold no other `<prefix>` tensor.
    ///
    /// Errors: the checkpoint comes from a different model ([`CheckpointError::OtherModel`]),
    /// one line per problem (at most 8 shown): a variable missing, a shape differing (naming
    /// the tensor and both shapes), an extra tensor; a copy that fails
    /// ([`CheckpointError::Torch`]).
    pub fn load_vars(&self, prefix: &str, vs: &nn::VarStore) -> Result<(), CheckpointError> {
        let vars = vs.variables();
        let mut errs = vec![];
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for name in &names {
            let key = format!("{prefix}{name}");
            match self.tensors.get(&key) {
                None => errs.push(format!("tensor `{key}` is missing from the checkpoint")),
                Some(t) if t.size() != vars[*name].size() => errs.push(format!(
                    "tensor `{key}`: the checkpoint has shape {:?}, this pipeline's model has {:?}",
                    t.size(),
                    vars[*name].size()
                )),
                Some(_) => {}
            }
        }
        for key in self.tensors.keys().filter(|k| k.starts_with(prefix)) {
            if !vars.contains_key(&key[prefix.len()..]) {
                errs.push(format!("tensor `{key}` of the checkpoint has no place in this pipeline's model"));
            }
        }
        if !errs.is_empty() {
            let n = errs.len();
            errs.truncate(8);
            if n > 8 {
                errs.push(format!("... and {} more", n - 8));
            }
            return Err(CheckpointError::OtherModel { path: self.path.clone(), problems: errs });
        }
        for (name, mut v) in vars {
            let src = &self.tensors[&format!("{prefix}{name}")];
            tch::no_grad(|| v.f_copy_(src)).map_err(|source| CheckpointError::Torch {
                path: self.path.clone(),
                name: format!("{prefix}{name}"),
                source,
            })?;
        }
        Ok(())
    }

    /// The tensor `<prefix><name>`, if present (a shallow handle).
    pub fn get(&self, prefix: &str, name: &str) -> Option<Tensor> {
        self.tensors.get(&format!("{prefix}{name}")).map(Tensor::shallow_clone)
    }

    /// Check that the tensors `<prefix><name>` exist with the given shapes (for optimiser
    /// state), with the same kind of message as [`Checkpoint::load_vars`]
    /// ([`CheckpointError::OtherModel`]).
    pub fn check_shapes(&self, prefix: &str, shapes: &[(String, Vec<i64>)]) -> Result<(), CheckpointError> {
        let errs: Vec<String> = shapes
            .iter()
            .filter_map(|(name, shape)| {
                let key = format!("{prefix}{name}");
                match self.tensors.get(&key) {
                    None => Some(format!("tensor `{key}` is missing from the checkpoint")),
                    Some(t) if &t.size() != shape => {
                        Some(format!("tensor `{key}`: the checkpoint has shape {:?}, this pipeline's model has {shape:?}", t.size()))
                    }
                    Some(_) => None,
                }
            })
            .take(8)
            .collect();
        if errs.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::OtherModel { path: self.path.clone(), problems: errs })
        }
    }
}

#[cfg(test)]
mod tests;
