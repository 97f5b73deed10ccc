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

/// Both sets read and scaled together by `2^−e`, the power of two that brings every
/// coordinate into `[−1, 1]`: distances then neither overflow (points near ±1e308) nor
/// underflow (points near 1e-300), and since the factor is a power of two, every result
/// is the unscaled computation's, bit for bit, times `2^e` (or `2^{2e}` for squares).
fn read_pair(x: &Tensor, y: &Tensor, equal_sizes: bool) -> Result<(Points, Points, i32)> {
    let (mut x, mut y) = (Points::read(x, "x")?, Points::read(y, "y")?);
    if x.d != y.d {
        return Err(Error::Shape(format!("x has dimension {} but y has {}", x.d, y.d)));
    }
    if equal_sizes && x.n != y.n {
        return Err(Error::Shape(format!(
            "this distance needs sets of equal size, got {} and {} points",
            x.n, y.n
        )));
    }
    let largest = x.data.iter().chain(&y.data).fold(0.0f64, |m, v| m.max(v.abs()));
    let exponent = if largest > 0.0 {
        largest.log2().ceil() as i32
    } else {
        0
    };
    for v in x.data.iter_mut().chain(y.data.iter_mut()) {
        *v = times_pow2(*v, -exponent);
    }
    Ok((x, y, exponent))
}

/// `value·2^e` without overflowing an intermediate power of two (`e` may reach ±2,100).
pub(crate) fn times_pow2(mut value: f64, mut e: i32) -> f64 {
    while e != 0 {
        let step = e.clamp(-1000, 1000);
        value *= 2f64.powi(step);
        e -= step;
    }
    value
}

/// `value·2^e` for a result of the scaled points, an error if it is not finite.
fn unscaled(value: f64, e: i32, what: &str) -> Result<f64> {
    let v = times_pow2(value, e);
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Error::NonFinite(format!(
            "{what} is {value:e}·2^{e}, beyond f64's range; take the square root (w2_exact) or rescale the points"
        )))
    }
}

/// The largest point sets [`w2_exact`] takes: its `n × n` cost matrix then holds 800 MB,
/// and the `O(n³)` solve takes minutes.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use scoresde::metrics::{w2_exact, MAX_W2_EXACT_POINTS};
/// let x = Tensor::zeros((MAX_W2_EXACT_POINTS + 1, 2), DType::F32, &Device::Cpu)?;
/// assert!(w2_exact(&x, &x).is_err()); // refused before allocating
/// # Ok::<(), scoresde::Error>(())
/// ```
pub const MAX_W2_EXACT_POINTS: usize = 10_000;

fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(u, v)| (u - v) * (u - v)).sum()
}

/// The exact 2-Wasserstein distance between two equal-size point sets,
/// `√(min_π (1/n) Σ ‖x_i − y_π(i)‖²)`, by solving the assignment problem exactly
/// (shortest augmenting paths with potentials, `O(n³)`; about a second for n = 2,000 in
/// release builds). At most [`MAX_W2_EXACT_POINTS`] points per set (an error names the
/// size beyond it).
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
    let (scaled, e) = w2_squared_scaled(x, y)?;
    unscaled(scaled.sqrt(), e, "W2")
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
    let (scaled, e) = w2_squared_scaled(x, y)?;
    unscaled(scaled, 2 * e, "W2²")
}

/// W2² of the scaled points, and the exponent `e` of the scale.
fn w2_squared_scaled(x: &Tensor, y: &Tensor) -> Result<(f64, i32)> {
    let (x, y, e) = read_pair(x, y, true)?;
    let n = x.n;
    ensure(n <= MAX_W2_EXACT_POINTS, || {
        format!(
            "w2_exact with {n} points needs a {n} x {n} cost matrix ({} MB) and an O(n^3) solve; \
             the limit is {MAX_W2_EXACT_POINTS} points: subsample, or use histogram_w2 or sliced_w2",
            (n as u128 * n as u128 * 8) / 1_000_000
        )
    })?;
    let mut cost = Vec::with_capacity(n * n);
    for i in 0..n {
        cost.extend((0..n).map(|j| squared_distance(x.row(i), y.row(j))));
    }
    // Coordinates in [−1, 1] bound every cost by 4d; the check keeps the solver, which
    // loops until a finite slack appears, away from anything else.
    if cost.iter().any(|c| !c.is_finite()) {
        return Err(Error::NonFinite(
            "w2_exact: a squared distance is not finite".into(),
        ));
    }
    let matching = assignment::solve(&cost, n);
    let total = matching
        .iter()
        .enumerate()
        .map(|(i, &j)| cost[i * n + j])
        .sum::<f64>();
    Ok((total / n as f64, e))
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
    let (x, y, e) = read_pair(x, y, true)?;
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
    unscaled((total / projections as f64).sqrt(), e, "sliced W2")
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
    let (x, y, e) = read_pair(x, y, false)?;
    ensure(x.n >= 2 && y.n >= 2, || {
        "MMD² needs at least 2 points in each set".into()
    })?;
    let h = match bandwidth {
        Some(h) => {
            ensure_positive("the bandwidth", h)?;
            times_pow2(h, -e) // in the points' scaled units
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
    let (x, y, e) = read_pair(x, y, false)?;
    ensure(x.n >= 2 && y.n >= 2, || {
        "the energy distance needs at least 2 points in each set".into()
    })?;
    let distance = |a: &[f64], b: &[f64]| squared_distance(a, b).sqrt();
    let scaled =
        2.0 * cross_mean(&x, &y, &distance) - within_mean(&x, &distance) - within_mean(&y, &distance);
    unscaled(scaled, e, "the energy distance")
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
