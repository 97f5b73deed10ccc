//! Log-likelihoods and bits per dimension through the probability-flow ODE.
//!
//! Integrating the probability-flow ODE `dx/dt = f̃(x, t) = f − ½g²s` from `ε` to `T`
//! together with `dℓ/dt = ∇·f̃ = a(t)·d − ½g(t)²∇·s` gives (MATH.md §6)
//!
//! ```text
//! log p_ε(x) = log p_T(x(T)) + ℓ(T).
//! ```
//!
//! The divergence is exact (`d` backward passes) or a Hutchinson–Skilling estimate with one
//! fixed probe per sample for the whole solve ([`Divergence`]). As in score_sde, the prior
//! `N(0, vI)` stands in for the true `p_T`; the two differ by `O(α(T))` (VP with the
//! default schedule: α(1) ≈ 0.0066), which bounds how exact any such likelihood can be. [`Likelihood`] also encodes data
//! to its latent `x(T)` and decodes latents back, through the same ODE.
//!
//! ```
//! use candle_core::{DType, Device};
//! use rand::{rngs::StdRng, SeedableRng};
//! use scoresde::likelihood::Likelihood;
//! use scoresde::score::{Covariance, GaussianMixture, LogDensityModel};
//! use scoresde::sde::VpSde;
//!
//! // N(0, I) is left invariant by the VP SDE, so here the prior is exactly p_T.
//! let data = GaussianMixture::new(vec![1.0], vec![vec![0.0, 0.0]], vec![Covariance::Isotropic(1.0)])?;
//! let exact = data.diffused(VpSde::default());
//! let mut rng = StdRng::seed_from_u64(0);
//! let x = data.sample(4, DType::F64, &Device::Cpu, &mut rng)?;
//!
//! let estimate = Likelihood::new().evaluate(&VpSde::default(), &exact, &x, &mut rng)?;
//! // The ODE's log-density matches the analytic log p_ε(x).
//! let t = candle_core::Tensor::full(1e-5f64, 4, &Device::Cpu)?;
//! let truth = exact.log_density(&x, &t)?;
//! let gap = (estimate.log_density - truth)?.abs()?.max(0)?.to_scalar::<f64>()?;
//! assert!(gap < 1e-3);
//! # Ok::<(), scoresde::Error>(())
//! ```

use candle_core::{DType, Tensor};
use rand::Rng;

use crate::autodiff::{leaf, Divergence};
use crate::error::{ensure, ensure_positive};
use crate::sde::Sde;
use crate::solver::{OdeSolution, OdeSolver, OdeSystem, ProbabilityFlow, Rk45};
use crate::{Error, Result, ScoreModel};

/// Uniform dequantization of discrete data (score_sde's evaluation of 8-bit images).
///
/// Data `x` are given in `[0, 1]` as multiples of `1/(levels − 1)` (other values are an
/// error: divide raw 8-bit data by 255); each evaluation draws
/// `u ~ U[0, 1)` and feeds the model `scale·(x(levels − 1) + u)/levels + shift`. Bits per
/// dimension then measure the discrete data: `−log p/(d ln 2) − log₂ scale + log₂ levels`.
///
/// ```
/// use scoresde::likelihood::Dequantization;
/// let plain = Dequantization::eight_bit(); // model sees [0, 1)
/// let centered = Dequantization::eight_bit().centered(); // model sees [-1, 1)
/// assert_eq!(centered.bits_offset(), 7.0);
/// assert_eq!(plain.bits_offset(), 8.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dequantization {
    levels: usize,
    scale: f64,
    shift: f64,
}

impl Dequantization {
    /// 8-bit data (256 levels), model space `[0, 1)`.
    pub fn eight_bit() -> Self {
        Self {
            levels: 256,
            scale: 1.0,
            shift: 0.0,
        }
    }

    /// `levels ≥ 2` discrete levels, model space `[0, 1)`.
    ///
    /// ```
    /// assert!(scoresde::likelihood::Dequantization::with_levels(1).is_err());
    /// ```
    pub fn with_levels(levels: usize) -> Result<Self> {
        ensure(levels >= 2, || {
            format!("dequantization needs at least 2 levels, got {levels}")
        })?;
        Ok(Self {
            levels,
            ..Self::eight_bit()
        })
    }

    /// The same, for a model trained on data scaled to `[-1, 1)` (score_sde's centered data).
    pub fn centered(self) -> Self {
        Self {
            scale: 2.0,
            shift: -1.0,
            ..self
        }
    }

    /// What is added to the continuous bits per dimension: `log₂ levels − log₂ scale`.
    pub fn bits_offset(&self) -> f64 {
        (self.levels as f64).log2() - self.scale.log2()
    }

    fn apply<R: Rng + ?Sized>(&self, x: &Tensor, rng: &mut R) -> Result<Tensor> {
        // The data enter here: outside [0, 1] the bits per dimension are meaningless (raw
        // 0..255 pixels gave 210,139 bits/dim).
        let values = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let (low, high) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        ensure(values.iter().all(|v| (0.0..=1.0).contains(v)), || {
            format!(
                "dequantization expects data in [0, 1] (multiples of 1/{}), got values in [{low}, {high}]; \
                 divide raw integer data by {} first",
                self.levels - 1,
                self.levels - 1
            )
        })?;
        let u = crate::random::uniform(x.shape(), 0.0, 1.0, x.dtype(), x.device(), rng)?;
        let levels = self.levels as f64;
        let deq = ((x * (levels - 1.0))? + u)?;
        Ok(deq.affine(self.scale / levels, self.shift)?)
    }
}

/// A likelihood evaluation: per-sample log-density, bits per dimension, the latent
/// `x(T)` and the cost.
#[derive(Debug, Clone)]
pub struct LikelihoodEstimate {
    /// `log p_ε(x)` per sample (of the dequantized, model-space data when dequantizing), `[B]`, f64.
    pub log_density: Tensor,
    /// Bits per dimension per sample, `[B]`, f64.
    pub bits_per_dim: Tensor,
    /// The latent `x(T)`, shaped like `x`.
    pub latent: Tensor,
    /// Score evaluations (each one also costs the divergence's backward passes).
    pub nfe: usize,
}

/// Likelihood through the probability-flow ODE: settings and the computations.
///
/// The defaults follow score_sde: RK45 with `rtol = atol = 1e-5`, starting at
/// `ε = 1e-5`, exact trace.
///
/// The trace `∇·s` needs first-order input gradients only, so a plain score model runs
/// without `CANDLE_GRAD_DO_NOT_DETACH`. A potential model's score
/// ([`GradientScore`](crate::GradientScore)) is itself a gradient and its divergence a
/// second derivative: that needs the variable, and returns
/// [`Error::HigherOrderGradientsUnavailable`] without it.
///
/// ```
/// use scoresde::autodiff::{Divergence, Probe};
/// use scoresde::likelihood::Likelihood;
/// use scoresde::solver::Rk45;
/// let fast = Likelihood::new()
///     .with_solver(Rk45::new(1e-4, 1e-4)?)
///     .with_divergence(Divergence::Hutchinson { probe: Probe::Rademacher, probes: 1 })?;
/// # let _ = fast;
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Likelihood<O = Rk45> {
    solver: O,
    eps: f64,
    divergence: Divergence,
    dequantization: Option<Dequantization>,
}

/// score_sde's starting time for likelihoods.
pub const DEFAULT_LIKELIHOOD_EPS: f64 = 1e-5;

impl Likelihood<Rk45> {
    /// score_sde's settings: RK45 (`rtol = atol = 1e-5`), `ε = 1e-5`, exact divergence.
    pub fn new() -> Self {
        Self {
            solver: Rk45::default(),
            eps: DEFAULT_LIKELIHOOD_EPS,
            divergence: Divergence::Exact,
            dequantization: None,
        }
    }
}

impl Default for Likelihood<Rk45> {
    fn default() -> Self {
        Self::new()
    }
}

impl<O: OdeSolver> Likelihood<O> {
    /// The same settings with another ODE solver.
    pub fn with_solver<O2: OdeSolver>(self, solver: O2) -> Likelihood<O2> {
        Likelihood {
            solver,
            eps: self.eps,
            divergence: self.divergence,
            dequantization: self.dequantization,
        }
    }

    /// Starts the ODE at `ε > 0` instead of `1e-5`.
    pub fn with_eps(mut self, eps: f64) -> Result<Self> {
        ensure_positive("eps", eps)?;
        self.eps = eps;
        Ok(self)
    }

    /// Chooses how `∇·s` is computed (Hutchinson probes stay fixed for the whole solve).
    pub fn with_divergence(mut self, divergence: Divergence) -> Result<Self> {
        divergence.validate()?;
        self.divergence = divergence;
        Ok(self)
    }

    /// Dequantizes discrete data before evaluating it.
    pub fn with_dequantization(mut self, dequantization: Dequantization) -> Self {
        self.dequantization = Some(dequantization);
        self
    }

    /// Log-density and bits per dimension of each sample of `x` (shape `[B, …]`).
    ///
    /// `rng` draws the Hutchinson probes and the dequantization noise; with the exact trace
    /// and no dequantization the result is deterministic.
    pub fn evaluate<S: Sde, M: ScoreModel, R: Rng + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        rng: &mut R,
    ) -> Result<LikelihoodEstimate> {
        self.check(sde, x)?;
        let x = match &self.dequantization {
            Some(d) => d.apply(x, rng)?,
            None => x.clone(),
        };
        let (b, d) = (x.dim(0)?, x.elem_count() / x.dim(0)?);
        let system = AugmentedFlow {
            sde,
            model,
            shape: x.dims().to_vec(),
            divergence: self.divergence,
            probes: self.divergence.draw_probes(&x, rng)?,
        };
        let start = Tensor::cat(
            &[
                &x.reshape((b, d))?,
                &Tensor::zeros((b, 1), x.dtype(), x.device())?,
            ],
            1,
        )?;
        let solution = self.solver.solve(&system, &start, self.eps, sde.end_time())?;
        let end = solution.y.to_dtype(DType::F64)?;
        let latent = end.narrow(1, 0, d)?;
        let delta = end.narrow(1, d, 1)?.squeeze(1)?;
        let log_density = (sde.prior_log_prob(&latent)? + delta)?;
        // Points far beyond the data's scale have log-densities f64 cannot hold (|x|² of
        // x ~ 1e300): an error, not −inf.
        let values = log_density.to_vec1::<f64>()?;
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite(format!(
                "the log-density of sample {i} is {v}: the point is too far from the model's data \
                 (or the ODE blew up) for f64"
            )));
        }
        let offset = self.dequantization.map_or(0.0, |q| q.bits_offset());
        let bits_per_dim = log_density.affine(-1.0 / (d as f64 * std::f64::consts::LN_2), offset)?;
        Ok(LikelihoodEstimate {
            log_density,
            bits_per_dim,
            latent: latent.to_dtype(x.dtype())?.reshape(x.shape())?,
            nfe: solution.stats.nfe,
        })
    }

    /// Encodes data at time `ε` to its latent `x(T)` along the probability-flow ODE.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use scoresde::likelihood::Likelihood;
    /// use scoresde::score::{Covariance, GaussianMixture};
    /// use scoresde::sde::VpSde;
    /// let sde = VpSde::default();
    /// let m = GaussianMixture::new(vec![1.0], vec![vec![0.5, 0.5]], vec![Covariance::Isotropic(0.2)])?;
    /// let exact = m.diffused(sde);
    /// let x = Tensor::new(&[[0.3f64, 0.9], [1.0, 0.0]], &Device::Cpu)?;
    /// let flow = Likelihood::new();
    /// let z = flow.encode(&sde, &exact, &x)?.y;
    /// let back = flow.decode(&sde, &exact, &z)?.y;
    /// assert!((back - &x)?.abs()?.max_keepdim(0)?.max(1)?.to_vec1::<f64>()?[0] < 1e-4);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn encode<S: Sde, M: ScoreModel>(&self, sde: &S, model: &M, x: &Tensor) -> Result<OdeSolution> {
        self.check(sde, x)?;
        self.solver
            .solve(&ProbabilityFlow::new(sde, model), x, self.eps, sde.end_time())
    }

    /// Decodes a latent `x(T)` back to data at time `ε` (the inverse of [`Self::encode`]).
    pub fn decode<S: Sde, M: ScoreModel>(&self, sde: &S, model: &M, z: &Tensor) -> Result<OdeSolution> {
        self.check(sde, z)?;
        self.solver
            .solve(&ProbabilityFlow::new(sde, model), z, sde.end_time(), self.eps)
    }

    fn check<S: Sde>(&self, sde: &S, x: &Tensor) -> Result<()> {
        crate::solver::check_start(x)?;
        ensure(self.eps < sde.end_time(), || {
            format!(
                "eps ({}) must be below the SDE's end time ({})",
                self.eps,
                sde.end_time()
            )
        })
    }
}

/// The augmented probability-flow ODE on `[x, ℓ]`, flattened to `[B, d + 1]`.
struct AugmentedFlow<'a, S, M> {
    sde: &'a S,
    model: &'a M,
    /// The shape of `x` as the model expects it.
    shape: Vec<usize>,
    divergence: Divergence,
    /// Fixed for the whole solve (Hutchinson–Skilling).
    probes: Vec<Tensor>,
}

impl<S: Sde, M: ScoreModel> OdeSystem for AugmentedFlow<'_, S, M> {
    fn derivative(&self, t: f64, y: &Tensor) -> Result<Tensor> {
        let (b, d1) = y.dims2()?;
        let d = d1 - 1;
        let x = leaf(&y.narrow(1, 0, d)?.reshape(self.shape.as_slice())?)?;
        let times = crate::solver::time_like(t, &x)?;
        let score = self.model.score(&x, &times)?;
        crate::score::check_score(&score, &x)?;
        // Read, not trained through: first order is enough, unless the score is itself a
        // gradient, and then the model (GradientScore) checks second order for itself.
        let divergence = self.divergence.evaluate_first_order(&score, &x, &self.probes)?;
        let (a, g2) = (self.sde.drift_coeff(t), self.sde.diffusion(t).powi(2));
        let drift = ((x.detach() * a)? - (score.detach() * (0.5 * g2))?)?.reshape((b, d))?;
        let trace = divergence
            .detach()
            .affine(-0.5 * g2, a * d as f64)?
            .reshape((b, 1))?;
        Ok(Tensor::cat(&[drift, trace.to_dtype(y.dtype())?], 1)?)
    }
}
