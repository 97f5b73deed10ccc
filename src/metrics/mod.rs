//! Distances between sample sets: how far are ODE samples from SDE samples, or either from
//! the data?
//!
//! | function | what | cost |
//! |---|---|---|
//! | [`w2_exact`] | exact 2-Wasserstein between equal-size sets (assignment problem) | `O(n³)`, n ≤ ~2,000 |
//! | [`sliced_w2`] | mean over random directions of the 1-D W2² (sort and match), then √ | `O(k·n log n)` |
//! | [`mmd2_unbiased`] | unbiased MMD² with a Gaussian kernel | `O(n²)` |
//! | [`energy_distance`] | `2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖` | `O(n²)` |
//! | [`frechet_distance`] | squared Fréchet distance between moment-matched Gaussians (FID's formula) | `O(n·d² + d³)` |
//! | [`histogram_w2`] | exact W2 between the [`Histogram`]s of two sets on a [`Grid`] (Deveney et al.) | binning `O(n)`, then network simplex on the occupied cells |
//!
//! [`GapReport`] puts them to work: ODE and SDE samples of one model from the same prior
//! draws, their distance to each other and to the data, and the model's Fokker–Planck
//! residual (Deveney et al. 2025).
//!
//! Point sets are tensors of shape `[N, d]` (any float dtype, any device; they are read
//! into `f64` on the CPU). Every function checks its input: empty or non-finite sets,
//! mismatched dimensions and, where required, unequal sizes are errors.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use scoresde::metrics::{mmd2_unbiased, w2_exact};
//! let x = Tensor::new(&[[0.0f64, 0.0], [1.0, 0.0]], &Device::Cpu)?;
//! let y = Tensor::new(&[[1.0f64, 1.0], [0.0, 1.0]], &Device::Cpu)?;
//! assert!((w2_exact(&x, &y)? - 1.0).abs() < 1e-12); // every point moves up by 1
//! let _ = mmd2_unbiased(&x, &y, Some(1.0))?;
//! # Ok::<(), scoresde::Error>(())
//! ```

mod assignment;
mod frechet;
mod gap;
mod histogram;
mod transport;

pub use frechet::{frechet_distance, frechet_gaussians};
pub use gap::{mean_penalty, Gap, GapReport};
pub use histogram::{histogram_w2, Grid, Histogram};

use candle_core::{DType, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{ensure, ensure_positive};
use crate::{Error, Result};

/// A point set read into row-major `f64`.
pub(crate) struct Points {
    pub(crate) data: Vec<f64>,
    pub(crate) n: usize,
    pub(crate) d: usize,
}

impl Points {
    pub(crate) fn read(x: &Tensor, name: &str) -> Result<Self> {
        if x.rank() != 2 {
            return Err(Error::Shape(format!(
                "{name} must have shape [N, d], got {:?}",
                x.dims()
            )));
        }
        let (n, d) = x.dims2()?;
        if n == 0 || d == 0 {
            return Err(Error::Shape(format!("{name} is empty (shape {:?})", x.dims())));
        }
        let data = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!("{name} contains NaN or infinity")));
        }
        Ok(Self { data, n, d })
    }

    pub(crate) fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.d..(i + 1) * self.d]
    }
}

fn read_pair(x: &Tensor, y: &Tensor, equal_sizes: bool) -> Result<(Points, Points)> {
    let (x, y) = (Points::read(x, "x")?, Points::read(y, "y")?);
    if x.d != y.d {
        return Err(Error::Shape(format!("x has dimension {} but y has {}", x.d, y.d)));
    }
    if equal_sizes && x.n != y.n {
        return Err(Error::Shape(format!(
            "this distance needs sets of equal size, got {} and {} points",
            x.n, y.n
        )));
    }
    Ok((x, y))
}

fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(u, v)| (u - v) * (u - v)).sum()
}

/// The exact 2-Wasserstein distance between two equal-size point sets,
/// `√(min_π (1/n) Σ ‖x_i − y_π(i)‖²)`, by solving the assignment problem exactly
/// (shortest augmenting paths with potentials, `O(n³)`; about a second for n = 2,000 in
/// release builds).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::metrics::w2_exact;
/// let x = Tensor::new(&[[0.0f64], [10.0]], &Device::Cpu)?;
/// let y = Tensor::new(&[[11.0f64], [1.0]], &Device::Cpu)?;
/// assert!((w2_exact(&x, &y)? - 1.0).abs() < 1e-12); // 0→1 and 10→11, not 0→11
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn w2_exact(x: &Tensor, y: &Tensor) -> Result<f64> {
    Ok(w2_squared_exact(x, y)?.sqrt())
}

/// The squared exact 2-Wasserstein distance (see [`w2_exact`]).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[0.0f64, 0.0]], &Device::Cpu)?;
/// let y = Tensor::new(&[[3.0f64, 4.0]], &Device::Cpu)?;
/// assert_eq!(scoresde::metrics::w2_squared_exact(&x, &y)?, 25.0);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn w2_squared_exact(x: &Tensor, y: &Tensor) -> Result<f64> {
    let (x, y) = read_pair(x, y, true)?;
    let n = x.n;
    let mut cost = Vec::with_capacity(n * n);
    for i in 0..n {
        cost.extend((0..n).map(|j| squared_distance(x.row(i), y.row(j))));
    }
    let matching = assignment::solve(&cost, n);
    Ok(matching
        .iter()
        .enumerate()
        .map(|(i, &j)| cost[i * n + j])
        .sum::<f64>()
        / n as f64)
}

/// Sliced 2-Wasserstein distance: the square root of the mean, over `projections` random
/// unit directions θ, of the exact 1-D W2² between `⟨x, θ⟩` and `⟨y, θ⟩` (sort and
/// match). Equal sizes required. Cheap enough for large sets; a lower bound of
/// [`w2_exact`] up to the factor `√d`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::metrics::sliced_w2;
/// let x = Tensor::new(&[[0.0f64, 0.0], [1.0, 1.0]], &Device::Cpu)?;
/// let d = sliced_w2(&x, &x, 50, &mut StdRng::seed_from_u64(0))?;
/// assert_eq!(d, 0.0);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn sliced_w2<R: Rng + ?Sized>(x: &Tensor, y: &Tensor, projections: usize, rng: &mut R) -> Result<f64> {
    ensure(projections > 0, || {
        "sliced W2 needs at least one projection".into()
    })?;
    let (x, y) = read_pair(x, y, true)?;
    let (n, d) = (x.n, x.d);
    let mut total = 0.0;
    let mut px = vec![0.0; n];
    let mut py = vec![0.0; n];
    for _ in 0..projections {
        let mut theta: Vec<f64> = (0..d).map(|_| StandardNormal.sample(rng)).collect();
        let norm = theta.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm == 0.0 {
            theta[0] = 1.0;
        } else {
            theta.iter_mut().for_each(|v| *v /= norm);
        }
        let project = |p: &Points, out: &mut Vec<f64>| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = p.row(i).iter().zip(&theta).map(|(a, b)| a * b).sum();
            }
            out.sort_by(f64::total_cmp);
        };
        project(&x, &mut px);
        project(&y, &mut py);
        total += px.iter().zip(&py).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / n as f64;
    }
    Ok((total / projections as f64).sqrt())
}

/// The unbiased estimate of the squared maximum mean discrepancy with the Gaussian kernel
/// `k(a, b) = exp(−‖a − b‖² / (2h²))` (Gretton et al. 2012): within-set averages exclude the
/// diagonal, so the estimate can be slightly negative when the distributions agree.
///
/// `bandwidth = None` uses the median heuristic: `h` = the median distance between distinct
/// points of the pooled set (computed on at most 1,000 evenly spaced points of it). Each
/// set needs at least 2 points; sizes may differ.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::metrics::mmd2_unbiased;
/// let x = Tensor::new(&[[0.0f64], [0.1], [0.2]], &Device::Cpu)?;
/// let far = Tensor::new(&[[5.0f64], [5.1]], &Device::Cpu)?;
/// assert!(mmd2_unbiased(&x, &far, None)? > 0.5);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn mmd2_unbiased(x: &Tensor, y: &Tensor, bandwidth: Option<f64>) -> Result<f64> {
    let (x, y) = read_pair(x, y, false)?;
    ensure(x.n >= 2 && y.n >= 2, || {
        "MMD² needs at least 2 points in each set".into()
    })?;
    let h = match bandwidth {
        Some(h) => {
            ensure_positive("the bandwidth", h)?;
            h
        }
        None => median_distance(&x, &y)?,
    };
    let gamma = 1.0 / (2.0 * h * h);
    let kernel = |a: &[f64], b: &[f64]| (-gamma * squared_distance(a, b)).exp();
    Ok(within_mean(&x, &kernel) + within_mean(&y, &kernel) - 2.0 * cross_mean(&x, &y, &kernel))
}

/// The energy distance `2E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖` (Székely & Rizzo), with
/// within-set means over distinct pairs (U-statistics). Zero in expectation when the
/// distributions agree; sizes may differ (each at least 2).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::metrics::energy_distance;
/// let x = Tensor::new(&[[0.0f64], [1.0]], &Device::Cpu)?;
/// let y = Tensor::new(&[[3.0f64], [4.0]], &Device::Cpu)?;
/// // 2·mean(|x − y|) − mean_{i≠j}|x_i − x_j| − mean_{i≠j}|y_i − y_j| = 2·3 − 1 − 1
/// assert!((energy_distance(&x, &y)? - 4.0).abs() < 1e-12);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn energy_distance(x: &Tensor, y: &Tensor) -> Result<f64> {
    let (x, y) = read_pair(x, y, false)?;
    ensure(x.n >= 2 && y.n >= 2, || {
        "the energy distance needs at least 2 points in each set".into()
    })?;
    let distance = |a: &[f64], b: &[f64]| squared_distance(a, b).sqrt();
    Ok(2.0 * cross_mean(&x, &y, &distance) - within_mean(&x, &distance) - within_mean(&y, &distance))
}

/// Mean of `f` over distinct pairs of one set.
fn within_mean(p: &Points, f: &impl Fn(&[f64], &[f64]) -> f64) -> f64 {
    let mut total = 0.0;
    for i in 0..p.n {
        for j in i + 1..p.n {
            total += f(p.row(i), p.row(j));
        }
    }
    2.0 * total / (p.n * (p.n - 1)) as f64
}

/// Mean of `f` over all pairs across two sets.
fn cross_mean(x: &Points, y: &Points, f: &impl Fn(&[f64], &[f64]) -> f64) -> f64 {
    let mut total = 0.0;
    for i in 0..x.n {
        for j in 0..y.n {
            total += f(x.row(i), y.row(j));
        }
    }
    total / (x.n * y.n) as f64
}

/// Median distance between distinct points of the pooled set (subsampled to ≤ 1,000).
fn median_distance(x: &Points, y: &Points) -> Result<f64> {
    let total = x.n + y.n;
    let stride = total.div_ceil(1000);
    let pooled: Vec<&[f64]> = (0..total)
        .step_by(stride)
        .map(|i| if i < x.n { x.row(i) } else { y.row(i - x.n) })
        .collect();
    let mut distances = Vec::with_capacity(pooled.len() * pooled.len() / 2);
    for i in 0..pooled.len() {
        for j in i + 1..pooled.len() {
            distances.push(squared_distance(pooled[i], pooled[j]).sqrt());
        }
    }
    distances.sort_by(f64::total_cmp);
    let median = distances.get(distances.len() / 2).copied().unwrap_or(0.0);
    if median > 0.0 {
        Ok(median)
    } else {
        Err(Error::InvalidParameter(
            "the median-heuristic bandwidth is 0 (most points coincide); pass a bandwidth".into(),
        ))
    }
}
