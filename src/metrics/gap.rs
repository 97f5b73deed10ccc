//! The ODE–SDE gap: how far apart the two kinds of samples of one model are.

use candle_core::{DType, Tensor};
use rand::Rng;

use super::{histogram_w2, w2_exact, Grid};
use crate::error::ensure;
use crate::regularizer::Regularizer;
use crate::sde::Sde;
use crate::solver::Sampler;
use crate::{Error, Result, ScoreModel};

/// What [`GapReport::measure`] found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gap {
    /// Exact W2 between the ODE and the SDE samples (drawn from the same prior points).
    pub w2_ode_sde: f64,
    /// Exact W2 between the ODE samples and the data.
    pub w2_ode_data: f64,
    /// Exact W2 between the SDE samples and the data.
    pub w2_sde_data: f64,
    /// The mean Fokker–Planck residual penalty of the model at perturbed data points, when
    /// a residual was requested.
    pub fp_residual: Option<f64>,
}

/// Measures the gap between a model's probability-flow ODE samples and its reverse-SDE
/// samples (Deveney et al. 2025), and how far each is from the data.
///
/// Both samplers start from the *same* prior draws, so the gap reflects the dynamics, not
/// the luck of the draw. Distances are exact W2 between equal-size sets (the number of
/// points is the number of data points given, ≤ ~2,000 for speed), or, after
/// [`GapReport::with_histograms`], W2 between histograms on a grid as Deveney et al.
/// compute it, which takes sets of any size (tens of thousands of points in seconds).
///
/// ```
/// use candle_core::{DType, Device};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::metrics::GapReport;
/// use scoresde::prelude::*;
///
/// let sde = VpSde::default();
/// let data = GaussianMixture::new(vec![1.0], vec![vec![1.0, 1.0]], vec![Covariance::Isotropic(0.1)])?;
/// let mut rng = StdRng::seed_from_u64(0);
/// let points = data.sample(300, DType::F64, &Device::Cpu, &mut rng)?;
/// let report = GapReport::new(OdeSampler::new(Rk45::default()), PredictorCorrector::euler_maruyama(500));
/// let gap = report.measure(&sde, &data.diffused(sde), &points, &mut rng)?;
/// // With the exact score both samplers reproduce the data: every distance is small.
/// assert!(gap.w2_ode_sde < 0.3 && gap.w2_ode_data < 0.3 && gap.w2_sde_data < 0.3);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct GapReport<O, Q> {
    ode: O,
    sde: Q,
    grid: Option<Grid>,
}

impl<O, Q> GapReport<O, Q> {
    /// Compares the samples of `ode_sampler` with those of `sde_sampler`.
    pub fn new(ode_sampler: O, sde_sampler: Q) -> Self {
        Self {
            ode: ode_sampler,
            sde: sde_sampler,
            grid: None,
        }
    }

    /// Measures W2 between the histograms of the sample sets on `grid`
    /// ([`histogram_w2`](super::histogram_w2)) instead of exact W2 between the points.
    ///
    /// ```
    /// use scoresde::metrics::{GapReport, Grid};
    /// use scoresde::solver::{Euler, OdeSampler, PredictorCorrector};
    /// let report = GapReport::new(OdeSampler::new(Euler::new(800)), PredictorCorrector::euler_maruyama(800))
    ///     .with_histograms(Grid::deveney());
    /// # let _ = report;
    /// ```
    pub fn with_histograms(mut self, grid: Grid) -> Self {
        self.grid = Some(grid);
        self
    }

    fn w2(&self, x: &Tensor, y: &Tensor) -> Result<f64> {
        match &self.grid {
            Some(grid) => histogram_w2(x, y, grid),
            None => w2_exact(x, y),
        }
    }

    /// Samples as many points as `data` has (shape `[N, d]`) with both samplers from the
    /// same prior draws and returns the three distances (no residual).
    pub fn measure<S, M, R>(&self, sde: &S, model: &M, data: &Tensor, rng: &mut R) -> Result<Gap>
    where
        S: Sde,
        M: ScoreModel,
        O: Sampler<S>,
        Q: Sampler<S>,
        R: Rng,
    {
        let (ode, stochastic) = self.sample_both(sde, model, data, rng)?;
        self.distances(&ode, &stochastic, data)
    }

    /// The three distances between given ODE samples, SDE samples and data (no residual):
    /// for when you keep the samples, e.g. to plot them (see [`Self::sample_both`]).
    pub fn distances(&self, ode: &Tensor, stochastic: &Tensor, data: &Tensor) -> Result<Gap> {
        Ok(Gap {
            w2_ode_sde: self.w2(ode, stochastic)?,
            w2_ode_data: self.w2(ode, data)?,
            w2_sde_data: self.w2(stochastic, data)?,
            fp_residual: None,
        })
    }

    /// As [`Self::measure`], and also the mean of `residual`'s penalty over the data
    /// perturbed to times uniform in `[eps, T]` (in batches of at most 500 points).
    #[allow(clippy::too_many_arguments)]
    pub fn measure_with_residual<S, M, P, R>(
        &self,
        sde: &S,
        model: &M,
        residual: &P,
        eps: f64,
        data: &Tensor,
        rng: &mut R,
    ) -> Result<Gap>
    where
        S: Sde,
        M: ScoreModel,
        O: Sampler<S>,
        Q: Sampler<S>,
        P: Regularizer<S, M>,
        R: Rng,
    {
        let mut gap = self.measure(sde, model, data, rng)?;
        gap.fp_residual = Some(mean_penalty(sde, model, residual, eps, data, rng)?);
        Ok(gap)
    }

    /// As many ODE samples and SDE samples as `data` has points (shape `[N, d]`), both from
    /// the same prior draws: `(ode, sde)`.
    pub fn sample_both<S, M, R>(
        &self,
        sde: &S,
        model: &M,
        data: &Tensor,
        rng: &mut R,
    ) -> Result<(Tensor, Tensor)>
    where
        S: Sde,
        M: ScoreModel,
        O: Sampler<S>,
        Q: Sampler<S>,
        R: Rng,
    {
        super::Points::read(data, "data")?;
        let prior = sde.sample_prior(data.shape(), data.dtype(), data.device(), rng)?;
        let ode = self.ode.sample(sde, model, &prior, rng)?.x;
        let stochastic = self.sde.sample(sde, model, &prior, rng)?.x;
        Ok((ode, stochastic))
    }
}

/// The mean of `regularizer`'s penalty over `data` (shape `[N, d]`) perturbed by the forward
/// SDE to times uniform in `[eps, T]`, evaluated in batches of at most 500 points and
/// weighted by batch size: how far a model is from satisfying its Fokker–Planck equation
/// where the data diffuses.
///
/// ```
/// use candle_core::{DType, Device};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::metrics::mean_penalty;
/// use scoresde::prelude::*;
/// use scoresde::autodiff::Divergence;
/// use scoresde::regularizer::{ScoreFpe, TimeDerivative};
///
/// let sde = VpSde::default();
/// let data = GaussianMixture::new(vec![1.0], vec![vec![1.0, 1.0]], vec![Covariance::Isotropic(0.1)])?;
/// let mut rng = StdRng::seed_from_u64(0);
/// let points = data.sample(64, DType::F64, &Device::Cpu, &mut rng)?;
/// let exact = data.diffused(sde);
/// let fpe = ScoreFpe::new()
///     .with_divergence(Divergence::Exact)?
///     .with_time_derivative(TimeDerivative::Autodiff)?;
/// let r = mean_penalty(&sde, &exact, &fpe, 0.05, &points, &mut rng)?;
/// assert!(r < 1e-12); // the exact score satisfies the score FPE
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn mean_penalty<S, M, P, R>(
    sde: &S,
    model: &M,
    regularizer: &P,
    eps: f64,
    data: &Tensor,
    rng: &mut R,
) -> Result<f64>
where
    S: Sde,
    P: Regularizer<S, M>,
    R: Rng,
{
    ensure(eps > 0.0 && eps < sde.end_time(), || {
        format!("eps must lie in (0, T = {}), got {eps}", sde.end_time())
    })?;
    let n = super::Points::read(data, "data")?.n;
    let mut total = 0.0;
    for start in (0..n).step_by(500) {
        let x0 = data.narrow(0, start, (n - start).min(500))?;
        let b = x0.dim(0)?;
        let t = crate::random::uniform(b, eps, sde.end_time(), x0.dtype(), x0.device(), rng)?;
        let z = crate::random::standard_normal(x0.shape(), x0.dtype(), x0.device(), rng)?;
        let x_t = sde.perturb(&x0, &t, &z)?;
        let penalty = regularizer.penalty(sde, model, &x_t, &t, rng)?;
        let value = penalty.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::NonFinite(format!(
                "the penalty is {value} on data points {start}..{}: the model or its derivatives overflow there",
                start + b
            )));
        }
        total += value * b as f64;
    }
    Ok(total / n as f64)
}
