//! Time grids for fixed-step solvers.

use crate::error::{ensure, ensure_positive};
use crate::sde::Sde;
use crate::Result;

/// The most steps a generated grid may have (an 8 MB vector): more is surely a mistake,
/// and an unbounded count would abort on allocation instead of returning an error.
pub const MAX_GRID_STEPS: usize = 1 << 20;

fn check_steps(steps: usize) -> Result<()> {
    ensure((1..=MAX_GRID_STEPS).contains(&steps), || {
        format!("a grid needs between 1 and {MAX_GRID_STEPS} steps, got {steps}")
    })
}

/// A strictly monotone sequence of times `t_0, t_1, …, t_N` (decreasing for reverse-time
/// sampling): a fixed-step solver takes one step between each pair.
///
/// ```
/// use scoresde::solver::TimeGrid;
/// let grid = TimeGrid::uniform(1.0, 1e-3, 4)?;
/// assert_eq!(grid.steps(), 4);
/// assert_eq!(grid.times()[0], 1.0);
/// assert!(TimeGrid::new(vec![1.0, 0.5, 0.7]).is_err()); // not monotone
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TimeGrid {
    times: Vec<f64>,
}

impl TimeGrid {
    /// A grid from explicit times: at least two, finite and strictly monotone.
    ///
    /// ```
    /// let grid = scoresde::solver::TimeGrid::new(vec![1.0, 0.5, 0.1, 0.01])?;
    /// assert_eq!(grid.steps(), 3);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn new(times: Vec<f64>) -> Result<Self> {
        ensure(times.len() >= 2, || {
            format!("a time grid needs at least 2 times, got {}", times.len())
        })?;
        ensure(times.iter().all(|t| t.is_finite()), || {
            "grid times must be finite".into()
        })?;
        let decreasing = times[1] < times[0];
        let monotone = times
            .windows(2)
            .all(|w| if decreasing { w[1] < w[0] } else { w[1] > w[0] });
        ensure(monotone, || {
            "grid times must be strictly increasing or strictly decreasing".into()
        })?;
        Ok(Self { times })
    }

    /// `steps` equal steps from `from` to `to`.
    ///
    /// ```
    /// let grid = scoresde::solver::TimeGrid::uniform(0.0, 1.0, 2)?;
    /// assert_eq!(grid.times(), [0.0, 0.5, 1.0]);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn uniform(from: f64, to: f64, steps: usize) -> Result<Self> {
        check_steps(steps)?;
        ensure(from.is_finite() && to.is_finite() && from != to, || {
            format!("grid endpoints must be finite and distinct, got {from} and {to}")
        })?;
        let h = (to - from) / steps as f64;
        let mut times: Vec<f64> = (0..steps).map(|i| from + h * i as f64).collect();
        times.push(to);
        Self::new(times)
    }

    /// `steps` equal steps from `from` to `to`, with the last `tail` of them each split into
    /// `factor` equal steps: a uniform grid refined where the score changes fastest. (For
    /// Deveney et al.'s grid, whose steps divide `[0, T]`, see [`Self::deveney`].)
    ///
    /// ```
    /// let grid = scoresde::solver::TimeGrid::refined_tail(10.0, 1e-5, 800, 10, 10)?;
    /// assert_eq!(grid.steps(), 790 + 100);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn refined_tail(from: f64, to: f64, steps: usize, tail: usize, factor: usize) -> Result<Self> {
        ensure(tail <= steps && factor > 0, || {
            format!("need tail ({tail}) <= steps ({steps}) and factor > 0")
        })?;
        let coarse = Self::uniform(from, to, steps)?.times;
        let split = steps - tail;
        let mut times = coarse[..=split].to_vec();
        for w in coarse[split..].windows(2) {
            let h = (w[1] - w[0]) / factor as f64;
            times.extend((1..factor).map(|j| w[0] + h * j as f64));
            times.push(w[1]);
        }
        Self::new(times)
    }

    /// Deveney et al.'s (2025) sampling grid, as their `simulate_rode`/`simulate_rsde` step:
    /// `steps − 10` steps of `h = end/steps` from `end`, then 100 of `h/10`, which would end
    /// at 0; the last node is `eps` instead (samplers end at `ε > 0`), so the last step runs
    /// from `h/10` to `eps`. The paper uses `steps = 800` (400 in its validation plots) from
    /// `T = 10`. Errors unless `10 < steps`, `end` is finite and `0 < eps < h/10`.
    ///
    /// ```
    /// let grid = scoresde::solver::TimeGrid::deveney(10.0, 1e-5, 800)?;
    /// let t = grid.times();
    /// assert_eq!((grid.steps(), t[0], t[790]), (890, 10.0, 10.0 - 790.0 * 0.0125));
    /// assert!((t[889] - 0.00125).abs() < 1e-15 && t[890] == 1e-5);
    /// assert!(scoresde::solver::TimeGrid::deveney(10.0, 0.01, 800).is_err()); // eps > h/10
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn deveney(end: f64, eps: f64, steps: usize) -> Result<Self> {
        ensure(steps > 10 && steps <= MAX_GRID_STEPS, || {
            format!("Deveney et al.'s grid needs 10 < steps <= {MAX_GRID_STEPS}, got {steps}")
        })?;
        ensure(end.is_finite() && end > 0.0, || {
            format!("the grid's end time must be finite and > 0, got {end}")
        })?;
        let h = end / steps as f64;
        ensure(eps > 0.0 && eps < h / 10.0, || {
            format!(
                "eps must lie in (0, {}) (the last fine step), got {eps}",
                h / 10.0
            )
        })?;
        let coarse = steps - 10;
        let mut times: Vec<f64> = (0..=coarse).map(|k| end - h * k as f64).collect();
        times.extend((1..100).map(|j| h * 10.0 * (1.0 - j as f64 / 100.0)));
        times.push(eps);
        Self::new(times)
    }

    /// `steps` steps from `from` to `to` (times in `[0, T]` of `sde`), uniform in the
    /// log-SNR `λ(t)` ([`Sde::log_snr`]): DPM-Solver's `logSNR` grid, its recommendation
    /// for low-dimensional data.
    ///
    /// ```
    /// use scoresde::{sde::{Sde, VpSde}, solver::TimeGrid};
    /// let sde = VpSde::default();
    /// let grid = TimeGrid::log_snr_uniform(&sde, 1.0, 1e-3, 10)?;
    /// let lambdas: Vec<f64> = grid.times().iter().map(|&t| sde.log_snr(t)).collect();
    /// let h = lambdas[1] - lambdas[0];
    /// assert!(lambdas.windows(2).all(|w| ((w[1] - w[0]) - h).abs() < 1e-9));
    /// assert!(TimeGrid::log_snr_uniform(&sde, 1.0, 0.0, 10).is_err()); // λ(0) = ∞
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn log_snr_uniform<S: Sde + ?Sized>(sde: &S, from: f64, to: f64, steps: usize) -> Result<Self> {
        let (l0, l1) = log_snr_span(sde, from, to, steps)?;
        let h = (l1 - l0) / steps as f64;
        sde_grid(sde, from, to, steps, |i| l0 + h * i as f64)
    }

    /// Karras et al.'s (2022) ρ-schedule: `steps` steps from `from` to `to` spaced as
    /// `σ̃_i = (σ̃_0^{1/ρ} + i/N·(σ̃_N^{1/ρ} − σ̃_0^{1/ρ}))^ρ` in `σ̃ = σ/α = e^{−λ}` (EDM
    /// uses `ρ = 7`). The endpoints are times of `sde`, so `σ̃` stays within its range.
    ///
    /// ```
    /// use scoresde::{sde::{Sde, VeSde}, solver::TimeGrid};
    /// let sde = VeSde::new(0.01, 50.0)?;
    /// let grid = TimeGrid::karras(&sde, 1.0, 0.0, 4, 7.0)?;
    /// let sigma: Vec<f64> = grid.times().iter().map(|&t| sde.std(t)).collect();
    /// let expected = (50f64.powf(1.0 / 7.0) + 0.25 * (0.01f64.powf(1.0 / 7.0) - 50f64.powf(1.0 / 7.0))).powi(7);
    /// assert!((sigma[1] - expected).abs() < 1e-9 * expected);
    /// assert!(TimeGrid::karras(&sde, 1.0, 0.0, 4, 0.0).is_err());
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn karras<S: Sde + ?Sized>(sde: &S, from: f64, to: f64, steps: usize, rho: f64) -> Result<Self> {
        ensure_positive("rho", rho)?;
        let (l0, l1) = log_snr_span(sde, from, to, steps)?;
        // σ̃^{1/ρ} = e^{−λ/ρ}.
        let (a, b) = ((-l0 / rho).exp(), (-l1 / rho).exp());
        sde_grid(sde, from, to, steps, |i| {
            let root = a + (b - a) * i as f64 / steps as f64;
            -rho * root.ln()
        })
    }

    /// `steps` steps from `from` to `to` (both `≥ 0`) uniform in `√t`, so they crowd
    /// near the smaller end: DPM-Solver's `time_quadratic` grid.
    ///
    /// ```
    /// let grid = scoresde::solver::TimeGrid::quadratic(1.0, 0.0, 2)?;
    /// assert_eq!(grid.times(), [1.0, 0.25, 0.0]);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn quadratic(from: f64, to: f64, steps: usize) -> Result<Self> {
        ensure(from >= 0.0 && to >= 0.0, || {
            format!("a quadratic grid needs times >= 0, got {from} and {to}")
        })?;
        let roots = Self::uniform(from.sqrt(), to.sqrt(), steps)?;
        let mut times: Vec<f64> = roots.times.iter().map(|r| r * r).collect();
        times[0] = from;
        times[steps] = to;
        Self::new(times)
    }

    /// The times, first to last.
    pub fn times(&self) -> &[f64] {
        &self.times
    }

    /// The number of steps (one fewer than the number of times).
    pub fn steps(&self) -> usize {
        self.times.len() - 1
    }

    /// The first time.
    pub fn start(&self) -> f64 {
        self.times[0]
    }

    /// The last time.
    pub fn end(&self) -> f64 {
        self.times[self.times.len() - 1]
    }

    /// The part of the sampling rule a grid can be checked for alone: decreasing, to a
    /// time > 0.
    pub(crate) fn check_reverse(&self) -> Result<()> {
        ensure(self.end() < self.start() && self.end() > 0.0, || {
            format!(
                "a sampling grid must decrease to a time > 0; got {} -> {}",
                self.start(),
                self.end()
            )
        })
    }

    /// The one rule for a sampler's own grid, checked once when it samples: decreasing,
    /// from the SDE's end time `T` (to rounding) down to a time `ε > 0`, which is then the
    /// sampler's `ε` (an `ε` set beside a grid is not used).
    pub(crate) fn check_sampling(&self, end_time: f64) -> Result<()> {
        self.check_reverse()?;
        ensure(
            (self.start() - end_time).abs() <= 1e-12 * end_time.abs().max(1.0),
            || {
                format!(
                    "a sampling grid must start at the SDE's end time T = {end_time}, got {}",
                    self.start()
                )
            },
        )
    }
}

/// `(λ(from), λ(to))` after checking the step count and that both times lie in `[0, T]`
/// with finite log-SNR.
fn log_snr_span<S: Sde + ?Sized>(sde: &S, from: f64, to: f64, steps: usize) -> Result<(f64, f64)> {
    check_steps(steps)?;
    let end = sde.end_time();
    for t in [from, to] {
        ensure((0.0..=end).contains(&t), || {
            format!("grid time {t} is outside the SDE's range [0, {end}]")
        })?;
    }
    let (l0, l1) = (sde.log_snr(from), sde.log_snr(to));
    ensure(l0.is_finite() && l1.is_finite(), || {
        format!(
            "the log-SNR is not finite at the grid's ends ({l0} at {from}, {l1} at {to}); \
             end the grid at a time > 0 such as 1e-3"
        )
    })?;
    Ok((l0, l1))
}

/// The grid of times `λ⁻¹(lambda(i))`, `i = 0..=steps`, with exact endpoints.
fn sde_grid<S: Sde + ?Sized>(
    sde: &S,
    from: f64,
    to: f64,
    steps: usize,
    lambda: impl Fn(usize) -> f64,
) -> Result<TimeGrid> {
    let mut times = Vec::with_capacity(steps + 1);
    times.push(from);
    for i in 1..steps {
        times.push(sde.time_at_log_snr(lambda(i))?);
    }
    times.push(to);
    TimeGrid::new(times)
}

/// How the few-step samplers space their steps between `T` and `ε`.
///
/// ```
/// use scoresde::{sde::VpSde, solver::Spacing};
/// let grid = Spacing::LogSnr.grid(&VpSde::default(), 1.0, 1e-3, 10)?;
/// assert_eq!(grid.steps(), 10);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Spacing {
    /// Uniform in `t` ([`TimeGrid::uniform`]).
    Time,
    /// Uniform in `√t` ([`TimeGrid::quadratic`]).
    Quadratic,
    /// Uniform in the log-SNR λ ([`TimeGrid::log_snr_uniform`]), DPM-Solver's default.
    #[default]
    LogSnr,
    /// Karras et al.'s ρ-schedule in `σ/α` ([`TimeGrid::karras`]); EDM uses `ρ = 7`.
    Karras(f64),
}

impl Spacing {
    /// The grid of `steps` steps from `from` to `to` for `sde`.
    pub fn grid<S: Sde + ?Sized>(&self, sde: &S, from: f64, to: f64, steps: usize) -> Result<TimeGrid> {
        match *self {
            Self::Time => TimeGrid::uniform(from, to, steps),
            Self::Quadratic => TimeGrid::quadratic(from, to, steps),
            Self::LogSnr => TimeGrid::log_snr_uniform(sde, from, to, steps),
            Self::Karras(rho) => TimeGrid::karras(sde, from, to, steps, rho),
        }
    }
}

/// How a fixed-step solver places its steps: `n` uniform steps over whatever span it is
/// asked to cover, or an explicit [`TimeGrid`] (whose endpoints must then match the span).
///
/// ```
/// use scoresde::solver::{StepSchedule, TimeGrid};
/// let uniform: StepSchedule = 100.into();
/// assert_eq!(uniform.resolve(1.0, 0.0)?.steps(), 100);
/// let custom: StepSchedule = TimeGrid::new(vec![1.0, 0.2, 0.0])?.into();
/// assert!(custom.resolve(1.0, 0.5).is_err()); // the grid ends at 0, not 0.5
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum StepSchedule {
    /// This many equal steps.
    Uniform(usize),
    /// Exactly these times.
    Grid(TimeGrid),
}

impl StepSchedule {
    /// The grid of times from `from` to `to`.
    pub fn resolve(&self, from: f64, to: f64) -> Result<TimeGrid> {
        match self {
            Self::Uniform(steps) => TimeGrid::uniform(from, to, *steps),
            Self::Grid(grid) => {
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0);
                ensure(close(grid.start(), from) && close(grid.end(), to), || {
                    format!(
                        "the time grid runs from {} to {}, but the solver must go from {from} to {to}",
                        grid.start(),
                        grid.end()
                    )
                })?;
                Ok(grid.clone())
            }
        }
    }
}

impl From<usize> for StepSchedule {
    fn from(steps: usize) -> Self {
        Self::Uniform(steps)
    }
}

impl From<TimeGrid> for StepSchedule {
    fn from(grid: TimeGrid) -> Self {
        Self::Grid(grid)
    }
}
