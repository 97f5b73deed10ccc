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

    /// The penalty at these points in a form that models with a hand-written training
    /// pass ([`ScoreModel::objective_gradients`](crate::ScoreModel::objective_gradients))
    /// compute without a graph, if it has one: see [`PenaltyTerms`]. It must draw from
    /// `rng` exactly what [`Regularizer::penalty`] would (collocation points), so that a
    /// run is the same either way. The default, `None`, keeps the graph.
    fn penalty_terms(
        &self,
        _sde: &S,
        _x_t: &Tensor,
        _t: &Tensor,
        _rng: &mut dyn RngCore,
    ) -> Result<Option<PenaltyTerms>> {
        Ok(None)
    }
}

/// A penalty as per-point coefficients, for hand-written training passes
/// ([`Regularizer::penalty_terms`]). Models answer the kinds they know and decline the
/// others (the enum may grow).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::regularizer::{LogDensityFp, PenaltyTerms, Regularizer};
/// use scoresde::score::MlpPotential;
/// use scoresde::sde::OuSde;
///
/// // The paper's penalty: 5,000 box points, and 1,000 points on each of the 4 faces.
/// let paper = LogDensityFp::paper(3.5)?;
/// let x_t = Tensor::zeros((8, 2), DType::F64, &Device::Cpu)?;
/// let t = Tensor::full(0.5f64, 8, &Device::Cpu)?;
/// let terms = Regularizer::<OuSde, MlpPotential>::penalty_terms(
///     &paper, &OuSde::default(), &x_t, &t, &mut StdRng::seed_from_u64(0),
/// )?;
/// let Some(PenaltyTerms::LogDensityFp(terms)) = terms else { unreachable!() };
/// assert_eq!(terms.x.dims(), [5000, 2]);
/// assert!((terms.weight.sum_all()?.to_scalar::<f64>()? - 1.0).abs() < 1e-12); // a mean
/// let boundary = terms.boundary.expect("the paper's boundary term");
/// assert_eq!(boundary.x.dims(), [4000, 2]);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PenaltyTerms {
    /// `Σ_b w_b‖r_b‖²` at the DSM batch's points, `r` the score-FPE residual of
    /// [`ScoreFpe`] (exact divergence, autodiff `∂ₜs`).
    ScoreFpe(ScoreFpeTerms),
    /// `Σ_c w_c R_c²` at its own collocation points, `R` the log-density FP residual of
    /// [`LogDensityFp`] (exact Laplacian), plus the boundary term.
    LogDensityFp(LogDensityFpTerms),
}

/// [`PenaltyTerms::ScoreFpe`]: `Σ_b w_b‖r_b‖²` with
/// `r = ∂ₜs − ∇ₓ[½g²(∇·s + ‖s‖²) − a⟨x, s⟩]`; tensors of shape `[B]`, one entry per point
/// of the DSM batch.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ScoreFpeTerms {
    /// The weights `w_b`.
    pub weight: Tensor,
    /// `g(t)²` of the SDE.
    pub diffusion_squared: Tensor,
    /// The drift coefficient `a(t)` of the SDE's drift `f(x, t) = a(t)x`.
    pub drift: Tensor,
}

/// [`PenaltyTerms::LogDensityFp`]: `Σ_c w_c R(x_c, t_c)² + Σ_b v_b exp(2u(x_b, t_b))` with
/// `R = ∂ₜu + a(d + ⟨x, ∇u⟩) − ½g²(Δu + ‖∇u‖²)`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LogDensityFpTerms {
    /// Collocation points `[C, d]`.
    pub x: Tensor,
    /// Their times `[C]`.
    pub t: Tensor,
    /// The weights `w_c`, `[C]`.
    pub weight: Tensor,
    /// `g(t_c)²`, `[C]`.
    pub diffusion_squared: Tensor,
    /// `a(t_c)`, `[C]`.
    pub drift: Tensor,
    /// The boundary term's points, if any.
    pub boundary: Option<BoundaryTerms>,
}

/// The boundary term `Σ_b v_b exp(2u(x_b, t_b))` of [`LogDensityFpTerms`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BoundaryTerms {
    /// Points on the faces of the collocation box, `[N, d]`.
    pub x: Tensor,
    /// Their times, `[N]`.
    pub t: Tensor,
    /// The weights `v_b`, `[N]`.
    pub weight: Tensor,
}

/// Restricts a penalty to the points whose time lies in `[from, to]`.
///
/// Near `t = 0` the true score grows like `1/σ(t)` and its Fokker–Planck residual like
/// `1/σ(t)³`, so a batch with `t ~ U[ε, T]` and small `ε` can hand the optimizer a penalty
/// many orders of magnitude above the DSM loss, which then wrecks the model. Evaluating the
/// penalty only where the noise level is moderate is the usual remedy (a practical choice,
/// not part of either paper's objective). The penalty is the inner one on the selected
/// points, scaled by the fraction selected, so its expectation is that of the inner
/// penalty times the indicator; a batch with no point in the window gives zero.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::regularizer::{Regularizer, ScoreFpe, TimeWindow};
/// use scoresde::sde::VpSde;
/// let penalty = TimeWindow::new(ScoreFpe::new(), 0.05, 1.0)?;
/// let model = |x: &Tensor, _t: &Tensor| Ok((x * -2.0)?); // not a diffusion's score
/// let x = Tensor::new(&[[1.0f64, 0.5], [0.2, -1.0]], &Device::Cpu)?;
/// // Both points are before the window: nothing to penalize.
/// let t = Tensor::new(&[0.01f64, 0.02], &Device::Cpu)?;
/// let p = penalty.penalty(&VpSde::default(), &model, &x, &t, &mut rand::rng())?;
/// assert_eq!(p.to_scalar::<f64>()?, 0.0);
/// assert!(TimeWindow::new(ScoreFpe::new(), 0.5, 0.1).is_err());
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TimeWindow<R> {
    inner: R,
    from: f64,
    to: f64,
}

impl<R> TimeWindow<R> {
    /// Evaluates `inner` only at points with `from ≤ t ≤ to`; errors unless
    /// `0 ≤ from < to` (both finite).
    pub fn new(inner: R, from: f64, to: f64) -> Result<Self> {
        crate::error::ensure(
            from.is_finite() && to.is_finite() && from >= 0.0 && from < to,
            || format!("a time window needs 0 <= from < to, both finite, got [{from}, {to}]"),
        )?;
        Ok(Self { inner, from, to })
    }

    /// The wrapped penalty.
    pub fn inner(&self) -> &R {
        &self.inner
    }
}

impl<S: Sde, M, R: Regularizer<S, M>> Regularizer<S, M> for TimeWindow<R> {
    fn penalty(&self, sde: &S, model: &M, x_t: &Tensor, t: &Tensor, rng: &mut dyn RngCore) -> Result<Tensor> {
        let times = t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        if times.len() != x_t.dim(0)? {
            return Err(crate::Error::Shape(format!(
                "expected one time per point: x_t has shape {:?}, t has shape {:?}",
                x_t.dims(),
                t.dims()
            )));
        }
        let inside: Vec<u32> = (0..times.len() as u32)
            .filter(|&i| (self.from..=self.to).contains(&times[i as usize]))
            .collect();
        if inside.is_empty() {
            return Ok(Tensor::zeros((), x_t.dtype(), x_t.device())?);
        }
        if inside.len() == times.len() {
            return self.inner.penalty(sde, model, x_t, t, rng);
        }
        let fraction = inside.len() as f64 / times.len() as f64;
        let rows = Tensor::new(inside, x_t.device())?;
        let penalty = self.inner.penalty(
            sde,
            model,
            &x_t.index_select(&rows, 0)?,
            &t.index_select(&rows, 0)?,
            rng,
        )?;
        Ok((penalty * fraction)?)
    }

    /// The inner terms on the points inside the window with weights scaled by the
    /// fraction inside (score-FPE weights are zero outside). `None` when no point is
    /// inside (the penalty is then a plain zero).
    fn penalty_terms(
        &self,
        sde: &S,
        x_t: &Tensor,
        t: &Tensor,
        rng: &mut dyn RngCore,
    ) -> Result<Option<PenaltyTerms>> {
        let times = t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        let inside: Vec<u32> = (0..times.len() as u32)
            .filter(|&i| (self.from..=self.to).contains(&times[i as usize]))
            .collect();
        if inside.is_empty() || times.len() != x_t.dim(0)? {
            return Ok(None);
        }
        let fraction = inside.len() as f64 / times.len() as f64;
        let rows = Tensor::new(inside, x_t.device())?;
        let selected =
            self.inner
                .penalty_terms(sde, &x_t.index_select(&rows, 0)?, &t.index_select(&rows, 0)?, rng)?;
        Ok(match selected {
            Some(PenaltyTerms::ScoreFpe(terms)) => {
                let spread = |v: &Tensor| -> Result<Tensor> {
                    Ok(t.zeros_like()?.index_add(&rows, &v.to_dtype(t.dtype())?, 0)?)
                };
                Some(PenaltyTerms::ScoreFpe(ScoreFpeTerms {
                    weight: spread(&(terms.weight * fraction)?)?,
                    diffusion_squared: spread(&terms.diffusion_squared)?,
                    drift: spread(&terms.drift)?,
                }))
            }
            Some(PenaltyTerms::LogDensityFp(mut terms)) => {
                terms.weight = (terms.weight * fraction)?;
                if let Some(boundary) = &mut terms.boundary {
                    boundary.weight = (&boundary.weight * fraction)?;
                }
                Some(PenaltyTerms::LogDensityFp(terms))
            }
            None => None,
        })
    }
}
