//! `MlpScore`'s hand-written training pass against candle's autodiff: the same DSM and
//! score-FPE values and the same weight gradients, for both activations, every DSM
//! weighting and FPE option the pass takes, several SDEs and data dimensions; and whole
//! training runs that agree step for step.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::autodiff::Divergence;
use scoresde::data::Checkerboard;
use scoresde::loss::{Dsm, Reduction, TimeSampling, Weighting};
use scoresde::regularizer::{
    Boundary, Collocation, LogDensityFp, Regularizer, ScoreFpe, TimeDerivative, TimeWeighting, TimeWindow,
};
use scoresde::score::{Activation, MlpConfig, MlpPotential, MlpScore, PotentialConfig};
use scoresde::sde::{OuSde, Sde, SubVpSde, VeSde, VpSde};
use scoresde::train::{Objective, TrainConfig, Trainer};
use scoresde::{GradientScore, ScoreModel};

fn exact_fpe() -> ScoreFpe {
    ScoreFpe::new()
        .with_divergence(Divergence::Exact)
        .unwrap()
        .with_time_derivative(TimeDerivative::Autodiff)
        .unwrap()
}

fn model<S: Sde>(vars: &VarMap, sde: S, dim: usize, activation: Activation, dtype: DType) -> MlpScore<S> {
    let config = MlpConfig {
        dim,
        width: 16,
        depth: 2,
        activation,
        fourier_features: 6,
        fourier_scale: 2.0,
        seed: 3,
    };
    MlpScore::new(VarBuilder::from_varmap(vars, dtype, &Device::Cpu), sde, config).unwrap()
}

fn batch(dim: usize, n: usize, dtype: DType) -> Tensor {
    let mut rng = StdRng::seed_from_u64(11);
    let values: Vec<f64> = (0..n * dim)
        .map(|_| rand::Rng::random_range(&mut rng, -2.0..2.0))
        .collect();
    Tensor::from_vec(values, (n, dim), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The largest relative difference `|a − b| / (|b|_∞ + floor)` over a tensor.
fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())) + 1e-12;
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

/// Evaluates `objective` on one seeded batch both ways and compares every term and
/// gradient; returns the hand-written penalty (to check it is not trivially zero).
fn compare<S, M, R>(
    sde: &S,
    model: &M,
    vars: &VarMap,
    loss: Dsm,
    penalty: Option<(f64, R)>,
    x0: &Tensor,
    tolerance: f64,
) -> Option<f64>
where
    S: Sde,
    M: ScoreModel,
    R: Regularizer<S, M> + Send + Sync,
{
    let mut objective = Objective::new(sde, model).with_loss(loss);
    if let Some((weight, r)) = penalty {
        objective = objective.with_penalty(weight, r).unwrap();
    }
    let value = objective.evaluate(x0, &mut StdRng::seed_from_u64(5)).unwrap();
    // The same stream up to the penalty's draws, as the trainer uses it.
    let mut rng = StdRng::seed_from_u64(5);
    objective.loss().draw(sde, x0, &mut rng).unwrap();
    let graph = value.total.backward().unwrap();
    let terms = objective
        .terms(&value.batch, &mut rng)
        .unwrap()
        .expect("a hand-writable objective");
    let hand = model
        .objective_gradients(&terms)
        .unwrap()
        .expect("MlpScore has the pass");

    let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let dsm = scalar(&value.dsm);
    assert!(
        (hand.dsm - dsm).abs() <= tolerance * dsm.abs(),
        "dsm {} vs {dsm}",
        hand.dsm
    );
    match (hand.penalty, value.penalties.first()) {
        (Some(p), Some(q)) => {
            let q = scalar(q);
            assert!((p - q).abs() <= tolerance * q.abs(), "penalty {p} vs {q}");
        }
        (None, None) => {}
        other => panic!("penalty present on one side only: {other:?}"),
    }
    // Every trained variable: the same gradient; the fixed frequencies: none either way.
    let trained = vars.all_vars();
    let with_gradient = trained
        .iter()
        .filter(|v| graph.get(v.as_tensor()).is_some())
        .count();
    assert_eq!(hand.gradients.len(), with_gradient);
    for var in &trained {
        let from_graph = graph.get(var.as_tensor());
        let from_hand = hand
            .gradients
            .iter()
            .find(|(v, _)| v.id() == var.id())
            .map(|(_, g)| g);
        match (from_hand, from_graph) {
            (Some(h), Some(g)) => {
                assert_eq!(h.dims(), g.dims());
                let e = relative_difference(h, g);
                assert!(
                    e <= tolerance,
                    "gradient of a {:?} variable: relative error {e}",
                    var.dims()
                );
            }
            // The score MLP's fixed frequencies; a potential's output bias (u's constant).
            (None, None) => assert!(var.dims() == [3] || var.dims() == [1]),
            _ => panic!("a gradient on one side only for a {:?} variable", var.dims()),
        }
    }
    hand.penalty
}

/// [`compare`] with the default DSM loss, in f64.
fn compare_with_dsm<S, M, R>(sde: &S, model: &M, vars: &VarMap, penalty: (f64, R), x0: &Tensor) -> Option<f64>
where
    S: Sde,
    M: ScoreModel,
    R: Regularizer<S, M> + Send + Sync,
{
    compare(sde, model, vars, Dsm::default(), Some(penalty), x0, F64_TOLERANCE)
}

/// f64: agreement to 1e-9 relative (the two ways sum the same terms in different orders;
/// the FPE gradient involves third derivatives of a network with weights O(1), so allow a
/// few hundred ulps times the condition of the sums).
const F64_TOLERANCE: f64 = 1e-9;

#[test]
fn dsm_gradients_match_autodiff_for_every_weighting() {
    let sde = VpSde::default();
    for activation in [Activation::Silu, Activation::Tanh] {
        for weighting in [
            Weighting::SigmaSquared,
            Weighting::Likelihood,
            Weighting::Constant,
        ] {
            for reduction in [Reduction::Mean, Reduction::Sum] {
                let vars = VarMap::new();
                let m = model(&vars, sde, 2, activation, DType::F64);
                let loss = Dsm::default().with_weighting(weighting).with_reduction(reduction);
                compare::<_, _, ScoreFpe>(
                    &sde,
                    &m,
                    &vars,
                    loss,
                    None,
                    &batch(2, 24, DType::F64),
                    F64_TOLERANCE,
                );
            }
        }
    }
}

#[test]
fn fpe_gradients_match_autodiff() {
    let sde = VpSde::default();
    for activation in [Activation::Silu, Activation::Tanh] {
        for weighting in [
            TimeWeighting::Constant,
            TimeWeighting::Diffusion,
            TimeWeighting::DiffusionSquared,
        ] {
            for normalize in [false, true] {
                let vars = VarMap::new();
                let m = model(&vars, sde, 2, activation, DType::F64);
                let fpe = exact_fpe()
                    .with_weighting(weighting)
                    .and_then(|f| f.with_normalization(normalize))
                    .unwrap();
                let loss = Dsm::default().with_weighting(Weighting::Likelihood);
                let p = compare(
                    &sde,
                    &m,
                    &vars,
                    loss,
                    Some((0.3, fpe)),
                    &batch(2, 24, DType::F64),
                    F64_TOLERANCE,
                );
                assert!(p.unwrap() > 1e-3, "the untrained network violates the score FPE");
            }
        }
    }
}

/// Other SDEs: drift zero (VE), time-dependent (sub-VP), constant (OU); and a model built
/// for another SDE than the objective's.
#[test]
fn fpe_gradients_match_autodiff_under_every_sde() {
    fn check<S: Sde + Copy>(sde: S, activation: Activation, loss: Dsm) {
        let vars = VarMap::new();
        let m = model(&vars, sde, 2, activation, DType::F64);
        let x0 = batch(2, 16, DType::F64);
        compare(
            &sde,
            &m,
            &vars,
            loss,
            Some((1.0, exact_fpe())),
            &x0,
            F64_TOLERANCE,
        );
    }
    let beta = Dsm::default().with_time_sampling(TimeSampling::Beta12);
    check(VeSde::default(), Activation::Silu, beta);
    check(SubVpSde::default(), Activation::Silu, beta);
    check(OuSde::default(), Activation::Tanh, Dsm::default());

    // A model whose own σ(t) (it divides by) is not the objective's.
    let vars = VarMap::new();
    let m = model(&vars, VpSde::default(), 2, Activation::Silu, DType::F64);
    let x0 = batch(2, 16, DType::F64);
    let sde = SubVpSde::default();
    compare(
        &sde,
        &m,
        &vars,
        beta,
        Some((1.0, exact_fpe())),
        &x0,
        F64_TOLERANCE,
    );
}

/// Dimensions 1 and 3: the second-derivative jets over every pair `j ≤ k`.
#[test]
fn fpe_gradients_match_autodiff_in_other_dimensions() {
    let sde = VpSde::default();
    for dim in [1, 3] {
        let vars = VarMap::new();
        let m = model(&vars, sde, dim, Activation::Silu, DType::F64);
        let fpe = exact_fpe().with_weighting(TimeWeighting::Constant).unwrap();
        compare_with_dsm(&sde, &m, &vars, (0.5, fpe), &batch(dim, 12, DType::F64));
    }
}

/// Batches larger than one thread's part (256 rows): the parts' sums add up.
#[test]
fn large_batches_split_across_threads_match_autodiff() {
    let sde = VpSde::default();
    let vars = VarMap::new();
    let m = model(&vars, sde, 2, Activation::Silu, DType::F64);
    let x0 = batch(2, 600, DType::F64);
    compare::<_, _, ScoreFpe>(&sde, &m, &vars, Dsm::default(), None, &x0, F64_TOLERANCE);
    compare_with_dsm(&sde, &m, &vars, (0.1, exact_fpe()), &x0);
}

/// A time window: the weights are zero outside it and rescaled inside.
#[test]
fn windowed_fpe_gradients_match_autodiff() {
    let sde = VpSde::default();
    let vars = VarMap::new();
    let m = model(&vars, sde, 2, Activation::Silu, DType::F64);
    let window = TimeWindow::new(exact_fpe(), 0.2, 0.7).unwrap();
    compare_with_dsm(&sde, &m, &vars, (1.0, window), &batch(2, 32, DType::F64));
}

/// f32, the benchmark's precision: the same to 1e-4 relative (f32 rounding, ~1e-7, times
/// the sums' condition).
#[test]
fn f32_gradients_match_autodiff() {
    let sde = VpSde::default();
    let vars = VarMap::new();
    let m = model(&vars, sde, 2, Activation::Silu, DType::F32);
    let x0 = batch(2, 64, DType::F32);
    compare::<_, _, ScoreFpe>(&sde, &m, &vars, Dsm::default(), None, &x0, 1e-4);
    let fpe = exact_fpe()
        .with_weighting(TimeWeighting::Constant)
        .and_then(|f| f.with_normalization(false))
        .unwrap();
    compare(&sde, &m, &vars, Dsm::default(), Some((1e-3, fpe)), &x0, 1e-4);
}

/// Penalties the pass does not take fall back to the graph.
#[test]
fn other_penalties_are_not_hand_written() {
    let sde = VpSde::default();
    let vars = VarMap::new();
    let m = model(&vars, sde, 2, Activation::Silu, DType::F64);
    let x0 = batch(2, 8, DType::F64);
    let draw = |o: &Objective<'_, VpSde, MlpScore<VpSde>>| {
        o.loss().draw(&sde, &x0, &mut StdRng::seed_from_u64(0)).unwrap()
    };
    for fpe in [
        ScoreFpe::new(),                              // Hutchinson, finite differences
        exact_fpe().with_power(1.0).unwrap(),         // not squared
        exact_fpe().with_scalar_weight(0.1).unwrap(), // the scalar term
    ] {
        let o = Objective::new(&sde, &m).with_penalty(1.0, fpe).unwrap();
        assert!(o
            .terms(&draw(&o), &mut StdRng::seed_from_u64(1))
            .unwrap()
            .is_none());
    }
    let two = Objective::new(&sde, &m)
        .with_penalty(1.0, exact_fpe())
        .unwrap()
        .with_penalty(1.0, exact_fpe())
        .unwrap();
    assert!(two
        .terms(&draw(&two), &mut StdRng::seed_from_u64(1))
        .unwrap()
        .is_none());
    // Softplus has no kernel: the model declines.
    let vars = VarMap::new();
    let soft = model(&vars, sde, 2, Activation::Softplus { beta: 10.0 }, DType::F64);
    let o = Objective::new(&sde, &soft);
    let b = o.loss().draw(&sde, &x0, &mut StdRng::seed_from_u64(0)).unwrap();
    assert!(soft
        .objective_gradients(&o.terms(&b, &mut StdRng::seed_from_u64(1)).unwrap().unwrap())
        .unwrap()
        .is_none());
}

/// Whole runs: a trainer on hand-written gradients and one on autodiff, same seed, stay
/// together (f64: the same to 1e-9 after 5 AdamW steps, whose updates are nearly
/// sign-like and so amplify nothing but exact ties).
#[test]
fn training_runs_agree_with_autodiff() {
    let sde = VpSde::default();
    let run = |hand_written: bool| {
        let vars = VarMap::new();
        let m = model(&vars, sde, 2, Activation::Silu, DType::F64);
        let objective = Objective::new(&sde, &m)
            .with_penalty(1e-2, exact_fpe())
            .unwrap()
            .with_hand_written_gradients(hand_written);
        let (losses, trainer) = train(&vars, &objective, 32, 5);
        (
            losses,
            sorted_weights(&vars),
            trainer.untrained_variables().map(<[String]>::to_vec),
        )
    };
    let (hand_losses, hand_weights, hand_untrained) = run(true);
    let (graph_losses, graph_weights, graph_untrained) = run(false);
    for (a, b) in hand_losses.iter().zip(&graph_losses) {
        assert!((a - b).abs() <= 1e-9 * b.abs(), "loss {a} vs {b}");
    }
    for ((name, a), (_, b)) in hand_weights.iter().zip(&graph_weights) {
        let e = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(e <= 1e-9, "{name}: weights differ by {e}");
    }
    assert_eq!(hand_untrained, graph_untrained);
    assert_eq!(hand_untrained.unwrap(), ["time.frequencies"]);
}

/// Each step says which way its gradients were computed.
#[test]
fn step_reports_say_which_path_ran() {
    let sde = VpSde::default();
    let vars = VarMap::new();
    let m = model(&vars, sde, 2, Activation::Silu, DType::F64);
    let paths = |objective: &Objective<'_, VpSde, MlpScore<VpSde>>| {
        let mut trainer = Trainer::new(
            &vars,
            TrainConfig {
                batch_size: 16,
                ..Default::default()
            },
        )
        .unwrap();
        let mut seen = Vec::new();
        trainer
            .fit(objective, &Checkerboard::default(), 2, |step| {
                seen.push(step.hand_written)
            })
            .unwrap();
        seen
    };
    let exact = Objective::new(&sde, &m).with_penalty(1e-2, exact_fpe()).unwrap();
    assert_eq!(paths(&exact), [true, true]);
    let paper = Objective::new(&sde, &m)
        .with_penalty(1e-2, ScoreFpe::new())
        .unwrap();
    assert_eq!(paths(&paper), [false, false]);
    assert_eq!(paths(&exact.with_hand_written_gradients(false)), [false, false]);
}

// ---------------------------------------------------------------------------------------
// Potentials: MlpPotential under GradientScore, DSM and the log-density FP penalty
// ---------------------------------------------------------------------------------------

fn potential(vars: &VarMap, dim: usize, activation: Activation) -> GradientScore<MlpPotential> {
    let config = PotentialConfig {
        dim,
        width: 12,
        depth: 2,
        activation,
        seed: 4,
    };
    let vb = VarBuilder::from_varmap(vars, DType::F64, &Device::Cpu);
    GradientScore::new(MlpPotential::new(vb, config).unwrap())
}

fn box_fp(points: usize, boundary: Option<Boundary>) -> LogDensityFp {
    LogDensityFp::new()
        .with_collocation(Collocation::UniformBox {
            low: -2.0,
            high: 2.0,
            points,
            eps: 1e-3,
        })
        .unwrap()
        .with_boundary(boundary)
}

#[test]
fn potential_dsm_gradients_match_autodiff() {
    let sde = OuSde::default();
    let x0 = batch(2, 20, DType::F64);
    for activation in [
        Activation::Softplus { beta: 100.0 },
        Activation::Silu,
        Activation::Tanh,
    ] {
        for weighting in [Weighting::Constant, Weighting::SigmaSquared] {
            let vars = VarMap::new();
            let m = potential(&vars, 2, activation);
            let loss = Dsm::default()
                .with_weighting(weighting)
                .with_time_sampling(TimeSampling::Beta12);
            compare::<_, _, LogDensityFp>(&sde, &m, &vars, loss, None, &x0, F64_TOLERANCE);
        }
    }
}

/// The residual at the perturbed points, in a box, with the boundary term; Softplus at
/// a moderate β (at β = 100 most units sit on a kink the size of 1/β and the residual's
/// gradient is dominated by a few; the comparison still holds, see below), SiLU, tanh;
/// OU and VP; dimensions 1, 2, 3.
#[test]
fn log_density_fp_gradients_match_autodiff() {
    let boundary = Some(Boundary::new(0.7, 5).unwrap());
    for activation in [
        Activation::Softplus { beta: 3.0 },
        Activation::Silu,
        Activation::Tanh,
    ] {
        for fp in [LogDensityFp::new(), box_fp(30, None), box_fp(30, boundary)] {
            let vars = VarMap::new();
            let m = potential(&vars, 2, activation);
            let p = compare(
                &OuSde::default(),
                &m,
                &vars,
                Dsm::default(),
                Some((0.5, fp)),
                &batch(2, 16, DType::F64),
                F64_TOLERANCE,
            );
            assert!(
                p.unwrap() > 1e-4,
                "the untrained potential violates the FP equation"
            );
        }
    }
    let vars = VarMap::new();
    let m = potential(&vars, 2, Activation::Softplus { beta: 100.0 });
    compare(
        &VpSde::default(),
        &m,
        &vars,
        Dsm::default(),
        Some((2.0, box_fp(40, boundary))),
        &batch(2, 16, DType::F64),
        F64_TOLERANCE,
    );
    for dim in [1, 3] {
        let vars = VarMap::new();
        let m = potential(&vars, dim, Activation::Silu);
        compare(
            &OuSde::default(),
            &m,
            &vars,
            Dsm::default(),
            Some((1.0, box_fp(20, boundary))),
            &batch(dim, 10, DType::F64),
            F64_TOLERANCE,
        );
    }
}

/// Collocation sets larger than one thread's part, and a time window over the penalty.
#[test]
fn log_density_fp_in_parts_and_windows_match_autodiff() {
    let sde = OuSde::default();
    let vars = VarMap::new();
    let m = potential(&vars, 2, Activation::Softplus { beta: 10.0 });
    let boundary = Some(Boundary::new(1.0, 150).unwrap()); // 600 boundary points
    compare_with_dsm(
        &sde,
        &m,
        &vars,
        (1.0, box_fp(700, boundary)),
        &batch(2, 300, DType::F64),
    );
    let window = TimeWindow::new(LogDensityFp::new(), 0.5, 4.0).unwrap();
    compare_with_dsm(&sde, &m, &vars, (1.0, window), &batch(2, 40, DType::F64));
}

/// Training a potential both ways: the same losses and weights after 4 steps, and the
/// trainer's generator in the same place (the penalty draws its points either way).
#[test]
fn potential_training_runs_agree_with_autodiff() {
    let sde = OuSde::default();
    let run = |hand_written: bool| {
        let vars = VarMap::new();
        let m = potential(&vars, 2, Activation::Softplus { beta: 20.0 });
        let objective = Objective::new(&sde, &m)
            .with_penalty(0.1, box_fp(64, Some(Boundary::new(1.0, 8).unwrap())))
            .unwrap()
            .with_hand_written_gradients(hand_written);
        (train(&vars, &objective, 48, 4).0, sorted_weights(&vars))
    };
    let (hand_losses, hand_weights) = run(true);
    let (graph_losses, graph_weights) = run(false);
    for (a, b) in hand_losses.iter().zip(&graph_losses) {
        assert!((a - b).abs() <= 1e-9 * b.abs(), "loss {a} vs {b}");
    }
    for ((name, a), (_, b)) in hand_weights.iter().zip(&graph_weights) {
        let e = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(e <= 1e-9, "{name}: weights differ by {e}");
    }
}

/// A model that declines leaves the trainer's generator where the graph path expects it:
/// the run equals the autodiff run exactly.
#[test]
fn declined_terms_leave_the_generator_in_place() {
    let sde = OuSde::default();
    let run = |hand_written: bool| {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F64, &Device::Cpu);
        // GELU has no kernel: the objective draws the box points for the terms, the model
        // declines, and the graph path must draw the same points again.
        let config = PotentialConfig {
            width: 8,
            depth: 1,
            activation: Activation::Gelu,
            ..Default::default()
        };
        let m = GradientScore::new(MlpPotential::new(vb, config).unwrap());
        let objective = Objective::new(&sde, &m)
            .with_penalty(0.1, box_fp(16, Some(Boundary::new(1.0, 4).unwrap())))
            .unwrap()
            .with_hand_written_gradients(hand_written);
        train(&vars, &objective, 16, 3).0
    };
    assert_eq!(run(true), run(false));
}

/// `steps` trainer steps on checkerboard batches: the losses, and the trainer.
fn train<S: Sde, M: ScoreModel>(
    vars: &VarMap,
    objective: &Objective<'_, S, M>,
    batch_size: usize,
    steps: usize,
) -> (Vec<f64>, Trainer) {
    let config = TrainConfig {
        batch_size,
        ..Default::default()
    };
    let mut trainer = Trainer::new(vars, config).unwrap();
    let report = trainer
        .fit(objective, &Checkerboard::default(), steps, |_| {})
        .unwrap();
    (report.losses, trainer)
}

fn sorted_weights(vars: &VarMap) -> Vec<(String, Vec<f64>)> {
    let mut weights: Vec<(String, Vec<f64>)> = vars
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1::<f64>().unwrap()))
        .collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    weights
}

/// Sampling's score of a potential (`GradientScore::values_only`, the kernels' forward
/// mode) on a batch split into parts, f32 and f64, against autodiff.
#[test]
fn potential_sampling_score_matches_autodiff_in_parts() {
    for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let vars = VarMap::new();
        let config = PotentialConfig::default(); // 3×80, Softplus β = 100
        let make = || MlpPotential::new(VarBuilder::from_varmap(&vars, dtype, &Device::Cpu), config).unwrap();
        let x = batch(2, 600, dtype);
        let t = (batch(1, 600, dtype).abs().unwrap().squeeze(1).unwrap() + 0.01).unwrap();
        let fast = GradientScore::values_only(make()).score(&x, &t).unwrap();
        let exact = GradientScore::new(make()).score(&x, &t).unwrap();
        let e = relative_difference(&fast, &exact);
        assert!(e <= tolerance, "{dtype:?}: relative error {e}");
    }
}
