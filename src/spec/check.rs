//! `pipe check`: everything that can be known about a pipeline before it runs, as a list of
//! [`Problem`]s, each naming its stage and field.
//!
//! The checks here are the same for every stage kind: names, links and their item kinds,
//! cycles, where outputs go, the pipeline's top-level settings. What is particular to a kind is
//! its own [`pipe_stages::kinds::Kind`] declaration (ports, `validate`, `negotiate`,
//! `outputs`), reached through the registry; the one pair of kinds named here is the
//! d_step ↔ g_step hand-over ([`training_pair`]).

use super::{suggest, Pipeline, Problem, StageSpec, RUN_FILES};
use crate::spec::DeviceChoice;
use pipe_stages::core::ports::Output;
use pipe_stages::kinds::d_step::DStepConfig;
use pipe_stages::kinds::frames::partial_path;
use pipe_stages::kinds::g_step::GStepConfig;
use pipe_stages::kinds::{training, CheckContext, DataCaps, Purpose};
use pipe_stages::train::speed::SpeedContext;
use std::path::{Path, PathBuf};

/// Check the graph: unique names, inputs that exist and carry the right item kind, no cycles,
/// one consumer for batches and D-step results, each stage's settings, output paths inside the
/// run folder and apart, and (once all that is fine) the caps of the data against every stage.
/// Loaders may read a file header for the image size; nothing is written. Returns every
/// problem found (an empty list means the pipeline is fine).
pub fn check(p: &Pipeline) -> Vec<Problem> {
    let mut errs = names(p);
    for s in &p.stages {
        errs.extend(links(p, s));
        errs.extend(settings(p, s));
    }
    errs.extend(cycles(p));
    errs.extend(roles(p));
    errs.extend(outputs(p));
    errs.extend(pair(p));
    errs.extend(top_level(p));
    if errs.is_empty() {
        errs.extend(caps(p));
    }
    errs
}

/// The pipeline's d_step and g_step stages with their settings: the training pair. None
/// unless the pipeline has one of each (which [`check`] requires).
pub fn training_pair(p: &Pipeline) -> Option<((&StageSpec, &DStepConfig), (&StageSpec, &GStepConfig))> {
    let d = p.stages.iter().find_map(|s| s.kind.config::<DStepConfig>().map(|c| (s, c)))?;
    let g = p.stages.iter().find_map(|s| s.kind.config::<GStepConfig>().map(|c| (s, c)))?;
    Some((d, g))
}

/// `p` with g_step's `loss` filled in where it is left out: the one that goes with d_step's
/// loss (what g_step uses then).
pub fn with_resolved_g_loss(mut p: Pipeline) -> Pipeline {
    let Some(d) = training_pair(&p).map(|((_, d), _)| d.clone()) else { return p };
    for s in &mut p.stages {
        if let Some(g) = s.kind.config_mut::<GStepConfig>() {
            training::resolve_g_loss(&d, g);
        }
    }
    p
}

/// Why [`loader_shape`] found no image shape.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The pipeline has no source stage.
    #[error("a pipeline needs a loader (IdxLoader or FolderLoader)")]
    Missing,
    /// The source's data cannot be read (naming the stage, its kind and the file).
    #[error("stage `{stage}` ({kind}): {source}")]
    Unreadable { stage: String, kind: &'static str, source: Box<pipe_stages::StageError> },
}

/// The image shape `[C, H, W]` the source of `p` produces and that source's name; may read a
/// file header. Errors: no source ([`LoaderError::Missing`]), or its data unreadable
/// ([`LoaderError::Unreadable`], naming the stage).
pub fn loader_shape(p: &Pipeline) -> Result<([usize; 3], &str), LoaderError> {
    for s in &p.stages {
        if let Some(r) = s.kind.probe_shape() {
            return r.map(|shape| (shape, s.name.as_str())).map_err(|e| LoaderError::Unreadable {
                stage: s.name.clone(),
                kind: s.kind.name(),
                source: Box::new(e),
            });
        }
    }
    Err(LoaderError::Missing)
}

/// A problem of stage `s` in its own words (`b`), prefixed with the stage's name and kind.
fn of_stage(p: &Pipeline, s: &StageSpec, b: pipe_stages::core::problem::Problem) -> Problem {
    Problem::of(p, s, &b.field, format!("stage `{}` ({}): {}", s.name, s.kind.name(), b.msg))
}

/// Plain, unique names for the pipeline and its stages.
fn names(p: &Pipeline) -> Vec<Problem> {
    let mut errs = vec![];
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
        if p.stages[..i].iter().any(|o| o.name == s.name) {
            errs.push(Problem::of(p, s, "name", format!("stage name `{}` is used twice", s.name)));
        }
    }
    errs
}

/// Stage `s`'s links: inputs that exist and carry the item kind it takes, one input for a
/// stage that takes one, none for a source, and readers of its output (batches and D-step
/// results go to exactly one stage).
fn links(p: &Pipeline, s: &StageSpec) -> Vec<Problem> {
    let mut errs = vec![];
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    let kind = s.kind.name();
    let takes = s.kind.ports().takes();
    match takes {
        None if !s.input.is_empty() => errs.push(Problem::of(
            p,
            s,
            "input",
            format!("stage `{}` ({kind}) is a source and takes no input, but has input: {:?}", s.name, s.input),
        )),
        Some(want) if s.input.is_empty() => {
            let example = p.stages.iter().find(|o| o.kind.ports().produces() == Some(want)).map(|o| o.name.as_str()).unwrap_or("...");
            errs.push(Problem::of(
                p,
                s,
                "",
                format!("stage `{}` ({kind}) has no input: it needs a stream of `{want}` items, e.g. input: [\"{example}\"]", s.name),
            ))
        }
        Some(_) if s.input.len() > 1 => errs.push(Problem::of(
            p,
            s,
            "input",
            format!(
                "stage `{}` ({kind}) has {} inputs ({}): a stage reads from exactly one stage",
                s.name,
                s.input.len(),
                s.input.join(", ")
            ),
        )),
        _ => {}
    }
    if let Some(want) = takes {
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
                Some(o) if o.kind.ports().produces() != Some(want) => errs.push(Problem::of(
                    p,
                    s,
                    "input",
                    format!(
                        "stage `{}` ({kind}) takes `{want}` but `{up}` ({}) produces `{}`",
                        s.name,
                        o.kind.name(),
                        o.kind.ports().produces().map_or("nothing", |k| k.name())
                    ),
                )),
                Some(_) => {}
            }
        }
    }
    let readers: Vec<&str> = p.stages.iter().filter(|o| o.input.contains(&s.name)).map(|o| o.name.as_str()).collect();
    match s.kind.ports().produces() {
        Some(item) if !item.fans_out() && readers.len() > 1 => errs.push(Problem::of(
            p,
            s,
            "name",
            format!(
                "stage `{}` ({kind}) feeds {}: `{item}` items go to one stage only (sample images and frames may fan out)",
                s.name,
                readers.iter().map(|r| format!("`{r}`")).collect::<Vec<_>>().join(" and ")
            ),
        )),
        Some(item) if !item.fans_out() && readers.is_empty() => errs.push(Problem::of(
            p,
            s,
            "name",
            format!("stage `{}` ({kind}) is not connected: no stage reads its `{item}` output", s.name),
        )),
        _ => {}
    }
    if takes.is_none() && s.queue.is_some() {
        errs.push(Problem::of(
            p,
            s,
            "queue",
            format!("stage `{}` ({kind}): queue sizes the link into a stage, and a source has none; remove it", s.name),
        ));
    }
    if s.queue == Some(0) || s.queue.is_some_and(|q| q > 1024) {
        errs.push(Problem::of(p, s, "queue", format!("stage `{}`: queue must be 1 to 1024 items, got {:?}", s.name, s.queue.unwrap_or(0))));
    }
    errs
}

/// Stage `s`'s own settings ([`pipe_stages::kinds::Kind::validate`]), with what it knows of the
/// pipeline around it.
fn settings(p: &Pipeline, s: &StageSpec) -> Vec<Problem> {
    let cx = CheckContext {
        stage: &s.name,
        log_every: p.log_every,
        upstream_xhat: upstream(p, s).iter().any(|o| o.kind.adds_xhat()),
        source: p.stages.iter().find_map(|o| o.kind.source()),
    };
    s.kind.validate(&cx).into_iter().map(|b| of_stage(p, s, b)).collect()
}

/// A stage upstream of itself.
fn cycles(p: &Pipeline) -> Vec<Problem> {
    p.stages
        .iter()
        .filter(|s| upstream(p, s).iter().any(|o| o.name == s.name))
        .map(|s| Problem::of(p, s, "input", format!("stage `{}` is part of a cycle", s.name)))
        .collect()
}

/// Exactly one d_step and one g_step, a source, and at most one stage asking g_step for
/// images of each purpose (each purpose has one set of latents on one schedule).
fn roles(p: &Pipeline) -> Vec<Problem> {
    let mut errs = vec![];
    let count = |is: &dyn Fn(&StageSpec) -> bool| p.stages.iter().filter(|s| is(s)).count();
    for (n, what) in [
        (count(&|s| s.kind.config::<DStepConfig>().is_some()), "d_step (DStep)"),
        (count(&|s| s.kind.config::<GStepConfig>().is_some()), "g_step (GStep)"),
    ] {
        if n != 1 {
            errs.push(Problem::top("stages", format!("a pipeline needs exactly one {what} stage, found {n}")));
        }
    }
    if !p.stages.iter().any(|s| s.kind.ports().takes().is_none()) {
        errs.push(Problem::top("stages", "a pipeline needs a loader (IdxLoader or FolderLoader)"));
    }
    for purpose in [Purpose::Grid, Purpose::Eval] {
        let asking: Vec<&StageSpec> = p.stages.iter().filter(|s| s.kind.asks_images().is_some_and(|r| r.purpose == purpose)).collect();
        if asking.len() > 1 {
            let names = asking.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
            let why = match purpose {
                Purpose::Grid => "g_step generates one fixed latent batch on one schedule, so a pipeline has one sampler (several videos may read from it)",
                Purpose::Eval => "g_step generates one set of eval images on one schedule, so a pipeline has one eval stage",
            };
            errs.push(Problem::of(p, asking[1], "", format!("{} {} stages ({names}): {why}", asking.len(), asking[1].kind.name())));
        }
    }
    errs
}

/// `path` without `.` components, for comparing configured paths.
fn clean(path: &Path) -> PathBuf {
    path.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect()
}

/// Output files ([`Output::File`], and [`Output::FilesIn`] as the file `dir/prefix`): not over
/// the run's own files, not in its checkpoints or a folder of step pictures, each its own file,
/// none over another's `<path>.partial` (where a video or GIF is written until it is whole),
/// and no folder of files (a TensorBoard log) inside another (TensorBoard would read the inner
/// one as a run of its own and the outer one's reader would take both).
fn outputs(p: &Pipeline) -> Vec<Problem> {
    let mut errs = vec![];
    let step_dirs: Vec<PathBuf> = p
        .stages
        .iter()
        .flat_map(|s| s.kind.outputs())
        .filter_map(|o| if let Output::StepFiles { dir, .. } = o { Some(clean(dir)) } else { None })
        .collect();
    let mut files: Vec<(&str, PathBuf, String)> = vec![];
    let mut dirs: Vec<(&str, PathBuf, String)> = vec![];
    for s in &p.stages {
        for o in s.kind.outputs() {
            if let Output::FilesIn { field, dir, .. } = &o {
                let d = clean(dir);
                let d_shown = if d.as_os_str().is_empty() { ".".to_string() } else { dir.display().to_string() };
                if let Some((other, _, q_shown)) = dirs.iter().find(|(_, q, _)| q != &d && (d.starts_with(q) || q.starts_with(&d))) {
                    errs.push(Problem::of(
                        p,
                        s,
                        field,
                        format!(
                            "stages `{other}` and `{}` log into {q_shown} and {d_shown}: one folder is inside the other, so a reader of the outer one would take both; give each a folder of its own beside the other",
                            s.name
                        ),
                    ));
                }
                dirs.push((&s.name, d, d_shown));
            }
            // A folder's files by prefix are checked as the file `dir/prefix`, shown `dir/prefix*`.
            let (field, path, what, example, star) = match o {
                Output::File { field, path, what, example } => (field, path, what, example, ""),
                Output::FilesIn { field, dir, prefix, what, example } => (field, dir.join(prefix).into(), what, example, "*"),
                Output::StepFiles { .. } => continue,
            };
            let shown = format!("{}{star}", path.display());
            let at = |msg: String| of_stage(p, s, pipe_stages::core::problem::Problem::new(field, msg));
            let c = clean(&path);
            if RUN_FILES.iter().any(|f| c == Path::new(f)) {
                errs.push(at(format!("path {shown} would overwrite the run's own {}", c.display())));
            } else if let Some(f) = run_owned(&c) {
                errs.push(at(format!("path {shown} is under the run's own {f}; put the {what} beside it, e.g. {example}")));
            }
            for d in &step_dirs {
                if d.as_os_str().is_empty() || c.starts_with(d) {
                    let folder = if d.as_os_str().is_empty() { ".".to_string() } else { d.display().to_string() };
                    errs.push(at(format!("path {shown} is inside the samples folder {folder}; put the {what} beside it")));
                }
            }
            if let Some((other, ..)) = files.iter().find(|(_, q, _)| *q == c) {
                errs.push(Problem::of(
                    p,
                    s,
                    field,
                    format!("stages `{other}` and `{}` both write {}: give each output its own path", s.name, shown),
                ));
            } else if let Some((other, _, q)) = files.iter().find(|(_, q, _)| c.starts_with(q) || q.starts_with(&c)) {
                errs.push(Problem::of(
                    p,
                    s,
                    field,
                    format!(
                        "stages `{other}` and `{}` write {} and {}: one would be a folder of the other; give each output its own file",
                        s.name, q, shown
                    ),
                ));
            } else if let Some((other, q, hit)) =
                files.iter().find_map(|(other, q, q_shown)| partial_clash(&c, q).map(|hit| (other, q_shown, hit)))
            {
                errs.push(Problem::of(
                    p,
                    s,
                    field,
                    format!(
                        "stages `{other}` and `{}` write {} and {}, which meet at {}, where a file is written until it is whole; give each output its own name",
                        s.name,
                        q,
                        shown,
                        hit.display()
                    ),
                ));
            }
            files.push((&s.name, c, shown));
        }
    }
    // The folders of step pictures: not the run's own files or checkpoints, nor inside (or
    // at the temporary file of) another output, nor inside a log folder.
    for s in &p.stages {
        for o in s.kind.outputs() {
            let Output::StepFiles { field, dir, .. } = o else { continue };
            let d = clean(dir);
            if d.as_os_str().is_empty() {
                continue;
            }
            let at = |msg: String| of_stage(p, s, pipe_stages::core::problem::Problem::new(field, msg));
            let shown = dir.display();
            if let Some(f) = run_owned(&d) {
                errs.push(at(format!(
                    "folder {shown} is the run's own {f} or inside it; give the grids a folder of their own, e.g. samples"
                )));
            } else if let Some((other, _, q)) = files.iter().find(|(_, q, _)| d.starts_with(q)) {
                errs.push(at(format!(
                    "folder {shown} would be inside {q}, which stage `{other}` writes; give the grids a folder of their own"
                )));
            } else if let Some((other, hit)) = files.iter().find_map(|(other, q, _)| partial_clash(&d, q).map(|h| (other, h))) {
                errs.push(at(format!(
                    "folder {shown} meets {}, where stage `{other}` writes its file until it is whole; give the grids a folder of their own",
                    hit.display()
                )));
            } else if let Some((other, _, q)) = dirs.iter().find(|(_, q, _)| !q.as_os_str().is_empty() && d.starts_with(q)) {
                errs.push(at(format!("folder {shown} is inside {q}, the log folder of stage `{other}`; put the grids beside it")));
            }
        }
    }
    errs
}

/// The run's own file or the checkpoints folder that `path` (cleaned) is or lies under.
fn run_owned(path: &Path) -> Option<&'static str> {
    RUN_FILES.iter().chain(&[pipe_stages::io::checkpoint::DIR]).find(|f| path.starts_with(f)).copied()
}

/// Where the output paths `a` and `b` (cleaned, neither equal to nor inside the other) would
/// meet once their temporary `<path>.partial` files are counted: the temporary file, or `None`.
fn partial_clash(a: &Path, b: &Path) -> Option<PathBuf> {
    // Two paths meet when equal or one is inside the other: at the shorter one.
    let meet = |x: &Path, y: &Path| {
        if x.starts_with(y) {
            Some(y.to_path_buf())
        } else if y.starts_with(x) {
            Some(x.to_path_buf())
        } else {
            None
        }
    };
    let (pa, pb) = (partial_path(a), partial_path(b));
    meet(a, &pb).or_else(|| meet(&pa, b)).or_else(|| meet(&pa, &pb))
}

/// g_step's settings against d_step's ([`training::problems`]).
fn pair(p: &Pipeline) -> Vec<Problem> {
    let Some(((_, d), (g_spec, g))) = training_pair(p) else { return vec![] };
    training::problems(d, g).into_iter().map(|b| of_stage(p, g_spec, b)).collect()
}

/// The pipeline's own settings: step counts, queue depth, checkpoints.
fn top_level(p: &Pipeline) -> Vec<Problem> {
    let mut errs = vec![];
    for (field, v, max) in
        [("max_steps", p.max_steps, u64::MAX), ("log_every", p.log_every, u64::MAX), ("queue_depth", p.queue_depth as u64, 1024)]
    {
        if v == 0 || v > max {
            let range = if max == u64::MAX { "at least 1".to_string() } else { format!("1 to {max}") };
            errs.push(Problem::top(field, format!("{field} must be {range}, got {v}")));
        }
    }
    if let Some(c) = &p.checkpoint {
        errs.extend(pipe_stages::core::problem::under("checkpoint", c.problems()).map(|b| Problem::top(&b.field, b.msg)));
    }
    let cuda = match p.device {
        DeviceChoice::Cpu => false,
        DeviceChoice::Cuda => true,
        DeviceChoice::Auto => tch::Cuda::is_available(),
    };
    errs.extend(p.speed_settings().problems(&speed_context(p, cuda)).into_iter().map(|b| Problem::top(&b.field, b.msg)));
    errs
}

/// What the device (`cuda`: the run trains on CUDA device 0) and the pipeline allow for the
/// speed settings: bf16 on that GPU, CUDA graphs in this build, a capturable update (no
/// `on_nonfinite: Skip`, no `Adam(fused: false)`), convolutional models.
pub fn speed_context(p: &Pipeline, cuda: bool) -> SpeedContext {
    use pipe_stages::train::models::Arch;
    use pipe_stages::train::{NonFinite, Optimizer};
    let pair = training_pair(p);
    let optimizers = pair.iter().flat_map(|((_, d), (_, g))| [&d.optimizer, &g.optimizer]);
    let unfused = optimizers.into_iter().any(|o| matches!(o, Optimizer::Adam(a) if !a.fused_on()));
    let not_capturable = if p.on_nonfinite == NonFinite::Skip {
        Some("on_nonfinite Skip reads every loss back to the host")
    } else if unfused {
        Some("an Adam with `fused: false` computes its bias correction on the host")
    } else {
        None
    };
    let convolutional = pair.is_some_and(|((_, d), (_, g))| d.model.arch() != Arch::Mlp || g.model.arch() != Arch::Mlp);
    // A GPU that is not here (device Cuda checked on a CPU machine) is taken to have bf16: the
    // run itself refuses the missing device.
    let bf16_capable = cuda && (!tch::Cuda::is_available() || pipe_stages::train::cuda::device_info(0).map(|i| i.bf16()).unwrap_or(true));
    SpeedContext { cuda, bf16_capable, graphs_built: pipe_stages::train::cuda::built_with_cuda(), not_capturable, convolutional }
}

/// Caps: the source's data (shape, batch) against every stage
/// ([`pipe_stages::kinds::Kind::negotiate`]).
fn caps(p: &Pipeline) -> Vec<Problem> {
    let (shape, src) = match loader_shape(p) {
        Ok(v) => v,
        Err(e) => {
            let e = e.to_string();
            let loader = p.stages.iter().find(|s| s.kind.ports().takes().is_none());
            return vec![match loader {
                Some(l) => Problem::of(p, l, "root", e),
                None => Problem::top("stages", e),
            }];
        }
    };
    let batch = p.stages.iter().find_map(|s| s.kind.source()).map_or(1, |s| s.batch);
    let data = DataCaps { shape, batch, source: src };
    p.stages.iter().flat_map(|s| s.kind.negotiate(&data).into_iter().map(move |b| of_stage(p, s, b))).collect()
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
