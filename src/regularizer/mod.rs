//! Penalties added to the denoising score-matching loss.
//!
//! A [`Regularizer`] maps a model and a batch of perturbed points `(x_t, t)` to a scalar
//! penalty; the trainer minimizes `DSM + Σ λᵢ·penaltyᵢ`. Two are built in:
//!
//! * [`ScoreFpe`]: the score Fokker–Planck residual of Lai et al. (ICML 2023), for any
//!   [`ScoreModel`](crate::ScoreModel);
//! * [`LogDensityFp`]: the log-density Fokker–Planck residual of Deveney et al. (2025), for
//!   potential models ([`LogDensityModel`](crate::LogDensityModel)).
//!
//! Both differentiate the network with respect to its inputs and train through those
//! derivatives, so they need candle's second-order gradients: see [`crate::autodiff`].

mod log_density_fp;
mod score_fpe;

pub use log_density_fp::{Boundary, Collocation, LogDensityFp};
pub use score_fpe::{ScoreFpe, TimeDerivative, TimeWeighting};

use candle_core::Tensor;
use rand::RngCore;

use crate::sde::Sde;
use crate::Result;

/// A scalar penalty on a model at perturbed training points.
///
/// `x_t` has shape `[B, …]`, `t` shape `[B]`; the result is a scalar tensor that stays
/// differentiable with respect to the model's parameters. The randomness (Hutchinson
/// probes, collocation points) comes from `rng` so that training repeats exactly.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use rand::RngCore;
/// use scoresde::regularizer::Regularizer;
/// use scoresde::sde::VpSde;
/// use scoresde::ScoreModel;
///
/// /// Penalizes the mean squared score (a toy regularizer).
/// struct ScoreEnergy;
/// impl<M: ScoreModel> Regularizer<VpSde, M> for ScoreEnergy {
///     fn penalty(&self, _sde: &VpSde, model: &M, x_t: &Tensor, t: &Tensor, _rng: &mut dyn RngCore) -> scoresde::Result<Tensor> {
///         Ok(model.score(x_t, t)?.sqr()?.mean_all()?)
///     }
/// }
/// let model = |x: &Tensor, _t: &Tensor| Ok(x.neg()?);
/// let x = Tensor::new(&[[1.0f64, 1.0]], &Device::Cpu)?;
/// let t = Tensor::new(&[0.5f64], &Device::Cpu)?;
/// let p = ScoreEnergy.penalty(&VpSde::default(), &model, &x, &t, &mut rand::rng())?;
/// assert_eq!(p.to_scalar::<f64>()?, 1.0);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub trait Regularizer<S: Sde, M> {
    /// The penalty: a scalar tensor.
    fn penalty(&self, sde: &S, model: &M, x_t: &Tensor, t: &Tensor, rng: &mut dyn RngCore) -> Result<Tensor>;
}
