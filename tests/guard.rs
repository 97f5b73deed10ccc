//! The higher-order-gradient guard, in a test binary of its own because it edits the
//! process environment.
//!
//! candle reads `CANDLE_GRAD_DO_NOT_DETACH` once per thread, lazily, at the thread's first
//! backprop; so each case runs on a thread started after the variable was changed. Both cases
//! live in one #[test] and run one after the other, so they cannot race on the environment.

use std::thread;

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::autodiff::{
    divergence_exact, divergence_hutchinson, ensure_higher_order_gradients, grad, leaf,
    time_derivative_autodiff, vjp,
};
use scoresde::likelihood::Likelihood;
use scoresde::score::{Covariance, GaussianMixture};
use scoresde::sde::VpSde;
use scoresde::{Error, GradientScore, LogDensityModel, Result, ScoreModel};

const VAR: &str = "CANDLE_GRAD_DO_NOT_DETACH";

struct Quartic; // u(x) = Σ xᵢ⁴ per sample

impl LogDensityModel for Quartic {
    fn log_density(&self, x: &Tensor, _t: &Tensor) -> Result<Tensor> {
        Ok(x.sqr()?.sqr()?.sum(1)?)
    }
}

fn unavailable<T: std::fmt::Debug>(r: Result<T>) -> bool {
    matches!(r, Err(Error::HigherOrderGradientsUnavailable))
}

/// Runs on a fresh thread where candle detaches gradient graphs.
fn without_second_order() -> Result<()> {
    assert!(unavailable(ensure_higher_order_gradients()));
    // Cached: the same answer again.
    assert!(unavailable(ensure_higher_order_gradients()));

    let x = leaf(&Tensor::new(&[[0.5f64, -1.0], [2.0, 0.3]], &Device::Cpu)?)?;
    let t = Tensor::new(&[0.1f64, 0.2], &Device::Cpu)?;
    // A nonlinear field whose divergence detaching would not even break (first order in x):
    // the guard refuses anyway, since the result is meant to be trained through.
    let y = (x.tanh()? * x.roll(1, 1)?)?;
    assert!(unavailable(divergence_exact(&y, &x)));
    assert!(unavailable(divergence_hutchinson(&y, &x, &[y.ones_like()?])));
    assert!(unavailable(grad(&y, &x)));
    assert!(unavailable(vjp(&y, &x, &y.ones_like()?)));
    let model = |x: &Tensor, t: &Tensor| Ok(x.broadcast_mul(&t.unsqueeze(1)?)?.tanh()?);
    assert!(unavailable(time_derivative_autodiff(&model, &x, &t)));

    // The Laplacian of a potential, where a detached graph would give a wrong value.
    assert!(unavailable(GradientScore::new(Quartic).score(&x, &t)));
    // Values-only scores need first-order gradients alone: they work, and are right
    // (∇ Σ xᵢ⁴ = 4x³) …
    let plain = x.detach();
    let s = GradientScore::values_only(Quartic).score(&plain, &t)?;
    let want: Vec<f64> = [0.5f64, -1.0, 2.0, 0.3].iter().map(|v| 4.0 * v * v * v).collect();
    let got = s.flatten_all()?.to_vec1::<f64>()?;
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-12, "values-only score {g} vs {w}");
    }
    // … but not for a tracked x, whose score would be differentiated again.
    assert!(unavailable(GradientScore::values_only(Quartic).score(&x, &t)));

    // The likelihood's trace needs first order only for a plain score model: it runs, and
    // is right (N(0, I) is invariant under VP, so log p_ε is the standard normal's) …
    let sde = VpSde::default();
    let standard = GaussianMixture::new(vec![1.0], vec![vec![0.0, 0.0]], vec![Covariance::Isotropic(1.0)])?;
    let points = Tensor::new(&[[0.5f64, -1.0], [2.0, 0.3]], &Device::Cpu)?;
    let mut rng = StdRng::seed_from_u64(0);
    let estimate = Likelihood::new().evaluate(&sde, &standard.diffused(sde), &points, &mut rng)?;
    let got = estimate.log_density.to_vec1::<f64>()?;
    for (g, p) in got.iter().zip([[0.5f64, -1.0], [2.0, 0.3]]) {
        let want = -(2.0 * std::f64::consts::PI).ln() - 0.5 * (p[0] * p[0] + p[1] * p[1]);
        assert!((g - want).abs() < 1e-3, "log-density {g} vs {want}");
    }
    // … but a potential model's score is a gradient, and its divergence second order.
    assert!(unavailable(Likelihood::new().evaluate(
        &sde,
        &GradientScore::new(Quartic),
        &points,
        &mut rng
    )));
    Ok(())
}

/// Runs on a fresh thread where candle keeps gradient graphs.
fn with_second_order() -> Result<()> {
    ensure_higher_order_gradients()?;
    let x = leaf(&Tensor::new(&[[0.5f64, -1.0], [2.0, 0.3]], &Device::Cpu)?)?;
    let t = Tensor::new(&[0.1f64, 0.2], &Device::Cpu)?;
    let s = GradientScore::new(Quartic).score(&x, &t)?;
    // Δ Σ xᵢ⁴ = 12 Σ xᵢ².
    let lap = divergence_exact(&s, &x)?.to_vec1::<f64>()?;
    let want = [12.0 * (0.25 + 1.0), 12.0 * (4.0 + 0.09)];
    for (g, w) in lap.iter().zip(&want) {
        assert!((g - w).abs() < 1e-9, "Laplacian {g} vs {w}");
    }
    Ok(())
}

fn on_new_thread(f: fn() -> Result<()>) -> Result<()> {
    thread::spawn(f)
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

#[test]
fn guard_follows_candles_switch_per_thread() -> Result<()> {
    // Edition 2021: `remove_var` / `set_var` are safe functions here. No other thread of
    // this binary touches the environment.
    std::env::remove_var(VAR);
    on_new_thread(without_second_order)?;

    std::env::set_var(VAR, "1");
    on_new_thread(with_second_order)?;
    Ok(())
}
