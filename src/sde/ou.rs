//! The Ornstein–Uhlenbeck SDE of Deveney et al. (2025).

use candle_core::Tensor;

use super::Sde;
use crate::error::ensure_positive;
use crate::Result;

/// The Ornstein–Uhlenbeck SDE `dx = −θx dt + s dw`, prior `N(0, s²/(2θ) I)`.
///
/// Deveney et al. use `θ = 1`, `s = 1`, `T = 10` ([`OuSde::default`]).
///
/// ```
/// use scoresde::sde::{OuSde, Sde};
/// let sde = OuSde::new(1.0, 1.0, 10.0)?;
/// assert_eq!(sde.prior_variance(), 0.5);
/// assert!((sde.mean_coeff(1.0) - (-1.0f64).exp()).abs() < 1e-15);
/// assert!(OuSde::new(0.0, 1.0, 10.0).is_err()); // θ must be > 0
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OuSde {
    theta: f64,
    scale: f64,
    end_time: f64,
}

impl OuSde {
    /// The OU SDE with mean reversion `θ`, noise scale `s` and end time `T`, all finite
    /// and `> 0`, with a prior variance `s²/(2θ)` that f64 can hold.
    ///
    /// ```
    /// let sde = scoresde::sde::OuSde::new(2.0, 1.0, 5.0)?;
    /// assert_eq!(sde.theta(), 2.0);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn new(theta: f64, scale: f64, end_time: f64) -> Result<Self> {
        ensure_positive("theta", theta)?;
        ensure_positive("noise scale s", scale)?;
        ensure_positive("end time T", end_time)?;
        let sde = Self {
            theta,
            scale,
            end_time,
        };
        // Derived quantities must exist in f64 too (s = 1e200 overflowed the prior variance).
        let (variance, g2) = (sde.prior_variance(), scale * scale);
        crate::error::ensure(variance.is_finite() && variance > 0.0 && g2.is_finite(), || {
            format!(
                "theta = {theta}, s = {scale}: the prior variance s^2/(2 theta) = {variance:e} and s^2 must be \
                 finite and positive in f64; rescale the data instead"
            )
        })?;
        Ok(sde)
    }

    /// `θ`.
    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// `s`.
    pub fn scale(&self) -> f64 {
        self.scale
    }
}

impl Default for OuSde {
    /// Deveney et al.'s setting: `θ = 1`, `s = 1`, `T = 10`.
    fn default() -> Self {
        Self {
            theta: 1.0,
            scale: 1.0,
            end_time: 10.0,
        }
    }
}

impl Sde for OuSde {
    fn end_time(&self) -> f64 {
        self.end_time
    }
    fn drift_coeff(&self, _t: f64) -> f64 {
        -self.theta
    }
    fn diffusion(&self, _t: f64) -> f64 {
        self.scale
    }
    fn mean_coeff(&self, t: f64) -> f64 {
        (-self.theta * t).exp()
    }
    fn std(&self, t: f64) -> f64 {
        (-self.prior_variance() * (-2.0 * self.theta * t).exp_m1()).sqrt()
    }
    fn prior_variance(&self) -> f64 {
        self.scale * self.scale / (2.0 * self.theta)
    }
    fn drift_coeff_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.ones_like()?.affine(-self.theta, 0.0)?)
    }
    fn diffusion_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.ones_like()?.affine(self.scale, 0.0)?)
    }
    fn mean_coeff_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok((t * -self.theta)?.exp()?)
    }
    fn std_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let decay = (t * (-2.0 * self.theta))?.exp()?;
        let v = self.prior_variance();
        Ok(decay.affine(-v, v)?.sqrt()?)
    }
}
