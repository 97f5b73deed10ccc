//! Per-channel bias and scale on `[B, C, H, W]` activations, as ops with one-pass
//! backward passes.
//!
//! Through `broadcast_add` / `broadcast_mul` with a `[1, C, 1, 1]` tensor, candle's
//! backward reduces the gradient over three broadcast dimensions with a strided reduction,
//! which took a sixth of a U-Net training step. Here the reduction is one pass over
//! contiguous channel planes ([`ChannelSum`]), and its own backward is a plain broadcast,
//! so derivatives of any order stay available.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::training::Real;

/// Whether the fused image ops take `x`: f32 or f64 on the CPU.
pub(crate) fn fast(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `y[b, c, …] + bias[c]`.
pub(crate) fn add_bias(y: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if fast(y) && bias.dtype() == y.dtype() && y.rank() >= 2 {
        y.contiguous()?.apply_op2(&bias.contiguous()?, ChannelBias)
    } else {
        y.broadcast_add(&bias.reshape(channel_shape(y)?)?)
    }
}

/// `y[b, c, …] · scale[c]`.
pub(crate) fn scale(y: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    if fast(y) && scale.dtype() == y.dtype() && y.rank() >= 2 {
        y.contiguous()?.apply_op2(&scale.contiguous()?, ChannelScale)
    } else {
        y.broadcast_mul(&scale.reshape(channel_shape(y)?)?)
    }
}

/// `[1, C, 1, …]` for a `[B, C, …]` tensor.
fn channel_shape(y: &Tensor) -> candle_core::Result<Vec<usize>> {
    let mut shape = vec![1; y.rank()];
    shape[1] = y.dim(1)?;
    Ok(shape)
}

/// `(batch, channels, plane)` of a contiguous `[B, C, …]` layout, and its values.
fn planes<'a, T>(
    data: &'a [T],
    layout: &Layout,
    op: &'static str,
) -> candle_core::Result<(&'a [T], usize, usize, usize)> {
    let dims = layout.shape().dims();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(candle_core::Error::RequiresContiguous { op });
    };
    if dims.len() < 2 {
        candle_core::bail!("{op}: expected [B, C, ...], got {dims:?}");
    }
    Ok((&data[start..end], dims[0], dims[1], dims[2..].iter().product()))
}

/// `per_channel` of the right length, or an error.
fn channel_values<'a, T>(
    data: &'a [T],
    layout: &Layout,
    channels: usize,
    op: &'static str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) if end - start == channels && layout.shape().rank() == 1 => Ok(&data[start..end]),
        _ => candle_core::bail!(
            "{op}: expected a contiguous [{channels}] tensor, got {:?}",
            layout.shape()
        ),
    }
}

/// `y[b, c, p] ∘ v[c]` with `∘` = `op`.
fn per_channel<T: Real>(
    y: &[T],
    channels: usize,
    plane: usize,
    v: &[T],
    op: impl Fn(T, T) -> T + Sync,
) -> Vec<T> {
    let mut out = y.to_vec();
    out.par_chunks_mut(plane.max(1)).enumerate().for_each(|(i, p)| {
        let v = v[i % channels];
        p.iter_mut().for_each(|e| *e = op(*e, v));
    });
    out
}

macro_rules! binary_channel_op {
    ($name:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, $op:expr) => {{
        match ($s1, $s2) {
            (CpuStorage::F32(y), CpuStorage::F32(v)) => {
                let (y, _, c, p) = planes(y, $l1, $name)?;
                let v = channel_values(v, $l2, c, $name)?;
                Ok((CpuStorage::F32(per_channel(y, c, p, v, $op)), $l1.shape().clone()))
            }
            (CpuStorage::F64(y), CpuStorage::F64(v)) => {
                let (y, _, c, p) = planes(y, $l1, $name)?;
                let v = channel_values(v, $l2, c, $name)?;
                Ok((CpuStorage::F64(per_channel(y, c, p, v, $op)), $l1.shape().clone()))
            }
            (a, b) => candle_core::bail!(
                "{}: needs two f32 or two f64 tensors, got {:?} and {:?}",
                $name,
                a.dtype(),
                b.dtype()
            ),
        }
    }};
}

/// `y + bias[c]`.
struct ChannelBias;
/// `y · scale[c]`.
struct ChannelScale;
/// `Σ_{b, p} y[b, c, p]`: `[B, C, …] → [C]`.
struct ChannelSum;

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "channel-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        binary_channel_op!(self.name(), s1, l1, s2, l2, |a, b| a + b)
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(channel_sum(grad)?)))
    }
}

impl CustomOp2 for ChannelScale {
    fn name(&self) -> &'static str {
        "channel-scale"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        binary_channel_op!(self.name(), s1, l1, s2, l2, |a, b| a * b)
    }

    fn bwd(
        &self,
        y: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self::scale(grad, scale)?), Some(channel_sum(&(grad * y)?)?)))
    }
}

fn channel_sum(y: &Tensor) -> candle_core::Result<Tensor> {
    if fast(y) {
        y.contiguous()?.apply_op1(ChannelSum)
    } else {
        let mut dims: Vec<usize> = (0..y.rank()).filter(|&d| d != 1).collect();
        dims.sort_unstable();
        y.sum(dims)
    }
}

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn sum<T: Real>(y: &[T], channels: usize, plane: usize) -> Vec<T> {
            let mut out = vec![T::zero(); channels];
            for (i, p) in y.chunks_exact(plane.max(1)).enumerate() {
                out[i % channels] = out[i % channels] + p.iter().fold(T::zero(), |a, &b| a + b);
            }
            out
        }
        match storage {
            CpuStorage::F32(y) => {
                let (y, _, c, p) = planes(y, layout, self.name())?;
                Ok((CpuStorage::F32(sum(y, c, p)), Shape::from(c)))
            }
            CpuStorage::F64(y) => {
                let (y, _, c, p) = planes(y, layout, self.name())?;
                Ok((CpuStorage::F64(sum(y, c, p)), Shape::from(c)))
            }
            other => candle_core::bail!("channel-sum: needs f32 or f64, got {:?}", other.dtype()),
        }
    }

    /// The gradient of a sum is the incoming gradient broadcast back.
    fn bwd(&self, y: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.reshape(channel_shape(y)?)?.broadcast_as(y.shape())?))
    }
}

/// GroupNorm without its affine part: each (image, group) row of `x: [B, C, …]` centred
/// and divided by `√(var + eps)`.
///
/// The forward pass is one op (candle ops take seven), and so is its backward
/// ([`GroupNormBackward`]), whose own derivatives are plain candle ops and itself, so the
/// Fokker–Planck penalties can differentiate it to any order.
pub(crate) fn group_normalize(x: &Tensor, groups: usize, eps: f64) -> candle_core::Result<Tensor> {
    if fast(x) {
        x.contiguous()?.apply_op1(GroupNormalize { groups, eps })
    } else {
        let (rows, n) = group_rows(x, groups)?;
        let grouped = x.reshape((rows, n))?;
        let centered = grouped.broadcast_sub(&grouped.mean_keepdim(1)?)?;
        let std = (centered.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?;
        centered.broadcast_div(&std)?.reshape(x.shape())
    }
}

/// `(B·G, C/G·H·W)`: the rows GroupNorm normalizes.
fn group_rows(x: &Tensor, groups: usize) -> candle_core::Result<(usize, usize)> {
    let n = row_length(x.shape(), groups)?;
    Ok((x.elem_count() / n.max(1), n))
}

/// `C/G·H·W`, the length of each row GroupNorm normalizes, for a `[B, C, …]` shape.
fn row_length(shape: &Shape, groups: usize) -> candle_core::Result<usize> {
    let dims = shape.dims();
    if dims.len() < 2 || groups == 0 || dims[1] % groups != 0 {
        candle_core::bail!("group norm: {groups} groups do not divide the channels of {dims:?}");
    }
    Ok(shape.elem_count() / (dims[0] * groups).max(1))
}

/// A row's mean and `1/√(var + eps)` (two passes, so no cancellation).
fn mean_and_inverse_std<T: Real>(row: &[T], count: T, eps: T) -> (T, T) {
    let mean = row.iter().fold(T::zero(), |a, &v| a + v) / count;
    let var = row.iter().fold(T::zero(), |a, &v| a + (v - mean) * (v - mean)) / count;
    (mean, T::one() / (var + eps).sqrt())
}

struct GroupNormalize {
    groups: usize,
    eps: f64,
}

impl CustomOp1 for GroupNormalize {
    fn name(&self) -> &'static str {
        "group-normalize"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn normalize<T: Real>(x: &[T], n: usize, eps: f64) -> Vec<T> {
            let mut out = x.to_vec();
            let eps = T::from(eps).unwrap_or_else(T::zero);
            let count = T::from(n).unwrap_or_else(T::one);
            out.par_chunks_mut(n.max(1)).for_each(|row| {
                let (mean, inv) = mean_and_inverse_std(row, count, eps);
                row.iter_mut().for_each(|v| *v = (*v - mean) * inv);
            });
            out
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::RequiresContiguous { op: self.name() });
        };
        let n = row_length(layout.shape(), self.groups)?;
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(normalize(&x[start..end], n, self.eps)),
            CpuStorage::F64(x) => CpuStorage::F64(normalize(&x[start..end], n, self.eps)),
            other => candle_core::bail!("group norm: needs f32 or f64, got {:?}", other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _normed: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let backward = GroupNormBackward {
            groups: self.groups,
            eps: self.eps,
        };
        Ok(Some(x.apply_op2(&grad.contiguous()?, backward)?))
    }
}

/// GroupNorm's backward pass as one op: `x̄ = J(x)·ḡ = (ḡ − mean ḡ − x̂·mean(ḡx̂))/σ` per
/// row. Its own derivatives (second order, for the penalties) are plain candle ops and
/// this op again: `J` is symmetric, so `∂⟨x̄, G⟩/∂ḡ = J·G`, and
/// `∂⟨x̄, G⟩/∂x = J·v/σ − m·x̂/σ²` with `v = −mean(x̂G)·ḡ − mean(ḡx̂)·G` and
/// `m = mean(ḡG) − mean(ḡ)mean(G) − mean(ḡx̂)mean(x̂G)` (from `dσ = ⟨x̂/n, dx⟩` and
/// `dx̂ = J·dx`; checked against plain-op GroupNorm to third order in the tests).
struct GroupNormBackward {
    groups: usize,
    eps: f64,
}

impl CustomOp2 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "group-normalize-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn backward<T: Real>(x: &[T], g: &[T], n: usize, eps: f64) -> Vec<T> {
            let mut out = vec![T::zero(); x.len()];
            let eps = T::from(eps).unwrap_or_else(T::zero);
            let count = T::from(n).unwrap_or_else(T::one);
            out.par_chunks_mut(n.max(1))
                .zip(x.par_chunks(n.max(1)).zip(g.par_chunks(n.max(1))))
                .for_each(|(out, (x, g))| {
                    let (mean, inv) = mean_and_inverse_std(x, count, eps);
                    let g_mean = g.iter().fold(T::zero(), |a, &v| a + v) / count;
                    let gx_mean = x
                        .iter()
                        .zip(g)
                        .fold(T::zero(), |a, (&v, &w)| a + (v - mean) * inv * w)
                        / count;
                    for ((o, &v), &w) in out.iter_mut().zip(x).zip(g) {
                        *o = (w - g_mean - (v - mean) * inv * gx_mean) * inv;
                    }
                });
            out
        }
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "group norm backward: x {:?} and gradient {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let n = row_length(l1.shape(), self.groups)?;
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            return Err(candle_core::Error::RequiresContiguous { op: self.name() });
        };
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(backward(&x[a0..a1], &g[b0..b1], n, self.eps))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(backward(&x[a0..a1], &g[b0..b1], n, self.eps))
            }
            (a, b) => candle_core::bail!(
                "group norm backward: needs two f32 or two f64 tensors, got {:?} and {:?}",
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _x_bar: &Tensor,
        upstream: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, n) = group_rows(x, self.groups)?;
        let upstream = upstream.contiguous()?;
        let again = |v: &Tensor| {
            x.apply_op2(
                &v.contiguous()?,
                GroupNormBackward {
                    groups: self.groups,
                    eps: self.eps,
                },
            )
        };
        let wrt_g = again(&upstream)?;
        // Per row: x̂, σ, and the means the derivative needs.
        let xr = x.reshape((rows, n))?;
        let centered = xr.broadcast_sub(&xr.mean_keepdim(1)?)?;
        let std = (centered.sqr()?.mean_keepdim(1)? + self.eps)?.sqrt()?;
        let xh = group_normalize(x, self.groups, self.eps)?.reshape((rows, n))?;
        let (gr, ur) = (g.reshape((rows, n))?, upstream.reshape((rows, n))?);
        let c = (&gr * &xh)?.mean_keepdim(1)?;
        let xu = (&xh * &ur)?.mean_keepdim(1)?;
        let m =
            (((&gr * &ur)?.mean_keepdim(1)? - (gr.mean_keepdim(1)? * ur.mean_keepdim(1)?)?)? - (&c * &xu)?)?;
        let v = (gr.broadcast_mul(&xu)? + ur.broadcast_mul(&c)?)?.neg()?;
        let jv = again(&v.reshape(x.shape())?)?.reshape((rows, n))?;
        let wrt_x = (jv.broadcast_div(&std)? - xh.broadcast_mul(&(m / std.sqr()?)?)?)?;
        Ok((Some(wrt_x.reshape(x.shape())?), Some(wrt_g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn ramp(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|i| (i * 29 % 53) as f64 / 53.0 - 0.5).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_gap(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Values and first and second derivatives against the same computation in plain
    /// broadcast ops.
    #[test]
    fn agree_with_broadcast_ops_to_second_order() {
        let y = Var::from_tensor(&ramp(&[2, 3, 2, 2])).unwrap();
        let b = Var::from_tensor(&ramp(&[3])).unwrap();
        let s = Var::from_tensor(&(ramp(&[3]) + 1.0).unwrap()).unwrap();
        let q = ramp(&[2, 3, 2, 2]);
        let ours = |y: &Tensor| add_bias(&scale(y, &s).unwrap(), &b).unwrap();
        let plain = |y: &Tensor| {
            y.broadcast_mul(&s.reshape((1, 3, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&b.reshape((1, 3, 1, 1)).unwrap())
                .unwrap()
        };
        // f = Σ q·g(y)², then h = ‖∂f/∂y‖²: its gradient takes second derivatives.
        let h = |g: &dyn Fn(&Tensor) -> Tensor| {
            let f = (g(y.as_tensor()).sqr().unwrap() * &q).unwrap().sum_all().unwrap();
            let gy = f.backward().unwrap().get(y.as_tensor()).unwrap().clone();
            (f, gy.sqr().unwrap().sum_all().unwrap())
        };
        let (f1, h1) = h(&ours);
        let (f2, h2) = h(&plain);
        assert!(max_gap(&f1, &f2) < 1e-12);
        let (g1, g2) = (h1.backward().unwrap(), h2.backward().unwrap());
        for var in [&y, &b, &s] {
            let (a, c) = (g1.get(var.as_tensor()).unwrap(), g2.get(var.as_tensor()).unwrap());
            assert!(max_gap(a, c) < 1e-12, "{a} vs {c}");
        }
    }

    /// The fused GroupNorm against the plain-op one (its fallback), through third order.
    #[test]
    fn group_normalize_agrees_with_plain_ops_to_third_order() {
        let x = Var::from_tensor(&(ramp(&[2, 4, 3, 3]) * 3.0).unwrap()).unwrap();
        let q = ramp(&[2, 4, 3, 3]);
        let plain = |x: &Tensor| {
            let grouped = x.reshape((4, 18)).unwrap();
            let centered = grouped.broadcast_sub(&grouped.mean_keepdim(1).unwrap()).unwrap();
            let std = (centered.sqr().unwrap().mean_keepdim(1).unwrap() + 1e-5)
                .unwrap()
                .sqrt()
                .unwrap();
            centered.broadcast_div(&std).unwrap().reshape(x.shape()).unwrap()
        };
        let fused = |x: &Tensor| group_normalize(x, 2, 1e-5).unwrap();
        let h = |g: &dyn Fn(&Tensor) -> Tensor| {
            let f = (g(x.as_tensor()).sin().unwrap() * &q).unwrap().sum_all().unwrap();
            let gx = f.backward().unwrap().get(x.as_tensor()).unwrap().clone();
            (g(x.as_tensor()), gx.clone(), gx.sqr().unwrap().sum_all().unwrap())
        };
        let (y1, gx1, h1) = h(&fused);
        let (y2, gx2, h2) = h(&plain);
        assert!(max_gap(&y1, &y2) < 1e-12);
        assert!(max_gap(&gx1, &gx2) < 1e-10);
        let (a, b) = (h1.backward().unwrap(), h2.backward().unwrap());
        let (a, b) = (a.get(x.as_tensor()).unwrap(), b.get(x.as_tensor()).unwrap());
        assert!(max_gap(a, b) < 1e-9, "{a} vs {b}");
        // Third order: the gradient of ‖∂h/∂x‖², through the backward op's own backward.
        let third = |g: &dyn Fn(&Tensor) -> Tensor| {
            let (_, _, h) = h(g);
            let hx = h.backward().unwrap().get(x.as_tensor()).unwrap().clone();
            let k = (hx.sqr().unwrap() * &q).unwrap().sum_all().unwrap();
            k.backward().unwrap().get(x.as_tensor()).unwrap().clone()
        };
        let (a, b) = (third(&fused), third(&plain));
        assert!(
            max_gap(&a, &b) < 1e-7 * (1.0 + b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()),
            "{a} vs {b}"
        );
    }
}
