//! The `sampler` stage: turns generated sample images into grid pictures.
//!
//! The sampler does not generate anything itself: g_step generates `grid²` images from one
//! fixed latent batch every `every` generator steps (and at the last step) and sends them as
//! [`Item::Images`]. For each batch the sampler tiles a `grid`-column picture
//! ([`crate::io::grid::make_grid`]), writes it as `<dir>/step_<step:08>.png` (atomically), reports
//! the file on the bus, and sends the picture downstream as an [`Item::Frame`] (to a `video`
//! stage, say; with nothing downstream the PNGs are still written).

use crate::io::grid::{check_images, make_grid, write_png_atomic};
use crate::core::item::Item;
use crate::core::ports::{ItemKind, Output, Ports};
use crate::core::problem::Problem;
use crate::kinds::{BuildContext, CheckContext, DataCaps, ImageRequest, Purpose};
use crate::core::stage::{Stage, StageContext, StageError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Colour (grey level, 0 = black) of the padding between the tiles of a sample grid.
pub const PAD_VALUE: u8 = 0;

/// Settings of the `sampler` stage (the `sampler: (...)` block of a pipeline file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerConfig {
    /// Side of the sample grid, in images: the grid has `grid` columns and `grid` rows, so
    /// g_step generates `grid²` images per sample. At least 1. Default 8 (64 images).
    pub grid: usize,
    /// Generator steps between two sample grids (g_step also samples at the last step).
    /// At least 1. Default 500.
    pub every: u64,
    /// Padding between and around the tiles, in pixels. Default 2.
    pub pad: usize,
    /// Folder the grid PNGs are written to; a relative path is taken from the run folder.
    /// Created if missing. Default `samples`.
    pub dir: PathBuf,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { grid: 8, every: 500, pad: 2, dir: PathBuf::from("samples") }
    }
}

/// A built `sampler` stage: knows its grid layout and output folder.
#[derive(Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    dir: PathBuf,
}

impl Sampler {
    /// The folder grid PNGs are written to (`cfg.dir` resolved against the run folder).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the grid PNG of generator step `step`: `<dir>/step_<step:08>.png`.
    pub fn png_path(&self, step: u64) -> PathBuf {
        self.dir.join(crate::core::ports::step_file_name(step))
    }
}

/// Builds a `sampler` stage writing into `run_dir.join(&cfg.dir)`, creating that folder.
///
/// Errors: `grid` or `every` of 0 ([`StageError::Msg`]); the samples folder cannot be created
/// ([`StageError::Io`] naming the folder).
impl SamplerConfig {
    /// Check the values without touching the disk: grid 1 to 64, every ≥ 1, `dir` a relative
    /// folder inside the run folder (no `..`).
    pub fn problems(&self) -> Vec<Problem> {
        let mut errs = vec![];
        if self.grid == 0 || self.grid > 64 {
            errs.push(Problem::new("grid", format!("`grid` is {}, expected 1 to 64 (images per grid side)", self.grid)));
        }
        if self.every == 0 {
            errs.push(Problem::new("every", "`every` must be at least 1 (generator steps between grids)"));
        }
        if self.pad > 64 {
            errs.push(Problem::new("pad", format!("`pad` is {}, expected 0 to 64 pixels", self.pad)));
        }
        errs.extend(crate::core::stage::check_inside_run(&self.dir, "dir", false).err());
        errs
    }

    /// [`Self::problems`] as one result: every message, one per line.
    pub fn validate(&self) -> Result<(), crate::core::problem::Problems> {
        crate::core::problem::to_result(self.problems())
    }
}

pub fn build(cfg: &SamplerConfig, run_dir: &Path) -> Result<Sampler, StageError> {
    cfg.validate()?;
    let dir = run_dir.join(&cfg.dir);
    std::fs::create_dir_all(&dir).map_err(|e| StageError::io(&dir, e))?;
    if !dir.is_dir() {
        return Err(StageError::file(&dir, "the samples folder is not a folder"));
    }
    Ok(Sampler { cfg: cfg.clone(), dir })
}

impl Stage for Sampler {
    /// For each [`Item::Images`]: grid → PNG (atomic) → `wrote` on the bus → [`Item::Frame`]
    /// downstream (ignoring closed outputs). Returns `Ok` when the input ends (or on abort).
    ///
    /// Errors: an item of another kind; a malformed image batch; a PNG that cannot be written
    /// (naming the file).
    fn run(self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        while let Some(item) = ctx.recv() {
            let images = match item {
                Item::Images(images) => images,
                // Images for an eval stage that also reads g_step.
                Item::EvalImages(_) => continue,
                other => {
                    return Err(StageError::msg(format!(
                        "the sampler stage takes `images` items (generated samples from g_step), got a `{}` item",
                        other.kind()
                    )))
                }
            };
            check_images(&images, self.cfg.grid, self.cfg.pad)
                .map_err(|e| StageError::msg(format!("samples of step {}: {e}", images.step)))?;
            let frame = make_grid(&images, self.cfg.grid, self.cfg.pad, PAD_VALUE);
            let path = self.png_path(images.step);
            write_png_atomic(&frame, &path).map_err(|e| StageError::io(&path, e))?;
            ctx.bus.wrote(&path);
            // With no video (or a video that has gone away) the PNGs are still written.
            let _ = ctx.send(Item::Frame(frame));
        }
        Ok(())
    }
}

impl crate::kinds::Kind for SamplerConfig {
    const NAME: &'static str = "Sampler";
    const PORTS: Ports = Ports::filter(
        (ItemKind::Images, "images[n,C,H,W] u8 in [0, 255] on cpu"),
        (ItemKind::Frame, "frame: RGB8 grid picture on cpu"),
    );

    fn validate(&self, _cx: &CheckContext<'_>) -> Vec<Problem> {
        self.problems()
    }

    /// A grid of these images must be drawable (PNG and H.264 limits): known before training
    /// rather than at the first grid after hours of it.
    fn negotiate(&self, data: &DataCaps<'_>) -> Vec<Problem> {
        let [ch, h, w] = data.shape;
        let n = self.grid.saturating_mul(self.grid);
        match crate::io::grid::grid_size([n, ch, h, w], self.grid, self.pad) {
            Some((gw, gh)) if gw <= crate::io::grid::MAX_SIDE && gh <= crate::io::grid::MAX_SIDE => vec![],
            size => vec![Problem::new(
                "grid",
                format!(
                    "a grid of {} × {} images of {w}×{h} (from stage `{}`) would be {}, more than {} pixels a side: use a smaller `grid`",
                    self.grid,
                    self.grid,
                    data.source,
                    size.map_or_else(|| "enormous".to_string(), |(gw, gh)| format!("{gw}×{gh}")),
                    crate::io::grid::MAX_SIDE
                ),
            )],
        }
    }

    fn outputs(&self) -> Vec<Output<'_>> {
        vec![Output::StepFiles { field: "dir", dir: &self.dir, every: self.every }]
    }

    fn asks_images(&self) -> Option<ImageRequest> {
        Some(ImageRequest { purpose: Purpose::Grid, n: self.grid * self.grid, every: self.every })
    }

    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(build(self, cx.run_dir)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::item::{Frame, HostBatch, Images};
    use crate::core::stage::{Bus, BusMessage};
    use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn make_ctx(outputs: Vec<Sender<Item>>) -> (StageContext, Sender<Item>, Receiver<BusMessage>) {
        let (tx, rx) = bounded(4);
        let (btx, brx) = unbounded();
        let ctx = StageContext {
            name: "sampler".into(),
            input: Some(rx),
            outputs,
            bus: Bus::new(btx, "sampler"),
            abort: Arc::new(AtomicBool::new(false)),
            drain: Arc::new(AtomicBool::new(false)),
            stats: Default::default(),
            panic_after: None,
            records: None,
        };
        (ctx, tx, brx)
    }

    fn images(step: u64, n: usize, c: usize, v: u8) -> Images {
        Images { step, shape: [n, c, 4, 4], data: vec![v; n * c * 16], last: false }
    }

    #[test]
    fn config_defaults_and_ron_fields() {
        let d = SamplerConfig::default();
        assert_eq!((d.grid, d.every, d.pad, d.dir.as_path()), (8, 500, 2, Path::new("samples")));
        let j: SamplerConfig = serde_json::from_str(r#"{"grid": 4}"#).unwrap();
        assert_eq!(j, SamplerConfig { grid: 4, ..Default::default() });
        assert!(serde_json::from_str::<SamplerConfig>(r#"{"gird": 4}"#).is_err());
    }

    #[test]
    fn build_creates_folder_and_rejects_bad_settings() {
        let run = tempfile::tempdir().unwrap();
        let s = build(&SamplerConfig { dir: "a/b".into(), ..Default::default() }, run.path()).unwrap();
        assert!(run.path().join("a/b").is_dir());
        assert_eq!(s.png_path(500), run.path().join("a/b/step_00000500.png"));
        assert!(build(&SamplerConfig { grid: 0, ..Default::default() }, run.path()).is_err());
        assert!(build(&SamplerConfig { every: 0, ..Default::default() }, run.path()).is_err());
        // A file in the way: the error names the folder.
        std::fs::write(run.path().join("f"), b"x").unwrap();
        let e = build(&SamplerConfig { dir: "f/g".into(), ..Default::default() }, run.path()).unwrap_err();
        assert!(e.to_string().contains("f/g"), "{e}");
    }

    #[test]
    fn writes_pngs_and_forwards_frames() {
        let run = tempfile::tempdir().unwrap();
        let cfg = SamplerConfig { grid: 2, pad: 1, ..Default::default() };
        let stage = Box::new(build(&cfg, run.path()).unwrap());
        let (out_tx, out_rx) = unbounded();
        let (ctx, tx, bus) = make_ctx(vec![out_tx]);
        let h = std::thread::spawn(move || stage.run(ctx));
        tx.send(Item::Images(images(500, 4, 1, 100))).unwrap();
        tx.send(Item::Images(images(1000, 3, 3, 200))).unwrap();
        drop(tx);
        h.join().unwrap().unwrap();
        let frames: Vec<Frame> = out_rx
            .iter()
            .map(|i| match i {
                Item::Frame(f) => f,
                other => panic!("unexpected {}", other.kind()),
            })
            .collect();
        assert_eq!(frames.len(), 2);
        assert_eq!((frames[0].step, frames[0].width, frames[0].height), (500, 11, 11));
        assert_eq!(frames[1].step, 1000);
        let p = run.path().join("samples/step_00000500.png");
        let png = image::open(&p).unwrap().to_rgb8();
        assert_eq!(png.dimensions(), (11, 11));
        assert_eq!(png.get_pixel(1, 1).0, [100; 3]);
        assert_eq!(png.get_pixel(0, 0).0, [PAD_VALUE; 3]);
        assert_eq!(png.into_raw(), frames[0].rgb);
        let wrote: Vec<PathBuf> = bus
            .try_iter()
            .filter_map(|m| match m {
                BusMessage::Wrote { path, .. } => Some(path),
                _ => None,
            })
            .collect();
        assert_eq!(wrote, vec![p, run.path().join("samples/step_00001000.png")]);
        // No temporary files are left.
        assert_eq!(std::fs::read_dir(run.path().join("samples")).unwrap().count(), 2);
    }

    #[test]
    fn without_downstream_pngs_are_still_written() {
        let run = tempfile::tempdir().unwrap();
        let stage = Box::new(build(&SamplerConfig::default(), run.path()).unwrap());
        // One closed output and, separately, no output at all.
        let (out_tx, out_rx) = bounded(1);
        drop(out_rx);
        let (ctx, tx, _bus) = make_ctx(vec![out_tx]);
        let h = std::thread::spawn(move || stage.run(ctx));
        tx.send(Item::Images(images(1, 64, 3, 7))).unwrap();
        tx.send(Item::Images(images(2, 64, 3, 7))).unwrap();
        drop(tx);
        h.join().unwrap().unwrap();
        assert!(run.path().join("samples/step_00000001.png").is_file());
        assert!(run.path().join("samples/step_00000002.png").is_file());

        let stage = Box::new(build(&SamplerConfig::default(), run.path()).unwrap());
        let (ctx, tx, _bus) = make_ctx(vec![]);
        let h = std::thread::spawn(move || stage.run(ctx));
        tx.send(Item::Images(images(3, 1, 1, 7))).unwrap();
        drop(tx);
        h.join().unwrap().unwrap();
        let png = image::open(run.path().join("samples/step_00000003.png")).unwrap();
        // 8 columns, 1 row of 4×4 tiles, pad 2.
        assert_eq!((png.width(), png.height()), (8 * 4 + 9 * 2, 4 + 2 * 2));
    }

    #[test]
    fn wrong_items_and_bad_images_are_errors() {
        let run = tempfile::tempdir().unwrap();
        let stage = Box::new(build(&SamplerConfig::default(), run.path()).unwrap());
        let (ctx, tx, _bus) = make_ctx(vec![]);
        let h = std::thread::spawn(move || stage.run(ctx));
        let batch = HostBatch { index: 0, epoch: 0, next_pos: 1, shape: [1, 1, 1, 1], x: vec![0.0], x_hat: None };
        let _ = tx.send(Item::Batch(batch));
        let e = h.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("sampler") && e.contains("`images`") && e.contains("`batch`"), "{e}");

        let stage = Box::new(build(&SamplerConfig::default(), run.path()).unwrap());
        let (ctx, tx, _bus) = make_ctx(vec![]);
        let h = std::thread::spawn(move || stage.run(ctx));
        let _ = tx.send(Item::Images(Images { step: 9, shape: [1, 3, 2, 2], data: vec![0; 3], last: true }));
        let e = h.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("step 9") && e.contains("3 bytes"), "{e}");
    }
}
