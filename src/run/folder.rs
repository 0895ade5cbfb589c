//! The run folder: choosing it, locking it, and replacing a previous run's outputs.

use super::{RunError, RunOptions};
use crate::spec::{self, Pipeline, RUN_FILES};
use pipe_stages::core::ports::{step_files, Output};
use pipe_stages::io::checkpoint;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the lock file in a run folder.
pub(super) const LOCK_FILE: &str = ".pipe.lock";

/// Take the run folder's lock (an advisory `flock`, released by the kernel when the process
/// ends, however it ends), so two processes never write one run. Keep the returned file open
/// for the whole run.
///
/// Errors (exit 2): another `pipe` holds it (naming its process id), or the lock file cannot be
/// made.
pub fn lock_run_dir(dir: &Path) -> Result<std::fs::File, RunError> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| RunError::Invalid(vec![format!("{}: cannot make the run folder's lock file: {e}", path.display())]))?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(RunError::Invalid(vec![format!(
            "{}: the run folder is in use by another pipe process{}: wait for it to finish, or choose another --out",
            dir.display(),
            holder.trim().parse::<u32>().map(|pid| format!(" (pid {pid})")).unwrap_or_default()
        )]));
    }
    let _ = f.set_len(0);
    let _ = write!(f, "{}", std::process::id());
    Ok(f)
}

/// True while another process holds `dir`'s lock.
pub(super) fn in_use(dir: &Path) -> bool {
    dir.join(LOCK_FILE).exists() && lock_run_dir(dir).is_err()
}

pub(super) fn holds_a_run(dir: &Path) -> bool {
    dir.join("pipeline.ron").exists() || dir.join("metrics.csv").exists()
}

/// Remove the outputs of a previous run of `p` from `dir`: the fixed files, the checkpoints,
/// every file its stages declare ([`pipe_stages::kinds::Kind::outputs`]: videos, GIFs) and the
/// `step_*.png` pictures in their folders (the folder too, if that leaves it empty). Nothing
/// else is touched.
fn remove_run_outputs(p: &Pipeline, dir: &Path) -> std::io::Result<()> {
    // The previous run's own pipeline.ron says where its outputs went (its paths may differ).
    match spec::load(&dir.join("pipeline.ron")) {
        Ok((old, _)) if old != *p => remove_run_outputs(&old, dir)?,
        Ok(_) => {}
        Err(e) if dir.join("pipeline.ron").exists() => crate::say!(
            "warning: --overwrite {}: the previous run's pipeline.ron cannot be read ({}), so only the outputs this pipeline would write are removed; files of its other stages may stay",
            dir.display(),
            e.first().map(|e| e.msg.as_str()).unwrap_or("?")
        ),
        Err(_) => {}
    }
    let mut files: Vec<PathBuf> = RUN_FILES.iter().map(|f| dir.join(f)).collect();
    let ck_dir = dir.join(checkpoint::DIR);
    files.extend(checkpoint::list(&ck_dir).into_iter().map(|(_, f)| f));
    let outputs: Vec<Output<'_>> = p.stages.iter().flat_map(|s| s.kind.outputs()).collect();
    for o in &outputs {
        match o {
            Output::File { path, .. } => files.push(dir.join(path)),
            Output::StepFiles { dir: d, .. } => files.extend(step_files(&dir.join(d)).into_iter().map(|(_, f)| f)),
            Output::FilesIn { dir: d, prefix, .. } => files.extend(pipe_stages::core::ports::files_in(&dir.join(d), prefix)),
        }
    }
    for f in files {
        if f.is_file() {
            std::fs::remove_file(&f)?;
        }
    }
    remove_empty_step_dirs(p, dir);
    let _ = std::fs::remove_dir(&ck_dir); // only if empty
    Ok(())
}

/// `--overwrite`: remove the previous run's outputs from `dir`, unless a process is using it.
pub(super) fn overwrite_run(p: &Pipeline, dir: &Path) -> Result<(), RunError> {
    let bad = |m: String| RunError::Invalid(vec![m]);
    if in_use(dir) {
        return Err(bad(format!("--overwrite {}: the run folder is in use by another pipe process", dir.display())));
    }
    remove_run_outputs(p, dir).map_err(|e| bad(format!("--overwrite {}: cannot remove the previous run: {e}", dir.display())))
}

/// The run folder: `--out`, else `runs/<name>/`. A previous run is never mixed with a new one:
/// the default folder moves on to `runs/<name>-2/`, `-3`, ...; an explicit `--out` holding a run
/// is refused unless `--overwrite`, which removes that run's outputs (and only those) first.
pub fn choose_run_dir(p: &Pipeline, opts: &RunOptions) -> Result<PathBuf, RunError> {
    let bad = |m: String| RunError::Invalid(vec![m]);
    match &opts.out {
        Some(dir) => {
            if dir.exists() && !dir.is_dir() {
                return Err(bad(format!("--out {}: exists and is not a folder", dir.display())));
            }
            if holds_a_run(dir) {
                if !opts.overwrite {
                    return Err(bad(format!(
                        "--out {}: already holds a run (pipeline.ron, metrics.csv); choose another folder or add --overwrite to replace it",
                        dir.display()
                    )));
                }
                overwrite_run(p, dir)?;
            }
            Ok(dir.clone())
        }
        None => {
            let base = PathBuf::from("runs").join(&p.name);
            match (holds_a_run(&base), opts.overwrite) {
                (false, _) => Ok(base),
                (true, true) => choose_run_dir(p, &RunOptions { out: Some(base), ..opts.clone() }),
                (true, false) => {
                    Ok((2..).map(|i| PathBuf::from("runs").join(format!("{}-{i}", p.name))).find(|d| !holds_a_run(d)).expect("a free name"))
                }
            }
        }
    }
}

/// Remove the folders of step pictures that `p`'s stages write in `dir`, where empty (a run
/// that never started leaves none behind).
pub fn remove_empty_step_dirs(p: &Pipeline, dir: &Path) {
    for o in p.stages.iter().flat_map(|s| s.kind.outputs()) {
        if let Output::StepFiles { dir: d, .. } = o {
            let _ = std::fs::remove_dir(dir.join(d)); // only if empty
        }
    }
}
