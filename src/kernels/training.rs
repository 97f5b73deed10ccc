//! Training steps by hand: the DSM loss plus a Fokker–Planck penalty, and the gradients of
//! both with respect to every weight, for the crate's two reference networks — the score
//! MLP ([`ScoreMlp`]: DSM and the squared score-FPE residual) and the potential MLP
//! ([`PotentialMlp`]: DSM on `∇ₓu` and the log-density FP residual with its boundary term).
//! Both are a head (how inputs enter, how the objective reads the outputs) on one layer
//! [`Stack`] with a forward and a reverse pass.
//!
//! Through candle ops a DSM step is ~250 graph nodes and an FPE step, whose penalty needs
//! third derivatives (∂ₓ∇·s, then the weights' gradient of that), several thousand; each
//! node allocates, and the backward pass zero-fills a buffer per node. Here the network's
//! input derivatives are carried forward as *jets*: next to each activation `a` travel
//! `∂a/∂xₖ` (`d` of them), `∂a/∂t` and `∂²a/∂xⱼ∂xₖ` (`j ≤ k`), stacked row-wise so every
//! layer is one gemm over all of them. The objective is assembled per sample from the
//! output jets, and one reverse pass through the same layers gives the weight gradients:
//! per layer three gemms (forward, weight gradient, input adjoint) and a few elementwise
//! passes, into buffers that live for the step.
//!
//! Jets of a layer `z = W a + b` are `W aₚ` (the bias only enters the value); through an
//! activation `ψ`, with `ψ⁽ⁿ⁾` at the value `z`:
//!
//! ```text
//! a = ψ(z),   aₚ = ψ'·zₚ  (p = xₖ or t),   aⱼₖ = ψ''·zⱼzₖ + ψ'·zⱼₖ
//! ```
//!
//! and their adjoints (`ā` given, `z̄` wanted):
//!
//! ```text
//! z̄ⱼₖ = ψ'·āⱼₖ
//! z̄ₚ  = ψ'·āₚ + ψ''·Σ_{pairs ∋ p} (the other factor)·āⱼₖ
//! z̄   = ψ'·ā + ψ''·Σₚ zₚāₚ + Σⱼₖ āⱼₖ(ψ'''·zⱼzₖ + ψ''·zⱼₖ)
//! ```

use num_traits::Float;
use rayon::prelude::*;

use super::Pointwise;
use crate::{Error, Result};

/// The float types the training kernel runs in.
pub(crate) trait Real: Float + Send + Sync + std::fmt::Debug + 'static {
    /// `ψ` and `ψ'` at each `z` (and `ψ''`, `ψ'''` into `higher`).
    fn activation_pass(activation: Pointwise, z: &[Self], slopes: Slopes<'_, Self>) {
        activation_loop(activation, z, slopes, Self::exp)
    }
}

impl Real for f64 {}

impl Real for f32 {
    /// With the crate's vectorizable `exp`, compiled for AVX2/FMA when the CPU has them.
    fn activation_pass(activation: Pointwise, z: &[f32], slopes: Slopes<'_, f32>) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(activation: Pointwise, z: &[f32], slopes: Slopes<'_, f32>) {
                activation_loop(activation, z, slopes, super::exp)
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { avx2(activation, z, slopes) };
            }
        }
        activation_loop(activation, z, slopes, super::exp)
    }
}

/// Where an activation pass writes: `ψ`, `ψ'`, and optionally `ψ''`, `ψ'''`.
pub(crate) struct Slopes<'a, T> {
    value: &'a mut [T],
    first: &'a mut [T],
    higher: Option<(&'a mut [T], &'a mut [T])>,
}

/// The body of [`Real::activation_pass`], branch-free per element so that it vectorizes.
#[inline(always)]
fn activation_loop<T: Real>(activation: Pointwise, z: &[T], slopes: Slopes<'_, T>, exp: impl Fn(T) -> T) {
    let one = T::one();
    let two = one + one;
    let Slopes { value, first, higher } = slopes;
    let n = z.len().min(value.len()).min(first.len());
    let (z, value, first) = (&z[..n], &mut value[..n], &mut first[..n]);
    match (activation, higher) {
        (Pointwise::Silu, None) => {
            for i in 0..n {
                let s = one / (one + exp(-z[i]));
                value[i] = z[i] * s;
                first[i] = s * (one + z[i] * (one - s));
            }
        }
        (Pointwise::Silu, Some((second, third))) => {
            let (second, third) = (&mut second[..n], &mut third[..n]);
            for i in 0..n {
                let z = z[i];
                let s = one / (one + exp(-z));
                let u = s * (one - s);
                let c = one - two * s;
                value[i] = z * s;
                first[i] = s * (one + z * (one - s));
                second[i] = u * (two + z * c);
                third[i] = u * (c * (two + one + z * c) - two * z * u);
            }
        }
        (Pointwise::Tanh, higher) => {
            let mut higher = higher.map(|(a, b)| (&mut a[..n], &mut b[..n]));
            for i in 0..n {
                // tanh z = 1 − 2/(1 + e²ᶻ), NaN kept (the exp maps it to a finite value).
                let y = one - two / (one + exp(two * z[i]));
                let y = if z[i].is_nan() { z[i] } else { y };
                let d1 = one - y * y;
                value[i] = y;
                first[i] = d1;
                if let Some((second, third)) = &mut higher {
                    second[i] = -two * y * d1;
                    third[i] = d1 * ((two + two + two) * y * y - two);
                }
            }
        }
        (Pointwise::Softplus { beta }, higher) => {
            let beta = T::from(beta).unwrap_or_else(T::nan);
            // Exponents stay where exp neither overflows nor underflows to a subnormal.
            let limit = T::max_value().ln() - one;
            let mut higher = higher.map(|(a, b)| (&mut a[..n], &mut b[..n]));
            for i in 0..n {
                let z = z[i];
                let bz = (beta * z).max(-limit).min(limit);
                let tail = (one + exp(-bz.abs())).ln() / beta;
                let softplus = z.max(T::zero()) + tail;
                let s = one / (one + exp(-bz));
                let u = s * (one - s);
                value[i] = if z.is_nan() { z } else { softplus };
                first[i] = s;
                if let Some((second, third)) = &mut higher {
                    second[i] = beta * u;
                    third[i] = beta * beta * u * (one - two * s);
                }
            }
        }
        (Pointwise::Identity, higher) => {
            value.copy_from_slice(z);
            first.iter_mut().for_each(|v| *v = one);
            if let Some((second, third)) = higher {
                second
                    .iter_mut()
                    .chain(third.iter_mut())
                    .for_each(|v| *v = T::zero());
            }
        }
    }
}

/// A dense layer `z = W a + b` read in place: `weight` row-major `[outputs, inputs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layer<'a, T> {
    pub(crate) weight: &'a [T],
    pub(crate) bias: &'a [T],
    pub(crate) inputs: usize,
    pub(crate) outputs: usize,
}

/// Hidden layers `a = ψ(W a + b)`, then a linear output layer.
#[derive(Debug, Clone)]
pub(crate) struct Stack<'a, T> {
    pub(crate) hidden: Vec<Layer<'a, T>>,
    pub(crate) output: Layer<'a, T>,
    /// The hidden layers' activation.
    pub(crate) activation: Pointwise,
}

/// `s(x, t) = MLP([x, sin(2πtw), cos(2πtw)]) / σ(t)`: `MlpScore`'s layout.
#[derive(Debug, Clone)]
pub(crate) struct ScoreMlp<'a, T> {
    pub(crate) dim: usize,
    pub(crate) frequencies: &'a [T],
    pub(crate) stack: Stack<'a, T>,
}

/// The score-FPE part of the objective: `Σ_b weight_b ‖r_b‖²` with
/// `r = ∂ₜs − ∇ₓ[½g²(∇·s + ‖s‖²) − a⟨x, s⟩]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FpeCoefficients<'a, T> {
    pub(crate) weight: &'a [T],
    /// `g(t)²` of the objective's SDE.
    pub(crate) diffusion_squared: &'a [T],
    /// The drift coefficient `a(t)` of `f = a(t)x`.
    pub(crate) drift: &'a [T],
    /// `λ`: the gradient is that of `DSM + λ·penalty`.
    pub(crate) penalty_weight: T,
}

/// One training batch and the objective's per-sample coefficients.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScoreBatch<'a, T> {
    /// `[B, d]` row-major.
    pub(crate) x: &'a [T],
    pub(crate) t: &'a [T],
    /// `[B, d]`: the DSM noise `z`.
    pub(crate) noise: &'a [T],
    /// The model's `σ(t)` (its output is divided by it) and `dσ/dt` (read with `fpe` only).
    pub(crate) sigma: &'a [T],
    pub(crate) sigma_dot: &'a [T],
    /// DSM: `Σ_b dsm_weight_b ‖dsm_sigma_b·s_b + z_b‖²`.
    pub(crate) dsm_sigma: &'a [T],
    pub(crate) dsm_weight: &'a [T],
    pub(crate) fpe: Option<FpeCoefficients<'a, T>>,
}

/// The objective's terms and its gradient, layer by layer (hidden layers, then output).
#[derive(Debug, Clone)]
pub(crate) struct Gradients<T> {
    pub(crate) dsm: f64,
    pub(crate) penalty: f64,
    pub(crate) weights: Vec<Vec<T>>,
    pub(crate) biases: Vec<Vec<T>>,
}

/// Which jets travel with the values: always the value; optionally the first derivatives
/// in each `xₖ` and in `t`, and second derivatives in the listed pairs `(j, k)`, `j ≤ k`.
/// Blocks are laid out in that order.
#[derive(Debug, Clone)]
struct Jets {
    dim: usize,
    x: bool,
    t: bool,
    pairs: Vec<(usize, usize)>,
    count: usize,
}

impl Jets {
    fn new(dim: usize, x: bool, t: bool, pairs: Vec<(usize, usize)>) -> Self {
        let count = 1 + if x { dim } else { 0 } + usize::from(t) + pairs.len();
        Self {
            dim,
            x,
            t,
            pairs,
            count,
        }
    }
    /// The value only.
    fn value(dim: usize) -> Self {
        Self::new(dim, false, false, Vec::new())
    }
    /// Every pair `j ≤ k`, row by row (see [`pair_index`]).
    fn all_pairs(dim: usize) -> Vec<(usize, usize)> {
        (0..dim).flat_map(|j| (j..dim).map(move |k| (j, k))).collect()
    }
    fn x(&self, k: usize) -> usize {
        1 + k
    }
    fn t(&self) -> usize {
        1 + if self.x { self.dim } else { 0 }
    }
    fn pair(&self, i: usize) -> usize {
        self.t() + usize::from(self.t) + i
    }
    /// The first-order jets (x directions, then t).
    fn first_order(&self) -> std::ops::Range<usize> {
        1..self.pair(0)
    }
    /// The x direction of jet `j`, if it is one.
    fn x_direction(&self, j: usize) -> Option<usize> {
        (self.x && (1..=self.dim).contains(&j)).then(|| j - 1)
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with explicit (column, row) strides.
///
/// # Safety
/// Every index `i·rs + j·cs` reached for the given sizes must lie inside the slice.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    lhs: &[T],
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: &[T],
    (rhs_cs, rhs_rs): (usize, usize),
) {
    debug_assert!(dst.len() >= m * n);
    debug_assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    debug_assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        n as isize,
        accumulate,
        lhs.as_ptr(),
        lhs_cs as isize,
        lhs_rs as isize,
        rhs.as_ptr(),
        rhs_cs as isize,
        rhs_rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        // Callers split the work across threads instead (the batch, or the images).
        gemm::Parallelism::None,
    );
}

/// `out[rows, outputs] = input[rows, inputs] · Wᵀ`.
fn forward_linear<T: Real>(layer: &Layer<'_, T>, input: &[T], rows: usize) -> Vec<T> {
    let mut out = vec![T::zero(); rows * layer.outputs];
    // SAFETY: input is [rows, inputs] row-major (cs 1, rs inputs); Wᵀ is [inputs, outputs]
    // read from W [outputs, inputs] (cs inputs, rs 1); out is [rows, outputs].
    unsafe {
        matmul(
            (rows, layer.outputs, layer.inputs),
            &mut out,
            false,
            input,
            (1, layer.inputs),
            layer.weight,
            (layer.inputs, 1),
        )
    };
    out
}

/// The weight gradient `Z̄ᵀ A` (`[outputs, inputs]`) and the input adjoint `Z̄ W`
/// (`[rows, inputs]`, skipped for the first layer).
fn backward_linear<T: Real>(
    layer: &Layer<'_, T>,
    adjoint: &[T],
    input: &[T],
    rows: usize,
    need_input: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let (o, i) = (layer.outputs, layer.inputs);
    let mut weight = vec![T::zero(); o * i];
    // SAFETY: Z̄ᵀ is [outputs, rows] read from Z̄ [rows, outputs] (cs outputs, rs 1); A is
    // [rows, inputs] (cs 1, rs inputs); the result [outputs, inputs].
    unsafe { matmul((o, i, rows), &mut weight, false, adjoint, (o, 1), input, (1, i)) };
    let input_adjoint = need_input.then(|| {
        let mut out = vec![T::zero(); rows * i];
        // SAFETY: Z̄ [rows, outputs] (cs 1, rs outputs); W [outputs, inputs] (cs 1, rs inputs).
        unsafe {
            matmul(
                (rows, i, o),
                &mut out,
                false,
                adjoint,
                (1, o),
                layer.weight,
                (1, i),
            )
        };
        out
    });
    (weight, input_adjoint)
}

/// Column sums of the first `rows` rows of a `[_, width]` buffer (the bias gradient).
fn column_sums<T: Real>(buffer: &[T], rows: usize, width: usize) -> Vec<T> {
    let mut sums = vec![T::zero(); width];
    for row in buffer[..rows * width].chunks_exact(width) {
        sums.iter_mut().zip(row).for_each(|(s, &v)| *s = *s + v);
    }
    sums
}

/// Elements per call of the elementwise activation pass.
const ELEMENTWISE_CHUNK: usize = 8192;

/// Rows of the batch per thread task.
const PART_ROWS: usize = 256;

/// What the forward pass keeps for the reverse pass, per hidden layer.
struct HiddenState<T> {
    /// Pre-activation jets `[J·B, width]`.
    pre: Vec<T>,
    /// `ψ', ψ'', ψ'''` at the values, `[B, width]` each.
    slopes: [Vec<T>; 3],
}

impl<T: Real> ScoreMlp<'_, T> {
    fn validate(&self, batch: &ScoreBatch<'_, T>) -> Result<usize> {
        let d = self.dim;
        let rows = batch.t.len();
        self.stack.check(d + 2 * self.frequencies.len(), d)?;
        let per_row = [batch.sigma, batch.dsm_sigma, batch.dsm_weight];
        let mut ok = batch.x.len() == rows * d
            && batch.noise.len() == rows * d
            && per_row.iter().all(|v| v.len() == rows);
        if let Some(fpe) = &batch.fpe {
            ok &= [batch.sigma_dot, fpe.weight, fpe.diffusion_squared, fpe.drift]
                .iter()
                .all(|v| v.len() == rows);
        }
        if !ok {
            return Err(Error::Shape(
                "training kernel: inputs of different lengths".into(),
            ));
        }
        Ok(rows)
    }

    /// The objective's value and its gradient with respect to every weight and bias.
    ///
    /// The batch is cut into parts of [`PART_ROWS`] rows that threads take whole (the terms
    /// are sums over samples, so the parts' values and gradients add up); each part runs
    /// single-threaded, so there is no synchronization inside a step. The cut depends only
    /// on the batch size, so results do not depend on the number of threads.
    pub(crate) fn gradients(&self, batch: &ScoreBatch<'_, T>) -> Result<Gradients<T>> {
        let rows = self.validate(batch)?;
        in_parts(rows, |range| self.gradients_of_part(&batch.rows(self.dim, range)))
    }

    /// [`Self::gradients`] on one part of the batch, single-threaded.
    fn gradients_of_part(&self, batch: &ScoreBatch<'_, T>) -> Result<Gradients<T>> {
        let jets = match batch.fpe {
            Some(_) => Jets::new(self.dim, true, true, Jets::all_pairs(self.dim)),
            None => Jets::value(self.dim),
        };
        let pass = self
            .stack
            .forward(self.input_jets(batch, &jets), batch.t.len(), &jets);
        let (dsm, penalty, adjoint) = self.objective(batch, &pass.output, &jets);
        let (weights, biases) = self.stack.backward(&pass, &adjoint, &jets);
        Ok(Gradients {
            dsm,
            penalty,
            weights,
            biases,
        })
    }

    /// `[x, sin(2πtw), cos(2πtw)]` and, with FPE, its jets: `∂/∂xₖ` is the unit vector
    /// `eₖ`, `∂/∂t = [0, 2πw·cos, −2πw·sin]`, second derivatives zero.
    fn input_jets(&self, batch: &ScoreBatch<'_, T>, jets: &Jets) -> Vec<T> {
        let d = self.dim;
        let half = self.frequencies.len();
        let width = d + 2 * half;
        let rows = batch.t.len();
        let mut input = vec![T::zero(); jets.count * rows * width];
        let two_pi = T::from(2.0 * std::f64::consts::PI).unwrap_or_else(T::zero);
        for (b, (&t, x)) in batch.t.iter().zip(batch.x.chunks_exact(d)).enumerate() {
            let row = &mut input[b * width..(b + 1) * width];
            row[..d].copy_from_slice(x);
            for (i, &w) in self.frequencies.iter().enumerate() {
                // As candle computes it: (t·w)·2π.
                let phase = t * w * two_pi;
                row[d + i] = phase.sin();
                row[d + half + i] = phase.cos();
            }
            if jets.count == 1 {
                continue;
            }
            for k in 0..d {
                input[(jets.x(k) * rows + b) * width + k] = T::one();
            }
            let start = (jets.t() * rows + b) * width;
            for (i, &w) in self.frequencies.iter().enumerate() {
                let (sin, cos) = (input[b * width + d + i], input[b * width + d + half + i]);
                input[start + d + i] = cos * two_pi * w;
                input[start + d + half + i] = -sin * two_pi * w;
            }
        }
        input
    }

    /// DSM (and the FPE penalty) from the output jets `net` (`[J·B, d]`), and their
    /// adjoint.
    fn objective(&self, batch: &ScoreBatch<'_, T>, net: &[T], jets: &Jets) -> (f64, f64, Vec<T>) {
        let d = self.dim;
        let rows = batch.t.len();
        let block = rows * d;
        let mut adjoint = vec![T::zero(); net.len()];
        let two = T::one() + T::one();
        let half = T::one() / two;
        let (mut dsm, mut penalty) = (0.0f64, 0.0f64);
        // Per-sample scratch: s, ∂ₜs, J (J[i·d + k] = ∂sᵢ/∂xₖ), r, q = −r̄.
        let mut s = vec![T::zero(); d];
        let mut jac = vec![T::zero(); d * d];
        let mut r = vec![T::zero(); d];
        let mut q = vec![T::zero(); d];
        for b in 0..rows {
            let sigma = batch.sigma[b];
            let n = &net[b * d..(b + 1) * d];
            let z = &batch.noise[b * d..(b + 1) * d];
            // DSM: w‖c·n/σ + z‖².
            let (scale, weight) = (batch.dsm_sigma[b] / sigma, batch.dsm_weight[b]);
            for i in 0..d {
                let e = scale * n[i] + z[i];
                dsm += (weight * e * e).to_f64().unwrap_or(f64::NAN);
                adjoint[b * d + i] = two * weight * e * scale;
            }
            let Some(fpe) = &batch.fpe else { continue };
            let (g2, a, w) = (fpe.diffusion_squared[b], fpe.drift[b], fpe.weight[b]);
            let x = &batch.x[b * d..(b + 1) * d];
            let at = |jet: usize, i: usize| net[jet * block + b * d + i];
            let sigma_dot = batch.sigma_dot[b];
            for i in 0..d {
                s[i] = n[i] / sigma;
                for k in 0..d {
                    jac[i * d + k] = at(jets.x(k), i) / sigma;
                }
            }
            // ∂ₖφ = ½g²Σᵢ∂ₖ∂ᵢsᵢ + g²Σᵢsᵢ∂ₖsᵢ − a(sₖ + Σᵢxᵢ∂ₖsᵢ)
            let mut norm = T::zero();
            for k in 0..d {
                let mut grad_phi = -a * s[k];
                for i in 0..d {
                    let hess = at(jets.pair(pair_index(d, i, k)), i) / sigma;
                    grad_phi = grad_phi + half * g2 * hess + (g2 * s[i] - a * x[i]) * jac[i * d + k];
                }
                let ds_dt = at(jets.t(), k) / sigma - n[k] * sigma_dot / (sigma * sigma);
                r[k] = ds_dt - grad_phi;
                norm = norm + r[k] * r[k];
            }
            penalty += (w * norm).to_f64().unwrap_or(f64::NAN);
            let lambda = fpe.penalty_weight;
            for k in 0..d {
                let r_bar = lambda * w * two * r[k];
                q[k] = -r_bar;
                // ∂ₜsₖ = n_{k,t}/σ − nₖσ'/σ²
                adjoint[jets.t() * block + b * d + k] = r_bar / sigma;
                adjoint[b * d + k] = adjoint[b * d + k] - r_bar * sigma_dot / (sigma * sigma);
            }
            for i in 0..d {
                // s̄ᵢ = g²Σₖ∂ₖsᵢ·qₖ − a·qᵢ, through sᵢ = nᵢ/σ.
                let mut s_bar = -a * q[i];
                for k in 0..d {
                    s_bar = s_bar + g2 * jac[i * d + k] * q[k];
                    // J̄ᵢₖ = (g²sᵢ − a·xᵢ)qₖ
                    adjoint[jets.x(k) * block + b * d + i] = (g2 * s[i] - a * x[i]) * q[k] / sigma;
                }
                adjoint[b * d + i] = adjoint[b * d + i] + s_bar / sigma;
                // H̄ᵢ(ik) += ½g²qₖ for every k (the pair {i, k}).
                for (k, &qk) in q.iter().enumerate() {
                    let slot = jets.pair(pair_index(d, i, k)) * block + b * d + i;
                    adjoint[slot] = adjoint[slot] + half * g2 * qk / sigma;
                }
            }
        }
        (dsm, penalty, adjoint)
    }
}

/// A forward pass through a [`Stack`]: what the reverse pass needs.
struct Pass<T> {
    rows: usize,
    /// The input jets of every layer (the network's input, then each hidden layer's output).
    activations: Vec<Vec<T>>,
    states: Vec<HiddenState<T>>,
    /// The output jets, `[J·B, outputs]`.
    output: Vec<T>,
}

impl<T: Real> Stack<'_, T> {
    /// Checks that the layers chain from `inputs` to `outputs`.
    fn check(&self, inputs: usize, outputs: usize) -> Result<()> {
        let mut width = inputs;
        for layer in self.hidden.iter().chain([&self.output]) {
            if layer.inputs != width
                || layer.weight.len() != layer.inputs * layer.outputs
                || layer.bias.len() != layer.outputs
            {
                return Err(Error::Shape("the network's layers do not fit together".into()));
            }
            width = layer.outputs;
        }
        if width != outputs {
            return Err(Error::Shape(format!(
                "the network has {width} outputs, expected {outputs}"
            )));
        }
        Ok(())
    }

    /// The number of layers with parameters (hidden and output).
    fn layers(&self) -> usize {
        self.hidden.len() + 1
    }

    /// Runs `rows` rows of input jets (`[J·rows, inputs]`) through the stack.
    fn forward(&self, input: Vec<T>, rows: usize, jets: &Jets) -> Pass<T> {
        let jet_rows = jets.count * rows;
        let mut activations = vec![input];
        let mut states = Vec::with_capacity(self.hidden.len());
        for layer in &self.hidden {
            let input = activations.last().map(Vec::as_slice).unwrap_or_default();
            let pre = affine(layer, input, rows, jet_rows);
            let (out, slopes) = self.activate(&pre, rows, layer.outputs, jets);
            activations.push(out);
            states.push(HiddenState { pre, slopes });
        }
        let last = activations.last().map(Vec::as_slice).unwrap_or_default();
        let output = affine(&self.output, last, rows, jet_rows);
        Pass {
            rows,
            activations,
            states,
            output,
        }
    }

    /// The weight and bias gradients, layer by layer, from the adjoint of the output jets.
    fn backward(&self, pass: &Pass<T>, output_adjoint: &[T], jets: &Jets) -> (Vec<Vec<T>>, Vec<Vec<T>>) {
        let (rows, jet_rows) = (pass.rows, jets.count * pass.rows);
        let mut weights = Vec::with_capacity(self.layers());
        let mut biases = Vec::with_capacity(self.layers());
        let last = pass.activations.last().map(Vec::as_slice).unwrap_or_default();
        let has_hidden = !self.hidden.is_empty();
        let (w, mut adjoint) = backward_linear(&self.output, output_adjoint, last, jet_rows, has_hidden);
        weights.push(w);
        biases.push(column_sums(output_adjoint, rows, self.output.outputs));
        for (l, (layer, state)) in self.hidden.iter().zip(&pass.states).enumerate().rev() {
            let post = adjoint.take().unwrap_or_default();
            let pre_adjoint = self.activation_adjoint(&post, state, rows, layer.outputs, jets);
            let (w, a) = backward_linear(layer, &pre_adjoint, &pass.activations[l], jet_rows, l > 0);
            weights.push(w);
            biases.push(column_sums(&pre_adjoint, rows, layer.outputs));
            adjoint = a;
        }
        weights.reverse();
        biases.reverse();
        (weights, biases)
    }

    /// The activation jets of pre-activation jets `pre` (`[J·B, width]`) and the slopes.
    fn activate(&self, pre: &[T], rows: usize, width: usize, jets: &Jets) -> (Vec<T>, [Vec<T>; 3]) {
        let n = rows * width;
        let mut out = vec![T::zero(); jets.count * n];
        // DSM needs ψ' only (for the value's adjoint); the jets need ψ'' and ψ''' too.
        let higher = jets.count > 1;
        let extra = if higher { n } else { 0 };
        let mut slopes = [vec![T::zero(); n], vec![T::zero(); extra], vec![T::zero(); extra]];
        {
            let [d1, d2, d3] = &mut slopes;
            let chunk = ELEMENTWISE_CHUNK;
            let mut d2 = d2.chunks_mut(chunk);
            let mut d3 = d3.chunks_mut(chunk);
            let tasks: Vec<_> = out[..n]
                .chunks_mut(chunk)
                .zip(d1.chunks_mut(chunk))
                .zip(pre[..n].chunks(chunk))
                .map(|((value, first), z)| {
                    let higher = d2.next().zip(d3.next());
                    (z, Slopes { value, first, higher })
                })
                .collect();
            tasks
                .into_iter()
                .for_each(|(z, slopes)| T::activation_pass(self.activation, z, slopes));
        }
        let rest = &mut out[n..];
        let block = |j: usize| &pre[j * n..(j + 1) * n];
        let [d1, d2, _] = &slopes;
        let blocks = rest.chunks_mut(n).enumerate();
        blocks.for_each(|(m, dst)| {
            let j = m + 1;
            if jets.first_order().contains(&j) {
                let z = block(j);
                for i in 0..n {
                    dst[i] = d1[i] * z[i];
                }
            } else {
                let (p, q) = jets.pairs[j - jets.pair(0)];
                let (zp, zq, zpq) = (block(jets.x(p)), block(jets.x(q)), block(j));
                for i in 0..n {
                    dst[i] = d2[i] * zp[i] * zq[i] + d1[i] * zpq[i];
                }
            }
        });
        (out, slopes)
    }

    /// The adjoint of the pre-activation jets from that of the activation jets.
    fn activation_adjoint(
        &self,
        post: &[T],
        state: &HiddenState<T>,
        rows: usize,
        width: usize,
        jets: &Jets,
    ) -> Vec<T> {
        let n = rows * width;
        let [d1, d2, d3] = &state.slopes;
        let pre = |j: usize| &state.pre[j * n..(j + 1) * n];
        let post_block = |j: usize| &post[j * n..(j + 1) * n];
        let mut out = vec![T::zero(); jets.count * n];
        out.chunks_mut(n).enumerate().for_each(|(j, dst)| {
            let a = post_block(j);
            if j == 0 {
                for i in 0..n {
                    dst[i] = d1[i] * a[i];
                }
                for p in jets.first_order() {
                    let (z, ap) = (pre(p), post_block(p));
                    for i in 0..n {
                        dst[i] = dst[i] + d2[i] * z[i] * ap[i];
                    }
                }
                for (m, &(p, q)) in jets.pairs.iter().enumerate() {
                    let jj = jets.pair(m);
                    let (zp, zq, zpq, apq) = (pre(jets.x(p)), pre(jets.x(q)), pre(jj), post_block(jj));
                    for i in 0..n {
                        dst[i] = dst[i] + apq[i] * (d3[i] * zp[i] * zq[i] + d2[i] * zpq[i]);
                    }
                }
            } else {
                for i in 0..n {
                    dst[i] = d1[i] * a[i];
                }
                if let Some(k) = jets.x_direction(j) {
                    // An x direction k: the pairs that contain k pass the other factor on.
                    for (m, &(p, q)) in jets.pairs.iter().enumerate() {
                        let apq = post_block(jets.pair(m));
                        for (this, other) in [(p, q), (q, p)] {
                            if this == k {
                                let zo = pre(jets.x(other));
                                for i in 0..n {
                                    dst[i] = dst[i] + d2[i] * zo[i] * apq[i];
                                }
                            }
                        }
                    }
                }
            }
        });
        out
    }
}

/// `input · Wᵀ`, plus the bias on the value block (the first `rows` rows).
fn affine<T: Real>(layer: &Layer<'_, T>, input: &[T], rows: usize, jet_rows: usize) -> Vec<T> {
    let mut out = forward_linear(layer, input, jet_rows);
    for row in out[..rows * layer.outputs].chunks_exact_mut(layer.outputs) {
        row.iter_mut().zip(layer.bias).for_each(|(v, &b)| *v = *v + b);
    }
    out
}

/// Runs `part` on consecutive ranges of [`PART_ROWS`] rows in parallel and adds up the
/// results (every term is a sum over rows). The cut depends only on `rows`, so results
/// do not depend on the number of threads.
fn in_parts<T: Real>(
    rows: usize,
    part: impl Fn(std::ops::Range<usize>) -> Result<Gradients<T>> + Sync,
) -> Result<Gradients<T>> {
    let ranges: Vec<_> = (0..rows)
        .step_by(PART_ROWS)
        .map(|start| start..(start + PART_ROWS).min(rows))
        .collect();
    let results: Vec<Result<Gradients<T>>> = ranges.into_par_iter().map(&part).collect();
    let mut total: Option<Gradients<T>> = None;
    for result in results {
        let next = result?;
        match &mut total {
            None => total = Some(next),
            Some(total) => total.add(&next),
        }
    }
    total.ok_or_else(|| Error::Shape("training kernel: an empty batch".into()))
}

impl<T: Real> Gradients<T> {
    /// Adds another part's values and gradients.
    fn add(&mut self, other: &Self) {
        self.dsm += other.dsm;
        self.penalty += other.penalty;
        for (a, b) in self
            .weights
            .iter_mut()
            .chain(&mut self.biases)
            .zip(other.weights.iter().chain(&other.biases))
        {
            a.iter_mut().zip(b).for_each(|(a, &b)| *a = *a + b);
        }
    }
}

impl<'a, T: Real> ScoreBatch<'a, T> {
    /// The rows `range` of the batch.
    fn rows(&self, d: usize, range: std::ops::Range<usize>) -> ScoreBatch<'a, T> {
        fn rows<U>(v: &[U], range: std::ops::Range<usize>) -> &[U] {
            &v[range]
        }
        let (start, end) = (range.start, range.end);
        let per_row = |v| rows(v, start..end);
        ScoreBatch {
            x: &self.x[start * d..end * d],
            t: per_row(self.t),
            noise: &self.noise[start * d..end * d],
            sigma: per_row(self.sigma),
            sigma_dot: if self.fpe.is_some() {
                per_row(self.sigma_dot)
            } else {
                self.sigma_dot
            },
            dsm_sigma: per_row(self.dsm_sigma),
            dsm_weight: per_row(self.dsm_weight),
            fpe: self.fpe.map(|f| FpeCoefficients {
                weight: per_row(f.weight),
                diffusion_squared: per_row(f.diffusion_squared),
                drift: per_row(f.drift),
                penalty_weight: f.penalty_weight,
            }),
        }
    }
}

/// `u(x, t) = MLP([t, x])`: `MlpPotential`'s layout; its score is `∇ₓu`.
#[derive(Debug, Clone)]
pub(crate) struct PotentialMlp<'a, T> {
    pub(crate) dim: usize,
    pub(crate) stack: Stack<'a, T>,
}

/// Points `[N, d]` with one time each.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Points<'a, T> {
    pub(crate) x: &'a [T],
    pub(crate) t: &'a [T],
}

/// The log-density FP residual's collocation points and coefficients:
/// `Σ_c weight_c R_c²`, `R = ∂ₜu + a(d + ⟨x, ∇u⟩) − ½g²(Δu + ‖∇u‖²)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResidualRows<'a, T> {
    pub(crate) points: Points<'a, T>,
    pub(crate) weight: &'a [T],
    pub(crate) diffusion_squared: &'a [T],
    pub(crate) drift: &'a [T],
}

/// A training batch for a potential: DSM on `∇ₓu` plus, optionally, `λ` times the
/// log-density FP penalty (`Σ_c w_c R_c² + Σ_b v_b exp(2u_b)`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PotentialBatch<'a, T> {
    /// DSM: `Σ_b dsm_weight_b ‖dsm_sigma_b ∇u_b + z_b‖²`.
    pub(crate) dsm: Points<'a, T>,
    pub(crate) noise: &'a [T],
    pub(crate) dsm_sigma: &'a [T],
    pub(crate) dsm_weight: &'a [T],
    pub(crate) residual: Option<ResidualRows<'a, T>>,
    /// Boundary points and their weights `v_b`.
    pub(crate) boundary: Option<(Points<'a, T>, &'a [T])>,
    pub(crate) penalty_weight: T,
}

impl<T: Real> PotentialMlp<'_, T> {
    /// The objective's value and its gradient with respect to every weight and bias: the
    /// three point sets run separately, each with the jets it needs, in parts.
    pub(crate) fn gradients(&self, batch: &PotentialBatch<'_, T>) -> Result<Gradients<T>> {
        let d = self.dim;
        self.stack.check(1 + d, 1)?;
        let fits = |p: &Points<'_, T>, per_row: &[&[T]]| {
            p.x.len() == p.t.len() * d && per_row.iter().all(|v| v.len() == p.t.len())
        };
        let mut ok =
            fits(&batch.dsm, &[batch.dsm_sigma, batch.dsm_weight]) && batch.noise.len() == batch.dsm.x.len();
        if let Some(r) = &batch.residual {
            ok &= fits(&r.points, &[r.weight, r.diffusion_squared, r.drift]);
        }
        if let Some((p, v)) = &batch.boundary {
            ok &= fits(p, &[v]);
        }
        if !ok {
            return Err(Error::Shape(
                "training kernel: inputs of different lengths".into(),
            ));
        }
        let mut total = in_parts(batch.dsm.t.len(), |r| self.dsm_part(batch, r))?;
        if let Some(rows) = &batch.residual {
            total.add(&in_parts(rows.points.t.len(), |r| {
                self.residual_part(rows, r, batch.penalty_weight)
            })?);
        }
        if let Some((points, weight)) = &batch.boundary {
            total.add(&in_parts(points.t.len(), |r| {
                self.boundary_part(points, weight, r, batch.penalty_weight)
            })?);
        }
        Ok(total)
    }

    /// The score `∇ₓu` at every point (`[N, d]` row-major), in forward mode: the value and
    /// the `d` first-order jets through the stack, no reverse pass. Threads take parts.
    pub(crate) fn score(&self, points: &Points<'_, T>) -> Result<Vec<T>> {
        let d = self.dim;
        self.stack.check(1 + d, 1)?;
        let n = points.t.len();
        if points.x.len() != n * d {
            return Err(Error::Shape("score kernel: inputs of different lengths".into()));
        }
        let jets = Jets::new(d, true, false, Vec::new());
        let ranges: Vec<_> = (0..n)
            .step_by(PART_ROWS)
            .map(|s| s..(s + PART_ROWS).min(n))
            .collect();
        let parts: Vec<Vec<T>> = ranges
            .into_par_iter()
            .map(|range| {
                let rows = range.len();
                let pass = self
                    .stack
                    .forward(self.input_jets(points, range, &jets), rows, &jets);
                let mut out = vec![T::zero(); rows * d];
                for (b, row) in out.chunks_exact_mut(d).enumerate() {
                    for (k, v) in row.iter_mut().enumerate() {
                        *v = pass.output[jets.x(k) * rows + b];
                    }
                }
                out
            })
            .collect();
        Ok(parts.concat())
    }

    /// `[t, x]` and its jets: `∂/∂xₖ` is the unit vector at `1 + k`, `∂/∂t` at 0.
    fn input_jets(&self, points: &Points<'_, T>, range: std::ops::Range<usize>, jets: &Jets) -> Vec<T> {
        let d = self.dim;
        let width = 1 + d;
        let rows = range.len();
        let mut input = vec![T::zero(); jets.count * rows * width];
        for (b, row) in range.enumerate() {
            input[b * width] = points.t[row];
            input[b * width + 1..(b + 1) * width].copy_from_slice(&points.x[row * d..(row + 1) * d]);
            if jets.x {
                for k in 0..d {
                    input[(jets.x(k) * rows + b) * width + 1 + k] = T::one();
                }
            }
            if jets.t {
                input[(jets.t() * rows + b) * width] = T::one();
            }
        }
        input
    }

    /// Runs `rows` of `points` with `jets`, asks `objective` for the adjoint of the output
    /// jets (`[J·rows]`, one output), and returns the gradients.
    fn part(
        &self,
        points: &Points<'_, T>,
        range: std::ops::Range<usize>,
        jets: Jets,
        objective: impl FnOnce(&[T], &mut [T]) -> (f64, f64),
    ) -> Result<Gradients<T>> {
        let rows = range.len();
        let pass = self
            .stack
            .forward(self.input_jets(points, range, &jets), rows, &jets);
        let mut adjoint = vec![T::zero(); pass.output.len()];
        let (dsm, penalty) = objective(&pass.output, &mut adjoint);
        let (weights, biases) = self.stack.backward(&pass, &adjoint, &jets);
        Ok(Gradients {
            dsm,
            penalty,
            weights,
            biases,
        })
    }

    fn dsm_part(&self, batch: &PotentialBatch<'_, T>, range: std::ops::Range<usize>) -> Result<Gradients<T>> {
        let d = self.dim;
        let jets = Jets::new(d, true, false, Vec::new());
        let x_jet: Vec<usize> = (0..d).map(|k| jets.x(k)).collect();
        let rows = range.len();
        let two = T::one() + T::one();
        self.part(&batch.dsm, range.clone(), jets, |out, adjoint| {
            let mut dsm = 0.0;
            for (b, row) in range.enumerate() {
                let (sigma, weight) = (batch.dsm_sigma[row], batch.dsm_weight[row]);
                for (k, &jet) in x_jet.iter().enumerate() {
                    // ‖σ∂ₖu + zₖ‖²
                    let e = sigma * out[jet * rows + b] + batch.noise[row * d + k];
                    dsm += (weight * e * e).to_f64().unwrap_or(f64::NAN);
                    adjoint[jet * rows + b] = two * weight * e * sigma;
                }
            }
            (dsm, 0.0)
        })
    }

    fn residual_part(
        &self,
        coefficients: &ResidualRows<'_, T>,
        range: std::ops::Range<usize>,
        lambda: T,
    ) -> Result<Gradients<T>> {
        let d = self.dim;
        let jets = Jets::new(d, true, true, (0..d).map(|k| (k, k)).collect());
        let (x_jet, t_jet): (Vec<usize>, usize) = ((0..d).map(|k| jets.x(k)).collect(), jets.t());
        let second: Vec<usize> = (0..d).map(|k| jets.pair(k)).collect();
        let rows = range.len();
        let one = T::one();
        let two = one + one;
        let half = one / two;
        let dim = T::from(d).unwrap_or_else(T::nan);
        let c = coefficients;
        self.part(&c.points, range.clone(), jets, |out, adjoint| {
            let mut penalty = 0.0;
            for (b, row) in range.enumerate() {
                let at = |jet: usize| out[jet * rows + b];
                let (g2, a, w) = (c.diffusion_squared[row], c.drift[row], c.weight[row]);
                let x = &c.points.x[row * d..(row + 1) * d];
                let (mut transport, mut laplacian, mut norm) = (dim, T::zero(), T::zero());
                for k in 0..d {
                    let grad = at(x_jet[k]);
                    transport = transport + x[k] * grad;
                    laplacian = laplacian + at(second[k]);
                    norm = norm + grad * grad;
                }
                let r = at(t_jet) + a * transport - half * g2 * (laplacian + norm);
                penalty += (w * r * r).to_f64().unwrap_or(f64::NAN);
                let r_bar = two * lambda * w * r;
                adjoint[t_jet * rows + b] = r_bar;
                for k in 0..d {
                    adjoint[x_jet[k] * rows + b] = r_bar * (a * x[k] - g2 * at(x_jet[k]));
                    adjoint[second[k] * rows + b] = -half * g2 * r_bar;
                }
            }
            (0.0, penalty)
        })
    }

    fn boundary_part(
        &self,
        points: &Points<'_, T>,
        weight: &[T],
        range: std::ops::Range<usize>,
        lambda: T,
    ) -> Result<Gradients<T>> {
        let two = T::one() + T::one();
        self.part(points, range.clone(), Jets::value(self.dim), |out, adjoint| {
            let mut penalty = 0.0;
            for (b, row) in range.enumerate() {
                // exp(u)² = exp(2u)
                let density_sq = (two * out[b]).exp();
                penalty += (weight[row] * density_sq).to_f64().unwrap_or(f64::NAN);
                adjoint[b] = lambda * weight[row] * two * density_sq;
            }
            (0.0, penalty)
        })
    }
}

/// The index of the pair `{j, k}` in `Jets::pairs` (`j ≤ k` order, row by row).
fn pair_index(d: usize, j: usize, k: usize) -> usize {
    let (j, k) = if j <= k { (j, k) } else { (k, j) };
    // Pairs before row j: d + (d−1) + … + (d−j+1).
    j * d - j * j.saturating_sub(1) / 2 + (k - j)
}
