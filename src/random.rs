//! Seeded noise as candle tensors.
//!
//! candle's CPU random number generator cannot be seeded (candle issue 2651), so every
//! random draw in this crate comes from a `rand::Rng` the caller owns: the same seed gives
//! the same run.

use candle_core::{DType, Device, Shape, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// A tensor of independent standard normal draws from `rng`.
///
/// ```
/// use candle_core::{DType, Device};
/// use rand::{rngs::StdRng, SeedableRng};
/// let mut rng = StdRng::seed_from_u64(0);
/// let z = scoresde::random::standard_normal((4, 2), DType::F32, &Device::Cpu, &mut rng)?;
/// assert_eq!(z.dims(), [4, 2]);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn standard_normal<R: Rng + ?Sized>(
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
    rng: &mut R,
) -> Result<Tensor> {
    let shape = shape.into();
    let values: Vec<f64> = (0..shape.elem_count())
        .map(|_| StandardNormal.sample(rng))
        .collect();
    Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
}

/// Uniform draws on `[low, high)`, one per element of `shape`.
///
/// ```
/// use candle_core::{DType, Device};
/// use rand::{rngs::StdRng, SeedableRng};
/// let mut rng = StdRng::seed_from_u64(0);
/// let t = scoresde::random::uniform(8, 1e-3, 1.0, DType::F64, &Device::Cpu, &mut rng)?;
/// assert!(t.to_vec1::<f64>()?.iter().all(|&v| (1e-3..1.0).contains(&v)));
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn uniform<R: Rng + ?Sized>(
    shape: impl Into<Shape>,
    low: f64,
    high: f64,
    dtype: DType,
    device: &Device,
    rng: &mut R,
) -> Result<Tensor> {
    crate::error::ensure(low < high && (high - low).is_finite(), || {
        format!("uniform needs finite low < high, got [{low}, {high})")
    })?;
    let shape = shape.into();
    let values: Vec<f64> = (0..shape.elem_count())
        .map(|_| rng.random_range(low..high))
        .collect();
    Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
}
