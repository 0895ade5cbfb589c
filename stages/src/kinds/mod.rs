//! The stage kinds, one file (or folder) each. A kind's file holds its config (the RON
//! settings), its [`Kind`] declaration (name, ports, validation, outputs, build) and the
//! running stage. The registry below lists every kind on one line and generates
//! [`StageKind`]; nothing else in the engine names a particular kind, except the explicit
//! d_step ↔ g_step hand-over ([`training`]).
//!
//! Adding a kind: write `kinds/my_kind.rs` with a config type, `impl Kind for MyConfig` and
//! the running stage, then add one line to the registry below (see `examples/custom_stage.rs`
//! and the README's "Adding a stage kind").

pub mod frames;
pub mod registry;
pub mod training;

// The registry: every stage kind, one line each (its module, RON name and config type), with
// the doc line `pipe stages` shows. Adding a kind: its file in this folder, and a line here.
crate::registry! {
    /// Source: MNIST-style IDX files (plain or .gz) in `root`.
    idx_loader::IdxLoader(IdxLoaderConfig),
    /// Source: a folder of images (PNG, JPEG, GIF, WebP, BMP), searched recursively.
    folder_loader::FolderLoader(FolderLoaderConfig),
    /// Random flip and the DRAGAN perturbation x̂.
    augment::Augment(AugmentConfig),
    /// Discriminator updates: loss, gradient penalty, weight constraint (on the training device).
    d_step::DStep(DStepConfig),
    /// Generator updates and sample images (on the training device).
    g_step::GStep(GStepConfig),
    /// Sample grids as PNGs, and frames for a video.
    sampler::Sampler(SamplerConfig),
    /// H.264 MP4 of the frames.
    video::Video(VideoConfig),
    /// Animated GIF of the frames (a frame-count and a frame-size cap keep it small).
    gif::Gif(GifConfig),
    /// FID, KID and an IS-style score of generated images every N steps (on the CPU).
    eval::Eval(EvalConfig),
    /// TensorBoard event file: losses, speed, FID/KID/IS, sample grids and the pipeline.
    tensorboard::TensorBoard(TensorBoardConfig),
}

use crate::core::item::DataPosition;
use crate::core::ports::{Output, Ports};
use crate::core::problem::Problem;
use crate::core::stage::{Stage, StageError};
use crate::io::checkpoint::Checkpoint;
use crate::train::RunSettings;
use std::path::{Path, PathBuf};

/// What a stage kind declares to the engine. Implemented by each kind's config type (the
/// value a pipeline file gives as `kind: Name(...)`).
///
/// The engine calls, in order: [`Kind::validate`] (by `pipe check`, from the settings alone and
/// what the pipeline says around the stage), [`Kind::negotiate`] once the source's data caps
/// are known, then [`Kind::build`] when a run starts. [`Kind::outputs`] tells the output-path
/// checks, `--overwrite`, `--resume` and the run's summary what the stage writes.
pub trait Kind {
    /// The kind's name as written in RON (`Video`); the registry's variant of the same name
    /// holds this config.
    const NAME: &'static str;
    /// The kind's ports, item kinds and caps in words.
    const PORTS: Ports;

    /// Problems with the settings, each naming its field (a dot-separated path inside the
    /// config, `optimizer.lr`; `""` for the config as a whole) and saying what was expected.
    /// May look at the disk (a loader's data folder), never writes. Empty when fine.
    fn validate(&self, cx: &CheckContext<'_>) -> Vec<Problem>;

    /// Problems of this stage with the data the source produces (shape, batch), checked
    /// once every [`Kind::validate`] passed. Default: none.
    fn negotiate(&self, _data: &DataCaps<'_>) -> Vec<Problem> {
        vec![]
    }

    /// The files and folders the stage writes inside the run folder. Default: none.
    fn outputs(&self) -> Vec<Output<'_>> {
        vec![]
    }

    /// For a source: its data folder, batch size and whether it has class labels, from the
    /// settings alone. Default: None (not a source).
    fn source(&self) -> Option<SourceInfo<'_>> {
        None
    }

    /// For a source: the image shape `[C, H, W]` it produces, reading at most a file header.
    /// Default: None (not a source). Errors: the data cannot be read (a [`StageError`] naming
    /// the file).
    fn probe_shape(&self) -> Option<Result<[usize; 3], StageError>> {
        None
    }

    /// The images the stage asks g_step to generate for it, when it reads g_step's output.
    /// Default: None.
    fn asks_images(&self) -> Option<ImageRequest> {
        None
    }

    /// Whether batches leaving this stage carry x̂ (the DRAGAN perturbation). Default: false.
    fn adds_xhat(&self) -> bool {
        false
    }

    /// Whether the stage watches the run: it then gets the run's records (each logged step's
    /// figures and each evaluation's scores, as metrics.csv has them) on
    /// [`crate::core::stage::StageContext::records`], besides its input. For sinks that
    /// report a run elsewhere (TensorBoard). Default: false.
    fn watches_run(&self) -> bool {
        false
    }

    /// Build the running stage. Errors: what stops it from running (a file it cannot create,
    /// a checkpoint that does not fit), with paths named.
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Box<dyn Stage>, StageError>;
}

/// What [`Kind::validate`] knows of the pipeline around the stage.
#[derive(Debug, Clone)]
pub struct CheckContext<'a> {
    /// The stage's name in the pipeline file.
    pub stage: &'a str,
    /// The pipeline's `log_every` (generator steps between logged rows).
    pub log_every: u64,
    /// Whether a stage upstream of this one adds x̂ to the batches ([`Kind::adds_xhat`]).
    pub upstream_xhat: bool,
    /// The pipeline's source, when it has one ([`Kind::source`]): for hints.
    pub source: Option<SourceInfo<'a>>,
}

/// A source's settings that other stages' checks use.
#[derive(Debug, Clone, Copy)]
pub struct SourceInfo<'a> {
    /// Its data folder.
    pub root: &'a Path,
    /// Images per batch.
    pub batch: usize,
    /// Whether the data carries class labels (IDX files do), which `pipe train-classifier`
    /// needs.
    pub labelled: bool,
}

/// The data a pipeline's source produces, for [`Kind::negotiate`].
#[derive(Debug, Clone, Copy)]
pub struct DataCaps<'a> {
    /// Image shape `[C, H, W]`.
    pub shape: [usize; 3],
    /// Images per batch.
    pub batch: usize,
    /// The source stage's name.
    pub source: &'a str,
}

impl DataCaps<'_> {
    /// The batches' caps in words (`batch[B,1,28,28] f32 in [-1, 1] on cpu`).
    pub fn caps(&self) -> crate::core::caps::Caps {
        crate::core::caps::Caps::batch(self.shape, false)
    }
}

/// Why a stage asks g_step for images: each purpose has its own latents and schedule, so a
/// pipeline has at most one stage asking for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A sample grid from the fixed latents.
    Grid,
    /// An evaluation's images from the evaluation latents.
    Eval,
}

/// Images a stage asks g_step to generate: `n` every `every` generator steps (and at the last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRequest {
    pub purpose: Purpose,
    pub n: usize,
    pub every: u64,
}

/// What [`Kind::build`] gets from the runner.
pub struct BuildContext<'a> {
    /// The stage's name in the pipeline file.
    pub stage: &'a str,
    /// The pipeline's seed.
    pub seed: u64,
    /// The run folder (outputs' paths are relative to it).
    pub run_dir: &'a Path,
    /// Device, step counts, checkpoint plan and seed of the run.
    pub run: &'a RunSettings,
    /// The checkpoint a resumed run continues from.
    pub resume: Option<&'a Checkpoint>,
    /// Where a source starts reading (the checkpoint's data position, or the start).
    pub data_start: DataPosition,
    /// Batches a source reads in all, counted from the run's first (None: no limit).
    pub max_batches: Option<u64>,
    /// Image shape `[C, H, W]` and batch size of the pipeline's source (this rank's share of
    /// the global batch in a data-parallel run).
    pub image: [usize; 3],
    pub batch: usize,
    /// The sample-grid PNGs of the steps before a resumed run (oldest first): frame sinks
    /// start with them.
    pub prefix_frames: &'a [PathBuf],
    /// Frames a frame sink will receive in all (prefix frames included), for caps on length.
    pub expected_frames: u64,
    /// The d_step ↔ g_step hand-over: models, baton and what each needs of the other (None
    /// when building a stage on its own, as the tests and examples do).
    pub training: Option<&'a mut training::TrainingPair>,
    /// Print a note on the user's terminal (above the progress bar).
    pub note: &'a dyn Fn(String),
}

impl<'a> BuildContext<'a> {
    /// A context for building stage `stage` on its own (tests, examples): the run's seed, no
    /// checkpoint, data at its start, images `[1, 28, 28]` in batches of 64, no prefix frames,
    /// no training pair, notes printed on stderr.
    pub fn new(stage: &'a str, run_dir: &'a Path, run: &'a RunSettings) -> Self {
        BuildContext {
            stage,
            seed: run.seed,
            run_dir,
            run,
            resume: None,
            data_start: DataPosition::default(),
            max_batches: None,
            image: [1, 28, 28],
            batch: 64,
            prefix_frames: &[],
            expected_frames: 0,
            training: None,
            note: &|m| eprintln!("{m}"),
        }
    }

    /// The training pair. Errors: there is none (a step stage built on its own).
    pub fn training(&mut self) -> Result<&mut training::TrainingPair, StageError> {
        self.training
            .as_deref_mut()
            .ok_or_else(|| StageError::msg("d_step and g_step are built with their models: no training pair was given"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_named_as_its_variant_and_has_ports() {
        // The RON variant name (from serde) and the declared NAME agree for every kind.
        let schema = schemars::schema_for!(StageKind);
        let variants: Vec<String> = schema.as_value()["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["properties"].as_object().unwrap().keys().next().unwrap().clone())
            .collect();
        assert_eq!(variants, StageKind::NAMES);
        for n in StageKind::NAMES {
            let p = StageKind::ports_of(n).unwrap();
            assert!(p.input.is_some() || p.output.is_some(), "{n}");
        }
        assert!(StageKind::ports_of("Nope").is_none());
        let v = StageKind::Video(video::VideoConfig { fps: 7, ..Default::default() });
        assert_eq!(v.config::<video::VideoConfig>().map(|c| c.fps), Some(7));
        assert!(v.config::<gif::GifConfig>().is_none());
        assert_eq!(v.name(), "Video");
        assert_eq!(v.outputs().len(), 1);
    }
}
