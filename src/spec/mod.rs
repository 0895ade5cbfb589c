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

pub mod source;

use pipe_stages::augment::{AugmentConfig, PerturbMode};
use pipe_stages::checkpoint::CheckpointConfig;
use pipe_stages::d_step::{Constraint, DStepConfig, Penalty};
use pipe_stages::eval::EvalConfig;
use pipe_stages::g_step::GStepConfig;
use pipe_stages::gif::GifConfig;
use pipe_stages::loader::folder::FolderLoaderConfig;
use pipe_stages::loader::idx::IdxLoaderConfig;
use pipe_stages::losses::Loss;
use pipe_stages::sampler::SamplerConfig;
use pipe_stages::train::NonFinite;
use pipe_stages::video::VideoConfig;
use ron::extensions::Extensions;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
            stages: vec![],
        }
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

/// Every stage kind with its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum StageKind {
    /// Source: MNIST-style IDX files (plain or .gz) in `root`.
    IdxLoader(IdxLoaderConfig),
    /// Source: a folder of images (PNG, JPEG, GIF, WebP, BMP), searched recursively.
    FolderLoader(FolderLoaderConfig),
    /// Random flip and the DRAGAN perturbation x̂.
    Augment(AugmentConfig),
    /// Discriminator updates: loss, gradient penalty, weight constraint (on the training device).
    DStep(DStepConfig),
    /// Generator updates and sample images (on the training device).
    GStep(GStepConfig),
    /// Sample grids as PNGs, and frames for a video.
    Sampler(SamplerConfig),
    /// H.264 MP4 of the frames.
    Video(VideoConfig),
    /// Animated GIF of the frames (a frame-count and a frame-size cap keep it small).
    Gif(GifConfig),
    /// FID, KID and an IS-style score of generated images every N steps (on the CPU).
    Eval(EvalConfig),
}

impl StageKind {
    /// The kind's name as written in RON.
    pub fn name(&self) -> &'static str {
        match self {
            StageKind::IdxLoader(_) => "IdxLoader",
            StageKind::FolderLoader(_) => "FolderLoader",
            StageKind::Augment(_) => "Augment",
            StageKind::DStep(_) => "DStep",
            StageKind::GStep(_) => "GStep",
            StageKind::Sampler(_) => "Sampler",
            StageKind::Video(_) => "Video",
            StageKind::Gif(_) => "Gif",
            StageKind::Eval(_) => "Eval",
        }
    }
    /// Input item kind (None for sources) and output item kind (None for sinks), from
    /// [`PORTS`].
    pub fn ports(&self) -> (Option<&'static str>, Option<&'static str>) {
        let (i, o) = port_caps(self.name());
        (i.map(|p| p.0), o.map(|p| p.0))
    }
}

/// A port: the item kind it carries and its caps in words (shape with a symbolic batch B,
/// dtype, value range, device).
pub type Port = (&'static str, &'static str);

/// The ports of every stage kind: (kind, input, output). The graph check uses the item kinds,
/// `pipe stages KIND` prints the caps; both read this one table.
pub const PORTS: [(&str, Option<Port>, Option<Port>); 9] = [
    ("IdxLoader", None, Some(("batch", "batch[B,1,H,W] f32 in [-1, 1] on cpu (H, W from the file)"))),
    ("FolderLoader", None, Some(("batch", "batch[B,C,S,S] f32 in [-1, 1] on cpu (C from channels, S = size)"))),
    (
        "Augment",
        Some(("batch", "batch[B,C,H,W] f32 in [-1, 1] on cpu")),
        Some(("batch", "batch[B,C,H,W] f32 in [-1, 1] on cpu, with x̂ (same shape) when perturb is Dragan(..)")),
    ),
    (
        "DStep",
        Some((
            "batch",
            "batch[B,C,H,W] f32 in [-1, 1] on cpu, copied to the training device; x̂ needed by penalty Dragan; Dcgan needs H = W = 4·2^k, InfoGan H and W multiples of 4",
        )),
        Some(("d_done", "d_done: one per generator step, losses as f64 on cpu")),
    ),
    ("GStep", Some(("d_done", "d_done from d_step")), Some(("images", "images[n,C,H,W] u8 in [0, 255] on cpu (n = sampler grid²)"))),
    ("Sampler", Some(("images", "images[n,C,H,W] u8 in [0, 255] on cpu")), Some(("frame", "frame: RGB8 grid picture on cpu"))),
    ("Video", Some(("frame", "frame: RGB8 picture on cpu")), None),
    ("Gif", Some(("frame", "frame: RGB8 picture on cpu")), None),
    ("Eval", Some(("images", "images[n,C,H,W] u8 in [0, 255] on cpu (n = eval n, from fixed latents)")), None),
];

/// Input and output ports of the kind named `kind`.
pub fn port_caps(kind: &str) -> (Option<Port>, Option<Port>) {
    PORTS.iter().find(|p| p.0 == kind).map(|p| (p.1, p.2)).unwrap_or((None, None))
}

/// A problem with a pipeline file, with its position when known.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}{}: {msg}", pos.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct SpecError {
    pub file: String,
    /// (line, column), 1-based.
    pub pos: Option<(usize, usize)>,
    pub msg: String,
}

fn ron_options() -> ron::Options {
    ron::Options::default().with_default_extension(Extensions::UNWRAP_VARIANT_NEWTYPES).with_default_extension(Extensions::IMPLICIT_SOME)
}

/// A pipeline file's text and where its settings are (for placing [`check`]'s problems).
#[derive(Debug, Clone, Default)]
pub struct Source {
    pub file: String,
    pub text: String,
    pub map: source::SourceMap,
}

/// 1-based (line, column) of byte offset `at` in `text` (column in characters).
fn line_col(text: &str, at: usize) -> (usize, usize) {
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

/// Files of a run folder that `pipe run` always writes.
pub const RUN_FILES: [&str; 4] = ["pipeline.ron", "metrics.csv", "loss.png", "stats.json"];

/// A RON error as a message, with a suggestion for a misspelt name.
fn ron_message(e: &ron::Error) -> String {
    match e {
        ron::Error::NoSuchEnumVariant { expected, found, .. } | ron::Error::NoSuchStructField { expected, found, .. } => {
            format!("{e}{}", suggest(found, expected))
        }
        _ => {
            let m = e.to_string();
            if m.contains("Expected opening `(`") {
                format!("{m}: a setting with fields is written with parentheses, even to take all its defaults, e.g. `RmsProp()`, `LossSensitive()`, `Clip(c: 0.01)`")
            } else if m.contains("raw identifier") {
                format!("{m}: fields are written with their names, e.g. `Clip(c: 0.01)`, `Adam(lr: 1e-4)`")
            } else {
                m
            }
        }
    }
}

/// Parse pipeline text. `file` names it in errors. Syntax errors stop at the first; errors in
/// the settings of the stages are all reported, each with its line and column.
pub fn parse(text: &str, file: &str) -> Result<Pipeline, Vec<SpecError>> {
    parse_with_source(text, file).map(|(p, _)| p)
}

/// [`parse`], also returning the [`Source`] for locating later problems.
pub fn parse_with_source(text: &str, file: &str) -> Result<(Pipeline, Source), Vec<SpecError>> {
    // ron points just after a `:`; move past blanks to the value itself.
    let skip_blanks = |line: usize, col: usize| {
        let l = text.lines().nth(line.saturating_sub(1)).unwrap_or("");
        col + l.chars().skip(col.saturating_sub(1)).take_while(|c| *c == ' ' || *c == '\t').count()
    };
    let err = |line: usize, col: usize, e: &ron::Error| SpecError {
        file: file.into(),
        pos: Some((line, skip_blanks(line, col))),
        msg: ron_message(e),
    };
    let mut errs = vec![];
    let raw: PipelineOf<&ron::value::RawValue> = match ron_options().from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            // A mistake in the top-level fields (not a syntax error): report it, and still
            // check the stages, read with the other top-level fields ignored.
            errs.push(err(e.span.start.line, e.span.start.col, &e.code));
            #[derive(Deserialize)]
            #[serde(rename = "Pipeline")]
            struct StagesOnly<'a> {
                #[serde(borrow, default)]
                stages: Vec<&'a ron::value::RawValue>,
            }
            match ron_options().from_str::<StagesOnly>(text) {
                Ok(only) => PipelineOf { stages: only.stages, ..Default::default() },
                Err(_) => return Err(errs),
            }
        }
    };
    let offset = |snippet: &str| (snippet.as_ptr() as usize).saturating_sub(text.as_ptr() as usize).min(text.len());
    // A position inside a snippet of the text, shifted to the file's line and column.
    let shifted = |start: usize, e: &ron::error::SpannedError| {
        let (l0, c0) = line_col(text, start);
        let (l, c) = (e.span.start.line, e.span.start.col);
        if l <= 1 {
            (l0, c0 + c.saturating_sub(1))
        } else {
            (l0 + l - 1, c)
        }
    };
    let mut stages = vec![];
    let src = Source { file: file.into(), text: text.into(), map: source::SourceMap::scan(text) };
    // Each stage is parsed on its own, so that a mistake in one doesn't hide the others.
    for (i, stage_raw) in raw.stages.iter().enumerate() {
        let stage_text = stage_raw.get_ron();
        let stage_start = offset(stage_text);
        let st: StageSpecOf<&ron::value::RawValue> = match ron_options().from_str(stage_text) {
            Ok(st) => st,
            Err(e) => {
                let (line, col) = shifted(stage_start, &e);
                let mut se = err(line, col, &e.code);
                se.msg = format!("stage {} of {}: {}", i + 1, raw.stages.len(), se.msg);
                errs.push(se);
                continue;
            }
        };
        let ron = st.kind.get_ron();
        let start = offset(ron);
        match ron_options().from_str::<StageKind>(ron) {
            Ok(kind) => stages.push(StageSpecOf { name: st.name.clone(), input: st.input.clone(), queue: st.queue, kind }),
            Err(e) => {
                let (line, col) = shifted(start, &e);
                let mut se = err(line, col, &e.code);
                se.msg = format!("stage `{}`: {}", st.name, se.msg);
                errs.push(se);
            }
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    let p = PipelineOf {
        name: raw.name,
        seed: raw.seed,
        max_steps: raw.max_steps,
        log_every: raw.log_every,
        device: raw.device,
        queue_depth: raw.queue_depth,
        checkpoint: raw.checkpoint,
        on_nonfinite: raw.on_nonfinite,
        stages,
    };
    Ok((p, src))
}

/// Largest pipeline file [`load`] reads, in bytes.
pub const MAX_PIPELINE_BYTES: u64 = 1_000_000;

/// Read and parse a pipeline file. Errors: unreadable, larger than [`MAX_PIPELINE_BYTES`], not
/// UTF-8, empty, or any parse error.
pub fn load(path: &Path) -> Result<(Pipeline, Source), Vec<SpecError>> {
    let file = path.display().to_string();
    let one = |msg: String| vec![SpecError { file: file.clone(), pos: None, msg }];
    // A pipeline is a few kilobytes; refuse to parse something far bigger (a data file given
    // by mistake) rather than spend time and memory on it.
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            return Err(one(if m.is_dir() {
                "a folder, not a pipeline file".into()
            } else {
                "not a regular file (a device or a pipe?)".into()
            }))
        }
        Ok(m) if m.len() > MAX_PIPELINE_BYTES => {
            return Err(one(format!(
                "the file is {:.1} MB; a pipeline file is a few KB (at most {} MB): is this the right file?",
                m.len() as f64 / 1e6,
                MAX_PIPELINE_BYTES / 1_000_000
            )))
        }
        _ => {}
    }
    let mut bytes = vec![];
    {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(|e| one(format!("cannot read: {e}")))?;
        f.take(MAX_PIPELINE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| one(format!("cannot read: {e}")))?;
    }
    if bytes.len() as u64 > MAX_PIPELINE_BYTES {
        return Err(one(format!(
            "longer than {} MB; a pipeline file is a few KB: is this the right file?",
            MAX_PIPELINE_BYTES / 1_000_000
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| one(format!("not UTF-8 text: {e}")))?;
    let text = text.strip_prefix('\u{feff}').map(str::to_string).unwrap_or(text); // a UTF-8 BOM
    if text.trim().is_empty() {
        return Err(one("empty file: expected `Pipeline(name: ..., stages: [...])`".into()));
    }
    parse_with_source(&text, &file)
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

/// Apply one `--set` override: `STAGE.FIELD=VALUE` for a stage setting or `FIELD=VALUE` for a
/// top-level one (`max_steps`, `seed`, ...). VALUE is RON (`64`, `1e-4`, `true`,
/// `WganGp(lambda: 10.0)`); a bare word for a text field needs no quotes (`loader.root=data/x`).
/// What a `--set` override sets: `(Some(stage), field)` for `STAGE.FIELD=VALUE`, `(None, field)`
/// for a top-level `FIELD=VALUE`; None without `=`.
pub fn override_target(spec: &str) -> Option<(Option<&str>, &str)> {
    let path = spec.split_once('=')?.0.trim();
    Some(match path.split_once('.') {
        Some((stage, field)) => (Some(stage), field),
        None => (None, path),
    })
}

pub fn apply_override(p: &mut Pipeline, spec: &str) -> Result<(), String> {
    let value = spec.split_once('=').ok_or_else(|| format!("--set {spec}: expected STAGE.FIELD=VALUE"))?.1.trim();
    let (stage, field) = override_target(spec).ok_or_else(|| format!("--set {spec}: expected STAGE.FIELD=VALUE"))?;
    match stage {
        None => {
            // Top level: parse `Pipeline(FIELD: VALUE)` and take the field.
            let parsed =
                parse_with_field("Pipeline", field, value, |t| ron_options().from_str::<Pipeline>(t).map(|p| serde_json::to_value(p)))
                    .map_err(|e| format!("--set {spec}: {e}"))?;
            let mut whole = serde_json::to_value(&*p).map_err(|e| e.to_string())?;
            if field == "stages" {
                return Err(format!("--set {spec}: stages can't be set from the command line; edit the file"));
            }
            whole[field] = parsed[field].clone();
            *p = serde_json::from_value(whole).map_err(|e| format!("--set {spec}: {e}"))?;
            Ok(())
        }
        Some(stage) => {
            let known: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
            let known = known.join(", ");
            let st = p
                .stages
                .iter_mut()
                .find(|s| s.name == stage)
                .ok_or_else(|| {
                    if stage == "checkpoint" {
                        format!("--set {spec}: `checkpoint` is a top-level setting: write it whole, e.g. --set 'checkpoint=(every: 500, keep: 3)' (or use --checkpoint-every N)")
                    } else {
                        format!("--set {spec}: no stage named `{stage}` (stages: {known})")
                    }
                })?;
            let kind = st.kind.name();
            if matches!(field, "kind" | "name" | "input" | "queue") {
                return Err(format!("--set {spec}: a stage's `{field}` can't be set from the command line; edit the pipeline file"));
            }
            let parsed = parse_with_field(kind, field, value, |t| ron_options().from_str::<StageKind>(t).map(|k| serde_json::to_value(k)))
                .map_err(|e| format!("--set {spec}: stage `{stage}` ({kind}): {e}"))?;
            let mut whole = serde_json::to_value(&st.kind).map_err(|e| e.to_string())?;
            whole[kind][field] = parsed[kind][field].clone();
            st.kind = serde_json::from_value(whole).map_err(|e| format!("--set {spec}: {e}"))?;
            Ok(())
        }
    }
}

/// Parse `Name(field: value)` (every other field taking its default) and return the whole
/// value as JSON. A bare word that isn't valid RON is retried as a quoted string.
fn parse_with_field(
    name: &str,
    field: &str,
    value: &str,
    parse: impl Fn(&str) -> Result<serde_json::Result<serde_json::Value>, ron::error::SpannedError>,
) -> Result<serde_json::Value, String> {
    if field.contains('.') {
        let (head, _) = field.split_once('.').unwrap_or((field, ""));
        let example = match head {
            "optimizer" => "Adam(lr: 2e-4)",
            "penalty" => "Dragan(lambda: 5.0)",
            "model" => "Mlp(hidden: 256)",
            "perturb" => "Dragan(c: 0.3)",
            _ => "Variant(field: value)",
        };
        return Err(format!(
            "`{field}`: nested settings are set as a whole value, e.g. `{head}={example}` (the fields you leave out take their defaults)"
        ));
    }
    if field.is_empty() || !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("`{field}` is not a field name"));
    }
    // serde_json has no NaN or infinity, so catch them here with a clear message.
    let non_finite_token = |t: &str| matches!(t.to_ascii_lowercase().as_str(), "nan" | "inf" | "infinity");
    let structured = value.contains('(');
    if value.parse::<f64>().is_ok_and(|v| !v.is_finite())
        || (structured && value.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(non_finite_token))
    {
        return Err(format!("bad value `{value}`: numbers must be finite"));
    }
    let first = parse(&format!("{name}({field}: {value})"));
    let result = match first {
        Ok(v) => v,
        Err(e) => {
            let quoted = format!("{name}({field}: {:?})", value);
            match parse(&quoted) {
                Ok(v) => v,
                Err(_) => return Err(format!("bad value `{value}`: {}", ron_message(&e.code))),
            }
        }
    };
    result.map_err(|e| e.to_string())
}

/// Check the graph: unique names, inputs that exist and carry the right item kind, no cycles,
/// one consumer for batches and D-step results, settings in range, output paths inside the run
/// folder, and the caps of the data against the models. IDX loaders have their header (16
/// bytes) read for the image size; nothing else touches the disk. Returns every problem found
/// (an empty list means the pipeline is fine).
pub fn check(p: &Pipeline) -> Vec<Problem> {
    let mut errs = vec![];
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    let plain_name = |n: &str| !n.is_empty() && !n.starts_with('.') && n.chars().all(|c| c.is_alphanumeric() || "_-.".contains(c));
    if !plain_name(&p.name) {
        errs.push(Problem::top(
            "name",
            format!("name {:?}: expected a plain name (letters, digits, `_`, `-`, `.`), as it names the run folder runs/<name>/", p.name),
        ));
    }
    for (i, s) in p.stages.iter().enumerate() {
        if !plain_name(&s.name) {
            errs.push(Problem::of(
                p,
                s,
                "name",
                format!("stage name `{}`: expected a plain name (letters, digits, `_`, `-`, `.`)", s.name),
            ));
        }
        if names[..i].contains(&s.name.as_str()) {
            errs.push(Problem::of(p, s, "name", format!("stage name `{}` is used twice", s.name)));
        }
        let (inp, _) = s.kind.ports();
        match inp {
            None if !s.input.is_empty() => errs.push(Problem::of(
                p,
                s,
                "input",
                format!("stage `{}` ({}) is a source and takes no input, but has input: {:?}", s.name, s.kind.name(), s.input),
            )),
            Some(want) if s.input.is_empty() => errs.push(Problem::of(
                p,
                s,
                "",
                format!(
                    "stage `{}` ({}) has no input: it needs a stream of `{want}` items, e.g. input: [\"{}\"]",
                    s.name,
                    s.kind.name(),
                    p.stages.iter().find(|o| o.kind.ports().1 == Some(want)).map(|o| o.name.as_str()).unwrap_or("...")
                ),
            )),
            Some(_) if s.input.len() > 1 => errs.push(Problem::of(
                p,
                s,
                "input",
                format!(
                    "stage `{}` ({}) has {} inputs ({}): a stage reads from exactly one stage",
                    s.name,
                    s.kind.name(),
                    s.input.len(),
                    s.input.join(", ")
                ),
            )),
            _ => {}
        }
        if inp.is_some() {
            for up in &s.input {
                match p.stages.iter().find(|o| &o.name == up) {
                    None => errs.push(Problem::of(
                        p,
                        s,
                        "input",
                        format!(
                            "stage `{}`: input `{up}` doesn't match any stage (stages: {}){}",
                            s.name,
                            names.join(", "),
                            suggest(up, &names)
                        ),
                    )),
                    Some(o) => {
                        let out = o.kind.ports().1;
                        if out != inp {
                            errs.push(Problem::of(
                                p,
                                s,
                                "input",
                                format!(
                                    "stage `{}` ({}) takes `{}` but `{up}` ({}) produces `{}`",
                                    s.name,
                                    s.kind.name(),
                                    inp.unwrap_or("nothing"),
                                    o.kind.name(),
                                    out.unwrap_or("nothing")
                                ),
                            ));
                        }
                    }
                }
            }
        }
        // Who reads this stage's output: batches and D-step results go to exactly one stage.
        let readers: Vec<&str> = p.stages.iter().filter(|o| o.input.contains(&s.name)).map(|o| o.name.as_str()).collect();
        match s.kind.ports().1 {
            Some(kind @ ("batch" | "d_done")) if readers.len() > 1 => errs.push(Problem::of(
                p,
                s,
                "name",
                format!(
                    "stage `{}` ({}) feeds {}: `{kind}` items go to one stage only (sample images and frames may fan out)",
                    s.name,
                    s.kind.name(),
                    readers.iter().map(|r| format!("`{r}`")).collect::<Vec<_>>().join(" and ")
                ),
            )),
            Some(kind @ ("batch" | "d_done")) if readers.is_empty() => errs.push(Problem::of(
                p,
                s,
                "name",
                format!("stage `{}` ({}) is not connected: no stage reads its `{kind}` output", s.name, s.kind.name()),
            )),
            _ => {}
        }
        let bad: Vec<pipe_stages::problem::Problem> = match &s.kind {
            StageKind::DStep(c) => c.problems(),
            StageKind::GStep(c) => c.problems(),
            StageKind::Augment(c) => c.problems(),
            StageKind::Sampler(c) => c.problems(),
            StageKind::Video(c) => c.problems(),
            StageKind::Gif(c) => c.problems(),
            StageKind::Eval(c) => {
                let mut v = c.problems();
                if v.is_empty() && c.every % p.log_every.max(1) != 0 {
                    v.push(pipe_stages::problem::Problem::new("every", format!("`every` is {}, expected a multiple of the pipeline's log_every ({}), so that each evaluation has its row in metrics.csv", c.every, p.log_every)));
                }
                v
            }
            StageKind::IdxLoader(c) => loader_common(c.batch, c.epochs),
            StageKind::FolderLoader(c) if c.size == 0 || c.size > 4096 => {
                vec![pipe_stages::problem::Problem::new("size", format!("size is {}, expected 1 to 4096 pixels", c.size))]
            }
            StageKind::FolderLoader(c) if c.workers > 1024 || c.max_pixels == 0 => vec![pipe_stages::problem::Problem::new(
                if c.workers > 1024 { "workers" } else { "max_pixels" },
                format!("workers must be 0 to 1024 and max_pixels ≥ 1, got {} and {}", c.workers, c.max_pixels),
            )],
            StageKind::FolderLoader(c) => loader_common(c.batch, c.epochs),
        };
        for b in bad {
            errs.push(Problem::of(p, s, &b.field, format!("stage `{}` ({}): {}", s.name, s.kind.name(), b.msg)));
        }
        if s.kind.ports().0.is_none() && s.queue.is_some() {
            errs.push(Problem::of(
                p,
                s,
                "queue",
                format!("stage `{}` ({}): queue sizes the link into a stage, and a source has none; remove it", s.name, s.kind.name()),
            ));
        }
    }
    // Cycles: a stage upstream of itself.
    for s in &p.stages {
        if upstream(p, s).iter().any(|o| o.name == s.name) {
            errs.push(Problem::of(p, s, "input", format!("stage `{}` is part of a cycle", s.name)));
        }
    }
    // Exactly one of each training stage, a loader, at most one sampler on g_step.
    for (kind, what) in [("DStep", "d_step (DStep)"), ("GStep", "g_step (GStep)")] {
        let n = p.stages.iter().filter(|s| s.kind.name() == kind).count();
        if n != 1 {
            errs.push(Problem::top("stages", format!("a pipeline needs exactly one {what} stage, found {n}")));
        }
    }
    if !p.stages.iter().any(|s| s.kind.ports().0.is_none()) {
        errs.push(Problem::top("stages", "a pipeline needs a loader (IdxLoader or FolderLoader)"));
    }
    let samplers: Vec<&str> = p.stages.iter().filter(|s| matches!(s.kind, StageKind::Sampler(_))).map(|s| s.name.as_str()).collect();
    if samplers.len() > 1 {
        errs.push(Problem::at(
            samplers[1],
            "",
            format!(
                "{} Sampler stages ({}): g_step generates one fixed latent batch on one schedule, so a pipeline has one sampler (several videos may read from it)",
                samplers.len(),
                samplers.join(", ")
            ),
        ));
    }
    let evals: Vec<&str> = p.stages.iter().filter(|s| matches!(s.kind, StageKind::Eval(_))).map(|s| s.name.as_str()).collect();
    if evals.len() > 1 {
        errs.push(Problem::at(
            evals[1],
            "",
            format!(
                "{} Eval stages ({}): g_step generates one set of eval images on one schedule, so a pipeline has one eval stage",
                evals.len(),
                evals.join(", ")
            ),
        ));
    }
    // File sinks (Video, Gif): not over the run's own files, not in the samples folder, and
    // each its own file.
    let mut sink_paths: Vec<(&str, PathBuf)> = vec![];
    let sample_dirs: Vec<&Path> =
        p.stages.iter().filter_map(|s| if let StageKind::Sampler(c) = &s.kind { Some(c.dir.as_path()) } else { None }).collect();
    for s in &p.stages {
        let (path, what) = match &s.kind {
            StageKind::Video(v) => (&v.path, "video"),
            StageKind::Gif(g) => (&g.path, "GIF"),
            _ => continue,
        };
        let kind = s.kind.name();
        let clean: PathBuf = path.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect();
        if RUN_FILES.iter().any(|f| clean == Path::new(f)) {
            errs.push(Problem::of(
                p,
                s,
                "path",
                format!("stage `{}` ({kind}): path {} would overwrite the run's own {}", s.name, path.display(), clean.display()),
            ));
        } else if let Some(f) = RUN_FILES.iter().chain(&[pipe_stages::checkpoint::DIR]).find(|f| clean.starts_with(f)) {
            errs.push(Problem::of(
                p,
                s,
                "path",
                format!(
                    "stage `{}` ({kind}): path {} is under the run's own {f}; put the {what} beside it, e.g. progress.{}",
                    s.name,
                    path.display(),
                    if what == "video" { "mp4" } else { "gif" }
                ),
            ));
        }
        for d in &sample_dirs {
            let d: PathBuf = d.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect();
            if d.as_os_str().is_empty() || clean.starts_with(&d) {
                errs.push(Problem::of(
                    p,
                    s,
                    "path",
                    format!(
                        "stage `{}` ({kind}): path {} is inside the samples folder {}; put the {what} beside it",
                        s.name,
                        path.display(),
                        if d.as_os_str().is_empty() { ".".to_string() } else { d.display().to_string() }
                    ),
                ));
            }
        }
        if let Some((other, _)) = sink_paths.iter().find(|(_, q)| *q == clean) {
            errs.push(Problem::of(
                p,
                s,
                "path",
                format!("stages `{other}` and `{}` both write {}: give each Video or Gif its own path", s.name, path.display()),
            ));
        } else if let Some((other, q)) = sink_paths.iter().find(|(_, q)| clean.starts_with(q) || q.starts_with(&clean)) {
            errs.push(Problem::of(
                p,
                s,
                "path",
                format!(
                    "stages `{other}` and `{}` write {} and {}: one would be a folder of the other; give each Video or Gif its own file",
                    s.name,
                    q.display(),
                    path.display()
                ),
            ));
        }
        sink_paths.push((&s.name, clean));
    }
    // DRAGAN's penalty needs x̂ from augment.
    if let Some(d) = p.stages.iter().find(|s| matches!(s.kind, StageKind::DStep(_))) {
        if let StageKind::DStep(dc) = &d.kind {
            if matches!(dc.penalty, Penalty::Dragan(_)) && !upstream_has_perturb(p, d) {
                errs.push(Problem::of(
                    p,
                    d,
                    "penalty",
                    format!(
                        "stage `{}` (DStep) has penalty Dragan, which needs x̂ near the real data, but no Augment stage upstream has `perturb: Dragan(..)`; add one, or use penalty WganGp or None",
                        d.name
                    ),
                ));
            }
            errs.extend(method_problems(p, &d.name, dc));
        }
    }
    for s in &p.stages {
        if s.queue == Some(0) || s.queue.is_some_and(|q| q > 1024) {
            errs.push(Problem::of(
                p,
                s,
                "queue",
                format!("stage `{}`: queue must be 1 to 1024 items, got {:?}", s.name, s.queue.unwrap_or(0)),
            ));
        }
    }
    for (field, v, max) in
        [("max_steps", p.max_steps, u64::MAX), ("log_every", p.log_every, u64::MAX), ("queue_depth", p.queue_depth as u64, 1024)]
    {
        if v == 0 || v > max {
            let range = if max == u64::MAX { "at least 1".to_string() } else { format!("1 to {max}") };
            errs.push(Problem::top(field, format!("{field} must be {range}, got {v}")));
        }
    }
    if let Some(c) = &p.checkpoint {
        errs.extend(pipe_stages::problem::under("checkpoint", c.problems()).map(|b| Problem::top(&b.field, b.msg)));
    }
    // Data folders: relative paths are taken from the current folder.
    for s in &p.stages {
        let root = match &s.kind {
            StageKind::IdxLoader(c) => &c.root,
            StageKind::FolderLoader(c) => &c.root,
            _ => continue,
        };
        if !root.as_os_str().is_empty() && !root.is_dir() {
            let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
            let hint = if root.is_relative() {
                format!(" (relative to the current folder {cwd}: run pipe from the project folder, or set an absolute path with --set {}.root=PATH)", s.name)
            } else {
                String::new()
            };
            errs.push(Problem::of(
                p,
                s,
                "root",
                format!("stage `{}` ({}): root {} is not a folder{hint}", s.name, s.kind.name(), root.display()),
            ));
        }
    }
    // The eval stage's inputs on disk.
    for s in &p.stages {
        if let StageKind::Eval(c) = &s.kind {
            if !c.real.as_os_str().is_empty() && !c.real.exists() {
                errs.push(Problem::of(
                    p,
                    s,
                    "real",
                    format!(
                        "stage `{}` (Eval): real {} does not exist (expected IDX files or a folder of images)",
                        s.name,
                        c.real.display()
                    ),
                ));
            }
            if let pipe_stages::quality::Features::Lenet { classifier } = &c.features {
                if !classifier.is_file() {
                    // Train it on the pipeline's own labelled data when that is IDX.
                    let data = p
                        .stages
                        .iter()
                        .find_map(|s| if let StageKind::IdxLoader(l) = &s.kind { Some(l.root.display().to_string()) } else { None })
                        .unwrap_or_else(|| "LABELLED_IDX_DATA".into());
                    errs.push(Problem::of(
                        p,
                        s,
                        "features.classifier",
                        format!(
                            "stage `{}` (Eval): classifier {} does not exist; train it with `pipe train-classifier --data {data} --out {}`",
                            s.name,
                            classifier.display(),
                            classifier.display()
                        ),
                    ));
                }
            }
        }
    }
    if errs.is_empty() {
        errs.extend(check_caps(p));
    }
    errs
}

/// `p` with g_step's `loss` filled in where it is left out: the one that goes with d_step's
/// loss (what g_step uses then).
pub fn with_resolved_g_loss(mut p: Pipeline) -> Pipeline {
    let d_loss = p.stages.iter().find_map(|s| if let StageKind::DStep(c) = &s.kind { Some(c.loss.clone()) } else { None });
    if let Some(d_loss) = d_loss {
        for s in &mut p.stages {
            if let StageKind::GStep(g) = &mut s.kind {
                g.loss.get_or_insert(d_loss.generator_default());
            }
        }
    }
    p
}

/// Combinations of loss, penalty, constraint and model that make no sense, explained.
fn method_problems(p: &Pipeline, d_name: &str, dc: &DStepConfig) -> Vec<Problem> {
    let mut errs = vec![];
    let penalty = match &dc.penalty {
        Penalty::None => None,
        Penalty::Dragan(_) => Some("Dragan"),
        Penalty::WganGp(_) => Some("WganGp"),
    };
    // A penalty of weight 0 constrains nothing.
    let constrained_by_penalty = dc.penalty.weights().is_some_and(|g| g.lambda > 0.0);
    if let Some(pen) = penalty {
        if dc.model.has_batch_norm() {
            errs.push(Problem::at(d_name, "model.batch_norm", format!(
                "stage `{d_name}` (DStep): model has batch_norm with penalty {pen}: the penalty constrains ‖∇ₓD(x̂ᵢ)‖ sample by sample, but batch norm makes each D(x̂ᵢ) depend on the whole batch, so the gradient is not the sample's own (Gulrajani et al. 2017, §4); set batch_norm: false, or penalty None"
            )));
        }
        if matches!(dc.constraint, Constraint::Clip(_)) {
            errs.push(Problem::at(d_name, "constraint", format!(
                "stage `{d_name}` (DStep): constraint Clip with penalty {pen}: both bound D's Lipschitz constant, and clipping the weights fights the penalty (WGAN-GP replaces clipping, Gulrajani et al. 2017, §3); keep one: constraint None, or penalty None"
            )));
        }
    }
    if dc.loss == Loss::Wasserstein && !constrained_by_penalty && dc.constraint == Constraint::None {
        errs.push(Problem::at(d_name, "loss", format!(
            "stage `{d_name}` (DStep): loss Wasserstein without a Lipschitz constraint{}: the critic's outputs grow without bound and the loss means nothing; add constraint Clip(c: 0.01) (WGAN) or penalty WganGp(lambda: 10.0) (WGAN-GP)",
            match dc.penalty.weights() {
                Some(g) => format!(" (the penalty's lambda is {}, so it constrains nothing)", g.lambda),
                None => String::new(),
            }
        )));
    }
    for s in &p.stages {
        if let StageKind::GStep(gc) = &s.kind {
            if let Some(g) = gc.loss {
                if !g.pairs_with(&dc.loss) {
                    errs.push(Problem::of(
                        p,
                        s,
                        "loss",
                        format!("stage `{}` (GStep): {}", s.name, pipe_stages::g_step::mismatch(g, &dc.loss)),
                    ));
                }
            }
        }
    }
    errs
}

fn loader_common(batch: usize, epochs: Option<u32>) -> Vec<pipe_stages::problem::Problem> {
    use pipe_stages::problem::Problem;
    if batch == 0 {
        vec![Problem::new("batch", "batch must be ≥ 1")]
    } else if epochs == Some(0) {
        vec![Problem::new("epochs", "epochs is 0: nothing would be trained (use a number ≥ 1, or None for no limit)")]
    } else {
        vec![]
    }
}

/// The image shape `[C, H, W]` the loader of `p` produces and that loader's name; reads an IDX
/// file's header.
pub fn loader_shape(p: &Pipeline) -> Result<([usize; 3], &str), String> {
    for s in &p.stages {
        match &s.kind {
            StageKind::FolderLoader(c) => return Ok((pipe_stages::loader::folder::shape_of(c), &s.name)),
            StageKind::IdxLoader(c) => {
                return pipe_stages::loader::idx::probe_shape(c)
                    .map(|(shape, _)| (shape, s.name.as_str()))
                    .map_err(|e| format!("stage `{}` (IdxLoader): {e}", s.name))
            }
            _ => {}
        }
    }
    Err("a pipeline needs a loader (IdxLoader or FolderLoader)".into())
}

/// Caps: the loader's images against what the models can take.
fn check_caps(p: &Pipeline) -> Vec<Problem> {
    let (shape, src) = match loader_shape(p) {
        Ok(v) => v,
        Err(e) => {
            let loader = p.stages.iter().find(|s| s.kind.ports().0.is_none()).map(|s| s.name.as_str());
            return vec![Problem {
                stage: loader.map(str::to_string),
                index: None,
                field: if loader.is_some() { "root".into() } else { "stages".into() },
                msg: e,
            }];
        }
    };
    let caps = pipe_stages::caps::Caps::batch(shape, false);
    let mut errs = vec![];
    for s in &p.stages {
        let (arch, kind) = match &s.kind {
            StageKind::DStep(c) => (c.model.arch(), "DStep"),
            StageKind::GStep(c) => (c.model.arch(), "GStep"),
            _ => continue,
        };
        if let Err(e) = pipe_stages::models::check_shape(arch, shape) {
            errs.push(Problem::of(
                p,
                s,
                "model",
                format!(
                    "caps mismatch: stage `{}` ({kind}, model {}) takes {}, but stage `{src}` produces {caps}: {e}",
                    s.name,
                    arch.name(),
                    arch.takes()
                ),
            ));
        }
    }
    // 1-d batch norm (Mlp with batch_norm, InfoGan's G) over a batch of one sample normalises
    // every unit to 0: G would ignore z, and the running variance is undefined.
    let batch = p.stages.iter().find_map(|s| match &s.kind {
        StageKind::IdxLoader(c) => Some(c.batch),
        StageKind::FolderLoader(c) => Some(c.batch),
        _ => None,
    });
    if batch == Some(1) {
        for s in &p.stages {
            let bn1d = match &s.kind {
                StageKind::GStep(c) => c.model.has_batch_norm_1d(),
                StageKind::DStep(c) => c.model.has_batch_norm_1d(),
                _ => false,
            };
            if bn1d {
                errs.push(Problem::of(
                    p,
                    s,
                    "model",
                    format!(
                        "stage `{}`: its model has 1-d batch norm, which needs at least 2 images per batch, but stage `{src}` has batch 1: set the loader's batch to 2 or more",
                        s.name
                    ),
                ));
            }
        }
    }
    // LeNet features take grey 28×28 or 32×32 images only.
    for s in &p.stages {
        if let StageKind::Eval(c) = &s.kind {
            let [ch, h, w] = shape;
            if matches!(c.features, pipe_stages::quality::Features::Lenet { .. }) && !(ch == 1 && h == w && matches!(h, 28 | 32)) {
                errs.push(Problem::of(
                    p,
                    s,
                    "features",
                    format!(
                        "stage `{}` (Eval): features Lenet take grey 28×28 or 32×32 images, but stage `{src}` produces {caps}: use `features: Inception`",
                        s.name
                    ),
                ));
            }
        }
    }
    // A sample grid of these images must be drawable (PNG and H.264 limits), known now rather
    // than at the first grid after hours of training.
    for s in &p.stages {
        if let StageKind::Sampler(c) = &s.kind {
            let [ch, h, w] = shape;
            let n = c.grid.saturating_mul(c.grid);
            match pipe_stages::grid::grid_size([n, ch, h, w], c.grid, c.pad) {
                Some((gw, gh)) if gw <= pipe_stages::grid::MAX_SIDE && gh <= pipe_stages::grid::MAX_SIDE => {}
                size => errs.push(Problem::of(
                    p,
                    s,
                    "grid",
                    format!(
                        "stage `{}` (Sampler): a grid of {} × {} images of {w}×{h} (from stage `{src}`) would be {}, more than {} pixels a side: use a smaller `grid`",
                        s.name,
                        c.grid,
                        c.grid,
                        size.map_or_else(|| "enormous".to_string(), |(gw, gh)| format!("{gw}×{gh}")),
                        pipe_stages::grid::MAX_SIDE
                    ),
                )),
            }
        }
    }
    errs
}

/// Every stage `s` reads from, directly or not (`s` itself only if it is in a cycle).
fn upstream<'a>(p: &'a Pipeline, s: &StageSpec) -> Vec<&'a StageSpec> {
    let mut seen: Vec<&StageSpec> = vec![];
    let mut frontier: Vec<&str> = s.input.iter().map(|x| x.as_str()).collect();
    while let Some(n) = frontier.pop() {
        if let Some(o) = p.stages.iter().find(|o| o.name == n) {
            if !seen.iter().any(|v| v.name == o.name) {
                seen.push(o);
                frontier.extend(o.input.iter().map(|x| x.as_str()));
            }
        }
    }
    seen
}

fn upstream_has_perturb(p: &Pipeline, s: &StageSpec) -> bool {
    upstream(p, s).iter().any(|o| matches!(&o.kind, StageKind::Augment(a) if matches!(a.perturb, PerturbMode::Dragan(_))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipe_stages::d_step::GpConfig;
    use pipe_stages::models::DModel;

    fn shipped(name: &str) -> Pipeline {
        load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines").join(name)).unwrap().0
    }

    fn d_step(p: &Pipeline) -> &DStepConfig {
        p.stages.iter().find_map(|s| if let StageKind::DStep(c) = &s.kind { Some(c) } else { None }).unwrap()
    }

    #[test]
    fn shipped_pipelines_parse_with_dragan_defaults() {
        for f in ["mnist_mlp.ron", "irasutoya_mlp.ron", "irasutoya.ron", "irasutoya_small.ron"] {
            let p = shipped(f);
            assert!(check(&p).is_empty(), "{f}: {:?}", check(&p));
            let names: Vec<_> = p.stages.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names[..6], ["loader", "augment", "d_step", "g_step", "sampler", "video"], "{f}");
            // The MNIST pipeline also scores its samples (FID/KID/IS on LeNet features); the
            // full-size illustration DCGAN also writes a GIF.
            let seventh = match f {
                "mnist_mlp.ron" => Some("eval"),
                "irasutoya.ron" => Some("gif"),
                _ => None,
            };
            assert_eq!(names.get(6).copied(), seventh, "{f}");
            let d = d_step(&p);
            assert_eq!(d.penalty, Penalty::Dragan(GpConfig { lambda: 10.0, k: 1.0 }));
            assert_eq!(d.n_critic, 1);
        }
    }

    #[test]
    fn written_pipeline_parses_back_identically() {
        let p = shipped("irasutoya.ron");
        let text = to_ron(&p);
        assert!(text.starts_with("Pipeline("), "{text}");
        assert!(!text.contains("StageSpec("));
        assert_eq!(parse(&text, "x").unwrap(), p);
        assert!(text.ends_with(")\n"));
    }

    #[test]
    fn overrides_change_one_field_and_keep_the_rest() {
        let mut p = shipped("mnist_mlp.ron");
        apply_override(&mut p, "loader.root=/some/where").unwrap();
        apply_override(&mut p, "d_step.n_critic=5").unwrap();
        apply_override(&mut p, "d_step.penalty=WganGp(lambda: 5.0)").unwrap();
        apply_override(&mut p, "seed=9").unwrap();
        apply_override(&mut p, "d_step.model=Mlp(hidden: 64)").unwrap();
        let StageKind::IdxLoader(l) = &p.stages[0].kind else { panic!() };
        assert_eq!(l.root, Path::new("/some/where"));
        assert_eq!(l.batch, 64, "untouched fields stay");
        let d = d_step(&p);
        assert_eq!(d.n_critic, 5);
        assert_eq!(d.penalty, Penalty::WganGp(GpConfig { lambda: 5.0, k: 1.0 }));
        assert_eq!(d.model, DModel::Mlp(pipe_stages::models::MlpConfig { hidden: 64, layers: 2, batch_norm: false }));
        assert_eq!(p.seed, 9);
    }

    #[test]
    fn bad_overrides_are_explained() {
        let mut p = shipped("mnist_mlp.ron");
        let e = apply_override(&mut p, "d_stp.n_critic=5").unwrap_err();
        assert!(e.contains("no stage named `d_stp`") && e.contains("d_step"), "{e}");
        let e = apply_override(&mut p, "d_step.n_critc=5").unwrap_err();
        assert!(e.contains("n_critc"), "{e}");
        let e = apply_override(&mut p, "d_step.n_critic=many").unwrap_err();
        assert!(e.contains("stage `d_step`"), "{e}");
        let e = apply_override(&mut p, "d_step").unwrap_err();
        assert!(e.contains("STAGE.FIELD=VALUE"), "{e}");
        let e = apply_override(&mut p, "d_step.optimizer=RmsProp").unwrap_err();
        assert!(e.contains("written with parentheses, even to take all its defaults, e.g. `RmsProp()`"), "{e}");
        let e = apply_override(&mut p, "d_step.constraint=Clip(0.01)").unwrap_err();
        assert!(e.contains("fields are written with their names, e.g. `Clip(c: 0.01)`"), "{e}");
        apply_override(&mut p.clone(), "d_step.optimizer=RmsProp()").unwrap();
        assert_eq!(p, shipped("mnist_mlp.ron"), "failed overrides change nothing");
    }

    #[test]
    fn graph_problems_are_all_reported() {
        let mut p = shipped("mnist_mlp.ron");
        p.stages[2].input = vec!["augmnt".into()];
        p.stages[5].input = vec!["d_step".into()];
        if let StageKind::Augment(a) = &mut p.stages[1].kind {
            a.perturb = PerturbMode::Off;
        }
        let errs = check(&p);
        assert!(errs.iter().any(|e| e.contains("input `augmnt` doesn't match any stage")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("`video` (Video) takes `frame` but `d_step` (DStep) produces `d_done`")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("penalty Dragan")), "{errs:?}");
        // A cycle.
        let mut p = shipped("mnist_mlp.ron");
        p.stages[1].input = vec!["augment".into()];
        assert!(check(&p).iter().any(|e| e.contains("cycle")), "{:?}", check(&p));
    }

    #[test]
    fn method_pipelines_differ_from_dragan_only_in_the_step_stages() {
        let base = shipped("irasutoya.ron");
        let methods = [
            ("irasutoya_gan.ron", Loss::Logistic, "NonSaturating"),
            ("irasutoya_gan_minimax.ron", Loss::Logistic, "Minimax"),
            ("irasutoya_wgan.ron", Loss::Wasserstein, "Wasserstein"),
            ("irasutoya_wgan_gp.ron", Loss::Wasserstein, "Wasserstein"),
            ("irasutoya_loss_sensitive.ron", Loss::LossSensitive(Default::default()), "LossSensitive"),
            ("irasutoya_least_squares.ron", Loss::LeastSquares, "LeastSquares"),
            ("irasutoya_hinge.ron", Loss::Hinge, "Hinge"),
        ];
        for (f, loss, g_loss) in methods {
            let p = shipped(f);
            assert!(check(&p).is_empty(), "{f}: {:?}", check(&p));
            assert_eq!(d_step(&p).loss, loss, "{f}");
            let g = p.stages.iter().find_map(|s| if let StageKind::GStep(c) = &s.kind { Some(c) } else { None }).unwrap();
            assert_eq!(g.loss.map(|l| l.name()), Some(g_loss), "{f}");
            assert_eq!(p.name, f.trim_end_matches(".ron"));
            assert_eq!(p.stages.len(), base.stages.len(), "{f}");
            for (a, b) in p.stages.iter().zip(&base.stages) {
                if !matches!(a.kind, StageKind::DStep(_) | StageKind::GStep(_)) {
                    assert_eq!(a, b, "{f}: stage `{}` differs from irasutoya.ron", a.name);
                }
            }
        }
        // The paper defaults that matter.
        let w = shipped("irasutoya_wgan.ron");
        assert_eq!(d_step(&w).constraint, Constraint::Clip(pipe_stages::d_step::ClipConfig { c: 0.01 }));
        assert_eq!(d_step(&w).n_critic, 5);
        assert!(matches!(&d_step(&w).optimizer, pipe_stages::train::Optimizer::RmsProp(r) if r.lr == 5e-5));
        let gp = shipped("irasutoya_wgan_gp.ron");
        assert!(matches!(d_step(&gp).penalty, Penalty::WganGp(GpConfig { lambda: 10.0, k: 1.0 })));
        assert!(
            matches!(&d_step(&gp).optimizer, pipe_stages::train::Optimizer::Adam(a) if a.lr == 1e-4 && a.beta1 == 0.0 && a.beta2 == 0.9)
        );
        assert_eq!(d_step(&gp).n_critic, 5);
        assert!(d_step(&shipped("irasutoya_loss_sensitive.ron")).optimizer.weight_decay() > 0.0);
    }

    #[test]
    fn combinations_that_make_no_sense_are_refused() {
        let refused = |sets: &[&str], want: &str| {
            let mut p = shipped("irasutoya.ron");
            for s in sets {
                apply_override(&mut p, s).unwrap();
            }
            let errs = check(&p);
            assert!(errs.iter().any(|e| e.contains(want)), "{sets:?}: {errs:?}");
        };
        refused(&["d_step.model=Dcgan(width: 64, batch_norm: true)"], "model has batch_norm with penalty Dragan");
        refused(
            &["d_step.model=Mlp(hidden: 8, batch_norm: true)", "g_step.model=Mlp(hidden: 8)"],
            "model has batch_norm with penalty Dragan",
        );
        let mut p = shipped("mnist_mlp.ron");
        apply_override(&mut p, "loader.batch=1").unwrap();
        let errs = check(&p);
        assert!(errs.iter().any(|e| e.contains("stage `g_step`: its model has 1-d batch norm") && e.contains("batch 1")), "{errs:?}");
        refused(
            &["d_step.model=Dcgan(width: 64, batch_norm: true)", "d_step.penalty=WganGp(lambda: 10.0)"],
            "model has batch_norm with penalty WganGp",
        );
        refused(&["d_step.constraint=Clip(c: 0.01)"], "constraint Clip with penalty Dragan");
        refused(
            &["d_step.loss=Wasserstein", "d_step.penalty=None", "g_step.loss=Wasserstein"],
            "loss Wasserstein without a Lipschitz constraint",
        );
        refused(
            &["d_step.loss=Wasserstein", "d_step.penalty=WganGp(lambda: 0.0)", "g_step.loss=Wasserstein"],
            "(the penalty's lambda is 0, so it constrains nothing)",
        );
        refused(&["g_step.loss=Wasserstein"], "stage `g_step` (GStep): loss Wasserstein does not go with d_step's loss Logistic");
        refused(&["d_step.loss=Hinge"], "loss NonSaturating does not go with d_step's loss Hinge: D's output means something else to each (a logit, a critic value, a score, a loss); use Hinge");
        refused(&["d_step.constraint=Clip(c: 0.0)"], "constraint Clip: `c` must be a finite number > 0");
        refused(&["d_step.loss=LossSensitive(margin: -1.0)"], "loss LossSensitive: `margin` must be a finite number ≥ 0");
        refused(&["d_step.optimizer=RmsProp(alpha: 1.0)"], "optimizer alpha must be in [0, 1)");
        // The same settings without the conflict pass.
        let mut p = shipped("irasutoya.ron");
        for s in ["d_step.model=Dcgan(width: 64, batch_norm: true)", "d_step.penalty=None", "d_step.loss=Hinge", "g_step.loss=None"] {
            apply_override(&mut p, s).unwrap();
        }
        assert!(check(&p).is_empty(), "{:?}", check(&p));
    }

    #[test]
    fn fan_in_fan_out_and_second_samplers_are_refused() {
        let mut p = shipped("mnist_mlp.ron");
        let mut extra = p.stages[1].clone();
        extra.name = "augment2".into();
        p.stages.insert(2, extra);
        let errs = check(&p);
        assert!(errs.iter().any(|e| e.contains("`loader` (IdxLoader) feeds `augment` and `augment2`")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("`augment2` (Augment) is not connected")), "{errs:?}");
        let mut p = shipped("mnist_mlp.ron");
        p.stages[2].input = vec!["augment".into(), "loader".into()];
        assert!(check(&p).iter().any(|e| e.contains("has 2 inputs (augment, loader)")), "{:?}", check(&p));
        let mut p = shipped("mnist_mlp.ron");
        let mut s2 = p.stages[4].clone();
        s2.name = "sampler2".into();
        p.stages.push(s2);
        assert!(check(&p).iter().any(|e| e.contains("2 Sampler stages (sampler, sampler2)")), "{:?}", check(&p));
    }

    #[test]
    fn outputs_stay_inside_the_run_folder() {
        for (set, want) in [
            ("video.path=\"../x.mp4\"", "without `..`"),
            ("video.path=\"/tmp/victim.txt\"", "relative path"),
            ("video.path=\"\"", "`path` is empty"),
            ("sampler.dir=\"/abs\"", "relative path"),
            ("name=\"../../escaped\"", "plain name"),
            ("name=\"\"", "plain name"),
        ] {
            let mut p = shipped("mnist_mlp.ron");
            apply_override(&mut p, set).unwrap();
            let errs = check(&p);
            assert!(errs.iter().any(|e| e.contains(want)), "{set}: {errs:?}");
        }
        let mut p = shipped("mnist_mlp.ron");
        let mut v2 = p.stages[5].clone();
        v2.name = "video2".into();
        p.stages.push(v2);
        assert!(check(&p).iter().any(|e| e.contains("`video` and `video2` both write progress.mp4")), "{:?}", check(&p));
    }

    #[test]
    fn gif_sinks_are_checked_like_videos() {
        // mnist_mlp with a Gif stage reading `input`.
        let with_gif = |input: &str, cfg: GifConfig| {
            let mut p = shipped("mnist_mlp.ron");
            p.stages.push(StageSpec { name: "gif".into(), input: vec![input.into()], queue: None, kind: StageKind::Gif(cfg) });
            p
        };
        let at = |path: &str| check(&with_gif("sampler", GifConfig { path: path.into(), ..Default::default() }));
        assert!(at("progress.gif").is_empty(), "{:?}", at("progress.gif"));
        assert!(at("./out/progress.gif").is_empty());
        for (path, want) in [
            ("metrics.csv", "stage `gif` (Gif): path metrics.csv would overwrite the run's own metrics.csv"),
            ("metrics.csv", "stage `gif` (Gif): `path` is \"metrics.csv\": the stage writes an animated GIF, so give it a .gif name"),
            ("x.mp4", "give it a .gif name"),
            ("samples/p.gif", "stage `gif` (Gif): path samples/p.gif is inside the samples folder samples; put the GIF beside it"),
            ("loss.png/p.gif", "stage `gif` (Gif): path loss.png/p.gif is under the run's own loss.png; put the GIF beside it"),
            ("metrics.csv/p.gif", "is under the run's own metrics.csv"),
            ("checkpoints/p.gif", "is under the run's own checkpoints"),
            (
                "progress.mp4/p.gif",
                "stages `video` and `gif` write progress.mp4 and progress.mp4/p.gif: one would be a folder of the other",
            ),
            ("../p.gif", "without `..`"),
            // Two file sinks on one path, spelt differently.
            ("./progress.mp4", "stages `video` and `gif` both write ./progress.mp4"),
        ] {
            assert!(at(path).iter().any(|e| e.contains(want)), "{path}: {:?}", at(path));
        }
        let mut p = with_gif("sampler", GifConfig::default());
        apply_override(&mut p, "gif.max_frames=1").unwrap();
        apply_override(&mut p, "gif.max_side=5000").unwrap();
        let errs = check(&p);
        assert!(errs.iter().any(|e| e.msg == "stage `gif` (Gif): `max_frames` is 1, expected 2 to 1000"), "{errs:?}");
        assert!(errs.iter().any(|e| e.msg == "stage `gif` (Gif): `max_side` is 5000, expected 16 to 4096 pixels"), "{errs:?}");
        // A Gif takes frames.
        let errs = check(&with_gif("g_step", GifConfig::default()));
        assert!(errs.iter().any(|e| e.contains("`gif` (Gif) takes `frame` but `g_step` (GStep) produces `images`")), "{errs:?}");
    }

    #[test]
    fn values_that_would_crash_or_train_nothing_are_refused() {
        for (set, want) in [
            ("d_step.model=Mlp(hidden: 0)", "hidden in 1..=65536"),
            ("g_step.model=Dcgan(width: 0)", "width in 1..=4096"),
            ("loader.epochs=0", "epochs is 0"),
            ("video.fps=0", "`fps` is 0"),
            ("sampler.grid=0", "`grid` is 0"),
        ] {
            let mut p = shipped("mnist_mlp.ron");
            apply_override(&mut p, set).unwrap();
            let errs = check(&p);
            assert!(errs.iter().any(|e| e.contains(want)), "{set}: {errs:?}");
        }
        let mut p = shipped("mnist_mlp.ron");
        assert!(apply_override(&mut p, "d_step.penalty=Dragan(lambda: NaN)").unwrap_err().contains("finite"));
        let e = apply_override(&mut p, "d_step.optimizer.lr=1e-3").unwrap_err();
        assert!(e.contains("optimizer=Adam(lr: 2e-4)"), "{e}");
        apply_override(&mut p, "loader.root=/data/banana-inf").unwrap();
    }

    #[test]
    fn check_compares_the_data_shape_with_the_models() {
        // A 3-image IDX file of 28×28 in a temporary folder: DCGAN can't take 28×28.
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 28, 0, 0, 0, 28];
        bytes.extend(std::iter::repeat_n(7u8, 3 * 28 * 28));
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), bytes).unwrap();
        let mut p = shipped("mnist_mlp.ron");
        apply_override(&mut p, &format!("loader.root={}", dir.path().display())).unwrap();
        assert!(check(&p).is_empty(), "{:?}", check(&p));
        apply_override(&mut p, "d_step.model=Dcgan(width: 8)").unwrap();
        let errs = check(&p);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("stage `loader` produces batch[B,1,28,28]")
                && errs[0].contains("caps mismatch: stage `d_step` (DStep, model Dcgan)"),
            "{errs:?}"
        );
        apply_override(&mut p, "loader.root=/no/such/folder").unwrap();
        assert!(check(&p).iter().any(|e| e.contains("/no/such/folder")), "{:?}", check(&p));
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let e = parse("Pipeline(\n  name: \"x\",\n  seed: -,\n)", "f.ron").unwrap_err().remove(0);
        assert_eq!(e.pos.map(|p| p.0), Some(3));
        assert!(e.to_string().starts_with("f.ron:3:"), "{e}");
        let e = parse("Pipeline(nme: \"x\")", "f.ron").unwrap_err().remove(0);
        assert!(e.msg.contains("nme") && e.msg.contains("did you mean `name`?"), "{e}");
    }

    #[test]
    fn every_stage_error_is_reported_with_its_position_and_a_suggestion() {
        let text = "Pipeline(\n  name: \"x\",\n  stages: [\n    (name: \"a\", kind: IdxLoadr(root: \"d\")),\n    (name: \"b\", input: [\"a\"], kind: Augment(\n        flip: true,\n        perturbb: Off)),\n  ],\n)\n";
        let errs = parse(text, "f.ron").unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        // A top-level mistake doesn't hide the stages' problems.
        let t1 = text.replace("name: \"x\",", "name: \"x\", max_step: 5,");
        let e1 = parse(&t1, "f.ron").unwrap_err();
        assert_eq!(e1.len(), 3, "{e1:?}");
        assert!(e1[0].msg.contains("did you mean `max_steps`?"), "{e1:?}");
        // A stage's own fields (name, input, queue, kind) are checked per stage too.
        let t2 = text.replace("(name: \"a\", kind", "(name: \"a\", qeue: 3, kind").replace("(name: \"b\", input", "(nme: \"b\", input");
        let e2 = parse(&t2, "f.ron").unwrap_err();
        assert_eq!(e2.len(), 2, "one per stage (the first problem of each): {e2:?}");
        assert!(
            e2[0].msg.contains("did you mean `queue`?") && e2[1].msg.contains("stage 2 of 2") && e2[1].msg.contains("did you mean `name`?"),
            "{e2:?}"
        );
        assert_eq!(errs[0].pos, Some((4, 23)), "at `IdxLoadr`: {}", errs[0]);
        assert!(
            errs[0].msg.contains("stage `a`") && errs[0].msg.contains("IdxLoadr") && errs[0].msg.contains("did you mean `IdxLoader`?"),
            "{}",
            errs[0]
        );
        assert!(errs[0].msg.contains("FolderLoader"), "the known kinds are listed: {}", errs[0]);
        assert_eq!(errs[1].pos.map(|p| p.0), Some(7), "{}", errs[1]);
        assert!(errs[1].msg.contains("perturbb") && errs[1].msg.contains("did you mean `perturb`?"), "{}", errs[1]);
    }

    #[test]
    fn check_problems_are_located_in_the_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/mnist_mlp.ron");
        let (mut p, src) = load(&path).unwrap();
        p.stages[2].input = vec!["augmnt".into()];
        let errs = check(&p);
        let e = errs.iter().find(|e| e.contains("augmnt")).unwrap();
        assert_eq!((e.stage.as_deref(), e.field.as_str()), (Some("d_step"), "input"));
        let (line, _) = src.locate(e).unwrap();
        assert!(src.text.lines().nth(line - 1).unwrap().contains("name: \"d_step\", input:"), "line {line}: {e}");
        if let StageKind::DStep(d) = &mut p.stages[2].kind {
            d.n_critic = 0;
        }
        let e = check(&p).into_iter().find(|e| e.contains("n_critic")).unwrap();
        let (line, col) = src.locate(&e).unwrap();
        assert!(src.text.lines().nth(line - 1).unwrap()[col - 1..].starts_with("n_critic"), "{line}:{col}: {e}");
    }

    /// Comments and strings that mention a setting never take its place (issue 15: a comment
    /// `// note: n_critic: 5 ...` above `n_critic: 0,` used to be reported).
    #[test]
    fn positions_skip_comments_and_strings_that_name_settings() {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/mnist_mlp.ron")).unwrap();
        let text = text
            .replacen("Pipeline(", "/* max_steps: 1, lr: 2 */ Pipeline(\n    // log_every: 7 says the note\n", 1)
            .replacen("n_critic: 1,", "// note: n_critic: 5 is the paper's; optimizer: Adam(lr: 1) too\n            n_critic: 0,", 1)
            .replacen("kind: DStep(", "kind: DStep( /* \"penalty: x\" */", 1);
        let (p, src) = parse_with_source(&text, "t.ron").unwrap();
        let mut p = p;
        p.log_every = 0;
        if let StageKind::DStep(d) = &mut p.stages[2].kind {
            d.optimizer = pipe_stages::train::Optimizer::Adam(pipe_stages::train::AdamConfig { lr: -1.0, ..Default::default() });
            if let Penalty::Dragan(g) = &mut d.penalty {
                g.lambda = -1.0;
            }
        }
        let errs = check(&p);
        let at = |pat: &str| {
            let e = errs.iter().find(|e| e.contains(pat)).unwrap_or_else(|| panic!("{pat}: {errs:?}"));
            let (l, c) = src.locate(e).unwrap();
            text.lines().nth(l - 1).unwrap().chars().skip(c - 1).collect::<String>()
        };
        assert!(at("n_critic must be").starts_with("n_critic: 0,"), "{}", at("n_critic must be"));
        assert!(at("lr must be").starts_with("lr: "), "{}", at("lr must be"));
        assert!(at("penalty lambda").starts_with("lambda: "), "{}", at("penalty lambda"));
        assert!(at("log_every must be").starts_with("log_every: "), "{}", at("log_every must be"));
    }
}
