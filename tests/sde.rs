//! Forward SDEs against closed forms and simulation.

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::sde::{OuSde, Sde, SubVpSde, VeSde, VpSde};
use scoresde::Error;

fn all_sdes() -> Vec<(&'static str, Box<dyn Probe>)> {
    vec![
        ("vp", Box::new(VpSde::default())),
        ("subvp", Box::new(SubVpSde::default())),
        ("ve", Box::new(VeSde::new(0.01, 5.0).unwrap())),
        ("ou", Box::new(OuSde::new(1.5, 0.8, 3.0).unwrap())),
    ]
}

/// Object-safe view of the scalar parts of `Sde` for table-driven tests.
trait Probe {
    fn a(&self, t: f64) -> f64;
    fn g(&self, t: f64) -> f64;
    fn alpha(&self, t: f64) -> f64;
    fn sigma(&self, t: f64) -> f64;
    fn end(&self) -> f64;
    fn tensors(&self, t: &Tensor) -> [Tensor; 4];
}

impl<S: Sde> Probe for S {
    fn a(&self, t: f64) -> f64 {
        self.drift_coeff(t)
    }
    fn g(&self, t: f64) -> f64 {
        self.diffusion(t)
    }
    fn alpha(&self, t: f64) -> f64 {
        self.mean_coeff(t)
    }
    fn sigma(&self, t: f64) -> f64 {
        self.std(t)
    }
    fn end(&self) -> f64 {
        self.end_time()
    }
    fn tensors(&self, t: &Tensor) -> [Tensor; 4] {
        [
            self.drift_coeff_tensor(t).unwrap(),
            self.diffusion_tensor(t).unwrap(),
            self.mean_coeff_tensor(t).unwrap(),
            self.std_tensor(t).unwrap(),
        ]
    }
}

/// The kernel must solve the moment ODEs of dx = a x dt + g dw:
/// α' = aα and (σ²)' = 2aσ² + g². Checked by central differences (error O(h²) ≈ 1e-8
/// relative; tolerance 1e-6).
#[test]
fn kernel_solves_the_moment_equations() {
    for (name, sde) in all_sdes() {
        let h = 1e-5;
        for &t in &[0.05, 0.3, 0.7, 0.95] {
            let t = t * sde.end();
            let dalpha = (sde.alpha(t + h) - sde.alpha(t - h)) / (2.0 * h);
            assert!(
                (dalpha - sde.a(t) * sde.alpha(t)).abs() < 1e-6 * (1.0 + dalpha.abs()),
                "{name}: alpha' at t={t}"
            );
            let var = |t: f64| sde.sigma(t).powi(2);
            let dvar = (var(t + h) - var(t - h)) / (2.0 * h);
            let rhs = 2.0 * sde.a(t) * var(t) + sde.g(t).powi(2);
            assert!(
                (dvar - rhs).abs() < 1e-6 * (1.0 + rhs.abs()),
                "{name}: (sigma^2)' at t={t}: {dvar} vs {rhs}"
            );
        }
    }
}

#[test]
fn tensor_coefficients_agree_with_scalar_ones() {
    for (name, sde) in all_sdes() {
        let times: Vec<f64> = (1..=9).map(|i| i as f64 * 0.1 * sde.end()).collect();
        let t = Tensor::new(times.as_slice(), &Device::Cpu).unwrap();
        let [a, g, alpha, sigma] = sde.tensors(&t);
        for (i, &ti) in times.iter().enumerate() {
            let pairs = [
                (a.to_vec1::<f64>().unwrap()[i], sde.a(ti)),
                (g.to_vec1::<f64>().unwrap()[i], sde.g(ti)),
                (alpha.to_vec1::<f64>().unwrap()[i], sde.alpha(ti)),
                (sigma.to_vec1::<f64>().unwrap()[i], sde.sigma(ti)),
            ];
            for (k, (got, want)) in pairs.iter().enumerate() {
                assert!(
                    (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                    "{name}: coefficient {k} at t={ti}"
                );
            }
        }
    }
}

/// Simulates the forward SDE from a point mass with fine Euler–Maruyama steps and compares
/// the empirical mean and std at time t with α(t)x₀ and σ(t). With n = 20,000 paths the
/// Monte Carlo standard errors are σ/√n (mean) and σ/√(2n) (std); we allow 4 standard
/// errors plus 1% of σ for the O(dt) discretization bias of 2,000 steps.
fn check_marginals<S: Sde>(name: &str, sde: &S) {
    let device = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(7);
    let n = 20_000;
    let x0 = 1.5;
    let t_final = 0.6 * sde.end_time();
    let steps = 2_000;
    let dt = t_final / steps as f64;
    let mut x = Tensor::full(x0, (n, 1), &device).unwrap();
    for i in 0..steps {
        let t = i as f64 * dt;
        let z = scoresde::random::standard_normal((n, 1), DType::F64, &device, &mut rng).unwrap();
        x = ((&x + (sde.drift(&x, t).unwrap() * dt).unwrap()).unwrap()
            + (z * (sde.diffusion(t) * dt.sqrt())).unwrap())
        .unwrap();
    }
    let v = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let mean = v.iter().sum::<f64>() / n as f64;
    let std = (v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    let (alpha, sigma) = (sde.mean_coeff(t_final), sde.std(t_final));
    let se_mean = sigma / (n as f64).sqrt();
    let se_std = sigma / (2.0 * n as f64).sqrt();
    assert!(
        (mean - alpha * x0).abs() < 4.0 * se_mean + 0.01 * sigma,
        "{name}: mean {mean} vs {}",
        alpha * x0
    );
    assert!(
        (std - sigma).abs() < 4.0 * se_std + 0.01 * sigma,
        "{name}: std {std} vs {sigma}"
    );
}

#[test]
fn marginals_match_a_simulated_forward_sde() {
    check_marginals("vp", &VpSde::default());
    check_marginals("subvp", &SubVpSde::default());
    check_marginals("ve", &VeSde::new(0.01, 5.0).unwrap());
    check_marginals("ou", &OuSde::default());
}

#[test]
fn perturbation_kernel_has_the_stated_moments() {
    let sde = VpSde::default();
    let mut rng = StdRng::seed_from_u64(3);
    let n = 50_000;
    let x0 = Tensor::full(2.0f64, (n, 1), &Device::Cpu).unwrap();
    let t = Tensor::full(0.4f64, n, &Device::Cpu).unwrap();
    let z = scoresde::random::standard_normal((n, 1), DType::F64, &Device::Cpu, &mut rng).unwrap();
    let xt = sde.perturb(&x0, &t, &z).unwrap();
    let mean = xt.mean_all().unwrap().to_scalar::<f64>().unwrap();
    assert!((mean - 2.0 * sde.mean_coeff(0.4)).abs() < 4.0 * sde.std(0.4) / (n as f64).sqrt());
}

#[test]
fn prior_log_prob_matches_closed_form() {
    let sde = OuSde::default(); // prior N(0, I/2)
    let z = Tensor::new(&[[0.3f64, -0.4, 1.0]], &Device::Cpu).unwrap();
    let got = sde.prior_log_prob(&z).unwrap().to_vec1::<f64>().unwrap()[0];
    let v: f64 = 0.5;
    let want = -1.5 * (2.0 * std::f64::consts::PI * v).ln() - (0.09 + 0.16 + 1.0) / (2.0 * v);
    assert!((got - want).abs() < 1e-12);
}

fn invalid(result: Result<impl std::fmt::Debug, Error>, needle: &str) {
    match result {
        Err(Error::InvalidParameter(msg)) => {
            assert!(msg.contains(needle), "message `{msg}` should mention `{needle}`")
        }
        other => panic!("expected InvalidParameter mentioning {needle}, got {other:?}"),
    }
}

#[test]
fn nonsense_parameters_are_rejected_with_clear_errors() {
    invalid(VpSde::new(-0.1, 20.0), "beta_min");
    invalid(VpSde::new(20.0, 0.1), "must not exceed");
    invalid(VpSde::new(0.1, f64::NAN), "beta_max");
    invalid(SubVpSde::new(0.0, 0.0), "beta_max");
    invalid(VpSde::default().with_end_time(0.0), "end time");
    invalid(VeSde::new(0.0, 1.0), "sigma_min");
    invalid(VeSde::new(1.0, 1.0), "sigma_max");
    invalid(VeSde::new(2.0, 1.0), "sigma_max");
    invalid(OuSde::new(0.0, 1.0, 10.0), "theta");
    invalid(OuSde::new(1.0, -1.0, 10.0), "noise scale");
    invalid(OuSde::new(1.0, 1.0, -2.0), "end time");
    invalid(OuSde::new(f64::INFINITY, 1.0, 1.0), "theta");
}

#[test]
fn shape_errors_are_reported() {
    let sde = VpSde::default();
    let x = Tensor::zeros((4, 2), DType::F64, &Device::Cpu).unwrap();
    let bad_t = Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(sde.perturb(&x, &bad_t, &x), Err(Error::Shape(_))));
    let bad_noise = Tensor::zeros((4, 3), DType::F64, &Device::Cpu).unwrap();
    let t = Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(sde.perturb(&x, &t, &bad_noise), Err(Error::Shape(_))));
    let flat = Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(sde.prior_log_prob(&flat), Err(Error::Shape(_))));
}
