//! The d_step ↔ g_step hand-over, the one relationship between two stages that the engine
//! names explicitly. The two step stages train one GAN: they share the models (each owns one
//! network and holds a read-only view of the other, see [`crate::train`]) and alternate
//! through a baton; g_step's loss must go with d_step's; g_step generates the images that the
//! sampler and the eval stage ask for ([`super::Kind::asks_images`]).

use super::d_step::{DStepConfig, Penalty};
use super::g_step::{GStepConfig, SampleSchedule};
use super::DataCaps;
use crate::core::problem::Problem;
use crate::core::stage::StageError;
use crate::train::losses::Loss;
use crate::train::models::{check_shape, Arch};
use crate::train::{DSide, GSide};
use crossbeam_channel::{bounded, Receiver, Sender};

/// What d_step and g_step hand each other when they are built: the two sides of the models,
/// the two ends of the baton, and the settings each needs of the other.
pub struct TrainingPair {
    d: Option<(DSide, Receiver<()>)>,
    g: Option<(GSide, Sender<()>)>,
    /// d_step's loss: g_step's loss, when left out, is the one that goes with it.
    pub d_loss: Loss,
    /// d_step's penalty: only DRAGAN's reads x̂ (WGAN-GP interpolates its own points).
    pub d_penalty: Penalty,
    /// Latent size of G, `[B, latent]` f32.
    pub latent: i64,
    /// Sample grids g_step generates (None: no sampler reads it).
    pub grid: Option<SampleSchedule>,
    /// Evaluation images g_step generates (None: no eval stage reads it).
    pub eval: Option<SampleSchedule>,
}

impl TrainingPair {
    /// The pair around built models: `sides` from [`crate::train::build_models`] with `d` and
    /// `g`'s models.
    pub fn new(
        d: &DStepConfig,
        g: &GStepConfig,
        sides: (DSide, GSide),
        grid: Option<SampleSchedule>,
        eval: Option<SampleSchedule>,
    ) -> Self {
        let (tx, rx) = bounded::<()>(1);
        TrainingPair {
            d: Some((sides.0, rx)),
            g: Some((sides.1, tx)),
            d_loss: d.loss.clone(),
            d_penalty: d.penalty.clone(),
            latent: g.latent,
            grid,
            eval,
        }
    }

    /// d_step's share: D's side of the models and the baton's receiving end (g_step signals
    /// the end of each generator step). Errors: taken already (a second d_step).
    pub fn take_d(&mut self) -> Result<(DSide, Receiver<()>), StageError> {
        self.d.take().ok_or_else(|| StageError::msg("a pipeline has one d_step: the D side of the models is taken"))
    }

    /// g_step's share: G's side of the models and the baton's sending end. Errors: taken
    /// already (a second g_step).
    pub fn take_g(&mut self) -> Result<(GSide, Sender<()>), StageError> {
        self.g.take().ok_or_else(|| StageError::msg("a pipeline has one g_step: the G side of the models is taken"))
    }
}

/// Problems of g_step's settings with d_step's, each with a field of g_step: a generator loss
/// that does not go with D's loss.
pub fn problems(d: &DStepConfig, g: &GStepConfig) -> Vec<Problem> {
    match g.loss {
        Some(gl) if !gl.pairs_with(&d.loss) => vec![Problem::new("loss", super::g_step::mismatch(gl, &d.loss))],
        _ => vec![],
    }
}

/// `g` with its `loss` filled in when left out: the one that goes with `d`'s loss (what
/// g_step uses then).
pub fn resolve_g_loss(d: &DStepConfig, g: &mut GStepConfig) {
    g.loss.get_or_insert(d.loss.generator_default());
}

/// Problems of a step stage's model with the data (field `model`): a shape the architecture
/// cannot take, and 1-d batch norm (`bn_1d`) over batches of one image, which normalises every
/// unit to 0 (G would ignore z, and the running variance is undefined).
pub fn model_problems(arch: Arch, bn_1d: bool, data: &DataCaps<'_>) -> Vec<Problem> {
    let mut v = vec![];
    if let Err(e) = check_shape(arch, data.shape) {
        v.push(Problem::new(
            "model",
            format!(
                "caps mismatch: model {} takes {}, but stage `{}` produces {}: {e}",
                arch.name(),
                arch.takes(),
                data.source,
                data.caps()
            ),
        ));
    }
    if bn_1d && data.batch == 1 {
        v.push(Problem::new(
            "model",
            format!(
                "its model has 1-d batch norm, which needs at least 2 images per batch, but stage `{}` has batch 1: set the loader's batch to 2 or more",
                data.source
            ),
        ));
    }
    v
}

#[cfg(test)]
mod tests;
