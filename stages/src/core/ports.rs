//! What a stage kind declares about its place in a pipeline: the items its ports carry
//! (with their caps in words) and the files it writes in the run folder.
//!
//! The graph check reads [`Ports`] to wire and type-check links; `pipe stages KIND` prints
//! their caps; the output-path checks, `--overwrite`, resuming and the run's summary read
//! [`Output`]s. Every kind declares them once, in its own file (see `crate::kinds`).

use std::borrow::Cow;
use std::path::Path;

/// The kinds of item that flow on links (see [`crate::core::item::Item`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemKind {
    /// A batch of real images (and x̂ when perturbed), from a loader.
    Batch,
    /// The end of d_step's updates for one generator step, to g_step.
    DDone,
    /// Generated images (sample grids' or an evaluation's), from g_step.
    Images,
    /// A picture (a sample grid), from a sampler.
    Frame,
}

impl ItemKind {
    /// The item kind's name in messages and docs (`batch`, `d_done`, `images`, `frame`).
    pub fn name(self) -> &'static str {
        match self {
            ItemKind::Batch => "batch",
            ItemKind::DDone => "d_done",
            ItemKind::Images => "images",
            ItemKind::Frame => "frame",
        }
    }

    /// Whether a stage may send items of this kind to several stages (each gets a copy).
    /// Batches and D-step results go to exactly one stage: each batch is trained on once, and
    /// each generator step is taken once.
    pub fn fans_out(self) -> bool {
        matches!(self, ItemKind::Images | ItemKind::Frame)
    }
}

impl std::fmt::Display for ItemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One port: the item kind it carries and its caps in words (shape with a symbolic batch B,
/// dtype, value range, device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub item: ItemKind,
    pub caps: &'static str,
}

/// A stage kind's ports: sources have no input, sinks no output. A stage with an input reads
/// from exactly one stage; an output may feed several when its item kind fans out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub input: Option<Port>,
    pub output: Option<Port>,
}

impl Ports {
    /// Ports of a source producing `item` items with these caps.
    pub const fn source(item: ItemKind, caps: &'static str) -> Self {
        Ports { input: None, output: Some(Port { item, caps }) }
    }
    /// Ports of a sink taking `item` items with these caps.
    pub const fn sink(item: ItemKind, caps: &'static str) -> Self {
        Ports { input: Some(Port { item, caps }), output: None }
    }
    /// Ports of a stage turning `(input, caps)` items into `(output, caps)` items.
    pub const fn filter(input: (ItemKind, &'static str), output: (ItemKind, &'static str)) -> Self {
        Ports { input: Some(Port { item: input.0, caps: input.1 }), output: Some(Port { item: output.0, caps: output.1 }) }
    }
    /// The item kind the stage takes (None for a source).
    pub fn takes(&self) -> Option<ItemKind> {
        self.input.map(|p| p.item)
    }
    /// The item kind the stage produces (None for a sink).
    pub fn produces(&self) -> Option<ItemKind> {
        self.output.map(|p| p.item)
    }
}

/// A file or folder a stage writes inside the run folder, as configured (a path relative to
/// the run folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<'a> {
    /// One file, such as a video: `field` is the setting that names it (or, for a file of a
    /// fixed name, its folder: `Cow::Owned(logdir.join(NAME))`), `what` says what it is in
    /// messages and the run's summary (`video`, `GIF`), `example` is a good value of `field`
    /// (`progress.mp4`).
    File { field: &'static str, path: Cow<'a, Path>, what: &'static str, example: &'static str },
    /// A folder of pictures `step_<step:08>.png`, one every `every` generator steps and one at
    /// the last step (sample grids). `field` is the setting that names the folder.
    StepFiles { field: &'static str, dir: &'a Path, every: u64 },
    /// The files whose names start with `prefix` in folder `dir`: a log that starts a new file
    /// each time a run starts or resumes (TensorBoard's event files). `field` names the folder,
    /// `what` and `example` are as for [`Output::File`]. `--overwrite` removes those files.
    FilesIn { field: &'static str, dir: &'a Path, prefix: &'static str, what: &'static str, example: &'static str },
}

impl<'a> Output<'a> {
    /// The configured path (file or folder), relative to the run folder.
    pub fn path(&self) -> &Path {
        match self {
            Output::File { path, .. } => path,
            Output::StepFiles { dir, .. } | Output::FilesIn { dir, .. } => dir,
        }
    }
    /// The setting that names it.
    pub fn field(&self) -> &'static str {
        match self {
            Output::File { field, .. } | Output::StepFiles { field, .. } | Output::FilesIn { field, .. } => field,
        }
    }
}

/// The files of an [`Output::FilesIn`]: those in `dir` whose names start with `prefix`, in
/// name order. A missing folder has none.
pub fn files_in(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix) && e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// The name of the picture of generator step `step` in a [`Output::StepFiles`] folder.
pub fn step_file_name(step: u64) -> String {
    format!("step_{step:08}.png")
}

/// The step of a [`Output::StepFiles`] picture's file name (`step_00000500.png` → 500); None
/// for any other name.
pub fn step_of_file_name(name: &str) -> Option<u64> {
    name.strip_prefix("step_")?.strip_suffix(".png")?.parse().ok()
}

/// The step pictures in folder `dir` (files named as [`step_file_name`] makes them), with
/// their steps, in no particular order. A missing folder has none.
pub fn step_files(dir: &Path) -> Vec<(u64, std::path::PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| step_of_file_name(&e.file_name().to_string_lossy()).map(|s| (s, e.path())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_file_names_round_trip() {
        assert_eq!(step_file_name(500), "step_00000500.png");
        assert_eq!(step_of_file_name(&step_file_name(500)), Some(500));
        assert_eq!(step_of_file_name("step_x.png"), None);
        assert_eq!(step_of_file_name("notes.png"), None);
        assert!(ItemKind::Frame.fans_out() && !ItemKind::Batch.fans_out() && !ItemKind::DDone.fans_out());
        let p = Ports::source(ItemKind::Batch, "b");
        assert_eq!((p.takes(), p.produces()), (None, Some(ItemKind::Batch)));
    }
}
