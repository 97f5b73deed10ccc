//! Fused CPU kernels for evaluating dense networks without building a graph.
//!
//! Sampling evaluates the same MLP thousands of times on large batches. Through plain
//! candle ops each layer allocates three activation-sized tensors (matmul, bias add,
//! activation), and on this crate's reference machine the kernel's page zeroing for those
//! fresh allocations dominated the profile. Here each layer is one gemm call (candle's own
//! `gemm` crate, AVX-512 when available) into a reused buffer, followed by one pass that
//! adds the bias and applies the activation in place, vectorized with run-time dispatch.
//! Only f32, only the forward pass: callers fall back to candle ops for everything else.
//!
//! [`training`] does the same for a training step of the score MLP (f32 and f64): the DSM
//! loss, the score-FPE penalty, and their weight gradients, by hand.

use std::cell::{Cell, RefCell};

use candle_core::Tensor;
use rayon::prelude::*;

use crate::{Error, Result};

pub(crate) mod channels;
pub(crate) mod conv;
pub(crate) mod training;

thread_local! {
    static INFERENCE_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as computing values that are never differentiated (a
/// sampler's loop, whose state is detached after every step) until dropped. Models may
/// then use these kernels instead of graph-building candle ops when their inputs are not
/// tracked either.
pub(crate) struct InferenceScope(());

impl InferenceScope {
    pub(crate) fn enter() -> Self {
        INFERENCE_DEPTH.with(|d| d.set(d.get() + 1));
        Self(())
    }

    /// Whether the current thread is inside a scope.
    pub(crate) fn active() -> bool {
        INFERENCE_DEPTH.with(|d| d.get() > 0)
    }
}

impl Drop for InferenceScope {
    fn drop(&mut self) {
        INFERENCE_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// The pointwise activations the kernels implement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Pointwise {
    Identity,
    Silu,
    Tanh,
    /// `log(1 + exp(βz))/β`.
    Softplus {
        beta: f64,
    },
}

// ---------------------------------------------------------------------------------------
// The noise-conditional score MLP, read in place from the model's variables
// ---------------------------------------------------------------------------------------

/// A dense layer `act(x Wᵀ + b)` borrowed from a candle-nn style weight `[outputs, inputs]`
/// (row-major) and bias `[outputs]`: nothing is copied, so the current values of trained
/// variables are always the ones used.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DenseView<'a> {
    pub(crate) weight: &'a [f32],
    pub(crate) bias: &'a [f32],
    pub(crate) inputs: usize,
    pub(crate) outputs: usize,
    pub(crate) activation: Pointwise,
}

/// `s(x, t) = MLP([x, sin(2πtw), cos(2πtw)]) / σ(t)`: the layout of `MlpScore`.
#[derive(Debug, Clone)]
pub(crate) struct ScoreMlpView<'a> {
    /// Data dimension `d` (the first `d` inputs of the first layer).
    pub(crate) dim: usize,
    /// The Fourier frequencies `w` (the next `2·len` inputs are their sines, then cosines).
    pub(crate) frequencies: &'a [f32],
    /// The hidden layers and the output layer (identity activation).
    pub(crate) layers: Vec<DenseView<'a>>,
}

/// Rows per task: the activations of a chunk (`CHUNK × width` f32) stay in L1/L2 from
/// one layer to the next, and each thread runs the whole network on its chunk, so there
/// is no synchronization between layers.
const CHUNK: usize = 128;

thread_local! {
    static MLP_SCRATCH: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

impl ScoreMlpView<'_> {
    /// Checks that the layers chain and fit the input layout.
    pub(crate) fn validate(&self) -> Result<()> {
        let Some(first) = self.layers.first() else {
            return Err(Error::Shape("the network has no layers".into()));
        };
        let last = &self.layers[self.layers.len() - 1];
        let chains = self.layers.windows(2).all(|w| w[0].outputs == w[1].inputs)
            && self
                .layers
                .iter()
                .all(|l| l.weight.len() == l.inputs * l.outputs && l.bias.len() == l.outputs);
        if !chains
            || first.inputs != self.dim + 2 * self.frequencies.len()
            || last.outputs != self.dim
            || last.activation != Pointwise::Identity
        {
            return Err(Error::Shape(
                "the score network's layers do not fit together".into(),
            ));
        }
        Ok(())
    }

    /// Writes `s(x_r, t_r) = MLP(…)/sigma_r` for every row of `x` (`[rows, d]`) into
    /// `out` (`[rows, d]`). `t` and `sigma` have one entry per row; when every `t` is
    /// the same (as in samplers) the time features enter as a bias of the first layer.
    pub(crate) fn forward(&self, x: &[f32], t: &[f32], sigma: &[f32], out: &mut [f32]) -> Result<()> {
        self.validate()?;
        let d = self.dim;
        let rows = t.len();
        if x.len() != rows * d || sigma.len() != rows || out.len() != rows * d {
            return Err(Error::Shape("score kernel: inputs of different lengths".into()));
        }
        let first = &self.layers[0];
        // The first layer's weights on x, transposed to [d, width] for a row-wise pass.
        let mut w_x = vec![0.0f32; d * first.outputs];
        for j in 0..first.outputs {
            for k in 0..d {
                w_x[k * first.outputs + j] = first.weight[j * first.inputs + k];
            }
        }
        let shared_time = t.iter().all(|&s| s.to_bits() == t[0].to_bits()).then(|| t[0]);
        let time_bias = shared_time.map(|s| self.time_bias(s));
        out.par_chunks_mut(CHUNK * d)
            .zip(x.par_chunks(CHUNK * d))
            .zip(t.par_chunks(CHUNK).zip(sigma.par_chunks(CHUNK)))
            .for_each(|((out, x), (t, sigma))| {
                MLP_SCRATCH.with(|scratch| {
                    let [a, b, input] = &mut *scratch.borrow_mut();
                    self.forward_chunk(x, t, sigma, &w_x, time_bias.as_deref(), out, a, b, input)
                })
            });
        Ok(())
    }

    /// The first layer's bias plus its weights on the time features of `t`.
    fn time_bias(&self, t: f32) -> Vec<f32> {
        let first = &self.layers[0];
        let features = self.features(t);
        (0..first.outputs)
            .map(|j| {
                let w = &first.weight[j * first.inputs + self.dim..(j + 1) * first.inputs];
                let dot: f64 = w.iter().zip(&features).map(|(&a, &b)| a as f64 * b as f64).sum();
                first.bias[j] + dot as f32
            })
            .collect()
    }

    /// `[sin(2πtw), cos(2πtw)]`, computed as candle does (f32 product, then sin/cos).
    fn features(&self, t: f32) -> Vec<f32> {
        let two_pi = (2.0 * std::f64::consts::PI) as f32;
        let phases: Vec<f32> = self.frequencies.iter().map(|&w| t * w * two_pi).collect();
        phases
            .iter()
            .map(|p| p.sin())
            .chain(phases.iter().map(|p| p.cos()))
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_chunk(
        &self,
        x: &[f32],
        t: &[f32],
        sigma: &[f32],
        w_x: &[f32],
        time_bias: Option<&[f32]>,
        out: &mut [f32],
        current: &mut Vec<f32>,
        spare: &mut Vec<f32>,
        input: &mut Vec<f32>,
    ) {
        let rows = t.len();
        let d = self.dim;
        let first = &self.layers[0];
        current.resize(rows * first.outputs, 0.0);
        match time_bias {
            Some(bias) => {
                // act(x W_xᵀ + b'), with b' holding the shared time features.
                for (h, xr) in current.chunks_exact_mut(first.outputs).zip(x.chunks_exact(d)) {
                    h.copy_from_slice(&w_x[..first.outputs]);
                    h.iter_mut().for_each(|v| *v *= xr[0]);
                    for k in 1..d {
                        let w = &w_x[k * first.outputs..(k + 1) * first.outputs];
                        h.iter_mut().zip(w).for_each(|(v, &w)| *v += xr[k] * w);
                    }
                }
                bias_activation(current, bias, first.activation);
            }
            None => {
                input.clear();
                for (xr, &tr) in x.chunks_exact(d).zip(t) {
                    input.extend_from_slice(xr);
                    input.extend(self.features(tr));
                }
                dense_strided(first, input, rows, current);
            }
        }
        let (last, hidden) = self.layers[1..].split_last().expect("validated: an output layer");
        for layer in hidden {
            dense_strided(layer, current, rows, spare);
            std::mem::swap(current, spare);
        }
        // The narrow output layer: one dot product per output, divided by σ.
        for ((o, h), &scale) in out
            .chunks_exact_mut(d)
            .zip(current.chunks_exact(last.inputs))
            .zip(sigma)
        {
            for (j, v) in o.iter_mut().enumerate() {
                let w = &last.weight[j * last.inputs..(j + 1) * last.inputs];
                *v = (dot(h, w) + last.bias[j]) / scale;
            }
        }
    }
}

/// `out ← act(input · Wᵀ + b)` for `rows` rows, single-threaded (the caller parallelizes
/// over rows), with `W` read in place as `[outputs, inputs]`.
fn dense_strided(layer: &DenseView<'_>, input: &[f32], rows: usize, out: &mut Vec<f32>) {
    debug_assert_eq!(input.len(), rows * layer.inputs);
    out.resize(rows * layer.outputs, 0.0);
    // SAFETY: row-major [rows, inputs] input, [rows, outputs] output, and the weight
    // [outputs, inputs] read as its transpose [inputs, outputs] (row stride 1, column
    // stride `inputs`): all within the slices' lengths.
    unsafe {
        gemm::gemm(
            rows,
            layer.outputs,
            layer.inputs,
            out.as_mut_ptr(),
            1,
            layer.outputs as isize,
            false,
            input.as_ptr(),
            1,
            layer.inputs as isize,
            layer.weight.as_ptr(),
            layer.inputs as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    bias_activation(out, layer.bias, layer.activation);
}

/// `Σ aᵢbᵢ` with 16 independent partial sums, so that it vectorizes.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a16.zip(b16) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

// ---------------------------------------------------------------------------------------
// SiLU and its derivatives as a differentiable candle op
// ---------------------------------------------------------------------------------------

/// The `order`-th derivative of SiLU, `x·σ(x)`, as a candle op whose backward pass is the
/// next derivative (so gradients of gradients, as the Fokker–Planck regularizers take,
/// stay exact to any order). One vectorized pass and one allocation per evaluation, where
/// candle's `silu` and its backward take one and six.
///
/// With `s = σ(x)`: `silu⁽ⁿ⁾(x) = n·σ⁽ⁿ⁻¹⁾(x) + x·σ⁽ⁿ⁾(x)`, and every derivative of the
/// sigmoid is a polynomial in `s`: `σ⁽ᵏ⁺¹⁾ = P_k'(s)·s(1 − s)` for `σ⁽ᵏ⁾ = P_k(s)`.
#[derive(Debug, Clone)]
pub(crate) struct SiluDerivative {
    order: usize,
    /// Coefficients (ascending powers of `s`) of `σ⁽ⁿ⁻¹⁾` and `σ⁽ⁿ⁾`.
    previous: Vec<f64>,
    current: Vec<f64>,
}

impl SiluDerivative {
    pub(crate) fn new(order: usize) -> Self {
        // P_0(s) = s.
        let mut polys = vec![vec![0.0, 1.0]];
        for k in 0..order {
            let p = &polys[k];
            // P' (ascending), then times s − s².
            let dp: Vec<f64> = (1..p.len()).map(|i| i as f64 * p[i]).collect();
            let mut next = vec![0.0; dp.len() + 2];
            for (i, c) in dp.iter().enumerate() {
                next[i + 1] += c;
                next[i + 2] -= c;
            }
            polys.push(next);
        }
        let current = polys[order].clone();
        let previous = if order == 0 {
            vec![0.0]
        } else {
            polys[order - 1].clone()
        };
        Self {
            order,
            previous,
            current,
        }
    }

    #[inline(always)]
    fn eval_f64(&self, x: f64) -> f64 {
        let s = 1.0 / (1.0 + (-x).exp());
        let horner = |c: &[f64]| c.iter().rev().fold(0.0, |acc, &c| acc * s + c);
        self.order as f64 * horner(&self.previous) + x * horner(&self.current)
    }
}

/// SiLU on `x` through [`SiluDerivative`]: same values as candle's `silu` (to rounding),
/// differentiable to any order.
pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    silu_derivative(x, 0)
}

/// The `order`-th derivative of SiLU on `x`, one op (itself differentiable to any order).
pub(crate) fn silu_derivative(x: &Tensor, order: usize) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(SiluDerivative::new(order))?)
}

/// Whether the SiLU kernels take `x`: f32 or f64 on the CPU.
pub(crate) fn silu_supported(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

impl candle_core::CustomOp1 for SiluDerivative {
    fn name(&self) -> &'static str {
        "silu-derivative"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        fn values<T: Copy>(data: &[T], layout: &candle_core::Layout) -> candle_core::Result<Vec<T>> {
            match layout.contiguous_offsets() {
                Some((start, end)) => Ok(data[start..end].to_vec()),
                None => Err(candle_core::Error::RequiresContiguous {
                    op: "silu-derivative",
                }),
            }
        }
        let out = match storage {
            CpuStorage::F32(data) => {
                let mut v = values(data, layout)?;
                let (n, previous, current) = (
                    self.order as f32,
                    self.previous.iter().map(|&c| c as f32).collect::<Vec<_>>(),
                    self.current.iter().map(|&c| c as f32).collect::<Vec<_>>(),
                );
                let apply = |c: &mut [f32]| silu_derivative_f32(c, n, &previous, &current);
                if v.len() >= 4 * PAR_ELEMENTS {
                    v.par_chunks_mut(PAR_ELEMENTS).for_each(apply);
                } else {
                    apply(&mut v);
                }
                CpuStorage::F32(v)
            }
            CpuStorage::F64(data) => {
                let mut v = values(data, layout)?;
                v.iter_mut().for_each(|e| *e = self.eval_f64(*e));
                CpuStorage::F64(v)
            }
            other => {
                use candle_core::backend::BackendStorage;
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    other.dtype(),
                    "silu-derivative",
                ));
            }
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let next = arg.apply_op1(SiluDerivative::new(self.order + 1))?;
        Ok(Some(grad_res.mul(&next)?))
    }
}

/// Elementwise work is split across threads above this many elements per task.
const PAR_ELEMENTS: usize = 16_384;

/// `v ← n·P(σ(v)) + v·Q(σ(v))` (polynomials in ascending powers), dispatched like
/// [`bias_activation`].
fn silu_derivative_f32(v: &mut [f32], n: f32, p: &[f32], q: &[f32]) {
    if n == 0.0 {
        // SiLU itself: the bias-and-activation pass with a zero bias.
        const ZERO: [f32; 64] = [0.0; 64];
        let split = v.len() - v.len() % ZERO.len();
        let (head, tail) = v.split_at_mut(split);
        bias_activation(head, &ZERO, Pointwise::Silu);
        if !tail.is_empty() {
            bias_activation(tail, &ZERO[..tail.len()], Pointwise::Silu);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { silu_derivative_avx512(v, n, p, q) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { silu_derivative_avx2(v, n, p, q) };
        }
    }
    silu_derivative_portable(v, n, p, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn silu_derivative_avx512(v: &mut [f32], n: f32, p: &[f32], q: &[f32]) {
    silu_derivative_portable(v, n, p, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_derivative_avx2(v: &mut [f32], n: f32, p: &[f32], q: &[f32]) {
    silu_derivative_portable(v, n, p, q)
}

/// Blocks of 64: one pass for the sigmoid, then one vectorized pass per coefficient.
#[inline(always)]
fn silu_derivative_portable(v: &mut [f32], n: f32, p: &[f32], q: &[f32]) {
    const B: usize = 64;
    let (mut s, mut ps, mut qs) = ([0.0f32; B], [0.0f32; B], [0.0f32; B]);
    for block in v.chunks_mut(B) {
        let len = block.len();
        let (s, ps, qs) = (&mut s[..len], &mut ps[..len], &mut qs[..len]);
        s.iter_mut()
            .zip(&*block)
            .for_each(|(s, &x)| *s = 1.0 / (1.0 + exp(-x)));
        for (acc, c) in [(&mut *ps, p), (&mut *qs, q)] {
            acc.fill(c[c.len() - 1]);
            for &k in c[..c.len() - 1].iter().rev() {
                acc.iter_mut().zip(&*s).for_each(|(a, &s)| *a = *a * s + k);
            }
        }
        block
            .iter_mut()
            .zip(ps.iter().zip(&*qs))
            .for_each(|(x, (&p, &q))| *x = n * p + *x * q);
    }
}

/// `v ← act(v + bias[j])` over whole rows, dispatched to the widest SIMD available.
fn bias_activation(rows: &mut [f32], bias: &[f32], activation: Pointwise) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { bias_activation_avx512(rows, bias, activation) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { bias_activation_avx2(rows, bias, activation) };
        }
    }
    bias_activation_portable(rows, bias, activation)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn bias_activation_avx512(rows: &mut [f32], bias: &[f32], activation: Pointwise) {
    bias_activation_with(rows, bias, activation, |n, d| divide_avx2(n, d))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bias_activation_avx2(rows: &mut [f32], bias: &[f32], activation: Pointwise) {
    bias_activation_with(rows, bias, activation, |n, d| divide_avx2(n, d))
}

/// `num[i] ← num[i] / den[i]` with the hardware reciprocal estimate refined by one
/// Newton step (≤ 2 ulp; `vdivps` was the bottleneck of the SiLU pass). For `den` above
/// 2¹²⁶ the estimate flushes to zero: SiLU's result there is below 1e-36 in size anyway.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn divide_avx2(num: &mut [f32], den: &[f32]) {
    use std::arch::x86_64::*;
    let n = num.len().min(den.len());
    let two = _mm256_set1_ps(2.0);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, within both slices.
        let (d, x) = unsafe {
            (
                _mm256_loadu_ps(den.as_ptr().add(i)),
                _mm256_loadu_ps(num.as_ptr().add(i)),
            )
        };
        let r = _mm256_rcp_ps(d);
        let r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, two));
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(num.as_mut_ptr().add(i), _mm256_mul_ps(x, r)) };
        i += 8;
    }
    num[i..n].iter_mut().zip(&den[i..n]).for_each(|(x, d)| *x /= d);
}

/// The loop the SIMD variants recompile; written so that it vectorizes.
#[inline(always)]
fn bias_activation_portable(rows: &mut [f32], bias: &[f32], activation: Pointwise) {
    bias_activation_with(rows, bias, activation, |num, den| {
        num.iter_mut().zip(den).for_each(|(x, d)| *x /= d)
    })
}

/// [`bias_activation_portable`] with the division of SiLU's `z / (1 + e⁻ᶻ)` supplied.
#[inline(always)]
fn bias_activation_with(
    rows: &mut [f32],
    bias: &[f32],
    activation: Pointwise,
    divide: impl Fn(&mut [f32], &[f32]),
) {
    const BLOCK: usize = 64;
    let mut den = [0.0f32; BLOCK];
    for row in rows.chunks_exact_mut(bias.len()) {
        match activation {
            Pointwise::Identity => row.iter_mut().zip(bias).for_each(|(v, b)| *v += b),
            Pointwise::Silu => {
                for (v, b) in row.chunks_mut(BLOCK).zip(bias.chunks(BLOCK)) {
                    let den = &mut den[..v.len()];
                    v.iter_mut().zip(b).zip(den.iter_mut()).for_each(|((v, b), d)| {
                        let z = *v + b;
                        *v = z;
                        *d = 1.0 + exp(-z);
                    });
                    divide(v, den);
                }
            }
            Pointwise::Softplus { beta } => row.iter_mut().zip(bias).for_each(|(v, b)| {
                let beta = beta as f32;
                let z = *v + b;
                // relu(z) + log(1 + e^(−β|z|))/β: no overflow.
                *v = z.max(0.0) + (1.0 + exp(-beta * z.abs())).ln() / beta;
                if z.is_nan() {
                    *v = z;
                }
            }),
            Pointwise::Tanh => row.iter_mut().zip(bias).for_each(|(v, b)| {
                let z = *v + b;
                let t = 1.0 - 2.0 / (1.0 + exp(2.0 * z));
                *v = if z.is_nan() { z } else { t }; // a blend, still vectorized
            }),
        }
    }
}

/// `eˣ` for f32 to within ~2 ulp (Cephes' expf: range reduction by powers of two and a
/// degree-5 polynomial), branch-free so that it vectorizes. NaN in gives a finite value
/// out, so callers must keep NaN flowing through another term (as SiLU's `z/(…)` does).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let y = x * std::f32::consts::LOG2_E + 0.5;
    // SAFETY: |y| < 128 after the clamp (and clamp maps NaN to a bound).
    let truncated = unsafe { y.to_int_unchecked::<i32>() };
    let floor = truncated - i32::from(y < truncated as f32); // floor without a libm call
    let n = floor as f32;
    // Fused multiply-adds: single instructions in the AVX2/AVX-512 variants (and on
    // aarch64), which halves the polynomial's dependency chain.
    let r = n.mul_add(2.121_944_4e-4, n.mul_add(-0.693_359_4, x));
    let p = 1.987_569_1e-4f32.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r + 1.0);
    f32::from_bits(((floor + 127) << 23) as u32) * e
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn exp_is_accurate_to_a_few_ulp() {
        let mut worst = 0.0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            worst = worst.max(((exp(x) - x.exp()) / x.exp()).abs());
            x += 0.001;
        }
        assert!(worst < 3.0 * f32::EPSILON, "relative error {worst}");
    }

    /// Each order's forward equals a central difference of the previous order (f64).
    #[test]
    fn silu_derivatives_are_derivatives() {
        let h = 1e-5;
        for order in 1..5 {
            let (f, df) = (SiluDerivative::new(order - 1), SiluDerivative::new(order));
            for i in -40..=40 {
                let x = i as f64 * 0.25;
                let fd = (f.eval_f64(x + h) - f.eval_f64(x - h)) / (2.0 * h);
                assert!((df.eval_f64(x) - fd).abs() < 1e-6, "order {order} at {x}");
            }
        }
        // Order 0 is SiLU, order 1 its known derivative.
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        for x in [-3.0, -0.5, 0.0, 1.5] {
            assert!((SiluDerivative::new(0).eval_f64(x) - x * s(x)).abs() < 1e-15);
            let d1 = s(x) + x * s(x) * (1.0 - s(x));
            assert!((SiluDerivative::new(1).eval_f64(x) - d1).abs() < 1e-15);
        }
    }

    /// The op (f32, vectorized) against candle's silu, and its gradients of gradients
    /// against the f64 formulas.
    #[test]
    fn silu_op_matches_candle_and_differentiates() {
        let dev = Device::Cpu;
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.03).collect();
        let x = Tensor::new(values.as_slice(), &dev).unwrap();
        let ours = silu(&x).unwrap().to_vec1::<f32>().unwrap();
        let theirs = x.silu().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(
                (a - b).abs() <= 4.0 * f32::EPSILON * b.abs().max(1e-3),
                "{a} vs {b}"
            );
        }
        let xv = candle_core::Var::new(&[-2.0f64, -0.3, 0.0, 0.7, 3.0], &dev).unwrap();
        let y = silu(xv.as_tensor()).unwrap().sum_all().unwrap();
        let g = y.backward().unwrap().get(xv.as_tensor()).unwrap().clone();
        let gg = g
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(xv.as_tensor())
            .cloned();
        let xs = xv.as_tensor().to_vec1::<f64>().unwrap();
        let g = g.to_vec1::<f64>().unwrap();
        for (i, &x) in xs.iter().enumerate() {
            assert!((g[i] - SiluDerivative::new(1).eval_f64(x)).abs() < 1e-12);
        }
        // Second order needs CANDLE_GRAD_DO_NOT_DETACH (set by .cargo/config.toml).
        if crate::autodiff::ensure_higher_order_gradients().is_ok() {
            let gg = gg.unwrap().to_vec1::<f64>().unwrap();
            for (i, &x) in xs.iter().enumerate() {
                assert!((gg[i] - SiluDerivative::new(2).eval_f64(x)).abs() < 1e-12);
            }
        }
    }

    /// `MlpScore` inside a sampler's scope (fused kernels) equals its candle-op forward,
    /// for one shared time (features folded into the bias) and for per-sample times.
    #[test]
    fn fused_mlp_score_matches_candle_ops() {
        use crate::score::{MlpConfig, MlpScore};
        use crate::ScoreModel;
        let dev = Device::Cpu;
        let vars = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vars, DType::F32, &dev);
        let model = MlpScore::new(vb, crate::sde::VpSde::default(), MlpConfig::default()).unwrap();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let x = crate::random::standard_normal((300, 2), DType::F32, &dev, &mut rng).unwrap();
        let shared = Tensor::full(0.37f32, 300, &dev).unwrap();
        let varied = crate::random::uniform(300, 1e-3, 1.0, DType::F32, &dev, &mut rng).unwrap();
        for t in [&shared, &varied] {
            let want = model.score(&x, t).unwrap();
            let got = {
                let _scope = InferenceScope::enter();
                model.score(&x, t).unwrap()
            };
            assert!(!got.track_op());
            let err = (&got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let (err, scale) = (err.to_scalar::<f32>().unwrap(), scale.to_scalar::<f32>().unwrap());
            assert!(err < 1e-5 * scale.max(1.0), "max error {err} (scale {scale})");
        }
        // Tracked inputs (a leaf for input derivatives) take the graph path even in scope.
        let leaf = crate::autodiff::leaf(&x).unwrap();
        let _scope = InferenceScope::enter();
        assert!(model.score(&leaf, &shared).unwrap().track_op());
    }

    #[test]
    fn nan_flows_through_the_activations() {
        for act in [Pointwise::Silu, Pointwise::Tanh, Pointwise::Identity] {
            let mut v = [f32::NAN, 1.0];
            bias_activation(&mut v, &[0.0, 0.0], act);
            assert!(v[0].is_nan(), "{act:?}");
        }
    }
}
