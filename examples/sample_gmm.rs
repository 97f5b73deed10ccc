//! Samples a 2-D Gaussian mixture with its exact score through every sampler and prints,
//! for each, the cost and the distance to fresh exact samples:
//!
//!     sampler=<name> nfe=<n> mmd=<MMD² to exact samples> seconds=<wall time>
//!
//! Run: `cargo run --release --example sample_gmm`

use std::time::Instant;

use candle_core::{DType, Device};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::metrics::mmd2_unbiased;
use scoresde::prelude::*;
use scoresde::solver::Samples;

const SAMPLES: usize = 2000;

fn main() -> scoresde::Result<()> {
    let data = GaussianMixture::new(
        vec![0.3, 0.3, 0.4],
        vec![vec![-2.0, 0.0], vec![2.0, 0.0], vec![0.0, 2.5]],
        vec![
            Covariance::Isotropic(0.2),
            Covariance::Diagonal(vec![0.1, 0.4]),
            Covariance::Full(vec![vec![0.3, 0.15], vec![0.15, 0.2]]),
        ],
    )?;
    let sde = VpSde::default();
    let score = data.diffused(sde);
    let mut rng = StdRng::seed_from_u64(0);
    let reference = data.sample(SAMPLES, DType::F32, &Device::Cpu, &mut rng)?;
    let noise = sde.sample_prior((SAMPLES, 2), DType::F32, &Device::Cpu, &mut rng)?;

    let mut report = |name: &str, run: &mut dyn FnMut(&mut StdRng) -> scoresde::Result<Samples>| {
        let start = Instant::now();
        let out = run(&mut rng)?;
        let seconds = start.elapsed().as_secs_f64();
        let mmd = mmd2_unbiased(&out.x, &reference, None)?;
        println!(
            "sampler={name} nfe={} mmd={mmd:.5} seconds={seconds:.3}",
            out.stats.nfe
        );
        Ok::<(), scoresde::Error>(())
    };
    let x = &noise;
    report("euler_maruyama", &mut |r| {
        PredictorCorrector::euler_maruyama(1000).sample(&sde, &score, x, r)
    })?;
    report("reverse_diffusion+langevin", &mut |r| {
        PredictorCorrector::new(ReverseDiffusion, 500)
            .with_corrector(Langevin::new(0.16, 1)?)
            .sample(&sde, &score, x, r)
    })?;
    report("ancestral", &mut |r| {
        PredictorCorrector::new(Ancestral, 1000).sample(&sde, &score, x, r)
    })?;
    report("em_lambda_0.5", &mut |r| {
        PredictorCorrector::new(EulerMaruyama::with_lambda(0.5)?, 1000).sample(&sde, &score, x, r)
    })?;
    report("ode_euler", &mut |r| {
        OdeSampler::new(Euler::new(1000)).sample(&sde, &score, x, r)
    })?;
    report("ode_heun", &mut |r| {
        OdeSampler::new(Heun::new(250)).sample(&sde, &score, x, r)
    })?;
    report("ode_rk45", &mut |r| {
        OdeSampler::new(Rk45::new(1e-5, 1e-5)?).sample(&sde, &score, x, r)
    })?;
    let floor = mmd2_unbiased(
        &data.sample(SAMPLES, DType::F32, &Device::Cpu, &mut rng)?,
        &reference,
        None,
    )?;
    println!("# reference: MMD² between two independent exact sample sets = {floor:.5}");
    Ok(())
}
