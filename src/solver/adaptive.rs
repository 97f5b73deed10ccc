//! The adaptive reverse-SDE solver of Jolicoeur-Martineau et al. (2021), "Gotta Go Fast
//! When Generating Data with Score-Based Models".

use candle_core::{DType, Tensor};
use rand::Rng;

use super::{check_start, ensure_finite, Counted, Sampler, Samples, SolverStats};
use crate::error::{ensure, ensure_positive};
use crate::random::standard_normal;
use crate::sde::{per_sample, Sde};
use crate::{Error, Result, ScoreModel};

/// Adaptive steps on the reverse SDE `dx = [f − g²s] dt + g dw̄` (Jolicoeur-Martineau et
/// al. 2021, after `sampling.py::AdaptivePredictor` of AlexiaJM/score_sde_fast_sampling).
///
/// Every sample has its own time and step `h`. A step takes the drift increments
/// `K₁ = h·(g²s − f)(x, t)` and `K₂` the same at `(x + K₁, t − h)`: Euler `x′ = x + K₁`
/// and Heun `x″ = x + ½(K₁ + K₂)`, to which the noise `√(½(g(t)² + g(t−h)²)h)·z` is
/// added. The error `‖½(K₂ − K₁)/δ‖₂/√d` with `δ = max(ε_abs, ε_rel·max(|x′|, |x′_prev|))`
/// decides acceptance (`≤ 1`; `x″` is kept) and the next step `min(t − ε, θ·h·E^{−r})`
/// (growth capped at 10×). This is the reference's `sde_improved_euler=False` mode with a
/// trapezoidal noise variance; its default mode, whose error sees the noise, is
/// [`AdaptiveSde::with_shared_noise_error`].
///
/// `SolverStats::nfe` counts batched score calls (two per iteration); `accepted_steps`
/// and `rejected_steps` are summed over the samples. Each call is capped at `max_nfe`
/// evaluations (default 100,000) and fails with [`Error::EvaluationBudget`] beyond.
///
/// ```
/// use candle_core::{DType, Device};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::score::{Covariance, GaussianMixture};
/// use scoresde::sde::{Sde, VpSde};
/// use scoresde::solver::{AdaptiveSde, Sampler};
///
/// let sde = VpSde::default();
/// let data = GaussianMixture::new(vec![1.0], vec![vec![2.0, -1.0]], vec![Covariance::Isotropic(0.25)])?;
/// let mut rng = StdRng::seed_from_u64(0);
/// let x_t = sde.sample_prior((2000, 2), DType::F64, &Device::Cpu, &mut rng)?;
/// let out = AdaptiveSde::new(0.01, 0.05)?.sample(&sde, &data.diffused(sde), &x_t, &mut rng)?;
/// let mean = out.x.mean(0)?.to_vec1::<f64>()?;
/// assert!((mean[0] - 2.0).abs() < 0.05 && (mean[1] + 1.0).abs() < 0.05);
/// assert!(out.stats.nfe < 500 && out.stats.accepted_steps > 0);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveSde {
    abs_tol: f64,
    rel_tol: f64,
    safety: f64,
    exponent: f64,
    first_step: f64,
    eps: f64,
    max_nfe: usize,
    denoise: bool,
    shared_noise_error: bool,
}

impl AdaptiveSde {
    /// The solver with tolerances `ε_abs > 0` and `ε_rel ≥ 0` (the paper: `ε_abs =
    /// 0.0078` for data in `[−1, 1]`, `ε_rel ∈ [0.01, 0.1]`), safety `θ = 0.9`, exponent
    /// `r = 0.9`, first step `0.01`, `ε = 1e-3`.
    ///
    /// ```
    /// assert!(scoresde::solver::AdaptiveSde::new(0.0, 0.05).is_err());
    /// ```
    pub fn new(abs_tol: f64, rel_tol: f64) -> Result<Self> {
        ensure_positive("abs_tol", abs_tol)?;
        ensure(rel_tol.is_finite() && rel_tol >= 0.0, || {
            format!("rel_tol must be finite and >= 0, got {rel_tol}")
        })?;
        Ok(Self {
            abs_tol,
            rel_tol,
            safety: 0.9,
            exponent: 0.9,
            first_step: 0.01,
            eps: super::reverse::DEFAULT_SAMPLING_EPS,
            max_nfe: 100_000,
            denoise: false,
            shared_noise_error: false,
        })
    }

    /// The same solver with safety factor `θ ∈ (0, 1]` and step exponent `r > 0`.
    ///
    /// ```
    /// let s = scoresde::solver::AdaptiveSde::new(0.01, 0.05)?.with_controller(0.8, 0.5)?;
    /// # let _ = s;
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_controller(mut self, safety: f64, exponent: f64) -> Result<Self> {
        ensure(safety > 0.0 && safety <= 1.0, || {
            format!("the safety factor must be in (0, 1], got {safety}")
        })?;
        ensure_positive("exponent", exponent)?;
        self.safety = safety;
        self.exponent = exponent;
        Ok(self)
    }

    /// The same solver with first step `h > 0`.
    ///
    /// ```
    /// assert!(scoresde::solver::AdaptiveSde::new(0.01, 0.05)?.with_first_step(-1.0).is_err());
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_first_step(mut self, h: f64) -> Result<Self> {
        ensure_positive("first step", h)?;
        self.first_step = h;
        Ok(self)
    }

    /// The same solver ending at `ε > 0`.
    ///
    /// ```
    /// assert!(scoresde::solver::AdaptiveSde::new(0.01, 0.05)?.with_eps(1e-5).is_ok());
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_eps(mut self, eps: f64) -> Result<Self> {
        ensure_positive("eps", eps)?;
        self.eps = eps;
        Ok(self)
    }

    /// The same solver with an evaluation budget `max_nfe ≥ 2` per call.
    ///
    /// ```
    /// assert!(scoresde::solver::AdaptiveSde::new(0.01, 0.05)?.with_max_nfe(1).is_err());
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_max_nfe(mut self, max_nfe: usize) -> Result<Self> {
        ensure(max_nfe >= 2, || {
            format!("max_nfe must allow one step (2 evaluations), got {max_nfe}")
        })?;
        self.max_nfe = max_nfe;
        Ok(self)
    }

    /// The reference's default error estimate (`sde_improved_euler=True`): Euler–Maruyama
    /// and stochastic improved Euler sharing `z`, `E = ½(K₂ − K₁)`, which depends on `z`.
    /// Accepting on it selects the noise: in low dimension the kept increments lean
    /// outward and the samples come out too spread (measured in `docs/theory.md`), so the
    /// default is the reference's other mode (Lamba's), whose error does not see `z`.
    ///
    /// ```
    /// let s = scoresde::solver::AdaptiveSde::new(0.01, 0.05)?.with_shared_noise_error(true);
    /// # let _ = s;
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_shared_noise_error(mut self, shared: bool) -> Self {
        self.shared_noise_error = shared;
        self
    }

    /// The same solver, returning the denoised `x̂₀ = (x + σ(ε)²s)/α(ε)` at the end.
    ///
    /// ```
    /// let s = scoresde::solver::AdaptiveSde::new(0.01, 0.05)?.with_denoise(true);
    /// # let _ = s;
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_denoise(mut self, denoise: bool) -> Self {
        self.denoise = denoise;
        self
    }
}

impl<S: Sde> Sampler<S> for AdaptiveSde {
    fn sample<M: ScoreModel, R: Rng + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        x_end: &Tensor,
        rng: &mut R,
    ) -> Result<Samples> {
        check_start(x_end)?;
        let end = sde.end_time();
        ensure(self.eps < end, || {
            format!("eps ({}) must be below the SDE's end time ({end})", self.eps)
        })?;
        let _inference = crate::kernels::InferenceScope::enter();
        let model = Counted::new(model);
        let (b, device, dtype) = (x_end.dim(0)?, x_end.device().clone(), x_end.dtype());
        let vec_t = |v: &[f64]| -> Result<Tensor> { Ok(Tensor::new(v, &device)?.to_dtype(dtype)?) };
        let mut t = vec![end; b];
        let mut h = vec![self.first_step.min(end - self.eps); b];
        let mut x = x_end.detach();
        let mut x_prev = x.clone();
        let mut stats = SolverStats::default();
        // Within rounding of ε counts as arrived, so no step shrinks to nothing there.
        let done = |t: f64| t - self.eps <= 1e-12 * end;
        // Reverse-SDE increment h·(g²s − a·x) + g√h·z at per-sample times.
        // Reverse-SDE increment h·(g²s − a·x) + g√h·z at per-sample times (no noise
        // when `z` is None).
        let increment = |x: &Tensor, t: &Tensor, h: &[f64], z: Option<&Tensor>| -> Result<Tensor> {
            let score = model.score(x, t)?;
            // Caught here, or a NaN error would only shrink the step until it underflows.
            ensure_finite(&score, || "the score is not finite".into())?;
            let g = per_sample(&sde.diffusion_tensor(t)?, x)?;
            let a = per_sample(&sde.drift_coeff_tensor(t)?, x)?;
            let hs = per_sample(&vec_t(h)?, x)?;
            let drift = (score.broadcast_mul(&g.sqr()?)? - x.broadcast_mul(&a)?)?.broadcast_mul(&hs)?;
            match z {
                Some(z) => Ok((drift + z.broadcast_mul(&g)?.broadcast_mul(&hs.sqrt()?)?)?),
                None => Ok(drift),
            }
        };
        while t.iter().any(|&ti| !done(ti)) {
            if model.calls() + 2 > self.max_nfe {
                let latest = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                return Err(Error::EvaluationBudget {
                    budget: self.max_nfe,
                    t: latest,
                });
            }
            for (hi, &ti) in h.iter_mut().zip(&t) {
                *hi = if done(ti) { 0.0 } else { hi.min(ti - self.eps) };
                let floor = 10.0 * f64::EPSILON * ti.abs().max(1.0);
                if !done(ti) && *hi < floor {
                    return Err(Error::StepSizeUnderflow { t: ti, step: *hi });
                }
            }
            let t_now = vec_t(&t)?;
            let t_next: Vec<f64> = t.iter().zip(&h).map(|(t, h)| t - h).collect();
            let z = standard_normal(x.shape(), dtype, &device, rng)?;
            let t_next_tensor = vec_t(&t_next)?;
            // (x_low, x_high, error): the pair and its difference; `x_low` sets the
            // relative tolerance.
            let (x_low, x_high, error) = if self.shared_noise_error {
                let k1 = increment(&x, &t_now, &h, Some(&z))?;
                let x_low = (&x + &k1)?;
                let k2 = increment(&x_low, &t_next_tensor, &h, Some(&z))?;
                let x_high = (&x + ((&k1 + &k2)? * 0.5)?)?;
                let error = (&x_high - &x_low)?;
                (x_low, x_high, error)
            } else {
                // Heun on the drift, then the noise with the step's average variance
                // ½(g(t)² + g(t−h)²)·h: the error does not depend on z.
                let k1 = increment(&x, &t_now, &h, None)?;
                let x_low = (&x + &k1)?;
                let k2 = increment(&x_low, &t_next_tensor, &h, None)?;
                let error = ((&k2 - &k1)? * 0.5)?;
                let (g0, g1) = (
                    sde.diffusion_tensor(&t_now)?,
                    sde.diffusion_tensor(&t_next_tensor)?,
                );
                let var = ((g0.sqr()? + g1.sqr()?)? * 0.5)?.mul(&vec_t(&h)?)?;
                let noise = z.broadcast_mul(&per_sample(&var.sqrt()?, &x)?)?;
                let x_high = (&x + ((&k1 + &k2)? * 0.5)? + noise)?;
                (x_low, x_high, error)
            };
            // Mixed tolerance on the lower-order solution, as the reference does.
            let scale = x_low
                .abs()?
                .maximum(&x_prev.abs()?)?
                .affine(self.rel_tol, 0.0)?
                .maximum(self.abs_tol)?;
            let ratio = (error / scale)?.to_dtype(DType::F64)?;
            let err: Vec<f64> = ratio.sqr()?.flatten_from(1)?.mean(1)?.sqrt()?.to_vec1()?;
            let mut accept = vec![0.0; b];
            for i in 0..b {
                if done(t[i]) {
                    continue;
                }
                // A NaN error counts as a rejection and shrinks the step.
                let e = if err[i].is_finite() { err[i] } else { f64::INFINITY };
                if e <= 1.0 {
                    accept[i] = 1.0;
                    t[i] = if done(t_next[i]) { self.eps } else { t_next[i] };
                    stats.accepted_steps += 1;
                } else {
                    stats.rejected_steps += 1;
                }
                let factor = if e == 0.0 {
                    10.0
                } else {
                    (self.safety * e.powf(-self.exponent)).min(10.0)
                };
                h[i] *= factor;
            }
            let keep = per_sample(&vec_t(&accept)?, &x)?;
            x = (&x + (&x_high - &x).and_then(|d| d.broadcast_mul(&keep))?)?.detach();
            x_prev = (&x_prev + (&x_low - &x_prev).and_then(|d| d.broadcast_mul(&keep))?)?.detach();
            ensure_finite(&x, || {
                format!(
                    "the adaptive SDE solver blew up near t = {}",
                    t.iter().copied().fold(0.0, f64::max)
                )
            })?;
        }
        if self.denoise {
            x = super::denoise(sde, &model, &x, self.eps)?;
        }
        stats.nfe = model.calls();
        Ok(Samples { x, stats })
    }
}
