//! 2-D convolution as one matrix product, differentiable to any order.
//!
//! candle 0.11.1's CPU `conv2d` backward goes through `conv_transpose2d`, a scalar loop of
//! dot products over channels that ignores `output_padding`, and the kernel gradient
//! through a convolution whose "kernel" is the whole image. Here a convolution is
//! `W · im2col(x)`: the patch extraction [`Im2Col`] and its adjoint [`Col2Im`] are two
//! linear custom ops whose backward passes are each other, and everything else is candle's
//! matmul (the `gemm` crate) with its own backward. So the input and weight gradients, and
//! the gradients of those gradients that the Fokker–Planck penalties need, are all plain
//! graph ops and big matrix products.
//!
//! Activations are laid out channels-first, `[C, B, H, W]` (not candle's `[B, C, H, W]`):
//! then `im2col` of the whole batch is one `[C·k², B·H'·W']` matrix, the convolution one
//! gemm whose output already has the `[C', B, H', W']` layout, and concatenation along
//! channels is a contiguous copy.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// The geometry of a square-kernel convolution on a `[C, B, H, W]` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Patches {
    channels: usize,
    batch: usize,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Patches {
    fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }
    fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }
    /// Rows of the patch matrix: one per (channel, ky, kx).
    fn rows(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }
    /// Columns of the patch matrix: one per (image, output y, output x).
    fn columns(&self) -> usize {
        self.batch * self.out_height() * self.out_width()
    }

    /// For each output coordinate `o` along an axis of `size`, the input coordinate of
    /// kernel tap `k`, or `None` where it falls in the zero padding.
    fn source(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.padding)
            .filter(|&i| i < size)
    }

    /// `patches[r, c] = x[channel, image, y, x]` for every (row, column); the zero padding
    /// gives zeros.
    fn extract<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let (ho, wo, k) = (self.out_height(), self.out_width(), self.kernel);
        let plane = self.height * self.width;
        let mut out = vec![T::zero(); self.rows() * self.columns()];
        out.par_chunks_mut(self.columns())
            .enumerate()
            .for_each(|(row, dst)| {
                let (c, ky, kx) = (row / (k * k), (row / k) % k, row % k);
                for b in 0..self.batch {
                    let image = &x[(c * self.batch + b) * plane..][..plane];
                    for oy in 0..ho {
                        let Some(iy) = self.source(oy, ky, self.height) else {
                            continue;
                        };
                        let src = &image[iy * self.width..][..self.width];
                        let dst = &mut dst[(b * ho + oy) * wo..][..wo];
                        for (ox, d) in dst.iter_mut().enumerate() {
                            if let Some(ix) = self.source(ox, kx, self.width) {
                                *d = src[ix];
                            }
                        }
                    }
                }
            });
        out
    }

    /// The adjoint of [`Self::extract`]: every patch entry added back to the pixel it came
    /// from (padding entries are dropped).
    fn scatter<T: WithDType>(&self, patches: &[T]) -> Vec<T> {
        let (ho, wo, k) = (self.out_height(), self.out_width(), self.kernel);
        let plane = self.height * self.width;
        let mut out = vec![T::zero(); self.channels * self.batch * plane];
        out.par_chunks_mut(self.batch * plane)
            .enumerate()
            .for_each(|(c, channel)| {
                for ky in 0..k {
                    for kx in 0..k {
                        let src = &patches[((c * k + ky) * k + kx) * self.columns()..][..self.columns()];
                        for b in 0..self.batch {
                            let image = &mut channel[b * plane..][..plane];
                            for oy in 0..ho {
                                let Some(iy) = self.source(oy, ky, self.height) else {
                                    continue;
                                };
                                let row = &mut image[iy * self.width..][..self.width];
                                let src = &src[(b * ho + oy) * wo..][..wo];
                                for (ox, &v) in src.iter().enumerate() {
                                    if let Some(ix) = self.source(ox, kx, self.width) {
                                        row[ix] += v;
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

/// The contiguous values of a CPU tensor's storage.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &'static str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op }),
    }
}

/// `[C, B, H, W] → [C·k², B·H'·W']`: the patch matrix (im2col).
struct Im2Col(Patches);

/// `[C·k², B·H'·W'] → [C, B, H, W]`: the adjoint of [`Im2Col`] (col2im).
struct Col2Im(Patches);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let shape = Shape::from((p.rows(), p.columns()));
        match storage {
            CpuStorage::F32(v) => Ok((
                CpuStorage::F32(p.extract(contiguous(v, layout, "im2col")?)),
                shape,
            )),
            CpuStorage::F64(v) => Ok((
                CpuStorage::F64(p.extract(contiguous(v, layout, "im2col")?)),
                shape,
            )),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), "im2col")),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let shape = Shape::from((p.channels, p.batch, p.height, p.width));
        match storage {
            CpuStorage::F32(v) => Ok((
                CpuStorage::F32(p.scatter(contiguous(v, layout, "col2im")?)),
                shape,
            )),
            CpuStorage::F64(v) => Ok((
                CpuStorage::F64(p.scatter(contiguous(v, layout, "col2im")?)),
                shape,
            )),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), "col2im")),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// A convolution of channels-first activations `x: [C, B, H, W]` with `weight:
/// [C', C, k, k]` (PyTorch's layout) and an optional `bias: [C']`: `[C', B, H', W']`.
///
/// f32/f64 on the CPU go through [`Im2Col`] and one matmul; other devices or types through
/// candle's `conv2d` (transposed to its `[B, C, H, W]` layout and back).
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let (c, b, h, w) = x.dims4()?;
    let (c_out, c_in, k, k_w) = weight.dims4()?;
    if c_in != c || k != k_w || stride == 0 || h + 2 * padding < k || w + 2 * padding < k {
        candle_core::bail!(
            "conv2d: input {:?} does not fit weight {:?} with stride {stride} and padding {padding}",
            x.dims(),
            weight.dims()
        );
    }
    let patches = Patches {
        channels: c,
        batch: b,
        height: h,
        width: w,
        kernel: k,
        stride,
        padding,
    };
    let (ho, wo) = (patches.out_height(), patches.out_width());
    let fast = x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64);
    let y = if !fast {
        x.transpose(0, 1)?
            .conv2d(weight, padding, stride, 1, 1)?
            .transpose(0, 1)?
            .reshape((c_out, b * ho * wo))?
    } else {
        let weight = weight.reshape((c_out, patches.rows()))?;
        if k == 1 && stride == 1 && padding == 0 {
            weight.matmul(&x.reshape((c, b * h * w))?)?
        } else {
            weight.matmul(&x.contiguous()?.apply_op1(Im2Col(patches))?)?
        }
    };
    let y = match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((c_out, 1))?)?,
        None => y,
    };
    y.reshape((c_out, b, ho, wo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn ramp(shape: &[usize], scale: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| ((i * 37 % 101) as f64 / 101.0 - 0.5) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The patch matrix against candle's own convolution, for strides 1 and 2.
    #[test]
    fn matches_candle_conv2d() {
        for (k, stride, padding) in [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 1, 0)] {
            let x = ramp(&[3, 2, 7, 6], 2.0);
            let w = ramp(&[4, 3, k, k], 1.0);
            let bias = ramp(&[4], 1.0);
            let ours = conv2d(&x, &w, Some(&bias), stride, padding).unwrap();
            let theirs = x
                .transpose(0, 1)
                .unwrap()
                .conv2d(&w, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
                .unwrap()
                .transpose(0, 1)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let gap = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
            assert!(gap.to_scalar::<f64>().unwrap() < 1e-12, "k {k} stride {stride}");
        }
    }

    /// `⟨im2col(x), y⟩ = ⟨x, col2im(y)⟩`: the two ops are adjoint, so each is the other's
    /// exact backward.
    #[test]
    fn im2col_and_col2im_are_adjoint() {
        let p = Patches {
            channels: 2,
            batch: 3,
            height: 5,
            width: 4,
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let x = ramp(&[2, 3, 5, 4], 1.0);
        let y = ramp(&[p.rows(), p.columns()], 3.0);
        let ax = x.apply_op1(Im2Col(p)).unwrap();
        let aty = y.apply_op1(Col2Im(p)).unwrap();
        let lhs = (ax * &y).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let rhs = (aty * &x).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!((lhs - rhs).abs() < 1e-12 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
    }

    /// Input and weight gradients against central differences, through a stride-2 layer.
    #[test]
    fn gradients_match_finite_differences() {
        let x = Var::from_tensor(&ramp(&[2, 2, 5, 5], 1.0)).unwrap();
        let w = Var::from_tensor(&ramp(&[3, 2, 3, 3], 1.0)).unwrap();
        let probe = ramp(&[3, 2, 3, 3], 1.0);
        let loss = |x: &Tensor, w: &Tensor| -> Tensor {
            (conv2d(x, w, None, 2, 1).unwrap().sqr().unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss(x.as_tensor(), w.as_tensor()).backward().unwrap();
        let h = 1e-6;
        for (var, other_is_x) in [(&x, false), (&w, true)] {
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in (0..base.len()).step_by(7) {
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    let moved = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
                    let value = if other_is_x {
                        loss(x.as_tensor(), &moved)
                    } else {
                        loss(&moved, w.as_tensor())
                    };
                    value.to_scalar::<f64>().unwrap()
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "entry {i}: {fd} vs {}",
                    g[i]
                );
            }
        }
        assert_eq!(x.dtype(), DType::F64);
    }
}
