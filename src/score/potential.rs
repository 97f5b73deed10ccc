//! [`GradientScore`]: the score `∇ₓu` of a log-density (potential) model, by autodiff.

use candle_core::Tensor;

use crate::autodiff;
use crate::score::{LogDensityModel, ScoreModel};
use crate::train::{ObjectiveGradients, ObjectiveTerms};
use crate::{Error, Result};

/// The score `s = ∇ₓu(x, t)` of a log-density model `u`, computed by candle autodiff.
///
/// * If the `x` you pass is a tracked leaf (from [`autodiff::leaf`]), the gradient is taken
///   with respect to that very tensor, so the score stays a function of your `x` and you can
///   differentiate it again: [`autodiff::divergence_exact`] of the score is the Laplacian
///   `Δu` (the log-density Fokker–Planck residual needs it).
/// * Otherwise `x` is copied into a fresh leaf; the score then depends on the model's
///   parameters (so a loss on it trains `u`) but not on the graph `x` came from.
///
/// [`GradientScore::new`] keeps the graph and therefore calls
/// [`autodiff::ensure_higher_order_gradients`]: training through the score is a
/// gradient of a gradient. For sampling only, [`GradientScore::values_only`] returns the
/// score detached from the graph and needs no second-order gradients, except when `x` is a
/// tracked leaf, where it behaves exactly like `new` (a derivative of the score must never be
/// silently zero).
///
/// `u(x, t)` must return shape `[B]` with samples independent of each other, since the
/// gradient is taken of `Σ_b u(x_b, t_b)`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::autodiff::{divergence_exact, leaf};
/// use scoresde::{GradientScore, ScoreModel, score::LogDensityModel};
/// // u(x) = -|x|²/2: the standard normal, score -x, Laplacian -d.
/// struct StandardNormal;
/// impl LogDensityModel for StandardNormal {
///     fn log_density(&self, x: &Tensor, _t: &Tensor) -> scoresde::Result<Tensor> {
///         Ok((x.sqr()?.sum(1)? * -0.5)?)
///     }
/// }
/// let model = GradientScore::new(StandardNormal);
/// let x = leaf(&Tensor::new(&[[1.0f64, -2.0]], &Device::Cpu)?)?;
/// let t = Tensor::new(&[0.5f64], &Device::Cpu)?;
/// let s = model.score(&x, &t)?;
/// assert_eq!(s.to_vec2::<f64>()?, [[-1.0, 2.0]]);
/// assert_eq!(divergence_exact(&s, &x)?.to_vec1::<f64>()?, [-2.0]);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct GradientScore<M> {
    inner: M,
    values_only: bool,
}

impl<M: LogDensityModel> GradientScore<M> {
    /// The score of `inner`, kept in the graph: trainable and differentiable again.
    /// Needs second-order gradients (checked on every call; free after the first per thread).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use scoresde::{GradientScore, ScoreModel, score::LogDensityModel};
    /// struct Quadratic; // u(x) = -|x|²
    /// impl LogDensityModel for Quadratic {
    ///     fn log_density(&self, x: &Tensor, _t: &Tensor) -> scoresde::Result<Tensor> {
    ///         Ok(x.sqr()?.sum(1)?.neg()?)
    ///     }
    /// }
    /// let x = Tensor::new(&[[1.0f64, 3.0]], &Device::Cpu)?;
    /// let t = Tensor::new(&[0.0f64], &Device::Cpu)?;
    /// let s = GradientScore::new(Quadratic).score(&x, &t)?;
    /// assert_eq!(s.to_vec2::<f64>()?, [[-2.0, -6.0]]);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn new(inner: M) -> Self {
        Self {
            inner,
            values_only: false,
        }
    }

    /// The score of `inner` for sampling: values only, detached from the graph, computed
    /// with first-order gradients alone, so it works without `CANDLE_GRAD_DO_NOT_DETACH`.
    /// A tracked-leaf `x` still gets a tracked (and guarded) score, as with [`Self::new`].
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use scoresde::{GradientScore, ScoreModel, score::LogDensityModel};
    /// struct Quadratic; // u(x) = -|x|²
    /// impl LogDensityModel for Quadratic {
    ///     fn log_density(&self, x: &Tensor, _t: &Tensor) -> scoresde::Result<Tensor> {
    ///         Ok(x.sqr()?.sum(1)?.neg()?)
    ///     }
    /// }
    /// let x = Tensor::new(&[[1.0f64, 3.0]], &Device::Cpu)?;
    /// let t = Tensor::new(&[0.0f64], &Device::Cpu)?;
    /// let s = GradientScore::values_only(Quadratic).score(&x, &t)?;
    /// assert_eq!(s.to_vec2::<f64>()?, [[-2.0, -6.0]]);
    /// assert!(s.sorted_nodes().is_empty()); // no graph attached
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn values_only(inner: M) -> Self {
        Self {
            inner,
            values_only: true,
        }
    }

    /// The wrapped log-density model.
    ///
    /// ```
    /// use candle_core::Tensor;
    /// use scoresde::{GradientScore, score::LogDensityModel};
    /// struct Flat(f64);
    /// impl LogDensityModel for Flat {
    ///     fn log_density(&self, x: &Tensor, _t: &Tensor) -> scoresde::Result<Tensor> {
    ///         Ok((x.sum(1)?.zeros_like()? + self.0)?)
    ///     }
    /// }
    /// assert_eq!(GradientScore::new(Flat(3.0)).inner().0, 3.0);
    /// ```
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// Unwraps the log-density model.
    ///
    /// ```
    /// use candle_core::Tensor;
    /// use scoresde::{GradientScore, score::LogDensityModel};
    /// struct Flat(f64);
    /// impl LogDensityModel for Flat {
    ///     fn log_density(&self, x: &Tensor, _t: &Tensor) -> scoresde::Result<Tensor> {
    ///         Ok((x.sum(1)?.zeros_like()? + self.0)?)
    ///     }
    /// }
    /// assert_eq!(GradientScore::new(Flat(3.0)).into_inner().0, 3.0);
    /// ```
    pub fn into_inner(self) -> M {
        self.inner
    }

    /// Whether this adapter was made by [`Self::values_only`].
    ///
    /// ```
    /// use candle_core::Tensor;
    /// use scoresde::{GradientScore, score::LogDensityModel};
    /// struct Flat;
    /// impl LogDensityModel for Flat {
    ///     fn log_density(&self, x: &Tensor, _t: &Tensor) -> scoresde::Result<Tensor> {
    ///         Ok(x.sum(1)?.zeros_like()?)
    ///     }
    /// }
    /// assert!(!GradientScore::new(Flat).is_values_only());
    /// assert!(GradientScore::values_only(Flat).is_values_only());
    /// ```
    pub fn is_values_only(&self) -> bool {
        self.values_only
    }

    /// `u(x, t)`, checked to have shape `[B]`.
    fn checked_log_density(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let u = self.inner.log_density(x, t)?;
        let b = x
            .dims()
            .first()
            .copied()
            .ok_or_else(|| Error::Shape("GradientScore: x is a scalar; it needs shape [B, …]".into()))?;
        if u.dims() != [b] {
            return Err(Error::Shape(format!(
                "GradientScore: the log-density model returned shape {:?} for x of shape {:?}; \
                 it must return one value per sample, shape [{b}]",
                u.dims(),
                x.dims()
            )));
        }
        Ok(u)
    }
}

impl<M: LogDensityModel> ScoreModel for GradientScore<M> {
    /// `∇ₓu(x, t)`, shape of `x`. Guarded unless values-only with an untracked `x`.
    /// Autodiff results are checked for finiteness by `grad` itself; a hand-written
    /// `score_values` is checked here.
    fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        if x.is_variable() {
            let u = self.checked_log_density(x, t)?;
            return autodiff::grad(&u, x);
        }
        if self.values_only {
            if let Some(score) = self.inner.score_values(x, t)? {
                return crate::error::finite_result(score, "GradientScore's score", &[("x", x)]);
            }
        }
        let x_leaf = autodiff::leaf(x)?;
        let u = self.checked_log_density(&x_leaf, t)?;
        if self.values_only {
            Ok(autodiff::grad_unguarded(&u, &x_leaf)?.detach())
        } else {
            autodiff::grad(&u, &x_leaf)
        }
    }

    /// The wrapped model's hand-written pass, if it has one (not for values-only
    /// wrappers, whose scores carry no gradient).
    fn objective_gradients(&self, terms: &ObjectiveTerms<'_>) -> Result<Option<ObjectiveGradients>> {
        if self.values_only {
            return Ok(None);
        }
        self.inner.objective_gradients(terms)
    }
}

impl<M: LogDensityModel> LogDensityModel for GradientScore<M> {
    /// Forwards to the wrapped model.
    fn log_density(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.inner.log_density(x, t)
    }

    /// Forwards to the wrapped model.
    fn score_values(&self, x: &Tensor, t: &Tensor) -> Result<Option<Tensor>> {
        self.inner.score_values(x, t)
    }

    /// Forwards to the wrapped model.
    fn objective_gradients(&self, terms: &ObjectiveTerms<'_>) -> Result<Option<ObjectiveGradients>> {
        self.inner.objective_gradients(terms)
    }
}
