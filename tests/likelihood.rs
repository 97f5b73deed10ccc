//! Likelihoods through the probability-flow ODE against the exact mixture density.

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::autodiff::{Divergence, Probe};
use scoresde::likelihood::{Dequantization, Likelihood};
use scoresde::score::{Covariance, GaussianMixture, LogDensityModel};
use scoresde::sde::{Sde, SubVpSde, VeSde, VpSde};
use scoresde::solver::Rk45;
use scoresde::Error;

fn mixture(d: usize) -> GaussianMixture {
    let mean = |s: f64| (0..d).map(|i| s * (1.0 + 0.3 * i as f64)).collect::<Vec<_>>();
    let diag = (0..d).map(|i| 0.2 + 0.1 * i as f64).collect::<Vec<_>>();
    GaussianMixture::new(
        vec![0.4, 0.6],
        vec![mean(1.0), mean(-0.8)],
        vec![Covariance::Diagonal(diag), Covariance::Isotropic(0.3)],
    )
    .unwrap()
}

fn likelihood() -> Likelihood {
    Likelihood::new().with_solver(Rk45::new(1e-6, 1e-6).unwrap())
}

/// The ODE carries the exact density along: `log p_ε(x) = log p_T(x(T)) + ℓ(T)` holds with
/// the *exact* terminal density p_T. The estimator uses the prior in place of p_T, and the
/// two differ pointwise by ≈ α(T)⟨μ, z⟩ (VP: α(1) ≈ 0.0066, so ~1e-2 nats for these
/// means), which is a property of the SDE, not of the solver. So we check the ODE part,
/// `ℓ(T) = estimate − log prior(x(T))`, against `log p_ε(x) − log p_T(x(T))` to 1e-3 nats
/// (the RK45 tolerance 1e-6 leaves errors around 1e-5), and separately that the estimate
/// is off from the truth by exactly that prior mismatch.
fn check_exact<S: Sde + Clone>(name: &str, sde: S, d: usize) {
    let data = mixture(d);
    let exact = data.diffused(sde.clone());
    let mut rng = StdRng::seed_from_u64(d as u64);
    let n = 6;
    let x = exact.sample(n, 1e-5, DType::F64, &Device::Cpu, &mut rng).unwrap();
    let estimate = likelihood().evaluate(&sde, &exact, &x, &mut rng).unwrap();
    let at = |t: f64| Tensor::full(t, n, &Device::Cpu).unwrap();
    let truth = exact
        .log_density(&x, &at(1e-5))
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let terminal = exact
        .log_density(&estimate.latent, &at(sde.end_time()))
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let prior = sde
        .prior_log_prob(&estimate.latent)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let got = estimate.log_density.to_vec1::<f64>().unwrap();
    for i in 0..n {
        let ode_part = got[i] - prior[i];
        assert!(
            (terminal[i] + ode_part - truth[i]).abs() < 1e-3,
            "{name} d={d}: {} vs {}",
            terminal[i] + ode_part,
            truth[i]
        );
    }
    // Bits per dimension are the same number in other units.
    let bpd = estimate.bits_per_dim.to_vec1::<f64>().unwrap();
    for (b, g) in bpd.iter().zip(&got) {
        assert!((b + g / (d as f64 * std::f64::consts::LN_2)).abs() < 1e-12);
    }
    assert!(estimate.nfe > 0);
}

#[test]
fn ode_log_density_matches_the_exact_density_vp() {
    check_exact("vp", VpSde::default(), 2);
    check_exact("vp", VpSde::default(), 5);
}

#[test]
fn ode_log_density_matches_the_exact_density_subvp() {
    check_exact("subvp", SubVpSde::default(), 2);
    check_exact("subvp", SubVpSde::default(), 5);
}

#[test]
fn ode_log_density_matches_the_exact_density_ve() {
    // σ_max = 20 makes p_T ≈ N(0, σ_max² I) up to the data's spread (KL ~ 1e-4).
    check_exact("ve", VeSde::new(0.01, 20.0).unwrap(), 2);
    check_exact("ve", VeSde::new(0.01, 20.0).unwrap(), 5);
}

/// One point repeated 400 times: each copy gets its own Rademacher (or Gaussian) probe,
/// so one solve yields 400 independent Hutchinson–Skilling estimates. Their mean must lie
/// within 4 standard errors of the exact-trace value (the adaptive steps are shared across
/// the batch, which couples the estimates only at the solver's 1e-6 tolerance).
#[test]
fn hutchinson_likelihood_is_unbiased() {
    let sde = VpSde::default();
    let exact = mixture(3).diffused(sde);
    let mut rng = StdRng::seed_from_u64(1);
    let x = exact.sample(1, 1e-5, DType::F64, &Device::Cpu, &mut rng).unwrap();
    let reference = likelihood().evaluate(&sde, &exact, &x, &mut rng).unwrap();
    let want = reference.log_density.to_vec1::<f64>().unwrap()[0];
    let batch = x.repeat((400, 1)).unwrap();
    for probe in [Probe::Rademacher, Probe::Gaussian] {
        let hutch = likelihood()
            .with_divergence(Divergence::Hutchinson { probe, probes: 1 })
            .unwrap();
        let values = hutch
            .evaluate(&sde, &exact, &batch, &mut rng)
            .unwrap()
            .log_density
            .to_vec1::<f64>()
            .unwrap();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let se = (var / n).sqrt();
        assert!(se > 1e-4, "{probe:?}: the estimates should vary (se {se})");
        assert!(
            (mean - want).abs() < 4.0 * se,
            "{probe:?}: mean {mean} vs exact {want} (se {se})"
        );
    }
}

#[test]
fn encode_then_decode_returns_the_input() {
    let sde = VpSde::default();
    let exact = mixture(2).diffused(sde);
    let mut rng = StdRng::seed_from_u64(2);
    let x = exact
        .sample(32, 1e-5, DType::F64, &Device::Cpu, &mut rng)
        .unwrap();
    let flow = likelihood();
    let z = flow.encode(&sde, &exact, &x).unwrap().y;
    // The latent is distributed as the prior, not as the data: it moved.
    let moved = (&z - &x)
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(0)
        .unwrap()
        .max(1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert!(moved > 0.1);
    let back = flow.decode(&sde, &exact, &z).unwrap().y;
    // Two solves, each with a global error of a few tolerances on |x| ≲ 3: allow 1e-4.
    let err = (back - &x)
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(0)
        .unwrap()
        .max(1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert!(err < 1e-4, "round trip error {err}");
}

#[test]
fn dequantization_adds_the_discrete_offset() {
    // Model space [0, 1) with 2 levels: data 0 or 1 become U[0, .5) or U[.5, 1).
    let deq = Dequantization::with_levels(2).unwrap();
    assert_eq!(deq.bits_offset(), 1.0);
    let sde = VpSde::default();
    let exact = mixture(2).diffused(sde);
    let x = Tensor::new(&[[0.0f64, 1.0], [1.0, 1.0]], &Device::Cpu).unwrap();
    let est = likelihood()
        .with_dequantization(deq)
        .evaluate(&sde, &exact, &x, &mut StdRng::seed_from_u64(3))
        .unwrap();
    let lp = est.log_density.to_vec1::<f64>().unwrap();
    let bpd = est.bits_per_dim.to_vec1::<f64>().unwrap();
    for (l, b) in lp.iter().zip(&bpd) {
        assert!((b - (-l / (2.0 * std::f64::consts::LN_2) + 1.0)).abs() < 1e-12);
    }
}

#[test]
fn bad_inputs_are_errors() {
    let sde = VpSde::default();
    let exact = mixture(2).diffused(sde);
    let mut rng = StdRng::seed_from_u64(4);
    let nan = Tensor::new(&[[f64::NAN, 0.0]], &Device::Cpu).unwrap();
    assert!(matches!(
        likelihood().evaluate(&sde, &exact, &nan, &mut rng),
        Err(Error::NonFinite(_))
    ));
    let wrong_dim = Tensor::zeros((3, 4), DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(
        likelihood().evaluate(&sde, &exact, &wrong_dim, &mut rng),
        Err(Error::Shape(_))
    ));
    let flat = Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(
        likelihood().encode(&sde, &exact, &flat),
        Err(Error::Shape(_))
    ));
    let bad_score = |x: &Tensor, _t: &Tensor| Ok(x.narrow(1, 0, 1)?);
    let x = Tensor::zeros((3, 2), DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(
        likelihood().evaluate(&sde, &bad_score, &x, &mut rng),
        Err(Error::Shape(_))
    ));
    assert!(Likelihood::new()
        .with_divergence(Divergence::Hutchinson {
            probe: Probe::Gaussian,
            probes: 0
        })
        .is_err());
    assert!(Likelihood::new()
        .with_eps(2.0)
        .unwrap()
        .evaluate(&sde, &exact, &x, &mut rng)
        .is_err());
}
