//! Ordinary differential equations: Euler, Heun, adaptive Dormand–Prince RK45, and the
//! probability-flow ODE as a sampler.

use candle_core::{DType, Tensor};
use rand::Rng;

use super::{check_start, ensure_finite, time_like, Sampler, Samples, SolverStats, StepSchedule};
use crate::error::{ensure, ensure_positive};
use crate::sde::Sde;
use crate::{Error, Result, ScoreModel};

/// A vector field `dy/dt = F(t, y)` on tensors. Closures `Fn(f64, &Tensor) -> Result<Tensor>`
/// are ODE systems.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::solver::{OdeSolver, Rk45};
/// // dy/dt = -y, y(0) = 1  =>  y(1) = e^{-1}
/// let decay = |_t: f64, y: &Tensor| Ok(y.neg()?);
/// let y0 = Tensor::new(&[[1.0f64]], &Device::Cpu)?;
/// let sol = Rk45::new(1e-8, 1e-8)?.solve(&decay, &y0, 0.0, 1.0)?;
/// assert!((sol.y.to_vec2::<f64>()?[0][0] - (-1.0f64).exp()).abs() < 1e-7);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub trait OdeSystem {
    /// `F(t, y)`, shaped like `y`.
    fn derivative(&self, t: f64, y: &Tensor) -> Result<Tensor>;
}

impl<F> OdeSystem for F
where
    F: Fn(f64, &Tensor) -> Result<Tensor>,
{
    fn derivative(&self, t: f64, y: &Tensor) -> Result<Tensor> {
        self(t, y)
    }
}

/// The final state of an ODE solve, with the solver's statistics.
#[derive(Debug, Clone)]
pub struct OdeSolution {
    /// `y(t1)`.
    pub y: Tensor,
    /// Evaluations of the vector field and steps taken.
    pub stats: SolverStats,
}

/// A method for integrating an [`OdeSystem`] from `t0` to `t1` (either direction).
///
/// Solutions are detached from candle's graph after every step: a vector field built from
/// trainable weights would otherwise keep every step's graph alive (gigabytes over a
/// solve), and a gradient through hundreds of solver steps is rarely what you want. The
/// same holds for the reverse-SDE samplers.
pub trait OdeSolver {
    /// Integrates `system` from `y(t0) = y0` to `t1`.
    fn solve<F: OdeSystem + ?Sized>(&self, system: &F, y0: &Tensor, t0: f64, t1: f64) -> Result<OdeSolution>;

    /// The solver's own time grid, if it steps on one: [`OdeSampler`] then integrates
    /// from `T` to the grid's end (its `ε`). `None` (the default) for step counts and
    /// adaptive solvers.
    ///
    /// ```
    /// use scoresde::solver::{Euler, OdeSolver, Rk45, TimeGrid};
    /// let grid = TimeGrid::new(vec![1.0, 0.5, 0.01])?;
    /// assert_eq!(Euler::new(grid).grid().map(|g| g.end()), Some(0.01));
    /// assert!(Rk45::default().grid().is_none());
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    fn grid(&self) -> Option<&super::TimeGrid> {
        None
    }
}

/// The probability-flow ODE `dx/dt = f(x, t) − ½g(t)² s(x, t)` of an SDE and a score model.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::sde::OuSde;
/// use scoresde::solver::{OdeSystem, ProbabilityFlow};
/// let sde = OuSde::default(); // f = -x, g = 1
/// let score = |x: &Tensor, _t: &Tensor| Ok(x.neg()?);
/// let flow = ProbabilityFlow::new(&sde, &score);
/// let x = Tensor::new(&[[2.0f64]], &Device::Cpu)?;
/// // -x - ½·(-x) = -x/2
/// assert_eq!(flow.derivative(1.0, &x)?.to_vec2::<f64>()?, [[-1.0]]);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ProbabilityFlow<'a, S, M> {
    sde: &'a S,
    model: &'a M,
}

impl<'a, S: Sde, M: ScoreModel> ProbabilityFlow<'a, S, M> {
    /// The probability-flow field of `sde` with score `model`.
    pub fn new(sde: &'a S, model: &'a M) -> Self {
        Self { sde, model }
    }
}

impl<S: Sde, M: ScoreModel> OdeSystem for ProbabilityFlow<'_, S, M> {
    fn derivative(&self, t: f64, x: &Tensor) -> Result<Tensor> {
        let score = self.model.score(x, &time_like(t, x)?)?;
        let g2 = self.sde.diffusion(t).powi(2);
        Ok(((x * self.sde.drift_coeff(t))? - (score * (0.5 * g2))?)?)
    }
}

/// Calls a system and counts the calls.
struct Counter<'a, F: ?Sized> {
    system: &'a F,
    nfe: usize,
}

impl<F: OdeSystem + ?Sized> Counter<'_, F> {
    fn eval(&mut self, t: f64, y: &Tensor) -> Result<Tensor> {
        self.nfe += 1;
        let dy = self.system.derivative(t, y)?;
        if dy.shape() != y.shape() {
            return Err(Error::Shape(format!(
                "the vector field returned shape {:?} for a state of shape {:?}",
                dy.dims(),
                y.dims()
            )));
        }
        Ok(dy)
    }
}

/// The explicit Euler method on a fixed grid (first order, one evaluation per step).
///
/// ```
/// use scoresde::solver::{Euler, TimeGrid};
/// let uniform = Euler::new(100);
/// let custom = Euler::new(TimeGrid::new(vec![1.0, 0.5, 0.1, 1e-3])?);
/// # let _ = (uniform, custom);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Euler {
    schedule: StepSchedule,
}

impl Euler {
    /// Euler on `schedule`: a number of uniform steps or a [`TimeGrid`](super::TimeGrid).
    pub fn new(schedule: impl Into<StepSchedule>) -> Self {
        Self {
            schedule: schedule.into(),
        }
    }
}

impl OdeSolver for Euler {
    fn grid(&self) -> Option<&super::TimeGrid> {
        match &self.schedule {
            StepSchedule::Grid(grid) => Some(grid),
            StepSchedule::Uniform(_) => None,
        }
    }

    fn solve<F: OdeSystem + ?Sized>(&self, system: &F, y0: &Tensor, t0: f64, t1: f64) -> Result<OdeSolution> {
        fixed_step(&self.schedule, system, y0, t0, t1, |f, t, h, y| {
            Ok((y + (f.eval(t, y)? * h)?)?)
        })
    }
}

/// Heun's method (explicit trapezoid) on a fixed grid: second order, two evaluations per
/// step.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::solver::{Heun, OdeSolver};
/// let y0 = Tensor::new(&[1.0f64], &Device::Cpu)?;
/// let sol = Heun::new(100).solve(&|_t: f64, y: &Tensor| Ok(y.clone()), &y0, 0.0, 1.0)?;
/// assert!((sol.y.to_vec1::<f64>()?[0] - 1f64.exp()).abs() < 1e-4);
/// assert_eq!(sol.stats.nfe, 200);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Heun {
    schedule: StepSchedule,
}

impl Heun {
    /// Heun on `schedule`: a number of uniform steps or a [`TimeGrid`](super::TimeGrid).
    pub fn new(schedule: impl Into<StepSchedule>) -> Self {
        Self {
            schedule: schedule.into(),
        }
    }
}

impl OdeSolver for Heun {
    fn grid(&self) -> Option<&super::TimeGrid> {
        match &self.schedule {
            StepSchedule::Grid(grid) => Some(grid),
            StepSchedule::Uniform(_) => None,
        }
    }

    fn solve<F: OdeSystem + ?Sized>(&self, system: &F, y0: &Tensor, t0: f64, t1: f64) -> Result<OdeSolution> {
        fixed_step(&self.schedule, system, y0, t0, t1, |f, t, h, y| {
            let k1 = f.eval(t, y)?;
            let predicted = (y + (&k1 * h)?)?;
            let k2 = f.eval(t + h, &predicted)?;
            Ok((y + ((k1 + k2)? * (0.5 * h))?)?)
        })
    }
}

/// The shared loop of fixed-step methods.
fn fixed_step<F, Step>(
    schedule: &StepSchedule,
    system: &F,
    y0: &Tensor,
    t0: f64,
    t1: f64,
    step: Step,
) -> Result<OdeSolution>
where
    F: OdeSystem + ?Sized,
    Step: Fn(&mut Counter<'_, F>, f64, f64, &Tensor) -> Result<Tensor>,
{
    ensure_finite(y0, || "the initial state contains NaN or infinity".into())?;
    let grid = schedule.resolve(t0, t1)?;
    let mut counter = Counter { system, nfe: 0 };
    let mut y = y0.detach();
    for w in grid.times().windows(2) {
        // Detached: see `OdeSolver` on why solutions are not differentiable.
        y = step(&mut counter, w[0], w[1] - w[0], &y)?.detach();
        ensure_finite(&y, || format!("the ODE solution blew up at t = {}", w[1]))?;
    }
    Ok(OdeSolution {
        y,
        stats: SolverStats {
            nfe: counter.nfe,
            accepted_steps: grid.steps(),
            rejected_steps: 0,
        },
    })
}

/// Adaptive Dormand–Prince 5(4) with first-same-as-last, as scipy's `solve_ivp(method="RK45")`.
///
/// The error of a step is `RMS(err / (atol + rtol·max(|y|, |y_new|)))` over every element
/// of the state (the whole batch, as score_sde's ODE sampler does; see
/// [`Rk45::with_per_sample_error`] for a per-sample bound); a step is accepted when it is
/// below 1. [`Rk45::with_max_nfe`] caps the evaluations. The first step is chosen by scipy's `select_initial_step`. A step
/// below ten units in the last place of `t` fails with
/// [`Error::StepSizeUnderflow`].
///
/// ```
/// use scoresde::solver::Rk45;
/// let solver = Rk45::new(1e-5, 1e-5)?; // score_sde's sampling tolerances
/// assert!(Rk45::new(0.0, 0.0).is_err());
/// # let _ = solver;
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rk45 {
    rtol: f64,
    atol: f64,
    first_step: Option<f64>,
    max_nfe: Option<usize>,
    per_sample: bool,
}

impl Rk45 {
    /// RK45 with relative and absolute tolerances (both `≥ 0`, not both `0`).
    pub fn new(rtol: f64, atol: f64) -> Result<Self> {
        ensure(
            rtol.is_finite() && atol.is_finite() && rtol >= 0.0 && atol >= 0.0 && rtol + atol > 0.0,
            || format!("tolerances must be finite, >= 0 and not both 0; got rtol = {rtol}, atol = {atol}"),
        )?;
        Ok(Self {
            rtol,
            atol,
            first_step: None,
            max_nfe: None,
            per_sample: false,
        })
    }

    /// Fails with [`Error::EvaluationBudget`] rather than use more than `max_nfe`
    /// evaluations (at least 8: the first step's selection and one step). No budget by
    /// default.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use scoresde::{solver::{OdeSolver, Rk45}, Error};
    /// let y0 = Tensor::new(&[[1.0f64]], &Device::Cpu)?;
    /// let fast = |_t: f64, y: &Tensor| Ok((y * 50.0)?.cos()?);
    /// let tight = Rk45::new(1e-10, 1e-10)?.with_max_nfe(50)?;
    /// assert!(matches!(tight.solve(&fast, &y0, 0.0, 10.0), Err(Error::EvaluationBudget { budget: 50, .. })));
    /// assert!(Rk45::default().with_max_nfe(3).is_err());
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_max_nfe(mut self, max_nfe: usize) -> Result<Self> {
        ensure(max_nfe >= 8, || {
            format!("RK45 needs a budget of at least 8 evaluations, got {max_nfe}")
        })?;
        self.max_nfe = Some(max_nfe);
        Ok(self)
    }

    /// Per-sample error control: the step error is the largest over samples (the first
    /// axis) of each sample's RMS, instead of one RMS over the whole batch, so no single
    /// point may exceed the tolerance while the rest of the batch is accurate.
    ///
    /// ```
    /// let solver = scoresde::solver::Rk45::default().with_per_sample_error(true);
    /// # let _ = solver;
    /// ```
    pub fn with_per_sample_error(mut self, per_sample: bool) -> Self {
        self.per_sample = per_sample;
        self
    }

    /// The step error: [`Self::scaled_rms`], or its per-sample maximum.
    fn step_error(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<f64> {
        if !self.per_sample || x.rank() < 2 {
            return self.scaled_rms(x, a, b);
        }
        let scale = a.abs()?.maximum(&b.abs()?)?.affine(self.rtol, self.atol)?;
        let ratio = (x / scale)?.to_dtype(DType::F64)?.flatten_from(1)?;
        let rms: Vec<f64> = ratio.sqr()?.mean(1)?.sqrt()?.to_vec1()?;
        // NaN must not be lost by `max`: it has to reject the step.
        Ok(rms.into_iter().fold(0.0, |m, v| {
            if v.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(v)
            }
        }))
    }

    /// Starts with step `h > 0` instead of choosing one.
    ///
    /// ```
    /// let solver = scoresde::solver::Rk45::new(1e-6, 1e-6)?.with_first_step(1e-3)?;
    /// # let _ = solver;
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_first_step(mut self, h: f64) -> Result<Self> {
        ensure_positive("first step", h)?;
        self.first_step = Some(h);
        Ok(self)
    }

    /// RMS of `x / (atol + rtol·max(|a|, |b|))`.
    fn scaled_rms(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<f64> {
        let scale = a.abs()?.maximum(&b.abs()?)?.affine(self.rtol, self.atol)?;
        let ratio = (x / scale)?.to_dtype(DType::F64)?;
        Ok(ratio.sqr()?.mean_all()?.to_scalar::<f64>()?.sqrt())
    }

    /// scipy's `select_initial_step` for a method of error order 4.
    fn initial_step<F: OdeSystem + ?Sized>(
        &self,
        f: &mut Counter<'_, F>,
        t0: f64,
        y0: &Tensor,
        f0: &Tensor,
        direction: f64,
        span: f64,
    ) -> Result<f64> {
        let d0 = self.scaled_rms(y0, y0, y0)?;
        let d1 = self.scaled_rms(f0, y0, y0)?;
        let h0 = if d0 < 1e-5 || d1 < 1e-5 {
            1e-6
        } else {
            0.01 * d0 / d1
        };
        let h0 = h0.min(span);
        let y1 = (y0 + (f0 * (direction * h0))?)?;
        let f1 = f.eval(t0 + direction * h0, &y1)?;
        let d2 = self.scaled_rms(&(f1 - f0)?, y0, y0)? / h0;
        let h1 = if d1 <= 1e-15 && d2 <= 1e-15 {
            (h0 * 1e-3).max(1e-6)
        } else {
            (0.01 / d1.max(d2)).powf(1.0 / 5.0)
        };
        Ok((100.0 * h0).min(h1).min(span))
    }
}

impl Default for Rk45 {
    /// score_sde's tolerances: `rtol = atol = 1e-5`.
    ///
    /// ```
    /// assert_eq!(scoresde::solver::Rk45::default(), scoresde::solver::Rk45::new(1e-5, 1e-5)?);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    fn default() -> Self {
        Self {
            rtol: 1e-5,
            atol: 1e-5,
            first_step: None,
            max_nfe: None,
            per_sample: false,
        }
    }
}

// Dormand–Prince 5(4) tableau (scipy.integrate._ivp.rk.RK45).
const C: [f64; 6] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0];
const A: [&[f64]; 6] = [
    &[],
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
    ],
    &[
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
    ],
];
const B: [f64; 6] = [
    35.0 / 384.0,
    0.0,
    500.0 / 1113.0,
    125.0 / 192.0,
    -2187.0 / 6784.0,
    11.0 / 84.0,
];
const E: [f64; 7] = [
    -71.0 / 57600.0,
    0.0,
    71.0 / 16695.0,
    -71.0 / 1920.0,
    17253.0 / 339200.0,
    -22.0 / 525.0,
    1.0 / 40.0,
];
const SAFETY: f64 = 0.9;
const MIN_FACTOR: f64 = 0.2;
const MAX_FACTOR: f64 = 10.0;

/// `Σ_i c_i k_i` over the nonzero coefficients.
fn combine(coeffs: &[f64], k: &[Tensor]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (c, ki) in coeffs.iter().zip(k) {
        if *c == 0.0 {
            continue;
        }
        let term = (ki * *c)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    match acc {
        Some(a) => Ok(a),
        None => Ok(k[0].zeros_like()?),
    }
}

impl OdeSolver for Rk45 {
    fn solve<F: OdeSystem + ?Sized>(&self, system: &F, y0: &Tensor, t0: f64, t1: f64) -> Result<OdeSolution> {
        ensure(t0.is_finite() && t1.is_finite() && t0 != t1, || {
            format!("integration bounds must be finite and distinct, got {t0} and {t1}")
        })?;
        ensure_finite(y0, || "the initial state contains NaN or infinity".into())?;
        // Its error control needs more resolution than half precision has.
        ensure(
            matches!(y0.dtype(), candle_core::DType::F32 | candle_core::DType::F64),
            || {
                format!(
                    "RK45 integrates f32 or f64 states, got {:?}: convert with to_dtype(DType::F32)",
                    y0.dtype()
                )
            },
        )?;
        let direction = (t1 - t0).signum();
        let span = (t1 - t0).abs();
        let mut f = Counter { system, nfe: 0 };
        let mut stats = SolverStats::default();

        let mut t = t0;
        let mut y = y0.detach();
        let mut k0 = f.eval(t, &y)?.detach();
        ensure_finite(&k0, || format!("the vector field is not finite at t = {t0}"))?;
        let mut h = match self.first_step {
            Some(h) => h.min(span),
            None => self.initial_step(&mut f, t0, &y, &k0, direction, span)?,
        };

        while direction * (t1 - t) > 0.0 {
            let min_step = 10.0 * (t.abs() * f64::EPSILON).max(f64::MIN_POSITIVE);
            let mut step_rejected = false;
            let mut not_finite = false;
            let (y_new, k_last, h_done) = loop {
                if h < min_step && not_finite {
                    // Shrinking never gave a finite error estimate: the vector field (the
                    // score) returns NaN or infinity here, which no step size cures.
                    return Err(Error::NonFinite(format!(
                        "the vector field gave NaN or infinity at every step tried near t = {t}: \
                         check the score model at this time (RK45 shrank its step to {h:e} without a finite error estimate)"
                    )));
                }
                if h < min_step {
                    return Err(Error::StepSizeUnderflow { t, step: h });
                }
                if let Some(budget) = self.max_nfe {
                    if f.nfe + 6 > budget {
                        return Err(Error::EvaluationBudget { budget, t });
                    }
                }
                // Land exactly on t1.
                let (h_try, t_new) = if direction * (t + direction * h - t1) > 0.0 {
                    ((t1 - t).abs(), t1)
                } else {
                    (h, t + direction * h)
                };
                let signed_h = direction * h_try;
                let mut k = Vec::with_capacity(7);
                k.push(k0.clone());
                for s in 1..6 {
                    let dy = combine(A[s], &k)?;
                    let ys = (&y + (dy * signed_h)?)?;
                    k.push(f.eval(t + C[s] * signed_h, &ys)?);
                }
                let y_new = (&y + (combine(&B, &k)? * signed_h)?)?;
                let k_new = f.eval(t_new, &y_new)?;
                k.push(k_new.clone());
                let error = (combine(&E, &k)? * signed_h)?;
                let error_norm = self.step_error(&error, &y, &y_new)?;

                if error_norm < 1.0 {
                    let mut factor = if error_norm == 0.0 {
                        MAX_FACTOR
                    } else {
                        MAX_FACTOR.min(SAFETY * error_norm.powf(-0.2))
                    };
                    if step_rejected {
                        factor = factor.min(1.0);
                    }
                    h = h_try * factor;
                    stats.accepted_steps += 1;
                    break (y_new, k_new, t_new);
                }
                // Rejected (a NaN error norm lands here too and shrinks the step).
                not_finite = !error_norm.is_finite();
                let shrink = if error_norm.is_finite() {
                    MIN_FACTOR.max(SAFETY * error_norm.powf(-0.2))
                } else {
                    MIN_FACTOR
                };
                h = h_try * shrink;
                step_rejected = true;
                stats.rejected_steps += 1;
            };
            ensure_finite(&y_new, || format!("the ODE solution blew up at t = {h_done}"))?;
            t = h_done;
            // Detached: see `OdeSolver` on why solutions are not differentiable.
            y = y_new.detach();
            k0 = k_last.detach();
        }
        stats.nfe = f.nfe;
        Ok(OdeSolution { y, stats })
    }
}

/// Sampling by integrating the [`ProbabilityFlow`] ODE from `T` to `ε` with any
/// [`OdeSolver`].
///
/// ```
/// use scoresde::solver::{Heun, OdeSampler, Rk45};
/// let adaptive = OdeSampler::new(Rk45::new(1e-5, 1e-5)?);
/// let fixed = OdeSampler::new(Heun::new(200)).with_eps(1e-5)?;
/// # let _ = (adaptive, fixed);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct OdeSampler<O> {
    solver: O,
    eps: f64,
    denoise: bool,
}

impl<O: OdeSolver> OdeSampler<O> {
    /// Integrates the probability-flow ODE with `solver`, from `T` to `ε = 1e-3`.
    pub fn new(solver: O) -> Self {
        Self {
            solver,
            eps: super::reverse::DEFAULT_SAMPLING_EPS,
            denoise: false,
        }
    }

    /// The same sampler, returning the denoised `x̂₀ = (x + σ(ε)²s)/α(ε)` at the end
    /// (one more evaluation).
    ///
    /// ```
    /// let s = scoresde::solver::OdeSampler::new(scoresde::solver::Rk45::default()).with_denoise(true);
    /// # let _ = s;
    /// ```
    pub fn with_denoise(mut self, denoise: bool) -> Self {
        self.denoise = denoise;
        self
    }

    /// The same sampler ending at `ε > 0` (not used when the solver steps on its own
    /// [`TimeGrid`](super::TimeGrid), which must run from `T` and ends at its `ε`).
    pub fn with_eps(mut self, eps: f64) -> Result<Self> {
        ensure_positive("eps", eps)?;
        self.eps = eps;
        Ok(self)
    }

    /// The solver.
    pub fn solver(&self) -> &O {
        &self.solver
    }
}

impl<S: Sde, O: OdeSolver> Sampler<S> for OdeSampler<O> {
    fn sample<M: ScoreModel, R: Rng + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        x_end: &Tensor,
        _rng: &mut R,
    ) -> Result<Samples> {
        check_start(x_end)?;
        // A solver on its own grid ends where the grid does (the one grid rule).
        let eps = match self.solver.grid() {
            Some(grid) => {
                grid.check_sampling(sde.end_time())?;
                grid.end()
            }
            None => self.eps,
        };
        ensure(eps < sde.end_time(), || {
            format!(
                "eps ({eps}) must be below the SDE's end time ({})",
                sde.end_time()
            )
        })?;
        // Samples are never differentiated: models may skip building a graph.
        let _inference = crate::kernels::InferenceScope::enter();
        let flow = ProbabilityFlow::new(sde, model);
        let solution = self.solver.solve(&flow, x_end, sde.end_time(), eps)?;
        let mut stats = solution.stats;
        let x = if self.denoise {
            stats.nfe += 1;
            super::denoise(sde, model, &solution.y, eps)?
        } else {
            solution.y
        };
        Ok(Samples { x, stats })
    }
}
