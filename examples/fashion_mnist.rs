//! Fashion-MNIST end to end: a U-Net score model trained by DSM, sampled three ways,
//! evaluated in bits/dim, and (optionally) fine-tuned with the score Fokker–Planck penalty.
//!
//! 1. Trains [`UNetScore`] (the reference network of `shared/UNET.md`) on the 60,000
//!    training images under the VP SDE with the [`Trainer`] (AdamW, warmup, clipping, EMA),
//!    writing a checkpoint every `--checkpoint-every` steps; `--resume` continues from it
//!    exactly.
//! 2. Samples 64 images with the EMA weights by Euler–Maruyama, predictor–corrector
//!    (reverse diffusion + Langevin) and the probability-flow ODE (RK45), each ending with
//!    score_sde's denoising step `x̂₀ = (x + σ²s)/α` at `ε`, and by DPM-Solver++(2M) in 10
//!    and 20 evaluations, and writes the 8×8 grids to one PNG.
//! 3. Test-set bits/dim through the probability-flow ODE with uniform dequantization of the
//!    8-bit pixels and a Hutchinson trace (score_sde's convention, offset 7: see below).
//! 4. With `--fpe-steps N > 0`: fine-tunes a copy of the EMA model with DSM + λ·score-FPE
//!    (Hutchinson divergence, FP-Diffusion's finite-difference ∂t), as Lai et al. fine-tune
//!    on CIFAR-10, and reports residual, bits/dim and samples before and after.
//!
//! Ends with `fashion_mnist: steps=N dsm_loss=L test_bpd=B test_images=K nfe=N png=PATH`
//! (`nfe`: score evaluations of the likelihood ODE) and, when fine-tuning,
//! `fashion_mnist_fpe: … residual=R residual_before=R0 …`.
//!
//! Bits/dim: pixels p ∈ {0..255} are dequantized to (p + u)/256, u ~ U[0, 1), and scaled to
//! the model's [−1, 1); then bpd = −log p(x)/(d ln 2) + 7, where 7 = log₂ 256 − log₂ 2 undoes
//! the change of variables from the unit-width dequantization bins to [−1, 1) (score_sde's
//! `offset = 7 − inverse_scaler(−1)`).
//!
//! Data: `--data DIR` (default `/usr/share/datasets/fashion-mnist`, where Debian's
//! `apt-get install dataset-fashion-mnist` puts it).
//!
//! Run: `cargo run --release --example fashion_mnist` (defaults: 17 min as measured on a shared
//! 2-core machine, docs/theory.md §10);
//! options `--steps --batch --lr --resume --checkpoint-every --em-steps --test-images
//! --fpe-steps --fpe-weight --out --data`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use plotters::prelude::*;
use plotters::style::FontStyle;
use rand::{rngs::StdRng, SeedableRng};
use scoresde::autodiff::{Divergence, Probe};
use scoresde::data::{ImageDataset, Split, FASHION_MNIST_DIR};
use scoresde::likelihood::{Dequantization, Likelihood};
use scoresde::prelude::*;
use scoresde::regularizer::{ScoreFpe, TimeDerivative, TimeWeighting};
use scoresde::solver::Samples;
use scoresde::train::{load_weights, Weights};

use common::BoxResult;

const EPS: f64 = 1e-3;
const SAMPLES: usize = 64;

struct Settings {
    steps: usize,
    batch: usize,
    lr: f64,
    resume: bool,
    checkpoint_every: usize,
    em_steps: usize,
    test_images: usize,
    fpe_steps: usize,
    fpe_weight: f64,
    out: PathBuf,
    data: PathBuf,
}

fn settings() -> BoxResult<Settings> {
    let o = common::Options::parse_with_flags(
        &[
            "steps",
            "batch",
            "lr",
            "checkpoint-every",
            "em-steps",
            "test-images",
            "fpe-steps",
            "fpe-weight",
            "out",
            "data",
        ],
        &["resume"],
    )?;
    Ok(Settings {
        steps: o.get("steps", 1500)?,
        batch: o.get("batch", 64)?,
        lr: o.get("lr", 1e-3)?,
        resume: o.flag("resume"),
        checkpoint_every: o.get("checkpoint-every", 250)?,
        em_steps: o.get("em-steps", 200)?,
        test_images: o.get("test-images", 32)?,
        fpe_steps: o.get("fpe-steps", 0)?,
        fpe_weight: o.get("fpe-weight", 1e-3)?,
        out: PathBuf::from(o.text("out").unwrap_or("out/fashion_mnist")),
        data: PathBuf::from(o.text("data").unwrap_or(FASHION_MNIST_DIR)),
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("fashion_mnist: {e}");
        std::process::exit(1);
    }
}

fn run() -> BoxResult<()> {
    let start = Instant::now();
    let s = settings()?;
    let train = ImageDataset::fashion_mnist(&s.data, Split::Train)?;
    let test = ImageDataset::fashion_mnist(&s.data, Split::Test)?.take(s.test_images)?;
    std::fs::create_dir_all(&s.out)?;
    let device = Device::Cpu;
    let sde = VpSde::default();

    // 1. DSM training, checkpointed.
    let vars = VarMap::new();
    let model = UNetScore::new(
        VarBuilder::from_varmap(&vars, DType::F32, &device),
        sde,
        UNetConfig::default(),
    )?;
    let config = TrainConfig {
        batch_size: s.batch,
        learning_rate: s.lr,
        warmup_steps: 200,
        grad_clip: Some(1.0),
        ema_decay: 0.999,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&vars, config)?;
    let checkpoint = s.out.join("checkpoint.safetensors");
    if s.resume && checkpoint.exists() {
        trainer.load_checkpoint(&checkpoint)?;
        eprintln!(
            "resumed from {} at step {}",
            checkpoint.display(),
            trainer.step_count()
        );
    }
    let objective = Objective::new(&sde, &model).with_loss(Dsm::default().with_eps(EPS)?);
    common::fit_with_checkpoints(
        "dsm",
        &mut trainer,
        &objective,
        &train,
        s.steps,
        s.checkpoint_every,
        &checkpoint,
    )?;
    eprintln!(
        "trained {} steps in {:.0} s",
        trainer.step_count(),
        start.elapsed().as_secs_f64()
    );

    // The EMA weights, on a VarMap of their own (so fine-tuning can start from them).
    let ema_vars = VarMap::new();
    let ema = UNetScore::new(
        VarBuilder::from_varmap(&ema_vars, DType::F32, &device),
        sde,
        UNetConfig::default(),
    )?;
    load_weights(&checkpoint, &ema_vars, Weights::Ema)?;

    // 2.–3. Samples and bits/dim.
    let png = s.out.join("samples.png");
    let report = evaluate(&sde, &ema, &test, &s, &png, "DSM")?;
    println!(
        "fashion_mnist: steps={} dsm_loss={:.4} test_bpd={:.3} test_images={} nfe={} png={}",
        trainer.step_count(),
        report.dsm_loss,
        report.bpd,
        test.len(),
        report.nfe,
        png.display()
    );

    // 4. Score-FPE fine-tuning of the EMA model.
    if s.fpe_steps > 0 {
        let fpe = ScoreFpe::new()
            .with_weighting(TimeWeighting::Constant)?
            .with_divergence(Divergence::Hutchinson {
                probe: Probe::Rademacher,
                probes: 1,
            })?
            .with_time_derivative(TimeDerivative::PAPER_STENCIL)?;
        let before = residual(&sde, &ema, &test, &fpe)?;
        let tune_config = TrainConfig {
            batch_size: 16,
            learning_rate: 2e-4,
            grad_clip: Some(1.0),
            ema_decay: 0.99,
            seed: 1,
            ..Default::default()
        };
        let mut tuner = Trainer::new(&ema_vars, tune_config)?;
        let tune_checkpoint = s.out.join("fpe_checkpoint.safetensors");
        if s.resume && tune_checkpoint.exists() {
            tuner.load_checkpoint(&tune_checkpoint)?;
        }
        let objective = Objective::new(&sde, &ema)
            .with_loss(Dsm::default().with_eps(EPS)?)
            .with_penalty(s.fpe_weight, fpe.clone())?;
        let every = s.checkpoint_every.min(s.fpe_steps).max(1);
        common::fit_with_checkpoints(
            "dsm+fpe",
            &mut tuner,
            &objective,
            &train,
            s.fpe_steps,
            every,
            &tune_checkpoint,
        )?;
        let tuned_vars = VarMap::new();
        let tuned = UNetScore::new(
            VarBuilder::from_varmap(&tuned_vars, DType::F32, &device),
            sde,
            UNetConfig::default(),
        )?;
        load_weights(&tune_checkpoint, &tuned_vars, Weights::Ema)?;
        let after = residual(&sde, &tuned, &test, &fpe)?;
        let fpe_png = s.out.join("samples_fpe.png");
        let tuned_report = evaluate(&sde, &tuned, &test, &s, &fpe_png, "DSM + score-FPE")?;
        println!(
            "fashion_mnist_fpe: steps={} dsm_loss={:.4} test_bpd={:.3} residual={after:.4e} residual_before={before:.4e} test_images={} nfe={} png={}",
            tuner.step_count(),
            tuned_report.dsm_loss,
            tuned_report.bpd,
            test.len(),
            tuned_report.nfe,
            fpe_png.display()
        );
    }
    eprintln!("finished in {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}

struct Report {
    dsm_loss: f64,
    bpd: f64,
    nfe: usize,
}

/// DSM loss and bits/dim on the test images, and a PNG of samples from three samplers.
fn evaluate(
    sde: &VpSde,
    model: &UNetScore<VpSde>,
    test: &ImageDataset,
    s: &Settings,
    png: &Path,
    title: &str,
) -> BoxResult<Report> {
    let mut rng = StdRng::seed_from_u64(7);
    let clock = Instant::now();
    let dsm_loss = Objective::new(sde, model)
        .with_loss(Dsm::default().with_eps(EPS)?)
        .evaluate(test.images(), &mut rng)?
        .dsm
        .to_scalar::<f32>()? as f64;

    let noise = sde.sample_prior((SAMPLES, 1, 28, 28), DType::F32, &Device::Cpu, &mut rng)?;
    let named = |name: &'static str| move |e: scoresde::Error| format!("{name}: {e}");
    let em = PredictorCorrector::euler_maruyama(s.em_steps)
        .with_eps(EPS)?
        .with_denoise(true)
        .sample(sde, model, &noise, &mut rng)
        .map_err(named("Euler-Maruyama"))?;
    let pc = PredictorCorrector::new(ReverseDiffusion, s.em_steps / 2)
        .with_corrector(Langevin::new(0.16, 1)?)
        .with_eps(EPS)?
        .with_denoise(true)
        .sample(sde, model, &noise, &mut rng)
        .map_err(named("predictor-corrector"))?;
    let ode = OdeSampler::new(Rk45::new(1e-4, 1e-4)?)
        .with_eps(EPS)?
        .with_denoise(true)
        .sample(sde, model, &noise, &mut rng)
        .map_err(named("probability-flow ODE"))?;
    // Few steps: DPM-Solver++(2M) on the log-SNR grid, 10 and 20 evaluations.
    let few = |steps: usize| -> BoxResult<Samples> {
        let sampler = FewStep::dpmpp_2m(steps)?.with_eps(EPS)?;
        Ok(sampler
            .sample(sde, model, &noise, &mut StdRng::seed_from_u64(0))
            .map_err(named("DPM-Solver++"))?)
    };
    let (few10, few20) = (few(10)?, few(20)?);
    let panels = [
        (format!("Euler-Maruyama, {} NFE", em.stats.nfe), em.x),
        (format!("predictor-corrector, {} NFE", pc.stats.nfe), pc.x),
        (
            format!("probability-flow ODE (RK45), {} NFE", ode.stats.nfe),
            ode.x,
        ),
        (format!("DPM-Solver++(2M), {} NFE", few10.stats.nfe), few10.x),
        (format!("DPM-Solver++(2M), {} NFE", few20.stats.nfe), few20.x),
    ];
    image_grids(png, title, &panels)?;
    eprintln!("{title}: sampled in {:.0} s", clock.elapsed().as_secs_f64());

    // Test bits/dim: dequantized 8-bit pixels, Hutchinson trace (d = 784).
    let clock = Instant::now();
    let unit = ((test.images() + 1.0)? * 0.5)?; // back to p/255 in [0, 1]
    let likelihood = Likelihood::new()
        .with_solver(Rk45::new(1e-5, 1e-5)?)
        .with_divergence(Divergence::Hutchinson {
            probe: Probe::Rademacher,
            probes: 1,
        })?
        .with_dequantization(Dequantization::eight_bit().centered());
    let estimate = likelihood.evaluate(sde, model, &unit, &mut rng)?;
    let bpd = estimate.bits_per_dim.mean_all()?.to_scalar::<f64>()?;
    eprintln!(
        "{title}: test bits/dim {bpd:.3} in {:.0} s",
        clock.elapsed().as_secs_f64()
    );
    Ok(Report {
        dsm_loss,
        bpd,
        nfe: estimate.nfe,
    })
}

/// The mean score-FPE penalty over the test images at random times (fixed seed).
fn residual(sde: &VpSde, model: &UNetScore<VpSde>, test: &ImageDataset, fpe: &ScoreFpe) -> BoxResult<f64> {
    use scoresde::regularizer::Regularizer;
    let mut rng = StdRng::seed_from_u64(11);
    let x0 = test.images();
    let n = x0.dim(0)?;
    let t = scoresde::random::uniform(n, 0.01, 0.99, DType::F32, &Device::Cpu, &mut rng)?;
    let z = scoresde::random::standard_normal(x0.shape(), DType::F32, &Device::Cpu, &mut rng)?;
    let x = sde.perturb(x0, &t, &z)?;
    // In chunks: the penalty differentiates the network twice.
    let mut total = 0.0;
    for start in (0..n).step_by(16) {
        let len = 16.min(n - start);
        let p = fpe.penalty(
            sde,
            model,
            &x.narrow(0, start, len)?,
            &t.narrow(0, start, len)?,
            &mut rng,
        )?;
        total += p.to_scalar::<f32>()? as f64 * len as f64;
    }
    Ok(total / n as f64)
}

/// Panels of 8×8 image grids, three to a row, each under its caption.
fn image_grids(path: &Path, title: &str, panels: &[(String, Tensor)]) -> BoxResult<()> {
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        include_bytes!("../assets/DejaVuSansMono.ttf"),
    )
    .map_err(|_| "cannot read the bundled font")?;
    const SCALE: u32 = 2;
    const SIDE: u32 = 8 * 28 * SCALE;
    const COLUMNS: u32 = 3;
    let (pad, title_height, caption) = (16u32, 32u32, 26u32);
    let rows = (panels.len() as u32).div_ceil(COLUMNS);
    let width = COLUMNS * (SIDE + pad) + pad;
    let height = title_height + rows * (caption + SIDE + pad);
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    root.draw_text(title, &("sans-serif", 18).into_text_style(&root), (pad as i32, 6))?;
    for (i, (text, images)) in panels.iter().enumerate() {
        let x0 = pad + (i as u32 % COLUMNS) * (SIDE + pad);
        let y0 = title_height + (i as u32 / COLUMNS) * (caption + SIDE + pad);
        root.draw_text(
            text,
            &("sans-serif", 14).into_text_style(&root),
            (x0 as i32, y0 as i32 + 4),
        )?;
        let pixels = ImageDataset::to_pixels(images)?.flatten_all()?.to_vec1::<u8>()?;
        for (k, image) in pixels.chunks_exact(28 * 28).take(64).enumerate() {
            let (gx, gy) = (
                x0 + (k as u32 % 8) * 28 * SCALE,
                y0 + caption + (k as u32 / 8) * 28 * SCALE,
            );
            for (j, &v) in image.iter().enumerate() {
                let (px, py) = (gx + (j as u32 % 28) * SCALE, gy + (j as u32 / 28) * SCALE);
                for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    root.draw_pixel(((px + dx) as i32, (py + dy) as i32), &RGBColor(v, v, v))?;
                }
            }
        }
    }
    root.present()?;
    Ok(())
}
