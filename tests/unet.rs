//! The U-Net score model on images: shapes, the reference architecture, and every
//! derivative the penalties and the likelihood take, against finite differences.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::autodiff::{divergence_exact, grad, leaf, Divergence, Probe};
use scoresde::regularizer::{Regularizer, ScoreFpe, TimeDerivative, TimeWeighting};
use scoresde::score::{UNetConfig, UNetScore};
use scoresde::sde::VpSde;
use scoresde::{Error, ScoreModel};

/// 1×4×4 images, two levels (4×4 and 2×2), widths 4 and 8, two groups: every kind of layer
/// of the reference network (3×3 and 1×1 convolutions, stride 2, upsampling, GroupNorm,
/// skips, the time embedding) at a size where finite differences are cheap.
fn tiny() -> UNetConfig {
    UNetConfig {
        height: 4,
        width: 4,
        widths: vec![4, 8],
        time_features: 8,
        groups: 2,
        fourier_scale: 1.0,
        ..Default::default()
    }
}

fn tiny_model(vars: &VarMap) -> UNetScore<VpSde> {
    let vb = VarBuilder::from_varmap(vars, DType::F64, &Device::Cpu);
    UNetScore::new(vb, VpSde::default(), tiny()).unwrap()
}

fn points(n: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = scoresde::random::standard_normal((n, 1, 4, 4), DType::F64, &Device::Cpu, &mut rng).unwrap();
    let t = scoresde::random::uniform(n, 0.2, 0.8, DType::F64, &Device::Cpu, &mut rng).unwrap();
    (x, t)
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn with_entry(x: &Tensor, i: usize, delta: f64) -> Tensor {
    let mut v = values(x);
    v[i] += delta;
    Tensor::from_vec(v, x.shape(), x.device()).unwrap()
}

#[test]
fn the_reference_network_is_the_spec() {
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    let model = UNetScore::new(vb, VpSde::default(), UNetConfig::default()).unwrap();
    // UNET.md: 706,849 trainable parameters, plus 64 fixed Fourier frequencies.
    let total: usize = vars.all_vars().iter().map(|v| v.elem_count()).sum();
    assert_eq!(total, 706_849 + 64);
    let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(&[0.1f32, 0.7], &Device::Cpu).unwrap();
    let s = model.score(&x, &t).unwrap();
    assert_eq!(s.dims(), [2, 1, 28, 28]);
    assert!(values(&s.to_dtype(DType::F64).unwrap())
        .iter()
        .all(|v| v.is_finite()));
}

#[test]
fn the_same_seed_gives_the_same_network() {
    let (x, t) = points(2, 1);
    let a = tiny_model(&VarMap::new()).score(&x, &t).unwrap();
    let b = tiny_model(&VarMap::new()).score(&x, &t).unwrap();
    assert_eq!(values(&a), values(&b));
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F64, &Device::Cpu);
    let other = UNetScore::new(vb, VpSde::default(), UNetConfig { seed: 1, ..tiny() }).unwrap();
    assert_ne!(values(&a), values(&other.score(&x, &t).unwrap()));
}

/// Images do not mix: the score of one image does not depend on the others in the batch
/// (GroupNorm normalizes per image), which the per-sample derivatives rely on.
#[test]
fn samples_in_a_batch_are_independent() {
    let model = tiny_model(&VarMap::new());
    let (x, t) = points(3, 2);
    let all = model.score(&x, &t).unwrap();
    let one = model
        .score(&x.narrow(0, 1, 1).unwrap(), &t.narrow(0, 1, 1).unwrap())
        .unwrap();
    let gap = (all.narrow(0, 1, 1).unwrap() - one)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(gap.to_scalar::<f64>().unwrap() < 1e-12);
}

/// f64, central differences with h = 1e-5: truncation ~h²·|s'''| ~ 1e-10, rounding
/// ~1e-16/h ~ 1e-11, so 1e-6 relative leaves a wide margin and still catches any wrong
/// derivative (which is off by O(1)).
const H: f64 = 1e-5;
const TOL: f64 = 1e-6;

#[test]
fn input_gradient_matches_finite_differences() {
    let model = tiny_model(&VarMap::new());
    let (x0, t) = points(2, 3);
    let weights = scoresde::random::standard_normal(
        (2, 1, 4, 4),
        DType::F64,
        &Device::Cpu,
        &mut StdRng::seed_from_u64(4),
    )
    .unwrap();
    let objective = |x: &Tensor| {
        (model.score(x, &t).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let x = leaf(&x0).unwrap();
    let analytic = values(&grad(&objective(&x), &x).unwrap());
    for (i, &g) in analytic.iter().enumerate() {
        let f = |d: f64| objective(&with_entry(&x0, i, d)).to_scalar::<f64>().unwrap();
        let fd = (f(H) - f(-H)) / (2.0 * H);
        assert!((fd - g).abs() < TOL * (1.0 + fd.abs()), "x[{i}]: {g} vs FD {fd}");
    }
}

#[test]
fn divergences_match_finite_differences() {
    let model = tiny_model(&VarMap::new());
    let (x0, t) = points(2, 5);
    let x = leaf(&x0).unwrap();
    let s = model.score(&x, &t).unwrap();
    // The exact divergence: the trace of the finite-difference Jacobian, per image.
    let exact = divergence_exact(&s, &x).unwrap().to_vec1::<f64>().unwrap();
    let d = 16;
    let trace: Vec<f64> = (0..2)
        .map(|b| {
            (b * d..(b + 1) * d)
                .map(|i| {
                    let f = |h: f64| values(&model.score(&with_entry(&x0, i, h), &t).unwrap())[i];
                    (f(H) - f(-H)) / (2.0 * H)
                })
                .sum()
        })
        .collect();
    for b in 0..2 {
        assert!(
            (exact[b] - trace[b]).abs() < TOL * (1.0 + trace[b].abs()),
            "{exact:?} vs {trace:?}"
        );
    }
    // Hutchinson with a fixed Rademacher probe v: vᵀJv, the directional difference along v.
    let hutchinson = Divergence::Hutchinson {
        probe: Probe::Rademacher,
        probes: 1,
    };
    let probes = hutchinson.draw_probes(&x, &mut StdRng::seed_from_u64(6)).unwrap();
    let estimate = hutchinson
        .evaluate(&s, &x, &probes)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let v = &probes[0];
    let along = |h: f64| {
        let moved = (&x0 + (v * h).unwrap()).unwrap();
        (model.score(&moved, &t).unwrap() * v)
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .sum(1)
            .unwrap()
    };
    let fd = values(&((along(H) - along(-H)).unwrap() / (2.0 * H)).unwrap());
    for b in 0..2 {
        assert!(
            (estimate[b] - fd[b]).abs() < TOL * (1.0 + fd[b].abs()),
            "{estimate:?} vs {fd:?}"
        );
    }
}

/// The score-FPE penalty as it is trained on images (Hutchinson divergence, FP-Diffusion's
/// stencil in t): its gradient in every variable against central differences, with the
/// probes redrawn from the same seed on each side. This differentiates the network three
/// times (∂ₓ of vᵀ∂ₓs, then the weights), through every layer kind.
#[test]
fn penalty_parameter_gradients_match_finite_differences() {
    let vars = VarMap::new();
    let model = tiny_model(&vars);
    let sde = VpSde::default();
    let (x, t) = points(2, 7);
    let fpe = ScoreFpe::new()
        .with_divergence(Divergence::Hutchinson {
            probe: Probe::Rademacher,
            probes: 1,
        })
        .unwrap()
        .with_weighting(TimeWeighting::Constant)
        .unwrap()
        .with_time_derivative(TimeDerivative::FiniteDifference { hs: 1e-3, hd: 1e-3 })
        .unwrap();
    let penalty = || {
        fpe.penalty(&sde, &model, &x, &t, &mut StdRng::seed_from_u64(8))
            .unwrap()
    };
    let grads = penalty().backward().unwrap();
    let mut checked = 0;
    for (name, var) in vars.data().lock().unwrap().iter() {
        if name.ends_with("frequencies") {
            assert!(
                grads.get(var.as_tensor()).is_none(),
                "the Fourier frequencies are fixed"
            );
            continue;
        }
        let analytic = values(
            grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient")),
        );
        let original = var.as_tensor().copy().unwrap();
        for &i in &[0, analytic.len() / 2, analytic.len() - 1] {
            let at = |d: f64| {
                var.set(&with_entry(&original, i, d)).unwrap();
                let p = penalty().to_scalar::<f64>().unwrap();
                var.set(&original).unwrap();
                p
            };
            let fd = (at(H) - at(-H)) / (2.0 * H);
            assert!(
                (fd - analytic[i]).abs() < TOL * (1.0 + fd.abs()),
                "{name}[{i}]: {} vs FD {fd}",
                analytic[i]
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "checked {checked} entries");
}

#[test]
fn bad_configurations_and_inputs_are_errors() {
    let build = |config: UNetConfig| {
        let vars = VarMap::new();
        UNetScore::new(
            VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
            VpSde::default(),
            config,
        )
    };
    for config in [
        UNetConfig {
            widths: vec![],
            ..tiny()
        },
        UNetConfig { groups: 3, ..tiny() }, // widths 4 and 8 do not split into 3 groups
        UNetConfig { height: 5, ..tiny() },
        UNetConfig {
            widths: vec![4, 4, 4, 4],
            ..tiny()
        }, // 4 px cannot halve 3 times
        UNetConfig {
            time_features: 7,
            ..tiny()
        },
        UNetConfig {
            blocks_per_level: 0,
            ..tiny()
        },
        UNetConfig {
            fourier_scale: f64::NAN,
            ..tiny()
        },
    ] {
        assert!(build(config.clone()).is_err(), "{config:?} was accepted");
    }
    let model = tiny_model(&VarMap::new());
    let t = Tensor::new(&[0.5f64], &Device::Cpu).unwrap();
    for shape in [vec![1, 1, 4, 5], vec![1, 2, 4, 4], vec![1, 16], vec![0, 1, 4, 4]] {
        let x = Tensor::zeros(shape.as_slice(), DType::F64, &Device::Cpu).unwrap();
        assert!(matches!(model.score(&x, &t), Err(Error::Shape(_))), "{shape:?}");
    }
    let x = Tensor::zeros((2, 1, 4, 4), DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(model.score(&x, &t), Err(Error::Shape(_))));
    let one = Tensor::zeros((1, 1, 4, 4), DType::F64, &Device::Cpu).unwrap();
    for bad_t in [0.0, 1.5, f64::NAN] {
        let t = Tensor::new(&[bad_t], &Device::Cpu).unwrap();
        assert!(model.score(&one, &t).is_err(), "t = {bad_t} was accepted");
    }
    let pixels = Tensor::zeros((1, 1, 4, 4), DType::U8, &Device::Cpu).unwrap();
    assert!(matches!(model.score(&pixels, &t), Err(Error::Shape(_))));
}

/// The image paths of the samplers and the likelihood: `[B, C, H, W]` in and out, finite.
#[test]
fn samplers_and_likelihood_take_images() {
    use scoresde::likelihood::{Dequantization, Likelihood};
    use scoresde::solver::{OdeSampler, PredictorCorrector, Rk45, Sampler};
    let model = tiny_model(&VarMap::new());
    let sde = VpSde::default();
    let mut rng = StdRng::seed_from_u64(12);
    let noise =
        scoresde::sde::Sde::sample_prior(&sde, (3, 1, 4, 4), DType::F64, &Device::Cpu, &mut rng).unwrap();
    let em = PredictorCorrector::euler_maruyama(20)
        .sample(&sde, &model, &noise, &mut rng)
        .unwrap();
    let ode = OdeSampler::new(Rk45::new(1e-4, 1e-4).unwrap())
        .sample(&sde, &model, &noise, &mut rng)
        .unwrap();
    for x in [&em.x, &ode.x] {
        assert_eq!(x.dims(), [3, 1, 4, 4]);
        assert!(values(x).iter().all(|v| v.is_finite()));
    }
    let pixels = Tensor::from_vec(
        (0..48).map(|i| (i * 5 % 256) as f64 / 255.0).collect::<Vec<_>>(),
        (3, 1, 4, 4),
        &Device::Cpu,
    )
    .unwrap();
    let estimate = Likelihood::new()
        .with_divergence(Divergence::Hutchinson {
            probe: Probe::Rademacher,
            probes: 1,
        })
        .unwrap()
        .with_dequantization(Dequantization::eight_bit().centered())
        .evaluate(&sde, &model, &pixels, &mut rng)
        .unwrap();
    assert_eq!(estimate.bits_per_dim.dims(), [3]);
    assert!(values(&estimate.bits_per_dim)
        .iter()
        .all(|v| v.is_finite() && *v > 0.0));
}
