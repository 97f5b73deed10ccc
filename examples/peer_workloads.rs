//! The peers' benchmark workloads (`../shared/peers/torch_ref.py`, `jax_ref.py`) run with
//! this crate, to time them side by side (see `docs/benchmarks.md`).
//!
//! * `dsm`: 200 training steps (after 10 warm-up steps) of denoising score matching under
//!   the VP SDE (β 0.1..20, ε = 1e-3) on the checkerboard, batch 512, AdamW lr 1e-3;
//!   the network is [`MlpScore`] with its defaults (32 Fourier time features, 3×128 SiLU,
//!   output divided by σ(t)).
//! * `fpe`: as `dsm` plus `1e-3 ×` the score-FPE residual `mean_batch ‖∂_t s − ∇φ‖²`
//!   with the exact divergence and `∂_t s` by autodiff: [`ScoreFpe`] with constant time
//!   weighting, no `d^m` normalization, `m = 2` and no scalar term, which is exactly
//!   `torch_ref.py`'s `score_fpe_residual`.
//! * `em`: Euler–Maruyama on the reverse VP SDE, 10,000 samples × 1,000 steps, no gradients.
//!
//! The image workloads of `../shared/peers/torch_unet.py`, on [`UNetScore`] with its
//! defaults (the U-Net of `shared/UNET.md`) and 1×28×28 images of uniform noise in [−1, 1]
//! (the timing does not depend on the pixels), 20 timed steps after 3 warm-up steps:
//!
//! * `unet-dsm`: DSM training steps/s, VP SDE, batch 64, AdamW lr 2e-4;
//! * `unet-fpe`: DSM + 1e-3 × score-FPE (one Rademacher Hutchinson probe, `∂_t s` by a
//!   central difference with h = 1e-3, constant weighting, normalized by d²), batch 16;
//! * `unet-em`: 64 images × 100 reverse-SDE Euler–Maruyama steps, seconds.
//!
//! Prints the peers' line (`name value unit`) and then `peak_rss_mb <v> MB` (the process's
//! peak resident set, `VmHWM`). f32, 2 threads unless `RAYON_NUM_THREADS` says otherwise.
//!
//! With `--graph` after `dsm` or `fpe`, training goes through candle's autodiff graph, as a
//! network of your own would, instead of `MlpScore`'s hand-written pass.
//!
//! Run: `cargo run --release --example peer_workloads -- dsm|fpe|em [--graph]` or
//! `-- unet-dsm|unet-fpe|unet-em`

use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::autodiff::Divergence;
use scoresde::prelude::*;
use scoresde::regularizer::{ScoreFpe, TimeDerivative, TimeWeighting};

const EPS: f64 = 1e-3;
const WARMUP: usize = 10;
const STEPS: usize = 200;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Before any thread pool exists: rayon and candle's matmul both read it.
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // candle's elementwise ops use a pool of their own whose workers spin between
        // calls; beside rayon's (the matmuls) that oversubscribes 2 cores, and the DSM step
        // ran 9x slower (docs/benchmarks.md). One thread there: elementwise ops run inline.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("CANDLE_GRAD_DO_NOT_DETACH").is_none() {
        // The fpe workload trains through input derivatives (see docs/design.md).
        std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    }
    let workload = std::env::args().nth(1).unwrap_or_default();
    // `--graph`: train through candle's autodiff as a network of your own would, instead of
    // MlpScore's hand-written pass (same work, same numbers to rounding).
    let graph = match std::env::args().nth(2).as_deref() {
        None => false,
        Some("--graph") => true,
        Some(other) => return Err(format!("unknown option {other:?}: expected --graph").into()),
    };
    let device = Device::Cpu;
    let sde = VpSde::new(0.1, 20.0)?;
    if let Some(image_workload) = workload.strip_prefix("unet-") {
        unet(image_workload, sde)?;
        println!("peak_rss_mb {:.1} MB", peak_rss_mb().unwrap_or(f64::NAN));
        return Ok(());
    }
    let vars = VarMap::new();
    let model = MlpScore::new(
        VarBuilder::from_varmap(&vars, DType::F32, &device),
        sde,
        MlpConfig::default(),
    )?;
    match workload.as_str() {
        "dsm" | "fpe" => {
            let mut objective = Objective::new(&sde, &model).with_loss(Dsm::default().with_eps(EPS)?);
            if workload == "fpe" {
                let residual = ScoreFpe::new()
                    .with_weighting(TimeWeighting::Constant)?
                    .with_normalization(false)?
                    .with_divergence(Divergence::Exact)?
                    .with_time_derivative(TimeDerivative::Autodiff)?;
                objective = objective.with_penalty(1e-3, residual)?;
            }
            let objective = objective.with_hand_written_gradients(!graph);
            let mut trainer = Trainer::new(&vars, TrainConfig::default())?;
            let data = Checkerboard::default();
            trainer.fit(&objective, &data, WARMUP, |_| {})?;
            let start = Instant::now();
            trainer.fit(&objective, &data, STEPS, |_| {})?;
            let rate = STEPS as f64 / start.elapsed().as_secs_f64();
            println!("{workload}_train_steps_per_s {rate:.1} steps/s");
        }
        "em" => {
            let mut rng = StdRng::seed_from_u64(0);
            let start = Instant::now();
            let x_t = sde.sample_prior((10_000, 2), DType::F32, &device, &mut rng)?;
            let samples = PredictorCorrector::euler_maruyama(1000)
                .with_eps(EPS)?
                .sample(&sde, &model, &x_t, &mut rng)?;
            let elapsed = start.elapsed().as_secs_f64();
            assert_eq!(samples.stats.nfe, 1000);
            println!("em_10k_x_1000_steps {elapsed:.2} s");
        }
        other => {
            return Err(format!("unknown workload {other:?}: expected dsm, fpe or em").into());
        }
    }
    println!("peak_rss_mb {:.1} MB", peak_rss_mb().unwrap_or(f64::NAN));
    Ok(())
}

/// The image workloads (`torch_unet.py`) on the reference U-Net.
fn unet(workload: &str, sde: VpSde) -> Result<(), Box<dyn std::error::Error>> {
    const STEPS: usize = 20;
    const WARMUP: usize = 3;
    let device = Device::Cpu;
    let vars = VarMap::new();
    let model = UNetScore::new(
        VarBuilder::from_varmap(&vars, DType::F32, &device),
        sde,
        UNetConfig::default(),
    )?;
    let noise_images = |n: usize, rng: &mut dyn rand::RngCore| {
        scoresde::random::uniform((n, 1, 28, 28), -1.0, 1.0, DType::F32, &Device::Cpu, rng)
    };
    match workload {
        "dsm" | "fpe" => {
            let mut objective = Objective::new(&sde, &model).with_loss(Dsm::default().with_eps(EPS)?);
            let batch = if workload == "dsm" { 64 } else { 16 };
            if workload == "fpe" {
                let residual = ScoreFpe::new()
                    .with_weighting(TimeWeighting::Constant)?
                    .with_divergence(Divergence::Hutchinson {
                        probe: scoresde::autodiff::Probe::Rademacher,
                        probes: 1,
                    })?
                    .with_time_derivative(TimeDerivative::FiniteDifference { hs: 1e-3, hd: 1e-3 })?;
                objective = objective.with_penalty(1e-3, residual)?;
            }
            let config = TrainConfig {
                batch_size: batch,
                learning_rate: 2e-4,
                ..Default::default()
            };
            let mut trainer = Trainer::new(&vars, config)?;
            trainer.fit(&objective, &noise_images, WARMUP, |_| {})?;
            let start = Instant::now();
            trainer.fit(&objective, &noise_images, STEPS, |_| {})?;
            let rate = STEPS as f64 / start.elapsed().as_secs_f64();
            println!("unet_{workload}_steps_per_s {rate:.2} steps/s");
        }
        "em" => {
            let mut rng = StdRng::seed_from_u64(0);
            let start = Instant::now();
            let x_t = sde.sample_prior((64, 1, 28, 28), DType::F32, &device, &mut rng)?;
            let samples = PredictorCorrector::euler_maruyama(100)
                .with_eps(EPS)?
                .sample(&sde, &model, &x_t, &mut rng)?;
            assert_eq!(samples.stats.nfe, 100);
            println!("unet_em_64x100 {:.2} s", start.elapsed().as_secs_f64());
        }
        other => {
            return Err(
                format!("unknown workload unet-{other}: expected unet-dsm, unet-fpe or unet-em").into(),
            )
        }
    }
    Ok(())
}

/// The peak resident set size (`VmHWM` in `/proc/self/status`), in MB (Linux only).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
