//! The score Fokker–Planck residual of Lai et al. (FP-Diffusion, ICML 2023).

use candle_core::{DType, Tensor};
use rand::RngCore;

use super::{PenaltyTerms, Regularizer, ScoreFpeTerms};
use crate::autodiff::{
    divergence_and_time_derivative, grad, leaf, time_derivative_fd_within, Divergence, Probe,
};
use crate::error::{ensure, ensure_positive};
use crate::sde::{flatten_batch, per_sample, Sde};
use crate::{Error, Result, ScoreModel};

/// How `∂_t s` is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimeDerivative {
    /// Exact, by autodiff through the network in `t`: one backward pass per dimension,
    /// the same passes that give the exact divergence (so `Exact` with `Autodiff` costs
    /// `d` passes in all, not `2d`).
    Autodiff,
    /// FP-Diffusion's three-point stencil with steps `hs` (backward) and `hd` (forward):
    /// two extra network evaluations, no backward pass.
    FiniteDifference {
        /// The backward step (the paper's code: `1e-3`).
        hs: f64,
        /// The forward step (the paper's code: `5e-4`).
        hd: f64,
    },
}

impl TimeDerivative {
    /// The stencil with the paper's steps `hs = 1e-3`, `hd = 5e-4`.
    pub const PAPER_STENCIL: Self = Self::FiniteDifference {
        hs: crate::autodiff::DEFAULT_FD_HS,
        hd: crate::autodiff::DEFAULT_FD_HD,
    };
}

/// The time weighting `w(t)` of the residual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeWeighting {
    /// `w = 1` (the code's `"constant"`).
    Constant,
    /// `w = g(t)` (`"convention"`).
    Diffusion,
    /// `w = g(t)²`, likelihood weighting (`"ll"`).
    DiffusionSquared,
}

/// The score Fokker–Planck equation residual as a regularizer (Lai et al. 2023).
///
/// The true score of the diffused data satisfies `∂_t s = ∇_x φ` with
/// `φ = ½g²(∇·s + ‖s‖²) − ⟨f, s⟩` (the `∇·f` term is constant in `x` for linear drift `a(t)·x` and
/// drops). The residual `r = ∂_t s − ∇_x φ` is zero for the true score; the penalty at the
/// perturbed training points is
///
/// ```text
/// R = mean_batch[ w(t)·‖r‖₂^m ] / d^m  +  β·‖φ‖₂ (over the batch)
/// ```
///
/// where the second, "scalar", term is the official code's optional extra (it does *not*
/// vanish for the true score). Defaults follow the paper's code: `m = 2`, `w = g²`,
/// normalization by `d^m`, one Gaussian Hutchinson probe, the finite-difference stencil for
/// `∂_t s`, and `β = 0` (its CIFAR-10 runs use `β = 0.01` with `λ = 0.15` on `R_vec`; set
/// them with [`ScoreFpe::with_scalar_weight`] and the trainer's penalty weight).
///
/// These defaults reproduce the paper; they are not the fastest or the least noisy. A
/// Rademacher probe has less variance than a Gaussian one, and with the exact divergence
/// and [`TimeDerivative::Autodiff`] (`d` backward passes in all, exact) the reference
/// [`MlpScore`](crate::score::MlpScore) trains through its hand-written pass, several
/// times faster than the graph; the default takes the graph.
///
/// Works for every [`Sde`] (all have linear drift `a(t)·x`) and every [`ScoreModel`]; the model must
/// be differentiable in `x` (and in `t` for [`TimeDerivative::Autodiff`]). It needs live
/// second-order gradients (see [`crate::autodiff`]).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::autodiff::Divergence;
/// use scoresde::regularizer::{ScoreFpe, TimeDerivative};
/// use scoresde::score::{Covariance, GaussianMixture};
/// use scoresde::sde::VpSde;
///
/// let sde = VpSde::default();
/// let data = GaussianMixture::new(vec![1.0], vec![vec![1.0, 0.0]], vec![Covariance::Isotropic(0.3)])?;
/// let exact = data.diffused(sde);
/// let mut rng = StdRng::seed_from_u64(0);
/// let x = exact.sample(8, 0.5, DType::F64, &Device::Cpu, &mut rng)?;
/// let t = Tensor::full(0.5f64, 8, &Device::Cpu)?;
///
/// let fpe = ScoreFpe::new().with_divergence(Divergence::Exact)?.with_time_derivative(TimeDerivative::Autodiff)?;
/// let residual = fpe.residual(&sde, &exact, &x, &t, &mut rng)?; // [B, d]
/// assert!(residual.abs()?.max_keepdim(0)?.max(1)?.to_vec1::<f64>()?[0] < 1e-8);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreFpe {
    power: f64,
    weighting: TimeWeighting,
    normalize: bool,
    divergence: Divergence,
    time_derivative: TimeDerivative,
    scalar_weight: f64,
}

impl Default for ScoreFpe {
    fn default() -> Self {
        Self::new()
    }
}

/// The pieces of the score FPE at a batch of points.
struct FpeTerms {
    /// `r = ∂_t s − ∇φ`, `[B, d]`.
    residual: Tensor,
    /// `φ = ½g²(∇·s + ‖s‖²) − ⟨f, s⟩`, `[B]`.
    potential: Tensor,
    /// `g(t)`, `[B]`.
    diffusion: Tensor,
}

impl ScoreFpe {
    /// The paper code's defaults (see the type's docs).
    pub fn new() -> Self {
        Self {
            power: 2.0,
            weighting: TimeWeighting::DiffusionSquared,
            normalize: true,
            divergence: Divergence::Hutchinson {
                probe: Probe::Gaussian,
                probes: 1,
            },
            time_derivative: TimeDerivative::PAPER_STENCIL,
            scalar_weight: 0.0,
        }
    }

    /// The norm power `m > 0` in `‖r‖^m`.
    ///
    /// ```
    /// assert!(scoresde::regularizer::ScoreFpe::new().with_power(0.0).is_err());
    /// ```
    pub fn with_power(mut self, m: f64) -> Result<Self> {
        ensure_positive("the norm power m", m)?;
        self.power = m;
        Ok(self)
    }

    /// The time weighting `w(t)`. Every builder method returns a `Result`, so a chain
    /// reads the same whichever settings it touches (this one cannot fail).
    ///
    /// ```
    /// use scoresde::regularizer::{ScoreFpe, TimeWeighting};
    /// let fpe = ScoreFpe::new().with_weighting(TimeWeighting::Constant)?.with_normalization(false)?;
    /// # let _ = fpe;
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_weighting(mut self, weighting: TimeWeighting) -> Result<Self> {
        self.weighting = weighting;
        Ok(self)
    }

    /// Whether to divide by `d^m` (default: yes). Cannot fail; a `Result` like every
    /// builder method here.
    ///
    /// ```
    /// let fpe = scoresde::regularizer::ScoreFpe::new().with_normalization(false)?;
    /// # let _ = fpe;
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_normalization(mut self, normalize: bool) -> Result<Self> {
        self.normalize = normalize;
        Ok(self)
    }

    /// How `∇·s` is computed.
    pub fn with_divergence(mut self, divergence: Divergence) -> Result<Self> {
        divergence.validate()?;
        self.divergence = divergence;
        Ok(self)
    }

    /// How `∂_t s` is computed. Errors unless the finite-difference steps are finite
    /// and `> 0`.
    ///
    /// ```
    /// use scoresde::regularizer::{ScoreFpe, TimeDerivative};
    /// assert!(ScoreFpe::new().with_time_derivative(TimeDerivative::Autodiff).is_ok());
    /// let bad = TimeDerivative::FiniteDifference { hs: 0.0, hd: 5e-4 };
    /// assert!(ScoreFpe::new().with_time_derivative(bad).is_err());
    /// ```
    pub fn with_time_derivative(mut self, time_derivative: TimeDerivative) -> Result<Self> {
        if let TimeDerivative::FiniteDifference { hs, hd } = time_derivative {
            ensure_positive("the finite-difference step hs", hs)?;
            ensure_positive("the finite-difference step hd", hd)?;
        }
        self.time_derivative = time_derivative;
        Ok(self)
    }

    /// The weight `β ≥ 0` of the official code's scalar term `‖φ‖₂` (default 0).
    pub fn with_scalar_weight(mut self, beta: f64) -> Result<Self> {
        ensure(beta.is_finite() && beta >= 0.0, || {
            format!("the scalar weight must be finite and >= 0, got {beta}")
        })?;
        self.scalar_weight = beta;
        Ok(self)
    }

    /// The residual `r(x, t) = ∂_t s − ∇_x[½g²(∇·s + ‖s‖²) − ⟨f, s⟩]` per point, shape
    /// `[B, d]` (flattened), still differentiable in the model's parameters.
    ///
    /// `rng` draws the Hutchinson probes (unused with the exact divergence; see
    /// [`Self::residual_with_probes`] to pass none).
    pub fn residual<S: Sde, M: ScoreModel>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: &Tensor,
        rng: &mut dyn RngCore,
    ) -> Result<Tensor> {
        let residual = self.terms(sde, model, x, t, rng)?.residual;
        crate::error::finite_result(residual, "the score-FPE residual", &[("x", x)])
    }

    /// [`Self::residual`] with the Hutchinson probes given rather than drawn: none for the
    /// exact divergence (so no generator is needed), otherwise those of
    /// [`Divergence::draw_probes`] for `x`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use scoresde::autodiff::Divergence;
    /// use scoresde::regularizer::{ScoreFpe, TimeDerivative};
    /// use scoresde::score::{Covariance, GaussianMixture};
    /// use scoresde::sde::VpSde;
    /// let sde = VpSde::default();
    /// let exact = GaussianMixture::new(vec![1.0], vec![vec![0.0, 1.0]], vec![Covariance::Isotropic(0.5)])?
    ///     .diffused(sde);
    /// let fpe = ScoreFpe::new()
    ///     .with_divergence(Divergence::Exact)?
    ///     .with_time_derivative(TimeDerivative::Autodiff)?;
    /// let x = Tensor::new(&[[0.3f64, -0.2]], &Device::Cpu)?;
    /// let t = Tensor::new(&[0.4f64], &Device::Cpu)?;
    /// let r = fpe.residual_with_probes(&sde, &exact, &x, &t, &[])?; // the true score: r = 0
    /// assert!(r.abs()?.max_all()?.to_scalar::<f64>()? < 1e-9);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn residual_with_probes<S: Sde, M: ScoreModel>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: &Tensor,
        probes: &[Tensor],
    ) -> Result<Tensor> {
        let residual = self.terms_with(sde, model, x, t, Probes::Given(probes))?.residual;
        crate::error::finite_result(residual, "the score-FPE residual", &[("x", x)])
    }

    fn terms<S: Sde, M: ScoreModel>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: &Tensor,
        rng: &mut dyn RngCore,
    ) -> Result<FpeTerms> {
        self.terms_with(sde, model, x, t, Probes::Draw(rng))
    }

    fn terms_with<S: Sde, M: ScoreModel>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: &Tensor,
        probes: Probes<'_, '_>,
    ) -> Result<FpeTerms> {
        check_points(x, t)?;
        let x = leaf(&x.detach())?;
        let t_input = match self.time_derivative {
            TimeDerivative::Autodiff => leaf(&t.detach().to_dtype(x.dtype())?)?,
            TimeDerivative::FiniteDifference { .. } => t.detach().to_dtype(x.dtype())?,
        };
        let score = model.score(&x, &t_input)?;
        crate::score::check_score(&score, &x)?;
        let probes = match probes {
            Probes::Draw(rng) => self.divergence.draw_probes(&x, rng)?,
            Probes::Given(given) => {
                self.divergence.check_probes(given)?;
                given.to_vec()
            }
        };
        // With both derivatives by autodiff, one backward pass per coordinate serves both.
        let (divergence, ds_dt) = match (self.divergence, self.time_derivative) {
            (Divergence::Exact, TimeDerivative::Autodiff) => {
                let (divergence, ds_dt) = divergence_and_time_derivative(&score, &x, &t_input)?;
                (divergence, Some(ds_dt))
            }
            _ => (self.divergence.evaluate(&score, &x, &probes)?, None),
        };
        let t_plain = t.detach().to_dtype(x.dtype())?;
        let g = sde.diffusion_tensor(&t_plain)?;
        let a = sde.drift_coeff_tensor(&t_plain)?;
        let s_flat = flatten_batch(&score)?;
        let x_flat = flatten_batch(&x)?;
        // φ = ½g²(∇·s + ‖s‖²) − a⟨x, s⟩
        let half_g2 = (g.sqr()? * 0.5)?;
        let potential = ((&divergence + s_flat.sqr()?.sum(1)?)? * &half_g2)?
            .sub(&((&x_flat * &s_flat)?.sum(1)? * &a)?)?;
        let grad_potential = flatten_batch(&grad(&potential, &x)?)?;
        let ds_dt = match (ds_dt, self.time_derivative) {
            (Some(ds_dt), _) => ds_dt,
            (None, TimeDerivative::Autodiff) => {
                let d = s_flat.dim(1)?;
                let columns = (0..d)
                    .map(|i| {
                        grad(&s_flat.narrow(1, i, 1)?, &t_input)?
                            .unsqueeze(1)
                            .map_err(Error::from)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&columns, 1)?
            }
            (None, TimeDerivative::FiniteDifference { hs, hd }) => flatten_batch(
                &time_derivative_fd_within(model, &x, &t_plain, hs, hd, sde.end_time())?,
            )?,
        };
        Ok(FpeTerms {
            residual: (ds_dt - grad_potential)?,
            potential,
            diffusion: g,
        })
    }
}

/// Where the Hutchinson probes of one evaluation come from.
enum Probes<'p, 'r> {
    Draw(&'r mut dyn RngCore),
    Given(&'p [Tensor]),
}

impl<S: Sde, M: ScoreModel> Regularizer<S, M> for ScoreFpe {
    fn penalty(&self, sde: &S, model: &M, x_t: &Tensor, t: &Tensor, rng: &mut dyn RngCore) -> Result<Tensor> {
        let terms = self.terms(sde, model, x_t, t, rng)?;
        let d = terms.residual.dim(1)? as f64;
        let squared_norm = terms.residual.sqr()?.sum(1)?;
        // ‖r‖^m; for m = 2 skip the sqrt, whose gradient is infinite at r = 0.
        let powered = if self.power == 2.0 {
            squared_norm
        } else {
            squared_norm.sqrt()?.powf(self.power)?
        };
        let weighted = match self.weighting {
            TimeWeighting::Constant => powered,
            TimeWeighting::Diffusion => (powered * &terms.diffusion)?,
            TimeWeighting::DiffusionSquared => (powered * terms.diffusion.sqr()?)?,
        };
        let mut penalty = weighted.mean_all()?;
        if self.normalize {
            penalty = (penalty / d.powf(self.power))?;
        }
        if self.scalar_weight > 0.0 {
            let scalar = terms.potential.sqr()?.sum_all()?.sqrt()?;
            penalty = (penalty + (scalar * self.scalar_weight)?)?;
        }
        Ok(penalty)
    }

    /// Weights `w(t)/(B·d^m)` with `m = 2`, when the penalty has the squared form: power
    /// 2, no scalar term, exact divergence, autodiff `∂ₜs` (which draw nothing from `rng`).
    fn penalty_terms(
        &self,
        sde: &S,
        x_t: &Tensor,
        t: &Tensor,
        _rng: &mut dyn RngCore,
    ) -> Result<Option<PenaltyTerms>> {
        if self.power != 2.0
            || self.scalar_weight != 0.0
            || self.divergence != Divergence::Exact
            || self.time_derivative != TimeDerivative::Autodiff
        {
            return Ok(None);
        }
        check_points(x_t, t)?;
        let batch = x_t.dim(0)? as f64;
        let d = x_t.elem_count() as f64 / batch;
        let scale = if self.normalize { batch * d * d } else { batch };
        let g = sde.diffusion_tensor(t)?;
        let weight = match self.weighting {
            TimeWeighting::Constant => t.ones_like()?,
            TimeWeighting::Diffusion => g.clone(),
            TimeWeighting::DiffusionSquared => g.sqr()?,
        };
        Ok(Some(PenaltyTerms::ScoreFpe(ScoreFpeTerms {
            weight: (weight / scale)?,
            diffusion_squared: g.sqr()?,
            drift: sde.drift_coeff_tensor(t)?,
        })))
    }
}

/// Checks collocation points: `x` of shape `[B, …]`, `t` of shape `[B]`, finite, float.
pub(crate) fn check_points(x: &Tensor, t: &Tensor) -> Result<()> {
    crate::solver::check_start(x)?;
    per_sample(t, x)?;
    if !t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?.is_finite() {
        return Err(Error::NonFinite("times contain NaN or infinity".into()));
    }
    Ok(())
}
