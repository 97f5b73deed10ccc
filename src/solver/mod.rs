//! Sampling: reverse-time SDE samplers and probability-flow ODE solvers.
//!
//! Every sampler implements [`Sampler`]: start from prior draws `x_T` and integrate back to
//! a small time `ε`, for any [`Sde`] and any [`ScoreModel`].
//!
//! * SDE samplers are [`PredictorCorrector`] compositions of a [`Predictor`]
//!   ([`EulerMaruyama`], [`ReverseDiffusion`], [`Ancestral`]) with a [`Corrector`]
//!   ([`Langevin`] or [`NoCorrector`]). [`EulerMaruyama`] has a parameter `λ` that moves
//!   between the probability-flow ODE (`λ = 0`) and the reverse SDE (`λ = 1`).
//! * ODE samplers are an [`OdeSampler`] around an [`OdeSolver`] ([`Euler`], [`Heun`],
//!   adaptive [`Rk45`]) applied to the [`ProbabilityFlow`] vector field. The solvers work on
//!   any [`OdeSystem`], which the likelihood code reuses.
//!
//! * Few-step samplers are a [`FewStep`] running a [`Method`] (DPM-Solver++ 2M/3M,
//!   SDE-DPM-Solver++ 2M, DPM-Solver-2/3, UniPC, EDM's Heun) on a grid spaced by a
//!   [`Spacing`] (log-SNR, Karras, quadratic, uniform); [`AdaptiveSde`] is the adaptive
//!   reverse-SDE solver of Jolicoeur-Martineau et al. (2021).
//!
//! Every sampler returns an [`Error::NonFinite`] when its state
//! blows up, and reports how many score evaluations it used.
//!
//! ```
//! use candle_core::{DType, Device};
//! use rand::{rngs::StdRng, SeedableRng};
//! use scoresde::score::{Covariance, GaussianMixture};
//! use scoresde::sde::{Sde, VpSde};
//! use scoresde::solver::{OdeSampler, PredictorCorrector, Rk45, Sampler};
//!
//! let sde = VpSde::default();
//! let data = GaussianMixture::new(vec![1.0], vec![vec![2.0, -1.0]], vec![Covariance::Isotropic(0.25)])?;
//! let exact = data.diffused(sde); // the exact score of the diffused data
//! let mut rng = StdRng::seed_from_u64(0);
//! let x_t = sde.sample_prior((500, 2), DType::F64, &Device::Cpu, &mut rng)?;
//!
//! let sde_samples = PredictorCorrector::euler_maruyama(500).sample(&sde, &exact, &x_t, &mut rng)?;
//! let ode_samples = OdeSampler::new(Rk45::new(1e-5, 1e-5)?).sample(&sde, &exact, &x_t, &mut rng)?;
//! for s in [&sde_samples, &ode_samples] {
//!     let mean = s.x.mean(0)?.to_vec1::<f64>()?;
//!     assert!((mean[0] - 2.0).abs() < 0.1 && (mean[1] + 1.0).abs() < 0.1);
//! }
//! assert_eq!(sde_samples.stats.nfe, 500);
//! # Ok::<(), scoresde::Error>(())
//! ```

mod adaptive;
mod fewstep;
mod grid;
mod ode;
mod reverse;

pub use adaptive::AdaptiveSde;
pub use fewstep::{Churn, FewStep, Method};
pub use grid::{Spacing, StepSchedule, TimeGrid, MAX_GRID_STEPS};
pub use ode::{Euler, Heun, OdeSampler, OdeSolution, OdeSolver, OdeSystem, ProbabilityFlow, Rk45};
pub use reverse::{
    Ancestral, Corrector, EulerMaruyama, Langevin, NoCorrector, Predictor, PredictorCorrector,
    ReverseDiffusion,
};

use std::cell::Cell;

use candle_core::{DType, Tensor};
use rand::Rng;

use crate::sde::Sde;
use crate::{Error, Result, ScoreModel};

/// What a solver did: function evaluations and steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SolverStats {
    /// Number of evaluations of the score (or, for a plain ODE, of its vector field).
    pub nfe: usize,
    /// Steps taken (for adaptive solvers: accepted steps).
    pub accepted_steps: usize,
    /// Steps an adaptive solver rejected and retried with a smaller step.
    pub rejected_steps: usize,
}

/// Samples produced by a [`Sampler`], with the solver's statistics.
#[derive(Debug, Clone)]
pub struct Samples {
    /// The samples, shaped like the starting points.
    pub x: Tensor,
    /// What it cost.
    pub stats: SolverStats,
}

/// A procedure that turns prior draws `x_T` into samples at time `ε` for a given SDE and
/// score model. See the [module docs](self) for the samplers on offer.
///
/// The SDE type is a parameter so that samplers which need more than [`Sde`] (ancestral
/// sampling needs an [`AncestralSde`](crate::sde::AncestralSde)) are checked at compile time.
pub trait Sampler<S: Sde> {
    /// Integrates from the SDE's end time `T` back to the sampler's `ε`, starting at
    /// `x_end` (shape `[B, …]`). Deterministic samplers ignore `rng`.
    fn sample<M: ScoreModel, R: Rng + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        x_end: &Tensor,
        rng: &mut R,
    ) -> Result<Samples>;
}

/// A score model that counts its evaluations.
pub(crate) struct Counted<'a, M> {
    inner: &'a M,
    calls: Cell<usize>,
}

impl<'a, M: ScoreModel> Counted<'a, M> {
    pub(crate) fn new(inner: &'a M) -> Self {
        Self {
            inner,
            calls: Cell::new(0),
        }
    }
    pub(crate) fn calls(&self) -> usize {
        self.calls.get()
    }
}

impl<M: ScoreModel> ScoreModel for Counted<'_, M> {
    fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        self.inner.score(x, t)
    }
}

/// The time `t` repeated once per sample of `x`, in `x`'s dtype: shape `[B]`.
pub(crate) fn time_like(t: f64, x: &Tensor) -> Result<Tensor> {
    Ok(Tensor::full(t, x.dim(0)?, x.device())?.to_dtype(x.dtype())?)
}

pub(crate) use crate::error::ensure_finite;

/// `Error::NonFinite` naming the time and step unless a sampler's state is finite.
pub(crate) fn check_state(x: &Tensor, t: f64, i: usize) -> Result<()> {
    ensure_finite(x, || format!("the sampler's state blew up at t = {t} (step {i})"))
}

/// Rejects starting points that are not a batch or not finite.
pub(crate) fn check_start(x: &Tensor) -> Result<()> {
    if x.rank() < 2 || x.dim(0)? == 0 {
        return Err(Error::Shape(format!(
            "starting points must have shape [B, ...] with B > 0 and at least 2 dimensions, got {:?}",
            x.dims()
        )));
    }
    if !matches!(x.dtype(), DType::F16 | DType::BF16 | DType::F32 | DType::F64) {
        return Err(Error::Shape(format!(
            "starting points must be floating point, got {:?}",
            x.dtype()
        )));
    }
    ensure_finite(x, || "the starting points contain NaN or infinity".into())
}

/// The denoising step `x̂₀ = (x + σ(t)²s)/α(t)` (score_sde's `noise_removal`).
pub(crate) fn denoise<S: Sde, M: ScoreModel>(sde: &S, model: &M, x: &Tensor, t: f64) -> Result<Tensor> {
    let score = model.score(x, &time_like(t, x)?)?;
    let x0 = sde.data_prediction(x, &score, t)?.detach();
    ensure_finite(&x0, || format!("the denoised samples are not finite (t = {t})"))?;
    Ok(x0)
}
