//! 2-D convolution as three fused ops that are each other's derivatives.
//!
//! candle 0.11.1's CPU `conv2d` backward goes through `conv_transpose2d`, a scalar loop of
//! dot products over channels that ignores `output_padding`, and the kernel gradient
//! through a convolution whose "kernel" is the whole image. Writing a convolution as
//! `W · im2col(x)` in candle ops instead is exact but keeps the patch matrix (9× the
//! activation) in the graph, and candle's backward zero-fills and adds a gradient of that
//! size for every layer: a U-Net DSM step spent a quarter of its time clearing fresh pages.
//!
//! So a convolution is a custom op, and so are its two adjoints:
//!
//! * [`Conv`]: `y = conv(x, w)`;
//! * [`ConvInputAdjoint`]: `x̄ = convᵀ_w(ȳ)`, the gradient in `x` (a transposed convolution);
//! * [`ConvWeightAdjoint`]: `w̄ = Σ_b ȳ_b · im2col(x_b)ᵀ`, the gradient in `w`.
//!
//! All three are bilinear, and the derivatives of each are the other two, so backward
//! passes of any order stay inside these ops. Each works image by image (images in
//! parallel, one patch matrix per thread, reused), so nothing bigger than an activation is
//! ever allocated, and the products are the `gemm` crate's.
//!
//! Activations are candle's (and PyTorch's) `[B, C, H, W]`: each image is contiguous, so
//! each thread reads and writes images of its own.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::training::{matmul, Real};

/// The geometry of a square-kernel convolution of `[B, C, H, W]` activations with a
/// `[C', C, k, k]` kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    c_in: usize,
    c_out: usize,
    batch: usize,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }
    fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }
    /// Rows of an image's patch matrix: one per (input channel, ky, kx).
    fn rows(&self) -> usize {
        self.c_in * self.kernel * self.kernel
    }
    /// Columns of an image's patch matrix: one per output pixel.
    fn columns(&self) -> usize {
        self.out_height() * self.out_width()
    }
    fn input_shape(&self) -> Shape {
        Shape::from((self.batch, self.c_in, self.height, self.width))
    }
    fn output_shape(&self) -> Shape {
        Shape::from((self.batch, self.c_out, self.out_height(), self.out_width()))
    }
    fn weight_shape(&self) -> Shape {
        Shape::from((self.c_out, self.c_in, self.kernel, self.kernel))
    }

    /// The output coordinates `lo..hi` whose input coordinate for kernel tap `k` lies
    /// inside an axis of `size` (the rest read the zero padding).
    fn valid(&self, k: usize, size: usize, outputs: usize) -> (usize, usize) {
        let lo = self.padding.saturating_sub(k).div_ceil(self.stride);
        let hi = (size + self.padding)
            .saturating_sub(k)
            .div_ceil(self.stride)
            .min(outputs);
        (lo.min(hi), hi)
    }

    /// Image `b`'s patch matrix `[rows, columns]` (im2col) into `cols`.
    fn extract<T: Real>(&self, x: &[T], b: usize, cols: &mut [T]) {
        let (ho, wo, k, s) = (self.out_height(), self.out_width(), self.kernel, self.stride);
        let plane = self.height * self.width;
        let image = &x[b * self.c_in * plane..][..self.c_in * plane];
        for (row, dst) in cols.chunks_exact_mut(ho * wo).enumerate() {
            let (c, ky, kx) = (row / (k * k), (row / k) % k, row % k);
            let (y_lo, y_hi) = self.valid(ky, self.height, ho);
            let (x_lo, x_hi) = self.valid(kx, self.width, wo);
            dst[..y_lo * wo].fill(T::zero());
            dst[y_hi * wo..].fill(T::zero());
            if s == 1 && wo == self.width {
                // A "same" convolution: the valid rows are one contiguous block of the
                // image shifted by kx − padding, so copy it at once (per-row copies of a few
                // dozen values were mostly call overhead) and zero the columns that read
                // into the neighbouring row.
                let shift = kx as isize - self.padding as isize;
                let rows = &mut dst[y_lo * wo..y_hi * wo];
                let start = (c * plane + (y_lo + ky - self.padding) * self.width) as isize + shift;
                let (lo, hi) = (start.max(0) as usize, (start + rows.len() as isize) as usize);
                let skip = (lo as isize - start) as usize;
                let len = (hi.min(image.len()) - lo).min(rows.len() - skip);
                rows[skip..skip + len].copy_from_slice(&image[lo..lo + len]);
                rows[skip + len..].fill(T::zero());
                rows[..skip].fill(T::zero());
                for row in rows.chunks_exact_mut(wo) {
                    row[..x_lo].fill(T::zero());
                    row[x_hi..].fill(T::zero());
                }
                continue;
            }
            for oy in y_lo..y_hi {
                let iy = oy * s + ky - self.padding;
                let src = &image[c * plane + iy * self.width..][..self.width];
                let dst = &mut dst[oy * wo..][..wo];
                dst[..x_lo].fill(T::zero());
                dst[x_hi..].fill(T::zero());
                let first = x_lo * s + kx - self.padding;
                if s == 1 {
                    dst[x_lo..x_hi].copy_from_slice(&src[first..first + x_hi - x_lo]);
                } else {
                    for (d, &v) in dst[x_lo..x_hi].iter_mut().zip(src[first..].iter().step_by(s)) {
                        *d = v;
                    }
                }
            }
        }
    }

    /// Adds a patch matrix back into the pixels of the image `x` (`[C, H, W]`) it came
    /// from (col2im).
    fn scatter<T: Real>(&self, cols: &[T], image: &mut [T]) {
        let (ho, wo, k, s) = (self.out_height(), self.out_width(), self.kernel, self.stride);
        let plane = self.height * self.width;
        for (row, src) in cols.chunks_exact(ho * wo).enumerate() {
            let (c, ky, kx) = (row / (k * k), (row / k) % k, row % k);
            let (y_lo, y_hi) = self.valid(ky, self.height, ho);
            let (x_lo, x_hi) = self.valid(kx, self.width, wo);
            for oy in y_lo..y_hi {
                let iy = oy * s + ky - self.padding;
                let dst = &mut image[c * plane + iy * self.width..][..self.width];
                let first = x_lo * s + kx - self.padding;
                let src = &src[oy * wo + x_lo..oy * wo + x_hi];
                for (d, &v) in dst[first..].iter_mut().step_by(s).zip(src) {
                    *d = *d + v;
                }
            }
        }
    }

    /// `y = conv(x, w)`: per image, `y_b[C', P] = W[C', K] · cols_b[K, P]`.
    fn forward<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let (p, k) = (self.columns(), self.rows());
        let mut y = vec![T::zero(); self.output_shape().elem_count()];
        y.par_chunks_mut(self.c_out * p).enumerate().for_each_init(
            || vec![T::zero(); k * p],
            |cols, (b, y_b)| {
                self.extract(x, b, cols);
                // SAFETY: y_b is [C', P], W [C', K] and cols [K, P], all row-major.
                unsafe { matmul((self.c_out, p, k), y_b, false, w, (1, k), cols, (1, p)) };
            },
        );
        y
    }

    /// `x̄ = convᵀ_w(ȳ)`: per image, `cols_b = Wᵀ · ȳ_b`, scattered back (col2im).
    fn input_adjoint<T: Real>(&self, y_bar: &[T], w: &[T]) -> Vec<T> {
        let (p, k) = (self.columns(), self.rows());
        let mut x_bar = vec![T::zero(); self.input_shape().elem_count()];
        x_bar
            .par_chunks_mut(self.c_in * self.height * self.width)
            .enumerate()
            .for_each_init(
                || vec![T::zero(); k * p],
                |cols, (b, x_b)| {
                    let y_b = &y_bar[b * self.c_out * p..][..self.c_out * p];
                    // SAFETY: Wᵀ[K, C'] reads w[c'·K + r]; ȳ_b is [C', P] row-major.
                    unsafe { matmul((k, p, self.c_out), cols, false, w, (k, 1), y_b, (1, p)) };
                    self.scatter(cols, x_b);
                },
            );
        x_bar
    }

    /// `w̄ = Σ_b ȳ_b · cols_bᵀ`, summed over images in per-thread partial sums.
    fn weight_adjoint<T: Real>(&self, x: &[T], y_bar: &[T]) -> Vec<T> {
        let (p, k) = (self.columns(), self.rows());
        let threads = rayon::current_num_threads().clamp(1, self.batch);
        let chunk = self.batch.div_ceil(threads);
        let partials: Vec<Vec<T>> = (0..threads)
            .into_par_iter()
            .map(|part| {
                let mut w_bar = vec![T::zero(); self.c_out * k];
                let mut cols = vec![T::zero(); k * p];
                for b in part * chunk..((part + 1) * chunk).min(self.batch) {
                    self.extract(x, b, &mut cols);
                    // SAFETY: ȳ_b is [C', P] row-major; cols_bᵀ[P, K] reads cols[r·P + j].
                    unsafe {
                        matmul(
                            (self.c_out, k, p),
                            &mut w_bar,
                            true,
                            &y_bar[b * self.c_out * p..][..self.c_out * p],
                            (1, p),
                            &cols,
                            (p, 1),
                        )
                    };
                }
                w_bar
            })
            .collect();
        let mut total = vec![T::zero(); self.c_out * k];
        for partial in partials {
            total.iter_mut().zip(partial).for_each(|(t, v)| *t = *t + v);
        }
        total
    }
}

/// The contiguous values of a CPU tensor's storage, checked against `shape`.
fn values<'a, T>(
    data: &'a [T],
    layout: &Layout,
    shape: &Shape,
    op: &'static str,
) -> candle_core::Result<&'a [T]> {
    if layout.shape() != shape {
        candle_core::bail!("{op}: expected shape {shape:?}, got {:?}", layout.shape());
    }
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op }),
    }
}

/// Runs `f` on the two operands' values as f32 or f64 slices of the expected shapes.
macro_rules! dispatch {
    ($op:expr, $s1:expr, $l1:expr, $shape1:expr, $s2:expr, $l2:expr, $shape2:expr, $out:expr, |$a:ident, $b:ident| $f:expr) => {{
        let name = $op;
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let ($a, $b) = (values(a, $l1, &$shape1, name)?, values(b, $l2, &$shape2, name)?);
                Ok((CpuStorage::F32($f), $out))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let ($a, $b) = (values(a, $l1, &$shape1, name)?, values(b, $l2, &$shape2, name)?);
                Ok((CpuStorage::F64($f), $out))
            }
            (a, b) => candle_core::bail!(
                "{name}: needs two f32 or two f64 tensors, got {:?} and {:?}",
                a.dtype(),
                b.dtype()
            ),
        }
    }};
}

/// `y = conv(x, w)` on `(x, w)`.
struct Conv(Geometry);
/// `x̄ = convᵀ_w(ȳ)` on `(ȳ, w)`.
struct ConvInputAdjoint(Geometry);
/// `w̄ = Σ_b ȳ_b · im2col(x_b)ᵀ` on `(x, ȳ)`.
struct ConvWeightAdjoint(Geometry);

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        dispatch!(
            self.name(),
            s1,
            l1,
            g.input_shape(),
            s2,
            l2,
            g.weight_shape(),
            g.output_shape(),
            |x, w| g.forward(x, w)
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        y_bar: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let y_bar = y_bar.contiguous()?;
        Ok((
            Some(y_bar.apply_op2(w, ConvInputAdjoint(self.0))?),
            Some(x.apply_op2(&y_bar, ConvWeightAdjoint(self.0))?),
        ))
    }
}

impl CustomOp2 for ConvInputAdjoint {
    fn name(&self) -> &'static str {
        "conv2d-input-adjoint"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        dispatch!(
            self.name(),
            s1,
            l1,
            g.output_shape(),
            s2,
            l2,
            g.weight_shape(),
            g.input_shape(),
            |y_bar, w| g.input_adjoint(y_bar, w)
        )
    }

    /// `⟨convᵀ_w(ȳ), X⟩ = ⟨ȳ, conv(X, w)⟩`: the gradient in `ȳ` is `conv(X, w)`, in `w` the
    /// weight adjoint of `(X, ȳ)`.
    fn bwd(
        &self,
        y_bar: &Tensor,
        w: &Tensor,
        _x_bar: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        Ok((
            Some(grad.apply_op2(w, Conv(self.0))?),
            Some(grad.apply_op2(y_bar, ConvWeightAdjoint(self.0))?),
        ))
    }
}

impl CustomOp2 for ConvWeightAdjoint {
    fn name(&self) -> &'static str {
        "conv2d-weight-adjoint"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        dispatch!(
            self.name(),
            s1,
            l1,
            g.input_shape(),
            s2,
            l2,
            g.output_shape(),
            g.weight_shape(),
            |x, y_bar| g.weight_adjoint(x, y_bar)
        )
    }

    /// `⟨w̄(x, ȳ), W⟩ = ⟨ȳ, conv(x, W)⟩ = ⟨x, convᵀ_W(ȳ)⟩`.
    fn bwd(
        &self,
        x: &Tensor,
        y_bar: &Tensor,
        _w_bar: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        Ok((
            Some(y_bar.contiguous()?.apply_op2(&grad, ConvInputAdjoint(self.0))?),
            Some(x.apply_op2(&grad, Conv(self.0))?),
        ))
    }
}

/// A convolution of `x: [B, C, H, W]` with `weight: [C', C, k, k]` and an optional
/// `bias: [C']` (PyTorch's layouts): `[B, C', H', W']`.
///
/// f32/f64 on the CPU go through [`Conv`]; other devices or types through candle's
/// `conv2d`.
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (c_out, c_in, k, k_w) = weight.dims4()?;
    if c_in != c || k != k_w || stride == 0 || h + 2 * padding < k || w + 2 * padding < k {
        candle_core::bail!(
            "conv2d: input {:?} does not fit weight {:?} with stride {stride} and padding {padding}",
            x.dims(),
            weight.dims()
        );
    }
    let geometry = Geometry {
        c_in,
        c_out,
        batch: b,
        height: h,
        width: w,
        kernel: k,
        stride,
        padding,
    };
    let y = if super::channels::fast(x) && weight.dtype() == x.dtype() {
        x.contiguous()?.apply_op2(&weight.contiguous()?, Conv(geometry))?
    } else {
        x.conv2d(weight, padding, stride, 1, 1)?
    };
    match bias {
        Some(bias) => super::channels::add_bias(&y, bias),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn ramp(shape: &[usize], scale: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| ((i * 37 % 101) as f64 / 101.0 - 0.5) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn dot(a: &Tensor, b: &Tensor) -> f64 {
        (a * b).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    }

    const SETTINGS: [(usize, usize, usize); 4] = [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 1, 0)];

    /// Against candle's own convolution, for strides 1 and 2, with and without padding.
    #[test]
    fn matches_candle_conv2d() {
        for (k, stride, padding) in SETTINGS {
            let x = ramp(&[2, 3, 7, 6], 2.0);
            let w = ramp(&[4, 3, k, k], 1.0);
            let bias = ramp(&[4], 1.0);
            let ours = conv2d(&x, &w, Some(&bias), stride, padding).unwrap();
            let theirs = x
                .conv2d(&w, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let gap = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
            assert!(gap.to_scalar::<f64>().unwrap() < 1e-12, "k {k} stride {stride}");
        }
    }

    /// `⟨conv(x, w), ȳ⟩ = ⟨x, convᵀ_w(ȳ)⟩ = ⟨w, w̄(x, ȳ)⟩`: the three ops are adjoint, which
    /// is what makes each the exact backward of the others.
    #[test]
    fn the_three_ops_are_adjoint() {
        for (k, stride, padding) in SETTINGS {
            let g = Geometry {
                c_in: 2,
                c_out: 3,
                batch: 3,
                height: 5,
                width: 4,
                kernel: k,
                stride,
                padding,
            };
            let x = ramp(&[3, 2, 5, 4], 1.0);
            let w = ramp(&[3, 2, k, k], 2.0);
            let y_bar = ramp(g.output_shape().dims(), 3.0);
            let y = x.apply_op2(&w, Conv(g)).unwrap();
            let x_bar = y_bar.apply_op2(&w, ConvInputAdjoint(g)).unwrap();
            let w_bar = x.apply_op2(&y_bar, ConvWeightAdjoint(g)).unwrap();
            let (a, b, c) = (dot(&y, &y_bar), dot(&x, &x_bar), dot(&w, &w_bar));
            assert!((a - b).abs() < 1e-12 * a.abs().max(1.0), "{a} vs {b}");
            assert!((a - c).abs() < 1e-12 * a.abs().max(1.0), "{a} vs {c}");
        }
    }

    /// First and second derivatives through a stride-2 layer against central differences:
    /// `L = Σ q·conv(x, w)²` and `M = ‖∂L/∂x‖²`, whose weight gradient runs every op's
    /// backward.
    #[test]
    fn gradients_match_finite_differences() {
        let x = Var::from_tensor(&ramp(&[2, 2, 5, 5], 1.0)).unwrap();
        let w = Var::from_tensor(&ramp(&[3, 2, 3, 3], 1.0)).unwrap();
        let q = ramp(&[2, 3, 3, 3], 1.0);
        let loss = |x: &Tensor, w: &Tensor| {
            (conv2d(x, w, None, 2, 1).unwrap().sqr().unwrap() * &q)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let second = |x: &Tensor, w: &Tensor| {
            let l = loss(x, w);
            let gx = l.backward().unwrap().get(x).unwrap().clone();
            gx.sqr().unwrap().sum_all().unwrap()
        };
        let h = 1e-6;
        for (f, name) in [
            (&loss as &dyn Fn(&Tensor, &Tensor) -> Tensor, "L"),
            (&second, "M"),
        ] {
            let grads = f(x.as_tensor(), w.as_tensor()).backward().unwrap();
            for var in [&x, &w] {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                let base = var.as_tensor().copy().unwrap();
                for i in (0..g.len()).step_by(5) {
                    let at = |delta: f64| {
                        let mut v = base.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                        v[i] += delta;
                        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                            .unwrap();
                        let value = f(x.as_tensor(), w.as_tensor()).to_scalar::<f64>().unwrap();
                        var.set(&base).unwrap();
                        value
                    };
                    let fd = (at(h) - at(-h)) / (2.0 * h);
                    assert!(
                        (fd - g[i]).abs() < 1e-5 * (1.0 + fd.abs()),
                        "{name} entry {i}: {fd} vs {}",
                        g[i]
                    );
                }
            }
        }
    }
}
