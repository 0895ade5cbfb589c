//! `--resume`: finding the checkpoint to continue from, and rewinding the run folder to it.

use super::folder::{holds_a_run, overwrite_run};
use super::metrics::{METRICS_HEADER, METRICS_HEADER_V0};
use super::{RunError, RunOptions};
use crate::spec::{self, Pipeline};
use pipe_stages::core::ports::{step_files, Output};
use pipe_stages::io::checkpoint::{self, Checkpoint, CheckpointError};
use std::path::{Path, PathBuf};

/// The run folder and checkpoint a `--resume` continues from, with warnings to show (damaged
/// newer checkpoints skipped, settings that differ from the checkpoint's).
///
/// `target`: a checkpoint file (inside `<run>/checkpoints/`, or anywhere with `--out` naming
/// the run folder), a run folder, or its `checkpoints` folder; `None`: `--out`, else the run
/// folder of this pipeline (`runs/<name>`, `runs/<name>-2`, ...) with the newest checkpoint.
///
/// Errors (exit 2): nothing to resume there, every checkpoint unreadable, the checkpoint
/// already at or past max_steps, `--out` naming another run folder.
pub fn find_resume(p: &Pipeline, opts: &RunOptions, target: Option<&Path>) -> Result<(PathBuf, Checkpoint, Vec<String>), RunError> {
    let bad = |m: String| RunError::Invalid(vec![m]);
    let (run_dir, found) = locate(p, opts, target)?;
    let (ck, mut warnings) = found.map_err(|e| bad(format!("--resume: {e}")))?;
    let m = &ck.manifest;
    if m.step >= p.max_steps {
        return Err(bad(format!(
            "--resume {}: the checkpoint is at step {} and max_steps is {}: nothing to train (raise it with --max-steps N; it counts from the start of the run)",
            ck.path.display(),
            m.step,
            p.max_steps
        )));
    }
    let old = spec::parse(&m.pipeline, &ck.path.display().to_string()).ok();
    let old_name = old.as_ref().map(|o| o.name.clone()).unwrap_or_else(|| "?".into());
    // Data and latent of another shape: say so in those words before any tensor is compared.
    let latent = spec::training_pair(p).map(|(_, (_, g))| g.latent);
    if let (Ok((shape, _)), Some(latent)) = (spec::loader_shape(p), latent) {
        let shape = shape.map(|v| v as i64);
        if shape != m.image || latent != m.latent {
            let [c, h, w] = m.image;
            return Err(bad(format!(
                "--resume {}: the checkpoint is from pipeline `{old_name}` with images {c}×{h}×{w} and latent {}; this pipeline (`{}`) has images {}×{}×{} and latent {latent}: it cannot continue that run",
                ck.path.display(),
                m.latent,
                p.name,
                shape[0],
                shape[1],
                shape[2]
            )));
        }
    }
    // Say what differs from the run that wrote the checkpoint (allowed: a new learning rate,
    // say), field by field, apart from the settings expected to change.
    if let Some(old) = old {
        // A g_step loss left out means the one that goes with d_step's: compare it as such.
        let (old, p) = (&spec::with_resolved_g_loss(old.clone()), &spec::with_resolved_g_loss(p.clone()));
        let mut diff = vec![];
        if old.seed != p.seed {
            diff.push(format!("seed {} → {} (the random draws will not continue the old series)", old.seed, p.seed));
        }
        for s in &p.stages {
            match old.stages.iter().find(|o| o.name == s.name) {
                Some(o) if o.kind != s.kind => {
                    let (a, b) = (serde_json::to_value(&o.kind).unwrap_or_default(), serde_json::to_value(&s.kind).unwrap_or_default());
                    json_diff(&s.name, &a, &b, &mut diff);
                }
                None => diff.push(format!("stage `{}` is new", s.name)),
                _ => {}
            }
        }
        if !diff.is_empty() {
            warnings.push(format!("resuming with settings that differ from the checkpoint's: {}", diff.join("; ")));
        }
    }
    Ok((run_dir, ck, warnings))
}

/// The run folder a `--resume` continues in, and its checkpoint (with warnings about newer
/// ones skipped), from the target given (see [`find_resume`]).
fn locate(
    p: &Pipeline,
    opts: &RunOptions,
    target: Option<&Path>,
) -> Result<(PathBuf, Result<(Checkpoint, Vec<String>), CheckpointError>), RunError> {
    let bad = |m: String| RunError::Invalid(vec![m]);
    Ok(match target {
        Some(f) if f.is_file() => {
            let ck = checkpoint::read(f).map_err(|e| bad(format!("--resume {e}")))?;
            let parent = f.parent().filter(|d| d.file_name().is_some_and(|n| n == checkpoint::DIR)).and_then(Path::parent);
            let run_dir = match (&opts.out, parent) {
                (Some(o), _) => {
                    let own = parent.is_some_and(|r| same_dir(r, o));
                    if holds_a_run(o) && !own {
                        if !opts.overwrite {
                            return Err(bad(format!(
                                "--resume {} --out {}: that folder holds another run, which the checkpoint does not come from; choose an empty --out, or add --overwrite to replace that run",
                                f.display(),
                                o.display()
                            )));
                        }
                        overwrite_run(p, o)?;
                    }
                    o.clone()
                }
                (None, Some(r)) => {
                    if r.as_os_str().is_empty() {
                        PathBuf::from(".")
                    } else {
                        r.to_path_buf()
                    }
                }
                (None, None) => {
                    return Err(bad(format!(
                        "--resume {}: the checkpoint is not in a run's `{}` folder; say where the run's outputs go with --out RUN_DIR",
                        f.display(),
                        checkpoint::DIR
                    )))
                }
            };
            (run_dir, Ok((ck, vec![])))
        }
        Some(d) if d.is_dir() => {
            let run_dir = if d.file_name().is_some_and(|n| n == checkpoint::DIR) && !d.join(checkpoint::DIR).is_dir() {
                d.parent().map(Path::to_path_buf).unwrap_or_default()
            } else {
                d.to_path_buf()
            };
            if let Some(o) = opts.out.as_ref().filter(|o| **o != run_dir) {
                return Err(bad(format!(
                    "--resume {} and --out {} name different run folders: the outputs of a resumed run go on in its own folder",
                    d.display(),
                    o.display()
                )));
            }
            let found = checkpoint::latest(&run_dir.join(checkpoint::DIR));
            (run_dir, found)
        }
        Some(x) => return Err(bad(format!("--resume {}: no such file or folder", x.display()))),
        None => {
            let candidates: Vec<PathBuf> = match &opts.out {
                Some(o) => vec![o.clone()],
                None => {
                    let base = PathBuf::from("runs").join(&p.name);
                    let mut v = vec![base];
                    v.extend((2..).map(|i| PathBuf::from("runs").join(format!("{}-{i}", p.name))).take_while(|d| d.exists()));
                    v
                }
            };
            // The folder whose newest checkpoint file was written last.
            let newest = candidates
                .iter()
                .filter_map(|d| {
                    let (_, f) = checkpoint::list(&d.join(checkpoint::DIR)).pop()?;
                    Some((std::fs::metadata(&f).and_then(|m| m.modified()).ok()?, d.clone()))
                })
                .max();
            let Some((_, run_dir)) = newest else {
                let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
                return Err(bad(format!(
                    "--resume: found no run of `{}` with checkpoints (looked in {}); give the run folder or checkpoint file: --resume PATH",
                    p.name,
                    looked.join(", ")
                )));
            };
            let found = checkpoint::latest(&run_dir.join(checkpoint::DIR));
            (run_dir, found)
        }
    })
}

/// The leaves where `a` and `b` differ, as `path old → new` (the kind's variant name left out
/// of the path: `d_step.optimizer.Adam.lr` reads `d_step.optimizer.lr`).
fn json_diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) if x.len() == 1 && y.len() == 1 && x.keys().eq(y.keys()) => {
            let (k, v) = x.iter().next().expect("one key");
            // An enum variant ({"Adam": {...}}): keep the path, look inside.
            if k.chars().next().is_some_and(char::is_uppercase) {
                json_diff(path, v, &y[k], out)
            } else {
                json_diff(&format!("{path}.{k}"), v, &y[k], out)
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => json_diff(&format!("{path}.{k}"), v, w, out),
                    None => out.push(format!("{path}.{k} removed")),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{path}.{k} = {}", y[k]));
            }
        }
        _ if a != b => out.push(format!("{path} {a} → {b}")),
        _ => {}
    }
}

/// Are `a` and `b` the same folder?
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Folder of a run folder where a resume from an older checkpoint moves the later ones
/// (`abandoned/after_step_NNNNNNNN/`).
pub const ABANDONED: &str = "abandoned";

/// Bring the run folder back to the state of checkpoint `m`'s step for a resumed run:
/// metrics.csv keeps its rows up to that step (later ones came from after the checkpoint), and
/// gets that step's row back from the manifest if the process died before writing it; sample
/// grids of later steps are removed (the resumed run draws them again), and checkpoints of
/// later steps are moved to [`ABANDONED`], with a warning. Returns the grids kept (oldest first),
/// which open the resumed video, and whether the grid of the checkpoint step is due but missing.
pub(super) fn rewind_run_dir(p: &Pipeline, run_dir: &Path, m: &checkpoint::Manifest) -> Result<(Vec<PathBuf>, bool), RunError> {
    let step = m.step;
    let metrics = run_dir.join("metrics.csv");
    if let Ok(text) = std::fs::read_to_string(&metrics) {
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut lines = text.lines();
        let header = lines.next().map(str::trim_end);
        if header == Some(METRICS_HEADER) || header == Some(METRICS_HEADER_V0) {
            // Rows of the older header get the eval columns, empty.
            let fill = if header == Some(METRICS_HEADER_V0) { ",,," } else { "" };
            let mut kept = format!("{METRICS_HEADER}\n");
            let mut has_step = false;
            for l in lines {
                match l.split(',').next().and_then(|v| v.parse::<u64>().ok()) {
                    Some(s) if s <= step => {
                        has_step |= s == step;
                        kept += &format!("{l}{fill}\n");
                    }
                    _ => {}
                }
            }
            if let (false, Some(l)) = (has_step, m.losses) {
                let gn = l.grad_norm.map(|g| format!("{g:.6}")).unwrap_or_default();
                kept += &format!("{step},{:.3},{:.6},{:.6},{:.6},{gn},,,,\n", m.elapsed_s, l.d_loss, l.g_loss, l.penalty);
            }
            pipe_stages::io::atomic::write_bytes_atomic(&metrics, kept.as_bytes())
                .map_err(|e| RunError::Failed(format!("{}: {e}", metrics.display())))?;
        } else {
            // Not ours to cut: keep it aside and start a new one.
            let aside = run_dir.join("metrics.csv.old");
            std::fs::rename(&metrics, &aside).map_err(|e| RunError::Failed(format!("{}: {e}", metrics.display())))?;
            crate::say!("warning: {} did not start with pipe's header; moved to {} and started afresh", metrics.display(), aside.display());
        }
    }
    // Checkpoints after `step` belong to the abandoned continuation (there are some only when
    // the run is resumed from an older checkpoint than its newest): moved aside, not deleted,
    // so that a later plain --resume does not take them. Temporary files go.
    checkpoint::remove_partials(&run_dir.join(checkpoint::DIR), u64::MAX);
    let later: Vec<(u64, PathBuf)> = checkpoint::list(&run_dir.join(checkpoint::DIR)).into_iter().filter(|(s, _)| *s > step).collect();
    if !later.is_empty() {
        let aside = run_dir.join(ABANDONED).join(format!("after_step_{step:08}"));
        std::fs::create_dir_all(&aside).map_err(|e| RunError::Failed(format!("{}: cannot create the folder: {e}", aside.display())))?;
        for (_, f) in &later {
            let to = aside.join(f.file_name().unwrap_or_default());
            std::fs::rename(f, &to)
                .map_err(|e| RunError::Failed(format!("{}: cannot move a later checkpoint to {}: {e}", f.display(), to.display())))?;
        }
        let steps: Vec<String> = later.iter().map(|(s, _)| s.to_string()).collect();
        crate::say!(
            "warning: resuming from step {step}: the later checkpoints (steps {}) belong to the continuation this resume abandons; moved to {}",
            steps.join(", "),
            aside.display()
        );
    }
    let mut grids = vec![];
    let mut every = vec![];
    for o in p.stages.iter().flat_map(|s| s.kind.outputs()) {
        let Output::StepFiles { dir, every: e, .. } = o else { continue };
        every.push(e);
        for (n, f) in step_files(&run_dir.join(dir)) {
            if n > step {
                let _ = std::fs::remove_file(f);
            } else {
                grids.push((n, f));
            }
        }
    }
    grids.sort();
    let due = every.iter().any(|e| step % e.max(&1) == 0 || m.last);
    let missing = due && grids.last().is_none_or(|(s, _)| *s != step);
    Ok((grids.into_iter().map(|(_, f)| f).collect(), missing))
}
