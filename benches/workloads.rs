//! Criterion benchmarks of the crate's hot paths on the peers' reference network
//! ([`MlpScore`] defaults: 32 Fourier features, 3×128 SiLU, f32, VP SDE):
//!
//! * `em_step`: one Euler–Maruyama step on 10,000 samples (a one-step sampler);
//! * `rk45_sample`: a probability-flow ODE sample of 1,000 points, RK45 at rtol = atol = 1e-3;
//! * `dsm_step`: one training step (batch 512, AdamW, EMA) of denoising score matching;
//! * `fpe_step`: the same plus `1e-3 ×` the score-FPE residual (exact divergence, autodiff ∂t);
//! * `log_density_fp_step`: a training step of `ode_sde_gap` (OU SDE, `MlpPotential` 3×80
//!   Softplus β = 100, batch 1,000, DSM + the log-density FP penalty at 500 box points
//!   plus the boundary term at 4 × 125 points);
//! * each training step also as `…_graph`, through candle's autodiff instead of the
//!   model's hand-written pass (`Objective::with_hand_written_gradients(false)`);
//! * `likelihood`: log-densities of 64 points (exact divergence, RK45 at 1e-3).
//!
//! Short runs (10 samples, a few seconds each): `cargo bench --bench workloads`. Threads:
//! `RAYON_NUM_THREADS` (2 on the reference machine, set here when absent).

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::autodiff::Divergence;
use scoresde::likelihood::Likelihood;
use scoresde::loss::{TimeSampling, Weighting};
use scoresde::prelude::*;
use scoresde::regularizer::{Boundary, Collocation, LogDensityFp, ScoreFpe, TimeDerivative, TimeWeighting};

fn setup() -> (VpSde, VarMap, MlpScore<VpSde>) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // See examples/peer_workloads.rs: candle's spinning elementwise pool off.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let sde = VpSde::default();
    let vars = VarMap::new();
    let model = MlpScore::new(
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
        sde,
        MlpConfig::default(),
    )
    .unwrap();
    (sde, vars, model)
}

fn prior(sde: &VpSde, n: usize) -> Tensor {
    sde.sample_prior((n, 2), DType::F32, &Device::Cpu, &mut StdRng::seed_from_u64(0))
        .unwrap()
}

fn sampling(c: &mut Criterion) {
    let (sde, _vars, model) = setup();
    let x = prior(&sde, 10_000);
    let mut rng = StdRng::seed_from_u64(1);
    let one_step = PredictorCorrector::euler_maruyama(1);
    c.bench_function("em_step", |b| {
        b.iter(|| one_step.sample(&sde, &model, &x, &mut rng).unwrap())
    });
    let x = prior(&sde, 1000);
    let rk45 = OdeSampler::new(Rk45::new(1e-3, 1e-3).unwrap());
    c.bench_function("rk45_sample", |b| {
        b.iter(|| rk45.sample(&sde, &model, &x, &mut rng).unwrap())
    });
}

fn training(c: &mut Criterion) {
    let (sde, vars, model) = setup();
    let data = Checkerboard::default();
    let loss = Dsm::default().with_eps(1e-3).unwrap();
    let dsm = Objective::new(&sde, &model).with_loss(loss);
    let mut trainer = Trainer::new(&vars, TrainConfig::default()).unwrap();
    c.bench_function("dsm_step", |b| b.iter(|| trainer.step(&dsm, &data).unwrap()));
    let graph = Objective::new(&sde, &model)
        .with_loss(loss)
        .with_hand_written_gradients(false);
    c.bench_function("dsm_step_graph", |b| {
        b.iter(|| trainer.step(&graph, &data).unwrap())
    });
    let residual = ScoreFpe::new()
        .with_weighting(TimeWeighting::Constant)
        .and_then(|f| f.with_normalization(false))
        .and_then(|f| f.with_divergence(Divergence::Exact))
        .and_then(|f| f.with_time_derivative(TimeDerivative::Autodiff))
        .unwrap();
    let fpe = Objective::new(&sde, &model)
        .with_loss(loss)
        .with_penalty(1e-3, residual.clone())
        .unwrap();
    c.bench_function("fpe_step", |b| b.iter(|| trainer.step(&fpe, &data).unwrap()));
    let graph = Objective::new(&sde, &model)
        .with_loss(loss)
        .with_penalty(1e-3, residual)
        .unwrap()
        .with_hand_written_gradients(false);
    c.bench_function("fpe_step_graph", |b| {
        b.iter(|| trainer.step(&graph, &data).unwrap())
    });
}

fn potential_training(c: &mut Criterion) {
    setup();
    let sde = OuSde::default();
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    let model = GradientScore::new(MlpPotential::new(vb, PotentialConfig::default()).unwrap());
    let loss = Dsm::default()
        .with_weighting(Weighting::Constant)
        .with_time_sampling(TimeSampling::Beta12);
    let penalty = LogDensityFp::new()
        .with_collocation(Collocation::UniformBox {
            low: -3.5,
            high: 3.5,
            points: 500,
            eps: 1e-5,
        })
        .unwrap()
        .with_boundary(Some(Boundary::new(1.0, 125).unwrap()));
    let config = TrainConfig {
        batch_size: 1000,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&vars, config).unwrap();
    let data = Checkerboard::deveney();
    let objective = Objective::new(&sde, &model)
        .with_loss(loss)
        .with_penalty(1.0, penalty)
        .unwrap();
    c.bench_function("log_density_fp_step", |b| {
        b.iter(|| trainer.step(&objective, &data).unwrap())
    });
    let graph = objective.with_hand_written_gradients(false);
    c.bench_function("log_density_fp_step_graph", |b| {
        b.iter(|| trainer.step(&graph, &data).unwrap())
    });
}

fn likelihood(c: &mut Criterion) {
    let (sde, _vars, model) = setup();
    let x = Checkerboard::default()
        .sample(64, &mut StdRng::seed_from_u64(2))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let flow = Likelihood::new()
        .with_solver(Rk45::new(1e-3, 1e-3).unwrap())
        .with_divergence(Divergence::Exact)
        .unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    c.bench_function("likelihood", |b| {
        b.iter(|| flow.evaluate(&sde, &model, &x, &mut rng).unwrap())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = sampling, training, potential_training, likelihood
}
criterion_main!(benches);
