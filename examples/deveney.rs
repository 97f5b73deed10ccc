//! Deveney et al. (Phil. Trans. A 2025) at the paper's scale: train one log-density network
//! `u(x, t)` with DSM + w · (log-density Fokker–Planck residual + boundary term), or load
//! one (the paper's released networks, converted by `scripts/deveney_reference.py`), then
//! sample it with the probability-flow ODE and the reverse SDE and measure both against the
//! data exactly as the paper does.
//!
//! The paper's setting (teojd/ODESDEGap): OU SDE (θ = 1, s = 1, T = 10), the 3 × 80
//! Softplus(β = 100) network on `[t, x]`, DSM with constant weighting and times
//! `T·Beta(1, 2) + ε` (ε = 1e-5), the residual at points uniform in the box `[−3.5, 3.5]²`
//! (`[−5.5, 5.5]²` for blob) × `[ε, T]`, Adam without weight decay or averaging, 100,000
//! steps. Two recipes, both at the paper's CPU sizes:
//!
//! * default, its `OUPINN.py`: 1,998 DSM points, 5,000 interior points and the boundary
//!   term `mean(exp(u)²)` on 1,000 points per face each step, lr 1e-3 throughout;
//! * `--paper`, its `OUPINN_loop.py`, which trained the released networks: 20,000 DSM
//!   points, 5,000 interior points, no boundary term, lr 1e-3 for 25,000 steps, 1e-4 for
//!   65,000 and 1e-5 for 10,000 (the paper also restarts Adam at each drop: add
//!   `--restart-adam`).
//!
//! `--batch`, `--collocation`, `--boundary` (0: none), `--schedule` and `--steps`
//! override either.
//!
//! Evaluation, as the paper's `experiment_plotting.py`: `--samples` ODE and SDE samples
//! (Euler and Euler–Maruyama on `TimeGrid::deveney`: 800 steps from T, the last 10 refined
//! tenfold); those outside the open box `(−3.5, 3.5)²` are dropped (for every dataset, as
//! the paper does; `dropped=` counts them) and the rest binned to the nearest node of the
//! 64 × 64 grid of `[−3.5, 3.5]²`; W2² by exact transport between the
//! histograms with the paper's ground cost (nodes of `[−4, 4]²`, i.e. (8/7)² × the true
//! value; both are printed). The data histogram is the paper's precomputed one of 3,000,000
//! samples when `--precomputed DIR` (its `precomputed_dists/`) is given, otherwise 3,000,000
//! samples of the crate's copy of the dataset.
//!
//! One line per run, W2² in the paper's convention, then true-geometry W2:
//!
//!     deveney: data=<d> w=<w> source=<trained|file> samples=<n> w2sq_ode_sde=<v> w2sq_ode_data=<v> w2sq_sde_data=<v> w2_true=<a>/<b>/<c>
//!
//! With `--precomputed`, a `paper:` line gives the same numbers from the paper's own
//! 3,000,000-sample ODE and SDE histograms of the released network for that data and w.
//!
//! Options: `--data checker|circles2|blob` (default checker), `--w 0` (the penalty weight),
//! `--paper`, `--steps N` (default 100000), `--batch N` (1998; 20000 with `--paper`),
//! `--collocation N` (5000), `--boundary N` (per face, 1000; 0 with `--paper`),
//! `--schedule constant|paper|cosine:F` (constant; paper with `--paper`: the drops above;
//! cosine: down to F·1e-3 over the run), `--restart-adam` (with the paper schedule: a
//! fresh Adam at each drop, as the paper's code), `--seed N` (0), `--ema D` (0: none, as in the
//! paper; else the written and evaluated weights are the average and the last iterate goes
//! to `{out}/{tag}_last.safetensors`), `--tag S` (appended to the file names, after
//! `_oupinn` for networks trained without `--paper`),
//! `--checkpoint-every N` (5000), `--resume`, `--load FILE` (evaluate this paper-layout
//! safetensors instead of training), `--samples N` (60000; 0 for the held-out DSM loss
//! alone), `--sample-steps N` (800), `--precomputed DIR`, `--out DIR` (out/deveney).
//!
//! Besides the `deveney:` line it prints `dsm:` (the held-out DSM loss on 20,000 fixed
//! perturbed points) and `floor:` (fresh data samples against the data histogram: the
//! sampling noise of `--samples` points).
//!
//! A trained network is written to `{out}/{tag}.safetensors` (`{data}_w{w}` with `--paper`)
//! in the paper's layout
//! (`input|hidden1|hidden2|output.{weight,bias}`), w printed as 0.0, 0.1, 1.0, 10.0. The
//! optimizer state goes to `{out}/{tag}.checkpoint.safetensors` every
//! `--checkpoint-every` steps; `--resume` continues from it exactly.
//!
//! Run: `cargo run --release --example deveney -- --data checker --w 0` (about 15 minutes
//! on 2 cores, 4 of them sampling and evaluating); `--paper` takes hours (about ten times
//! the cost per step). Results and commands: docs/theory.md §6.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::data::{read_npy, Blob, Checkerboard, Dataset, TwoCircles};
use scoresde::loss::{Dsm, TimeSampling, Weighting};
use scoresde::metrics::{Grid, Histogram};
use scoresde::prelude::*;
use scoresde::solver::{Sampler, TimeGrid};
use scoresde::train::{deveney_names, load_foreign_weights, save_foreign_weights, LrDecay};

/// The paper's smallest time, of training, collocation and sampling.
const EPS: f64 = 1e-5;
/// Samples in the paper's histograms (as their file names say).
const DATA_SAMPLES: usize = 3_000_000;

fn main() -> common::BoxResult<()> {
    let opts = common::Options::parse_with_flags(
        &[
            "data",
            "w",
            "steps",
            "batch",
            "collocation",
            "boundary",
            "seed",
            "ema",
            "schedule",
            "tag",
            "checkpoint-every",
            "load",
            "samples",
            "sample-steps",
            "precomputed",
            "out",
        ],
        &["paper", "resume", "restart-adam"],
    )?;
    let name = opts.text("data").unwrap_or("checker").to_string();
    let w: f64 = opts.get("w", 0.0)?;
    // `--paper`: how the released networks were trained (OUPINN_loop.py, CPU sizes);
    // otherwise OUPINN.py's CPU setting. Each option overrides.
    let paper = opts.flag("paper");
    let steps: usize = opts.get("steps", 100_000)?;
    let batch: usize = opts.get("batch", if paper { 20_000 } else { 1998 })?;
    let collocation: usize = opts.get("collocation", 5000)?;
    let boundary: usize = opts.get("boundary", if paper { 0 } else { 1000 })?;
    let seed: u64 = opts.get("seed", 0)?;
    let ema: f64 = opts.get("ema", 0.0)?;
    let schedule = opts
        .text("schedule")
        .unwrap_or(if paper { "paper" } else { "constant" });
    let decay = match schedule {
        "constant" => LrDecay::Constant,
        "paper" => LrDecay::MultiStep {
            milestones: vec![25_000, 90_000],
            gamma: 0.1,
            restart_adam: opts.flag("restart-adam"),
        },
        cosine => match cosine.strip_prefix("cosine:").map(str::parse::<f64>) {
            Some(Ok(floor)) => LrDecay::Cosine { steps, floor },
            _ => return Err(format!("--schedule {cosine}: use constant, paper or cosine:F").into()),
        },
    };
    if opts.flag("restart-adam") && !matches!(decay, LrDecay::MultiStep { .. }) {
        return Err("--restart-adam restarts Adam at the paper schedule's drops: use it with --paper or --schedule paper".into());
    }
    let every: usize = opts.get("checkpoint-every", 5000)?;
    let samples: usize = opts.get("samples", 60_000)?;
    let sample_steps: usize = opts.get("sample-steps", 800)?;
    let out = PathBuf::from(opts.text("out").unwrap_or("out/deveney"));
    std::fs::create_dir_all(&out)?;

    let (data, half_width): (Box<dyn Dataset>, f64) = match name.as_str() {
        "checker" => (Box::new(Checkerboard::deveney()), 3.5),
        "circles2" => (Box::new(TwoCircles), 3.5),
        "blob" => (Box::new(Blob), 5.5),
        other => return Err(format!("unknown dataset {other}; use checker, circles2 or blob").into()),
    };
    let start = Instant::now();
    let device = Device::Cpu;
    let sde = OuSde::default();
    // `--paper` runs are `{data}_w{w}`; OUPINN.py's recipe gets its own name, so that a
    // `--resume` never continues a run of the other recipe. A loaded network has no recipe.
    let recipe = if paper || opts.text("load").is_some() {
        ""
    } else {
        "_oupinn"
    };
    let tag = format!("{name}_w{w:?}{recipe}{}", opts.text("tag").unwrap_or(""));

    // The network to evaluate, in the paper's layout.
    let weights = match opts.text("load") {
        Some(file) => PathBuf::from(file),
        None => {
            let vars = VarMap::new();
            let model = GradientScore::new(potential(&vars, &device, seed)?);
            let loss = Dsm::default()
                .with_weighting(Weighting::Constant)
                .with_time_sampling(TimeSampling::Beta12)
                .with_eps(EPS)?;
            let mut objective = Objective::new(&sde, &model).with_loss(loss);
            if w > 0.0 {
                // No boundary term (0) as OUPINN_loop.py, whose boundary weight is 0.
                let penalty = common::deveney_penalty(half_width, collocation, boundary, EPS)?;
                objective = objective.with_penalty(w, penalty)?;
            }
            let config = TrainConfig {
                batch_size: batch,
                weight_decay: 0.0, // the paper's Adam
                ema_decay: ema,    // 0: no weight averaging, as in the paper
                decay,
                seed,
                ..Default::default()
            };
            let mut trainer = Trainer::new(&vars, config)?;
            let checkpoint = out.join(format!("{tag}.checkpoint.safetensors"));
            if opts.flag("resume") && checkpoint.exists() {
                trainer.load_checkpoint(&checkpoint)?;
                eprintln!("{tag}: resumed at step {}", trainer.step_count());
            }
            common::fit_with_checkpoints(&tag, &mut trainer, &objective, &*data, steps, every, &checkpoint)?;
            let file = out.join(format!("{tag}.safetensors"));
            save_foreign_weights(&file, trainer.ema(), &deveney_names())?;
            if ema > 0.0 {
                // The last iterate too, to compare with the average (`--load` it).
                save_foreign_weights(
                    out.join(format!("{tag}_last.safetensors")),
                    &vars,
                    &deveney_names(),
                )?;
            }
            eprintln!(
                "{tag}: {} steps, wrote {} ({:.0} s)",
                trainer.step_count(),
                file.display(),
                start.elapsed().as_secs_f64()
            );
            file
        }
    };
    let source = if opts.text("load").is_some() {
        weights.display().to_string()
    } else {
        "trained".to_string()
    };

    // Sampling needs only the score's values: the hand-written pass, no graph.
    let vars = VarMap::new();
    let model = GradientScore::values_only(potential(&vars, &device, seed)?);
    load_foreign_weights(&weights, &vars, &deveney_names())?;
    // Held-out DSM loss (the crate's convention: summed over the 2 coordinates, so twice
    // the paper's printed value), on the same perturbed points for every network.
    let loss = Dsm::default()
        .with_weighting(Weighting::Constant)
        .with_time_sampling(TimeSampling::Beta12)
        .with_eps(EPS)?;
    let held_out = data
        .sample(20_000, &mut StdRng::seed_from_u64(5))?
        .to_dtype(DType::F32)?;
    let graph_model = GradientScore::new(potential(&vars, &device, seed)?);
    let dsm = Objective::new(&sde, &graph_model)
        .with_loss(loss)
        .evaluate(&held_out, &mut StdRng::seed_from_u64(6))?
        .dsm
        .to_scalar::<f32>()?;
    println!("dsm: data={name} w={w:?} heldout_dsm={dsm:.4} points=20000");
    if samples == 0 {
        return Ok(()); // the loss alone
    }

    let grid = TimeGrid::deveney(sde.end_time(), EPS, sample_steps)?;
    let ode_sampler = OdeSampler::new(Euler::new(grid.clone()));
    let sde_sampler = PredictorCorrector::euler_maruyama(grid);
    let mut rng = StdRng::seed_from_u64(seed + 11);
    let prior = |rng: &mut StdRng| sde.sample_prior((samples, 2), DType::F32, &device, rng);
    let ode = ode_sampler.sample(&sde, &model, &prior(&mut rng)?, &mut rng)?.x;
    let stochastic = sde_sampler.sample(&sde, &model, &prior(&mut rng)?, &mut rng)?.x;

    let binned = Grid::nodes(-3.5, 3.5, 64)?;
    // The paper drops samples outside the open box (−3.5, 3.5)², for every dataset
    // (experiment_plotting.py's generate_*_samples), before binning the rest.
    let (ode_kept, sde_kept) = (inside_box(&ode, 3.5)?, inside_box(&stochastic, 3.5)?);
    let (ode_h, sde_h) = (
        Histogram::new(&ode_kept, binned)?,
        Histogram::new(&sde_kept, binned)?,
    );
    let precomputed = opts.text("precomputed").map(PathBuf::from);
    let data_h = match &precomputed {
        Some(dir) => paper_histogram(&dir.join(format!("weights_truth_64_{DATA_SAMPLES}_{name}.npy")))?,
        None => Histogram::new(
            &data.sample(DATA_SAMPLES, &mut rng)?.to_dtype(DType::F32)?,
            binned,
        )?,
    };
    // Sampling noise alone: fresh data samples of the same size against the data histogram.
    let floor = Histogram::new(&data.sample(samples, &mut rng)?.to_dtype(DType::F32)?, binned)?;
    println!(
        "floor: data={name} samples={samples} w2sq_data_data={:.4}",
        w2_squared(&floor, &data_h)?
    );
    let report = |label: &str, ode: &Histogram, sde: &Histogram, extra: &str| -> common::BoxResult<()> {
        let (a, b, c) = (
            w2_squared(ode, sde)?,
            w2_squared(ode, &data_h)?,
            w2_squared(sde, &data_h)?,
        );
        let true_w2 = |v: f64| (v * (7.0f64 / 8.0).powi(2)).sqrt();
        println!(
            "{label}: data={name} w={w:?} {extra} w2sq_ode_sde={a:.4} w2sq_ode_data={b:.4} w2sq_sde_data={c:.4} w2_true={:.3}/{:.3}/{:.3}",
            true_w2(a),
            true_w2(b),
            true_w2(c)
        );
        Ok(())
    };
    report(
        "deveney",
        &ode_h,
        &sde_h,
        &format!(
            "source={source} samples={samples} dropped={}/{}",
            samples - ode_kept.dim(0)?,
            samples - sde_kept.dim(0)?
        ),
    )?;
    if let Some(dir) = &precomputed {
        let file = |kind: &str| {
            dir.join(format!(
                "weights_{kind}_64_{DATA_SAMPLES}_100000_800_{name}_{w:?}.npy"
            ))
        };
        if file("ode").exists() {
            report(
                "paper",
                &paper_histogram(&file("ode"))?,
                &paper_histogram(&file("sde"))?,
                &format!("source=precomputed samples={DATA_SAMPLES}"),
            )?;
        }
    }
    let shown = samples.min(5000);
    let png = out.join(format!("{tag}.png"));
    common::plot_panels(
        &png.display().to_string(),
        2,
        half_width,
        &[
            (format!("{name} w={w:?}: ODE"), &ode.narrow(0, 0, shown)?),
            (format!("{name} w={w:?}: SDE"), &stochastic.narrow(0, 0, shown)?),
        ],
    )?;
    eprintln!(
        "{tag}: wrote {} ({:.0} s)",
        png.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The rows of `x` (shape `[N, 2]`) strictly inside `(−half, half)²`.
fn inside_box(x: &Tensor, half: f64) -> common::BoxResult<Tensor> {
    let rows: Vec<f32> = x
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?
        .into_iter()
        .filter(|p| p.iter().all(|v| (v.abs() as f64) < half))
        .flatten()
        .collect();
    let n = rows.len() / 2;
    Ok(Tensor::from_vec(rows, (n, 2), x.device())?)
}

/// The paper's network in `vars`.
fn potential(vars: &VarMap, device: &Device, seed: u64) -> scoresde::Result<MlpPotential> {
    MlpPotential::new(
        VarBuilder::from_varmap(vars, DType::F32, device),
        PotentialConfig {
            seed,
            ..Default::default()
        },
    )
}

/// W2² between two histograms binned on the nodes of `[−3.5, 3.5]²`, with the paper's
/// ground cost between the nodes of `[−4, 4]²`.
fn w2_squared(x: &Histogram, y: &Histogram) -> scoresde::Result<f64> {
    let cost = Grid::nodes(-4.0, 4.0, 64)?;
    x.with_grid(cost)?.w2_squared(&y.with_grid(cost)?)
}

/// One of the paper's precomputed histograms: 4,096 f64 weights summing to 1, in NumPy's
/// `meshgrid` order (y slowest), as the integer counts they were normalized from (the
/// number of binned samples `n` is the file name's, or recovered from the smallest weight,
/// `k/n`).
fn paper_histogram(path: &Path) -> common::BoxResult<Histogram> {
    let weights = read_npy(path, &Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    if weights.len() != 64 * 64 {
        return Err(format!("{}: expected 4096 weights, got {}", path.display(), weights.len()).into());
    }
    let smallest = weights
        .iter()
        .copied()
        .filter(|&p| p > 0.0)
        .fold(f64::INFINITY, f64::min);
    // The file name's sample size, or fewer (samples the paper dropped outside [−4, 4]²).
    let total = std::iter::once(DATA_SAMPLES as f64)
        .chain((1..=4).map(|k| (k as f64 / smallest).round()))
        .find(|&n| weights.iter().all(|&p| (p * n - (p * n).round()).abs() < 1e-3))
        .ok_or_else(|| {
            format!(
                "{}: the weights are not counts over one sample size",
                path.display()
            )
        })?;
    let mut counts = vec![0u64; 64 * 64];
    for (i, &p) in weights.iter().enumerate() {
        let (y, x) = (i / 64, i % 64);
        counts[x * 64 + y] = (p * total).round() as u64;
    }
    Ok(Histogram::from_counts(Grid::nodes(-3.5, 3.5, 64)?, 2, &counts)?)
}
