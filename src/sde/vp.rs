//! The variance-preserving SDE and its sub-VP sibling (Song et al. 2021).

use candle_core::Tensor;

use super::{one_minus_exp2, AncestralSde, Discretization, Sde};
use crate::error::{ensure, ensure_positive};
use crate::Result;

/// The linear noise schedule `β(t) = β_min + t(β_max − β_min)` shared by VP and sub-VP.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LinearBeta {
    beta_min: f64,
    beta_max: f64,
    end_time: f64,
}

impl LinearBeta {
    fn new(beta_min: f64, beta_max: f64) -> Result<Self> {
        ensure(beta_min.is_finite() && beta_min >= 0.0, || {
            format!("beta_min must be finite and >= 0, got {beta_min}")
        })?;
        ensure_positive("beta_max", beta_max)?;
        ensure(beta_min <= beta_max, || {
            format!("beta_min ({beta_min}) must not exceed beta_max ({beta_max})")
        })?;
        Ok(Self {
            beta_min,
            beta_max,
            end_time: 1.0,
        })
    }

    fn beta(&self, t: f64) -> f64 {
        self.beta_min + t * (self.beta_max - self.beta_min)
    }

    fn beta_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.affine(self.beta_max - self.beta_min, self.beta_min)?)
    }

    /// `log α(t) = −¼t²(β_max − β_min) − ½tβ_min`.
    fn log_mean_coeff(&self, t: f64) -> f64 {
        -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
    }

    fn log_mean_coeff_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let quadratic = (t.sqr()? * (-0.25 * (self.beta_max - self.beta_min)))?;
        Ok((quadratic + (t * (-0.5 * self.beta_min))?)?)
    }

    /// `β_i = β(t)·dt` of the discrete chain, which must stay below 1.
    fn discrete_beta(&self, t: f64, dt: f64) -> Result<f64> {
        let beta = self.beta(t) * dt;
        ensure(beta < 1.0, || {
            format!("step dt = {dt} is too large at t = {t}: beta(t)*dt = {beta} must be < 1")
        })?;
        Ok(beta)
    }
}

macro_rules! beta_schedule_api {
    ($ty:ident, $doc_example:literal) => {
        impl $ty {
            /// The SDE with `β(t) = β_min + t(β_max − β_min)` on `[0, 1]`.
            ///
            /// Errors unless `0 ≤ β_min ≤ β_max`, `β_max > 0`, both finite.
            #[doc = $doc_example]
            pub fn new(beta_min: f64, beta_max: f64) -> Result<Self> {
                Ok(Self {
                    beta: LinearBeta::new(beta_min, beta_max)?,
                })
            }

            /// The same SDE integrated to end time `T` (default 1).
            pub fn with_end_time(mut self, end_time: f64) -> Result<Self> {
                ensure_positive("end time T", end_time)?;
                self.beta.end_time = end_time;
                Ok(self)
            }

            /// `β_min`.
            pub fn beta_min(&self) -> f64 {
                self.beta.beta_min
            }

            /// `β_max`.
            pub fn beta_max(&self) -> f64 {
                self.beta.beta_max
            }

            /// `β(t)`.
            pub fn beta(&self, t: f64) -> f64 {
                self.beta.beta(t)
            }
        }

        impl Default for $ty {
            /// score_sde's defaults: `β_min = 0.1`, `β_max = 20`, `T = 1`.
            fn default() -> Self {
                Self {
                    beta: LinearBeta {
                        beta_min: 0.1,
                        beta_max: 20.0,
                        end_time: 1.0,
                    },
                }
            }
        }
    };
}

/// The variance-preserving SDE `dx = −½β(t)x dt + √β(t) dw`, prior `N(0, I)`.
///
/// ```
/// use scoresde::sde::{Sde, VpSde};
/// let sde = VpSde::new(0.1, 20.0)?;
/// assert!((sde.diffusion(1.0) - 20f64.sqrt()).abs() < 1e-12);
/// assert!(VpSde::new(-1.0, 20.0).is_err());
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VpSde {
    beta: LinearBeta,
}

beta_schedule_api!(
    VpSde,
    "```\nlet sde = scoresde::sde::VpSde::new(0.1, 20.0)?;\nassert!((sde.beta(0.5) - 10.05).abs() < 1e-12);\n# Ok::<(), scoresde::Error>(())\n```"
);

impl Sde for VpSde {
    fn end_time(&self) -> f64 {
        self.beta.end_time
    }
    fn drift_coeff(&self, t: f64) -> f64 {
        -0.5 * self.beta.beta(t)
    }
    fn diffusion(&self, t: f64) -> f64 {
        self.beta.beta(t).sqrt()
    }
    fn mean_coeff(&self, t: f64) -> f64 {
        self.beta.log_mean_coeff(t).exp()
    }
    fn std(&self, t: f64) -> f64 {
        (-(2.0 * self.beta.log_mean_coeff(t)).exp_m1()).sqrt()
    }
    fn prior_variance(&self) -> f64 {
        1.0
    }
    fn drift_coeff_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok((self.beta.beta_tensor(t)? * -0.5)?)
    }
    fn diffusion_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(self.beta.beta_tensor(t)?.sqrt()?)
    }
    /// Closed form (DPM-Solver's `NoiseScheduleVP.inverse_lambda`): with
    /// `L = log(1 + e^{−2λ}) = −2 log α`, solve `½t²(β_max − β_min) + tβ_min = L`.
    fn time_at_log_snr(&self, lambda: f64) -> Result<f64> {
        let end = self.beta.end_time;
        super::check_log_snr(lambda, self.log_snr(end), f64::INFINITY)?;
        let l = if lambda < 0.0 {
            -2.0 * lambda + (2.0 * lambda).exp().ln_1p()
        } else {
            (-2.0 * lambda).exp().ln_1p()
        };
        let (b0, db) = (self.beta.beta_min, self.beta.beta_max - self.beta.beta_min);
        // The root 2L/(√(β₀² + 2ΔL) + β₀) does not cancel when Δ or β₀ is small.
        let t = 2.0 * l / ((b0 * b0 + 2.0 * db * l).sqrt() + b0);
        Ok(t.min(end))
    }

    fn mean_coeff_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(self.beta.log_mean_coeff_tensor(t)?.exp()?)
    }
    fn std_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(one_minus_exp2(&self.beta.log_mean_coeff_tensor(t)?)?.sqrt()?)
    }
    /// DDPM's chain: `c = √(1 − β_i) − 1`, `G = √β_i` with `β_i = β(t)·dt`.
    fn discretize(&self, t: f64, dt: f64) -> Discretization {
        // Capped so that an oversized step gives a NaN-free (if crude) step; the ancestral
        // sampler, which divides by √(1 − β_i), reports the error instead.
        let beta = (self.beta.beta(t) * dt).min(1.0);
        Discretization {
            drift_coeff: (1.0 - beta).sqrt() - 1.0,
            diffusion: beta.sqrt(),
        }
    }
    fn langevin_alpha(&self, t: f64, dt: f64) -> f64 {
        1.0 - self.beta.beta(t) * dt
    }
}

impl AncestralSde for VpSde {
    /// DDPM ancestral step: mean `(x + β_i s)/√(1 − β_i)`, noise std `√β_i`.
    fn ancestral_step(&self, x: &Tensor, score: &Tensor, t: f64, dt: f64) -> Result<(Tensor, f64)> {
        let beta = self.beta.discrete_beta(t, dt)?;
        let mean = ((x + (score * beta)?)? / (1.0 - beta).sqrt())?;
        Ok((mean, beta.sqrt()))
    }
}

/// The sub-VP SDE `dx = −½β(t)x dt + √(β(t)(1 − e^{−2β_min t − (β_max−β_min)t²})) dw`,
/// whose marginal variance stays below VP's; std `σ(t) = 1 − α(t)²`, prior `N(0, I)`.
///
/// ```
/// use scoresde::sde::{Sde, SubVpSde, VpSde};
/// let (sub, vp) = (SubVpSde::default(), VpSde::default());
/// assert!(sub.std(0.3) < vp.std(0.3));
/// assert_eq!(sub.mean_coeff(0.3), vp.mean_coeff(0.3));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubVpSde {
    beta: LinearBeta,
}

beta_schedule_api!(
    SubVpSde,
    "```\nlet sde = scoresde::sde::SubVpSde::new(0.1, 20.0)?;\nassert_eq!(sde.beta(1.0), 20.0);\n# Ok::<(), scoresde::Error>(())\n```"
);

impl Sde for SubVpSde {
    fn end_time(&self) -> f64 {
        self.beta.end_time
    }
    fn drift_coeff(&self, t: f64) -> f64 {
        -0.5 * self.beta.beta(t)
    }
    fn diffusion(&self, t: f64) -> f64 {
        // 1 − e^{−2β_min t − (β_max−β_min)t²} = 1 − α⁴.
        let discount = -(4.0 * self.beta.log_mean_coeff(t)).exp_m1();
        (self.beta.beta(t) * discount).sqrt()
    }
    fn mean_coeff(&self, t: f64) -> f64 {
        self.beta.log_mean_coeff(t).exp()
    }
    fn std(&self, t: f64) -> f64 {
        -(2.0 * self.beta.log_mean_coeff(t)).exp_m1()
    }
    fn prior_variance(&self) -> f64 {
        1.0
    }
    fn drift_coeff_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok((self.beta.beta_tensor(t)? * -0.5)?)
    }
    fn diffusion_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let discount = one_minus_exp2(&(self.beta.log_mean_coeff_tensor(t)? * 2.0)?)?; // 1 − α⁴
        Ok((self.beta.beta_tensor(t)? * discount)?.sqrt()?)
    }
    fn mean_coeff_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(self.beta.log_mean_coeff_tensor(t)?.exp()?)
    }
    fn std_tensor(&self, t: &Tensor) -> Result<Tensor> {
        one_minus_exp2(&self.beta.log_mean_coeff_tensor(t)?)
    }
    fn langevin_alpha(&self, t: f64, dt: f64) -> f64 {
        1.0 - self.beta.beta(t) * dt
    }
}
