//! Lai et al. (FP-Diffusion, ICML 2023): denoising score matching alone learns a score that
//! violates the score Fokker–Planck equation; adding the residual as a penalty reduces the
//! violation.
//!
//! As in the paper, the regularizer fine-tunes a pre-trained model. A score MLP is first
//! trained by DSM under the VP SDE on the checkerboard; from that checkpoint, with one seed
//! (same batches, same noise), it is fine-tuned twice for the same number of steps: by
//! plain DSM, and by DSM + λ·(score-FPE penalty with the paper code's defaults, restricted
//! to t ∈ [t_min, 1] with [`TimeWindow`], because near t = 0 the residual grows like
//! 1/σ(t)³ and swamps everything else). For each it prints one line,
//!
//!     model=<dsm|dsm+fpe> fpe_residual=<v> ode_sde_w2=<v> ...
//!
//! where `fpe_residual` is the mean score-FPE penalty (exact divergence, residual norm
//! squared, g(t)² weighting, divided by d²) at held-out data perturbed to t ~ U[t_min, 1],
//! and `ode_sde_w2` the exact W2 between RK45 probability-flow samples and Euler–Maruyama
//! reverse-SDE samples drawn from the same prior points. Extra `key=value`s follow: the
//! held-out DSM loss and the W2 of each sampler to the data.
//!
//! Options: `--pretrain N` (default 4000 DSM steps), `--steps N` (fine-tuning steps, default
//! 2000), `--lambda L` (default 1e-3), `--t-min T` (default 0.05), `--points N` (samples
//! for the W2s, default 1000).
//!
//! Run: `cargo run --release --example fpe_regularization` (under a minute on 2 cores).

mod common;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::autodiff::Divergence;
use scoresde::metrics::GapReport;
use scoresde::prelude::*;
use scoresde::regularizer::{ScoreFpe, TimeWindow};

fn main() -> common::BoxResult<()> {
    let opts = common::Options::parse(&["pretrain", "steps", "lambda", "t-min", "points"])?;
    let pretrain: usize = opts.get("pretrain", 4000)?;
    let steps: usize = opts.get("steps", 2000)?;
    let lambda_fpe: f64 = opts.get("lambda", 1e-3)?;
    let t_min: f64 = opts.get("t-min", 0.05)?;
    let points: usize = opts.get("points", 1000)?;
    let device = Device::Cpu;
    let sde = VpSde::default();
    let data = Checkerboard::default();
    let config = MlpConfig {
        width: 64,
        ..Default::default()
    };
    let train = TrainConfig {
        batch_size: 256,
        warmup_steps: 100,
        ..Default::default()
    };

    // Pre-train by DSM, and keep the checkpoint both fine-tunings start from.
    let checkpoint = std::env::temp_dir().join("scoresde-fpe-pretrained.safetensors");
    {
        let vars = VarMap::new();
        let model = MlpScore::new(VarBuilder::from_varmap(&vars, DType::F32, &device), sde, config)?;
        let mut trainer = Trainer::new(&vars, train.clone())?;
        common::fit_with_progress(
            "pretrain",
            &mut trainer,
            &Objective::new(&sde, &model),
            &data,
            pretrain,
        )?;
        trainer.save_checkpoint(&checkpoint)?;
    }

    let mut rng = StdRng::seed_from_u64(7);
    let held_out = data.sample(points, &mut rng)?.to_dtype(DType::F32)?;
    // The measure of the violation: the exact-divergence FPE residual.
    let residual = ScoreFpe::new().with_divergence(Divergence::Exact)?;
    let report = GapReport::new(
        OdeSampler::new(Rk45::new(1e-5, 1e-5)?),
        PredictorCorrector::euler_maruyama(1000),
    );

    for (name, lambda) in [("dsm", 0.0), ("dsm+fpe", lambda_fpe)] {
        let vars = VarMap::new();
        let model = MlpScore::new(VarBuilder::from_varmap(&vars, DType::F32, &device), sde, config)?;
        let mut trainer = Trainer::new(&vars, train.clone())?;
        trainer.load_checkpoint(&checkpoint)?;
        let mut objective = Objective::new(&sde, &model);
        if lambda > 0.0 {
            objective = objective.with_penalty(lambda, TimeWindow::new(ScoreFpe::new(), t_min, 1.0)?)?;
        }
        common::fit_with_progress(name, &mut trainer, &objective, &data, steps)?;

        let ema_model = MlpScore::new(
            VarBuilder::from_varmap(trainer.ema(), DType::F32, &device),
            sde,
            config,
        )?;
        let mut eval_rng = StdRng::seed_from_u64(11);
        let dsm = Objective::new(&sde, &ema_model)
            .evaluate(&held_out, &mut eval_rng)?
            .dsm
            .to_scalar::<f32>()?;
        let gap =
            report.measure_with_residual(&sde, &ema_model, &residual, t_min, &held_out, &mut eval_rng)?;
        println!(
            "model={name} fpe_residual={:.4} ode_sde_w2={:.4} dsm_loss={dsm:.4} w2_ode_data={:.4} w2_sde_data={:.4} lambda={lambda}",
            gap.fp_residual.unwrap_or(f64::NAN),
            gap.w2_ode_sde,
            gap.w2_ode_data,
            gap.w2_sde_data,
        );
    }
    Ok(())
}
