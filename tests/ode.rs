//! ODE solvers on linear ODEs with closed-form solutions.

use candle_core::{Device, Tensor};
use scoresde::solver::{Euler, Heun, OdeSolver, Rk45, TimeGrid};
use scoresde::Error;

/// dy/dt = a(t)·y with a(t) = cos(t) − 0.5: y(t) = y0·exp(sin t − t/2).
fn linear(t: f64, y: &Tensor) -> scoresde::Result<Tensor> {
    Ok((y * (t.cos() - 0.5))?)
}

fn exact(t0: f64, t1: f64, y0: f64) -> f64 {
    y0 * ((t1.sin() - t1 / 2.0) - (t0.sin() - t0 / 2.0)).exp()
}

fn y0() -> Tensor {
    Tensor::new(&[[1.0f64, -2.0, 0.5]], &Device::Cpu).unwrap()
}

fn max_error<O: OdeSolver>(solver: &O, t0: f64, t1: f64) -> (f64, usize) {
    let sol = solver.solve(&linear, &y0(), t0, t1).unwrap();
    let got = sol.y.to_vec2::<f64>().unwrap()[0].clone();
    let err = [1.0, -2.0, 0.5]
        .iter()
        .zip(&got)
        .map(|(y, g)| (exact(t0, t1, *y) - g).abs())
        .fold(0.0, f64::max);
    (err, sol.stats.nfe)
}

/// RK45 controls the local error per step to ≈ atol + rtol|y|; the global error over a
/// smooth problem of a few dozen steps stays within a small multiple of it. We allow 10×
/// the tolerance scale (|y| ≤ 2) and check both directions of time.
#[test]
fn rk45_meets_its_tolerance() {
    for tol in [1e-4, 1e-6, 1e-8] {
        for (t0, t1) in [(0.0, 3.0), (3.0, 0.1)] {
            let (err, _) = max_error(&Rk45::new(tol, tol).unwrap(), t0, t1);
            assert!(err < 10.0 * tol * 3.0, "tol {tol} ({t0}->{t1}): error {err}");
        }
    }
}

#[test]
fn rk45_nfe_falls_as_the_tolerance_loosens() {
    let nfe: Vec<usize> = [1e-9, 1e-7, 1e-5, 1e-3]
        .iter()
        .map(|&tol| max_error(&Rk45::new(tol, tol).unwrap(), 0.0, 3.0).1)
        .collect();
    assert!(nfe.windows(2).all(|w| w[1] < w[0]), "NFE per tolerance: {nfe:?}");
}

/// Observed order = log2(e(n)/e(2n)); it tends to the method's order as n grows.
/// With n = 1000 the asymptotic regime is reached to within ±0.1.
fn observed_order<O: OdeSolver>(make: impl Fn(usize) -> O) -> f64 {
    let (e1, _) = max_error(&make(1000), 0.0, 3.0);
    let (e2, _) = max_error(&make(2000), 0.0, 3.0);
    (e1 / e2).log2()
}

#[test]
fn euler_is_first_order_and_heun_second_order() {
    let euler = observed_order(Euler::new);
    let heun = observed_order(Heun::new);
    assert!((euler - 1.0).abs() < 0.1, "Euler order {euler}");
    assert!((heun - 2.0).abs() < 0.1, "Heun order {heun}");
}

#[test]
fn fixed_step_solvers_accept_a_user_grid() {
    // A nonuniform grid (denser near 0) still converges: Heun on 300 such steps.
    let times: Vec<f64> = (0..=300).map(|i| 3.0 * (i as f64 / 300.0).powi(2)).collect();
    let grid = TimeGrid::new(times).unwrap();
    let (err, nfe) = max_error(&Heun::new(grid.clone()), 0.0, 3.0);
    assert!(err < 1e-4, "{err}");
    assert_eq!(nfe, 600);
    // A grid that does not span the requested interval is an error.
    assert!(matches!(
        Euler::new(grid).solve(&linear, &y0(), 0.0, 2.0),
        Err(Error::InvalidParameter(_))
    ));
}

#[test]
fn rk45_reports_step_size_underflow_on_a_blow_up() {
    // y' = y², y(0) = 1 explodes at t = 1; integrating to t = 2 cannot succeed.
    let blow_up = |_t: f64, y: &Tensor| Ok(y.sqr()?);
    let y0 = Tensor::new(&[1.0f64], &Device::Cpu).unwrap();
    let err = Rk45::new(1e-6, 1e-6)
        .unwrap()
        .solve(&blow_up, &y0, 0.0, 2.0)
        .unwrap_err();
    assert!(
        matches!(err, Error::StepSizeUnderflow { t, .. } if (t - 1.0).abs() < 1e-3),
        "{err}"
    );
}

#[test]
fn solvers_reject_non_finite_states() {
    let nan_field = |t: f64, y: &Tensor| Ok(if t < 0.5 { y.clone() } else { (y * f64::NAN)? });
    let y0 = Tensor::new(&[1.0f64], &Device::Cpu).unwrap();
    for result in [
        Euler::new(10).solve(&nan_field, &y0, 0.0, 1.0),
        Heun::new(10).solve(&nan_field, &y0, 0.0, 1.0),
    ] {
        assert!(matches!(result, Err(Error::NonFinite(_))), "{result:?}");
    }
    // RK45 shrinks the step on a NaN error estimate, then says the field is not finite
    // (not that the ODE is stiff).
    let rk = Rk45::new(1e-6, 1e-6).unwrap().solve(&nan_field, &y0, 0.0, 1.0);
    assert!(matches!(rk, Err(Error::NonFinite(_))), "{rk:?}");
    // Half precision cannot carry its error control: a clear error up front.
    let half = y0.to_dtype(candle_core::DType::F16).unwrap();
    let rk = Rk45::new(1e-6, 1e-6).unwrap().solve(&linear, &half, 0.0, 1.0);
    assert!(matches!(rk, Err(Error::InvalidParameter(_))), "{rk:?}");
    let bad = Tensor::new(&[f64::INFINITY], &Device::Cpu).unwrap();
    assert!(matches!(
        Rk45::new(1e-6, 1e-6).unwrap().solve(&linear, &bad, 0.0, 1.0),
        Err(Error::NonFinite(_))
    ));
}

#[test]
fn invalid_solver_settings_are_rejected() {
    assert!(Rk45::new(-1.0, 1e-6).is_err());
    assert!(Rk45::new(0.0, 0.0).is_err());
    assert!(Rk45::new(1e-6, f64::NAN).is_err());
    assert!(Rk45::new(1e-6, 1e-6).unwrap().with_first_step(0.0).is_err());
    assert!(TimeGrid::uniform(1.0, 1.0, 10).is_err());
    assert!(TimeGrid::uniform(1.0, 0.0, 0).is_err());
    assert!(TimeGrid::new(vec![1.0]).is_err());
    assert!(TimeGrid::new(vec![1.0, f64::NAN]).is_err());
}
