//! Fused CPU kernels for evaluating dense networks without building a graph.
//!
//! Sampling evaluates the same MLP thousands of times on large batches. Through plain
//! candle ops each layer allocates three activation-sized tensors (matmul, bias add,
//! activation), and on this crate's reference machine the kernel's page zeroing for those
//! fresh allocations dominated the profile. Here each layer is one gemm call (candle's own
//! `gemm` crate, AVX-512 when available) into a reused buffer, followed by one pass that
//! adds the bias and applies the activation in place, vectorized with run-time dispatch.
//! Only f32, only the forward pass: callers fall back to candle ops for everything else.

// Wired into the reference MLP score network when it lands (issue 4); until then only
// the unit tests below call it.
#![allow(dead_code)]

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// The pointwise activations the kernels implement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Pointwise {
    Identity,
    Silu,
    Tanh,
}

/// One dense layer `y = act(x Wᵀ + b)` with `W` stored transposed (`[inputs, outputs]`).
#[derive(Debug, Clone)]
pub(crate) struct Dense {
    weight_t: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
    activation: Pointwise,
}

impl Dense {
    /// From a candle-nn style weight `[outputs, inputs]` and bias `[outputs]`.
    pub(crate) fn new(weight: &Tensor, bias: &Tensor, activation: Pointwise) -> Result<Self> {
        let (outputs, inputs) = weight.dims2()?;
        if bias.dims() != [outputs] {
            return Err(Error::Shape(format!(
                "bias of shape {:?} does not fit a weight of shape {:?}",
                bias.dims(),
                weight.dims()
            )));
        }
        Ok(Self {
            weight_t: weight
                .t()?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            bias: bias.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            inputs,
            outputs,
            activation,
        })
    }

    /// Writes `act(input · Wᵀ + b)` for `rows` rows into `out` (resized as needed).
    fn forward(&self, input: &[f32], rows: usize, out: &mut Vec<f32>) {
        debug_assert_eq!(input.len(), rows * self.inputs);
        out.resize(rows * self.outputs, 0.0);
        // SAFETY: the pointers and strides describe row-major [rows, inputs],
        // [inputs, outputs] and [rows, outputs] buffers of exactly those lengths.
        unsafe {
            gemm::gemm(
                rows,
                self.outputs,
                self.inputs,
                out.as_mut_ptr(),
                1,
                self.outputs as isize,
                false,
                input.as_ptr(),
                1,
                self.inputs as isize,
                self.weight_t.as_ptr(),
                1,
                self.outputs as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        let width = self.outputs;
        // Chunks of whole rows, big enough to amortize scheduling.
        let rows_per_chunk = (16_384 / width).max(1);
        out.par_chunks_mut(rows_per_chunk * width)
            .for_each(|chunk| bias_activation(chunk, &self.bias, self.activation));
    }
}

/// A stack of dense layers evaluated with reused buffers.
#[derive(Debug, Clone)]
pub(crate) struct DenseStack {
    layers: Vec<Dense>,
}

thread_local! {
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl DenseStack {
    pub(crate) fn new(layers: Vec<Dense>) -> Result<Self> {
        if layers.is_empty() || layers.windows(2).any(|w| w[0].outputs != w[1].inputs) {
            return Err(Error::Shape(
                "dense layers must chain: each input size equals the previous output size".into(),
            ));
        }
        Ok(Self { layers })
    }

    /// The network applied to `input` (`[rows, inputs]`, row-major f32), as a tensor
    /// `[rows, outputs]` on `device`.
    pub(crate) fn forward(&self, input: &[f32], rows: usize, device: &Device) -> Result<Tensor> {
        SCRATCH.with(|scratch| {
            let (current, spare) = &mut *scratch.borrow_mut();
            self.layers[0].forward(input, rows, current);
            for layer in &self.layers[1..] {
                layer.forward(current, rows, spare);
                std::mem::swap(current, spare);
            }
            let outputs = self.layers[self.layers.len() - 1].outputs;
            Ok(Tensor::from_slice(&current[..], (rows, outputs), device)?)
        })
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
    bias_activation_portable(rows, bias, activation)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bias_activation_avx2(rows: &mut [f32], bias: &[f32], activation: Pointwise) {
    bias_activation_portable(rows, bias, activation)
}

/// The loop the SIMD variants recompile; written so that it vectorizes.
#[inline(always)]
fn bias_activation_portable(rows: &mut [f32], bias: &[f32], activation: Pointwise) {
    for row in rows.chunks_exact_mut(bias.len()) {
        match activation {
            Pointwise::Identity => row.iter_mut().zip(bias).for_each(|(v, b)| *v += b),
            Pointwise::Silu => row.iter_mut().zip(bias).for_each(|(v, b)| {
                let z = *v + b;
                *v = z / (1.0 + exp(-z));
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
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    f32::from_bits(((floor + 127) << 23) as u32) * e
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

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

    #[test]
    fn nan_flows_through_the_activations() {
        for act in [Pointwise::Silu, Pointwise::Tanh, Pointwise::Identity] {
            let mut v = [f32::NAN, 1.0];
            bias_activation(&mut v, &[0.0, 0.0], act);
            assert!(v[0].is_nan(), "{act:?}");
        }
    }

    /// The fused stack equals candle-nn layers to f32 rounding (the matmul summation
    /// order differs, so allow a few ulp of the activations' scale).
    #[test]
    fn matches_candle_layers() {
        let dev = Device::Cpu;
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
        let mut layers = Vec::new();
        let mut reference = Vec::new();
        let sizes = [(5, 33), (33, 17), (17, 3)];
        let acts = [Pointwise::Silu, Pointwise::Tanh, Pointwise::Identity];
        for (&(i, o), &act) in sizes.iter().zip(&acts) {
            let w = crate::random::standard_normal((o, i), DType::F32, &dev, &mut rng).unwrap();
            let b = crate::random::standard_normal(o, DType::F32, &dev, &mut rng).unwrap();
            layers.push(Dense::new(&w, &b, act).unwrap());
            reference.push((candle_nn::Linear::new(w, Some(b)), act));
        }
        let stack = DenseStack::new(layers).unwrap();
        let x = crate::random::standard_normal((300, 5), DType::F32, &dev, &mut rng).unwrap();
        let fused = stack
            .forward(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 300, &dev)
            .unwrap();
        let mut want = x;
        for (layer, act) in &reference {
            want = layer.forward(&want).unwrap();
            want = match act {
                Pointwise::Silu => want.silu().unwrap(),
                Pointwise::Tanh => want.tanh().unwrap(),
                Pointwise::Identity => want,
            };
        }
        let err = (fused - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .max(1)
            .unwrap();
        let scale = want.abs().unwrap().max_keepdim(0).unwrap().max(1).unwrap();
        let (err, scale) = (
            err.to_vec1::<f32>().unwrap()[0],
            scale.to_vec1::<f32>().unwrap()[0],
        );
        assert!(err < 1e-5 * scale.max(1.0), "max error {err} (scale {scale})");
    }
}
