//! The crate's one error type.

/// Everything that can go wrong in `scoresde`.
///
/// Library code never panics on user input: bad shapes, invalid hyperparameters,
/// numerical blow-ups and missing higher-order gradients all come back as an `Error`
/// whose message says what went wrong and, where it can, what to do about it.
///
/// ```
/// use scoresde::{sde::VpSde, Error};
/// let err = VpSde::new(20.0, 0.1).unwrap_err(); // inverted β range
/// assert!(matches!(err, Error::InvalidParameter(_)));
/// assert!(err.to_string().contains("beta_min"));
/// // Debug (what `fn main() -> scoresde::Result<()>` prints) carries the same text.
/// assert!(format!("{err:?}").contains("beta_min"));
/// ```
#[derive(thiserror::Error)]
pub enum Error {
    /// A constructor or function got a hyperparameter outside its valid range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),

    /// Tensors whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A NaN or an infinity appeared (in the input, or a solver blew up).
    #[error("non-finite values: {0}")]
    NonFinite(String),

    /// An adaptive solver had to shrink its step below what floating point can resolve.
    #[error("step size underflow at t = {t}: step {step:e} is below the smallest resolvable step; the ODE is likely stiff or the score blew up")]
    StepSizeUnderflow {
        /// Time at which the solver gave up.
        t: f64,
        /// The step size it would have needed.
        step: f64,
    },

    /// An adaptive solver used its whole evaluation budget before reaching its end time.
    #[error("evaluation budget of {budget} score/vector-field evaluations used up at t = {t} before reaching the end time; raise it (`with_max_nfe`), loosen the tolerances, or check the score for blow-ups")]
    EvaluationBudget {
        /// The budget (`max_nfe`).
        budget: usize,
        /// The time (the latest, for per-sample solvers) the solver had reached.
        t: f64,
    },

    /// candle's second-order gradients are not live on this thread.
    #[error("second-order gradients are not available on this thread: candle detaches gradient graphs unless the environment variable CANDLE_GRAD_DO_NOT_DETACH=1 is set before the thread first runs backprop. Set it in your shell, in `.cargo/config.toml` under [env], or with `std::env::set_var` at the very start of `main` before any thread is spawned")]
    HigherOrderGradientsUnavailable,

    /// A checkpoint that cannot be loaded into the model at hand.
    #[error("checkpoint: {0}")]
    Checkpoint(String),

    /// A training loss that became NaN or infinite.
    #[error("non-finite loss {loss} at training step {step}")]
    NonFiniteLoss {
        /// The step at which it happened (0-based).
        step: usize,
        /// The offending value.
        loss: f64,
    },

    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A data file that cannot be used: missing, malformed or truncated (the message names
    /// the file and says how to get a good one).
    #[error("data: {0}")]
    Data(String),

    /// An I/O error (checkpoints, images).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Debug prints the variant and the Display text: `fn main() -> scoresde::Result<()>`
/// reports an error with `{:?}`, and the Display text is where the instructions are.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let variant = match self {
            Self::InvalidParameter(_) => "InvalidParameter",
            Self::Shape(_) => "Shape",
            Self::NonFinite(_) => "NonFinite",
            Self::StepSizeUnderflow { .. } => "StepSizeUnderflow",
            Self::HigherOrderGradientsUnavailable => "HigherOrderGradientsUnavailable",
            Self::Checkpoint(_) => "Checkpoint",
            Self::NonFiniteLoss { .. } => "NonFiniteLoss",
            Self::Candle(_) => "Candle",
            Self::Io(_) => "Io",
            Self::Data(_) => "Data",
            Self::EvaluationBudget { .. } => "EvaluationBudget",
        };
        write!(f, "{variant}: {self}")
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// `Error::NonFinite` unless every entry of `x` is finite.
pub(crate) fn ensure_finite(x: &candle_core::Tensor, what: impl FnOnce() -> String) -> Result<()> {
    // A sum of finite values is finite unless it overflows, which is a blow-up too.
    let total = x
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    if total.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite(what()))
    }
}

/// Whether every entry of `x` is finite (integer tensors always are).
pub(crate) fn is_finite(x: &candle_core::Tensor) -> Result<bool> {
    if !x.dtype().is_float() {
        return Ok(true);
    }
    // x·0 is 0 where x is finite and NaN where it is NaN or ±inf; a sum of zeros cannot
    // overflow, so only a non-finite entry makes the sum NaN.
    let probe = x.detach().affine(0.0, 0.0)?.sum_all()?;
    Ok(probe
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?
        .is_finite())
}

/// `value` if every entry is finite; otherwise `Error::NonFinite` saying whether one of the
/// named `inputs` already held NaN or inf, or the computation overflowed. For the building
/// blocks (scores, perturbations, derivatives, residuals): NaN in never becomes NaN out.
pub(crate) fn finite_result(
    value: candle_core::Tensor,
    what: &str,
    inputs: &[(&str, &candle_core::Tensor)],
) -> Result<candle_core::Tensor> {
    if is_finite(&value)? {
        return Ok(value);
    }
    for (name, input) in inputs {
        if !is_finite(input)? {
            return Err(Error::NonFinite(format!(
                "{what}: the input {name} holds NaN or inf; check the data (or the state) you pass"
            )));
        }
    }
    Err(Error::NonFinite(format!(
        "{what} is not finite although its inputs are: values far outside the data's scale \
         overflow (rescale the inputs, or check the model's weights)"
    )))
}

/// Returns `Err(Error::InvalidParameter)` with `msg` unless `ok`.
pub(crate) fn ensure(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidParameter(msg()))
    }
}

/// [`ensure`] that a hyperparameter is finite and strictly positive.
pub(crate) fn ensure_positive(name: &str, value: f64) -> Result<()> {
    ensure(value.is_finite() && value > 0.0, || {
        format!("{name} must be finite and > 0, got {value}")
    })
}

/// The most elements one up-front allocation of the crate takes (2³⁰: 8 GiB of f64). An
/// absurd size becomes an error that names it instead of a capacity-overflow panic or an
/// allocation abort.
pub(crate) const MAX_ELEMENTS: usize = 1 << 30;

/// The number of elements of `dims` (`what` names the allocation), or an error when it
/// overflows `usize` or exceeds [`MAX_ELEMENTS`].
pub(crate) fn checked_elements(dims: &[usize], what: &str) -> Result<usize> {
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match count {
        Some(n) if n <= MAX_ELEMENTS => Ok(n),
        _ => Err(Error::InvalidParameter(format!(
            "{what} of shape {dims:?} would hold {} elements; the limit is {MAX_ELEMENTS} (2^30): \
             draw fewer or smaller samples, in batches",
            count.map_or("more than usize::MAX".to_string(), |n| n.to_string())
        ))),
    }
}
