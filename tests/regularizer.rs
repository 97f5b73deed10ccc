//! Fokker–Planck regularizers against exact scores and finite differences (f64).

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::autodiff::{Divergence, Probe};
use scoresde::regularizer::{
    Boundary, Collocation, LogDensityFp, Regularizer, ScoreFpe, TimeDerivative, TimeWindow,
};
use scoresde::score::{Covariance, GaussianMixture};
use scoresde::sde::{OuSde, Sde, SubVpSde, VeSde, VpSde};
use scoresde::{Error, LogDensityModel, Result, ScoreModel};

fn mixture() -> GaussianMixture {
    GaussianMixture::new(
        vec![0.3, 0.7],
        vec![vec![-1.0, 0.5], vec![1.0, -0.5]],
        vec![
            Covariance::Full(vec![vec![0.3, 0.1], vec![0.1, 0.2]]),
            Covariance::Diagonal(vec![0.2, 0.4]),
        ],
    )
    .unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A score that is exact up to a 10% scale error.
struct Scaled<M>(M);
impl<M: ScoreModel> ScoreModel for Scaled<M> {
    fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        Ok((self.0.score(x, t)? * 1.1)?)
    }
}

/// A log-density that is off by a term quadratic in x.
struct Tilted<M>(M);
impl<M: LogDensityModel> LogDensityModel for Tilted<M> {
    fn log_density(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        Ok((self.0.log_density(x, t)? + (x.sqr()?.sum(1)? * 0.1)?)?)
    }
}

/// Residuals of the exact score are rounding errors of terms of size |∂_t s|; with exact
/// divergence and autodiff ∂_t they stay below 1e-8 relative to that scale. A 10% scale
/// error in the score (or a quadratic tilt of the log-density) leaves a residual of at
/// least 1e-3 here, and more than 10⁴ times the exact one.
fn check_vanishing<S: Sde + Clone>(name: &str, sde: S) {
    let exact = mixture().diffused(sde.clone());
    let mut rng = StdRng::seed_from_u64(1);
    let exact_fpe = ScoreFpe::new()
        .with_divergence(Divergence::Exact)
        .unwrap()
        .with_time_derivative(TimeDerivative::Autodiff)
        .unwrap();
    let clearly_nonzero = |wrong: &Tensor, exact: &Tensor, what: &str| {
        let (w, e) = (max_abs(wrong), max_abs(exact));
        assert!(w > 1e-3 && w > 1e4 * e, "{name}: {what}: wrong {w} vs exact {e}");
    };
    for &frac in &[0.05, 0.3, 0.8] {
        let t0 = frac * sde.end_time();
        let x = exact.sample(32, t0, DType::F64, &Device::Cpu, &mut rng).unwrap();
        let t = Tensor::full(t0, 32, &Device::Cpu).unwrap();
        let ds_dt = scoresde::autodiff::time_derivative_autodiff(&exact, &x, &t).unwrap();
        let scale = 1.0 + max_abs(&ds_dt);

        let r = exact_fpe.residual(&sde, &exact, &x, &t, &mut rng).unwrap();
        assert!(
            max_abs(&r) < 1e-8 * scale,
            "{name} t={t0}: score-FPE residual {}",
            max_abs(&r)
        );
        let wrong = exact_fpe
            .residual(&sde, &Scaled(exact.clone()), &x, &t, &mut rng)
            .unwrap();
        clearly_nonzero(&wrong, &r, "score FPE");

        // The paper's stencil is O(hs·hd) accurate: ~1e-3 relative here.
        let fd = ScoreFpe::new()
            .with_divergence(Divergence::Exact)
            .unwrap()
            .residual(&sde, &exact, &x, &t, &mut rng)
            .unwrap();
        assert!(
            max_abs(&fd) < 1e-3 * scale,
            "{name} t={t0}: stencil residual {}",
            max_abs(&fd)
        );

        let lfp = LogDensityFp::new();
        let r = lfp.residual(&sde, &exact, &x, &t, &mut rng).unwrap();
        assert!(
            max_abs(&r) < 1e-8 * scale,
            "{name} t={t0}: log-density residual {}",
            max_abs(&r)
        );
        let wrong = lfp
            .residual(&sde, &Tilted(exact.clone()), &x, &t, &mut rng)
            .unwrap();
        clearly_nonzero(&wrong, &r, "log-density FP");
    }
}

#[test]
fn residuals_vanish_for_the_exact_score_vp() {
    check_vanishing("vp", VpSde::default());
}

#[test]
fn residuals_vanish_for_the_exact_score_subvp() {
    check_vanishing("subvp", SubVpSde::default());
}

#[test]
fn residuals_vanish_for_the_exact_score_ve() {
    check_vanishing("ve", VeSde::new(0.01, 5.0).unwrap());
}

#[test]
fn residuals_vanish_for_the_exact_score_ou() {
    check_vanishing("ou", OuSde::default());
}

/// A small network [x, t] → tanh → out, f64, for gradient checks.
struct Net {
    hidden: Linear,
    out: Linear,
}

impl Net {
    fn new(vars: &VarMap, out: usize) -> Self {
        let vb = VarBuilder::from_varmap(vars, DType::F64, &Device::Cpu);
        let net = Self {
            hidden: linear(3, 8, vb.pp("hidden")).unwrap(),
            out: linear(8, out, vb.pp("out")).unwrap(),
        };
        // Seeded weights: candle's own initialization cannot be seeded.
        let mut rng = StdRng::seed_from_u64(5);
        for var in vars.all_vars() {
            let fresh =
                scoresde::random::standard_normal(var.shape(), DType::F64, &Device::Cpu, &mut rng).unwrap();
            var.set(&(fresh * 0.7).unwrap()).unwrap();
        }
        net
    }
    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let input = Tensor::cat(&[x, &t.unsqueeze(1)?], 1)?;
        Ok(self.out.forward(&self.hidden.forward(&input)?.tanh()?)?)
    }
}

impl ScoreModel for Net {
    fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.forward(x, t)
    }
}

impl LogDensityModel for Net {
    fn log_density(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        Ok(self.forward(x, t)?.squeeze(1)?)
    }
}

/// d penalty / dθ by backprop against central differences on single weights. Both sides
/// reuse the same seed, so Hutchinson probes and collocation points are identical. f64 with
/// h = 1e-5: truncation ~1e-10, rounding ~1e-11; tolerance 1e-6 relative.
fn check_parameter_gradient(name: &str, vars: &VarMap, penalty: &dyn Fn() -> Tensor) {
    let value = penalty();
    let grads = value.backward().unwrap();
    for var in vars.all_vars() {
        // No gradient means the penalty does not depend on it (e.g. the output bias for a
        // residual built only from derivatives of u); finite differences must then give 0.
        let analytic = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            None => vec![0.0; var.elem_count()],
        };
        let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for &i in &[0, original.len() / 2, original.len() - 1] {
            let shifted = |delta: f64| {
                let mut v = original.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let p = penalty().to_scalar::<f64>().unwrap();
                var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                p
            };
            let h = 1e-5;
            let fd = (shifted(h) - shifted(-h)) / (2.0 * h);
            assert!(
                (fd - analytic[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{name}: d/dθ[{i}] {} vs FD {fd}",
                analytic[i]
            );
        }
    }
}

fn points(n: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = scoresde::random::standard_normal((n, 2), DType::F64, &Device::Cpu, &mut rng).unwrap();
    let t = scoresde::random::uniform(n, 0.1, 0.9, DType::F64, &Device::Cpu, &mut rng).unwrap();
    (x, t)
}

#[test]
fn score_fpe_penalty_gradients_match_finite_differences() {
    let vars = VarMap::new();
    let net = Net::new(&vars, 2);
    let sde = VpSde::default();
    let (x, t) = points(6, 2);
    let variants = [
        (
            "exact/autodiff",
            ScoreFpe::new()
                .with_divergence(Divergence::Exact)
                .unwrap()
                .with_time_derivative(TimeDerivative::Autodiff)
                .unwrap(),
        ),
        ("hutchinson/stencil", ScoreFpe::new()),
        (
            "hutchinson/autodiff",
            ScoreFpe::new()
                .with_time_derivative(TimeDerivative::Autodiff)
                .unwrap(),
        ),
        (
            "m=1/scalar",
            ScoreFpe::new()
                .with_power(1.0)
                .unwrap()
                .with_scalar_weight(0.01)
                .unwrap()
                .with_divergence(Divergence::Hutchinson {
                    probe: Probe::Rademacher,
                    probes: 2,
                })
                .unwrap(),
        ),
    ];
    for (name, fpe) in variants {
        let penalty = || {
            fpe.penalty(&sde, &net, &x, &t, &mut StdRng::seed_from_u64(9))
                .unwrap()
        };
        check_parameter_gradient(name, &vars, &penalty);
    }
}

#[test]
fn log_density_fp_penalty_gradients_match_finite_differences() {
    let vars = VarMap::new();
    let net = Net::new(&vars, 1);
    let sde = OuSde::default();
    let (x, t) = points(6, 3);
    let perturbed = LogDensityFp::new();
    let boxed = LogDensityFp::new()
        .with_collocation(Collocation::UniformBox {
            low: -2.0,
            high: 2.0,
            points: 16,
            eps: 1e-5,
        })
        .unwrap()
        .with_boundary(Some(Boundary::new(1.0, 4).unwrap()))
        .with_divergence(Divergence::Hutchinson {
            probe: Probe::Gaussian,
            probes: 1,
        })
        .unwrap();
    for (name, fp) in [("perturbed", perturbed), ("box+boundary", boxed)] {
        let penalty = || {
            fp.penalty(&sde, &net, &x, &t, &mut StdRng::seed_from_u64(9))
                .unwrap()
        };
        check_parameter_gradient(name, &vars, &penalty);
    }
}

#[test]
fn the_penalty_is_a_mean_of_squared_residuals() {
    let sde = OuSde::default();
    let exact = mixture().diffused(sde);
    let wrong = Tilted(exact);
    let (x, t) = points(10, 4);
    let mut rng = StdRng::seed_from_u64(0);
    let fp = LogDensityFp::new();
    let r = fp.residual(&sde, &wrong, &x, &t, &mut rng).unwrap();
    let want = r.sqr().unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap();
    let got = fp
        .penalty(&sde, &wrong, &x, &t, &mut rng)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((got - want).abs() < 1e-12 * want.max(1.0));
    // The score-FPE penalty with m = 2, w = g², normalized: mean(g²‖r‖²)/d².
    let vp = VpSde::default();
    let exact_vp = mixture().diffused(vp);
    let fpe = ScoreFpe::new()
        .with_divergence(Divergence::Exact)
        .unwrap()
        .with_time_derivative(TimeDerivative::Autodiff)
        .unwrap();
    let scaled = Scaled(exact_vp);
    let r = fpe.residual(&vp, &scaled, &x, &t, &mut rng).unwrap();
    let g2 = vp.diffusion_tensor(&t).unwrap().sqr().unwrap();
    let want = (r.sqr().unwrap().sum(1).unwrap() * g2)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        / 4.0;
    let got = fpe
        .penalty(&vp, &scaled, &x, &t, &mut rng)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((got - want).abs() < 1e-12 * want.max(1.0), "{got} vs {want}");
}

#[test]
fn bad_inputs_are_errors() {
    let sde = VpSde::default();
    let exact = mixture().diffused(sde);
    let mut rng = StdRng::seed_from_u64(0);
    let (x, t) = points(4, 5);
    let short_t = t.narrow(0, 0, 3).unwrap();
    assert!(matches!(
        ScoreFpe::new().penalty(&sde, &exact, &x, &short_t, &mut rng),
        Err(Error::Shape(_))
    ));
    let nan = Tensor::new(&[[f64::NAN, 0.0]], &Device::Cpu).unwrap();
    let t1 = Tensor::new(&[0.5f64], &Device::Cpu).unwrap();
    assert!(matches!(
        LogDensityFp::new().penalty(&sde, &exact, &nan, &t1, &mut rng),
        Err(Error::NonFinite(_))
    ));
    let nan_t = Tensor::new(&[f64::NAN], &Device::Cpu).unwrap();
    assert!(matches!(
        ScoreFpe::new().penalty(&sde, &exact, &nan.zeros_like().unwrap(), &nan_t, &mut rng),
        Err(Error::NonFinite(_))
    ));
    assert!(ScoreFpe::new().with_power(-1.0).is_err());
    assert!(ScoreFpe::new().with_scalar_weight(f64::NAN).is_err());
    assert!(ScoreFpe::new()
        .with_divergence(Divergence::Hutchinson {
            probe: Probe::Gaussian,
            probes: 0
        })
        .is_err());
    assert!(LogDensityFp::new()
        .with_collocation(Collocation::UniformBox {
            low: 1.0,
            high: -1.0,
            points: 10,
            eps: 1e-5
        })
        .is_err());
    // A boundary term without a box has no faces to live on.
    let fp = LogDensityFp::new().with_boundary(Some(Boundary::new(1.0, 10).unwrap()));
    assert!(matches!(
        fp.penalty(&sde, &exact, &x, &t, &mut rng),
        Err(Error::InvalidParameter(_))
    ));
    let _ = Var::from_tensor(&t);
}

#[test]
fn a_time_window_penalizes_only_its_points() -> Result<()> {
    // A score that is not a diffusion's (so the residual is nonzero everywhere), and the
    // deterministic residual (exact divergence, autodiff in t).
    let model = |x: &Tensor, t: &Tensor| Ok(x.broadcast_mul(&(t.unsqueeze(1)? - 2.0)?)?);
    let fpe = ScoreFpe::new()
        .with_divergence(Divergence::Exact)?
        .with_time_derivative(TimeDerivative::Autodiff)?;
    let sde = VpSde::default();
    let mut rng = StdRng::seed_from_u64(3);
    let x = Tensor::new(
        &[[1.0f64, 0.5], [0.2, -1.0], [-0.7, 0.3], [1.5, 1.0]],
        &Device::Cpu,
    )?;
    let t = Tensor::new(&[0.01f64, 0.4, 0.9, 0.05], &Device::Cpu)?;
    let window = TimeWindow::new(fpe.clone(), 0.1, 1.0)?;
    let got = window
        .penalty(&sde, &model, &x, &t, &mut rng)?
        .to_scalar::<f64>()?;
    // Points 1 and 2 are inside: half the batch.
    let rows = Tensor::new(&[1u32, 2], &Device::Cpu)?;
    let inner = fpe
        .penalty(
            &sde,
            &model,
            &x.index_select(&rows, 0)?,
            &t.index_select(&rows, 0)?,
            &mut rng,
        )?
        .to_scalar::<f64>()?;
    assert!(inner > 0.0);
    assert!(
        (got - 0.5 * inner).abs() <= 1e-12 * inner,
        "{got} vs {}",
        0.5 * inner
    );
    // A window holding every point is the inner penalty itself.
    let all = TimeWindow::new(fpe.clone(), 0.0, 1.0)?.penalty(&sde, &model, &x, &t, &mut rng)?;
    let direct = fpe.penalty(&sde, &model, &x, &t, &mut rng)?;
    assert_eq!(all.to_scalar::<f64>()?, direct.to_scalar::<f64>()?);
    // Bad windows and mismatched times are errors.
    for (a, b) in [(-0.1, 1.0), (0.5, 0.5), (0.0, f64::NAN)] {
        assert!(matches!(
            TimeWindow::new(fpe.clone(), a, b),
            Err(Error::InvalidParameter(_))
        ));
    }
    let short_t = Tensor::new(&[0.5f64], &Device::Cpu)?;
    assert!(matches!(
        window.penalty(&sde, &model, &x, &short_t, &mut rng),
        Err(Error::Shape(_))
    ));
    Ok(())
}
