//! Hostile inputs against the public API (issue 17): each class of bad input comes back
//! as an `Error` that says what to do, never a panic, a hang or a non-finite `Ok`.

use scoresde::Error;

/// `fn main() -> scoresde::Result<()>` prints the error's Debug form: it must carry the
/// Display text (the instructions), not only the variant's name.
#[test]
fn debug_carries_the_display_text() {
    let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such checkpoint");
    let errors = [
        Error::InvalidParameter("beta_min must be >= 0".into()),
        Error::Shape("x has shape [3]".into()),
        Error::NonFinite("score at t = 0.5".into()),
        Error::StepSizeUnderflow { t: 0.25, step: 1e-18 },
        Error::HigherOrderGradientsUnavailable,
        Error::Checkpoint("missing variable".into()),
        Error::NonFiniteLoss {
            step: 3,
            loss: f64::NAN,
        },
        Error::Candle(candle_core::Error::Msg("candle says no".into())),
        Error::Io(io),
    ];
    for err in errors {
        let (debug, display) = (format!("{err:?}"), err.to_string());
        assert!(debug.contains(&display), "{debug:?} lacks {display:?}");
    }
    let debug = format!("{:?}", Error::HigherOrderGradientsUnavailable);
    assert!(debug.starts_with("HigherOrderGradientsUnavailable: "));
    assert!(debug.contains("CANDLE_GRAD_DO_NOT_DETACH=1"));
}

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, Rng, SeedableRng};
use scoresde::autodiff::{time_derivative_fd, DEFAULT_FD_HD, DEFAULT_FD_HS};
use scoresde::likelihood::{Dequantization, Likelihood};
use scoresde::regularizer::{Collocation, LogDensityFp, Regularizer, ScoreFpe, TimeDerivative};
use scoresde::score::{Covariance, GaussianMixture, MlpConfig, MlpPotential, MlpScore, PotentialConfig};
use scoresde::sde::{OuSde, Sde, SubVpSde, VeSde, VpSde};
use scoresde::{LogDensityModel, Result, ScoreModel};

fn invalid<T>(r: Result<T>, needle: &str) {
    match r {
        Err(Error::InvalidParameter(msg)) => assert!(msg.contains(needle), "{msg:?} lacks {needle:?}"),
        Err(other) => panic!("expected InvalidParameter mentioning {needle:?}, got {other:?}"),
        Ok(_) => panic!("expected InvalidParameter mentioning {needle:?}, got Ok"),
    }
}

fn builder(vars: &VarMap, dtype: DType) -> VarBuilder<'_> {
    VarBuilder::from_varmap(vars, dtype, &Device::Cpu)
}

fn mixture() -> GaussianMixture {
    GaussianMixture::new(
        vec![0.3, 0.7],
        vec![vec![-1.0, 0.5], vec![2.0, 0.0]],
        vec![Covariance::Isotropic(0.2), Covariance::Diagonal(vec![0.5, 0.1])],
    )
    .unwrap()
}

#[test]
fn networks_refuse_zero_depth_and_non_float_builders() {
    let vars = VarMap::new();
    let config = MlpConfig {
        depth: 0,
        ..Default::default()
    };
    invalid(
        MlpScore::new(builder(&vars, DType::F32), VpSde::default(), config),
        "depth",
    );
    let config = PotentialConfig {
        depth: 0,
        ..Default::default()
    };
    invalid(MlpPotential::new(builder(&vars, DType::F32), config), "depth");
    for dtype in [DType::U8, DType::U32, DType::I64, DType::F16, DType::BF16] {
        let vars = VarMap::new();
        invalid(
            MlpScore::new(builder(&vars, dtype), VpSde::default(), MlpConfig::default()),
            "f32 or f64",
        );
        invalid(
            MlpPotential::new(builder(&vars, dtype), PotentialConfig::default()),
            "f32 or f64",
        );
    }
}

#[test]
fn mixture_refuses_integer_points() -> Result<()> {
    let exact = mixture().diffused(VpSde::default());
    let x = Tensor::new(&[[1u8, 2], [0, 3]], &Device::Cpu)?;
    let t = Tensor::new(&[0.5f32, 0.5], &Device::Cpu)?;
    invalid(exact.score(&x, &t), "f32 or f64");
    invalid(exact.log_density(&x, &t), "f32 or f64");
    Ok(())
}

/// Times enter the models, and are checked there: for random times (some outside
/// [0, T], some non-finite), a model returns an error exactly when a time is out of
/// range, and a finite score otherwise.
#[test]
fn models_accept_exactly_the_times_in_their_domain() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(17);
    let vars = VarMap::new();
    let sde = VpSde::default().with_end_time(2.0)?;
    let net = MlpScore::new(builder(&vars, DType::F64), sde, MlpConfig::default())?;
    let exact = mixture().diffused(sde);
    let potential = MlpPotential::new(builder(&VarMap::new(), DType::F64), PotentialConfig::default())?;
    let x = Tensor::new(&[[0.3f64, -0.2], [1.0, 2.0]], &Device::Cpu)?;
    for case in 0..300 {
        let other: f64 = rng.random_range(0.01..2.0);
        let t: f64 = match case % 6 {
            0 => rng.random_range(-3.0..0.0),
            1 => rng.random_range(2.0..5.0) + 1e-9,
            2 => [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][case % 3],
            3 => 0.0,
            _ => rng.random_range(0.0..=2.0),
        };
        let times = Tensor::new(&[other, t], &Device::Cpu)?;
        let in_range = (0.0..=2.0).contains(&t);
        let finite = |s: &Tensor| {
            s.flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite())
        };
        // The exact mixture is defined at t = 0 (its covariances are positive).
        match exact.score(&x, &times) {
            Ok(s) => assert!(in_range && finite(&s), "t = {t}: Ok with {s}"),
            Err(e) => assert!(!in_range, "t = {t}: {e}"),
        }
        // MlpScore divides by σ(t), which is 0 at t = 0 under VP.
        match net.score(&x, &times) {
            Ok(s) => assert!(in_range && t > 0.0 && finite(&s), "t = {t}: Ok with {s}"),
            Err(e) => assert!(!in_range || t == 0.0, "t = {t}: {e}"),
        }
        // A potential has no T: any finite t >= 0.
        match potential.log_density(&x, &times) {
            Ok(u) => assert!(t >= 0.0 && t.is_finite() && finite(&u), "t = {t}: Ok with {u}"),
            Err(e) => assert!(t < 0.0 || !t.is_finite(), "t = {t}: {e}"),
        }
    }
    // σ(0) = σ_min > 0 for VE: t = 0 is fine there.
    let ve = MlpScore::new(
        builder(&VarMap::new(), DType::F64),
        VeSde::default(),
        MlpConfig::default(),
    )?;
    ve.score(&x, &Tensor::new(&[0.0f64, 0.0], &Device::Cpu)?)?;
    // Half precision is refused where the times enter, with a message that says why.
    let half = Tensor::new(&[0.5f32, 0.5], &Device::Cpu)?.to_dtype(DType::F16)?;
    invalid(net.score(&x, &half), "f32 or f64");
    invalid(VpSde::default().check_times(&half), "f32 or f64");
    Ok(())
}

/// σ(t) as a tensor keeps its digits at small t in f32 (it used to cancel: 1 − e^{2L}).
#[test]
fn std_tensor_does_not_cancel_at_small_times() -> Result<()> {
    let times = [1e-7f64, 1e-5, 1e-3, 0.1, 1.0];
    let t = Tensor::new(&times.map(|t| t as f32), &Device::Cpu)?;
    let check =
        |sde: &dyn Fn(&Tensor) -> Result<Tensor>, exact: &dyn Fn(f64) -> f64, what: &str| -> Result<()> {
            let got = sde(&t)?.to_vec1::<f32>()?;
            for (g, &ti) in got.iter().zip(&times) {
                let want = exact(ti as f32 as f64);
                let rel = (*g as f64 - want).abs() / want;
                assert!(
                    rel < 1e-5,
                    "{what}({ti}) = {g}, want {want} (relative error {rel:e})"
                );
            }
            Ok(())
        };
    let (vp, sub) = (VpSde::default(), SubVpSde::default());
    // The formula it replaced, sqrt(1 − e^{2L}) in f32, is visibly off at t = 1e-5.
    let t5 = Tensor::new(&[1e-5f32], &Device::Cpu)?;
    let log_alpha = (t5.sqr()? * (-0.25 * 19.9))?.add(&(&t5 * -0.05)?)?;
    let naive = (log_alpha * 2.0)?
        .exp()?
        .affine(-1.0, 1.0)?
        .sqrt()?
        .to_vec1::<f32>()?[0] as f64;
    let want = vp.std(1e-5f32 as f64);
    assert!((naive - want).abs() / want > 1e-3, "naive {naive} vs {want}");
    check(&|t| vp.std_tensor(t), &|t| vp.std(t), "VP sigma")?;
    check(&|t| sub.std_tensor(t), &|t| sub.std(t), "sub-VP sigma")?;
    check(&|t| sub.diffusion_tensor(t), &|t| sub.diffusion(t), "sub-VP g")?;
    Ok(())
}

/// At t = 0 the stencil goes forward; it never asks the model about a time before 0, and
/// stays exact for quadratics in t.
#[test]
fn time_derivative_fd_stays_at_or_after_time_zero() -> Result<()> {
    // s(x, t) = (1 + 3t + t²)·x, ∂s/∂t = (3 + 2t)·x; errors on a negative time.
    let model = |x: &Tensor, t: &Tensor| -> Result<Tensor> {
        let low = t.min(0)?.to_scalar::<f64>()?;
        if low < 0.0 {
            return Err(Error::InvalidParameter(format!("evaluated at t = {low}")));
        }
        let c = (t.affine(3.0, 1.0)? + t.sqr()?)?;
        Ok(x.broadcast_mul(&c.unsqueeze(1)?)?)
    };
    let x = Tensor::new(&[[1.0f64, -2.0], [0.5, 1.0], [2.0, 1.0]], &Device::Cpu)?;
    let times = [0.0f64, 1e-4, 0.5];
    let t = Tensor::new(&times, &Device::Cpu)?;
    let ds = time_derivative_fd(&model, &x, &t, DEFAULT_FD_HS, DEFAULT_FD_HD)?.to_vec2::<f64>()?;
    let xs = x.to_vec2::<f64>()?;
    for ((row, xi), ti) in ds.iter().zip(&xs).zip(times) {
        for (g, xv) in row.iter().zip(xi) {
            let want = (3.0 + 2.0 * ti) * xv;
            assert!((g - want).abs() < 1e-8, "t = {ti}: {g} vs {want}");
        }
    }
    invalid(
        time_derivative_fd(
            &model,
            &x,
            &Tensor::new(&[-0.1f64, 0.1, 0.2], &Device::Cpu)?,
            1e-3,
            5e-4,
        ),
        ">= 0",
    );
    Ok(())
}

/// The score-FPE's finite-difference ∂ₜs at t = T stays inside [0, T] (the exact mixture
/// refuses later times) and agrees with autodiff.
#[test]
fn score_fpe_stencil_stays_before_end_time() -> Result<()> {
    let sde = VpSde::default();
    let exact = mixture().diffused(sde);
    let x = Tensor::new(&[[0.3f64, -0.2], [1.0, 0.5]], &Device::Cpu)?;
    let t = Tensor::new(&[1.0f64, 0.9999], &Device::Cpu)?;
    let mut rng = StdRng::seed_from_u64(0);
    let fd = ScoreFpe::new().with_time_derivative(TimeDerivative::PAPER_STENCIL)?;
    let fd = fd.residual(&sde, &exact, &x, &t, &mut rng)?.to_vec2::<f64>()?;
    let ad = ScoreFpe::new().with_time_derivative(TimeDerivative::Autodiff)?;
    let ad = ad.residual(&sde, &exact, &x, &t, &mut rng)?.to_vec2::<f64>()?;
    for (a, b) in fd.iter().flatten().zip(ad.iter().flatten()) {
        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
    Ok(())
}

/// Box collocation with a boundary term does not use the batch's points: an empty batch
/// gives a finite penalty (it used to divide by zero).
#[test]
fn log_density_fp_box_with_boundary_on_an_empty_batch() -> Result<()> {
    let potential = MlpPotential::new(builder(&VarMap::new(), DType::F64), PotentialConfig::default())?;
    let fp = LogDensityFp::paper(3.5)?.with_collocation(Collocation::UniformBox {
        low: -3.5,
        high: 3.5,
        points: 50,
        eps: 1e-5,
    })?;
    let x = Tensor::zeros((0, 2), DType::F64, &Device::Cpu)?;
    let t = Tensor::zeros(0, DType::F64, &Device::Cpu)?;
    let sde = OuSde::default();
    let penalty = fp.penalty(&sde, &potential, &x, &t, &mut StdRng::seed_from_u64(0))?;
    assert!(penalty.to_scalar::<f64>()?.is_finite());
    // A rank-1 "batch" is a shape error, not an index panic.
    let bad = Tensor::zeros(3, DType::F64, &Device::Cpu)?;
    assert!(matches!(
        fp.penalty(&sde, &potential, &bad, &bad, &mut StdRng::seed_from_u64(0)),
        Err(Error::Shape(_))
    ));
    Ok(())
}

#[test]
fn dequantization_refuses_data_outside_unit_interval() -> Result<()> {
    let sde = VpSde::default();
    let exact = mixture().diffused(sde);
    let likelihood = Likelihood::new().with_dequantization(Dequantization::eight_bit());
    let raw = Tensor::new(&[[0.0f64, 255.0], [12.0, 128.0]], &Device::Cpu)?;
    invalid(
        likelihood.evaluate(&sde, &exact, &raw, &mut StdRng::seed_from_u64(0)),
        "divide",
    );
    let negative = Tensor::new(&[[-0.5f64, 0.5]], &Device::Cpu)?;
    invalid(
        likelihood.evaluate(&sde, &exact, &negative, &mut StdRng::seed_from_u64(0)),
        "[0, 1]",
    );
    Ok(())
}

#[test]
fn ve_refuses_parameters_whose_derived_quantities_overflow() {
    invalid(VeSde::new(1e-300, 1e300), "finite");
    invalid(VeSde::new(1e-10, 1e200), "finite"); // σ_max² overflows
    invalid(VeSde::default().with_end_time(1e3), "finite"); // σ(T) = 0.01·5000^1000
    assert!(VeSde::new(1e-3, 1e3).is_ok());
    invalid(OuSde::new(1.0, 1e200, 10.0), "finite");
    invalid(OuSde::new(1e-300, 1e10, 10.0), "finite");
    assert!(OuSde::new(1e-3, 1e3, 10.0).is_ok());
}

mod metrics {
    use super::*;
    use scoresde::metrics::{
        energy_distance, histogram_w2, mmd2_unbiased, sliced_w2, w2_exact, w2_squared_exact, Grid,
        MAX_W2_EXACT_POINTS,
    };

    fn points(rng: &mut StdRng, n: usize, scale: f64) -> Tensor {
        let v: Vec<f64> = (0..2 * n).map(|_| rng.random_range(-1.0..1.0) * scale).collect();
        Tensor::from_vec(v, (n, 2), &Device::Cpu).unwrap()
    }

    fn close(a: f64, b: f64, what: &str) {
        assert!(
            a.is_finite() && (a - b).abs() <= 1e-12 * b.abs(),
            "{what}: {a:e} vs {b:e}"
        );
    }

    /// Every distance is finite and scales exactly with points near the ends of f64's
    /// range, where squared distances overflow (w2_exact used to hang there) or underflow.
    #[test]
    fn distances_scale_exactly_over_the_whole_f64_range() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(6);
        let (x, y) = (points(&mut rng, 40, 1.0), points(&mut rng, 40, 1.0));
        let w2 = w2_exact(&x, &y)?;
        let energy = energy_distance(&x, &y)?;
        let sliced = sliced_w2(&x, &y, 20, &mut StdRng::seed_from_u64(1))?;
        let mmd = mmd2_unbiased(&x, &y, Some(0.7))?;
        let mmd_median = mmd2_unbiased(&x, &y, None)?;
        // Powers of two scale floating point exactly, so the results must match closely.
        for scale in [2f64.powi(1000), 2f64.powi(-1000), 2f64.powi(1023)] {
            let (xs, ys) = ((&x * scale)?, (&y * scale)?);
            close(w2_exact(&xs, &ys)?, w2 * scale, "W2");
            close(energy_distance(&xs, &ys)?, energy * scale, "energy");
            close(
                sliced_w2(&xs, &ys, 20, &mut StdRng::seed_from_u64(1))?,
                sliced * scale,
                "sliced",
            );
            close(mmd2_unbiased(&xs, &ys, Some(0.7 * scale))?, mmd, "MMD");
            close(mmd2_unbiased(&xs, &ys, None)?, mmd_median, "MMD median");
        }
        // Far apart, W2 is representable and its square is not.
        let far = Tensor::new(&[[1e300f64, 0.0]], &Device::Cpu)?;
        let near = Tensor::new(&[[-1e300f64, 0.0]], &Device::Cpu)?;
        close(w2_exact(&far, &near)?, 2e300, "W2 far");
        assert!(matches!(w2_squared_exact(&far, &near), Err(Error::NonFinite(_))));
        Ok(())
    }

    /// A model whose penalty overflows gives an error from mean_penalty, not inf.
    #[test]
    fn mean_penalty_refuses_a_non_finite_penalty() -> Result<()> {
        use scoresde::metrics::mean_penalty;
        let sde = VpSde::default();
        let huge = |x: &Tensor, _t: &Tensor| Ok((x.sqr()? * 1e300)?); // s = 1e300·x²
        let fpe = ScoreFpe::new();
        let data = Tensor::new(&[[1.0f64, 2.0], [0.5, -1.0]], &Device::Cpu)?;
        let r = mean_penalty(&sde, &huge, &fpe, 0.05, &data, &mut StdRng::seed_from_u64(0));
        assert!(matches!(r, Err(Error::NonFinite(_))), "{r:?}");
        Ok(())
    }

    #[test]
    fn w2_exact_bounds_its_cost_matrix() -> Result<()> {
        let n = MAX_W2_EXACT_POINTS + 1;
        let x = Tensor::zeros((n, 2), DType::F64, &Device::Cpu)?;
        invalid(w2_exact(&x, &x), &format!("{n} x {n} cost matrix"));
        Ok(())
    }

    #[test]
    fn grids_and_histograms_stay_finite() -> Result<()> {
        invalid(Grid::new(-1e308, 1e308, 64), "finite width");
        let grid = Grid::new(-1e200, 1e200, 4)?;
        let x = Tensor::new(&[[-9e199f64], [9e199]], &Device::Cpu)?;
        let y = Tensor::new(&[[9e199f64], [9e199]], &Device::Cpu)?;
        // Half the mass moves three cells of width 5e199: W2 = √(1/2)·1.5e200.
        close(
            histogram_w2(&x, &y, &grid)?,
            1.5e200 * 0.5f64.sqrt(),
            "histogram W2",
        );
        Ok(())
    }
}

/// Far from every component (|x| ~ 1e300) the exact score is still finite and right.
#[test]
fn mixture_score_far_away() -> Result<()> {
    let m = GaussianMixture::new(vec![1.0], vec![vec![0.5, 0.0]], vec![Covariance::Isotropic(2.0)])?;
    let sde = VpSde::default();
    let x = Tensor::new(&[[1e300f64, -1e300], [3.0, 1.0]], &Device::Cpu)?;
    let t = Tensor::new(&[0.3f64, 0.3], &Device::Cpu)?;
    let s = m.diffused(sde).score(&x, &t)?.to_vec2::<f64>()?;
    let (alpha, sigma) = (sde.mean_coeff(0.3), sde.std(0.3));
    let var = alpha * alpha * 2.0 + sigma * sigma;
    let want = [
        [-(1e300 - alpha * 0.5) / var, 1e300 / var],
        [-(3.0 - alpha * 0.5) / var, -1.0 / var],
    ];
    for (row, w) in s.iter().zip(want) {
        for (g, w) in row.iter().zip(w) {
            assert!((g - w).abs() <= 1e-12 * w.abs(), "{g} vs {w}");
        }
    }
    Ok(())
}

/// An isotropic mixture in 100,000 dimensions: no d × d eigenbasis per component (it
/// would take 80 GB), and the score is the closed form.
#[test]
fn isotropic_mixture_in_high_dimension() -> Result<()> {
    let d = 100_000;
    let m = GaussianMixture::new(vec![1.0], vec![vec![0.5; d]], vec![Covariance::Isotropic(2.0)])?;
    let sde = VpSde::default();
    let x = Tensor::ones((2, d), DType::F64, &Device::Cpu)?;
    let t = Tensor::new(&[0.3f64, 0.3], &Device::Cpu)?;
    let s = m.diffused(sde).score(&x, &t)?.to_vec2::<f64>()?;
    let (alpha, sigma) = (sde.mean_coeff(0.3), sde.std(0.3));
    let want = -(1.0 - alpha * 0.5) / (alpha * alpha * 2.0 + sigma * sigma);
    assert!(s.iter().flatten().all(|v| (v - want).abs() < 1e-12 * want.abs()));
    Ok(())
}

mod training {
    use super::*;
    use scoresde::train::{load_weights, Objective, TrainConfig, Trainer, Weights};

    fn small() -> MlpConfig {
        MlpConfig {
            width: 8,
            depth: 1,
            fourier_features: 4,
            ..Default::default()
        }
    }

    /// A model built on another VarMap than the trainer's trains nothing: an error, and
    /// the trainer's variables stay as they were.
    #[test]
    fn fit_refuses_a_model_on_another_varmap() -> Result<()> {
        let sde = VpSde::default();
        let (theirs, ours) = (VarMap::new(), VarMap::new());
        let model = MlpScore::new(builder(&theirs, DType::F64), sde, small())?;
        let _bystander = MlpScore::new(builder(&ours, DType::F64), sde, small())?;
        let before = ours
            .all_vars()
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let config = TrainConfig {
            batch_size: 16,
            ..Default::default()
        };
        let mut trainer = Trainer::new(&ours, config)?;
        let objective = Objective::new(&sde, &model);
        invalid(
            trainer.fit(&objective, &mixture(), 3, |_| {}),
            "no variable received a gradient",
        );
        for (b, v) in before.iter().zip(ours.all_vars()) {
            assert_eq!(
                b.flatten_all()?.to_vec1::<f64>()?,
                v.as_tensor().flatten_all()?.to_vec1::<f64>()?
            );
        }
        Ok(())
    }

    /// A checkpoint whose weights hold a NaN is refused by both loaders.
    #[test]
    fn checkpoints_with_nan_weights_are_refused() -> Result<()> {
        let sde = VpSde::default();
        let vars = VarMap::new();
        let _model = MlpScore::new(builder(&vars, DType::F32), sde, small())?;
        let trainer = Trainer::new(&vars, TrainConfig::default())?;
        let dir = std::env::temp_dir().join(format!("scoresde-robust-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let (good, bad) = (dir.join("good.safetensors"), dir.join("bad.safetensors"));
        trainer.save_checkpoint(&good)?;
        let mut tensors = candle_core::safetensors::load(&good, &Device::Cpu)?;
        let key = "model/hidden.0.weight";
        let w = &tensors[key];
        let mut values = w.flatten_all()?.to_vec1::<f32>()?;
        values[0] = f32::NAN;
        let poisoned = Tensor::from_vec(values, w.shape(), &Device::Cpu)?;
        tensors.insert(key.into(), poisoned);
        candle_core::safetensors::save(&tensors, &bad)?;

        let mut trainer = Trainer::new(&vars, TrainConfig::default())?;
        trainer.load_checkpoint(&good)?;
        let refused = |r: Result<()>| match r {
            Err(Error::Checkpoint(msg)) => assert!(msg.contains(key) && msg.contains("NaN"), "{msg}"),
            other => panic!("expected a checkpoint error, got {other:?}"),
        };
        refused(trainer.load_checkpoint(&bad));
        refused(load_weights(&bad, &vars, Weights::Model));
        // The EMA group of the same file is clean.
        load_weights(&bad, &vars, Weights::Ema)?;
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}

/// Training times stay in [ε, T] for every time sampling (Beta12's shift by ε could pass T).
#[test]
fn training_times_stay_before_end_time() -> Result<()> {
    use scoresde::loss::{Dsm, TimeSampling};
    let sde = VpSde::default();
    for sampling in [TimeSampling::Uniform, TimeSampling::Beta12] {
        let dsm = Dsm::default().with_time_sampling(sampling).with_eps(0.3)?;
        let t = dsm.sample_times(
            &sde,
            20_000,
            DType::F32,
            &Device::Cpu,
            &mut StdRng::seed_from_u64(5),
        )?;
        sde.check_times(&t)?;
        let t = t.to_vec1::<f32>()?;
        assert!(t.iter().all(|&v| (0.3..=1.0).contains(&v)), "{sampling:?}");
    }
    Ok(())
}

/// A batch the user supplies enters at `evaluate_batch` and is checked there.
#[test]
fn supplied_batches_are_checked() -> Result<()> {
    use scoresde::loss::DsmBatch;
    use scoresde::train::Objective;
    let sde = VpSde::default();
    let model = |x: &Tensor, _t: &Tensor| Ok(x.neg()?); // checks nothing itself
    let objective = Objective::new(&sde, &model);
    let x = Tensor::new(&[[0.5f64, -0.5], [1.0, 0.0]], &Device::Cpu)?;
    let batch = |t: &[f64], noise: &Tensor| DsmBatch {
        x0: x.clone(),
        x_t: x.clone(),
        t: Tensor::new(t, &Device::Cpu).unwrap(),
        noise: noise.clone(),
    };
    let mut rng = StdRng::seed_from_u64(0);
    objective.evaluate_batch(batch(&[0.5, 1.0], &x), &mut rng)?;
    // t = 0 would divide by σ(0) = 0 under the constant weighting; t < 0 is outside [0, T].
    invalid(
        objective.evaluate_batch(batch(&[-0.5, 1.0], &x), &mut rng),
        "[0, T",
    );
    invalid(
        objective.evaluate_batch(batch(&[0.5, 1.5], &x), &mut rng),
        "[0, T",
    );
    let short = Tensor::new(&[[0.5f64, -0.5]], &Device::Cpu)?;
    assert!(matches!(
        objective.evaluate_batch(batch(&[0.5, 1.0], &short), &mut rng),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        objective.evaluate_batch(batch(&[0.5], &x), &mut rng),
        Err(Error::Shape(_))
    ));
    let nan = Tensor::new(&[[f64::NAN, 0.0], [0.0, 0.0]], &Device::Cpu)?;
    assert!(matches!(
        objective.evaluate_batch(batch(&[0.5, 1.0], &nan), &mut rng),
        Err(Error::NonFinite(_))
    ));
    Ok(())
}

/// An objective can be shared between threads.
#[test]
fn objective_is_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<scoresde::train::Objective<'static, VpSde, MlpScore<VpSde>>>();
    send_sync::<scoresde::train::Objective<'static, OuSde, scoresde::GradientScore<MlpPotential>>>();
}

/// The gradient of one penalty alone, on a batch the user supplies, equals the gradient
/// of the total minus that of the DSM term (λ = 1 here).
#[test]
fn one_penalty_gradient_on_a_supplied_batch() -> Result<()> {
    use scoresde::autodiff::Divergence;
    use scoresde::loss::DsmBatch;
    use scoresde::train::{gradients, Objective};
    let vars = VarMap::new();
    let sde = VpSde::default();
    let config = MlpConfig {
        width: 8,
        depth: 2,
        fourier_features: 4,
        ..Default::default()
    };
    let model = MlpScore::new(builder(&vars, DType::F64), sde, config)?;
    let fpe = ScoreFpe::new()
        .with_divergence(Divergence::Exact)?
        .with_time_derivative(TimeDerivative::Autodiff)?;
    let objective = Objective::new(&sde, &model).with_penalty(1.0, fpe)?;
    let x0 = Tensor::new(&[[0.5f64, -0.5], [1.0, 0.0], [0.0, 2.0]], &Device::Cpu)?;
    let t = Tensor::new(&[0.3f64, 0.7, 0.05], &Device::Cpu)?;
    let noise = Tensor::new(&[[0.1f64, 0.2], [-0.3, 0.4], [1.0, -1.0]], &Device::Cpu)?;
    let x_t = sde.perturb(&x0, &t, &noise)?;
    let value = objective.evaluate_batch(DsmBatch { x0, x_t, t, noise }, &mut StdRng::seed_from_u64(0))?;
    let (total, dsm, penalty) = (
        gradients(&value.total, &vars)?,
        gradients(&value.dsm, &vars)?,
        gradients(&value.penalties[0], &vars)?,
    );
    assert_eq!(penalty.len(), 6); // 3 weights and 3 biases; the frequencies get none
    for (name, g) in &penalty {
        let want = (&total[name] - &dsm[name])?.flatten_all()?.to_vec1::<f64>()?;
        for (a, b) in g.flatten_all()?.to_vec1::<f64>()?.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{name}: {a} vs {b}");
        }
    }
    Ok(())
}

#[test]
fn cpu_settings_apply() {
    let applied = scoresde::speed::apply_cpu_settings();
    // This repository's .cargo/config.toml already sets CANDLE_NUM_THREADS: left alone.
    assert!(!applied.candle_threads_set);
    assert_eq!(std::env::var("CANDLE_NUM_THREADS").as_deref(), Ok("1"));
    assert_eq!(
        applied.malloc_tuned,
        cfg!(all(target_os = "linux", target_env = "gnu"))
    );
}

mod foreign {
    use super::*;
    use scoresde::train::{load_foreign_weights, torch_sequential_names};
    use std::collections::HashMap;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "scoresde-robust-{}-{name}.safetensors",
            std::process::id()
        ))
    }

    /// A "PyTorch" file holding another MlpScore's weights under nn.Sequential names
    /// loads into a fresh model, which then computes the same scores; mismatches are
    /// errors that name the tensors, and change nothing.
    #[test]
    fn mlp_score_from_torch_names() -> Result<()> {
        let sde = VpSde::default();
        let config = |seed| MlpConfig {
            width: 8,
            depth: 2,
            fourier_features: 4,
            seed,
            ..Default::default()
        };
        let (source_vars, target_vars) = (VarMap::new(), VarMap::new());
        let source = MlpScore::new(builder(&source_vars, DType::F32), sde, config(1))?;
        let target = MlpScore::new(builder(&target_vars, DType::F64), sde, config(2))?;
        let mut names = torch_sequential_names(2, "", "net");
        names.push(("time.frequencies".into(), "embed.W".into()));
        let data = source_vars.data().lock().unwrap();
        let mut file: HashMap<String, Tensor> = names
            .iter()
            .map(|(ours, theirs)| (theirs.clone(), data[ours.as_str()].as_tensor().copy().unwrap()))
            .collect();
        drop(data);
        file.insert("optimizer.step".into(), Tensor::new(&[3f32], &Device::Cpu)?); // ignored
        let path = temp("good");
        candle_core::safetensors::save(&file, &path)?;

        let x = Tensor::new(&[[0.3f64, -0.2], [1.0, 2.0]], &Device::Cpu)?;
        let t = Tensor::new(&[0.25f64, 0.75], &Device::Cpu)?;
        let before = target.score(&x, &t)?.flatten_all()?.to_vec1::<f64>()?;
        // Mismatches first: each is an error, and the target keeps its weights.
        let mut transposed = file.clone();
        transposed.insert("net.4.weight".into(), file["net.4.weight"].t()?.contiguous()?); // [2, 8] as [8, 2]
        let bad = temp("transposed");
        candle_core::safetensors::save(&transposed, &bad)?;
        let checkpoint = |r: Result<()>, needle: &str| match r {
            Err(Error::Checkpoint(msg)) => assert!(msg.contains(needle), "{msg:?} lacks {needle:?}"),
            other => panic!("expected a checkpoint error mentioning {needle:?}, got {other:?}"),
        };
        checkpoint(load_foreign_weights(&bad, &target_vars, &names), "transposed");
        let mut renamed = names.clone();
        renamed[0].1 = "net.0.W".into();
        checkpoint(
            load_foreign_weights(&path, &target_vars, &renamed),
            "no tensor 'net.0.W'",
        );
        checkpoint(
            load_foreign_weights(&path, &target_vars, &names[1..]),
            "no entry for the variables",
        );
        assert_eq!(target.score(&x, &t)?.flatten_all()?.to_vec1::<f64>()?, before);

        load_foreign_weights(&path, &target_vars, &names)?;
        let want = source.score(&x.to_dtype(DType::F32)?, &t.to_dtype(DType::F32)?)?;
        let got = target.score(&x, &t)?.flatten_all()?.to_vec1::<f64>()?;
        for (g, w) in got.iter().zip(want.flatten_all()?.to_vec1::<f32>()?) {
            assert!((g - w as f64).abs() < 1e-5 * (1.0 + g.abs()), "{g} vs {w}");
        }
        std::fs::remove_file(&path)?;
        std::fs::remove_file(&bad)?;
        Ok(())
    }
}

/// A model returning the wrong dtype or shape is named as such by the crate, not by a
/// candle op further on.
#[test]
fn wrong_score_dtype_or_shape_is_named() -> Result<()> {
    let sde = VpSde::default();
    let x = Tensor::new(&[[0.3f64, -0.2], [1.0, 0.5]], &Device::Cpu)?;
    let t = Tensor::new(&[0.5f64, 0.5], &Device::Cpu)?;
    let f32_score = |x: &Tensor, _t: &Tensor| Ok(x.to_dtype(DType::F32)?.neg()?);
    let wide_score = |x: &Tensor, _t: &Tensor| Ok(Tensor::cat(&[x, x], 1)?);
    let fpe = ScoreFpe::new();
    let mut rng = StdRng::seed_from_u64(0);
    let named = |r: Result<Tensor>| match r {
        Err(Error::Shape(msg)) => assert!(msg.contains("the score model returned"), "{msg}"),
        other => panic!("expected the crate's shape error, got {other:?}"),
    };
    named(fpe.residual(&sde, &f32_score, &x, &t, &mut rng));
    named(fpe.residual(&sde, &wide_score, &x, &t, &mut rng));
    let likelihood = Likelihood::new();
    match likelihood.evaluate(&sde, &f32_score, &x, &mut rng) {
        Err(Error::Shape(msg)) => assert!(msg.contains("dtype F32"), "{msg}"),
        other => panic!("expected the crate's shape error, got {other:?}"),
    }
    Ok(())
}

/// Hundreds of malformed inputs (shapes, dtypes, NaN, inf, huge values) against the public
/// entry points: each gives an error or a finite result, never a panic.
#[test]
fn hostile_inputs_never_panic_nor_return_non_finite() -> Result<()> {
    use scoresde::autodiff::{divergence_exact, leaf};
    use scoresde::loss::Dsm;
    use scoresde::metrics::{energy_distance, histogram_w2, mmd2_unbiased, sliced_w2, w2_exact, Grid};
    use std::panic::{catch_unwind, AssertUnwindSafe};

    let dev = Device::Cpu;
    let mut inputs: Vec<(String, Tensor)> = Vec::new();
    let shapes: [&[usize]; 7] = [&[], &[0], &[0, 2], &[3], &[3, 2], &[3, 3], &[2, 2, 1]];
    for shape in shapes {
        let n: usize = shape.iter().product();
        for (label, value) in [
            ("0.5", 0.5),
            ("nan", f64::NAN),
            ("inf", f64::INFINITY),
            ("1e300", 1e300),
        ] {
            let base = Tensor::from_vec(vec![value; n], shape, &dev)?;
            for dtype in [DType::F64, DType::F32, DType::U8, DType::F16] {
                if let Ok(t) = base.to_dtype(dtype) {
                    inputs.push((format!("{shape:?} {label} {dtype:?}"), t));
                }
            }
        }
    }
    let sde = VpSde::default();
    let exact = mixture().diffused(sde);
    let net = MlpScore::new(builder(&VarMap::new(), DType::F32), sde, MlpConfig::default())?;
    let potential = MlpPotential::new(builder(&VarMap::new(), DType::F64), PotentialConfig::default())?;
    let good_x = Tensor::new(&[[0.3f64, -0.2], [1.0, 0.5], [0.0, 0.0]], &dev)?;
    let good_t = Tensor::new(&[0.5f64, 0.5, 0.5], &dev)?;
    let grid = Grid::new(-4.0, 4.0, 16)?;

    let finite = |t: &Tensor| -> bool {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .map(|v| v.iter().all(|x| x.is_finite()))
            .unwrap_or(false)
    };
    let mut failures = Vec::new();
    let mut calls = 0;
    // Every public function, entry point or building block (a model's score, `perturb`,
    // `divergence_exact`, a residual), promises a finite result or an error: NaN in never
    // becomes NaN out, and a value far beyond the data's scale that overflows is an error.
    let mut check = |what: String, f: &mut dyn FnMut() -> std::result::Result<bool, Error>| {
        calls += 1;
        match catch_unwind(AssertUnwindSafe(f)) {
            Err(_) => failures.push(format!("{what}: panicked")),
            Ok(Ok(false)) => failures.push(format!("{what}: Ok with a non-finite result")),
            Ok(_) => {}
        }
    };
    for (label, bad) in &inputs {
        let mut rng = StdRng::seed_from_u64(0);
        check(format!("w2_exact {label}"), &mut || {
            Ok(w2_exact(bad, &good_x)?.is_finite())
        });
        check(format!("sliced_w2 {label}"), &mut || {
            Ok(sliced_w2(bad, bad, 5, &mut rng)?.is_finite())
        });
        check(format!("mmd2 {label}"), &mut || {
            Ok(mmd2_unbiased(bad, &good_x, None)?.is_finite())
        });
        check(format!("energy {label}"), &mut || {
            Ok(energy_distance(&good_x, bad)?.is_finite())
        });
        check(format!("histogram_w2 {label}"), &mut || {
            Ok(histogram_w2(bad, &good_x, &grid)?.is_finite())
        });
        check(format!("mixture score x {label}"), &mut || {
            Ok(finite(&exact.score(bad, &good_t)?))
        });
        check(format!("mixture score t {label}"), &mut || {
            Ok(finite(&exact.score(&good_x, bad)?))
        });
        check(format!("mlp score x {label}"), &mut || {
            Ok(finite(&net.score(bad, &good_t)?))
        });
        check(format!("mlp score t {label}"), &mut || {
            Ok(finite(&net.score(&good_x, bad)?))
        });
        check(format!("potential t {label}"), &mut || {
            Ok(finite(&potential.log_density(&good_x, bad)?))
        });
        check(format!("perturb x {label}"), &mut || {
            Ok(finite(&sde.perturb(bad, &good_t, bad)?))
        });
        check(format!("perturb t {label}"), &mut || {
            Ok(finite(&sde.perturb(&good_x, bad, &good_x)?))
        });
        check(format!("dsm draw {label}"), &mut || {
            Ok(finite(&Dsm::default().draw(&sde, bad, &mut rng)?.x_t))
        });
        check(format!("fd t {label}"), &mut || {
            Ok(finite(&time_derivative_fd(&exact, &good_x, bad, 1e-3, 5e-4)?))
        });
        check(format!("fpe residual x {label}"), &mut || {
            Ok(finite(
                &ScoreFpe::new().residual(&sde, &exact, bad, &good_t, &mut rng)?,
            ))
        });
        check(format!("fpe residual t {label}"), &mut || {
            Ok(finite(
                &ScoreFpe::new().residual(&sde, &exact, &good_x, bad, &mut rng)?,
            ))
        });
        check(format!("log-density FP {label}"), &mut || {
            let fp = LogDensityFp::paper(3.5)?;
            Ok(finite(&fp.penalty(
                &OuSde::default(),
                &potential,
                bad,
                &good_t,
                &mut rng,
            )?))
        });
        check(format!("trainer step {label}"), &mut || {
            use scoresde::train::{Objective, TrainConfig, Trainer};
            let vars = VarMap::new();
            let small = MlpConfig {
                width: 8,
                depth: 1,
                fourier_features: 4,
                ..Default::default()
            };
            let model = MlpScore::new(builder(&vars, DType::F64), sde, small)?;
            let mut trainer = Trainer::new(
                &vars,
                TrainConfig {
                    batch_size: 3,
                    ..Default::default()
                },
            )?;
            let data = |_n: usize, _rng: &mut dyn rand::RngCore| Ok(bad.clone());
            let report = trainer.step(&Objective::new(&sde, &model), &data)?;
            Ok(report.loss.is_finite() && report.grad_norm.is_finite())
        });
        check(format!("likelihood {label}"), &mut || {
            Ok(finite(
                &Likelihood::new()
                    .evaluate(&sde, &exact, bad, &mut rng)?
                    .log_density,
            ))
        });
        check(format!("divergence {label}"), &mut || {
            let x = leaf(bad)?;
            Ok(finite(&divergence_exact(&x.sqr()?, &x)?))
        });
        check(format!("divergence hutchinson {label}"), &mut || {
            let x = leaf(bad)?;
            let probes = [x.ones_like()?];
            Ok(finite(&scoresde::autodiff::divergence_hutchinson(
                &x.sqr()?,
                &x,
                &probes,
            )?))
        });
        check(format!("grad {label}"), &mut || {
            let x = leaf(bad)?;
            Ok(finite(&scoresde::autodiff::grad(&x.sqr()?, &x)?))
        });
        check(format!("time_derivative_autodiff {label}"), &mut || {
            Ok(finite(&scoresde::autodiff::time_derivative_autodiff(
                &exact, &good_x, bad,
            )?))
        });
    }
    assert!(calls > 1000, "{calls} calls");
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// Absurd sizes are errors that name them, before anything is allocated.
#[test]
fn absurd_sizes_are_errors() -> Result<()> {
    use scoresde::regularizer::Boundary;
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(0);
    invalid(
        scoresde::random::standard_normal((usize::MAX, 2), DType::F32, &dev, &mut rng),
        "elements",
    );
    invalid(
        scoresde::random::uniform((1 << 20, 1 << 20), 0.0, 1.0, DType::F32, &dev, &mut rng),
        "1099511627776",
    );
    invalid(
        mixture().sample(usize::MAX / 2, DType::F32, &dev, &mut rng),
        "elements",
    );
    invalid(
        VpSde::default().sample_prior((1 << 31, 1), DType::F32, &dev, &mut rng),
        "elements",
    );
    let potential = MlpPotential::new(builder(&VarMap::new(), DType::F64), PotentialConfig::default())?;
    let fp = LogDensityFp::paper(3.5)?.with_boundary(Some(Boundary::new(1.0, usize::MAX / 2)?));
    let x = Tensor::zeros((2, 2), DType::F64, &dev)?;
    let t = Tensor::new(&[0.5f64, 0.5], &dev)?;
    invalid(
        fp.penalty(&OuSde::default(), &potential, &x, &t, &mut rng),
        "boundary points",
    );
    let wide = MlpConfig {
        width: 1 << 31,
        depth: 2,
        ..Default::default()
    };
    invalid(
        MlpScore::new(builder(&VarMap::new(), DType::F32), VpSde::default(), wide),
        "elements",
    );
    let many = scoresde::autodiff::Divergence::Hutchinson {
        probe: scoresde::autodiff::Probe::Rademacher,
        probes: usize::MAX,
    };
    invalid(ScoreFpe::new().with_divergence(many), "probes");
    Ok(())
}
