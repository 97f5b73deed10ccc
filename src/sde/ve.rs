//! The variance-exploding SDE (Song & Ermon; Song et al. 2021).

use candle_core::Tensor;

use super::{AncestralSde, Discretization, Sde};
use crate::error::{ensure, ensure_positive};
use crate::Result;

/// The variance-exploding SDE `dx = σ_v(t)√(2 ln(σ_max/σ_min)) dw` with
/// `σ_v(t) = σ_min(σ_max/σ_min)^t`, no drift, prior `N(0, σ_max² I)`.
///
/// The marginal std is `σ_v(t)` (the `σ_min²` offset is neglected, as in score_sde).
/// For 2-D toy data pick `σ_max` near the data's largest pairwise distance.
///
/// ```
/// use scoresde::sde::{Sde, VeSde};
/// let sde = VeSde::new(0.01, 50.0)?;
/// assert!((sde.std(1.0) - 50.0).abs() < 1e-9);
/// assert_eq!(sde.mean_coeff(0.7), 1.0);
/// assert!(VeSde::new(1.0, 0.5).is_err()); // σ_max must exceed σ_min
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VeSde {
    sigma_min: f64,
    sigma_max: f64,
    end_time: f64,
}

impl VeSde {
    /// The VE SDE on `[0, 1]`. Errors unless `0 < σ_min < σ_max`, both finite.
    ///
    /// ```
    /// let sde = scoresde::sde::VeSde::new(0.01, 50.0)?;
    /// assert_eq!(sde.sigma_max(), 50.0);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn new(sigma_min: f64, sigma_max: f64) -> Result<Self> {
        ensure_positive("sigma_min", sigma_min)?;
        ensure_positive("sigma_max", sigma_max)?;
        ensure(sigma_max > sigma_min, || {
            format!("sigma_max ({sigma_max}) must be larger than sigma_min ({sigma_min})")
        })?;
        Self {
            sigma_min,
            sigma_max,
            end_time: 1.0,
        }
        .checked()
    }

    /// Errors unless the derived quantities (the ratio `σ_max/σ_min`, the prior variance
    /// `σ(T)²`, `g(T)`) are finite and the prior variance is positive.
    fn checked(self) -> Result<Self> {
        let ratio = self.sigma_max / self.sigma_min;
        let (variance, g) = (self.prior_variance(), self.diffusion(self.end_time));
        ensure(
            ratio.is_finite() && variance.is_finite() && variance > 0.0 && g.is_finite(),
            || {
                format!(
                    "sigma_min = {}, sigma_max = {}, T = {}: sigma_max/sigma_min = {ratio:e} and the prior \
                 variance sigma(T)^2 = {variance:e} must be finite and positive in f64; choose a smaller \
                 ratio or end time",
                    self.sigma_min, self.sigma_max, self.end_time
                )
            },
        )?;
        Ok(self)
    }

    /// The same SDE integrated to end time `T` (default 1). `σ_v(t)` keeps its form, so
    /// the prior std becomes `σ(T) = σ_min(σ_max/σ_min)^T`.
    pub fn with_end_time(mut self, end_time: f64) -> Result<Self> {
        ensure_positive("end time T", end_time)?;
        self.end_time = end_time;
        self.checked()
    }

    /// `σ_min`.
    pub fn sigma_min(&self) -> f64 {
        self.sigma_min
    }

    /// `σ_max`.
    pub fn sigma_max(&self) -> f64 {
        self.sigma_max
    }

    fn log_ratio(&self) -> f64 {
        (self.sigma_max / self.sigma_min).ln()
    }
}

impl Default for VeSde {
    /// score_sde's image defaults: `σ_min = 0.01`, `σ_max = 50`, `T = 1`.
    fn default() -> Self {
        Self {
            sigma_min: 0.01,
            sigma_max: 50.0,
            end_time: 1.0,
        }
    }
}

impl Sde for VeSde {
    fn end_time(&self) -> f64 {
        self.end_time
    }
    fn drift_coeff(&self, _t: f64) -> f64 {
        0.0
    }
    fn diffusion(&self, t: f64) -> f64 {
        self.std(t) * (2.0 * self.log_ratio()).sqrt()
    }
    fn mean_coeff(&self, _t: f64) -> f64 {
        1.0
    }
    fn std(&self, t: f64) -> f64 {
        self.sigma_min * (t * self.log_ratio()).exp()
    }
    fn prior_variance(&self) -> f64 {
        let s = self.std(self.end_time);
        s * s
    }
    /// Closed form: `λ = −log σ_min − t·log(σ_max/σ_min)`.
    fn time_at_log_snr(&self, lambda: f64) -> Result<f64> {
        super::check_log_snr(lambda, self.log_snr(self.end_time), self.log_snr(0.0))?;
        let t = (-lambda - self.sigma_min.ln()) / self.log_ratio();
        Ok(t.clamp(0.0, self.end_time))
    }
    fn drift_coeff_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.zeros_like()?)
    }
    fn diffusion_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok((self.std_tensor(t)? * (2.0 * self.log_ratio()).sqrt())?)
    }
    fn mean_coeff_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.ones_like()?)
    }
    fn std_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok((t * self.log_ratio())?.exp()?.affine(self.sigma_min, 0.0)?)
    }
    /// SMLD's chain: no drift, `G = √(σ(t)² − σ(t − dt)²)` (σ of a time ≤ 0 taken as 0).
    fn discretize(&self, t: f64, dt: f64) -> Discretization {
        Discretization {
            drift_coeff: 0.0,
            diffusion: self.chain_variance_step(t, dt).sqrt(),
        }
    }
}

impl VeSde {
    /// `σ(t)² − σ(t − dt)²` and `σ(t − dt)²`, the latter 0 at or below time 0.
    fn chain_variance_step(&self, t: f64, dt: f64) -> f64 {
        let s = self.std(t);
        s * s - self.adjacent_variance(t, dt)
    }

    fn adjacent_variance(&self, t: f64, dt: f64) -> f64 {
        if t - dt > 0.0 {
            let s = self.std(t - dt);
            s * s
        } else {
            0.0
        }
    }
}

impl AncestralSde for VeSde {
    /// SMLD ancestral step: mean `x + (σ² − σ'²)s`, noise std `√(σ'²(σ² − σ'²)/σ²)`.
    fn ancestral_step(&self, x: &Tensor, score: &Tensor, t: f64, dt: f64) -> Result<(Tensor, f64)> {
        let var = self.std(t).powi(2);
        let adjacent = self.adjacent_variance(t, dt);
        let mean = (x + (score * (var - adjacent))?)?;
        Ok((mean, (adjacent * (var - adjacent) / var).sqrt()))
    }
}
