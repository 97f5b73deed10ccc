//! With candle's second-order gradients off, the regularizers refuse to run rather than
//! return silently wrong gradients. Its own test binary: it edits the environment.

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::autodiff::Divergence;
use scoresde::regularizer::{LogDensityFp, Regularizer, ScoreFpe, TimeDerivative};
use scoresde::score::{Covariance, GaussianMixture};
use scoresde::sde::VpSde;
use scoresde::Error;

#[test]
fn regularizers_return_the_guard_error_without_second_order_gradients() {
    // The variable is read once per thread at its first backward pass, so a thread started
    // after removing it sees candle's default (detached, silently wrong) behaviour.
    std::env::remove_var("CANDLE_GRAD_DO_NOT_DETACH");
    let outcome = std::thread::spawn(|| {
        let sde = VpSde::default();
        let exact = GaussianMixture::new(vec![1.0], vec![vec![0.0, 1.0]], vec![Covariance::Isotropic(0.5)])
            .unwrap()
            .diffused(sde);
        let x = Tensor::ones((4, 2), DType::F64, &Device::Cpu).unwrap();
        let t = Tensor::full(0.5f64, 4, &Device::Cpu).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let fpe = ScoreFpe::new().penalty(&sde, &exact, &x, &t, &mut rng);
        // Exact divergence with autodiff in t takes a path of its own.
        let exact_fpe = ScoreFpe::new()
            .with_divergence(Divergence::Exact)
            .unwrap()
            .with_time_derivative(TimeDerivative::Autodiff)
            .unwrap()
            .penalty(&sde, &exact, &x, &t, &mut rng);
        let lfp = LogDensityFp::new().penalty(&sde, &exact, &x, &t, &mut rng);
        [fpe.map(|_| ()), exact_fpe.map(|_| ()), lfp.map(|_| ())]
    })
    .join()
    .unwrap();
    for result in outcome {
        match result {
            Err(e @ Error::HigherOrderGradientsUnavailable) => {
                assert!(e.to_string().contains("CANDLE_GRAD_DO_NOT_DETACH=1"), "{e}")
            }
            other => panic!("expected the guard's error, got {other:?}"),
        }
    }
}
