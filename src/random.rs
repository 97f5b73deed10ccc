//! Seeded noise as candle tensors, and seeded initial weights for your own networks.
//!
//! candle's CPU random number generator cannot be seeded (candle issue 2651), so every
//! random draw in this crate comes from a `rand::Rng` the caller owns: the same seed gives
//! the same run. [`seeded_var_builder`] does the same for the initial weights of networks
//! built with `candle_nn` layers.

use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
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
    let n = crate::error::checked_elements(shape.dims(), "a standard normal draw")?;
    let values: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
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
    let n = crate::error::checked_elements(shape.dims(), "a uniform draw")?;
    let values: Vec<f64> = (0..n).map(|_| rng.random_range(low..high)).collect();
    Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
}

/// A `VarBuilder` on `vars` that draws every *new* variable from a generator seeded with
/// `seed`, following the initialization hint the layer asks for (`candle_nn::linear`'s
/// Kaiming-normal weights and uniform biases, `Init::Randn`, `Init::Uniform`, constants):
/// the same seed and the same network code give the same initial weights, which a
/// `VarBuilder::from_varmap` cannot (candle's own CPU generator cannot be seeded).
///
/// Variables already in `vars` (loaded from a checkpoint, say) are returned as they are,
/// after a shape check. Draws happen in the order the network asks for its variables.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{linear, VarMap};
/// use scoresde::random::seeded_var_builder;
///
/// let build = |seed| -> candle_core::Result<Vec<f32>> {
///     let vars = VarMap::new();
///     let layer = linear(4, 3, seeded_var_builder(&vars, seed, DType::F32, &Device::Cpu).pp("fc"))?;
///     layer.weight().flatten_all()?.to_vec1::<f32>()
/// };
/// assert_eq!(build(7)?, build(7)?); // the same seed, the same weights
/// assert_ne!(build(7)?, build(8)?);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn seeded_var_builder(vars: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        vars: vars.clone(),
        rng: Mutex::new(StdRng::seed_from_u64(seed)),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// The backend of [`seeded_var_builder`].
struct SeededVarMap {
    vars: VarMap,
    rng: Mutex<StdRng>,
}

impl SeededVarMap {
    /// Values for a new variable of `shape`, as candle's `Init::var` would draw them.
    fn draw(&self, shape: &Shape, init: Init) -> candle_core::Result<Vec<f64>> {
        let n = shape.elem_count();
        let mut rng = self.rng.lock().map_err(|_| {
            candle_core::Error::Msg("seeded_var_builder: the generator's lock is poisoned".into())
        })?;
        let uniform = |lo: f64, up: f64, rng: &mut StdRng| -> candle_core::Result<Vec<f64>> {
            let dist = rand_distr::Uniform::new(lo, up).map_err(|e| {
                candle_core::Error::Msg(format!("seeded_var_builder: uniform init on [{lo}, {up}): {e}"))
            })?;
            Ok((0..n).map(|_| dist.sample(rng)).collect())
        };
        let normal = |mean: f64, std: f64, rng: &mut StdRng| -> candle_core::Result<Vec<f64>> {
            let bad = |why: &str| {
                candle_core::Error::Msg(format!(
                    "seeded_var_builder: normal init N({mean}, {std}²): {why}"
                ))
            };
            if !(mean.is_finite() && std.is_finite() && std >= 0.0) {
                return Err(bad("needs a finite mean and a finite std >= 0"));
            }
            let dist = rand_distr::Normal::new(mean, std).map_err(|e| bad(&e.to_string()))?;
            Ok((0..n).map(|_| dist.sample(rng)).collect())
        };
        match init {
            Init::Const(c) => Ok(vec![c; n]),
            Init::Uniform { lo, up } => uniform(lo, up, &mut rng),
            Init::Randn { mean, stdev } => normal(mean, stdev, &mut rng),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => uniform(-(3f64.sqrt()) * std, 3f64.sqrt() * std, &mut rng),
                    NormalOrUniform::Normal => normal(0.0, std, &mut rng),
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self.vars.data().lock().map_err(|_| {
            candle_core::Error::Msg("seeded_var_builder: the VarMap's lock is poisoned".into())
        })?;
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("shape mismatch on {name}: {shape:?} <> {:?}", var.shape())
            }
            return Ok(var.as_tensor().clone());
        }
        let values = self.draw(&shape, init)?;
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)?;
        let tensor = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("seeded_var_builder: `get_unchecked` needs a shape; use `get` for {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}
