//! Denoising score matching (MATH.md §3).
//!
//! For data `x₀`, times `t` and noise `z ~ N(0, I)`, the perturbed points are
//! `x_t = α(t)x₀ + σ(t)z`, whose conditional score is `−z/σ(t)`, and
//!
//! ```text
//! L_DSM = E[ λ(t) · ‖s(x_t, t) + z/σ(t)‖² ]     (sum over dimensions, mean or sum over the batch)
//! ```
//!
//! [`Dsm`] holds the choices: the [`Weighting`] `λ(t)`, the [`TimeSampling`] of `t`, the
//! [`Reduction`] over the batch and the smallest time `ε`. [`Dsm::draw`] perturbs a batch
//! and returns every random piece ([`DsmBatch`]: `x₀, x_t, t, z`), so regularizers can
//! collocate at the same perturbed points; [`Dsm::loss`] evaluates the loss on it.
//!
//! ```
//! use candle_core::{DType, Device};
//! use rand::{rngs::StdRng, SeedableRng};
//! use scoresde::loss::Dsm;
//! use scoresde::score::{Covariance, GaussianMixture};
//! use scoresde::sde::VpSde;
//!
//! let sde = VpSde::default();
//! let data = GaussianMixture::new(vec![1.0], vec![vec![1.0, -1.0]], vec![Covariance::Isotropic(0.5)])?;
//! let mut rng = StdRng::seed_from_u64(0);
//! let x0 = data.sample(4096, DType::F64, &Device::Cpu, &mut rng)?;
//! let dsm = Dsm::default();
//! let batch = dsm.draw(&sde, &x0, &mut rng)?;
//! let exact = dsm.loss(&sde, &data.diffused(sde), &batch)?.to_scalar::<f64>()?;
//! let zero_score = |x: &candle_core::Tensor, _t: &candle_core::Tensor| Ok(x.zeros_like()?);
//! let zero = dsm.loss(&sde, &zero_score, &batch)?.to_scalar::<f64>()?;
//! assert!(exact < zero); // with σ² weighting, a zero score costs E‖z‖² = d = 2
//! assert!((zero - 2.0).abs() < 0.1);
//! # Ok::<(), scoresde::Error>(())
//! ```

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::error::{ensure, ensure_positive};
use crate::sde::{per_sample, Sde};
use crate::{Error, Result, ScoreModel};

/// The time weighting `λ(t)` of the DSM loss.
///
/// ```
/// use scoresde::loss::Weighting;
/// assert_eq!(Weighting::default(), Weighting::SigmaSquared);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Weighting {
    /// `λ = σ(t)²`: the loss is `‖σ s + z‖²`, every time on the same scale (score_sde).
    #[default]
    SigmaSquared,
    /// `λ = g(t)²`, likelihood weighting (Song et al. 2021b): the loss bounds the KL divergence.
    Likelihood,
    /// `λ = 1` (Deveney et al.).
    Constant,
}

/// How the training times `t` are drawn.
///
/// ```
/// use scoresde::loss::TimeSampling;
/// assert_eq!(TimeSampling::default(), TimeSampling::Uniform);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TimeSampling {
    /// `t ~ U(ε, T)` (score_sde).
    #[default]
    Uniform,
    /// `t = min(T·Beta(1, 2) + ε, T)` (Deveney et al., capped so that no time passes `T`):
    /// density `2(1 − u)` on `u = (t − ε)/T`, so small times, where the score is hardest,
    /// are drawn more often.
    Beta12,
}

/// How per-sample losses (already summed over dimensions) are combined over the batch.
///
/// ```
/// use scoresde::loss::Reduction;
/// assert_eq!(Reduction::default(), Reduction::Mean);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over the batch.
    #[default]
    Mean,
    /// Sum over the batch.
    Sum,
}

/// A batch perturbed for denoising score matching: `x_t = α(t)x₀ + σ(t)z`.
#[derive(Debug, Clone)]
pub struct DsmBatch {
    /// The clean data `x₀`, shape `[B, …]`.
    pub x0: Tensor,
    /// The perturbed points `x_t`, shape of `x₀`.
    pub x_t: Tensor,
    /// The times, shape `[B]`.
    pub t: Tensor,
    /// The noise `z`, shape of `x₀`.
    pub noise: Tensor,
}

/// The denoising score-matching loss with its choices (see the [module docs](self)).
///
/// Defaults: σ² weighting, `t ~ U(ε, T)`, mean over the batch, `ε = 1e-5` (score_sde's
/// training defaults).
///
/// ```
/// use scoresde::loss::{Dsm, Reduction, TimeSampling, Weighting};
/// let deveney = Dsm::default()
///     .with_weighting(Weighting::Constant)
///     .with_time_sampling(TimeSampling::Beta12)
///     .with_eps(1e-5)?;
/// assert_eq!(deveney.reduction(), Reduction::Mean);
/// assert!(Dsm::default().with_eps(-1.0).is_err());
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dsm {
    weighting: Weighting,
    time_sampling: TimeSampling,
    reduction: Reduction,
    eps: f64,
}

impl Default for Dsm {
    fn default() -> Self {
        Self {
            weighting: Weighting::SigmaSquared,
            time_sampling: TimeSampling::Uniform,
            reduction: Reduction::Mean,
            eps: 1e-5,
        }
    }
}

impl Dsm {
    /// The default loss (see the type docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// With weighting `λ(t)`.
    pub fn with_weighting(mut self, weighting: Weighting) -> Self {
        self.weighting = weighting;
        self
    }

    /// With time sampling `time_sampling`.
    pub fn with_time_sampling(mut self, time_sampling: TimeSampling) -> Self {
        self.time_sampling = time_sampling;
        self
    }

    /// With batch reduction `reduction`.
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// With smallest time `ε` (finite, `> 0`).
    pub fn with_eps(mut self, eps: f64) -> Result<Self> {
        ensure_positive("eps", eps)?;
        self.eps = eps;
        Ok(self)
    }

    /// The weighting.
    pub fn weighting(&self) -> Weighting {
        self.weighting
    }

    /// The time sampling.
    pub fn time_sampling(&self) -> TimeSampling {
        self.time_sampling
    }

    /// The batch reduction.
    pub fn reduction(&self) -> Reduction {
        self.reduction
    }

    /// The smallest time `ε`.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// `n` training times, shape `[n]`, drawn as configured.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use scoresde::loss::Dsm;
    /// use scoresde::sde::OuSde;
    /// let t = Dsm::default().sample_times(&OuSde::default(), 100, DType::F64, &Device::Cpu, &mut StdRng::seed_from_u64(0))?;
    /// assert!(t.to_vec1::<f64>()?.iter().all(|&t| (1e-5..=10.0).contains(&t)));
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn sample_times<S: Sde, R: Rng + ?Sized>(
        &self,
        sde: &S,
        n: usize,
        dtype: DType,
        device: &Device,
        rng: &mut R,
    ) -> Result<Tensor> {
        let end = sde.end_time();
        ensure(self.eps < end, || {
            format!("eps ({}) must be below the SDE's end time ({end})", self.eps)
        })?;
        let values: Vec<f64> = (0..n)
            .map(|_| {
                let u: f64 = rng.random();
                match self.time_sampling {
                    TimeSampling::Uniform => self.eps + (end - self.eps) * u,
                    // Inverse CDF of Beta(1, 2): F(v) = 1 − (1 − v)².
                    // Shifted by ε as in Deveney et al.'s code, and capped at T (the shift
                    // could reach past it, where the models refuse times).
                    TimeSampling::Beta12 => (end * (1.0 - (1.0 - u).sqrt()) + self.eps).min(end),
                }
            })
            .collect();
        Ok(Tensor::from_vec(values, n, device)?.to_dtype(dtype)?)
    }

    /// Draws times and noise for the clean batch `x0` (shape `[B, …]`, `B > 0`, finite)
    /// and perturbs it. Times and noise have `x0`'s dtype and device.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use scoresde::{loss::Dsm, sde::VpSde, Error};
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let x0 = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
    /// let batch = Dsm::default().draw(&VpSde::default(), &x0, &mut rng)?;
    /// assert_eq!((batch.x_t.dims(), batch.t.dims()), (&[2usize, 2][..], &[2usize][..]));
    /// let bad = Tensor::new(&[[f32::NAN, 0.0]], &Device::Cpu)?;
    /// assert!(matches!(Dsm::default().draw(&VpSde::default(), &bad, &mut rng), Err(Error::NonFinite(_))));
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn draw<S: Sde, R: Rng + ?Sized>(&self, sde: &S, x0: &Tensor, rng: &mut R) -> Result<DsmBatch> {
        if x0.rank() < 2 || x0.dim(0)? == 0 {
            return Err(Error::Shape(format!(
                "a training batch must have shape [B, ...] with B > 0 and at least 2 dimensions, got {:?}",
                x0.dims()
            )));
        }
        if !x0.dtype().is_float() {
            return Err(Error::Shape(format!(
                "training data must be floating point, got {:?}",
                x0.dtype()
            )));
        }
        let total = x0.to_dtype(DType::F64)?.abs()?.sum_all()?.to_scalar::<f64>()?;
        if !total.is_finite() {
            return Err(Error::NonFinite(
                "the training batch contains NaN or infinity".into(),
            ));
        }
        let t = self.sample_times(sde, x0.dim(0)?, x0.dtype(), x0.device(), rng)?;
        let noise = crate::random::standard_normal(x0.shape(), x0.dtype(), x0.device(), rng)?;
        let x_t = sde.perturb(x0, &t, &noise)?;
        Ok(DsmBatch {
            x0: x0.clone(),
            x_t,
            t,
            noise,
        })
    }

    /// The loss of `model` on each sample of `batch`, summed over dimensions: shape `[B]`.
    pub fn per_sample<S: Sde, M: ScoreModel + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        batch: &DsmBatch,
    ) -> Result<Tensor> {
        let score = model.score(&batch.x_t, &batch.t)?;
        if score.dims() != batch.x_t.dims() {
            return Err(Error::Shape(format!(
                "the model returned a score of shape {:?} for x of shape {:?}; they must match",
                score.dims(),
                batch.x_t.dims()
            )));
        }
        let t = batch.t.to_dtype(score.dtype())?;
        let sigma = per_sample(&sde.std_tensor(&t)?, &score)?;
        // σ s + z, so that the σ² weighting never divides by a small σ.
        let residual = (score.broadcast_mul(&sigma)? + batch.noise.to_dtype(score.dtype())?)?;
        let squared = residual.sqr()?.flatten_from(1)?.sum(1)?;
        Ok(match self.weighting {
            Weighting::SigmaSquared => squared,
            Weighting::Likelihood => {
                let ratio = (sde.diffusion_tensor(&t)? / sde.std_tensor(&t)?)?;
                (squared * ratio.sqr()?)?
            }
            Weighting::Constant => (squared / sde.std_tensor(&t)?.sqr()?)?,
        })
    }

    /// The loss as per-sample coefficients at times `t` (`[B]`): `(σ(t), c)` such that
    /// the loss is `Σ_b c_b‖σ_b s_b + z_b‖²` (weighting and reduction folded into `c`).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use scoresde::{loss::{Dsm, Reduction}, sde::VpSde};
    /// let t = Tensor::new(&[0.5f64, 1.0], &Device::Cpu)?;
    /// let (_sigma, c) = Dsm::default().coefficients(&VpSde::default(), &t)?;
    /// assert_eq!(c.to_vec1::<f64>()?, [0.5, 0.5]); // σ² weighting, mean over 2
    /// let (_, c) = Dsm::default().with_reduction(Reduction::Sum).coefficients(&VpSde::default(), &t)?;
    /// assert_eq!(c.to_vec1::<f64>()?, [1.0, 1.0]);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn coefficients<S: Sde>(&self, sde: &S, t: &Tensor) -> Result<(Tensor, Tensor)> {
        let sigma = sde.std_tensor(t)?;
        let weight = match self.weighting {
            Weighting::SigmaSquared => sigma.ones_like()?,
            Weighting::Likelihood => (sde.diffusion_tensor(t)? / &sigma)?.sqr()?,
            Weighting::Constant => sigma.sqr()?.recip()?,
        };
        let weight = match self.reduction {
            Reduction::Mean => (weight / t.dim(0)? as f64)?,
            Reduction::Sum => weight,
        };
        Ok((sigma, weight))
    }

    /// The loss of `model` on `batch`: a scalar tensor, differentiable in the model's
    /// parameters.
    pub fn loss<S: Sde, M: ScoreModel + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        batch: &DsmBatch,
    ) -> Result<Tensor> {
        let per_sample = self.per_sample(sde, model, batch)?;
        Ok(match self.reduction {
            Reduction::Mean => per_sample.mean(0)?,
            Reduction::Sum => per_sample.sum(0)?,
        })
    }
}
