//! A score with a known error on a time window, to study how samplers carry score errors.

use candle_core::{DType, Tensor};

use crate::error::ensure;
use crate::score::ScoreModel;
use crate::{Error, Result};

/// The score of `inner` plus a constant error `δ` while `t` lies in `[from, to]`: the
/// pulse-shape perturbation with which Cao et al. (NeurIPS 2023) compare the
/// probability-flow ODE with noisier reverse processes.
///
/// Wrap an exact score ([`GaussianMixture::diffused`](crate::score::GaussianMixture::diffused))
/// and every difference between the samples and the data is the error's doing (plus the
/// sampler's own discretization). An error early in the generative process (large `t`) is
/// carried to the samples unchanged by the ODE and damped exponentially in `λ²` by the
/// reverse processes `dx = [f − ½(1+λ²)g²s] dt + λg dw̄`
/// ([`EulerMaruyama::with_lambda`](crate::solver::EulerMaruyama::with_lambda)); one at the
/// very end is weighted by `(1+λ²)/2` and has no time left to be damped, so there the ODE
/// is better (`docs/theory.md` §2 has the closed form for Gaussian data).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::score::PulseError;
/// use scoresde::ScoreModel;
/// let standard_normal = |x: &Tensor, _t: &Tensor| Ok(x.neg()?);
/// let perturbed = PulseError::new(standard_normal, 0.5, 0.7, vec![1.0, 0.0])?;
/// let x = Tensor::new(&[[1.0f64, 1.0], [1.0, 1.0]], &Device::Cpu)?;
/// let t = Tensor::new(&[0.6f64, 0.9], &Device::Cpu)?; // inside, outside the window
/// assert_eq!(perturbed.score(&x, &t)?.to_vec2::<f64>()?, [[0.0, -1.0], [-1.0, -1.0]]);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PulseError<M> {
    inner: M,
    from: f64,
    to: f64,
    shift: Vec<f64>,
}

impl<M> PulseError<M> {
    /// `inner` plus `shift` (one entry per coordinate of a sample) for `from ≤ t ≤ to`.
    /// Errors unless the window is finite with `from ≤ to` and the shift finite and
    /// nonempty.
    ///
    /// ```
    /// use scoresde::score::{Covariance, GaussianMixture, PulseError};
    /// use scoresde::sde::VpSde;
    /// let data = GaussianMixture::new(vec![1.0], vec![vec![0.0, 0.0]], vec![Covariance::Isotropic(1.0)])?;
    /// let exact = data.diffused(VpSde::default());
    /// assert!(PulseError::new(exact.clone(), 0.7, 0.5, vec![1.0, 0.0]).is_err()); // backwards
    /// assert!(PulseError::new(exact.clone(), 0.5, 0.7, vec![f64::NAN, 0.0]).is_err());
    /// let early = PulseError::new(exact, 0.5, 0.7, vec![1.0, 0.0])?;
    /// assert_eq!(early.window(), (0.5, 0.7));
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn new(inner: M, from: f64, to: f64, shift: Vec<f64>) -> Result<Self> {
        ensure(from.is_finite() && to.is_finite() && from <= to, || {
            format!("the error's window must be finite with from <= to, got [{from}, {to}]")
        })?;
        ensure(!shift.is_empty() && shift.iter().all(|v| v.is_finite()), || {
            format!("the error must be a nonempty finite vector, got {shift:?}")
        })?;
        Ok(Self {
            inner,
            from,
            to,
            shift,
        })
    }

    /// The unperturbed model.
    ///
    /// ```
    /// use scoresde::score::{Covariance, GaussianMixture, PulseError};
    /// use scoresde::sde::VpSde;
    /// let data = GaussianMixture::new(vec![1.0], vec![vec![0.0]], vec![Covariance::Isotropic(1.0)])?;
    /// let pulse = PulseError::new(data.diffused(VpSde::default()), 0.5, 0.7, vec![1.0])?;
    /// assert_eq!(pulse.inner().mixture().dim(), 1);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// The window `(from, to)` (see [`PulseError::new`]).
    pub fn window(&self) -> (f64, f64) {
        (self.from, self.to)
    }

    /// The error `δ` added inside the window.
    ///
    /// ```
    /// use candle_core::Tensor;
    /// use scoresde::score::PulseError;
    /// let zero = |x: &Tensor, _t: &Tensor| -> scoresde::Result<Tensor> { Ok(x.zeros_like()?) };
    /// assert_eq!(PulseError::new(zero, 0.0, 0.1, vec![2.0, 0.0])?.shift(), [2.0, 0.0]);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn shift(&self) -> &[f64] {
        &self.shift
    }
}

impl<M: ScoreModel> ScoreModel for PulseError<M> {
    fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let score = self.inner.score(x, t)?;
        let b = x.dim(0)?;
        let d: usize = x.dims()[1..].iter().product();
        if d != self.shift.len() || score.shape() != x.shape() || t.dims() != [b] {
            return Err(Error::Shape(format!(
                "PulseError: a shift of {} entries for x {:?}, t {:?} and score {:?}",
                self.shift.len(),
                x.dims(),
                t.dims(),
                score.dims()
            )));
        }
        // 1 inside the window, 0 outside, per sample: [B, 1].
        let inside = (t.ge(self.from)?.to_dtype(DType::U8)? * t.le(self.to)?.to_dtype(DType::U8)?)?;
        let inside = inside.to_dtype(score.dtype())?.reshape((b, 1))?;
        let shift = Tensor::new(self.shift.as_slice(), score.device())?
            .to_dtype(score.dtype())?
            .reshape((1, d))?;
        let error = inside.broadcast_mul(&shift)?.reshape(score.shape())?;
        Ok((score + error)?)
    }
}
