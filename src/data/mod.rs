//! Data to train on: toy 2-D distributions, your own samples, or any closure.
//!
//! A [`Dataset`] draws `n` samples as an `[n, d]` tensor from a random number generator
//! the caller owns, like rand's `Distribution::sample`: the same seed gives the same
//! samples. The [`Trainer`](crate::train::Trainer) asks a dataset for one batch per step.
//!
//! | type | what | reference |
//! |---|---|---|
//! | [`Checkerboard`] | uniform on 8 of the 16 squares of a 4×4 board | FFJORD, Deveney et al. |
//! | [`SwissRoll`] | a noisy 2-D spiral | FFJORD (scikit-learn's swiss roll) |
//! | [`TwoMoons`] | two interleaved half circles | FFJORD (scikit-learn's moons) |
//! | [`EightGaussians`] | 8 Gaussians on a circle | FFJORD |
//! | [`TwoCircles`] | two concentric noisy rings | "circles2" of Deveney et al. |
//! | [`Blob`] | 9 Gaussians on a cross-and-corners grid | "blob" of Deveney et al. |
//! | [`GaussianMixture`] | any Gaussian mixture (exact scores too) | |
//! | [`Empirical`] | rows drawn at random from a tensor of your data | |
//! | [`ImageDataset`] | 8-bit images from IDX files (Fashion-MNIST), scaled to `[−1, 1]` | |
//! | closures | `Fn(usize, &mut dyn RngCore) -> Result<Tensor>` | |
//!
//! The toy sets return `f64` tensors on the CPU; the trainer converts each batch to the
//! model's dtype and device.
//!
//! ```
//! use rand::{rngs::StdRng, SeedableRng};
//! use scoresde::data::{Checkerboard, Dataset};
//! let x = Checkerboard::default().sample(1000, &mut StdRng::seed_from_u64(0))?;
//! assert_eq!(x.dims(), [1000, 2]);
//! let again = Checkerboard::default().sample(1000, &mut StdRng::seed_from_u64(0))?;
//! assert_eq!(x.to_vec2::<f64>()?, again.to_vec2::<f64>()?); // seeded
//! # Ok::<(), scoresde::Error>(())
//! ```

use std::f64::consts::PI;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, RngCore};
use rand_distr::{Distribution, StandardNormal};

use crate::error::{ensure, ensure_positive};
use crate::score::{Covariance, GaussianMixture};
use crate::{Error, Result};

mod images;
mod npy;
pub use images::{IdxArray, ImageDataset, Split, FASHION_MNIST_DIR};
pub use npy::read_npy;

/// A distribution to draw training batches from.
///
/// `sample(n, rng)` returns an `[n, …]` tensor (`[n, d]` for vector data). Closures
/// `Fn(usize, &mut dyn RngCore) -> Result<Tensor>` are datasets.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
/// use scoresde::data::Dataset;
/// // Uniform on the unit square, as a closure.
/// let square = |n: usize, rng: &mut dyn RngCore| {
///     let v: Vec<f64> = (0..2 * n).map(|_| rng.random::<f64>()).collect();
///     Ok(Tensor::from_vec(v, (n, 2), &Device::Cpu)?)
/// };
/// assert_eq!(square.sample(5, &mut StdRng::seed_from_u64(1))?.dims(), [5, 2]);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub trait Dataset {
    /// `n` samples, shape `[n, …]`.
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor>;
}

impl<F> Dataset for F
where
    F: Fn(usize, &mut dyn RngCore) -> Result<Tensor>,
{
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
        self(n, rng)
    }
}

impl Dataset for GaussianMixture {
    /// `n` samples from the mixture, `f64` on the CPU.
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
        GaussianMixture::sample(self, n, DType::F64, &Device::Cpu, rng)
    }
}

/// `n` points of 2-D data, each drawn by `point`, as an `[n, 2]` `f64` tensor.
fn points(
    n: usize,
    rng: &mut dyn RngCore,
    mut point: impl FnMut(&mut dyn RngCore) -> [f64; 2],
) -> Result<Tensor> {
    let mut values = Vec::with_capacity(2 * n);
    for _ in 0..n {
        values.extend(point(rng));
    }
    Ok(Tensor::from_vec(values, (n, 2), &Device::Cpu)?)
}

fn normal(rng: &mut dyn RngCore) -> f64 {
    StandardNormal.sample(rng)
}

fn non_negative(name: &str, value: f64) -> Result<()> {
    ensure(value.is_finite() && value >= 0.0, || {
        format!("{name} must be finite and >= 0, got {value}")
    })
}

/// Uniform on the 8 "black" squares of a 4×4 checkerboard covering `[−h, h]²`.
///
/// Square `(i, j)` (column `i`, row `j`, counted from the lower left) is filled when
/// `i + j` is even. The default `h = 4` is FFJORD's checkerboard (and the peers'
/// benchmark workload); Deveney et al. use `h = 3` ([`Checkerboard::deveney`]).
///
/// ```
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::data::{Checkerboard, Dataset};
/// let board = Checkerboard::new(2.0)?; // squares of side 1
/// let x = board.sample(500, &mut StdRng::seed_from_u64(3))?.to_vec2::<f64>()?;
/// for p in x {
///     let (i, j) = ((p[0] + 2.0).floor() as i64, (p[1] + 2.0).floor() as i64);
///     assert_eq!((i + j) % 2, 0);
/// }
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Checkerboard {
    half_width: f64,
}

impl Checkerboard {
    /// A board covering `[−half_width, half_width]²`; errors unless `half_width > 0`.
    pub fn new(half_width: f64) -> Result<Self> {
        ensure_positive("half_width", half_width)?;
        Ok(Self { half_width })
    }

    /// The board of Deveney et al. (2025): `[−3, 3]²`, squares of side 1.5.
    ///
    /// ```
    /// assert_eq!(scoresde::data::Checkerboard::deveney().half_width(), 3.0);
    /// ```
    pub fn deveney() -> Self {
        Self { half_width: 3.0 }
    }

    /// Half the side of the board.
    pub fn half_width(&self) -> f64 {
        self.half_width
    }

    /// The fraction of the points `x` (shape `[N, 2]`, N ≥ 1, finite) that lie in the
    /// board's filled squares: 1 for its own samples, ½ for points spread uniformly over
    /// the board. Samples blurred into round blobs score well below 1, which a distance
    /// such as MMD can hide.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use scoresde::data::{Checkerboard, Dataset};
    /// let board = Checkerboard::new(2.0)?; // squares of side 1; (0.5, 0.5) is filled
    /// let x = Tensor::new(&[[0.5f64, 0.5], [-0.5, 0.5], [1.5, -0.5], [5.0, 5.0]], &Device::Cpu)?;
    /// assert_eq!(board.fraction_inside(&x)?, 0.5);
    /// let own = board.sample(1000, &mut StdRng::seed_from_u64(0))?;
    /// assert_eq!(board.fraction_inside(&own)?, 1.0);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn fraction_inside(&self, x: &Tensor) -> Result<f64> {
        let (n, d) = x.dims2().map_err(|_| {
            Error::Shape(format!(
                "fraction_inside expects points of shape [N, 2], got {:?}",
                x.dims()
            ))
        })?;
        if d != 2 || n == 0 {
            return Err(Error::Shape(format!(
                "fraction_inside expects points of shape [N, 2] with N >= 1, got {:?}",
                x.dims()
            )));
        }
        let points = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        if points.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite(
                "fraction_inside: the points hold NaN or inf".into(),
            ));
        }
        let side = self.half_width / 2.0;
        let inside = points
            .iter()
            .filter(|p| {
                let (i, j) = (
                    ((p[0] + self.half_width) / side).floor(),
                    ((p[1] + self.half_width) / side).floor(),
                );
                (0.0..4.0).contains(&i) && (0.0..4.0).contains(&j) && (i + j) % 2.0 == 0.0
            })
            .count();
        Ok(inside as f64 / n as f64)
    }
}

impl Default for Checkerboard {
    /// FFJORD's board, `[−4, 4]²` (squares of side 2).
    fn default() -> Self {
        Self { half_width: 4.0 }
    }
}

impl Dataset for Checkerboard {
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
        let side = self.half_width / 2.0;
        points(n, rng, |rng| {
            let cell: u32 = rng.random_range(0..8);
            let row = cell / 2; // 0..4
            let column = 2 * (cell % 2) + row % 2; // i + j even
            let u: f64 = rng.random();
            let v: f64 = rng.random();
            [
                (column as f64 + u) * side - self.half_width,
                (row as f64 + v) * side - self.half_width,
            ]
        })
    }
}

/// A noisy 2-D Swiss roll: `(θ cos θ, θ sin θ)/5` for `θ = 1.5π(1 + 2u)`, `u ~ U(0, 1)`,
/// plus Gaussian noise of standard deviation `noise/5` (FFJORD's data, from
/// scikit-learn's `make_swiss_roll` with `noise = 1`, the default).
///
/// ```
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::data::{Dataset, SwissRoll};
/// let x = SwissRoll::default().sample(1000, &mut StdRng::seed_from_u64(0))?;
/// let r = x.sqr()?.sum(1)?.sqrt()?.max(0)?.to_scalar::<f64>()?;
/// assert!(r < 3.5); // the outer end of the roll is at 4.5π/5 ≈ 2.83
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SwissRoll {
    noise: f64,
}

impl SwissRoll {
    /// A roll with noise standard deviation `noise` before the division by 5.
    pub fn new(noise: f64) -> Result<Self> {
        non_negative("noise", noise)?;
        Ok(Self { noise })
    }
}

impl Default for SwissRoll {
    /// `noise = 1` (FFJORD).
    fn default() -> Self {
        Self { noise: 1.0 }
    }
}

impl Dataset for SwissRoll {
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
        points(n, rng, |rng| {
            let u: f64 = rng.random();
            let theta = 1.5 * PI * (1.0 + 2.0 * u);
            let (nx, ny) = (normal(rng), normal(rng));
            [
                (theta * theta.cos() + self.noise * nx) / 5.0,
                (theta * theta.sin() + self.noise * ny) / 5.0,
            ]
        })
    }
}

/// Two interleaving half circles (scikit-learn's moons), scaled as in FFJORD: the upper
/// moon `(cos θ, sin θ)` and the lower `(1 − cos θ, ½ − sin θ)` for `θ ~ U(0, π)`, plus
/// Gaussian noise of standard deviation `noise` (default 0.1), then `2x + (−1, −0.2)`.
///
/// ```
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::data::{Dataset, TwoMoons};
/// let x = TwoMoons::new(0.0)?.sample(100, &mut StdRng::seed_from_u64(0))?.to_vec2::<f64>()?;
/// for p in x { // noise-free points lie on one of the two unit circles (scaled by 2)
///     let (u, v) = ((p[0] + 1.0) / 2.0, (p[1] + 0.2) / 2.0);
///     let upper = (u * u + v * v - 1.0).abs();
///     let lower = ((u - 1.0).powi(2) + (v - 0.5).powi(2) - 1.0).abs();
///     assert!(upper.min(lower) < 1e-9);
/// }
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TwoMoons {
    noise: f64,
}

impl TwoMoons {
    /// Moons with noise standard deviation `noise` (before the scaling by 2).
    pub fn new(noise: f64) -> Result<Self> {
        non_negative("noise", noise)?;
        Ok(Self { noise })
    }
}

impl Default for TwoMoons {
    /// `noise = 0.1` (FFJORD).
    fn default() -> Self {
        Self { noise: 0.1 }
    }
}

impl Dataset for TwoMoons {
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
        points(n, rng, |rng| {
            let theta = rng.random::<f64>() * PI;
            let (x, y) = if rng.random::<bool>() {
                (theta.cos(), theta.sin())
            } else {
                (1.0 - theta.cos(), 0.5 - theta.sin())
            };
            let (nx, ny) = (normal(rng), normal(rng));
            [
                2.0 * (x + self.noise * nx) - 1.0,
                2.0 * (y + self.noise * ny) - 0.2,
            ]
        })
    }
}

/// Eight equally weighted Gaussians with centres at radius `4/√2 ≈ 2.83` on the
/// directions `k·45°`, standard deviation `0.5/√2` each (FFJORD's "8gaussians").
///
/// Being a Gaussian mixture, it has exact scores at every time: see
/// [`EightGaussians::mixture`].
///
/// ```
/// use candle_core::Tensor;
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::data::{Dataset, EightGaussians};
/// let x = EightGaussians.sample(4000, &mut StdRng::seed_from_u64(0))?;
/// let r = x.sqr()?.sum(1)?.sqrt()?.mean_all()?.to_scalar::<f64>()?;
/// assert!((r - 8f64.sqrt()).abs() < 0.05);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EightGaussians;

impl EightGaussians {
    const RADIUS: f64 = 4.0 / std::f64::consts::SQRT_2;
    const STD: f64 = 0.5 / std::f64::consts::SQRT_2;

    /// The same distribution as a [`GaussianMixture`] (for exact scores).
    ///
    /// ```
    /// assert_eq!(scoresde::data::EightGaussians.mixture().components(), 8);
    /// ```
    pub fn mixture(&self) -> GaussianMixture {
        let means = (0..8)
            .map(|k| {
                let angle = k as f64 * PI / 4.0;
                vec![Self::RADIUS * angle.cos(), Self::RADIUS * angle.sin()]
            })
            .collect();
        mixture_or_bug(vec![1.0; 8], means, Self::STD * Self::STD)
    }
}

impl Dataset for EightGaussians {
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
        points(n, rng, |rng| {
            let angle = rng.random_range(0..8u32) as f64 * PI / 4.0;
            [
                Self::RADIUS * angle.cos() + Self::STD * normal(rng),
                Self::RADIUS * angle.sin() + Self::STD * normal(rng),
            ]
        })
    }
}

/// Two concentric noisy rings, "circles2" of Deveney et al. (2025): with probability ½
/// each, radius `~ N(1.3, 0.2²)` or `N(2.8, 0.2²)`, angle uniform.
///
/// (Their code draws radii `N(0.65, 0.1²)` and `N(1.4, 0.1²)` and doubles the points;
/// it gives both rings of a batch the same angles and exactly half the points each, which
/// only correlates points within a batch; here every point is independent.)
///
/// ```
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::data::{Dataset, TwoCircles};
/// let x = TwoCircles.sample(4000, &mut StdRng::seed_from_u64(0))?;
/// let r = x.sqr()?.sum(1)?.sqrt()?.mean_all()?.to_scalar::<f64>()?;
/// assert!((r - 2.05).abs() < 0.05); // (1.3 + 2.8)/2
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TwoCircles;

impl Dataset for TwoCircles {
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
        points(n, rng, |rng| {
            let mean = if rng.random::<bool>() { 1.3 } else { 2.8 };
            let radius = mean + 0.2 * normal(rng);
            let angle = rng.random::<f64>() * 2.0 * PI;
            [radius * angle.cos(), radius * angle.sin()]
        })
    }
}

/// Nine equally weighted Gaussians, "blob" of Deveney et al. (2025): centres `0.65·c` for
/// `c` in `{(0,0), (±2,±2), (±4,0), (0,±4)}`, covariance `0.2·0.65²·I` each.
///
/// A Gaussian mixture, so exact scores are available: see [`Blob::mixture`].
///
/// ```
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::data::{Blob, Dataset};
/// let x = Blob.sample(9000, &mut StdRng::seed_from_u64(0))?;
/// let mean = x.mean(0)?.to_vec1::<f64>()?;
/// assert!(mean[0].abs() < 0.05 && mean[1].abs() < 0.05);
/// assert_eq!(Blob.mixture().components(), 9);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Blob;

impl Blob {
    const CENTRES: [[f64; 2]; 9] = [
        [2.0, -2.0],
        [-2.0, 2.0],
        [2.0, 2.0],
        [-2.0, -2.0],
        [0.0, 0.0],
        [4.0, 0.0],
        [-4.0, 0.0],
        [0.0, 4.0],
        [0.0, -4.0],
    ];
    const SCALE: f64 = 0.65;
    const VARIANCE: f64 = 0.2 * 0.65 * 0.65;

    /// The same distribution as a [`GaussianMixture`] (for exact scores).
    pub fn mixture(&self) -> GaussianMixture {
        let means = Self::CENTRES
            .iter()
            .map(|c| vec![Self::SCALE * c[0], Self::SCALE * c[1]])
            .collect();
        mixture_or_bug(vec![1.0; 9], means, Self::VARIANCE)
    }
}

impl Dataset for Blob {
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
        let std = Self::VARIANCE.sqrt();
        points(n, rng, |rng| {
            let c = Self::CENTRES[rng.random_range(0..9usize)];
            [
                Self::SCALE * c[0] + std * normal(rng),
                Self::SCALE * c[1] + std * normal(rng),
            ]
        })
    }
}

/// An isotropic mixture from constants that are valid by construction.
fn mixture_or_bug(weights: Vec<f64>, means: Vec<Vec<f64>>, variance: f64) -> GaussianMixture {
    let k = weights.len();
    match GaussianMixture::new(weights, means, vec![Covariance::Isotropic(variance); k]) {
        Ok(m) => m,
        Err(e) => unreachable!("built-in mixture constants are valid: {e}"),
    }
}

/// Your own data: each draw picks rows of a tensor uniformly at random, with replacement.
///
/// The tensor has shape `[N, …]` with `N ≥ 1` and finite entries; batches keep its dtype
/// and device.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::data::{Dataset, Empirical};
/// let points = Tensor::new(&[[0.0f32, 1.0], [2.0, 3.0], [4.0, 5.0]], &Device::Cpu)?;
/// let data = Empirical::new(points)?;
/// let batch = data.sample(8, &mut StdRng::seed_from_u64(0))?;
/// assert_eq!(batch.dims(), [8, 2]);
/// assert!(Empirical::new(Tensor::new(&[[f32::NAN, 0.0]], &Device::Cpu)?).is_err());
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Empirical {
    data: Tensor,
}

impl Empirical {
    /// Wraps `data` (shape `[N, …]`); errors if it is empty, a scalar or vector, or holds
    /// a NaN or an infinity.
    pub fn new(data: Tensor) -> Result<Self> {
        if data.rank() < 2 || data.dim(0)? == 0 {
            return Err(Error::Shape(format!(
                "empirical data must have shape [N, ...] with N > 0 and at least 2 dimensions, got {:?}",
                data.dims()
            )));
        }
        let total = data.to_dtype(DType::F64)?.abs()?.sum_all()?.to_scalar::<f64>()?;
        if !total.is_finite() {
            return Err(Error::NonFinite(
                "the empirical data contain NaN or infinity".into(),
            ));
        }
        Ok(Self { data })
    }

    /// The number of stored samples `N`.
    pub fn len(&self) -> usize {
        self.data.dims()[0]
    }

    /// Always `false`: an `Empirical` holds at least one sample.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The stored samples.
    pub fn data(&self) -> &Tensor {
        &self.data
    }
}

impl Dataset for Empirical {
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
        let len = self.len();
        let rows: Vec<u32> = (0..n).map(|_| rng.random_range(0..len) as u32).collect();
        let index = Tensor::from_vec(rows, n, self.data.device())?;
        Ok(self.data.index_select(&index, 0)?)
    }
}
