//! Reference networks: a noise-conditional score MLP and a scalar potential MLP.
//!
//! Both are built through a [`VarBuilder`], so the parameters live in a `VarMap` you own
//! (to train, save, load or copy). Parameters are initialized from a seeded `rand` RNG
//! (`config.seed`), because candle's own RNG cannot be seeded: the same seed gives the same
//! network. Variables that already exist in the builder (a loaded checkpoint, or a second
//! model on the same `VarMap`) are used as they are.

use candle_core::{DType, Module, Storage, Tensor, WithDType, D};
use candle_nn::{Init, Linear, VarBuilder};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use super::{LogDensityModel, ScoreModel};
use crate::error::{ensure, ensure_positive};
use crate::kernels::training::{
    FpeCoefficients, Layer, Points, PotentialBatch, PotentialMlp, Real, ResidualRows, ScoreBatch, ScoreMlp,
    Stack,
};
use crate::kernels::{DenseView, InferenceScope, Pointwise, ScoreMlpView};
use crate::regularizer::PenaltyTerms;
use crate::sde::{time_range, Sde};
use crate::train::{ObjectiveGradients, ObjectiveTerms};
use crate::{Error, Result};

/// The nonlinearity between hidden layers.
///
/// All have a backward pass in candle, including second order (the Fokker–Planck
/// regularizers differentiate through them twice); prefer a smooth one (`Silu`, `Tanh`,
/// `Softplus`, `Gelu`) when a regularizer takes input derivatives.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::score::Activation;
/// let x = Tensor::new(&[-1.0f64, 0.0, 2.0], &Device::Cpu)?;
/// let y = Activation::Softplus { beta: 100.0 }.apply(&x)?.to_vec1::<f64>()?;
/// assert!(y[0] < 1e-40 && (y[1] - 2f64.ln() / 100.0).abs() < 1e-15 && (y[2] - 2.0).abs() < 1e-15);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Activation {
    /// `x·sigmoid(x)` (the score_sde and peer default).
    Silu,
    /// `tanh(x)`.
    Tanh,
    /// `softplus_β(x) = log(1 + exp(βx))/β`, a smooth ReLU; `β = 100` in Deveney et al.
    Softplus {
        /// Sharpness `β > 0`.
        beta: f64,
    },
    /// `max(x, 0)`: not smooth, avoid it with regularizers.
    Relu,
    /// The exact (erf) GELU.
    Gelu,
}

impl Activation {
    /// Applies the nonlinearity elementwise.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match *self {
            // f32/f64 on the CPU: one fused op, differentiable to any order (kernels.rs).
            Self::Silu if crate::kernels::silu_supported(x) => crate::kernels::silu(x)?,
            Self::Silu => x.silu()?,
            Self::Tanh => x.tanh()?,
            // relu(x) + log(1 + exp(−β|x|))/β: no overflow for large βx.
            Self::Softplus { beta } => {
                let exponent = (x.abs()? * -beta)?.clamp(-exp_limit(x.dtype()), 0.0)?;
                let tail = (exponent.exp()? + 1.0)?.log()?;
                (x.relu()? + (tail / beta)?)?
            }
            Self::Relu => x.relu()?,
            Self::Gelu => x.gelu_erf()?,
        })
    }

    /// The derivative `act'(x)`, elementwise (no graph is needed through it: it serves
    /// hand-written input gradients).
    fn derivative(&self, x: &Tensor) -> Result<Tensor> {
        let sigmoid = |v: &Tensor| -> Result<Tensor> { Ok(candle_nn::ops::sigmoid(v)?) };
        Ok(match *self {
            Self::Silu if crate::kernels::silu_supported(x) => crate::kernels::silu_derivative(x, 1)?,
            // σ(x)(1 + x(1 − σ(x)))
            Self::Silu => {
                let s = sigmoid(x)?;
                (&s * ((x * (1.0 - &s)?)? + 1.0)?)?
            }
            Self::Tanh => (1.0 - x.tanh()?.sqr()?)?,
            Self::Softplus { beta } => {
                let limit = exp_limit(x.dtype());
                sigmoid(&(x * beta)?.clamp(-limit, limit)?)?
            }
            Self::Relu => x.gt(0.0)?.to_dtype(x.dtype())?,
            // Φ(x) + x·φ(x)
            Self::Gelu => {
                let cdf = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
                let pdf = (x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
                (cdf? + (x * pdf?)?)?
            }
        })
    }

    fn validate(&self) -> Result<()> {
        if let Self::Softplus { beta } = *self {
            ensure_positive("softplus beta", beta)?;
        }
        Ok(())
    }
}

/// The largest `|z|` for which `exp(z)` neither overflows nor underflows to a subnormal.
/// Clamping exponents to it changes results by less than the type resolves (the terms it
/// affects are below `1e-37` in f32, `1e-300` in f64), and keeps libm off its slow
/// under/overflow path, which took 40% of sampling time with Softplus β = 100.
fn exp_limit(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 700.0,
        _ => 87.0,
    }
}

/// A parameter from the builder; if the builder does not have it yet, it is created and
/// filled with `values` (drawn by the caller from a seeded RNG).
pub(super) fn seeded_parameter(
    vb: &VarBuilder,
    shape: &[usize],
    name: &str,
    values: Vec<f64>,
) -> Result<Tensor> {
    let fresh = !vb.contains_tensor(name);
    let tensor = vb.get_with_hints(shape, name, Init::Const(0.0))?;
    if fresh {
        // The variable was just created with zeros: write the seeded values into its storage.
        let src = Tensor::from_vec(values, shape, vb.device())?.to_dtype(vb.dtype())?;
        tensor.slice_set(&src, 0, 0)?;
    }
    Ok(tensor)
}

/// A linear layer `y = xWᵀ + b` initialized as PyTorch's `nn.Linear`:
/// `W, b ~ U(−1/√fan_in, 1/√fan_in)`.
pub(super) fn seeded_linear(
    vb: VarBuilder,
    fan_in: usize,
    fan_out: usize,
    rng: &mut StdRng,
) -> Result<Linear> {
    crate::error::checked_elements(&[fan_out, fan_in], "a layer's weight")?;
    let bound = 1.0 / (fan_in as f64).sqrt();
    let mut draw = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
    let weight_values = draw(fan_in * fan_out);
    let bias_values = draw(fan_out);
    let weight = seeded_parameter(&vb, &[fan_out, fan_in], "weight", weight_values)?;
    let bias = seeded_parameter(&vb, &[fan_out], "bias", bias_values)?;
    Ok(Linear::new(weight, Some(bias)))
}

/// `depth` hidden layers of `width` with an activation, then a linear output layer.
#[derive(Debug, Clone)]
struct Perceptron {
    hidden: Vec<Linear>,
    output: Linear,
    activation: Activation,
}

impl Perceptron {
    fn new(
        vb: &VarBuilder,
        input: usize,
        width: usize,
        depth: usize,
        output: usize,
        activation: Activation,
        rng: &mut StdRng,
    ) -> Result<Self> {
        let mut hidden = Vec::with_capacity(depth);
        let mut fan_in = input;
        for i in 0..depth {
            hidden.push(seeded_linear(vb.pp(format!("hidden.{i}")), fan_in, width, rng)?);
            fan_in = width;
        }
        let output = seeded_linear(vb.pp("output"), fan_in, output, rng)?;
        Ok(Self {
            hidden,
            output,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.hidden {
            h = self.activation.apply(&layer.forward(&h)?)?;
        }
        Ok(self.output.forward(&h)?)
    }

    /// Runs `f` on the values of `extra` tensors and of the layers (as a kernel [`Stack`])
    /// read in place, holding read guards on their storage: `None` unless every one is a
    /// contiguous CPU tensor of type `T` and every layer has a bias.
    fn with_stack<T: WithDType + Real, R>(
        &self,
        activation: Pointwise,
        extra: &[&Tensor],
        f: impl FnOnce(&[&[T]], Stack<'_, T>) -> Result<R>,
    ) -> Result<Option<R>> {
        let linears: Vec<&Linear> = self.hidden.iter().chain([&self.output]).collect();
        let mut tensors = extra.to_vec();
        for layer in &linears {
            match layer.bias() {
                Some(bias) => tensors.extend([layer.weight(), bias]),
                None => return Ok(None),
            }
        }
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut slices = Vec::with_capacity(guards.len());
        for ((storage, layout), tensor) in guards.iter().zip(&tensors) {
            let (Storage::Cpu(cpu), Some((start, end))) = (&**storage, layout.contiguous_offsets()) else {
                return Ok(None);
            };
            let Ok(data) = T::cpu_storage_as_slice(cpu) else {
                return Ok(None);
            };
            debug_assert_eq!(end - start, tensor.elem_count());
            slices.push(&data[start..end]);
        }
        let (extra, parameters) = slices.split_at(extra.len());
        let mut layers = linears
            .iter()
            .zip(parameters.chunks_exact(2))
            .map(|(layer, wb)| {
                let (outputs, inputs) = layer.weight().dims2()?;
                Ok(Layer {
                    weight: wb[0],
                    bias: wb[1],
                    inputs,
                    outputs,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let Some(output) = layers.pop() else {
            return Ok(None);
        };
        let stack = Stack {
            hidden: layers,
            output,
            activation,
        };
        f(extra, stack).map(Some)
    }

    /// `(variable, gradient)` for every weight and bias, from a kernel's per-layer values.
    fn gradient_pairs<T: WithDType>(
        &self,
        weights: Vec<Vec<T>>,
        biases: Vec<Vec<T>>,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let mut pairs = Vec::with_capacity(2 * weights.len());
        let linears = self.hidden.iter().chain([&self.output]);
        for ((layer, w), b) in linears.zip(weights).zip(biases) {
            for (var, values) in [(layer.weight(), w)]
                .into_iter()
                .chain(layer.bias().map(|bias| (bias, b)))
            {
                pairs.push((var.clone(), Tensor::from_vec(values, var.shape(), var.device())?));
            }
        }
        Ok(pairs)
    }

    /// The gradient of the (single) output with respect to the input, `[B, inputs]`, by a
    /// hand-written backward pass on detached weights: no graph, and none of the weight
    /// gradients that autodiff would also compute.
    fn input_gradient(&self, x: &Tensor) -> Result<Tensor> {
        let detached = |layer: &Linear| (layer.weight().detach(), layer.bias().map(Tensor::detach));
        let mut h = x.detach();
        let mut pre_activations = Vec::with_capacity(self.hidden.len());
        for layer in &self.hidden {
            let (w, b) = detached(layer);
            let mut a = h.matmul(&w.t()?)?;
            if let Some(b) = b {
                a = a.broadcast_add(&b)?;
            }
            h = self.activation.apply(&a)?;
            pre_activations.push((a, w));
        }
        let (w_out, _) = detached(&self.output);
        let mut delta = w_out.broadcast_as((h.dim(0)?, w_out.dim(1)?))?.contiguous()?;
        for (a, w) in pre_activations.iter().rev() {
            delta = (delta * self.activation.derivative(a)?)?.matmul(w)?;
        }
        Ok(delta)
    }
}

/// Gaussian random Fourier features of time (Tancik et al.; score_sde's
/// `GaussianFourierProjection`): `[sin(2π t w), cos(2π t w)]` with fixed frequencies
/// `w ~ N(0, scale²)`.
///
/// The frequencies are a variable named `frequencies` under the builder's prefix (so they
/// are saved and loaded with the weights), drawn from a seeded RNG, and detached in the
/// forward pass: they receive no gradient and an optimizer leaves them alone.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use scoresde::score::FourierFeatures;
/// let vars = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
/// let embed = FourierFeatures::new(vb.pp("time"), 32, 16.0, 0)?;
/// let e = embed.forward(&Tensor::new(&[0.0f32, 0.5], &Device::Cpu)?)?;
/// assert_eq!(e.dims(), [2, 32]);
/// assert_eq!(e.get(0)?.to_vec1::<f32>()?[16..], [1.0; 16]); // cos(0) = 1
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct FourierFeatures {
    frequencies: Tensor,
    dtype: DType,
}

impl FourierFeatures {
    /// `features` outputs (even, ≥ 2): `features/2` frequencies of standard deviation
    /// `scale`, drawn with `seed` unless the builder already has them.
    pub fn new(vb: VarBuilder, features: usize, scale: f64, seed: u64) -> Result<Self> {
        ensure(features >= 2 && features % 2 == 0, || {
            format!("the number of Fourier features must be even and >= 2, got {features}")
        })?;
        ensure_positive("the Fourier scale", scale)?;
        crate::error::checked_elements(&[features / 2], "the Fourier frequencies")?;
        let mut rng = StdRng::seed_from_u64(seed);
        let values = (0..features / 2)
            .map(|_| scale * Distribution::<f64>::sample(&StandardNormal, &mut rng))
            .collect();
        let frequencies = seeded_parameter(&vb, &[features / 2], "frequencies", values)?;
        Ok(Self {
            // Shares the variable's storage, so later loads are seen; no gradient flows.
            frequencies: frequencies.detach(),
            dtype: vb.dtype(),
        })
    }

    /// The features of times `t` (shape `[B]`): shape `[B, features]`.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.to_dtype(self.dtype)?;
        let phase =
            (t.unsqueeze(1)?.broadcast_mul(&self.frequencies.unsqueeze(0)?)? * (2.0 * std::f64::consts::PI))?;
        Ok(Tensor::cat(&[phase.sin()?, phase.cos()?], D::Minus1)?)
    }
}

/// Configuration of [`MlpScore`]. The default is the peers' benchmark network
/// (`torch_ref.py` / `jax_ref.py`): 2-D data, 32 Fourier time features of scale 16,
/// 3 hidden layers of 128 with SiLU.
///
/// ```
/// let config = scoresde::score::MlpConfig { width: 256, ..Default::default() };
/// assert_eq!((config.dim, config.depth, config.fourier_features), (2, 3, 32));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlpConfig {
    /// Data dimension `d` (input and output size).
    pub dim: usize,
    /// Hidden width.
    pub width: usize,
    /// Number of hidden layers.
    pub depth: usize,
    /// Nonlinearity.
    pub activation: Activation,
    /// Number of Fourier time features (even).
    pub fourier_features: usize,
    /// Standard deviation of the Fourier frequencies.
    pub fourier_scale: f64,
    /// Seed of the initial weights and of the Fourier frequencies.
    pub seed: u64,
}

impl Default for MlpConfig {
    fn default() -> Self {
        Self {
            dim: 2,
            width: 128,
            depth: 3,
            activation: Activation::Silu,
            fourier_features: 32,
            fourier_scale: 16.0,
            seed: 0,
        }
    }
}

/// The usual noise-conditional score network: `s(x, t) = MLP([x, emb(t)]) / σ(t)`.
///
/// `emb` are [`FourierFeatures`] of `t`, and dividing by the SDE's `σ(t)` (as score_sde
/// does) lets the network output the scaled noise `−z` rather than a score that grows as
/// `1/σ`. `σ(t)` comes from [`Sde::std_tensor`], so the score stays differentiable in `t`.
/// Input `x` has shape `[B, d]`, `t` shape `[B]`.
///
/// Variables (under the builder's prefix): `time.frequencies` (fixed),
/// `hidden.{i}.weight|bias`, `output.weight|bias`.
/// Weights from PyTorch load with
/// [`load_foreign_weights`](crate::train::load_foreign_weights).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use scoresde::score::{MlpConfig, MlpScore};
/// use scoresde::{sde::VpSde, ScoreModel};
///
/// let vars = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
/// let model = MlpScore::new(vb, VpSde::default(), MlpConfig::default())?;
/// let x = Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?;
/// let t = Tensor::full(0.5f32, 4, &Device::Cpu)?;
/// assert_eq!(model.score(&x, &t)?.dims(), [4, 2]);
/// assert_eq!(vars.all_vars().len(), 9); // frequencies + 4 weights + 4 biases
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct MlpScore<S> {
    sde: S,
    config: MlpConfig,
    time: FourierFeatures,
    net: Perceptron,
}

impl<S: Sde> MlpScore<S> {
    /// Builds the network in `vb` (creating missing variables from `config.seed`).
    ///
    /// Errors on a zero dimension, width, depth or feature count, an odd feature count, an
    /// invalid activation parameter, or a builder whose dtype is not f32 or f64.
    pub fn new(vb: VarBuilder, sde: S, config: MlpConfig) -> Result<Self> {
        check_network(&vb, config.width, config.depth, config.dim, "MlpScore")?;
        config.activation.validate()?;
        let time = FourierFeatures::new(
            vb.pp("time"),
            config.fourier_features,
            config.fourier_scale,
            config.seed,
        )?;
        // A stream of its own for the weights, so changing the feature count keeps them.
        let mut rng = StdRng::seed_from_u64(config.seed.wrapping_add(1));
        let net = Perceptron::new(
            &vb,
            config.dim + config.fourier_features,
            config.width,
            config.depth,
            config.dim,
            config.activation,
            &mut rng,
        )?;
        Ok(Self {
            sde,
            config,
            time,
            net,
        })
    }

    /// The SDE whose `σ(t)` scales the output.
    pub fn sde(&self) -> &S {
        &self.sde
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &MlpConfig {
        &self.config
    }
}

/// Checks what every reference network needs of its builder: f32 or f64 variables (u8
/// would reach candle's unimplemented integer ops; f16/bf16 cannot resolve small times),
/// and at least one hidden layer (the fused kernels and the hand-written passes assume one).
fn check_network(vb: &VarBuilder, width: usize, depth: usize, dim: usize, what: &str) -> Result<()> {
    ensure(dim > 0 && width > 0, || {
        format!("{what}: dim and width must be > 0, got {dim} and {width}")
    })?;
    ensure(depth > 0, || {
        format!("{what}: depth (the number of hidden layers) must be >= 1, got 0")
    })?;
    ensure(matches!(vb.dtype(), DType::F32 | DType::F64), || {
        format!(
            "{what}: the VarBuilder has dtype {:?}; the network needs f32 or f64 variables \
             (build the VarBuilder with DType::F32 or DType::F64)",
            vb.dtype()
        )
    })
}

/// Checks `x: [B, d]` and `t: [B]`.
fn check_input(x: &Tensor, t: &Tensor, dim: usize, what: &str) -> Result<usize> {
    let (b, d) = x.dims2().map_err(|_| {
        Error::Shape(format!(
            "{what} expects x of shape [B, {dim}], got {:?}",
            x.dims()
        ))
    })?;
    if d != dim {
        return Err(Error::Shape(format!(
            "{what} was built for dimension {dim}, x has shape {:?}",
            x.dims()
        )));
    }
    if t.dims() != [b] {
        return Err(Error::Shape(format!(
            "{what} expects t of shape [{b}], got {:?}",
            t.dims()
        )));
    }
    Ok(b)
}

impl<S: Sde> MlpScore<S> {
    /// The fused inference path ([`crate::kernels`]): f32 on the CPU, inside a sampler's
    /// [`InferenceScope`], inputs not tracked, an activation the kernels implement. Reads
    /// the variables in place, so trained or loaded weights are always the current ones.
    /// `None` when any condition fails (the caller then uses candle ops).
    fn fused_score(&self, x: &Tensor, t: &Tensor, sigma: &Tensor) -> Result<Option<Tensor>> {
        if !InferenceScope::active()
            || x.dtype() != DType::F32
            || !x.device().is_cpu()
            || x.track_op()
            || t.track_op()
        {
            return Ok(None);
        }
        let x_values = x.flatten_all()?.to_vec1::<f32>()?;
        let t_values = t.to_vec1::<f32>()?;
        let sigma_values = sigma.to_vec1::<f32>()?;
        let mut out = vec![0.0f32; x_values.len()];
        let done = self.with_parameters(|network: ScoreMlp<'_, f32>| {
            fn dense<'a>(l: &Layer<'a, f32>, activation: Pointwise) -> DenseView<'a> {
                DenseView {
                    weight: l.weight,
                    bias: l.bias,
                    inputs: l.inputs,
                    outputs: l.outputs,
                    activation,
                }
            }
            let view = ScoreMlpView {
                dim: network.dim,
                frequencies: network.frequencies,
                layers: network
                    .stack
                    .hidden
                    .iter()
                    .map(|l| dense(l, network.stack.activation))
                    .chain([dense(&network.stack.output, Pointwise::Identity)])
                    .collect(),
            };
            view.forward(&x_values, &t_values, &sigma_values, &mut out)
        })?;
        if done.is_none() {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(out, x.shape(), x.device())?))
    }

    /// The hidden layers' activation, if the kernels implement it.
    fn kernel_activation(&self) -> Option<Pointwise> {
        match self.config.activation {
            Activation::Silu => Some(Pointwise::Silu),
            Activation::Tanh => Some(Pointwise::Tanh),
            _ => None,
        }
    }

    /// Runs `f` on the variables' values read in place (the frequencies, then the layers),
    /// holding read guards on their storage: `None` unless every variable is a contiguous
    /// CPU tensor of type `T` and every layer has a bias.
    fn with_parameters<T: WithDType + Real, R>(
        &self,
        f: impl FnOnce(ScoreMlp<'_, T>) -> Result<R>,
    ) -> Result<Option<R>> {
        let Some(activation) = self.kernel_activation() else {
            return Ok(None);
        };
        self.net
            .with_stack(activation, &[&self.time.frequencies], |extra, stack| {
                f(ScoreMlp {
                    dim: self.config.dim,
                    frequencies: extra[0],
                    stack,
                })
            })
    }

    /// [`ScoreModel::objective_gradients`] in `T`.
    fn hand_written_gradients<T: WithDType + Real>(
        &self,
        terms: &ObjectiveTerms<'_>,
    ) -> Result<Option<ObjectiveGradients>> {
        let batch = terms.batch;
        let fpe = match &terms.penalty {
            None => None,
            Some(PenaltyTerms::ScoreFpe(fpe)) => Some(fpe),
            Some(_) => return Ok(None),
        };
        if !batch.x_t.device().is_cpu() || self.kernel_activation().is_none() {
            return Ok(None);
        }
        check_input(&batch.x_t, &batch.t, self.config.dim, "MlpScore")?;
        let values = host_values::<T>;
        let t = batch.t.to_dtype(T::DTYPE)?.detach();
        let sigma = self.sde.std_tensor(&t)?;
        let sigma_dot = match fpe {
            // dσ/dt by autodiff through the SDE's σ(t).
            Some(_) => {
                let leaf = candle_core::Var::from_tensor(&t)?;
                let grads = self.sde.std_tensor(leaf.as_tensor())?.sum_all()?.backward()?;
                match grads.get(leaf.as_tensor()) {
                    Some(g) => values(g)?,
                    None => vec![T::zero(); t.dim(0)?],
                }
            }
            None => Vec::new(),
        };
        let fpe_values = match fpe {
            Some(f) => Some((
                values(&f.weight)?,
                values(&f.diffusion_squared)?,
                values(&f.drift)?,
            )),
            None => None,
        };
        let (x, times, noise) = (values(&batch.x_t)?, values(&t)?, values(&batch.noise)?);
        let (sigma, dsm_sigma, dsm_weight) = (
            values(&sigma)?,
            values(&terms.dsm_sigma)?,
            values(&terms.dsm_weight)?,
        );
        let penalty_weight = terms.penalty_weight;
        let kernel_batch = ScoreBatch {
            x: &x,
            t: &times,
            noise: &noise,
            sigma: &sigma,
            sigma_dot: &sigma_dot,
            dsm_sigma: &dsm_sigma,
            dsm_weight: &dsm_weight,
            fpe: fpe_values.as_ref().map(|(weight, g2, drift)| FpeCoefficients {
                weight,
                diffusion_squared: g2,
                drift,
                penalty_weight: T::from(penalty_weight).unwrap_or_else(T::nan),
            }),
        };
        let Some(out) = self.with_parameters(|network| network.gradients(&kernel_batch))? else {
            return Ok(None);
        };
        Ok(Some(ObjectiveGradients {
            dsm: out.dsm,
            penalty: fpe.map(|_| out.penalty),
            gradients: self.net.gradient_pairs(out.weights, out.biases)?,
        }))
    }
}

/// A tensor's values as a flat host vector of `T`.
fn host_values<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    Ok(t.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()?)
}

impl<S: Sde> ScoreModel for MlpScore<S> {
    fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        check_input(x, t, self.config.dim, "MlpScore")?;
        super::check_sigma_times(&self.sde, t, "MlpScore")?;
        let dtype = self.time.dtype;
        let (x_in, t) = (x.to_dtype(dtype)?, t.to_dtype(dtype)?);
        let sigma = self.sde.std_tensor(&t)?;
        let score = match self.fused_score(&x_in, &t, &sigma)? {
            Some(score) => score,
            None => {
                let input = Tensor::cat(&[&x_in, &self.time.forward(&t)?], 1)?;
                self.net.forward(&input)?.broadcast_div(&sigma.unsqueeze(1)?)?
            }
        };
        crate::error::finite_result(score, "MlpScore's score", &[("x", x)])
    }

    /// By hand (`kernels::training`) when the variables are f32 or f64 on the CPU and the
    /// activation is SiLU or tanh: a forward pass carrying the input derivatives the
    /// penalty needs alongside the values, then one reverse pass.
    fn objective_gradients(&self, terms: &ObjectiveTerms<'_>) -> Result<Option<ObjectiveGradients>> {
        match self.time.dtype {
            DType::F32 => self.hand_written_gradients::<f32>(terms),
            DType::F64 => self.hand_written_gradients::<f64>(terms),
            _ => Ok(None),
        }
    }
}
/// Configuration of [`MlpPotential`]. The default is the network of Deveney et al. (2025):
/// 2-D data, 3 hidden layers of 80, Softplus with `β = 100`.
///
/// ```
/// let c = scoresde::score::PotentialConfig::default();
/// assert_eq!((c.width, c.depth), (80, 3));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PotentialConfig {
    /// Data dimension `d`.
    pub dim: usize,
    /// Hidden width.
    pub width: usize,
    /// Number of hidden layers.
    pub depth: usize,
    /// Nonlinearity (smooth: the score is its gradient, and regularizers differentiate it).
    pub activation: Activation,
    /// Seed of the initial weights.
    pub seed: u64,
}

impl Default for PotentialConfig {
    fn default() -> Self {
        Self {
            dim: 2,
            width: 80,
            depth: 3,
            activation: Activation::Softplus { beta: 100.0 },
            seed: 0,
        }
    }
}

/// A scalar log-density network `u(x, t) = MLP([t, x]) ≈ log p_t(x)` (up to a constant),
/// as in Deveney et al. (2025). Its score `∇ₓu` comes from
/// [`GradientScore`](crate::score::GradientScore).
///
/// Variables (under the builder's prefix): `hidden.{i}.weight|bias`, `output.weight|bias`.
/// Weights from PyTorch load with
/// [`load_foreign_weights`](crate::train::load_foreign_weights).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use scoresde::score::{LogDensityModel, MlpPotential, PotentialConfig};
///
/// let vars = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vars, DType::F64, &Device::Cpu);
/// let u = MlpPotential::new(vb, PotentialConfig::default())?;
/// let x = Tensor::zeros((3, 2), DType::F64, &Device::Cpu)?;
/// let t = Tensor::ones(3, DType::F64, &Device::Cpu)?;
/// assert_eq!(u.log_density(&x, &t)?.dims(), [3]);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct MlpPotential {
    config: PotentialConfig,
    dtype: DType,
    net: Perceptron,
}

impl MlpPotential {
    /// Builds the network in `vb` (creating missing variables from `config.seed`).
    ///
    /// Errors on a zero dimension, width or depth, an invalid activation parameter, or a
    /// builder whose dtype is not f32 or f64.
    pub fn new(vb: VarBuilder, config: PotentialConfig) -> Result<Self> {
        check_network(&vb, config.width, config.depth, config.dim, "MlpPotential")?;
        config.activation.validate()?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let net = Perceptron::new(
            &vb,
            config.dim + 1,
            config.width,
            config.depth,
            1,
            config.activation,
            &mut rng,
        )?;
        Ok(Self {
            config,
            dtype: vb.dtype(),
            net,
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &PotentialConfig {
        &self.config
    }
}

impl MlpPotential {
    /// The network's input `[t, x]`, in its dtype.
    fn input(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        check_input(x, t, self.config.dim, "MlpPotential")?;
        let (x, t) = (x.to_dtype(self.dtype)?, t.to_dtype(self.dtype)?);
        Ok(Tensor::cat(&[&t.unsqueeze(1)?, &x], 1)?)
    }
}

impl MlpPotential {
    /// The hidden layers' activation, if the kernels implement it.
    fn kernel_activation(&self) -> Option<Pointwise> {
        match self.config.activation {
            Activation::Silu => Some(Pointwise::Silu),
            Activation::Tanh => Some(Pointwise::Tanh),
            Activation::Softplus { beta } => Some(Pointwise::Softplus { beta }),
            _ => None,
        }
    }

    /// `∇ₓu` by the kernels, if they take this model and these inputs.
    fn kernel_score<T: WithDType + Real>(&self, x: &Tensor, t: &Tensor) -> Result<Option<Tensor>> {
        let Some(activation) = self.kernel_activation() else {
            return Ok(None);
        };
        if !x.device().is_cpu() {
            return Ok(None);
        }
        let (xs, ts) = (host_values::<T>(x)?, host_values::<T>(t)?);
        let points = Points { x: &xs, t: &ts };
        let run = |_: &[&[T]], stack: Stack<'_, T>| {
            PotentialMlp {
                dim: self.config.dim,
                stack,
            }
            .score(&points)
        };
        match self.net.with_stack(activation, &[], run)? {
            Some(values) => Ok(Some(Tensor::from_vec(values, x.shape(), x.device())?)),
            None => Ok(None),
        }
    }

    /// [`LogDensityModel::objective_gradients`] in `T`.
    fn hand_written_gradients<T: WithDType + Real>(
        &self,
        terms: &ObjectiveTerms<'_>,
    ) -> Result<Option<ObjectiveGradients>> {
        let batch = terms.batch;
        let fp = match &terms.penalty {
            None => None,
            Some(PenaltyTerms::LogDensityFp(fp)) => Some(fp),
            Some(_) => return Ok(None),
        };
        let Some(activation) = self.kernel_activation() else {
            return Ok(None);
        };
        if !batch.x_t.device().is_cpu() {
            return Ok(None);
        }
        let d = self.config.dim;
        let points = |x: &Tensor, t: &Tensor| -> Result<(Vec<T>, Vec<T>)> {
            check_input(x, t, d, "MlpPotential")?;
            Ok((host_values(x)?, host_values(t)?))
        };
        let (x, t) = points(&batch.x_t, &batch.t)?;
        let (noise, dsm_sigma, dsm_weight) = (
            host_values(&batch.noise)?,
            host_values(&terms.dsm_sigma)?,
            host_values(&terms.dsm_weight)?,
        );
        let residual = match fp {
            Some(fp) => {
                let (x, t) = points(&fp.x, &fp.t)?;
                let per_point = [&fp.weight, &fp.diffusion_squared, &fp.drift].map(host_values::<T>);
                let [w, g2, a] = per_point;
                Some((x, t, w?, g2?, a?))
            }
            None => None,
        };
        let boundary = match fp.and_then(|fp| fp.boundary.as_ref()) {
            Some(b) => {
                let (x, t) = points(&b.x, &b.t)?;
                Some((x, t, host_values(&b.weight)?))
            }
            None => None,
        };
        let kernel_batch = PotentialBatch {
            dsm: Points { x: &x, t: &t },
            noise: &noise,
            dsm_sigma: &dsm_sigma,
            dsm_weight: &dsm_weight,
            residual: residual.as_ref().map(|(x, t, w, g2, a)| ResidualRows {
                points: Points { x, t },
                weight: w,
                diffusion_squared: g2,
                drift: a,
            }),
            boundary: boundary.as_ref().map(|(x, t, v)| (Points { x, t }, v.as_slice())),
            penalty_weight: T::from(terms.penalty_weight).unwrap_or_else(T::nan),
        };
        let run = |_: &[&[T]], stack: Stack<'_, T>| PotentialMlp { dim: d, stack }.gradients(&kernel_batch);
        let Some(out) = self.net.with_stack(activation, &[], run)? else {
            return Ok(None);
        };
        let mut gradients = self.net.gradient_pairs(out.weights, out.biases)?;
        if boundary.is_none() {
            // Only u itself, not its derivatives, depends on the output bias: without the
            // boundary term it gets no gradient (autodiff gives none; a zero would still
            // let AdamW's weight decay move it).
            if let Some(bias) = self.net.output.bias() {
                gradients.retain(|(var, _)| var.id() != bias.id());
            }
        }
        Ok(Some(ObjectiveGradients {
            dsm: out.dsm,
            penalty: fp.map(|_| out.penalty),
            gradients,
        }))
    }
}

impl LogDensityModel for MlpPotential {
    fn log_density(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        // The times enter here (and in `score_values`). It has no SDE, hence no T: they
        // must be finite and >= 0.
        time_range(t, f64::INFINITY, "MlpPotential")?;
        let u = self.net.forward(&self.input(x, t)?)?.squeeze(1)?;
        crate::error::finite_result(u, "MlpPotential's log-density", &[("x", x)])
    }

    /// By the kernels' forward-mode pass (f32/f64 on the CPU, Softplus, SiLU or tanh), else
    /// by a hand-written backward pass through candle ops (about twice as fast as autodiff).
    fn score_values(&self, x: &Tensor, t: &Tensor) -> Result<Option<Tensor>> {
        check_input(x, t, self.config.dim, "MlpPotential")?;
        time_range(t, f64::INFINITY, "MlpPotential")?;
        let kernel = match self.dtype {
            DType::F32 => self.kernel_score::<f32>(x, t)?,
            DType::F64 => self.kernel_score::<f64>(x, t)?,
            _ => None,
        };
        if let Some(score) = kernel {
            return Ok(Some(score.to_dtype(x.dtype())?));
        }
        let gradient = self.net.input_gradient(&self.input(x, t)?)?;
        // Column 0 is the time input.
        Ok(Some(gradient.narrow(1, 1, self.config.dim)?.to_dtype(x.dtype())?))
    }

    /// By hand (`kernels::training`) when the variables are f32 or f64 on the CPU and the
    /// activation is Softplus, SiLU or tanh: DSM on `∇ₓu` plus the log-density FP penalty
    /// (residual at its collocation points, boundary term), each point set run with the
    /// input derivatives it needs.
    fn objective_gradients(&self, terms: &ObjectiveTerms<'_>) -> Result<Option<ObjectiveGradients>> {
        match self.dtype {
            DType::F32 => self.hand_written_gradients::<f32>(terms),
            DType::F64 => self.hand_written_gradients::<f64>(terms),
            _ => Ok(None),
        }
    }
}
