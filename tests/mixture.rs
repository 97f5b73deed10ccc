//! The exact Gaussian-mixture model against finite differences and closed forms.

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::score::{Covariance, GaussianMixture, LogDensityModel};
use scoresde::sde::{OuSde, Sde, SubVpSde, VeSde, VpSde};
use scoresde::ScoreModel;

fn mixture() -> GaussianMixture {
    GaussianMixture::new(
        vec![0.2, 0.5, 0.3],
        vec![vec![-1.0, 0.5, 0.0], vec![1.5, -0.5, 1.0], vec![0.0, 2.0, -1.0]],
        vec![
            Covariance::Full(vec![
                vec![0.5, 0.2, 0.1],
                vec![0.2, 0.3, -0.05],
                vec![0.1, -0.05, 0.4],
            ]),
            Covariance::Diagonal(vec![0.1, 0.2, 0.3]),
            Covariance::Isotropic(0.25),
        ],
    )
    .unwrap()
}

/// Central differences of log p_t with h = 1e-5 in f64: truncation O(h²·|∂³ log p|) ≈ 1e-9
/// and rounding O(ε·|log p|/h) ≈ 1e-10; tolerance 1e-6 relative to the score's size.
fn check_score_is_gradient<S: Sde + Clone>(name: &str, sde: S) {
    let exact = mixture().diffused(sde.clone());
    let mut rng = StdRng::seed_from_u64(11);
    for &t in &[0.01, 0.2, 0.6] {
        let t = t * sde.end_time();
        let x = exact.sample(16, t, DType::F64, &Device::Cpu, &mut rng).unwrap();
        let times = Tensor::full(t, 16, &Device::Cpu).unwrap();
        let score = exact.score(&x, &times).unwrap().to_vec2::<f64>().unwrap();
        let h = 1e-5;
        for j in 0..3 {
            let mut shift = vec![0.0; 3];
            shift[j] = h;
            let e = Tensor::new(shift.as_slice(), &Device::Cpu).unwrap();
            let up = exact.log_density(&x.broadcast_add(&e).unwrap(), &times).unwrap();
            let down = exact.log_density(&x.broadcast_sub(&e).unwrap(), &times).unwrap();
            let fd = ((up - down).unwrap() / (2.0 * h))
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in 0..16 {
                let tol = 1e-6 * (1.0 + score[i][j].abs());
                assert!(
                    (fd[i] - score[i][j]).abs() < tol,
                    "{name} t={t}: {} vs {}",
                    fd[i],
                    score[i][j]
                );
            }
        }
    }
}

#[test]
fn score_is_the_gradient_of_the_log_density() {
    check_score_is_gradient("vp", VpSde::default());
    check_score_is_gradient("subvp", SubVpSde::default());
    check_score_is_gradient("ve", VeSde::new(0.01, 5.0).unwrap());
    check_score_is_gradient("ou", OuSde::default());
}

#[test]
fn log_density_matches_a_single_gaussian_in_closed_form() {
    // One component N(μ, diag(v)) under OU: N(αμ, α²v + σ²).
    let sde = OuSde::default();
    let m = GaussianMixture::new(
        vec![1.0],
        vec![vec![1.0, -2.0]],
        vec![Covariance::Diagonal(vec![0.3, 2.0])],
    )
    .unwrap();
    let t = 0.7;
    let (a, s) = (sde.mean_coeff(t), sde.std(t));
    let x = [0.4, -0.1];
    let mut want = 0.0;
    for (j, (mu, v)) in [(1.0, 0.3), (-2.0, 2.0)].into_iter().enumerate() {
        let var = a * a * v + s * s;
        want += -0.5 * ((x[j] - a * mu) * (x[j] - a * mu) / var + (2.0 * std::f64::consts::PI * var).ln());
    }
    let got = m
        .diffused(sde)
        .log_density(
            &Tensor::new(&[x], &Device::Cpu).unwrap(),
            &Tensor::new(&[t], &Device::Cpu).unwrap(),
        )
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
}

/// Samples have the mixture's mean and covariance: E[x] = Σπμ, Cov = Σπ(Σ + μμᵀ) − mmᵀ.
/// n = 200,000; tolerance 0.02 is ≈ 5 standard errors for these variances (≤ 2.5).
#[test]
fn samples_have_the_mixture_moments() {
    let m = mixture();
    let x = m
        .sample(200_000, DType::F64, &Device::Cpu, &mut StdRng::seed_from_u64(5))
        .unwrap();
    let mean = x.mean(0).unwrap().to_vec1::<f64>().unwrap();
    let w = [0.2, 0.5, 0.3];
    let mus = [[-1.0, 0.5, 0.0], [1.5, -0.5, 1.0], [0.0, 2.0, -1.0]];
    for j in 0..3 {
        let want: f64 = (0..3).map(|k| w[k] * mus[k][j]).sum();
        assert!((mean[j] - want).abs() < 0.02, "mean[{j}] {} vs {want}", mean[j]);
    }
    // Cov[0][1] = Σπ(Σ01 + μ0μ1) − m0m1 (off-diagonal only from component 0's full Σ)
    let centered = x.broadcast_sub(&x.mean_keepdim(0).unwrap()).unwrap();
    let cov01 = (centered.narrow(1, 0, 1).unwrap() * centered.narrow(1, 1, 1).unwrap())
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let m0: f64 = (0..3).map(|k| w[k] * mus[k][0]).sum();
    let m1: f64 = (0..3).map(|k| w[k] * mus[k][1]).sum();
    let want01 = 0.2 * 0.2 + (0..3).map(|k| w[k] * mus[k][0] * mus[k][1]).sum::<f64>() - m0 * m1;
    assert!((cov01 - want01).abs() < 0.02, "cov01 {cov01} vs {want01}");
}

#[test]
fn invalid_mixtures_are_rejected() {
    let iso = || Covariance::Isotropic(1.0);
    assert!(GaussianMixture::new(vec![], vec![], vec![]).is_err());
    assert!(GaussianMixture::new(vec![-1.0], vec![vec![0.0]], vec![iso()]).is_err());
    assert!(GaussianMixture::new(
        vec![1.0, 1.0],
        vec![vec![0.0], vec![0.0, 1.0]],
        vec![iso(), iso()]
    )
    .is_err());
    assert!(GaussianMixture::new(vec![1.0], vec![vec![0.0]], vec![Covariance::Isotropic(0.0)]).is_err());
    let asym = Covariance::Full(vec![vec![1.0, 0.5], vec![0.0, 1.0]]);
    let err = GaussianMixture::new(vec![1.0], vec![vec![0.0, 0.0]], vec![asym]).unwrap_err();
    assert!(err.to_string().contains("symmetric"), "{err}");
    // Wrong dimension at evaluation time.
    let m = GaussianMixture::new(vec![1.0], vec![vec![0.0, 0.0]], vec![iso()])
        .unwrap()
        .diffused(VpSde::default());
    let x = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
    let t = Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(m.score(&x, &t), Err(scoresde::Error::Shape(_))));
}
