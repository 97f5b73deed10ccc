//! The log-density Fokker–Planck residual of Deveney et al. (Phil. Trans. A 2025).

use candle_core::Tensor;
use rand::{Rng, RngCore};

use super::score_fpe::check_points;
use super::{BoundaryTerms, LogDensityFpTerms, PenaltyTerms, Regularizer};
use crate::autodiff::{grads, leaf, Divergence};
use crate::error::{ensure, ensure_positive};
use crate::random::uniform;
use crate::sde::{flatten_batch, Sde};
use crate::{Error, LogDensityModel, Result};

/// Where the residual is evaluated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Collocation {
    /// At the perturbed training points `(x_t, t)` of the DSM batch.
    Perturbed,
    /// `points` points uniform in the box `[low, high]^d × [eps, T]`, fresh each call
    /// (Deveney et al.: `[−3.5, 3.5]²`, `[−5.5, 5.5]²` for their "blob" data).
    UniformBox {
        /// Lower edge of the box in every coordinate.
        low: f64,
        /// Upper edge of the box in every coordinate.
        high: f64,
        /// Number of points.
        points: usize,
        /// Smallest time.
        eps: f64,
    },
}

/// The boundary term `weight · mean(exp(u)²)` over points on the faces of the collocation
/// box, which pushes the density to zero at the edge of the domain.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Boundary {
    weight: f64,
    points_per_face: usize,
}

impl Boundary {
    /// `points_per_face` points uniform on each of the `2d` faces (times uniform in
    /// `[eps, T]`), weighted by `weight ≥ 0`.
    ///
    /// ```
    /// use scoresde::regularizer::Boundary;
    /// assert!(Boundary::new(1.0, 1000).is_ok());
    /// assert!(Boundary::new(-1.0, 1000).is_err());
    /// ```
    pub fn new(weight: f64, points_per_face: usize) -> Result<Self> {
        ensure(weight.is_finite() && weight >= 0.0, || {
            format!("the boundary weight must be finite and >= 0, got {weight}")
        })?;
        ensure(points_per_face > 0, || {
            "the boundary needs at least one point per face".into()
        })?;
        Ok(Self {
            weight,
            points_per_face,
        })
    }
}

/// The log-density Fokker–Planck residual as a regularizer (Deveney et al. 2025).
///
/// For a potential model `u(x, t) ≈ log p_t(x)` (score `∇u`), the log-density of the
/// forward SDE satisfies `∂_t u = −∇·f − ⟨f, ∇u⟩ + ½g²(Δu + ‖∇u‖²)`, so
///
/// ```text
/// R = ∂_t u + ∇·f + ⟨f, ∇u⟩ − ½g²(Δu + ‖∇u‖²)
/// ```
///
/// vanishes for the true log-density. The penalty is `mean(R²)` over the collocation points
/// plus the optional [`Boundary`] term. [`LogDensityFp::paper`] is the paper's setting; its
/// experiments train `DSM + w·penalty` with `w ∈ {0, 0.1, 1, 10}`. Needs live second-order
/// gradients (see [`crate::autodiff`]).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::regularizer::LogDensityFp;
/// use scoresde::score::{Covariance, GaussianMixture};
/// use scoresde::sde::OuSde;
///
/// let sde = OuSde::default();
/// let data = GaussianMixture::new(vec![1.0], vec![vec![1.0, -1.0]], vec![Covariance::Isotropic(0.2)])?;
/// let exact = data.diffused(sde); // exact log p_t
/// let mut rng = StdRng::seed_from_u64(0);
/// let x = exact.sample(8, 0.3, DType::F64, &Device::Cpu, &mut rng)?;
/// let t = Tensor::full(0.3f64, 8, &Device::Cpu)?;
/// let r = LogDensityFp::new().residual(&sde, &exact, &x, &t, &mut rng)?;
/// assert!(r.abs()?.max(0)?.to_scalar::<f64>()? < 1e-8);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LogDensityFp {
    divergence: Divergence,
    collocation: Collocation,
    boundary: Option<Boundary>,
}

impl Default for LogDensityFp {
    fn default() -> Self {
        Self::new()
    }
}

impl LogDensityFp {
    /// Exact Laplacian, collocation at the perturbed training points, no boundary term.
    pub fn new() -> Self {
        Self {
            divergence: Divergence::Exact,
            collocation: Collocation::Perturbed,
            boundary: None,
        }
    }

    /// Deveney et al.'s setting (their `OUPINN.py`, CPU sizes): exact Laplacian, 5,000
    /// points uniform in `[−half_width, half_width]^d × [1e-5, T]`, boundary weight 1 with
    /// 1,000 points per face. They use `half_width = 3.5` (5.5 for the "blob" data). Their
    /// released networks (`OUPINN_loop.py`) had no boundary term: add
    /// `.with_boundary(None)`.
    ///
    /// ```
    /// let paper = scoresde::regularizer::LogDensityFp::paper(3.5)?;
    /// # let _ = paper;
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn paper(half_width: f64) -> Result<Self> {
        Self::new()
            .with_collocation(Collocation::UniformBox {
                low: -half_width,
                high: half_width,
                points: 5000,
                eps: 1e-5,
            })
            .map(|s| s.with_boundary(Boundary::new(1.0, 1000).ok()))
    }

    /// How `Δu = ∇·∇u` is computed.
    pub fn with_divergence(mut self, divergence: Divergence) -> Result<Self> {
        divergence.validate()?;
        self.divergence = divergence;
        Ok(self)
    }

    /// Where the residual is evaluated.
    pub fn with_collocation(mut self, collocation: Collocation) -> Result<Self> {
        if let Collocation::UniformBox {
            low,
            high,
            points,
            eps,
        } = collocation
        {
            ensure(low.is_finite() && high.is_finite() && low < high, || {
                format!("the collocation box needs finite low < high, got [{low}, {high}]")
            })?;
            ensure(points > 0, || {
                "the collocation box needs at least one point".into()
            })?;
            ensure_positive("eps", eps)?;
        }
        self.collocation = collocation;
        Ok(self)
    }

    /// Adds (or, with `None`, removes) the boundary term; it needs a
    /// [`Collocation::UniformBox`] to know where the faces are.
    pub fn with_boundary(mut self, boundary: Option<Boundary>) -> Self {
        self.boundary = boundary;
        self
    }

    /// The residual `R(x, t)` per point, `[B]`, still differentiable in the parameters.
    /// `rng` draws Hutchinson probes (unused with the exact divergence; see
    /// [`Self::residual_with_probes`] to pass none).
    pub fn residual<S: Sde, M: LogDensityModel>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: &Tensor,
        rng: &mut dyn RngCore,
    ) -> Result<Tensor> {
        check_points(x, t)?;
        let probes = self.divergence.draw_probes(x, rng)?;
        self.residual_checked(sde, model, x, t, &probes)
    }

    /// [`Self::residual`] with the Hutchinson probes given rather than drawn: none for the
    /// exact Laplacian (so no generator is needed), otherwise those of
    /// [`Divergence::draw_probes`] for `x`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use scoresde::regularizer::LogDensityFp;
    /// use scoresde::score::{Covariance, GaussianMixture};
    /// use scoresde::sde::OuSde;
    /// let sde = OuSde::default();
    /// let exact = GaussianMixture::new(vec![1.0], vec![vec![1.0, 0.0]], vec![Covariance::Isotropic(0.3)])?
    ///     .diffused(sde);
    /// let x = Tensor::new(&[[0.3f64, -0.2]], &Device::Cpu)?;
    /// let t = Tensor::new(&[0.4f64], &Device::Cpu)?;
    /// let r = LogDensityFp::new().residual_with_probes(&sde, &exact, &x, &t, &[])?; // exact: r = 0
    /// assert!(r.abs()?.max_all()?.to_scalar::<f64>()? < 1e-9);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn residual_with_probes<S: Sde, M: LogDensityModel>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: &Tensor,
        probes: &[Tensor],
    ) -> Result<Tensor> {
        check_points(x, t)?;
        self.divergence.check_probes(probes)?;
        self.residual_checked(sde, model, x, t, probes)
    }

    fn residual_checked<S: Sde, M: LogDensityModel>(
        &self,
        sde: &S,
        model: &M,
        x: &Tensor,
        t: &Tensor,
        probes: &[Tensor],
    ) -> Result<Tensor> {
        let x = leaf(&x.detach())?;
        let t_leaf = leaf(&t.detach().to_dtype(x.dtype())?)?;
        let u = model.log_density(&x, &t_leaf)?;
        if u.dims() != [x.dim(0)?] {
            return Err(Error::Shape(format!(
                "the log-density model returned shape {:?}, expected [{}]",
                u.dims(),
                x.dim(0)?
            )));
        }
        let [score, du_dt] = grads(&u, [&x, &t_leaf])?;
        let laplacian = self.divergence.evaluate(&score, &x, probes)?;

        let t_plain = t.detach().to_dtype(x.dtype())?;
        let a = sde.drift_coeff_tensor(&t_plain)?;
        let half_g2 = (sde.diffusion_tensor(&t_plain)?.sqr()? * 0.5)?;
        let (s_flat, x_flat) = (flatten_batch(&score)?, flatten_batch(&x)?);
        let d = x_flat.dim(1)? as f64;
        // ∇·f + ⟨f, ∇u⟩ = a·(d + ⟨x, ∇u⟩)
        let transport = ((&x_flat * &s_flat)?.sum(1)? + d)?.mul(&a)?;
        let diffusion = ((laplacian + s_flat.sqr()?.sum(1)?)? * half_g2)?;
        crate::error::finite_result(
            ((du_dt + transport)? - diffusion)?,
            "the log-density Fokker–Planck residual",
            &[("x", &x)],
        )
    }
}

impl<S: Sde, M: LogDensityModel> Regularizer<S, M> for LogDensityFp {
    fn penalty(&self, sde: &S, model: &M, x_t: &Tensor, t: &Tensor, rng: &mut dyn RngCore) -> Result<Tensor> {
        let residual = match self.collocation {
            Collocation::Perturbed => self.residual(sde, model, x_t, t, rng)?,
            Collocation::UniformBox {
                low,
                high,
                points,
                eps,
            } => {
                let (x, t) = box_points(x_t, points, low, high, eps, sde.end_time(), rng)?;
                self.residual(sde, model, &x, &t, rng)?
            }
        };
        let mut penalty = residual.sqr()?.mean_all()?;
        if let Some(boundary) = self.boundary.filter(|b| b.weight > 0.0) {
            let Collocation::UniformBox { low, high, eps, .. } = self.collocation else {
                return Err(Error::InvalidParameter(
                    "the boundary term needs a UniformBox collocation to know where the box faces are".into(),
                ));
            };
            let (x, t) = face_points(x_t, boundary.points_per_face, low, high, eps, sde.end_time(), rng)?;
            let density_sq = (model.log_density(&x, &t)? * 2.0)?.exp()?; // exp(u)²
            penalty = (penalty + (density_sq.mean_all()? * boundary.weight)?)?;
        }
        Ok(penalty)
    }

    /// With the exact Laplacian: the collocation points (drawn as [`Regularizer::penalty`]
    /// draws them), weights `1/C`, and the boundary points with weights `weight/N`.
    fn penalty_terms(
        &self,
        sde: &S,
        x_t: &Tensor,
        t: &Tensor,
        rng: &mut dyn RngCore,
    ) -> Result<Option<PenaltyTerms>> {
        if self.divergence != Divergence::Exact {
            return Ok(None);
        }
        let (x, t) = match self.collocation {
            Collocation::Perturbed => (x_t.detach(), t.detach().to_dtype(x_t.dtype())?),
            Collocation::UniformBox {
                low,
                high,
                points,
                eps,
            } => box_points(x_t, points, low, high, eps, sde.end_time(), rng)?,
        };
        check_points(&x, &t)?;
        let count = x.dim(0)? as f64;
        let boundary = match self.boundary.filter(|b| b.weight > 0.0) {
            Some(boundary) => {
                let Collocation::UniformBox { low, high, eps, .. } = self.collocation else {
                    return Ok(None); // the graph path reports the error
                };
                let (x, t) = face_points(x_t, boundary.points_per_face, low, high, eps, sde.end_time(), rng)?;
                let weight = (t.ones_like()? * (boundary.weight / t.dim(0)? as f64))?;
                Some(BoundaryTerms { x, t, weight })
            }
            None => None,
        };
        Ok(Some(PenaltyTerms::LogDensityFp(LogDensityFpTerms {
            weight: (t.ones_like()? / count)?,
            diffusion_squared: sde.diffusion_tensor(&t)?.sqr()?,
            drift: sde.drift_coeff_tensor(&t)?,
            x,
            t,
            boundary,
        })))
    }
}

/// The dims of a batch `[B, …]` (B may be 0: only the per-sample shape is used).
fn batch_shape(like: &Tensor) -> Result<Vec<usize>> {
    if like.rank() < 2 {
        return Err(Error::Shape(format!(
            "expected points of shape [B, ...] with at least 2 dimensions, got {:?}",
            like.dims()
        )));
    }
    Ok(like.dims().to_vec())
}

/// `n` points uniform in `[low, high]^d × [eps, T]`, shaped like `like`'s samples.
fn box_points(
    like: &Tensor,
    n: usize,
    low: f64,
    high: f64,
    eps: f64,
    end: f64,
    rng: &mut dyn RngCore,
) -> Result<(Tensor, Tensor)> {
    let mut shape = batch_shape(like)?;
    shape[0] = n;
    let x = uniform(shape, low, high, like.dtype(), like.device(), rng)?;
    let t = uniform(n, eps, end, like.dtype(), like.device(), rng)?;
    Ok((x, t))
}

/// `n` points on each of the `2d` faces of `[low, high]^d`, times uniform in `[eps, T]`.
fn face_points(
    like: &Tensor,
    n: usize,
    low: f64,
    high: f64,
    eps: f64,
    end: f64,
    rng: &mut dyn RngCore,
) -> Result<(Tensor, Tensor)> {
    // The per-sample size from the shape, not elem_count / B: the batch may be empty
    // (box collocation does not use its points).
    let d: usize = batch_shape(like)?.iter().skip(1).product();
    let total = crate::error::checked_elements(&[2, d, n], "the boundary points")?;
    let mut values = Vec::with_capacity(crate::error::checked_elements(
        &[total, d],
        "the boundary points",
    )?);
    for face in 0..2 * d {
        let (axis, edge) = (face / 2, if face % 2 == 0 { low } else { high });
        for _ in 0..n {
            values.extend((0..d).map(|j| {
                if j == axis {
                    edge
                } else {
                    rng.random_range(low..high)
                }
            }));
        }
    }
    let mut shape = batch_shape(like)?;
    shape[0] = total;
    let x = Tensor::from_vec(values, shape, like.device())?.to_dtype(like.dtype())?;
    let t = uniform(total, eps, end, like.dtype(), like.device(), rng)?;
    Ok((x, t))
}
