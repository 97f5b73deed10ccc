//! Time grids for fixed-step solvers.

use crate::error::ensure;
use crate::Result;

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
        ensure(steps > 0, || "a grid needs at least one step".into())?;
        ensure(from.is_finite() && to.is_finite() && from != to, || {
            format!("grid endpoints must be finite and distinct, got {from} and {to}")
        })?;
        let h = (to - from) / steps as f64;
        let mut times: Vec<f64> = (0..steps).map(|i| from + h * i as f64).collect();
        times.push(to);
        Self::new(times)
    }

    /// Deveney et al.'s sampling grid: `steps` equal steps from `from` to `to`, with the
    /// last `tail` of them each split into `factor` equal steps (their paper uses 800
    /// steps from T = 10 with the last 10 refined tenfold).
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
