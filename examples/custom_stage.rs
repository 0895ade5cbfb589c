//! A new stage kind, whole: `Latest(path: "latest.png")`, a sink that keeps the newest sample
//! grid at one fixed path (for a dashboard or a web page that shows how training goes).
//!
//! Everything a kind needs is in this one file: its config (the RON settings, with their docs
//! for `pipe stages Latest`), its `Kind` declaration (name, ports, `validate`, `outputs`,
//! `build`) and the running stage. To make it part of pipe:
//!
//! 1. copy the part between the `--- kind ---` markers to `stages/src/kinds/latest.rs`
//!    (there the `pipe_stages::` paths read `crate::`);
//! 2. add one line to the registry in `stages/src/kinds/mod.rs`:
//!    `latest::Latest(LatestConfig),` under a `/// Newest sample grid at a fixed path.` line.
//!
//! A pipeline can then use it beside the video (frames fan out from the sampler):
//! `(name: "latest", input: ["sampler"], kind: Latest(path: "latest.png"))`, and `pipe check`
//! validates it, `--overwrite` removes its file, and the run's summary names it.
//!
//! This example builds the stage on its own and runs it on two frames:
//! ```sh
//! cargo run --release --example custom_stage
//! ```

// --- kind ---
use pipe_stages::core::item::Item;
use pipe_stages::core::ports::{ItemKind, Output, Ports};
use pipe_stages::core::problem::Problem;
use pipe_stages::core::stage::{Stage, StageContext, StageError};
use pipe_stages::kinds::frames::{check_frame, wrong_item};
use pipe_stages::kinds::{BuildContext, CheckContext, Kind};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Settings of the `Latest` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LatestConfig {
    /// The PNG file, inside the run folder, replaced by each new grid. Default `latest.png`.
    pub path: PathBuf,
}

impl Default for LatestConfig {
    fn default() -> Self {
        LatestConfig { path: "latest.png".into() }
    }
}

impl Kind for LatestConfig {
    const NAME: &'static str = "Latest";
    const PORTS: Ports = Ports::sink(ItemKind::Frame, "frame: RGB8 picture on cpu");

    /// The path stays inside the run folder and names a PNG. (Clashes with the run's own files
    /// and with other stages' outputs are checked by the engine, from `outputs`.)
    fn validate(&self, _cx: &CheckContext<'_>) -> Vec<Problem> {
        let mut v: Vec<Problem> = pipe_stages::core::stage::check_inside_run(&self.path, "path", true).err().into_iter().collect();
        if !self.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
            v.push(Problem::new(
                "path",
                format!("`path` is {:?}: the stage writes a PNG, so give it a .png name", self.path.display().to_string()),
            ));
        }
        v
    }

    fn outputs(&self) -> Vec<Output<'_>> {
        vec![Output::File { field: "path", path: self.path.as_path().into(), what: "latest grid", example: "latest.png" }]
    }

    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Box<dyn Stage>, StageError> {
        let path = cx.run_dir.join(&self.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StageError::io(dir, e))?;
        }
        Ok(Box::new(Latest { path }))
    }
}

/// The running stage: the file it replaces.
pub struct Latest {
    path: PathBuf,
}

impl Stage for Latest {
    /// Each frame replaces the file atomically (a reader never sees half a PNG).
    fn run(self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        while let Some(item) = ctx.recv() {
            let Item::Frame(f) = item else { return Err(wrong_item("Latest", item.kind())) };
            check_frame(&f, None).map_err(|e| StageError::msg(format!("frame of step {}: {e}", f.step)))?;
            let img = image::RgbImage::from_raw(f.width, f.height, f.rgb).ok_or_else(|| StageError::msg("bad frame size"))?;
            let mut png = std::io::Cursor::new(vec![]);
            img.write_to(&mut png, image::ImageFormat::Png).map_err(|e| StageError::file(&self.path, e.to_string()))?;
            pipe_stages::io::atomic::write_bytes_atomic(&self.path, png.get_ref()).map_err(|e| StageError::io(&self.path, e))?;
            ctx.bus.wrote(&self.path);
        }
        Ok(())
    }
}
// --- kind ---

fn main() -> Result<(), Box<dyn std::error::Error>> {
    use pipe_stages::core::item::Frame;
    use pipe_stages::core::stage::{Bus, StageStats};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    // What `pipe check` would say about two configurations.
    let cx = CheckContext { stage: "latest", log_every: 10, upstream_xhat: false, source: None };
    for cfg in [LatestConfig::default(), LatestConfig { path: "../latest.jpg".into() }] {
        let problems: Vec<String> = cfg.validate(&cx).iter().map(|p| format!("{}: {}", p.field, p.msg)).collect();
        println!("{:?} → {}", cfg.path, if problems.is_empty() { "fine".to_string() } else { problems.join("; ") });
    }

    // Build it as the runner does, and run it on two frames sent through a link.
    let run_dir = tempfile::tempdir()?;
    let settings = pipe_stages::train::RunSettings::new(tch::Device::Cpu, Some(2), 1, 0);
    let stage = LatestConfig::default().build(&mut BuildContext::new("latest", run_dir.path(), &settings))?;
    let (tx, rx) = crossbeam_channel::bounded(2);
    let (bus_tx, bus_rx) = crossbeam_channel::unbounded();
    let ctx = StageContext {
        name: "latest".into(),
        input: Some(rx),
        outputs: vec![],
        bus: Bus::new(bus_tx, "latest"),
        abort: Arc::new(AtomicBool::new(false)),
        drain: Arc::new(AtomicBool::new(false)),
        stats: Arc::new(StageStats::default()),
        panic_after: None,
        records: None,
    };
    let worker = std::thread::spawn(move || stage.run(ctx));
    for (step, shade) in [(1u64, 40u8), (2, 200)] {
        tx.send(Item::Frame(Frame { step, width: 4, height: 2, rgb: vec![shade; 4 * 2 * 3] }))?;
    }
    drop(tx); // EOS
    worker.join().map_err(|_| "the stage panicked")??;
    let written: Vec<_> = bus_rx.try_iter().collect();
    let png = image::open(run_dir.path().join("latest.png"))?.to_rgb8();
    println!(
        "{} files reported; latest.png is {}×{}, pixel {:?} (the second frame)",
        written.len(),
        png.width(),
        png.height(),
        png.get_pixel(0, 0).0
    );
    assert_eq!(png.get_pixel(0, 0).0, [200, 200, 200]);
    Ok(())
}
