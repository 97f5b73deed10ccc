//! Every sampler, driven by the exact mixture score, reproduces the mixture; driven by a
//! wrong score, it does not.

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::score::{Covariance, DiffusedMixture, GaussianMixture, PulseError};
use scoresde::sde::{OuSde, Sde, SubVpSde, VeSde, VpSde};
use scoresde::solver::{
    Ancestral, Euler, EulerMaruyama, Heun, Langevin, OdeSampler, PredictorCorrector, ReverseDiffusion, Rk45,
    Sampler, TimeGrid,
};
use scoresde::{Error, ScoreModel};

const N: usize = 1000;

fn data() -> GaussianMixture {
    GaussianMixture::new(
        vec![0.3, 0.3, 0.4],
        vec![vec![-2.0, 0.0], vec![2.0, 0.0], vec![0.0, 2.5]],
        vec![
            Covariance::Isotropic(0.2),
            Covariance::Diagonal(vec![0.1, 0.4]),
            Covariance::Full(vec![vec![0.3, 0.15], vec![0.15, 0.2]]),
        ],
    )
    .unwrap()
}

/// Unbiased MMD² with a Gaussian kernel of bandwidth 1 (the data's cluster scale).
fn mmd2(x: &Tensor, y: &Tensor) -> f64 {
    let x = x.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let y = y.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let k =
        |a: &[f64], b: &[f64]| (-(a.iter().zip(b).map(|(u, v)| (u - v).powi(2)).sum::<f64>()) / 2.0).exp();
    let within = |s: &[Vec<f64>]| {
        let n = s.len() as f64;
        let mut acc = 0.0;
        for i in 0..s.len() {
            for j in 0..s.len() {
                if i != j {
                    acc += k(&s[i], &s[j]);
                }
            }
        }
        acc / (n * (n - 1.0))
    };
    let mut cross = 0.0;
    for a in &x {
        for b in &y {
            cross += k(a, b);
        }
    }
    within(&x) + within(&y) - 2.0 * cross / (x.len() * y.len()) as f64
}

/// A score that is wrong in a way samplers cannot hide: the exact score of the same
/// mixture shifted by +1 in both coordinates.
fn shifted<S: Sde + Clone>(sde: S) -> DiffusedMixture<S> {
    let shifted = GaussianMixture::new(
        vec![0.3, 0.3, 0.4],
        vec![vec![-1.0, 1.0], vec![3.0, 1.0], vec![1.0, 3.5]],
        vec![
            Covariance::Isotropic(0.2),
            Covariance::Diagonal(vec![0.1, 0.4]),
            Covariance::Full(vec![vec![0.3, 0.15], vec![0.15, 0.2]]),
        ],
    )
    .unwrap();
    shifted.diffused(sde)
}

fn distance_to_data<S: Sde, Z: Sampler<S>, M: ScoreModel>(
    sde: &S,
    sampler: &Z,
    model: &M,
    seed: u64,
) -> (f64, usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x_t = sde
        .sample_prior((N, 2), DType::F64, &Device::Cpu, &mut rng)
        .unwrap();
    let out = sampler.sample(sde, model, &x_t, &mut rng).unwrap();
    let reference = data().sample(N, DType::F64, &Device::Cpu, &mut rng).unwrap();
    (mmd2(&out.x, &reference), out.stats.nfe)
}

fn noise_floor() -> f64 {
    let mut rng = StdRng::seed_from_u64(99);
    let a = data().sample(N, DType::F64, &Device::Cpu, &mut rng).unwrap();
    let b = data().sample(N, DType::F64, &Device::Cpu, &mut rng).unwrap();
    mmd2(&a, &b)
}

/// MMD² between two independent exact sample sets of size 1000 is ≈ ±0.0015 (its
/// standard deviation at this n); a sampler within 0.01 is indistinguishable from exact
/// sampling at this sample size, while the shifted score lands near 0.17.
const GOOD: f64 = 0.01;
const WRONG: f64 = 0.05;

fn check<S: Sde + Clone, Z: Sampler<S>>(name: &str, sde: S, sampler: &Z, seed: u64) -> usize {
    let exact = data().diffused(sde.clone());
    let (good, nfe) = distance_to_data(&sde, sampler, &exact, seed);
    let (bad, _) = distance_to_data(&sde, sampler, &shifted(sde.clone()), seed);
    assert!(good < GOOD, "{name}: MMD² {good} with the exact score");
    assert!(
        bad > WRONG,
        "{name}: MMD² {bad} with a wrong score should be large"
    );
    nfe
}

#[test]
fn the_noise_floor_is_what_the_thresholds_assume() {
    assert!(noise_floor().abs() < GOOD / 3.0);
}

#[test]
fn euler_maruyama_samples_the_mixture() {
    let nfe = check(
        "em/vp",
        VpSde::default(),
        &PredictorCorrector::euler_maruyama(1000),
        1,
    );
    assert_eq!(nfe, 1000);
    check(
        "em/subvp",
        SubVpSde::default(),
        &PredictorCorrector::euler_maruyama(1000),
        11,
    );
    check(
        "em/ou",
        OuSde::default(),
        &PredictorCorrector::euler_maruyama(1000).with_eps(1e-5).unwrap(),
        12,
    );
}

#[test]
fn the_lambda_family_keeps_the_marginals() {
    for (i, lambda) in [0.0, 0.5, 2.0].into_iter().enumerate() {
        let sampler = PredictorCorrector::new(EulerMaruyama::with_lambda(lambda).unwrap(), 1000);
        check(
            &format!("em λ={lambda}"),
            VpSde::default(),
            &sampler,
            20 + i as u64,
        );
    }
}

#[test]
fn predictor_corrector_samples_the_mixture() {
    let pc = PredictorCorrector::new(ReverseDiffusion, 500).with_corrector(Langevin::new(0.16, 1).unwrap());
    let nfe = check("rd+langevin/vp", VpSde::default(), &pc, 2);
    assert_eq!(nfe, 1000, "one predictor and one corrector evaluation per step");
    let ve = VeSde::new(0.01, 8.0).unwrap();
    check("rd+langevin/ve", ve, &pc, 21);
}

#[test]
fn ancestral_sampling_works_for_vp_and_ve() {
    check(
        "ancestral/vp",
        VpSde::default(),
        &PredictorCorrector::new(Ancestral, 1000),
        3,
    );
    check(
        "ancestral/ve",
        VeSde::new(0.01, 8.0).unwrap(),
        &PredictorCorrector::new(Ancestral, 1000),
        7,
    );
}

#[test]
fn probability_flow_solvers_sample_the_mixture() {
    let rk = OdeSampler::new(Rk45::new(1e-5, 1e-5).unwrap());
    check("rk45/vp", VpSde::default(), &rk, 4);
    check("rk45/ve", VeSde::new(0.01, 8.0).unwrap(), &rk, 8);
    let nfe = check("heun/vp", VpSde::default(), &OdeSampler::new(Heun::new(200)), 5);
    assert_eq!(nfe, 400);
    let nfe = check(
        "euler/vp",
        VpSde::default(),
        &OdeSampler::new(Euler::new(1000)),
        6,
    );
    assert_eq!(nfe, 1000);
    // Deveney et al.'s sampler: OU to T = 10, 800 Euler steps with a refined tail.
    let grid = scoresde::solver::TimeGrid::deveney(10.0, 1e-5, 800).unwrap();
    let euler = OdeSampler::new(Euler::new(grid));
    check("euler/ou-deveney", OuSde::default(), &euler, 9);
}

/// Dormand–Prince with FSAL: one evaluation at the start, one to pick the first step, and
/// six per attempted step.
#[test]
fn rk45_reports_consistent_statistics() {
    let sde = VpSde::default();
    let exact = data().diffused(sde);
    let mut rng = StdRng::seed_from_u64(0);
    let x_t = sde
        .sample_prior((64, 2), DType::F64, &Device::Cpu, &mut rng)
        .unwrap();
    let stats = OdeSampler::new(Rk45::new(1e-5, 1e-5).unwrap())
        .sample(&sde, &exact, &x_t, &mut rng)
        .unwrap()
        .stats;
    assert!(stats.accepted_steps > 5);
    assert_eq!(stats.nfe, 2 + 6 * (stats.accepted_steps + stats.rejected_steps));
}

#[test]
fn every_sampler_rejects_a_blow_up() {
    let sde = VpSde::default();
    let poisoned = |x: &Tensor, t: &Tensor| -> scoresde::Result<Tensor> {
        let t = t.to_vec1::<f64>()?[0];
        Ok(if t < 0.5 { (x * f64::NAN)? } else { x.neg()? })
    };
    let mut rng = StdRng::seed_from_u64(0);
    let x_t = sde
        .sample_prior((8, 2), DType::F64, &Device::Cpu, &mut rng)
        .unwrap();
    let results = [
        PredictorCorrector::euler_maruyama(100)
            .sample(&sde, &poisoned, &x_t, &mut rng)
            .map(|_| ()),
        PredictorCorrector::new(ReverseDiffusion, 100)
            .with_corrector(Langevin::new(0.1, 1).unwrap())
            .sample(&sde, &poisoned, &x_t, &mut rng)
            .map(|_| ()),
        PredictorCorrector::new(Ancestral, 100)
            .sample(&sde, &poisoned, &x_t, &mut rng)
            .map(|_| ()),
        OdeSampler::new(Heun::new(100))
            .sample(&sde, &poisoned, &x_t, &mut rng)
            .map(|_| ()),
        OdeSampler::new(Euler::new(100))
            .sample(&sde, &poisoned, &x_t, &mut rng)
            .map(|_| ()),
    ];
    for r in results {
        assert!(matches!(r, Err(Error::NonFinite(_))), "{r:?}");
    }
    let rk = OdeSampler::new(Rk45::new(1e-5, 1e-5).unwrap()).sample(&sde, &poisoned, &x_t, &mut rng);
    assert!(matches!(rk, Err(Error::NonFinite(_))), "{rk:?}");
}

#[test]
fn bad_starting_points_are_rejected() {
    let sde = VpSde::default();
    let exact = data().diffused(sde);
    let mut rng = StdRng::seed_from_u64(0);
    let flat = Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap();
    let r = PredictorCorrector::euler_maruyama(10).sample(&sde, &exact, &flat, &mut rng);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let nan = Tensor::new(&[[f64::NAN, 0.0]], &Device::Cpu).unwrap();
    let r = OdeSampler::new(Rk45::new(1e-5, 1e-5).unwrap()).sample(&sde, &exact, &nan, &mut rng);
    assert!(matches!(r, Err(Error::NonFinite(_))), "{r:?}");
    let wrong_dim = Tensor::zeros((4, 3), DType::F64, &Device::Cpu).unwrap();
    let r = PredictorCorrector::euler_maruyama(10).sample(&sde, &exact, &wrong_dim, &mut rng);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    // An ancestral VP step with β(t)·dt ≥ 1 is refused, not silently wrong.
    let r = PredictorCorrector::new(Ancestral, 2).sample(
        &sde,
        &exact,
        &Tensor::zeros((4, 2), DType::F64, &Device::Cpu).unwrap(),
        &mut rng,
    );
    assert!(matches!(r, Err(Error::InvalidParameter(_))), "{r:?}");
    assert!(PredictorCorrector::euler_maruyama(10).with_eps(0.0).is_err());
}

/// Cao et al. (NeurIPS 2023) on Gaussian data `N(μ, I)` under VP, where `p_t = N(α(t)μ, I)`
/// and the score is linear: with a constant error `δ` on `[w₀, w₁]`, the mean error
/// `e = E[x] − αμ` of `dx = [f − ½(1+λ²)g²s] dt + λg dw̄` solves `de/dt = ½λ²β e − ½(1+λ²)βδ`
/// on the window (without the `δ` term off it), so with `B(t) = ∫₀ᵗβ`
///
/// ```text
/// e(ε) = e^{−½λ²(B(T)−B(ε))} e(T) + δ (1+λ²)/λ² [e^{−½λ²(B(w₀)−B(ε))} − e^{−½λ²(B(w₁)−B(ε))}]
/// ```
///
/// (`e(T) + ½δ(B(w₁) − B(w₀))` for `λ = 0`). Early errors die out exponentially in `λ²`;
/// one at the end is weighted by `(1+λ²)/2` and never damped.
fn pulse_mean_error(sde: &VpSde, lambda: f64, window: (f64, f64), delta: f64, e_end: f64) -> f64 {
    let (b0, b1) = (sde.beta_min(), sde.beta_max());
    let big_b = |t: f64| b0 * t + 0.5 * (b1 - b0) * t * t;
    let eps = 1e-3;
    let damp = |from: f64| (-0.5 * lambda * lambda * (big_b(from) - big_b(eps))).exp();
    if lambda == 0.0 {
        e_end + 0.5 * delta * (big_b(window.1) - big_b(window.0))
    } else {
        damp(sde.end_time()) * e_end
            + delta * (1.0 + lambda * lambda) / (lambda * lambda) * (damp(window.0) - damp(window.1))
    }
}

/// The mean of Euler–Maruyama on `grid` for the same problem: the score is linear, so the
/// mean follows the noise-free recursion exactly.
fn pulse_mean_recursion(
    sde: &VpSde,
    lambda: f64,
    window: (f64, f64),
    delta: f64,
    mu: f64,
    grid: &[f64],
) -> f64 {
    let mut m = 0.0; // the prior N(0, I)
    for w in grid.windows(2) {
        let (t, dt) = (w[0], w[0] - w[1]);
        let pulse = if (window.0..=window.1).contains(&t) {
            delta
        } else {
            0.0
        };
        let score = -(m - sde.mean_coeff(t) * mu) + pulse;
        m = m * (1.0 - sde.drift_coeff(t) * dt)
            + 0.5 * (1.0 + lambda * lambda) * sde.diffusion(t).powi(2) * dt * score;
    }
    m - sde.mean_coeff(grid[grid.len() - 1]) * mu
}

#[test]
fn noise_damps_early_score_errors_and_not_late_ones() {
    let sde = VpSde::default();
    let mu = [2.0, -1.0];
    let data = GaussianMixture::new(vec![1.0], vec![mu.to_vec()], vec![Covariance::Isotropic(1.0)]).unwrap();
    let grid = TimeGrid::uniform(1.0, 1e-3, 1000).unwrap();
    let fine = TimeGrid::uniform(1.0, 1e-3, 200_000).unwrap();
    let n = 4000;
    let mut rng = StdRng::seed_from_u64(17);
    let prior = sde
        .sample_prior((n, 2), DType::F64, &Device::Cpu, &mut rng)
        .unwrap();
    // Errors of the same sign in the first coordinate; the late one larger, for its shorter window.
    let cases = [("early", (0.5, 0.7), 2.0), ("late", (1e-3, 0.05), 20.0)];
    for (name, window, delta) in cases {
        let score = PulseError::new(data.diffused(sde), window.0, window.1, vec![delta, 0.0]).unwrap();
        let mut errors = Vec::new();
        for lambda in [0.0, 1.0, 2.0] {
            // The closed form against the recursion on a fine grid: O(dt) apart.
            let e_end = -sde.mean_coeff(1.0) * mu[0];
            let exact = pulse_mean_error(&sde, lambda, window, delta, e_end);
            let fine_mean = pulse_mean_recursion(&sde, lambda, window, delta, mu[0], fine.times());
            assert!(
                (exact - fine_mean).abs() < 1e-3 * (1.0 + exact.abs()),
                "{name} λ={lambda}: closed form {exact} vs recursion {fine_mean}"
            );

            // The sampler's sample mean against the recursion on its own grid, within 4
            // standard errors (the marginals keep unit variance).
            let sampler = PredictorCorrector::new(EulerMaruyama::with_lambda(lambda).unwrap(), grid.clone());
            let x = sampler.sample(&sde, &score, &prior, &mut rng).unwrap().x;
            let mean = x.mean(0).unwrap().to_vec1::<f64>().unwrap();
            let std = x
                .var_keepdim(0)
                .unwrap()
                .sqrt()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let se = std[0] / (n as f64).sqrt();
            let predicted = pulse_mean_recursion(&sde, lambda, window, delta, mu[0], grid.times());
            let alpha = sde.mean_coeff(1e-3);
            let got = mean[0] - alpha * mu[0];
            assert!(
                (got - predicted).abs() < 4.0 * se,
                "{name} λ={lambda}: sample mean error {got} vs predicted {predicted} (se {se})"
            );
            // The unperturbed coordinate follows the same recursion without the error.
            let unperturbed = pulse_mean_recursion(&sde, lambda, window, 0.0, mu[1], grid.times());
            let other = mean[1] - alpha * mu[1];
            let se1 = std[1] / (n as f64).sqrt();
            assert!(
                (other - unperturbed).abs() < 4.0 * se1,
                "{name} λ={lambda}: x₂ mean error {other} vs {unperturbed}"
            );
            errors.push((got, 4.0 * se));
        }
        let separated = |a: (f64, f64), b: (f64, f64)| a.0 - a.1 > b.0 + b.1;
        match name {
            // Early: the ODE keeps all of it, noise removes most of it.
            "early" => assert!(
                separated(errors[0], errors[1]) && separated(errors[1], errors[2]),
                "{errors:?}"
            ),
            // Late: the more noise, the larger the error.
            _ => assert!(
                separated(errors[2], errors[1]) && separated(errors[1], errors[0]),
                "{errors:?}"
            ),
        }
    }
}

#[test]
fn pulse_error_adds_its_shift_inside_the_window_only() -> scoresde::Result<()> {
    let zero = |x: &Tensor, _t: &Tensor| Ok(x.zeros_like()?);
    let pulse = PulseError::new(zero, 0.2, 0.4, vec![1.5, -2.0])?;
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64] {
        let x = Tensor::zeros((4, 2), dtype, &dev)?;
        // Both ends of the window are inside.
        let t = Tensor::new(&[0.1f64, 0.2, 0.4, 0.41], &dev)?.to_dtype(dtype)?;
        let s = pulse.score(&x, &t)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        assert_eq!(s, [[0.0, 0.0], [1.5, -2.0], [1.5, -2.0], [0.0, 0.0]], "{dtype:?}");
    }
    let t = Tensor::full(0.3f64, 4, &dev)?;
    let x3 = Tensor::zeros((4, 3), DType::F64, &dev)?;
    assert!(matches!(pulse.score(&x3, &t), Err(Error::Shape(_))));
    let x = Tensor::zeros((4, 2), DType::F64, &dev)?;
    assert!(matches!(
        pulse.score(&x, &t.narrow(0, 0, 3)?),
        Err(Error::Shape(_))
    ));
    Ok(())
}

/// On a grid too coarse for VP's Langevin step factor `1 − β(t)dt` (10 steps: β(1)·0.1 = 2),
/// the corrector says so instead of taking a NaN step; 30 steps are fine.
#[test]
fn langevin_on_too_coarse_a_grid_is_an_error() {
    let sde = VpSde::default();
    let exact = data().diffused(sde);
    let mut rng = StdRng::seed_from_u64(3);
    let x_t = sde
        .sample_prior((16, 2), DType::F64, &Device::Cpu, &mut rng)
        .unwrap();
    let pc = |steps: usize| {
        PredictorCorrector::new(ReverseDiffusion, steps)
            .with_corrector(Langevin::new(0.16, 1).unwrap())
            .sample(&sde, &exact, &x_t, &mut StdRng::seed_from_u64(4))
    };
    match pc(10) {
        Err(Error::InvalidParameter(msg)) => assert!(msg.contains("more steps"), "{msg}"),
        other => panic!("expected an error about the grid, got {other:?}"),
    }
    assert!(pc(30).is_ok());
}

/// One rule for a sampler's own grid: from T down to ε > 0, the grid's end being ε. Every
/// sampler that takes a grid refuses one that starts elsewhere, and an ODE sampler on a
/// fixed grid needs no ε beside it.
#[test]
fn every_sampler_applies_one_grid_rule() {
    use scoresde::solver::{FewStep, TimeGrid};
    let sde = VpSde::default();
    let exact = data().diffused(sde);
    let mut rng = StdRng::seed_from_u64(5);
    let x_t = sde
        .sample_prior((8, 2), DType::F64, &Device::Cpu, &mut rng)
        .unwrap();
    let late = TimeGrid::new(vec![1.5, 1.0, 0.5, 1e-3]).unwrap();
    let early = TimeGrid::new(vec![0.9, 0.5, 1e-3]).unwrap();
    for grid in [late, early] {
        let pc = PredictorCorrector::euler_maruyama(grid.clone()).sample(&sde, &exact, &x_t, &mut rng);
        let ode = OdeSampler::new(Euler::new(grid.clone())).sample(&sde, &exact, &x_t, &mut rng);
        let few = FewStep::dpmpp_2m(1)
            .unwrap()
            .with_grid(grid.clone())
            .unwrap()
            .sample(&sde, &exact, &x_t, &mut rng);
        for (name, r) in [
            ("pc", pc.map(|_| ())),
            ("ode", ode.map(|_| ())),
            ("few", few.map(|_| ())),
        ] {
            assert!(matches!(r, Err(Error::InvalidParameter(_))), "{name}: {r:?}");
        }
    }
    // From T: the grid's own end is ε, with no with_eps needed.
    let grid = TimeGrid::new(vec![1.0, 0.5, 0.1, 0.02]).unwrap();
    assert!(OdeSampler::new(Euler::new(grid.clone()))
        .sample(&sde, &exact, &x_t, &mut rng)
        .is_ok());
    assert!(PredictorCorrector::euler_maruyama(grid)
        .sample(&sde, &exact, &x_t, &mut rng)
        .is_ok());
}
