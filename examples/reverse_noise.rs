//! Why noise in the reverse process helps, and when it does not (Cao et al., NeurIPS 2023).
//!
//! The exact score of a 2-D Gaussian mixture (`EightGaussians`) under VP, plus a known
//! error `δ` on a time window ([`PulseError`]), sampled by the family
//! `dx = [f − ½(1+λ²)g²s] dt + λg dw̄`
//! (Euler–Maruyama with `λ = 0`: the probability-flow ODE; `λ = 1`: the reverse SDE) from
//! the same prior draws. Every distance to the data beyond the floor is the error's doing:
//!
//! * an error **early** in the generative process (`t ∈ [0.5, 0.7]`) is carried to the
//!   samples by the ODE and damped by the noise, exponentially in `λ²`;
//! * an error at the **end** (`t ∈ [ε, 0.05]`) is weighted by `(1+λ²)/2` and has no time
//!   left to be damped, so there the ODE does best.
//!
//! Prints one line per case:
//!
//!     error=<none|early|late> lambda=<λ> w2_data=<exact W2 to fresh data samples> mean_shift=<x₁ mean error>
//!
//! and the floor (W2 from a few independent exact sample sets to the data samples); the
//! samples of λ = 0, 1, 2 under both errors go to `out/reverse_noise.png`.
//! `docs/theory.md` §2 has the closed form for Gaussian data; `tests/samplers.rs` checks
//! the sampler against it.
//!
//! Run: `cargo run --release --example reverse_noise` (about a minute on 2 cores).

mod common;

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::data::EightGaussians;
use scoresde::metrics::w2_exact;
use scoresde::prelude::*;
use scoresde::score::PulseError;
use scoresde::solver::TimeGrid;

const SAMPLES: usize = 2000;
const STEPS: usize = 1000;
const EPS: f64 = 1e-3;
const LAMBDAS: [f64; 5] = [0.0, 0.5, 1.0, 1.5, 2.0];
const FLOORS: usize = 5;
/// The λ's whose samples go into the PNG (one row per error).
const PLOTTED: [f64; 3] = [0.0, 1.0, 2.0];
const PNG: &str = "out/reverse_noise.png";

fn main() -> common::BoxResult<()> {
    // Eight Gaussians on a circle, as an exact mixture.
    let data = EightGaussians.mixture();
    let sde = VpSde::default();
    let exact = data.diffused(sde);
    let device = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(0);
    let reference = data.sample(SAMPLES, DType::F64, &device, &mut rng)?;
    let prior = sde.sample_prior((SAMPLES, 2), DType::F64, &device, &mut rng)?;
    let data_mean = reference.mean(0)?.to_vec1::<f64>()?[0];
    let grid = TimeGrid::uniform(sde.end_time(), EPS, STEPS)?;

    // The same errors as the test: 2 on the early window, 20 on the five times shorter
    // late one (whose integral of β is much smaller).
    let cases = [
        ("none", PulseError::new(exact.clone(), 0.0, 0.0, vec![0.0, 0.0])?),
        ("early", PulseError::new(exact.clone(), 0.5, 0.7, vec![2.0, 0.0])?),
        (
            "late",
            PulseError::new(exact.clone(), EPS, 0.05, vec![20.0, 0.0])?,
        ),
    ];
    let mut panels = Vec::new();
    for (name, score) in &cases {
        for lambda in LAMBDAS {
            let sampler = PredictorCorrector::new(EulerMaruyama::with_lambda(lambda)?, grid.clone());
            let x = sampler.sample(&sde, score, &prior, &mut rng)?.x;
            let w2 = w2_exact(&x, &reference)?;
            let shift = x.mean(0)?.to_vec1::<f64>()?[0] - data_mean;
            println!("error={name} lambda={lambda} w2_data={w2:.4} mean_shift={shift:.4}");
            if *name != "none" && PLOTTED.contains(&lambda) {
                panels.push((format!("{name} error, lambda = {lambda} (W2 {w2:.2})"), x));
            }
        }
    }
    // The floor fluctuates with the number of points in each cluster: show a few.
    let mut floors = Vec::new();
    for _ in 0..FLOORS {
        let fresh = data.sample(SAMPLES, DType::F64, &device, &mut rng)?;
        floors.push(format!("{:.4}", w2_exact(&fresh, &reference)?));
    }
    println!(
        "# floor: W2 from independent exact sample sets to the data samples = {}",
        floors.join(" ")
    );

    std::fs::create_dir_all("out")?;
    let refs: Vec<(String, &Tensor)> = panels.iter().map(|(title, x)| (title.clone(), x)).collect();
    common::plot_panels(PNG, PLOTTED.len(), 6.0, &refs)?;
    println!("# png: {PNG}");
    Ok(())
}
