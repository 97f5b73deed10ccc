//! Score models: anything that maps `(x, t)` to an estimate of `∇ₓ log p_t(x)`.
//!
//! * [`ScoreModel`] is the one trait samplers, losses and regularizers ask for. Implement
//!   it for your own candle network in a few lines, or pass a closure.
//! * [`LogDensityModel`] is for potential models `u(x, t) ≈ log p_t(x)`; wrap one in
//!   [`GradientScore`] to get its score `∇ₓu` by candle autodiff.
//! * [`MlpScore`] and [`MlpPotential`] are reference networks built through a
//!   `candle_nn::VarBuilder` (so you own the parameters), ready to train.
//! * [`GaussianMixture`] gives exact scores, log-densities and samples at every time under
//!   every SDE: the ground truth the tests check against.
//! * [`PulseError`] adds a known error to a score on a time window, to see how each sampler
//!   carries it to the samples.

use candle_core::Tensor;

use crate::train::{ObjectiveGradients, ObjectiveTerms};
use crate::Result;

mod potential;
pub use potential::GradientScore;

/// A score model `s(x, t) ≈ ∇ₓ log p_t(x)`.
///
/// `x` has shape `[B, …]` and `t` has shape `[B]` (one time per sample); the score has the
/// shape of `x`. Closures `Fn(&Tensor, &Tensor) -> Result<Tensor>` are score models.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::ScoreModel;
/// // The score of N(0, I) is -x, at every time.
/// let standard_normal = |x: &Tensor, _t: &Tensor| Ok(x.neg()?);
/// let x = Tensor::new(&[[1.0f64, -2.0]], &Device::Cpu)?;
/// let t = Tensor::new(&[0.5f64], &Device::Cpu)?;
/// assert_eq!(standard_normal.score(&x, &t)?.to_vec2::<f64>()?, [[-1.0, 2.0]]);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub trait ScoreModel {
    /// The score at points `x` (shape `[B, …]`) and times `t` (shape `[B]`).
    fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor>;

    /// A training objective's value and its gradient with respect to the model's
    /// variables, by a hand-written pass instead of candle's autodiff, for models that
    /// have one. The default, `Ok(None)`, means "build the graph", which is always right;
    /// the [`Trainer`](crate::train::Trainer) asks first and falls back to autodiff.
    ///
    /// [`MlpScore`] has one (f32 or f64 on the CPU, SiLU or tanh; see its docs), for DSM
    /// and for DSM plus a squared score-FPE penalty. An implementation must return what
    /// autodiff would, to rounding, for every variable the objective depends on.
    fn objective_gradients(&self, _terms: &ObjectiveTerms<'_>) -> Result<Option<ObjectiveGradients>> {
        Ok(None)
    }
}

impl<F> ScoreModel for F
where
    F: Fn(&Tensor, &Tensor) -> Result<Tensor>,
{
    fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self(x, t)
    }
}

/// A log-density (potential) model `u(x, t) ≈ log p_t(x)`, up to an additive constant.
///
/// Its score is `∇ₓu`; wrap it in [`GradientScore`] to use it wherever a [`ScoreModel`] is
/// asked for. `x` has shape `[B, …]`, `t` shape `[B]`, and the result shape `[B]`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::score::LogDensityModel;
/// // u(x) = -|x|²/2: the standard normal, up to a constant.
/// struct StandardNormal;
/// impl LogDensityModel for StandardNormal {
///     fn log_density(&self, x: &Tensor, _t: &Tensor) -> scoresde::Result<Tensor> {
///         Ok((x.sqr()?.sum(1)? * -0.5)?)
///     }
/// }
/// let x = Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu)?;
/// let t = Tensor::new(&[0.0f64], &Device::Cpu)?;
/// assert_eq!(StandardNormal.log_density(&x, &t)?.to_vec1::<f64>()?, [-2.5]);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub trait LogDensityModel {
    /// `u(x, t)` for each sample: shape `[B]`.
    fn log_density(&self, x: &Tensor, t: &Tensor) -> Result<Tensor>;

    /// `∇ₓu(x, t)` as plain values (no graph), if the model computes it faster than
    /// autodiff does; [`GradientScore::values_only`] uses it for sampling. The default,
    /// `None`, means "use autodiff". An implementation must agree with the autodiff
    /// gradient of [`Self::log_density`].
    fn score_values(&self, _x: &Tensor, _t: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// A training objective's value and gradients by a hand-written pass, for the score
    /// `∇ₓu` of this model (what [`GradientScore`] trains): see
    /// [`ScoreModel::objective_gradients`]. The default, `None`, means "use autodiff";
    /// [`MlpPotential`] has one, for DSM and the log-density FP penalty.
    fn objective_gradients(&self, _terms: &ObjectiveTerms<'_>) -> Result<Option<ObjectiveGradients>> {
        Ok(None)
    }
}

/// Checks a model's output against its input `x`: the same shape and dtype, so that a
/// wrong model is named as such rather than surfacing as a candle op's mismatch later.
pub(crate) fn check_score(score: &Tensor, x: &Tensor) -> Result<()> {
    if score.shape() != x.shape() || score.dtype() != x.dtype() {
        return Err(crate::Error::Shape(format!(
            "the score model returned shape {:?} and dtype {:?} for x of shape {:?} and dtype {:?}; \
             a score has x's shape and dtype",
            score.dims(),
            score.dtype(),
            x.dims(),
            x.dtype()
        )));
    }
    Ok(())
}

/// The one check of the times a network `out/σ(t)` takes (they enter there): f32/f64,
/// finite, within `[0, T]`, and none where `σ(t) = 0` (t = 0 for VP, sub-VP, OU), which
/// would give ±inf.
pub(crate) fn check_sigma_times<S: crate::sde::Sde>(sde: &S, t: &Tensor, what: &str) -> Result<()> {
    if let Some((low, _)) = crate::sde::time_range(t, sde.end_time(), what)? {
        let sigma = sde.std(low);
        crate::error::ensure(sigma > 0.0, || {
            format!(
                "{what} divides by sigma(t), and sigma({low}) = {sigma}: evaluate at t >= eps > 0 \
                 (samplers, losses and regularizers stop at eps)"
            )
        })?;
    }
    Ok(())
}

mod mixture;
mod mlp;
mod pulse;
mod unet;
pub use mixture::{Covariance, DiffusedMixture, GaussianMixture};
pub use mlp::{Activation, FourierFeatures, MlpConfig, MlpPotential, MlpScore, PotentialConfig};
pub use pulse::PulseError;
pub use unet::{UNetConfig, UNetScore};
