//! Deveney et al. (Phil. Trans. A 2025): the probability-flow ODE and the reverse SDE of one
//! trained model give different samples, the gap is bounded by the model's Fokker–Planck
//! residual, and penalizing that residual shrinks the gap.
//!
//! Their setting: OU forward SDE (θ = 1, s = 1, T = 10, prior N(0, I/2)); a log-density
//! network u(x, t) (3 hidden layers of 80, Softplus β = 100) whose score is ∇ₓu; DSM with
//! constant weighting and times T·Beta(1, 2) + ε; loss DSM + w·(mean R² at collocation
//! points uniform in a box × [ε, T] + boundary term) for w ∈ {0, 0.1, 1, 10}; samples by
//! Euler ODE and Euler–Maruyama with 800 steps from T (the last 10 refined tenfold); W2
//! between 64 × 64 histograms.
//!
//! What differs here, to fit 2 CPU cores: each run trains DSM + w·penalty jointly from
//! scratch as in the paper, but for `--steps` steps (default 10,000) instead of 100,000 (same seed, so the
//! same batches for every w), with batches of `--batch` points, `--collocation`
//! collocation points and a quarter as many boundary points per face (the paper's CPU
//! sizes are 1,998, 5,000 and 1,000); `--samples` samples per set instead of 3,000,000.
//! `--pretrain N` instead pre-trains by DSM for N steps once per dataset and fine-tunes
//! that checkpoint with each w (cheaper per run, but see docs/theory.md: a short
//! fine-tuning with the penalty first makes things worse). W2 is computed on the 64 × 64
//! grid over [−4, 4]² in true geometry (the paper's figures are (8/7)² × true W2², see
//! MATH.md §8).
//!
//! One line per run:
//!
//!     gap: data=<name> w=<w> w2_ode_sde=<v> w2_ode_data=<v> w2_sde_data=<v> fp_residual=<v> dsm_loss=<v>
//!
//! `fp_residual` is the mean R² (exact Laplacian) at held-out data perturbed to times
//! uniform in [ε, T]; `dsm_loss` the held-out DSM loss. A `floor:` line per dataset gives the
//! W2 between two independent data sets of the same size: distances near it are noise.
//! PNG panels of the ODE (top row) and SDE (bottom row) samples of each w go to
//! `out/ode_sde_gap_<data>.png`.
//!
//! Options: `--data checker|circles2|blob|all` (default all), `--weights 0,0.1,1,10`,
//! `--steps N` (default 10000), `--pretrain N` (default 0: none), `--batch N` (default
//! 1000), `--collocation N` (default 500), `--samples N` (default 10000),
//! `--sample-steps N` (default 800).
//!
//! Run: `cargo run --release --example ode_sde_gap -- --data checker` (about 15 minutes
//! per dataset on 2 cores, through `MlpPotential`'s hand-written training pass; without
//! `--data`, all three). Results and what they do and do not reproduce: docs/theory.md §6.

mod common;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::data::{Blob, Checkerboard, Dataset, TwoCircles};
use scoresde::loss::{Dsm, TimeSampling, Weighting};
use scoresde::metrics::{histogram_w2, mean_penalty, GapReport, Grid};
use scoresde::prelude::*;
use scoresde::regularizer::LogDensityFp;
use scoresde::solver::TimeGrid;

/// Smallest time, of training, collocation and sampling (the paper's `eps`).
const EPS: f64 = 1e-5;

fn main() -> common::BoxResult<()> {
    let opts = common::Options::parse(&[
        "data",
        "weights",
        "pretrain",
        "steps",
        "batch",
        "collocation",
        "samples",
        "sample-steps",
    ])?;
    let names: Vec<&str> = match opts.text("data").unwrap_or("all") {
        "all" => vec!["checker", "circles2", "blob"],
        one => vec![one],
    };
    let weights: Vec<f64> = opts
        .text("weights")
        .unwrap_or("0,0.1,1,10")
        .split(',')
        .map(|w| w.trim().parse::<f64>())
        .collect::<Result<_, _>>()?;
    let pretrain: usize = opts.get("pretrain", 0)?;
    let steps: usize = opts.get("steps", 10_000)?;
    let batch: usize = opts.get("batch", 1000)?;
    let collocation: usize = opts.get("collocation", 500)?;
    let samples: usize = opts.get("samples", 10_000)?;
    let sample_steps: usize = opts.get("sample-steps", 800)?;

    let start = Instant::now();
    let device = Device::Cpu;
    let sde = OuSde::default();
    let loss = Dsm::default()
        .with_weighting(Weighting::Constant)
        .with_time_sampling(TimeSampling::Beta12)
        .with_eps(EPS)?;
    let train = TrainConfig {
        batch_size: batch,
        weight_decay: 0.0, // the paper's Adam
        ema_decay: 0.0,    // and no weight averaging
        ..Default::default()
    };
    let time_grid = TimeGrid::deveney(sde.end_time(), EPS, sample_steps)?;
    let report = GapReport::new(
        OdeSampler::new(Euler::new(time_grid.clone())).with_eps(EPS)?,
        PredictorCorrector::euler_maruyama(time_grid).with_eps(EPS)?,
    )
    .with_histograms(Grid::deveney());
    std::fs::create_dir_all("out")?;

    for name in names {
        let (data, half_width): (Box<dyn Dataset>, f64) = match name {
            "checker" => (Box::new(Checkerboard::deveney()), 3.5),
            "circles2" => (Box::new(TwoCircles), 3.5),
            "blob" => (Box::new(Blob), 5.5),
            other => {
                return Err(format!("unknown dataset {other}; use checker, circles2, blob or all").into())
            }
        };
        // The paper's penalty (exact Laplacian, box collocation, boundary term) at 2-core sizes.
        let penalty = common::deveney_penalty(half_width, collocation, collocation.div_ceil(4), EPS)?;

        let checkpoint = std::env::temp_dir().join(format!("scoresde-gap-{name}.safetensors"));
        if pretrain > 0 {
            let vars = VarMap::new();
            let model = potential_score(&vars, &device)?;
            let mut trainer = Trainer::new(&vars, train.clone())?;
            let objective = Objective::new(&sde, &model).with_loss(loss);
            common::fit_with_progress(&format!("{name} dsm"), &mut trainer, &objective, &*data, pretrain)?;
            trainer.save_checkpoint(&checkpoint)?;
        }

        let mut rng = StdRng::seed_from_u64(7);
        let held_out = data.sample(samples, &mut rng)?.to_dtype(DType::F32)?;
        let floor = histogram_w2(
            &held_out,
            &data.sample(samples, &mut rng)?.to_dtype(DType::F32)?,
            &Grid::deveney(),
        )?;
        println!("floor: data={name} w2_data_data={floor:.4} samples={samples}");

        let mut panels: Vec<(String, Tensor)> = Vec::new();
        let mut sde_panels: Vec<(String, Tensor)> = Vec::new();
        for &w in &weights {
            let vars = VarMap::new();
            let model = potential_score(&vars, &device)?;
            let mut trainer = Trainer::new(&vars, train.clone())?;
            if pretrain > 0 {
                trainer.load_checkpoint(&checkpoint)?;
            }
            let mut objective = Objective::new(&sde, &model).with_loss(loss);
            if w > 0.0 {
                objective = objective.with_penalty(w, penalty.clone())?;
            }
            common::fit_with_progress(&format!("{name} w={w}"), &mut trainer, &objective, &*data, steps)?;

            // Sampling needs only first derivatives: the score, detached.
            let sampler = GradientScore::values_only(MlpPotential::new(
                VarBuilder::from_varmap(trainer.ema(), DType::F32, &device),
                PotentialConfig::default(),
            )?);
            let mut eval_rng = StdRng::seed_from_u64(11);
            let dsm = Objective::new(&sde, &model)
                .with_loss(loss)
                .evaluate(&held_out.narrow(0, 0, samples.min(5000))?, &mut eval_rng)?
                .dsm
                .to_scalar::<f32>()?;
            let (ode, stochastic) = report.sample_both(&sde, &sampler, &held_out, &mut eval_rng)?;
            let gap = report.distances(&ode, &stochastic, &held_out)?;
            let residual = mean_penalty(
                &sde,
                &model,
                &LogDensityFp::new(),
                EPS,
                &held_out.narrow(0, 0, samples.min(2000))?,
                &mut eval_rng,
            )?;
            println!(
                "gap: data={name} w={w} w2_ode_sde={:.4} w2_ode_data={:.4} w2_sde_data={:.4} fp_residual={residual:.4} dsm_loss={dsm:.4}",
                gap.w2_ode_sde, gap.w2_ode_data, gap.w2_sde_data
            );
            let shown = samples.min(5000);
            panels.push((format!("{name} w={w}: ODE"), ode.narrow(0, 0, shown)?));
            sde_panels.push((format!("{name} w={w}: SDE"), stochastic.narrow(0, 0, shown)?));
        }
        panels.append(&mut sde_panels);
        let refs: Vec<(String, &Tensor)> = panels.iter().map(|(t, x)| (t.clone(), x)).collect();
        let png = format!("out/ode_sde_gap_{name}.png");
        common::plot_panels(&png, weights.len(), 4.0, &refs)?;
        eprintln!(
            "{name}: wrote {png} ({:.0} s so far)",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The paper's log-density network (3 × 80, Softplus β = 100) in `vars`, as a score model
/// kept in the graph for training.
fn potential_score(vars: &VarMap, device: &Device) -> common::BoxResult<GradientScore<MlpPotential>> {
    let potential = MlpPotential::new(
        VarBuilder::from_varmap(vars, DType::F32, device),
        PotentialConfig::default(),
    )?;
    Ok(GradientScore::new(potential))
}
