//! Gaussian mixtures: exact scores, log-densities and samples at every time.

use candle_core::{DType, Device, Tensor};
use rand::distr::weighted::WeightedIndex;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use super::{LogDensityModel, ScoreModel};
use crate::error::ensure;
use crate::sde::{flatten_batch, Sde};
use crate::{Error, Result};

/// The covariance of one mixture component.
#[derive(Debug, Clone, PartialEq)]
pub enum Covariance {
    /// `v·I`.
    Isotropic(f64),
    /// `diag(v₁, …, v_d)`.
    Diagonal(Vec<f64>),
    /// A full symmetric positive-definite matrix, one row per entry.
    Full(Vec<Vec<f64>>),
}

/// A Gaussian mixture `p_0 = Σ_k π_k N(μ_k, Σ_k)`, the one data distribution whose
/// diffused densities are known in closed form.
///
/// Under any forward SDE with kernel `x_t = α x_0 + σ z`, the density at time `t` is the
/// mixture `Σ_k π_k N(αμ_k, α²Σ_k + σ²I)` (MATH.md §7). [`GaussianMixture::diffused`] pairs
/// the mixture with an SDE into a [`DiffusedMixture`], which is an exact [`ScoreModel`]
/// and [`LogDensityModel`] and an exact sample source at every `t`.
///
/// ```
/// use candle_core::{DType, Device};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::score::{Covariance, GaussianMixture};
///
/// let mixture = GaussianMixture::new(
///     vec![0.5, 0.5],
///     vec![vec![-2.0, 0.0], vec![2.0, 0.0]],
///     vec![Covariance::Isotropic(0.1), Covariance::Diagonal(vec![0.2, 0.05])],
/// )?;
/// let x = mixture.sample(1000, DType::F32, &Device::Cpu, &mut StdRng::seed_from_u64(0))?;
/// assert_eq!(x.dims(), [1000, 2]);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianMixture {
    dim: usize,
    log_weights: Vec<f64>,
    means: Vec<f64>,
    /// Eigenvectors of each Σ_k as columns, row-major `[K, d, d]`; `None` when every Σ_k
    /// is diagonal (the identity), so that isotropic mixtures in high dimension cost
    /// `O(K·d)` memory, not `O(K·d²)`.
    eigenvectors: Option<Vec<f64>>,
    /// Eigenvalues of each Σ_k, `[K, d]`.
    eigenvalues: Vec<f64>,
}

impl GaussianMixture {
    /// A mixture from weights (normalized here), means and covariances.
    ///
    /// Errors on an empty mixture, negative or non-finite weights, means of different
    /// dimensions, or a covariance that is not symmetric positive definite.
    ///
    /// ```
    /// use scoresde::score::{Covariance, GaussianMixture};
    /// let ok = GaussianMixture::new(vec![1.0], vec![vec![0.0, 0.0]], vec![Covariance::Isotropic(1.0)]);
    /// assert!(ok.is_ok());
    /// let bad = GaussianMixture::new(
    ///     vec![1.0],
    ///     vec![vec![0.0, 0.0]],
    ///     vec![Covariance::Full(vec![vec![1.0, 2.0], vec![2.0, 1.0]])], // indefinite
    /// );
    /// assert!(bad.unwrap_err().to_string().contains("positive definite"));
    /// ```
    pub fn new(weights: Vec<f64>, means: Vec<Vec<f64>>, covariances: Vec<Covariance>) -> Result<Self> {
        let k = weights.len();
        ensure(k > 0, || "a mixture needs at least one component".into())?;
        ensure(means.len() == k && covariances.len() == k, || {
            format!(
                "got {k} weights, {} means and {} covariances; they must match",
                means.len(),
                covariances.len()
            )
        })?;
        ensure(weights.iter().all(|w| w.is_finite() && *w >= 0.0), || {
            format!("mixture weights must be finite and >= 0, got {weights:?}")
        })?;
        let total: f64 = weights.iter().sum();
        ensure(total > 0.0, || "mixture weights must not all be zero".into())?;
        let dim = means[0].len();
        ensure(dim > 0, || "means must have at least one dimension".into())?;
        ensure(means.iter().all(|m| m.len() == dim), || {
            format!("every mean must have dimension {dim}")
        })?;
        ensure(means.iter().flatten().all(|v| v.is_finite()), || {
            "means must be finite".into()
        })?;

        let full = covariances.iter().any(|c| matches!(c, Covariance::Full(_)));
        let mut eigenvectors = Vec::new();
        let mut eigenvalues = Vec::with_capacity(k * dim);
        for (i, cov) in covariances.iter().enumerate() {
            let invalid = |msg: String| Error::InvalidParameter(format!("covariance {i}: {msg}"));
            let values = match cov {
                Covariance::Isotropic(v) => vec![*v; dim],
                Covariance::Diagonal(v) => {
                    ensure(v.len() == dim, || {
                        format!("covariance {i}: diagonal has {} entries, expected {dim}", v.len())
                    })?;
                    v.clone()
                }
                Covariance::Full(_) => {
                    let (values, vectors) = eigen_decomposition(cov, dim).map_err(invalid)?;
                    eigenvectors.extend(vectors);
                    values
                }
            };
            ensure(values.iter().all(|l| l.is_finite() && *l > 0.0), || {
                format!("covariance {i}: the matrix must be positive definite with finite entries (eigenvalues {values:?})")
            })?;
            if full && !matches!(cov, Covariance::Full(_)) {
                // Another component is full: this one's eigenbasis is the identity.
                eigenvectors.extend((0..dim * dim).map(|j| if j % (dim + 1) == 0 { 1.0 } else { 0.0 }));
            }
            eigenvalues.extend(values);
        }
        let eigenvectors = full.then_some(eigenvectors);
        Ok(Self {
            dim,
            log_weights: weights.iter().map(|w| (w / total).ln()).collect(),
            means: means.into_iter().flatten().collect(),
            eigenvectors,
            eigenvalues,
        })
    }

    /// The data dimension `d`.
    ///
    /// ```
    /// # use scoresde::score::{Covariance, GaussianMixture};
    /// let m = GaussianMixture::new(vec![1.0], vec![vec![0.0; 3]], vec![Covariance::Isotropic(1.0)])?;
    /// assert_eq!(m.dim(), 3);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The number of components `K`.
    ///
    /// ```
    /// # use scoresde::score::{Covariance, GaussianMixture};
    /// let m = GaussianMixture::new(vec![1.0], vec![vec![0.0; 3]], vec![Covariance::Isotropic(1.0)])?;
    /// assert_eq!(m.components(), 1);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn components(&self) -> usize {
        self.log_weights.len()
    }

    /// The mixture diffused by `sde`: exact score, log-density and samples at every `t`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use scoresde::score::{Covariance, GaussianMixture};
    /// use scoresde::{sde::VpSde, ScoreModel};
    /// let mixture = GaussianMixture::new(vec![1.0], vec![vec![0.0]], vec![Covariance::Isotropic(1.0)])?;
    /// let exact = mixture.diffused(VpSde::default());
    /// // N(0, 1) stays N(0, 1) under the VP SDE, so the score is -x at every time.
    /// let x = Tensor::new(&[[0.5f64]], &Device::Cpu)?;
    /// let s = exact.score(&x, &Tensor::new(&[0.3f64], &Device::Cpu)?)?;
    /// assert!((s.to_vec2::<f64>()?[0][0] + 0.5).abs() < 1e-12);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn diffused<S: Sde>(&self, sde: S) -> DiffusedMixture<S> {
        DiffusedMixture {
            mixture: self.clone(),
            sde,
        }
    }

    /// `n` samples from the mixture itself (time 0), shape `[n, d]`.
    pub fn sample<R: Rng + ?Sized>(
        &self,
        n: usize,
        dtype: DType,
        device: &Device,
        rng: &mut R,
    ) -> Result<Tensor> {
        self.sample_scaled(n, 1.0, 0.0, dtype, device, rng)
    }

    /// Samples of `α·x_0 + σ·z` with `x_0` from the mixture.
    fn sample_scaled<R: Rng + ?Sized>(
        &self,
        n: usize,
        alpha: f64,
        sigma: f64,
        dtype: DType,
        device: &Device,
        rng: &mut R,
    ) -> Result<Tensor> {
        let d = self.dim;
        crate::error::checked_elements(&[n, d], "a mixture sample")?;
        let weights: Vec<f64> = self.log_weights.iter().map(|l| l.exp()).collect();
        let pick = WeightedIndex::new(&weights)
            .map_err(|e| Error::InvalidParameter(format!("mixture weights: {e}")))?;
        let mut out = Vec::with_capacity(n * d);
        let mut z = vec![0.0; d];
        for _ in 0..n {
            let k = pick.sample(rng);
            for (j, zj) in z.iter_mut().enumerate() {
                let normal: f64 = StandardNormal.sample(rng);
                *zj = normal * self.eigenvalues[k * d + j].sqrt();
            }
            for i in 0..d {
                let rotated: f64 = match &self.eigenvectors {
                    Some(u) => (0..d).map(|j| u[k * d * d + i * d + j] * z[j]).sum(),
                    None => z[i],
                };
                let noise: f64 = StandardNormal.sample(rng);
                out.push(alpha * (self.means[k * d + i] + rotated) + sigma * noise);
            }
        }
        Ok(Tensor::from_vec(out, (n, d), device)?.to_dtype(dtype)?)
    }
}

/// A [`GaussianMixture`] diffused by an SDE: the exact score and log-density of `p_t`.
///
/// Both are built from candle ops, so they are differentiable in `x` and `t` (the
/// regularizer tests take `∇·s`, `∂_t s` and `Δ log p_t` of it by autodiff). Create one
/// with [`GaussianMixture::diffused`].
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::score::{Covariance, GaussianMixture, LogDensityModel};
/// use scoresde::sde::OuSde;
///
/// let mixture = GaussianMixture::new(vec![1.0], vec![vec![0.0, 0.0]], vec![Covariance::Isotropic(0.5)])?;
/// let p = mixture.diffused(OuSde::default()); // N(0, I/2) is the OU prior: stationary
/// let x = p.sample(3, 2.0, DType::F64, &Device::Cpu, &mut StdRng::seed_from_u64(1))?;
/// let lp = p.log_density(&x, &Tensor::new(&[2.0f64; 3], &Device::Cpu)?)?;
/// assert_eq!(lp.dims(), [3]);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusedMixture<S> {
    mixture: GaussianMixture,
    sde: S,
}

/// Per-component quantities at a batch of points.
struct Components {
    /// log p_t(x), `[B]`.
    log_density: Tensor,
    /// Posterior component weights, `[K, B]`.
    responsibilities: Tensor,
    /// `C_k⁻¹(x − αμ_k)` in the eigenbasis, `[K, B, d]`.
    whitened: Tensor,
    /// Eigenvectors, `[K, d, d]` (`None`: the identity).
    eigenvectors: Option<Tensor>,
}

impl<S: Sde> DiffusedMixture<S> {
    /// The mixture at time 0.
    pub fn mixture(&self) -> &GaussianMixture {
        &self.mixture
    }

    /// The SDE that diffuses it.
    pub fn sde(&self) -> &S {
        &self.sde
    }

    /// `n` exact samples of `x_t ~ p_t`, shape `[n, d]`.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use scoresde::score::{Covariance, GaussianMixture};
    /// use scoresde::sde::{Sde, VeSde};
    /// let sde = VeSde::new(0.01, 3.0)?;
    /// let m = GaussianMixture::new(vec![1.0], vec![vec![0.0]], vec![Covariance::Isotropic(1.0)])?;
    /// let x = m.diffused(sde).sample(20_000, 1.0, DType::F64, &Device::Cpu, &mut StdRng::seed_from_u64(0))?;
    /// let var = x.sqr()?.mean_all()?.to_scalar::<f64>()?; // 1 + σ(1)² = 10
    /// assert!((var / 10.0 - 1.0).abs() < 0.05);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn sample<R: Rng + ?Sized>(
        &self,
        n: usize,
        t: f64,
        dtype: DType,
        device: &Device,
        rng: &mut R,
    ) -> Result<Tensor> {
        ensure(t.is_finite() && t >= 0.0, || {
            format!("time must be finite and >= 0, got {t}")
        })?;
        self.mixture
            .sample_scaled(n, self.sde.mean_coeff(t), self.sde.std(t), dtype, device, rng)
    }

    fn components(&self, x: &Tensor, t: &Tensor) -> Result<Components> {
        let m = &self.mixture;
        let (k, d) = (m.components(), m.dim);
        let x = flatten_batch(x)?;
        let (b, dx) = x.dims2()?;
        if dx != d {
            return Err(Error::Shape(format!("the mixture has dimension {d}, x has {dx}")));
        }
        if t.dims() != [b] {
            return Err(Error::Shape(format!(
                "expected t of shape [{b}], got {:?}",
                t.dims()
            )));
        }
        let (dtype, device) = (x.dtype(), x.device());
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(Error::InvalidParameter(format!(
                "the mixture's score and density need x in f32 or f64, got {dtype:?}; convert with x.to_dtype(DType::F32)"
            )));
        }
        // The one check of the times: they enter here.
        crate::sde::time_range(t, self.sde.end_time(), "the diffused mixture")?;
        let constant = |values: &[f64], shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::from_slice(values, shape, device)?.to_dtype(dtype)?)
        };
        let means = constant(&m.means, &[k, 1, d])?;
        let eigenvectors = match &m.eigenvectors {
            Some(u) => Some(constant(u, &[k, d, d])?),
            None => None,
        };
        let eigenvalues = constant(&m.eigenvalues, &[k, 1, d])?;
        let log_weights = constant(&m.log_weights, &[k, 1])?;

        let t = t.to_dtype(dtype)?;
        let alpha = self.sde.mean_coeff_tensor(&t)?.reshape((1, b, 1))?;
        let sigma = self.sde.std_tensor(&t)?.reshape((1, b, 1))?;

        // x − αμ_k in each component's eigenbasis, and the variances α²λ + σ² there.
        let centered = x.unsqueeze(0)?.broadcast_sub(&means.broadcast_mul(&alpha)?)?;
        let projected = match &eigenvectors {
            Some(u) => centered.matmul(u)?, // [K, B, d]
            None => centered,
        };
        let variances = eigenvalues
            .broadcast_mul(&alpha.sqr()?)?
            .broadcast_add(&sigma.sqr()?)?;
        let whitened = (&projected / &variances)?;
        // Capped at the dtype's largest value: far from every component (|x| ~ 1e300) the
        // quadratic form overflows, and ∞ − ∞ in the log-sum-exp would make the score NaN
        // although it is finite; below the cap (all sane inputs) nothing changes.
        let largest = if dtype == DType::F64 {
            f64::MAX
        } else {
            f32::MAX as f64
        };
        let quadratic = (&projected * &whitened)?.sum(2)?.clamp(0.0, largest)?;
        let log_det = variances.log()?.sum(2)?;
        let log_normal =
            (quadratic + log_det)?.affine(-0.5, -0.5 * d as f64 * (2.0 * std::f64::consts::PI).ln())?;
        let log_joint = log_normal.broadcast_add(&log_weights)?; // [K, B]

        // Stable log-sum-exp; the shift is detached since it cancels exactly.
        let shift = log_joint.max_keepdim(0)?.detach();
        let log_density = (log_joint.broadcast_sub(&shift)?.exp()?.sum_keepdim(0)?.log()? + &shift)?;
        let responsibilities = log_joint.broadcast_sub(&log_density)?.exp()?;
        Ok(Components {
            log_density: log_density.squeeze(0)?,
            responsibilities,
            whitened,
            eigenvectors,
        })
    }
}

impl<S: Sde> ScoreModel for DiffusedMixture<S> {
    /// `∇ log p_t(x) = −Σ_k w_k(x) (α²Σ_k + σ²I)⁻¹(x − αμ_k)`.
    fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let c = self.components(x, t)?;
        // Back from the eigenbasis: U · (whitened), for each component.
        let per_component = match &c.eigenvectors {
            Some(u) => c.whitened.matmul(&u.t()?)?, // [K, B, d]
            None => c.whitened,
        };
        let weighted = per_component.broadcast_mul(&c.responsibilities.unsqueeze(2)?)?;
        let score = weighted.sum(0)?.neg()?.reshape(x.shape())?;
        crate::error::finite_result(score, "the mixture's score", &[("x", x)])
    }
}

impl<S: Sde> LogDensityModel for DiffusedMixture<S> {
    /// The exact, normalized `log p_t(x)`.
    fn log_density(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let log_density = self.components(x, t)?.log_density;
        crate::error::finite_result(log_density, "the mixture's log-density", &[("x", x)])
    }
}

/// Eigenvalues and eigenvectors (as columns, row-major) of a symmetric positive-definite
/// covariance, by cyclic Jacobi rotations.
fn eigen_decomposition(cov: &Covariance, d: usize) -> std::result::Result<(Vec<f64>, Vec<f64>), String> {
    let mut a = vec![0.0; d * d];
    match cov {
        Covariance::Isotropic(v) => (0..d).for_each(|i| a[i * d + i] = *v),
        Covariance::Diagonal(v) => {
            if v.len() != d {
                return Err(format!("diagonal has {} entries, expected {d}", v.len()));
            }
            (0..d).for_each(|i| a[i * d + i] = v[i]);
        }
        Covariance::Full(rows) => {
            if rows.len() != d || rows.iter().any(|r| r.len() != d) {
                return Err(format!("a full covariance must be {d}×{d}"));
            }
            for i in 0..d {
                for j in 0..d {
                    a[i * d + j] = rows[i][j];
                }
            }
        }
    }
    if a.iter().any(|v| !v.is_finite()) {
        return Err("entries must be finite".into());
    }
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for i in 0..d {
        for j in 0..i {
            if (a[i * d + j] - a[j * d + i]).abs() > 1e-12 * scale.max(1.0) {
                return Err("the matrix must be symmetric".into());
            }
        }
    }
    let (values, v) = crate::linalg::symmetric_eigen(&a, d);
    if values.iter().any(|l| l.is_nan() || *l <= 0.0) {
        return Err(format!(
            "the matrix must be positive definite (eigenvalues {values:?})"
        ));
    }
    Ok((values, v))
}
