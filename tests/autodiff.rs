//! Every derivative in `scoresde::autodiff` (and `GradientScore`) against central finite
//! differences in f64, on closed-form functions and on a small random candle-nn MLP.
//!
//! Tolerances are of the form |got − want| ≤ tol · (1 + |want|), chosen from the finite
//! difference's own error in f64 (ε ≈ 2.2e-16):
//! * first derivatives, central step h = 1e-5: truncation h²/6·|f'''| ≈ 2e-11, rounding
//!   ε·|f|/h ≈ 2e-11 → tol 1e-7;
//! * second differences (Laplacian), h = 1e-4: truncation h²/12·|u''''| ≈ 1e-9, rounding
//!   4ε·|u|/h² ≈ 1e-7 → tol 1e-5;
//! * derivatives w.r.t. a parameter of losses built from input derivatives, h = 1e-5, the
//!   loss summing a batch → tol 1e-6.
//!
//! A wrong derivative (a missing term, a detached graph, a wrong index) is off by O(1), far
//! outside every tolerance.
//!
//! Run with CANDLE_GRAD_DO_NOT_DETACH=1 (set for every cargo process by .cargo/config.toml).

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};
use scoresde::autodiff::{
    divergence_exact, divergence_hutchinson, grad, grads, leaf, time_derivative_autodiff, time_derivative_fd,
    vjp, Probe, DEFAULT_FD_HD, DEFAULT_FD_HS,
};
use scoresde::{Error, GradientScore, LogDensityModel, Result, ScoreModel};

const H: f64 = 1e-5;
const TOL_FIRST: f64 = 1e-7;
const H_SECOND: f64 = 1e-4;
const TOL_SECOND: f64 = 1e-5;
const TOL_PARAM: f64 = 1e-6;

/// A function of the input alone (t fixed), as finite differences need it.
type TensorFn<'a> = dyn Fn(&Tensor) -> Result<Tensor> + 'a;

fn dev() -> Device {
    Device::Cpu
}

fn tensor(rows: &[&[f64]]) -> Tensor {
    let b = rows.len();
    let d = rows[0].len();
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (b, d), &dev()).unwrap()
}

fn x_batch() -> Tensor {
    tensor(&[&[0.3, -0.7, 1.1], &[-1.2, 0.4, 0.9], &[0.8, 1.5, -0.2]])
}

fn t_batch() -> Tensor {
    Tensor::new(&[0.2f64, 0.55, 0.9], &dev()).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

#[track_caller]
fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w} (diff {:e}, tol {tol:e})",
            (g - w).abs()
        );
    }
}

fn with_values(like: &Tensor, values: Vec<f64>) -> Tensor {
    Tensor::from_vec(values, like.shape(), &dev()).unwrap()
}

/// Central differences of Σ f(x) w.r.t. every element of x: for per-sample f, the
/// per-sample gradients.
fn fd_grad_of_sum(f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor, h: f64) -> Vec<f64> {
    let base = flat(x);
    (0..base.len())
        .map(|j| {
            let mut p = base.clone();
            let mut m = base.clone();
            p[j] += h;
            m[j] -= h;
            let fp = f(&with_values(x, p)).unwrap().sum_all().unwrap();
            let fm = f(&with_values(x, m)).unwrap().sum_all().unwrap();
            (fp.to_scalar::<f64>().unwrap() - fm.to_scalar::<f64>().unwrap()) / (2.0 * h)
        })
        .collect()
}

/// Central-difference divergence Σᵢ ∂yᵢ/∂xᵢ per sample, for y = f(x) of x's shape [B, …].
fn fd_divergence(f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor, h: f64) -> Vec<f64> {
    let base = flat(x);
    let b = x.dim(0).unwrap();
    let d = base.len() / b;
    let mut div = vec![0.0; b];
    for (j, &x0) in base.iter().enumerate() {
        let mut p = base.clone();
        let mut m = base.clone();
        p[j] = x0 + h;
        m[j] = x0 - h;
        let yp = flat(&f(&with_values(x, p)).unwrap());
        let ym = flat(&f(&with_values(x, m)).unwrap());
        div[j / d] += (yp[j] - ym[j]) / (2.0 * h);
    }
    div
}

/// Laplacian of a per-sample potential u (shape [B]) by second differences.
fn fd_laplacian(u: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor, h: f64) -> Vec<f64> {
    let base = flat(x);
    let b = x.dim(0).unwrap();
    let d = base.len() / b;
    let u0 = flat(&u(x).unwrap());
    let mut lap = vec![0.0; b];
    for j in 0..base.len() {
        let mut p = base.clone();
        let mut m = base.clone();
        p[j] += h;
        m[j] -= h;
        let up = flat(&u(&with_values(x, p)).unwrap());
        let um = flat(&u(&with_values(x, m)).unwrap());
        let s = j / d;
        lap[s] += (up[s] - 2.0 * u0[s] + um[s]) / (h * h);
    }
    lap
}

/// Central difference of a score model in t.
fn fd_time(model: &dyn ScoreModel, x: &Tensor, t: &Tensor, h: f64) -> Vec<f64> {
    let sp = flat(&model.score(x, &(t + h).unwrap()).unwrap());
    let sm = flat(&model.score(x, &(t - h).unwrap()).unwrap());
    sp.iter().zip(&sm).map(|(p, m)| (p - m) / (2.0 * h)).collect()
}

// ------------------------------------------------------------------------------------------
// Closed-form test functions
// ------------------------------------------------------------------------------------------

/// u(x) = Σᵢ sin(xᵢ)·x₍ᵢ₊₁₎ + 0.1·|x|⁴ per sample: shape [B].
fn u_closed(x: &Tensor) -> Result<Tensor> {
    let coupling = (x.sin()? * x.roll(-1, 1)?)?.sum(1)?;
    let quartic = (x.sqr()?.sum(1)?.sqr()? * 0.1)?;
    Ok((coupling + quartic)?)
}

/// y(x) = tanh(x)·x₍ᵢ₊₁₎ + xᵢ²·x₍ᵢ₋₁₎ − exp(−xᵢ): non-symmetric Jacobian, shape of x.
fn y_closed(x: &Tensor) -> Result<Tensor> {
    let a = (x.tanh()? * x.roll(-1, 1)?)?;
    let b = (x.sqr()? * x.roll(1, 1)?)?;
    Ok(((a + b)? - x.neg()?.exp()?)?)
}

/// s(x, t) = −x/(1+t²) + sin(3t)·tanh(x) + exp(2t)·x₍ᵢ₊₁₎.
fn s_closed(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let t = t.unsqueeze(1)?;
    let decay = x.neg()?.broadcast_div(&(t.sqr()? + 1.0)?)?;
    let wave = x.tanh()?.broadcast_mul(&(t.clone() * 3.0)?.sin()?)?;
    let growth = x.roll(-1, 1)?.broadcast_mul(&(t * 2.0)?.exp()?)?;
    Ok(((decay + wave)? + growth)?)
}

/// u(x, t) = exp(−t)·Σᵢ sin(xᵢ)·x₍ᵢ₊₁₎ − ½(1+t²)|x|² + 0.1·|x|⁴: shape [B].
struct ClosedPotential;

impl LogDensityModel for ClosedPotential {
    fn log_density(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let coupling = (x.sin()? * x.roll(-1, 1)?)?.sum(1)?;
        let coupling = (coupling * t.neg()?.exp()?)?;
        let quad = (x.sqr()?.sum(1)? * (t.sqr()? + 1.0)?)?;
        let quartic = (x.sqr()?.sum(1)?.sqr()? * 0.1)?;
        Ok(((coupling - (quad * 0.5)?)? + quartic)?)
    }
}

// ------------------------------------------------------------------------------------------
// A small random MLP: [x, t] → tanh → softplus → out
// ------------------------------------------------------------------------------------------

struct Mlp {
    l1: Linear,
    l2: Linear,
    l3: Linear,
}

fn softplus(z: &Tensor) -> Result<Tensor> {
    Ok((z.exp()? + 1.0)?.log()?)
}

impl Mlp {
    /// Weights drawn from a seeded generator (candle's own cannot be seeded), so the test
    /// is the same on every run.
    fn new(map: &VarMap, din: usize, dout: usize, seed: u64) -> Mlp {
        let vb = VarBuilder::from_varmap(map, DType::F64, &dev());
        let hidden = 16;
        let net = Mlp {
            l1: candle_nn::linear(din, hidden, vb.pp("l1")).unwrap(),
            l2: candle_nn::linear(hidden, hidden, vb.pp("l2")).unwrap(),
            l3: candle_nn::linear(hidden, dout, vb.pp("l3")).unwrap(),
        };
        let data = map.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut rng = StdRng::seed_from_u64(seed);
        for name in names {
            let var = &data[name];
            let dims = var.dims().to_vec();
            let scale = if dims.len() == 2 {
                1.5 / (dims[1] as f64).sqrt()
            } else {
                0.3
            };
            let normal = Normal::new(0.0, scale).unwrap();
            let values: Vec<f64> = (0..var.elem_count()).map(|_| normal.sample(&mut rng)).collect();
            var.set(&Tensor::from_vec(values, dims, &dev()).unwrap()).unwrap();
        }
        net
    }

    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let z = Tensor::cat(&[x.clone(), t.unsqueeze(1)?], 1)?;
        let h = self.l1.forward(&z)?.tanh()?;
        let h = softplus(&self.l2.forward(&h)?)?;
        Ok(self.l3.forward(&h)?)
    }
}

struct MlpScore(Mlp);

impl ScoreModel for MlpScore {
    fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.0.forward(x, t)
    }
}

struct MlpPotential(Mlp);

impl LogDensityModel for MlpPotential {
    fn log_density(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(x, t)?.squeeze(1)?)
    }
}

fn mlp_score(seed: u64) -> (VarMap, MlpScore) {
    let map = VarMap::new();
    let net = Mlp::new(&map, 4, 3, seed);
    (map, MlpScore(net))
}

fn mlp_potential(seed: u64) -> (VarMap, MlpPotential) {
    let map = VarMap::new();
    let net = Mlp::new(&map, 4, 1, seed);
    (map, MlpPotential(net))
}

// ------------------------------------------------------------------------------------------
// grad and vjp
// ------------------------------------------------------------------------------------------

#[test]
fn grad_matches_finite_differences() -> Result<()> {
    let x = x_batch();
    let t = t_batch();
    let (_map, mlp) = mlp_potential(1);
    let cases: Vec<(&str, Box<TensorFn>)> = vec![
        ("closed form", Box::new(u_closed)),
        ("mlp", Box::new(|x: &Tensor| mlp.log_density(x, &t))),
    ];
    for (name, f) in cases {
        let xl = leaf(&x)?;
        let g = grad(&f(&xl)?, &xl)?;
        assert_eq!(g.dims(), x.dims());
        assert_close(&flat(&g), &fd_grad_of_sum(&*f, &x, H), TOL_FIRST, name);
    }
    Ok(())
}

#[test]
fn grad_of_grad_matches_finite_differences_of_grad() -> Result<()> {
    // ∂/∂x of Σ (∇u · w) for a fixed w, against central differences of the autodiff gradient.
    let x = x_batch();
    let w = tensor(&[&[1.0, -0.5, 2.0], &[0.3, 0.7, -1.0], &[-2.0, 1.0, 0.5]]);
    let first = |x: &Tensor| -> Result<Tensor> {
        let xl = leaf(x)?;
        Ok((grad(&u_closed(&xl)?, &xl)? * &w)?)
    };
    let xl = leaf(&x)?;
    let second = grad(&(grad(&u_closed(&xl)?, &xl)? * &w)?, &xl)?;
    assert_close(
        &flat(&second),
        &fd_grad_of_sum(&first, &x, H),
        TOL_FIRST,
        "∇(w·∇u)",
    );
    Ok(())
}

#[test]
fn grads_give_each_leafs_gradient_from_one_pass() -> Result<()> {
    // The MLP potential in x and t: grads must agree with one grad per leaf (the same
    // backward arithmetic) and with central differences in t.
    let (x, t) = (x_batch(), t_batch());
    let (_map, mlp) = mlp_potential(2);
    let (xl, tl) = (leaf(&x)?, leaf(&t)?);
    let u = mlp.log_density(&xl, &tl)?;
    let [gx, gt] = grads(&u, [&xl, &tl])?;
    assert_close(&flat(&gx), &flat(&grad(&u, &xl)?), 1e-14, "∇ₓu");
    assert_close(&flat(&gt), &flat(&grad(&u, &tl)?), 1e-14, "∂ₜu");
    let fd_t = fd_grad_of_sum(&|t: &Tensor| mlp.log_density(&x, t), &t, H);
    assert_close(&flat(&gt), &fd_t, TOL_FIRST, "∂ₜu against differences");

    // A leaf u does not depend on gets zeros; a non-leaf is an error.
    let other = leaf(&t)?;
    let [_, zero] = grads(&u, [&xl, &other])?;
    assert_eq!(flat(&zero), vec![0.0; 3]);
    let err = grads(&u, [&xl, &t]).unwrap_err();
    assert!(
        matches!(err, Error::InvalidParameter(ref m) if m.contains("leaf")),
        "{err}"
    );
    Ok(())
}

#[test]
fn grad_is_zero_for_an_independent_output_and_rejects_non_leaves() -> Result<()> {
    let x = leaf(&x_batch())?;
    let other = leaf(&x_batch())?;
    let g = grad(&other.sqr()?, &x)?;
    assert_eq!(flat(&g), vec![0.0; 9]);

    let plain = x_batch();
    let err = grad(&plain.sqr()?, &plain).unwrap_err();
    assert!(
        matches!(err, Error::InvalidParameter(ref m) if m.contains("leaf")),
        "{err}"
    );

    let ints = Tensor::new(&[1u32, 2], &dev())?;
    assert!(matches!(grad(&ints, &x), Err(Error::InvalidParameter(_))));
    assert!(matches!(leaf(&ints), Err(Error::InvalidParameter(_))));
    Ok(())
}

#[test]
fn vjp_matches_finite_differences() -> Result<()> {
    let x = x_batch();
    let t = t_batch();
    let v = tensor(&[&[0.5, -1.0, 2.0], &[1.5, 0.2, -0.3], &[-0.7, 0.9, 1.1]]);
    let (_map, mlp) = mlp_score(2);
    let cases: Vec<(&str, Box<TensorFn>)> = vec![
        ("closed form", Box::new(y_closed)),
        ("mlp", Box::new(|x: &Tensor| mlp.score(x, &t))),
    ];
    for (name, f) in cases {
        let xl = leaf(&x)?;
        let got = vjp(&f(&xl)?, &xl, &v)?;
        // vᵀ∂y/∂x per sample = ∇ₓ Σ (y · v).
        let weighted = |x: &Tensor| -> Result<Tensor> { Ok((f(x)? * &v)?) };
        assert_close(&flat(&got), &fd_grad_of_sum(&weighted, &x, H), TOL_FIRST, name);
    }
    Ok(())
}

#[test]
fn vjp_rejects_bad_weights() -> Result<()> {
    let x = leaf(&x_batch())?;
    let y = y_closed(&x)?;
    let short = Tensor::ones((3, 2), DType::F64, &dev())?;
    assert!(matches!(vjp(&y, &x, &short), Err(Error::Shape(_))));
    let f32s = Tensor::ones((3, 3), DType::F32, &dev())?;
    assert!(matches!(vjp(&y, &x, &f32s), Err(Error::InvalidParameter(_))));
    // A weight computed from x would silently add (∂v/∂x)ᵀy.
    let from_x = x.sin()?;
    assert!(matches!(vjp(&y, &x, &from_x), Err(Error::InvalidParameter(_))));
    assert!(vjp(&y, &x, &from_x.detach()).is_ok());
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Divergences
// ------------------------------------------------------------------------------------------

#[test]
fn exact_divergence_matches_finite_differences() -> Result<()> {
    let x = x_batch();
    let t = t_batch();
    let (_map, mlp) = mlp_score(3);
    let cases: Vec<(&str, Box<TensorFn>)> = vec![
        ("closed form", Box::new(y_closed)),
        ("mlp", Box::new(|x: &Tensor| mlp.score(x, &t))),
    ];
    for (name, f) in cases {
        let xl = leaf(&x)?;
        let div = divergence_exact(&f(&xl)?, &xl)?;
        assert_eq!(div.dims(), [3]);
        assert_close(&flat(&div), &fd_divergence(&*f, &x, H), TOL_FIRST, name);
    }
    Ok(())
}

#[test]
fn exact_divergence_flattens_trailing_dimensions() -> Result<()> {
    // x of shape [B, 2, 2]: y couples entries across both trailing axes.
    let x = Tensor::new(&[[[0.3f64, -0.7], [1.1, 0.4]], [[-1.2, 0.9], [0.8, 1.5]]], &dev())?;
    let f = |x: &Tensor| -> Result<Tensor> {
        let swapped = x.transpose(1, 2)?;
        Ok(((x.tanh()? * &swapped)? + x.sqr()?.roll(1, 2)?)?)
    };
    let xl = leaf(&x)?;
    let div = divergence_exact(&f(&xl)?, &xl)?;
    assert_eq!(div.dims(), [2]);
    assert_close(&flat(&div), &fd_divergence(&f, &x, H), TOL_FIRST, "[B,2,2]");
    Ok(())
}

#[test]
fn hutchinson_single_probe_is_the_quadratic_form() -> Result<()> {
    // vᵀ(∂y/∂x)v = d/dε vᵀy(x + εv) at ε = 0, per sample: a central difference along v.
    let x = x_batch();
    let xl = leaf(&x)?;
    let y = y_closed(&xl)?;
    let mut rng = StdRng::seed_from_u64(11);
    for probe in [Probe::Rademacher, Probe::Gaussian] {
        let v = probe.sample(&x, &mut rng)?;
        let got = divergence_hutchinson(&y, &xl, std::slice::from_ref(&v))?;
        let along = |eps: f64| -> Vec<f64> {
            let shifted = (&x + (&v * eps).unwrap()).unwrap();
            flat(&(y_closed(&shifted).unwrap() * &v).unwrap().sum(1).unwrap())
        };
        let (p, m) = (along(H), along(-H));
        let want: Vec<f64> = p.iter().zip(&m).map(|(a, b)| (a - b) / (2.0 * H)).collect();
        assert_close(&flat(&got), &want, TOL_FIRST, "vᵀJv");

        // Several probes: the mean of the single-probe estimates.
        let probes = probe.sample_many(&x, 3, &mut rng)?;
        let joint = flat(&divergence_hutchinson(&y, &xl, &probes)?);
        let mut mean = vec![0.0; 3];
        for v in &probes {
            let one = flat(&divergence_hutchinson(&y, &xl, std::slice::from_ref(v))?);
            for (m, o) in mean.iter_mut().zip(one) {
                *m += o / 3.0;
            }
        }
        assert_close(&joint, &mean, 1e-12, "mean over probes");
    }
    Ok(())
}

#[test]
fn hutchinson_is_unbiased() -> Result<()> {
    // K probes per sample in one pass: the batch is repeated K times (samples independent).
    const K: usize = 4000;
    let x = x_batch();
    let t = t_batch();
    let (b, d) = x.dims2()?;
    let (_map, mlp) = mlp_score(4);
    let xl = leaf(&x)?;
    let exact = flat(&divergence_exact(&mlp.score(&xl, &t)?, &xl)?);

    let x_rep = leaf(&x.repeat((K, 1))?)?;
    let t_rep = t.repeat(K)?;
    let y_rep = mlp.score(&x_rep, &t_rep)?;
    let mut rng = StdRng::seed_from_u64(2024);
    for probe in [Probe::Rademacher, Probe::Gaussian] {
        let v = probe.sample(&x_rep, &mut rng)?;
        let estimates = divergence_hutchinson(&y_rep, &x_rep, &[v])?;
        let estimates = estimates.reshape((K, b))?.to_vec2::<f64>()?;
        for s in 0..b {
            let sample: Vec<f64> = estimates.iter().map(|row| row[s]).collect();
            let mean = sample.iter().sum::<f64>() / K as f64;
            let var = sample.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (K - 1) as f64;
            let se = (var / K as f64).sqrt();
            // The Jacobian is not diagonal, so even Rademacher probes have spread: the test
            // is not vacuous.
            assert!(se > 1e-4, "{probe:?} sample {s}: se {se} too small to test");
            assert!(
                (mean - exact[s]).abs() < 4.0 * se,
                "{probe:?} sample {s}: mean {mean} vs exact {} (se {se})",
                exact[s]
            );
        }
    }
    assert_eq!(d, 3);
    Ok(())
}

#[test]
fn divergences_reject_bad_shapes() -> Result<()> {
    let x = leaf(&x_batch())?;
    let y = y_closed(&x)?;
    let narrow = y.narrow(1, 0, 2)?;
    assert!(matches!(divergence_exact(&narrow, &x), Err(Error::Shape(_))));
    assert!(matches!(
        divergence_hutchinson(&narrow, &x, &[narrow.ones_like()?]),
        Err(Error::Shape(_))
    ));
    let bad_probe = Tensor::ones((3, 2), DType::F64, &dev())?;
    assert!(matches!(
        divergence_hutchinson(&y, &x, &[bad_probe]),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        divergence_hutchinson(&y, &x, &[]),
        Err(Error::InvalidParameter(_))
    ));
    let scalar = leaf(&Tensor::new(1.0f64, &dev())?)?;
    assert!(matches!(
        divergence_exact(&scalar.sqr()?, &scalar),
        Err(Error::Shape(_))
    ));
    let plain = x_batch();
    assert!(matches!(
        divergence_exact(&y_closed(&plain)?, &plain),
        Err(Error::InvalidParameter(_))
    ));
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Time derivatives
// ------------------------------------------------------------------------------------------

#[test]
fn time_derivative_autodiff_matches_finite_differences() -> Result<()> {
    let x = x_batch();
    let t = t_batch();
    let (_map, mlp) = mlp_score(5);
    let cases: Vec<(&str, &dyn ScoreModel)> = vec![("closed form", &s_closed), ("mlp", &mlp)];
    for (name, model) in cases {
        let ds = time_derivative_autodiff(model, &x, &t)?;
        assert_eq!(ds.dims(), x.dims());
        assert_close(&flat(&ds), &fd_time(model, &x, &t, H), TOL_FIRST, name);
    }
    Ok(())
}

#[test]
fn fd_stencil_error_is_second_order() -> Result<()> {
    // s = x·exp(2t): ∂ₜs = 2s, ∂ₜ³s = 8s, and the stencil's leading error is hs·hd/6·∂ₜ³s.
    let model =
        |x: &Tensor, t: &Tensor| -> Result<Tensor> { Ok(x.broadcast_mul(&(t * 2.0)?.exp()?.unsqueeze(1)?)?) };
    let x = x_batch();
    let t = t_batch();
    let exact = flat(&time_derivative_autodiff(&model, &x, &t)?);
    let s = flat(&model(&x, &t)?);
    // (1e-2, 1e-2): equal steps take the two-point central difference, same leading error.
    for (hs, hd) in [
        (DEFAULT_FD_HS, DEFAULT_FD_HD),
        (1e-2, 5e-3),
        (2e-2, 1e-2),
        (1e-2, 1e-2),
    ] {
        let fd = flat(&time_derivative_fd(&model, &x, &t, hs, hd)?);
        for i in 0..fd.len() {
            let predicted = hs * hd / 6.0 * 8.0 * s[i];
            let err = fd[i] - exact[i];
            // The next term is O(h³)/O(h²) = O(h) smaller: within 5% of the prediction at
            // the largest step, rounding (≈1e-12 here) at the smallest.
            assert!(
                (err - predicted).abs() <= 0.05 * predicted.abs() + 1e-11,
                "hs={hs}, hd={hd}, [{i}]: error {err:e}, predicted {predicted:e}"
            );
        }
    }
    // And on an MLP, whose third time derivative is O(1): agreement to O(hs·hd).
    let (_map, mlp) = mlp_score(6);
    let ad = flat(&time_derivative_autodiff(&mlp, &x, &t)?);
    let fd = flat(&time_derivative_fd(&mlp, &x, &t, DEFAULT_FD_HS, DEFAULT_FD_HD)?);
    assert_close(&fd, &ad, 1e-6, "mlp stencil");
    Ok(())
}

#[test]
fn fd_stencil_never_looks_before_time_zero() -> Result<()> {
    // A model that is undefined for t < 0 (as VP's σ(t) is): NaN there, t²·x elsewhere.
    let model = |x: &Tensor, t: &Tensor| -> Result<Tensor> {
        let times = t.to_vec1::<f64>()?;
        let rows: Vec<f64> = times
            .iter()
            .map(|&ti| if ti < 0.0 { f64::NAN } else { ti * ti })
            .collect();
        Ok(x.broadcast_mul(&Tensor::new(rows, &dev())?.unsqueeze(1)?)?)
    };
    let x = Tensor::new(&[[1.0f64, -2.0], [0.5, 3.0], [2.0, 1.0]], &dev())?;
    // Below, at and above 2·hs: the backward step shrinks to t/2 only for the first two.
    let t = Tensor::new(&[1e-5f64, 1.5e-3, 0.3], &dev())?;
    let ds = time_derivative_fd(&model, &x, &t, DEFAULT_FD_HS, DEFAULT_FD_HD)?.to_vec2::<f64>()?;
    let (xs, ts) = (x.to_vec2::<f64>()?, t.to_vec1::<f64>()?);
    for i in 0..3 {
        for j in 0..2 {
            // The stencil is exact for quadratics in t, whatever its steps: only rounding,
            // ≈ ε·|s|/h ≤ 1e-16·9/5e-6 ≈ 2e-10, remains.
            let exact = 2.0 * ts[i] * xs[i][j];
            assert!(
                (ds[i][j] - exact).abs() < 1e-9,
                "[{i}][{j}]: {} vs {exact}",
                ds[i][j]
            );
        }
    }
    Ok(())
}

#[test]
fn time_derivatives_reject_bad_input() -> Result<()> {
    let x = x_batch();
    let short_t = Tensor::new(&[0.1f64, 0.2], &dev())?;
    assert!(matches!(
        time_derivative_autodiff(&s_closed, &x, &short_t),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        time_derivative_fd(&s_closed, &x, &short_t, DEFAULT_FD_HS, DEFAULT_FD_HD),
        Err(Error::Shape(_))
    ));
    let t = t_batch();
    for (hs, hd) in [(0.0, 1e-3), (1e-3, -1.0), (f64::NAN, 1e-3), (1e-3, f64::INFINITY)] {
        assert!(matches!(
            time_derivative_fd(&s_closed, &x, &t, hs, hd),
            Err(Error::InvalidParameter(_))
        ));
    }
    let wrong_shape = |x: &Tensor, _t: &Tensor| Ok(x.sum(1)?);
    assert!(matches!(
        time_derivative_autodiff(&wrong_shape, &x, &t),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        time_derivative_fd(&wrong_shape, &x, &t, DEFAULT_FD_HS, DEFAULT_FD_HD),
        Err(Error::Shape(_))
    ));
    Ok(())
}

// ------------------------------------------------------------------------------------------
// GradientScore
// ------------------------------------------------------------------------------------------

#[test]
fn gradient_score_and_its_laplacian_match_finite_differences() -> Result<()> {
    let x = x_batch();
    let t = t_batch();
    let (_map, mlp) = mlp_potential(7);
    let cases: Vec<(&str, Box<dyn LogDensityModel>)> =
        vec![("closed form", Box::new(ClosedPotential)), ("mlp", Box::new(mlp))];
    for (name, potential) in cases {
        let u = |x: &Tensor| potential.log_density(x, &t);
        let model = GradientScore::new(Borrowed(&*potential));
        let fd_score = fd_grad_of_sum(&u, &x, H);
        // An untracked x: a fresh leaf inside.
        let s = model.score(&x, &t)?;
        assert_close(&flat(&s), &fd_score, TOL_FIRST, name);
        // A tracked x: the score is a function of it, and its divergence is Δu.
        let xl = leaf(&x)?;
        let s = model.score(&xl, &t)?;
        assert_close(&flat(&s), &fd_score, TOL_FIRST, name);
        let lap = divergence_exact(&s, &xl)?;
        assert_close(&flat(&lap), &fd_laplacian(&u, &x, H_SECOND), TOL_SECOND, name);
        // The values-only mode: same values, detached unless x is tracked.
        let sampling = GradientScore::values_only(Borrowed(&*potential));
        let s_plain = sampling.score(&x, &t)?;
        assert!(s_plain.sorted_nodes().is_empty());
        assert_close(&flat(&s_plain), &fd_score, TOL_FIRST, name);
        let s_tracked = sampling.score(&xl, &t)?;
        assert_close(
            &flat(&divergence_exact(&s_tracked, &xl)?),
            &flat(&lap),
            1e-12,
            name,
        );
        // LogDensityModel forwards.
        assert_eq!(flat(&model.log_density(&x, &t)?), flat(&u(&x)?));
    }
    Ok(())
}

/// Borrows a boxed potential as a `LogDensityModel` (the crate has no impl for references).
struct Borrowed<'a>(&'a dyn LogDensityModel);

impl LogDensityModel for Borrowed<'_> {
    fn log_density(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.0.log_density(x, t)
    }
}

#[test]
fn gradient_score_rejects_a_potential_of_the_wrong_shape() {
    struct PerCoordinate;
    impl LogDensityModel for PerCoordinate {
        fn log_density(&self, x: &Tensor, _t: &Tensor) -> Result<Tensor> {
            Ok(x.sqr()?)
        }
    }
    let err = GradientScore::new(PerCoordinate)
        .score(&x_batch(), &t_batch())
        .unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
}

// ------------------------------------------------------------------------------------------
// Training through input derivatives: d/dθ against finite differences on a parameter
// ------------------------------------------------------------------------------------------

/// Central difference of `loss` in one entry of the parameter `name`.
fn fd_param(map: &VarMap, name: &str, index: (usize, usize), loss: &dyn Fn() -> f64) -> f64 {
    let var = map.data().lock().unwrap()[name].clone();
    let orig = var.as_tensor().copy().unwrap();
    let set = |delta: f64| {
        let mut w = orig.to_vec2::<f64>().unwrap();
        w[index.0][index.1] += delta;
        var.set(&Tensor::new(w, &dev()).unwrap()).unwrap();
    };
    set(H);
    let lp = loss();
    set(-H);
    let lm = loss();
    var.set(&orig).unwrap();
    (lp - lm) / (2.0 * H)
}

fn check_param_grads(map: &VarMap, loss: &dyn Fn() -> Result<Tensor>, what: &str) -> Result<()> {
    let l = loss()?;
    for (name, index) in [
        ("l1.weight", (0, 1)),
        ("l2.weight", (3, 5)),
        ("l3.weight", (0, 7)),
    ] {
        let var = map.data().lock().unwrap()[name].clone();
        let g = grad(&l, var.as_tensor())?.to_vec2::<f64>()?[index.0][index.1];
        let scalar_loss = || loss().unwrap().to_scalar::<f64>().unwrap();
        let want = fd_param(map, name, index, &scalar_loss);
        assert!(g.abs() > 1e-6, "{what}, {name}: gradient {g} too small to test");
        assert_close(&[g], &[want], TOL_PARAM, &format!("{what}, d/d {name}"));
    }
    Ok(())
}

#[test]
fn parameter_gradients_of_input_derivatives_match_finite_differences() -> Result<()> {
    let x = x_batch();
    let t = t_batch();

    // Second order: d/dθ Σ ∇·s_θ (the FP-Diffusion divergence term).
    let (map, mlp) = mlp_score(8);
    let divergence_loss = || -> Result<Tensor> {
        let xl = leaf(&x)?;
        Ok(divergence_exact(&mlp.score(&xl, &t)?, &xl)?.sum_all()?)
    };
    check_param_grads(&map, &divergence_loss, "Σ ∇·s")?;

    // Second order in t: d/dθ Σ (∂ₜs)².
    let time_loss = || -> Result<Tensor> { Ok(time_derivative_autodiff(&mlp, &x, &t)?.sqr()?.sum_all()?) };
    check_param_grads(&map, &time_loss, "Σ (∂ₜs)²")?;

    // Third order: d/dθ Σ (Δu_θ + |∇u_θ|²) for a potential (the log-density FP residual).
    let (map, potential) = mlp_potential(9);
    let model = GradientScore::new(potential);
    let laplacian_loss = || -> Result<Tensor> {
        let xl = leaf(&x)?;
        let s = model.score(&xl, &t)?;
        Ok((divergence_exact(&s, &xl)? + s.sqr()?.sum(1)?)?.sum_all()?)
    };
    check_param_grads(&map, &laplacian_loss, "Σ Δu + |∇u|²")?;
    Ok(())
}
