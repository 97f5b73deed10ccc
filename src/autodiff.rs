//! Input derivatives that stay inside the training graph: gradients, vector–Jacobian
//! products, exact and Hutchinson divergences, time derivatives of a score model, and the
//! higher-order-gradient guard.
//!
//! # The model: `torch.autograd.grad(…, create_graph=True)`
//!
//! Every function here works like PyTorch's `torch.autograd.grad(outputs, inputs,
//! create_graph=True)`: you first make a tracked **leaf** for the input with [`leaf`],
//! compute an output from it with ordinary candle ops (your network), and then ask for a
//! derivative of that output with respect to the leaf. The result is itself a tensor in the
//! graph: it depends on the leaf and on every model parameter, so it can be differentiated
//! again (a divergence of a gradient is a Laplacian) or put into a loss and trained through
//! (a Fokker–Planck regularizer).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use scoresde::autodiff::{grad, leaf};
//! let x = leaf(&Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu)?)?; // [B = 1, d = 2]
//! let u = x.sqr()?.sum(1)?;                 // u(x) = |x|², shape [B]
//! let g = grad(&u, &x)?;                    // ∇u = 2x, still in the graph
//! assert_eq!(g.to_vec2::<f64>()?, [[2.0, 4.0]]);
//! let h = grad(&g.sum(1)?, &x)?;            // ∂/∂x of Σ∇u = 2 per coordinate
//! assert_eq!(h.to_vec2::<f64>()?, [[2.0, 2.0]]);
//! # Ok::<(), scoresde::Error>(())
//! ```
//!
//! Derivatives are taken of the **sum** of the output over the batch, so a per-sample
//! derivative is what you get only when samples do not interact (no batch normalisation or
//! attention across the batch); every network in this crate satisfies that.
//!
//! # The candle caveat: second-order gradients need `CANDLE_GRAD_DO_NOT_DETACH`
//!
//! candle (0.11.1) detaches every intermediate gradient during backprop unless the
//! environment variable `CANDLE_GRAD_DO_NOT_DETACH` is set (to anything but `0`) before the
//! thread first runs backprop; the variable is read once per thread. Without it candle does
//! **not** fail: a gradient of a gradient through `mul`, `matmul` or `tanh` comes back
//! silently wrong. This module therefore checks, once per thread, that second-order gradients
//! are live ([`ensure_higher_order_gradients`]) and returns
//! [`Error::HigherOrderGradientsUnavailable`] when they are not. The check runs at the start
//! of every function whose result is meant to be differentiated again or trained through:
//! [`grad`], [`vjp`], [`divergence_exact`], [`divergence_hutchinson`],
//! [`time_derivative_autodiff`], and [`GradientScore::score`](crate::GradientScore) (see
//! there for its values-only mode). It costs one tiny double backward pass the first time on
//! each thread, and a thread-local read after that.
//!
//! Set the variable in your shell (`CANDLE_GRAD_DO_NOT_DETACH=1 cargo run`), in
//! `.cargo/config.toml` under `[env]`, or with `std::env::set_var` at the very start of
//! `main`, before any thread is spawned.
//!
//! Not every candle op has a backward pass: the fused candle-nn layer-norm, RMS-norm and
//! `softmax_last_dim` kernels have none at all, so networks differentiated here must be built
//! from primitive ops (their errors come back as [`Error::Candle`]).

use std::cell::Cell;

use candle_core::{DType, Device, Shape, Tensor, Var};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::finite_result;
use crate::sde::per_sample;
use crate::{Error, Result, ScoreModel};

/// Default backward step `hs` of the three-point time stencil in [`time_derivative_fd`]
/// (FP-Diffusion's value).
///
/// ```
/// assert_eq!(scoresde::autodiff::DEFAULT_FD_HS, 1e-3);
/// ```
pub const DEFAULT_FD_HS: f64 = 1e-3;

/// Default forward step `hd` of the three-point time stencil in [`time_derivative_fd`]
/// (FP-Diffusion's value).
///
/// ```
/// assert_eq!(scoresde::autodiff::DEFAULT_FD_HD, 5e-4);
/// ```
pub const DEFAULT_FD_HD: f64 = 5e-4;

// ---------------------------------------------------------------------------------------
// Leaves and first derivatives
// ---------------------------------------------------------------------------------------

/// A tracked leaf copy of `x`: the input you differentiate with respect to.
///
/// If `x` already is a tracked leaf (a candle [`Var`]'s tensor) it is returned as is, so
/// derivatives taken further down still refer to the caller's leaf; otherwise its values are
/// copied into a fresh leaf, cut from whatever graph `x` had. Any shape; float dtypes only.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::autodiff::leaf;
/// let x = Tensor::new(&[1.0f64, 2.0], &Device::Cpu)?;
/// let xl = leaf(&x)?;
/// assert!(xl.is_variable() && !x.is_variable());
/// assert_eq!(leaf(&xl)?.id(), xl.id()); // a leaf is returned as is
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn leaf(x: &Tensor) -> Result<Tensor> {
    check_float("leaf", "x", x)?;
    Ok(Var::from_tensor(x)?.into_inner())
}

/// Gradient of `y.sum()` with respect to the leaf `x`, keeping the graph.
///
/// `y` has any shape and must have been computed from `x`; the result has the shape of `x`.
/// For `y` of shape `[B]` computed sample by sample, row `b` is `∇ₓ y_b`. The result stays in
/// the graph, so it can be differentiated again or trained through; if `y` does not depend on
/// `x` it is zeros. Errors if `x` is not a tracked leaf (make it with [`leaf`]) and, like
/// every second-order entry point, if second-order gradients are unavailable
/// ([`ensure_higher_order_gradients`]).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::autodiff::{grad, leaf};
/// let x = leaf(&Tensor::new(&[[1.0f64, 2.0], [3.0, 4.0]], &Device::Cpu)?)?;
/// let y = (x.sqr()?.sum(1)? * 0.5)?; // u(x) = |x|²/2 per sample, shape [2]
/// assert_eq!(grad(&y, &x)?.to_vec2::<f64>()?, [[1.0, 2.0], [3.0, 4.0]]);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn grad(y: &Tensor, x: &Tensor) -> Result<Tensor> {
    ensure_higher_order_gradients()?;
    grad_unguarded(y, x)
}

/// [`grad`] without the higher-order guard. Its values are right whether or not candle keeps
/// gradient graphs; only differentiating its result again needs the guard.
pub(crate) fn grad_unguarded(y: &Tensor, x: &Tensor) -> Result<Tensor> {
    let [g] = checked_grads("grad", y, [x])?;
    finite_result(g, "grad", &[("y", y)])
}

/// The gradients of `y.sum()` with respect to several leaves from one backward pass,
/// keeping the graph: what [`grad`] gives for each leaf, at the cost of one call.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::autodiff::{grads, leaf};
/// let x = leaf(&Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu)?)?;
/// let t = leaf(&Tensor::new(&[3.0f64], &Device::Cpu)?)?;
/// let u = (x.sqr()?.sum(1)? * &t)?; // u = t·|x|², shape [1]
/// let [du_dx, du_dt] = grads(&u, [&x, &t])?;
/// assert_eq!(du_dx.to_vec2::<f64>()?, [[6.0, 12.0]]);
/// assert_eq!(du_dt.to_vec1::<f64>()?, [5.0]);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn grads<const N: usize>(y: &Tensor, leaves: [&Tensor; N]) -> Result<[Tensor; N]> {
    ensure_higher_order_gradients()?;
    let gradients = checked_grads("grads", y, leaves)?;
    for g in &gradients {
        finite_result(g.clone(), "grads", &[("y", y)])?;
    }
    Ok(gradients)
}

/// [`grads`] without the guard, after checking its inputs for `func`'s errors.
fn checked_grads<const N: usize>(func: &str, y: &Tensor, leaves: [&Tensor; N]) -> Result<[Tensor; N]> {
    check_float(func, "y", y)?;
    for x in leaves {
        check_leaf(func, x)?;
        if !y.device().same_device(x.device()) {
            return Err(Error::InvalidParameter(format!(
                "{func}: y is on {:?} but x is on {:?}",
                y.device(),
                x.device()
            )));
        }
    }
    grads_unguarded(y, leaves)
}

/// [`grads`] without its checks and the guard (zeros for a leaf `y` does not depend on).
fn grads_unguarded<const N: usize>(y: &Tensor, leaves: [&Tensor; N]) -> Result<[Tensor; N]> {
    // candle's backward panics on some empty tensors; an empty y has zero gradients.
    let grads = if y.elem_count() == 0 {
        None
    } else {
        Some(y.sum_all()?.backward()?)
    };
    let mut out = Vec::with_capacity(N);
    for x in leaves {
        out.push(match grads.as_ref().and_then(|g| g.get(x)) {
            Some(g) => g.clone(),
            None => x.zeros_like()?,
        });
    }
    out.try_into()
        .map_err(|_| Error::InvalidParameter("grads: one gradient per leaf".into()))
}

/// Vector–Jacobian product `vᵀ ∂y/∂x`: the gradient of `(y · v).sum()` with respect to the
/// leaf `x`, keeping the graph.
///
/// `v` has the shape and dtype of `y`; the result has the shape of `x`. For per-sample `y`
/// and `x` of shapes `[B, …]`, row `b` is `v_bᵀ ∂y_b/∂x_b`. `v` is a weight that must not
/// depend on `x` (a constant, or a tensor depending only on other variables, through which
/// the result stays differentiable); a `v` computed from `x` is an error, because the product
/// rule would silently add `(∂v/∂x)ᵀ y`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::autodiff::{leaf, vjp};
/// let x = leaf(&Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu)?)?;
/// // y = (x0·x1, x1²): Jacobian [[x1, x0], [0, 2x1]] = [[2, 1], [0, 4]].
/// let x0 = x.narrow(1, 0, 1)?;
/// let x1 = x.narrow(1, 1, 1)?;
/// let y = Tensor::cat(&[(&x0 * &x1)?, x1.sqr()?], 1)?;
/// let v = Tensor::new(&[[1.0f64, 1.0]], &Device::Cpu)?;
/// assert_eq!(vjp(&y, &x, &v)?.to_vec2::<f64>()?, [[2.0, 5.0]]);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn vjp(y: &Tensor, x: &Tensor, v: &Tensor) -> Result<Tensor> {
    ensure_higher_order_gradients()?;
    vjp_unguarded(y, x, v)
}

fn vjp_unguarded(y: &Tensor, x: &Tensor, v: &Tensor) -> Result<Tensor> {
    check_leaf("vjp", x)?;
    if v.shape() != y.shape() {
        return Err(Error::Shape(format!(
            "vjp: v has shape {:?} but y has shape {:?}",
            v.dims(),
            y.dims()
        )));
    }
    if v.dtype() != y.dtype() {
        return Err(Error::InvalidParameter(format!(
            "vjp: v has dtype {:?} but y has dtype {:?}",
            v.dtype(),
            y.dtype()
        )));
    }
    if depends_on(v, x) {
        return Err(Error::InvalidParameter(
            "vjp: v depends on x; the product rule would add (∂v/∂x)ᵀy to vᵀ∂y/∂x. \
             Pass a v computed without x (e.g. v.detach())"
                .into(),
        ));
    }
    grad_unguarded(&(y * v)?, x)
}

// ---------------------------------------------------------------------------------------
// Divergences
// ---------------------------------------------------------------------------------------

/// Exact divergence `∇·y = Σᵢ ∂yᵢ/∂xᵢ` per sample, keeping the graph: shape `[B]`.
///
/// `y` and the leaf `x` have the same shape `[B, …]`; the trailing dimensions are flattened
/// into `d` coordinates and the divergence costs `d` backward passes. Samples must not
/// interact (see the module docs). Calls the higher-order guard first.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::autodiff::{divergence_exact, leaf};
/// let x = leaf(&Tensor::new(&[[1.0f64, 2.0], [0.5, -1.0]], &Device::Cpu)?)?;
/// let y = x.sqr()?; // ∇·y = 2(x0 + x1)
/// assert_eq!(divergence_exact(&y, &x)?.to_vec1::<f64>()?, [6.0, -1.0]);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn divergence_exact(y: &Tensor, x: &Tensor) -> Result<Tensor> {
    ensure_higher_order_gradients()?;
    divergence_exact_unguarded(y, x)
}

/// [`divergence_exact`] without the guard, for a caller that neither trains through the
/// result nor differentiates a score that is itself a gradient (which guards itself).
fn divergence_exact_unguarded(y: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (b, d) = check_same_batched_shape("divergence_exact", y, x)?;
    check_leaf("divergence_exact", x)?;
    check_float("divergence_exact", "y", y)?;
    if d == 0 {
        return Ok(Tensor::zeros(b, y.dtype(), y.device())?);
    }
    let rows = coordinate_grads("divergence_exact", &y.reshape((b, d))?, [x])?;
    let diagonal = (0..d)
        .map(|i| Ok(rows[i][0].reshape((b, d))?.narrow(1, i, 1)?))
        .collect::<Result<Vec<_>>>()?;
    finite_result(
        Tensor::cat(&diagonal, 1)?.sum(1)?,
        "divergence_exact",
        &[("y", y)],
    )
}

/// One backward pass per coordinate `yᵢ` of `y_flat` (`[B, d]`): the gradients of
/// `Σ_b y_{b,i}` with respect to each leaf, keeping the graph (no guard: callers check).
fn coordinate_grads<const N: usize>(
    func: &str,
    y_flat: &Tensor,
    leaves: [&Tensor; N],
) -> Result<Vec<[Tensor; N]>> {
    (0..y_flat.dim(1)?)
        .map(|i| checked_grads(func, &y_flat.narrow(1, i, 1)?, leaves))
        .collect()
}

/// The distribution of a Hutchinson probe vector: both have mean zero and identity
/// covariance, so `E[vᵀ A v] = tr A`.
///
/// Rademacher probes (±1 entries) have the smaller variance, `2 Σ_{i≠j} A_ij²` for symmetric
/// `A`; Gaussian probes add `2 Σᵢ A_ii²`. Probes come from a seeded [`rand::Rng`] (candle's
/// own CPU generator cannot be seeded), so a run repeats exactly.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::autodiff::Probe;
/// let x = Tensor::zeros((2, 3), candle_core::DType::F64, &Device::Cpu)?;
/// let v = Probe::Rademacher.sample(&x, &mut StdRng::seed_from_u64(0))?;
/// assert_eq!(v.dims(), [2, 3]);
/// assert!(v.flatten_all()?.to_vec1::<f64>()?.iter().all(|e| e.abs() == 1.0));
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Probe {
    /// Independent entries ±1 with probability ½ each.
    Rademacher,
    /// Independent standard normal entries.
    Gaussian,
}

impl Probe {
    /// One probe with the shape, dtype and device of `like` (typically the input `x`).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use scoresde::autodiff::Probe;
    /// let x = Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?;
    /// let mut rng = StdRng::seed_from_u64(7);
    /// let v = Probe::Gaussian.sample(&x, &mut rng)?;
    /// assert_eq!((v.dims(), v.dtype()), ([4, 2].as_slice(), DType::F32));
    /// // Same seed, same probe.
    /// let w = Probe::Gaussian.sample(&x, &mut StdRng::seed_from_u64(7))?;
    /// assert_eq!(v.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn sample<R: Rng + ?Sized>(&self, like: &Tensor, rng: &mut R) -> Result<Tensor> {
        check_float("Probe::sample", "like", like)?;
        let n = like.elem_count();
        let data: Vec<f64> = match self {
            Probe::Rademacher => (0..n)
                .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
                .collect(),
            Probe::Gaussian => (0..n).map(|_| StandardNormal.sample(rng)).collect(),
        };
        tensor_from_f64(data, like.shape(), like.dtype(), like.device())
    }

    /// `k` independent probes shaped like `like`, for [`divergence_hutchinson`].
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use scoresde::autodiff::Probe;
    /// let x = Tensor::zeros((4, 2), DType::F64, &Device::Cpu)?;
    /// let probes = Probe::Rademacher.sample_many(&x, 3, &mut StdRng::seed_from_u64(1))?;
    /// assert_eq!(probes.len(), 3);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn sample_many<R: Rng + ?Sized>(&self, like: &Tensor, k: usize, rng: &mut R) -> Result<Vec<Tensor>> {
        (0..k).map(|_| self.sample(like, rng)).collect()
    }
}

/// The most Hutchinson probes [`Divergence::validate`] accepts.
///
/// ```
/// use scoresde::autodiff::{Divergence, Probe, MAX_PROBES};
/// let too_many = Divergence::Hutchinson { probe: Probe::Rademacher, probes: MAX_PROBES + 1 };
/// assert!(too_many.validate().is_err());
/// ```
pub const MAX_PROBES: usize = 4096;

/// How a divergence `∇·y` is computed: exactly, or by Hutchinson's estimator.
///
/// One choice for every place that needs a divergence (likelihoods, both Fokker–Planck
/// regularizers). Probes are drawn separately ([`Divergence::draw_probes`]) so a caller can
/// keep them fixed, as the likelihood ODE does for a whole solve.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::autodiff::{leaf, Divergence, Probe};
/// let x = leaf(&Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu)?)?;
/// let y = (&x * 3.0)?;
/// for method in [Divergence::Exact, Divergence::Hutchinson { probe: Probe::Rademacher, probes: 2 }] {
///     let probes = method.draw_probes(&x, &mut StdRng::seed_from_u64(0))?;
///     assert_eq!(method.evaluate(&y, &x, &probes)?.to_vec1::<f64>()?, [6.0]);
/// }
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Divergence {
    /// The exact trace of the Jacobian: one backward pass per dimension.
    Exact,
    /// Hutchinson: the mean of `vᵀ(∂y/∂x)v` over `probes` probes; unbiased, one backward
    /// pass per probe.
    Hutchinson {
        /// The probe distribution.
        probe: Probe,
        /// Probes per sample (at least 1).
        probes: usize,
    },
}

impl Divergence {
    /// Checks the settings (at least one Hutchinson probe).
    ///
    /// ```
    /// use scoresde::autodiff::{Divergence, Probe};
    /// assert!(Divergence::Hutchinson { probe: Probe::Gaussian, probes: 0 }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        match self {
            Divergence::Hutchinson { probes: 0, .. } => Err(Error::InvalidParameter(
                "Hutchinson's estimator needs at least one probe".into(),
            )),
            // Each probe costs a backward pass: beyond this the exact divergence is cheaper
            // for any data this crate can hold, and usize::MAX probes would run for ever.
            Divergence::Hutchinson { probes, .. } if *probes > MAX_PROBES => Err(Error::InvalidParameter(
                format!("{probes} Hutchinson probes requested; at most {MAX_PROBES} (use Divergence::Exact)"),
            )),
            _ => Ok(()),
        }
    }

    /// The probes this method needs for inputs shaped like `like` (none for `Exact`).
    pub fn draw_probes<R: Rng + ?Sized>(&self, like: &Tensor, rng: &mut R) -> Result<Vec<Tensor>> {
        self.validate()?;
        match self {
            Divergence::Exact => Ok(Vec::new()),
            Divergence::Hutchinson { probe, probes } => probe.sample_many(like, *probes, rng),
        }
    }

    /// `Error::InvalidParameter` unless `probes` holds as many probes as this method
    /// draws (none for `Exact`): for probes a caller supplies.
    ///
    /// ```
    /// use scoresde::autodiff::{Divergence, Probe};
    /// let two = Divergence::Hutchinson { probe: Probe::Rademacher, probes: 2 };
    /// assert!(two.check_probes(&[]).is_err());
    /// assert!(Divergence::Exact.check_probes(&[]).is_ok());
    /// ```
    pub fn check_probes(&self, probes: &[Tensor]) -> Result<()> {
        let wanted = match self {
            Divergence::Exact => 0,
            Divergence::Hutchinson { probes, .. } => *probes,
        };
        if probes.len() == wanted {
            Ok(())
        } else {
            Err(Error::InvalidParameter(format!(
                "{wanted} probes expected for {self:?}, got {}; draw them with Divergence::draw_probes",
                probes.len()
            )))
        }
    }

    /// `∇·y` per sample, `[B]`, with probes from [`Self::draw_probes`].
    pub fn evaluate(&self, y: &Tensor, x: &Tensor, probes: &[Tensor]) -> Result<Tensor> {
        match self {
            Divergence::Exact => divergence_exact(y, x),
            Divergence::Hutchinson { .. } => divergence_hutchinson(y, x, probes),
        }
    }

    /// [`Self::evaluate`] for a result that is only read, never trained through: first-order
    /// gradients suffice, so no guard. A score that is itself a gradient
    /// ([`GradientScore`](crate::GradientScore) on a leaf) checks for itself.
    pub(crate) fn evaluate_first_order(&self, y: &Tensor, x: &Tensor, probes: &[Tensor]) -> Result<Tensor> {
        match self {
            Divergence::Exact => divergence_exact_unguarded(y, x),
            Divergence::Hutchinson { .. } => divergence_hutchinson_unguarded(y, x, probes),
        }
    }
}

/// Hutchinson estimate of the divergence per sample, keeping the graph: the mean over the
/// given probes `v` of `vᵀ (∂y/∂x) v`, shape `[B]`.
///
/// `y` and the leaf `x` have the same shape `[B, …]`; every probe has that shape and `y`'s
/// dtype (draw them with [`Probe::sample`] / [`Probe::sample_many`]). One backward pass per
/// probe. The estimate is unbiased for zero-mean, identity-covariance probes. Passing the
/// probes in, rather than drawing them here, lets a likelihood ODE keep one probe per sample
/// for a whole solve (Hutchinson–Skilling). Calls the higher-order guard first.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::autodiff::{divergence_hutchinson, leaf, Probe};
/// let x = leaf(&Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu)?)?;
/// let y = (&x * 3.0)?; // Jacobian 3·I: Rademacher probes give the trace 6 exactly
/// let probes = Probe::Rademacher.sample_many(&x, 2, &mut StdRng::seed_from_u64(0))?;
/// assert_eq!(divergence_hutchinson(&y, &x, &probes)?.to_vec1::<f64>()?, [6.0]);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn divergence_hutchinson(y: &Tensor, x: &Tensor, probes: &[Tensor]) -> Result<Tensor> {
    ensure_higher_order_gradients()?;
    divergence_hutchinson_unguarded(y, x, probes)
}

/// [`divergence_hutchinson`] without the guard (see [`divergence_exact_unguarded`]).
fn divergence_hutchinson_unguarded(y: &Tensor, x: &Tensor, probes: &[Tensor]) -> Result<Tensor> {
    let (b, d) = check_same_batched_shape("divergence_hutchinson", y, x)?;
    check_leaf("divergence_hutchinson", x)?;
    if probes.is_empty() {
        return Err(Error::InvalidParameter(
            "divergence_hutchinson: no probes given; pass at least one".into(),
        ));
    }
    let mut total: Option<Tensor> = None;
    for (k, v) in probes.iter().enumerate() {
        if v.shape() != y.shape() {
            return Err(Error::Shape(format!(
                "divergence_hutchinson: probe {k} has shape {:?} but y has shape {:?}",
                v.dims(),
                y.dims()
            )));
        }
        let jv = vjp_unguarded(y, x, v)?;
        let quad = (jv * v)?.reshape((b, d))?.sum(1)?;
        total = Some(match total {
            None => quad,
            Some(t) => (t + quad)?,
        });
    }
    let total = total.ok_or_else(|| Error::InvalidParameter("no probes".into()))?;
    finite_result(
        (total / probes.len() as f64)?,
        "divergence_hutchinson",
        &[("y", y)],
    )
}

// ---------------------------------------------------------------------------------------
// Time derivatives of a score model
// ---------------------------------------------------------------------------------------

/// `∂s/∂t` of a score model at `(x, t)` by autodiff, keeping the graph: the shape of `x`.
///
/// `x` has shape `[B, …]` and `t` shape `[B]`. `t` is made a leaf (kept as is if it already
/// is one), the score is evaluated once, and each of its `d` coordinates costs one backward
/// pass. Calls the higher-order guard first.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::{autodiff::time_derivative_autodiff, Result};
/// // s(x, t) = -x / (1 + t²), so ∂s/∂t = 2t·x / (1 + t²)².
/// let model = |x: &Tensor, t: &Tensor| -> Result<Tensor> {
///     let var = (t.sqr()? + 1.0)?.unsqueeze(1)?;
///     Ok(x.neg()?.broadcast_div(&var)?)
/// };
/// let x = Tensor::new(&[[1.0f64, -2.0]], &Device::Cpu)?;
/// let t = Tensor::new(&[1.0f64], &Device::Cpu)?;
/// let ds = time_derivative_autodiff(&model, &x, &t)?;
/// assert_eq!(ds.to_vec2::<f64>()?, [[0.5, -1.0]]);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn time_derivative_autodiff<M: ScoreModel + ?Sized>(model: &M, x: &Tensor, t: &Tensor) -> Result<Tensor> {
    ensure_higher_order_gradients()?;
    let (b, d) = check_x_t("time_derivative_autodiff", x, t)?;
    let t_leaf = leaf(t)?;
    let s = model.score(x, &t_leaf)?;
    check_score_shape("time_derivative_autodiff", &s, x)?;
    if d == 0 {
        return Ok(s.zeros_like()?);
    }
    let rows = coordinate_grads("time_derivative_autodiff", &s.reshape((b, d))?, [&t_leaf])?;
    let columns = rows
        .iter()
        .map(|[g]| Ok(g.reshape((b, 1))?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&columns, 1)?.reshape(x.shape())?)
}

/// The exact divergence `∇ₓ·s` (`[B]`) and `∂ₜs` (`[B, d]`) of a score `s` (`[B, …]`)
/// computed from the leaves `x` and `t`, keeping the graph: `d` backward passes in all,
/// since the pass of each coordinate `sᵢ` gives its gradient in `x` and in `t` at once
/// (half the passes of [`divergence_exact`] then [`time_derivative_autodiff`]).
pub(crate) fn divergence_and_time_derivative(s: &Tensor, x: &Tensor, t: &Tensor) -> Result<(Tensor, Tensor)> {
    ensure_higher_order_gradients()?;
    let (b, d) = check_same_batched_shape("divergence_and_time_derivative", s, x)?;
    check_x_t("divergence_and_time_derivative", x, t)?;
    check_leaf("divergence_and_time_derivative", x)?;
    check_leaf("divergence_and_time_derivative", t)?;
    check_float("divergence_and_time_derivative", "s", s)?;
    if d == 0 {
        return Ok((
            Tensor::zeros(b, s.dtype(), s.device())?,
            s.reshape((b, d))?.zeros_like()?,
        ));
    }
    let rows = coordinate_grads("divergence_and_time_derivative", &s.reshape((b, d))?, [x, t])?;
    let mut diagonal = Vec::with_capacity(d);
    let mut columns = Vec::with_capacity(d);
    for (i, [gx, gt]) in rows.iter().enumerate() {
        diagonal.push(gx.reshape((b, d))?.narrow(1, i, 1)?);
        columns.push(gt.reshape((b, 1))?);
    }
    Ok((Tensor::cat(&diagonal, 1)?.sum(1)?, Tensor::cat(&columns, 1)?))
}

/// `∂s/∂t` of a score model by FP-Diffusion's three-point stencil: the shape of `x`.
///
/// ```text
/// ∂ₜs ≈ [hs²·s(t+hd) + (hd² − hs²)·s(t) − hd²·s(t−hs)] / (hs·hd·(hd+hs))
/// ```
///
/// Second-order accurate: the error is `hs·hd/6 · ∂ₜ³s` plus rounding of order
/// `ε·|s| / min(hs, hd)`. Use [`DEFAULT_FD_HS`] and [`DEFAULT_FD_HD`] unless you have a
/// reason not to. The stencil never evaluates the model before time 0: where
/// `0 < t < 2·hs` the backward step becomes `t/2` (per sample), and at `t = 0` it is
/// one-sided, `[4·s(t+hd) − 3·s(t) − s(t+2hd)] / (2hd)`; negative times are an error.
/// `t + hd` must stay where the model is defined (the score-FPE regularizer, which knows
/// `T`, switches to two backward points where `t + hd > T`). Every variant is exact for
/// quadratics in `t`. Three score evaluations and no backward pass, so no guard here (the
/// model's own derivatives, e.g. [`GradientScore`](crate::GradientScore), check for
/// themselves); the result stays in the graph of the three evaluations.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::autodiff::{time_derivative_fd, DEFAULT_FD_HD, DEFAULT_FD_HS};
/// // s(x, t) = t²·x: ∂s/∂t = 2t·x, and the stencil is exact for quadratics in t.
/// let model = |x: &Tensor, t: &Tensor| Ok(x.broadcast_mul(&t.sqr()?.unsqueeze(1)?)?);
/// let x = Tensor::new(&[[1.0f64, -2.0], [1.0, 1.0]], &Device::Cpu)?;
/// let t = Tensor::new(&[0.5f64, 0.0], &Device::Cpu)?; // t = 0: one-sided
/// let ds = time_derivative_fd(&model, &x, &t, DEFAULT_FD_HS, DEFAULT_FD_HD)?;
/// let ds = ds.to_vec2::<f64>()?;
/// assert!((ds[0][0] - 1.0).abs() < 1e-9 && (ds[0][1] + 2.0).abs() < 1e-9);
/// assert!(ds[1][0].abs() < 1e-9);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn time_derivative_fd<M: ScoreModel + ?Sized>(
    model: &M,
    x: &Tensor,
    t: &Tensor,
    hs: f64,
    hd: f64,
) -> Result<Tensor> {
    time_derivative_fd_within(model, x, t, hs, hd, f64::INFINITY)
}

/// [`time_derivative_fd`] for a model defined on `[0, end]`: where `t + hd > end`, the
/// forward point moves to the middle of the backward step (two backward points).
pub(crate) fn time_derivative_fd_within<M: ScoreModel + ?Sized>(
    model: &M,
    x: &Tensor,
    t: &Tensor,
    hs: f64,
    hd: f64,
    end: f64,
) -> Result<Tensor> {
    crate::error::ensure(hs.is_finite() && hs > 0.0, || {
        format!("time_derivative_fd: hs must be positive and finite, got {hs}")
    })?;
    crate::error::ensure(hd.is_finite() && hd > 0.0, || {
        format!("time_derivative_fd: hd must be positive and finite, got {hd}")
    })?;
    check_x_t("time_derivative_fd", x, t)?;
    check_float("time_derivative_fd", "t", t)?;
    let times = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    // Per sample, the offsets (p, q) of the two points beside t: (hd, −hs) inside; near 0
    // the backward step shrinks to t/2, and at 0 the second point goes forward to 2hd;
    // near `end` the forward point moves to q/2.
    let mut offsets = Vec::with_capacity(times.len());
    for &ti in &times {
        crate::error::ensure(ti.is_finite() && ti >= 0.0, || {
            format!("time_derivative_fd: times must be finite and >= 0, got {ti}")
        })?;
        let q = if ti >= 2.0 * hs {
            -hs
        } else if ti > 0.0 {
            -ti / 2.0
        } else {
            2.0 * hd
        };
        let p = if ti + hd <= end {
            hd
        } else if q < 0.0 {
            q / 2.0
        } else {
            return Err(Error::InvalidParameter(format!(
                "time_derivative_fd: the step hd = {hd} does not fit in [0, T = {end}]; use a smaller hd"
            )));
        };
        offsets.push((p, q));
    }
    // Lagrange weights of the derivative at t for the nodes t + p, t, t + q.
    let weights = |(p, q): (f64, f64)| {
        let (wp, wq) = (q / (p * (q - p)), -p / (q * (q - p)));
        (wp, -(wp + wq), wq)
    };
    let (w_forward, w_center, w_backward) = weights((hd, -hs));
    if hs == hd && offsets.iter().all(|&o| o == (hd, -hs)) {
        // Equal steps: the central difference, whose centre weight is zero, so the
        // evaluation at t (and its share of every backward pass) is skipped.
        let s_forward = model.score(x, &(t + hd)?)?;
        let s_backward = model.score(x, &(t - hs)?)?;
        for s in [&s_forward, &s_backward] {
            check_score_shape("time_derivative_fd", s, x)?;
        }
        return Ok(((s_forward * w_forward)? + (s_backward * w_backward)?)?);
    }
    if offsets.iter().all(|&o| o == (hd, -hs)) {
        let s_forward = model.score(x, &(t + hd)?)?;
        let s_center = model.score(x, t)?;
        let s_backward = model.score(x, &(t - hs)?)?;
        for s in [&s_forward, &s_center, &s_backward] {
            check_score_shape("time_derivative_fd", s, x)?;
        }
        let forward = (s_forward * w_forward)?;
        let center = (s_center * w_center)?;
        let backward = (s_backward * w_backward)?;
        return Ok(((forward + center)? + backward)?);
    }
    let per_point = |f: &dyn Fn((f64, f64)) -> f64| -> Result<Tensor> {
        let c: Vec<f64> = offsets.iter().map(|&o| f(o)).collect();
        Ok(Tensor::from_vec(c, times.len(), t.device())?)
    };
    let coefficients = |f: &dyn Fn((f64, f64)) -> f64| per_sample(&per_point(f)?, x);
    let t_forward = (t + per_point(&|(p, _)| p)?.to_dtype(t.dtype())?)?;
    let t_backward = (t + per_point(&|(_, q)| q)?.to_dtype(t.dtype())?)?;
    let s_forward = model.score(x, &t_forward)?;
    let s_center = model.score(x, t)?;
    let s_backward = model.score(x, &t_backward)?;
    for s in [&s_forward, &s_center, &s_backward] {
        check_score_shape("time_derivative_fd", s, x)?;
    }
    let forward = s_forward.broadcast_mul(&coefficients(&|o| weights(o).0)?)?;
    let center = s_center.broadcast_mul(&coefficients(&|o| weights(o).1)?)?;
    let backward = s_backward.broadcast_mul(&coefficients(&|o| weights(o).2)?)?;
    Ok(((forward + center)? + backward)?)
}

// ---------------------------------------------------------------------------------------
// The higher-order-gradient guard
// ---------------------------------------------------------------------------------------

thread_local! {
    /// `None` until the probe has run on this thread; then whether it passed. candle reads
    /// its own switch once per thread too, so the answer cannot change afterwards.
    static HIGHER_ORDER_GRADIENTS_LIVE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Checks that candle builds gradient-of-gradient graphs on this thread; returns
/// [`Error::HigherOrderGradientsUnavailable`] (saying how to fix it) if not.
///
/// The first call on a thread differentiates a tiny known function twice (`x³ + tanh(0.5·x)`
/// at `x = 2`, through `mul`, `matmul` and `tanh`) and compares with the closed form; the
/// answer is cached per thread, so later calls cost a thread-local read. Every second-order
/// entry point of this crate calls it; call it yourself before building your own
/// grad-of-grad with candle.
///
/// ```
/// // This crate's doctests run with CANDLE_GRAD_DO_NOT_DETACH=1 (.cargo/config.toml).
/// scoresde::autodiff::ensure_higher_order_gradients()?;
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn ensure_higher_order_gradients() -> Result<()> {
    let live = match HIGHER_ORDER_GRADIENTS_LIVE.with(Cell::get) {
        Some(live) => live,
        None => {
            let live = second_order_probe_matches()?;
            HIGHER_ORDER_GRADIENTS_LIVE.with(|c| c.set(Some(live)));
            live
        }
    };
    if live {
        Ok(())
    } else {
        Err(Error::HigherOrderGradientsUnavailable)
    }
}

/// Differentiates `y = x³ + tanh(x·w)` (x = 2, w = 0.5, as 1×1 matrices) twice and compares
/// both derivatives with their closed forms. Detached intermediate gradients break the
/// second derivative of the `mul` chain (8 instead of 12) and of the `tanh`.
fn second_order_probe_matches() -> Result<bool> {
    let device = Device::Cpu;
    let (x0, w0) = (2.0f64, 0.5f64);
    let x = Var::new(&[[x0]], &device)?.into_inner();
    let w = Tensor::new(&[[w0]], &device)?;
    let y = ((&x * &x)?.mul(&x)? + x.matmul(&w)?.tanh()?)?;
    let first = grad_unguarded(&y, &x)?;
    let second = grad_unguarded(&first, &x)?;
    let first = first.flatten_all()?.to_vec1::<f64>()?;
    let second = second.flatten_all()?.to_vec1::<f64>()?;
    let th = (w0 * x0).tanh();
    let sech2 = 1.0 - th * th;
    let want_first = 3.0 * x0 * x0 + w0 * sech2;
    let want_second = 6.0 * x0 - 2.0 * w0 * w0 * th * sech2;
    let close = |got: &[f64], want: f64| got.len() == 1 && (got[0] - want).abs() <= 1e-9;
    Ok(close(&first, want_first) && close(&second, want_second))
}

// ---------------------------------------------------------------------------------------
// Validation helpers
// ---------------------------------------------------------------------------------------

fn check_float(func: &str, name: &str, t: &Tensor) -> Result<()> {
    if t.dtype().is_float() {
        Ok(())
    } else {
        Err(Error::InvalidParameter(format!(
            "{func}: {name} has dtype {:?}; derivatives need a float dtype",
            t.dtype()
        )))
    }
}

fn check_leaf(func: &str, x: &Tensor) -> Result<()> {
    if x.is_variable() {
        Ok(())
    } else {
        Err(Error::InvalidParameter(format!(
            "{func}: x is not a tracked leaf; make it with scoresde::autodiff::leaf(&x) \
             and compute the output from that leaf"
        )))
    }
}

/// `y` and `x` of the same shape `[B, …]`; returns `(B, d)` with `d` the flattened rest.
fn check_same_batched_shape(func: &str, y: &Tensor, x: &Tensor) -> Result<(usize, usize)> {
    if y.shape() != x.shape() {
        return Err(Error::Shape(format!(
            "{func}: y has shape {:?} but x has shape {:?}; they must be equal",
            y.dims(),
            x.dims()
        )));
    }
    batch_and_rest(func, x)
}

fn batch_and_rest(func: &str, x: &Tensor) -> Result<(usize, usize)> {
    match x.dims().split_first() {
        Some((&b, rest)) => Ok((b, rest.iter().product())),
        None => Err(Error::Shape(format!(
            "{func}: x is a scalar; it needs a batch dimension, shape [B, …]"
        ))),
    }
}

/// `x` of shape `[B, …]` and `t` of shape `[B]`.
fn check_x_t(func: &str, x: &Tensor, t: &Tensor) -> Result<(usize, usize)> {
    let (b, d) = batch_and_rest(func, x)?;
    if t.dims() != [b] {
        return Err(Error::Shape(format!(
            "{func}: t has shape {:?} but x has batch size {b}; t must have shape [{b}]",
            t.dims()
        )));
    }
    Ok((b, d))
}

fn check_score_shape(func: &str, s: &Tensor, x: &Tensor) -> Result<()> {
    if s.shape() == x.shape() {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "{func}: the model returned a score of shape {:?} for x of shape {:?}",
            s.dims(),
            x.dims()
        )))
    }
}

/// Whether `v`'s graph reaches the leaf `x` (a walk over the graph, no computation).
fn depends_on(v: &Tensor, x: &Tensor) -> bool {
    v.id() == x.id() || v.sorted_nodes().iter().any(|n| n.id() == x.id())
}

fn tensor_from_f64(data: Vec<f64>, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
}
