//! The pipeline file: a RON description of stages and their links, parsed, overridden
//! (`--set STAGE.FIELD=VALUE`) and checked before anything runs.
//!
//! ```ron
//! Pipeline(
//!     name: "mnist_mlp",
//!     seed: 0,
//!     max_steps: 20000,
//!     stages: [
//!         (name: "loader", kind: IdxLoader(root: "data/mnist", batch: 64)),
//!         (name: "augment", input: ["loader"], kind: Augment(perturb: Dragan(c: 0.5))),
//!         ...
//!     ],
//! )
//! ```

pub mod check;
pub mod overrides;
pub mod parse;
pub mod source;
#[cfg(test)]
mod tests;

pub use check::{check, loader_shape, speed_context, training_pair, with_resolved_g_loss, LoaderError};
pub use overrides::{apply_override, override_target, OverrideError, ValueError};
pub use parse::{load, parse, parse_with_source, MAX_PIPELINE_BYTES};
pub use pipe_stages::kinds::StageKind;

use pipe_stages::io::checkpoint::CheckpointConfig;
use pipe_stages::train::speed::{Execution, MemoryFormat, Precision, SpeedSettings};
use pipe_stages::train::NonFinite;
use ron::extensions::Extensions;
use serde::{Deserialize, Serialize};

/// Which device the step stages train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when a GPU is available, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// A whole pipeline file.
/// A whole pipeline file, generic over how stages are held: typed ([`Pipeline`]), or with
/// each stage's `kind` still as RON text while the file is being parsed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename = "Pipeline", default, deny_unknown_fields)]
pub struct PipelineOf<S> {
    /// Name of the pipeline; the default run folder is `runs/<name>/`.
    pub name: String,
    /// Seed of every random draw (weights, shuffling, perturbation, latents). Default 0.
    pub seed: u64,
    /// Generator steps to train (each = `n_critic` D steps + 1 G step). Default 10000.
    pub max_steps: u64,
    /// Log losses to metrics.csv every this many generator steps. Default 10.
    pub log_every: u64,
    /// Training device. Default `auto`.
    pub device: DeviceChoice,
    /// Capacity of every link, in items. Default 2.
    pub queue_depth: usize,
    /// Checkpoints of the training state in `<run>/checkpoints/`, for `--resume` and
    /// `pipe sample`. Default `(every: 1000, keep: 3)`; `None` writes none.
    pub checkpoint: Option<CheckpointConfig>,
    /// What to do when a loss or gradient is NaN or infinite: `Stop` (default) the run naming
    /// the step and stage, or `Skip` the update and go on (see `NonFinite`).
    pub on_nonfinite: NonFinite,
    /// How the step stages launch each update: `Auto` (default: `Graph` on a CUDA device when
    /// the update can be captured, else `Eager`), `Eager`, or `Graph` (each update captured
    /// once as a CUDA graph and replayed; CUDA only).
    pub execution: Execution,
    /// Arithmetic of the forward passes: `Auto` (default: `Bf16` on a CUDA GPU with bfloat16,
    /// else `Fp32`), `Fp32`, or `Bf16` (bf16 autocast; CUDA only).
    pub precision: Precision,
    /// Layout of images and convolution weights: `Auto` (default: `ChannelsLast` for
    /// convolutional models on CUDA, else `Contiguous`), `Contiguous`, or `ChannelsLast`.
    pub memory_format: MemoryFormat,
    /// The stages, in the order source → sinks.
    pub stages: Vec<S>,
}

/// A parsed, typed pipeline.
pub type Pipeline = PipelineOf<StageSpec>;

impl<S> Default for PipelineOf<S> {
    fn default() -> Self {
        PipelineOf {
            name: "pipeline".into(),
            seed: 0,
            max_steps: 10_000,
            log_every: 10,
            device: DeviceChoice::Auto,
            queue_depth: 2,
            checkpoint: Some(CheckpointConfig::default()),
            on_nonfinite: NonFinite::Stop,
            execution: Execution::Auto,
            precision: Precision::Auto,
            memory_format: MemoryFormat::Auto,
            stages: vec![],
        }
    }
}

impl<S> PipelineOf<S> {
    /// The speed settings as written (each may be `Auto`).
    pub fn speed_settings(&self) -> SpeedSettings {
        SpeedSettings { execution: self.execution, precision: self.precision, memory_format: self.memory_format }
    }
}

/// One stage: a unique name, the stages it reads from, and its kind with settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename = "StageSpec", deny_unknown_fields)]
pub struct StageSpecOf<K> {
    pub name: String,
    /// Names of the stages this one reads from (empty for sources).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input: Vec<String>,
    /// Capacity of the link into this stage, in items (default: the pipeline's `queue_depth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<usize>,
    pub kind: K,
}

/// One typed stage.
pub type StageSpec = StageSpecOf<StageKind>;

/// A problem with a pipeline file, with its position when known.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}{}: {msg}", pos.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct SpecError {
    pub file: String,
    /// (line, column), 1-based.
    pub pos: Option<(usize, usize)>,
    pub msg: String,
}

/// A pipeline file's text and where its settings are (for placing [`check`]'s problems).
#[derive(Debug, Clone, Default)]
pub struct Source {
    pub file: String,
    pub text: String,
    pub map: source::SourceMap,
}

/// 1-based (line, column) of byte offset `at` in `text` (column in characters).
pub(crate) fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

impl Source {
    /// Line and column of the setting a problem is about: its stage's field, or the
    /// top-level field (see [`source::SourceMap`]); None when it is not in the file.
    pub fn locate(&self, p: &Problem) -> Option<(usize, usize)> {
        match (&p.stage, p.index) {
            (Some(_), Some(i)) => self.map.stage_at(i, &p.field),
            (Some(st), None) => self.map.stage(st, &p.field),
            (None, _) => self.map.top(&p.field),
        }
    }
}

/// A problem [`check`] found: the stage and the field at fault (what places it in the file,
/// and tells a value given by `--set` from one in the file), and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The stage it is about; None for the pipeline's top-level settings or the graph as a
    /// whole.
    pub stage: Option<String>,
    /// That stage's position in `stages`, when known: what places a problem when two stages
    /// share a name.
    pub index: Option<usize>,
    /// The field at fault, dot-separated: in a stage, `name`, `input`, `queue`, or a path in
    /// its kind (`optimizer.lr`); at the top level, `max_steps`, `checkpoint.every`, ...; `""`
    /// for the stage (or the pipeline) as a whole.
    pub field: String,
    /// The whole message, naming the stage (`stage `d_step` (DStep): ...`).
    pub msg: String,
}

impl Problem {
    /// A problem with a top-level `field`.
    pub fn top(field: &str, msg: impl Into<String>) -> Self {
        Problem { stage: None, index: None, field: field.into(), msg: msg.into() }
    }
    /// A problem with `field` of stage `stage`.
    pub fn at(stage: &str, field: &str, msg: impl Into<String>) -> Self {
        Problem { stage: Some(stage.into()), index: None, field: field.into(), msg: msg.into() }
    }
    /// A problem with `field` of stage `s`, one of `p`'s stages (its position is kept).
    pub fn of(p: &Pipeline, s: &StageSpec, field: &str, msg: impl Into<String>) -> Self {
        let index = p.stages.iter().position(|x| std::ptr::eq(x, s));
        Problem { stage: Some(s.name.clone()), index, field: field.into(), msg: msg.into() }
    }
    /// Whether the message contains `pat` (for tests and callers that look for a problem).
    pub fn contains(&self, pat: &str) -> bool {
        self.msg.contains(pat)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

/// "; did you mean `x`?" for the known name closest to `found`, if one is close: fewest edits
/// (a swap of two letters counts as one), ties broken by Jaro-Winkler similarity.
pub fn suggest(found: &str, known: &[&str]) -> String {
    let f = found.to_lowercase();
    let best = known
        .iter()
        .map(|k| {
            let k2 = k.to_lowercase();
            (strsim::damerau_levenshtein(&f, &k2), -((strsim::jaro_winkler(&f, &k2) * 1e6) as i64), *k)
        })
        .min();
    match best {
        Some((d, _, k)) if d <= 2.max(found.len() / 3) => format!("; did you mean `{k}`?"),
        _ => String::new(),
    }
}

/// Files of a run folder that `pipe run` always writes (`.pipe.lock` marks a running run).
pub const RUN_FILES: [&str; 5] = ["pipeline.ron", "metrics.csv", "loss.png", "stats.json", ".pipe.lock"];

pub(crate) fn ron_options() -> ron::Options {
    ron::Options::default().with_default_extension(Extensions::UNWRAP_VARIANT_NEWTYPES).with_default_extension(Extensions::IMPLICIT_SOME)
}

/// The pipeline as RON text (the `pipeline.ron` of a run folder). Parses back to `p`.
pub fn to_ron(p: &Pipeline) -> String {
    let cfg = ron::ser::PrettyConfig::new().struct_names(true).extensions(Extensions::UNWRAP_VARIANT_NEWTYPES | Extensions::IMPLICIT_SOME);
    match ron_options().to_string_pretty(p, cfg) {
        // Stages are written `(name: ...)` as in the shipped files, not `StageSpec(name: ...)`.
        Ok(text) => {
            text.lines()
                .map(|l| if l.trim_start().starts_with("StageSpec(") { l.replacen("StageSpec(", "(", 1) } else { l.to_string() })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        }
        Err(e) => format!("// could not serialise the pipeline: {e}\n"),
    }
}
