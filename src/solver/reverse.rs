//! Reverse-time SDE samplers: predictors, correctors and their composition.

use candle_core::Tensor;
use rand::Rng;

use super::{check_start, time_like, Counted, Sampler, Samples, SolverStats, StepSchedule};
use crate::error::{ensure, ensure_positive};
use crate::random::standard_normal;
use crate::sde::{AncestralSde, Sde};
use crate::{Result, ScoreModel};

/// One step of a reverse-time sampler from `t` to `t − dt`, for the SDEs `S` it supports.
pub trait Predictor<S: Sde> {
    /// Steps `x` from `t` to `t − dt`. With `add_noise = false` it returns the mean of the
    /// step (used on the last step, as score_sde does).
    #[allow(clippy::too_many_arguments)]
    fn step<M: ScoreModel, R: Rng + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: f64,
        dt: f64,
        add_noise: bool,
        rng: &mut R,
    ) -> Result<Tensor>;
}

/// A Markov chain Monte Carlo move that leaves `p_t` (approximately) invariant.
pub trait Corrector {
    /// Refines `x` at time `t`; `dt` is the size of the predictor step it accompanies.
    fn correct<S: Sde, M: ScoreModel, R: Rng + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: f64,
        dt: f64,
        rng: &mut R,
    ) -> Result<Tensor>;
}

/// Euler–Maruyama on `dx = [f − ½(1+λ²) g² s] dt + λ g dw̄`.
///
/// `λ = 1` (the default) is the reverse SDE, `λ = 0` the probability-flow ODE with Euler
/// steps; every `λ` has the same marginals for the true score.
///
/// ```
/// use scoresde::solver::EulerMaruyama;
/// let sde_like = EulerMaruyama::new();
/// let ode_like = EulerMaruyama::with_lambda(0.0)?;
/// assert_eq!((sde_like.lambda(), ode_like.lambda()), (1.0, 0.0));
/// assert!(EulerMaruyama::with_lambda(-1.0).is_err());
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EulerMaruyama {
    lambda: f64,
}

impl EulerMaruyama {
    /// The reverse SDE (`λ = 1`).
    pub fn new() -> Self {
        Self { lambda: 1.0 }
    }

    /// The member `λ ≥ 0` of the family between the ODE (`0`) and the SDE (`1`).
    pub fn with_lambda(lambda: f64) -> Result<Self> {
        ensure(lambda.is_finite() && lambda >= 0.0, || {
            format!("lambda must be finite and >= 0, got {lambda}")
        })?;
        Ok(Self { lambda })
    }

    /// `λ`.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }
}

impl Default for EulerMaruyama {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Sde> Predictor<S> for EulerMaruyama {
    fn step<M: ScoreModel, R: Rng + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: f64,
        dt: f64,
        add_noise: bool,
        rng: &mut R,
    ) -> Result<Tensor> {
        let g2 = sde.diffusion(t).powi(2);
        let score = model.score(x, &time_like(t, x)?)?;
        // x − [a x − ½(1+λ²)g² s]·dt
        let mean = ((x * (1.0 - sde.drift_coeff(t) * dt))?
            + (score * (0.5 * (1.0 + self.lambda.powi(2)) * g2 * dt))?)?;
        if !add_noise || self.lambda == 0.0 {
            return Ok(mean);
        }
        let noise = standard_normal(x.shape(), x.dtype(), x.device(), rng)?;
        Ok((mean + (noise * (self.lambda * g2.sqrt() * dt.sqrt()))?)?)
    }
}

/// The reverse-diffusion predictor: the reverse of the SDE's own discretization
/// ([`Sde::discretize`]), `x ← x − c·x + G²s + G z`.
///
/// ```
/// use scoresde::solver::{PredictorCorrector, ReverseDiffusion};
/// let sampler = PredictorCorrector::new(ReverseDiffusion, 1000);
/// # let _ = sampler;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReverseDiffusion;

impl<S: Sde> Predictor<S> for ReverseDiffusion {
    fn step<M: ScoreModel, R: Rng + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: f64,
        dt: f64,
        add_noise: bool,
        rng: &mut R,
    ) -> Result<Tensor> {
        let step = sde.discretize(t, dt);
        let score = model.score(x, &time_like(t, x)?)?;
        let mean = ((x * (1.0 - step.drift_coeff))? + (score * step.diffusion.powi(2))?)?;
        if !add_noise {
            return Ok(mean);
        }
        let noise = standard_normal(x.shape(), x.dtype(), x.device(), rng)?;
        Ok((mean + (noise * step.diffusion)?)?)
    }
}

/// Ancestral sampling: the exact reverse step of the SDE's discrete chain (DDPM for VP,
/// SMLD for VE). Only SDEs that implement [`AncestralSde`] accept it.
///
/// ```
/// use scoresde::solver::{Ancestral, PredictorCorrector};
/// let sampler = PredictorCorrector::new(Ancestral, 1000);
/// # let _ = sampler;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ancestral;

impl<S: AncestralSde> Predictor<S> for Ancestral {
    fn step<M: ScoreModel, R: Rng + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: f64,
        dt: f64,
        add_noise: bool,
        rng: &mut R,
    ) -> Result<Tensor> {
        let score = model.score(x, &time_like(t, x)?)?;
        let (mean, std) = sde.ancestral_step(x, &score, t, dt)?;
        if !add_noise {
            return Ok(mean);
        }
        let noise = standard_normal(x.shape(), x.dtype(), x.device(), rng)?;
        Ok((mean + (noise * std)?)?)
    }
}

/// No correction: the predictor alone.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NoCorrector;

impl Corrector for NoCorrector {
    fn correct<S: Sde, M: ScoreModel, R: Rng + ?Sized>(
        &self,
        _sde: &S,
        _model: &M,
        x: &Tensor,
        _t: f64,
        _dt: f64,
        _rng: &mut R,
    ) -> Result<Tensor> {
        Ok(x.clone())
    }
}

/// The Langevin corrector of score_sde: `steps` moves
/// `x ← x + ε_L s + √(2ε_L) z` with `ε_L = 2α_i(r‖z‖/‖s‖)²`, where `r` is the
/// signal-to-noise ratio and `α_i` is [`Sde::langevin_alpha`].
///
/// score_sde uses `r = 0.16` for VE and `0.01`–`0.17` for VP.
///
/// ```
/// use scoresde::solver::Langevin;
/// let corrector = Langevin::new(0.16, 1)?;
/// assert!(Langevin::new(0.0, 1).is_err());
/// # let _ = corrector;
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Langevin {
    snr: f64,
    steps: usize,
}

impl Langevin {
    /// A corrector with signal-to-noise ratio `snr > 0` and `steps ≥ 1` moves per time.
    pub fn new(snr: f64, steps: usize) -> Result<Self> {
        ensure_positive("snr", snr)?;
        ensure(steps > 0, || {
            "the Langevin corrector needs at least one step".into()
        })?;
        Ok(Self { snr, steps })
    }
}

impl Corrector for Langevin {
    fn correct<S: Sde, M: ScoreModel, R: Rng + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: f64,
        dt: f64,
        rng: &mut R,
    ) -> Result<Tensor> {
        let alpha = sde.langevin_alpha(t, dt);
        // VP's α = 1 − β(t)·dt turns negative on coarse grids, and √(2·step) would be NaN.
        ensure(alpha > 0.0, || {
            format!(
                "the Langevin corrector's step factor 1 - beta(t)*dt = {alpha} is not positive at t = {t} \
                 (dt = {dt}): use more steps, so that beta(t)*dt < 1"
            )
        })?;
        let times = time_like(t, x)?;
        let mut x = x.clone();
        for _ in 0..self.steps {
            let score = model.score(&x, &times)?;
            let noise = standard_normal(x.shape(), x.dtype(), x.device(), rng)?;
            let score_norm = mean_norm(&score)?;
            let noise_norm = mean_norm(&noise)?;
            // A vanishing score means there is nothing to correct.
            if score_norm == 0.0 {
                continue;
            }
            let step = 2.0 * alpha * (self.snr * noise_norm / score_norm).powi(2);
            x = ((&x + (score * step)?)? + (noise * (2.0 * step).sqrt())?)?;
        }
        Ok(x)
    }
}

/// Mean over the batch of the per-sample Euclidean norm.
fn mean_norm(x: &Tensor) -> Result<f64> {
    let flat = x.flatten_from(1)?.to_dtype(candle_core::DType::F64)?;
    Ok(flat.sqr()?.sum(1)?.sqrt()?.mean_all()?.to_scalar::<f64>()?)
}

/// A reverse-time sampler: at each time, a corrector then a predictor step (score_sde's
/// order); the last predictor step adds no noise.
///
/// ```
/// use scoresde::solver::{EulerMaruyama, Langevin, PredictorCorrector, ReverseDiffusion};
/// let em = PredictorCorrector::euler_maruyama(1000);
/// let pc = PredictorCorrector::new(ReverseDiffusion, 1000).with_corrector(Langevin::new(0.16, 1)?);
/// let ode_like = PredictorCorrector::new(EulerMaruyama::with_lambda(0.0)?, 1000).with_eps(1e-5)?;
/// # let _ = (em, pc, ode_like);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PredictorCorrector<P, C = NoCorrector> {
    predictor: P,
    corrector: C,
    schedule: StepSchedule,
    eps: f64,
    denoise: bool,
}

/// score_sde's end time for sampling.
pub const DEFAULT_SAMPLING_EPS: f64 = 1e-3;

impl<P> PredictorCorrector<P, NoCorrector> {
    /// `predictor` alone on `schedule` (a number of uniform steps or a [`TimeGrid`](super::TimeGrid)),
    /// from `T` to `ε = 1e-3`.
    pub fn new(predictor: P, schedule: impl Into<StepSchedule>) -> Self {
        Self {
            predictor,
            corrector: NoCorrector,
            schedule: schedule.into(),
            eps: DEFAULT_SAMPLING_EPS,
            denoise: false,
        }
    }
}

impl PredictorCorrector<EulerMaruyama, NoCorrector> {
    /// Euler–Maruyama on the reverse SDE with `schedule` steps.
    pub fn euler_maruyama(schedule: impl Into<StepSchedule>) -> Self {
        Self::new(EulerMaruyama::new(), schedule)
    }
}

impl<P, C> PredictorCorrector<P, C> {
    /// The same sampler with a corrector.
    pub fn with_corrector<C2: Corrector>(self, corrector: C2) -> PredictorCorrector<P, C2> {
        PredictorCorrector {
            predictor: self.predictor,
            corrector,
            schedule: self.schedule,
            eps: self.eps,
            denoise: self.denoise,
        }
    }

    /// The same sampler, returning the denoised `x̂₀ = (x + σ(ε)²s)/α(ε)` at the end
    /// (score_sde's `noise_removal`; one more evaluation).
    ///
    /// ```
    /// let em = scoresde::solver::PredictorCorrector::euler_maruyama(1000).with_denoise(true);
    /// # let _ = em;
    /// ```
    pub fn with_denoise(mut self, denoise: bool) -> Self {
        self.denoise = denoise;
        self
    }

    /// The same sampler ending at `ε > 0` (ignored when the schedule is an explicit grid,
    /// which carries its own end).
    pub fn with_eps(mut self, eps: f64) -> Result<Self> {
        ensure_positive("eps", eps)?;
        self.eps = eps;
        Ok(self)
    }
}

impl<S: Sde, P: Predictor<S>, C: Corrector> Sampler<S> for PredictorCorrector<P, C> {
    fn sample<M: ScoreModel, R: Rng + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        x_end: &Tensor,
        rng: &mut R,
    ) -> Result<Samples> {
        check_start(x_end)?;
        let grid = match &self.schedule {
            StepSchedule::Grid(grid) => {
                grid.check_sampling(sde.end_time())?;
                grid.clone()
            }
            uniform => {
                let grid = uniform.resolve(sde.end_time(), self.eps)?;
                grid.check_reverse()?;
                grid
            }
        };
        // Samples are never differentiated: models may skip building a graph.
        let _inference = crate::kernels::InferenceScope::enter();
        let model = Counted::new(model);
        let times = grid.times();
        let mut x = x_end.detach();
        for (i, w) in times.windows(2).enumerate() {
            let (t, dt) = (w[0], w[0] - w[1]);
            x = self.corrector.correct(sde, &model, &x, t, dt, rng)?.detach();
            let last = i + 2 == times.len();
            // Detached, so that a model with trainable weights does not keep every step's
            // graph alive (samples are not differentiable in the weights).
            x = self.predictor.step(sde, &model, &x, t, dt, !last, rng)?.detach();
            super::check_state(&x, t, i)?;
        }
        if self.denoise {
            x = super::denoise(sde, &model, &x, grid.end())?;
        }
        Ok(Samples {
            x,
            stats: SolverStats {
                nfe: model.calls(),
                accepted_steps: grid.steps(),
                rejected_steps: 0,
            },
        })
    }
}
