//! Likelihood through the probability-flow ODE, against a density known in closed form.
//!
//! Trains a score MLP under the VP SDE on the 8-Gaussians distribution (a Gaussian
//! mixture, so its true density is exact), or loads a checkpoint of one, then computes the
//! model's negative log-likelihood in bits per dimension on held-out points by integrating
//! the augmented probability-flow ODE with RK45 (exact trace). It prints
//!
//!     likelihood: nll_bpd=<v> true_bpd=<v> nfe=<n> ...
//!
//! where `true_bpd = −mean log₂ p(x) / d` under the true density (diffused to ε = 1e-5,
//! the time the ODE starts from; the difference from the data density is below 1e-4 bits)
//! and `nfe` the score evaluations of the solve. Extra `key=value`s follow: the same
//! estimate with the *exact* mixture score (what a perfect model would get through the
//! same ODE and prior), and a Hutchinson (one Rademacher probe) estimate of the model's.
//! A model can never beat `true_bpd` in expectation, since the cross-entropy is at least
//! the entropy.
//!
//! Options: `--steps N` (default 10000), `--points N` (held-out points, default 1000),
//! `--save PATH` (write the trained checkpoint), `--load PATH` (skip training, use the EMA
//! weights of a checkpoint written by `--save`).
//!
//! Run: `cargo run --release --example likelihood` (2–4 minutes on 2 cores).

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::autodiff::{Divergence, Probe};
use scoresde::data::EightGaussians;
use scoresde::likelihood::Likelihood;
use scoresde::prelude::*;
use scoresde::train::{load_weights, Weights};

fn mean(t: &Tensor) -> Result<f64, scoresde::Error> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

fn main() -> common::BoxResult<()> {
    let opts = common::Options::parse(&["steps", "points", "save", "load"])?;
    let steps: usize = opts.get("steps", 10_000)?;
    let points: usize = opts.get("points", 1000)?;
    let device = Device::Cpu;
    let sde = VpSde::default();
    let truth = EightGaussians.mixture();
    let config = MlpConfig::default();

    // The sampling model reads the EMA weights: from training, or from a checkpoint.
    let ema_vars = match opts.text("load") {
        Some(_) => VarMap::new(),
        None => {
            let vars = VarMap::new();
            let trained = MlpScore::new(VarBuilder::from_varmap(&vars, DType::F32, &device), sde, config)?;
            let mut trainer = Trainer::new(
                &vars,
                TrainConfig {
                    warmup_steps: 100,
                    ..Default::default()
                },
            )?;
            let objective = Objective::new(&sde, &trained);
            common::fit_with_progress("train", &mut trainer, &objective, &EightGaussians, steps)?;
            if let Some(path) = opts.text("save") {
                trainer.save_checkpoint(path)?;
            }
            trainer.ema().clone() // a VarMap is a shared handle: this keeps the EMA weights
        }
    };
    let model = MlpScore::new(
        VarBuilder::from_varmap(&ema_vars, DType::F32, &device),
        sde,
        config,
    )?;
    if let Some(path) = opts.text("load") {
        load_weights(path, &ema_vars, Weights::Ema)?;
    }

    // Held-out points from the true distribution (a seed the training never used).
    let mut rng = StdRng::seed_from_u64(2024);
    let x = EightGaussians.sample(points, &mut rng)?;
    let d = x.dim(1)? as f64;
    let eps = 1e-5;
    let exact = truth.diffused(sde);
    let true_log_p = exact.log_density(&x, &Tensor::full(eps, points, &device)?)?;
    let true_bpd = -mean(&true_log_p)? / (d * std::f64::consts::LN_2);

    let likelihood = Likelihood::new();
    let x32 = x.to_dtype(DType::F32)?;
    let model_estimate = likelihood.evaluate(&sde, &model, &x32, &mut rng)?;
    let exact_estimate = likelihood.evaluate(&sde, &exact, &x, &mut rng)?;
    let hutchinson = likelihood
        .clone()
        .with_divergence(Divergence::Hutchinson {
            probe: Probe::Rademacher,
            probes: 1,
        })?
        .evaluate(&sde, &model, &x32, &mut rng)?;
    println!(
        "likelihood: nll_bpd={:.4} true_bpd={true_bpd:.4} nfe={} exact_score_bpd={:.4} hutchinson_bpd={:.4}",
        mean(&model_estimate.bits_per_dim)?,
        model_estimate.nfe,
        mean(&exact_estimate.bits_per_dim)?,
        mean(&hutchinson.bits_per_dim)?,
    );
    Ok(())
}
