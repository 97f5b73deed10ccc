//! Training: what to minimize ([`Objective`]) kept apart from how ([`Trainer`]).
//!
//! * An [`Objective`] is the problem: an SDE, a model, the [`Dsm`] loss and any number of
//!   weighted [`Regularizer`] penalties, evaluated at the DSM batch's perturbed points:
//!   `DSM + Σ λᵢ·penaltyᵢ(x_t, t)`. It can be used on its own in a hand-written loop.
//! * A [`Trainer`] is the solver: AdamW with learning-rate warmup, global-norm gradient
//!   clipping, an exponential moving average (EMA) of the weights for sampling, seeded
//!   randomness, progress reports and safetensors checkpoints.
//!
//! The trainer works on the variables of a `candle_nn::VarMap` you own: build your model
//! from a `VarBuilder` on that map, then hand the map to [`Trainer::new`].
//!
//! Gradients come from candle's autodiff, unless the model computes the objective's
//! gradient itself ([`ScoreModel::objective_gradients`] on the objective's
//! [`ObjectiveTerms`]): the reference networks `MlpScore` and `MlpPotential` do, 3–15×
//! faster per step, agreeing with autodiff to rounding.
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use scoresde::data::EightGaussians;
//! use scoresde::score::{MlpConfig, MlpScore};
//! use scoresde::sde::VpSde;
//! use scoresde::train::{Objective, TrainConfig, Trainer};
//!
//! let sde = VpSde::default();
//! let vars = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
//! let model = MlpScore::new(vb, sde, MlpConfig { width: 32, ..Default::default() })?;
//!
//! let mut trainer = Trainer::new(&vars, TrainConfig { batch_size: 64, ..Default::default() })?;
//! let report = trainer.fit(&Objective::new(&sde, &model), &EightGaussians, 20, |_step| {})?;
//! assert_eq!(report.losses.len(), 20);
//! assert_eq!(trainer.step_count(), 20);
//!
//! // Sample with the averaged weights: a second model on the EMA variables.
//! let ema_vb = VarBuilder::from_varmap(trainer.ema(), DType::F32, &Device::Cpu);
//! let ema_model = MlpScore::new(ema_vb, sde, MlpConfig { width: 32, ..Default::default() })?;
//! # let _ = ema_model;
//! # Ok::<(), scoresde::Error>(())
//! ```
//!
//! ## Reproducibility
//!
//! Each step `k` draws all its randomness (the data batch, times, noise, regularizer
//! probes) from its own generator [`step_rng`]`(seed, k)`, so the same seed gives the same
//! run bit for bit, and a run resumed from a checkpoint at step `k` continues exactly as
//! the uninterrupted one would (the checkpoint holds the weights, the EMA weights, the
//! optimizer's moments and the step count).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::data::Dataset;
use crate::error::{ensure, ensure_positive};
use crate::loss::{Dsm, DsmBatch};
use crate::regularizer::{PenaltyTerms, Regularizer};
use crate::sde::Sde;
use crate::{Error, Result, ScoreModel};

/// One weighted penalty of an [`Objective`].
struct Penalty<'a, S, M> {
    weight: f64,
    // Send + Sync so that an objective can be shared with (or moved to) other threads.
    regularizer: Box<dyn Regularizer<S, M> + Send + Sync + 'a>,
}

/// The training problem: `DSM + Σ λᵢ·penaltyᵢ` for a model under an SDE.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::loss::{Dsm, Weighting};
/// use scoresde::regularizer::ScoreFpe;
/// use scoresde::sde::VpSde;
/// use scoresde::train::Objective;
///
/// let sde = VpSde::default();
/// let model = |x: &Tensor, _t: &Tensor| Ok(x.neg()?); // the score of N(0, I)
/// let objective = Objective::new(&sde, &model)
///     .with_loss(Dsm::default().with_weighting(Weighting::Likelihood))
///     .with_penalty(1e-3, ScoreFpe::new())?;
/// let x0 = Tensor::new(&[[0.5f64, -0.5], [1.0, 0.0]], &Device::Cpu)?;
/// let value = objective.evaluate(&x0, &mut StdRng::seed_from_u64(0))?;
/// assert_eq!(value.penalties.len(), 1);
/// assert!(value.total.to_scalar::<f64>()?.is_finite());
/// # Ok::<(), scoresde::Error>(())
/// ```
pub struct Objective<'a, S, M> {
    sde: &'a S,
    model: &'a M,
    loss: Dsm,
    penalties: Vec<Penalty<'a, S, M>>,
    hand_written: bool,
}

/// An [`Objective`] evaluated on one batch.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// `DSM + Σ λᵢ·penaltyᵢ`, a scalar tensor differentiable in the model's parameters.
    pub total: Tensor,
    /// The DSM term.
    pub dsm: Tensor,
    /// Each penalty, unweighted, in the order they were added.
    pub penalties: Vec<Tensor>,
    /// The perturbed batch the terms were evaluated on.
    pub batch: DsmBatch,
}

impl<'a, S: Sde, M: ScoreModel> Objective<'a, S, M> {
    /// Plain denoising score matching with the default [`Dsm`] loss.
    pub fn new(sde: &'a S, model: &'a M) -> Self {
        Self {
            sde,
            model,
            loss: Dsm::default(),
            penalties: Vec::new(),
            hand_written: true,
        }
    }

    /// Whether the trainer may take the model's hand-written gradients
    /// ([`ScoreModel::objective_gradients`]) when it has them (default: yes). Both ways give
    /// the same gradients up to rounding; turning it off forces candle's autodiff, to
    /// compare or to debug.
    ///
    /// ```
    /// use candle_core::Tensor;
    /// use scoresde::{sde::VpSde, train::Objective};
    /// let (sde, model) = (VpSde::default(), |x: &Tensor, _t: &Tensor| Ok(x.neg()?));
    /// let objective = Objective::new(&sde, &model).with_hand_written_gradients(false);
    /// assert!(!objective.hand_written_gradients());
    /// ```
    pub fn with_hand_written_gradients(mut self, allowed: bool) -> Self {
        self.hand_written = allowed;
        self
    }

    /// Whether hand-written gradients may be used (see
    /// [`Objective::with_hand_written_gradients`]).
    pub fn hand_written_gradients(&self) -> bool {
        self.hand_written
    }

    /// With the DSM loss `loss` (weighting, time sampling, reduction, `ε`).
    pub fn with_loss(mut self, loss: Dsm) -> Self {
        self.loss = loss;
        self
    }

    /// Adds `weight · regularizer.penalty(x_t, t)` at the DSM batch's perturbed points.
    /// Errors unless `weight` is finite and `≥ 0`. The regularizer must be `Send + Sync`
    /// (all of this crate's are), so that the objective is too when the SDE and model are.
    pub fn with_penalty(
        mut self,
        weight: f64,
        regularizer: impl Regularizer<S, M> + Send + Sync + 'a,
    ) -> Result<Self> {
        ensure(weight.is_finite() && weight >= 0.0, || {
            format!("a penalty weight must be finite and >= 0, got {weight}")
        })?;
        self.penalties.push(Penalty {
            weight,
            regularizer: Box::new(regularizer),
        });
        Ok(self)
    }

    /// The SDE.
    pub fn sde(&self) -> &S {
        self.sde
    }

    /// The model.
    pub fn model(&self) -> &M {
        self.model
    }

    /// The DSM loss.
    pub fn loss(&self) -> &Dsm {
        &self.loss
    }

    /// Perturbs the clean batch `x0` and evaluates every term on it. Randomness (times,
    /// noise, then each penalty's) comes from `rng`, in that order.
    pub fn evaluate(&self, x0: &Tensor, rng: &mut dyn RngCore) -> Result<Evaluation> {
        let batch = self.loss.draw(self.sde, x0, rng)?;
        self.evaluate_drawn(batch, rng)
    }

    /// Every term on a batch you supply: build a [`DsmBatch`] from your own `x₀`, times
    /// and noise (`x_t` from [`Sde::perturb`](crate::sde::Sde::perturb)), or reuse the
    /// batch of an earlier [`Evaluation`]. `rng` serves the penalties' own draws. Each term
    /// of the result is differentiable: [`gradients`] gives the gradient of any one of
    /// them, a penalty alone included.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use scoresde::loss::DsmBatch;
    /// use scoresde::prelude::*;
    /// use scoresde::regularizer::ScoreFpe;
    /// use scoresde::train::gradients;
    ///
    /// let vars = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vars, DType::F64, &Device::Cpu);
    /// let sde = VpSde::default();
    /// let config = MlpConfig { width: 16, depth: 1, ..Default::default() };
    /// let model = MlpScore::new(vb, sde, config)?;
    /// let objective = Objective::new(&sde, &model).with_penalty(0.1, ScoreFpe::new())?;
    ///
    /// let x0 = Tensor::new(&[[0.5f64, -0.5], [1.0, 0.0]], &Device::Cpu)?;
    /// let t = Tensor::new(&[0.3f64, 0.7], &Device::Cpu)?;
    /// let noise = Tensor::new(&[[0.1f64, 0.2], [-0.3, 0.4]], &Device::Cpu)?;
    /// let x_t = sde.perturb(&x0, &t, &noise)?;
    /// let batch = DsmBatch { x0, x_t, t, noise };
    /// let value = objective.evaluate_batch(batch, &mut StdRng::seed_from_u64(0))?;
    /// // The gradient of the penalty alone, by variable name.
    /// let g = gradients(&value.penalties[0], &vars)?;
    /// assert!(g.contains_key("hidden.0.weight"));
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    ///
    /// The batch enters here and is checked once: `x0`, `x_t` and `noise` of one shape
    /// `[B, …]` with `B > 0` and finite values, `t` of shape `[B]` in `[0, T]`.
    pub fn evaluate_batch(&self, batch: DsmBatch, rng: &mut dyn RngCore) -> Result<Evaluation> {
        crate::solver::check_start(&batch.x_t)?;
        for (tensor, name) in [(&batch.x0, "x0"), (&batch.noise, "noise")] {
            crate::sde::check_same_shape(&batch.x_t, tensor, "x_t", name)?;
            if !tensor
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?
                .is_finite()
            {
                return Err(Error::NonFinite(format!(
                    "the batch's {name} contains NaN or infinity"
                )));
            }
        }
        crate::sde::per_sample(&batch.t, &batch.x_t)?;
        self.sde.check_times(&batch.t)?;
        self.evaluate_drawn(batch, rng)
    }

    /// Every term on a batch drawn by the loss (so already in range).
    fn evaluate_drawn(&self, batch: DsmBatch, rng: &mut dyn RngCore) -> Result<Evaluation> {
        let dsm = self.loss.loss(self.sde, self.model, &batch)?;
        let mut total = dsm.clone();
        let mut penalties = Vec::with_capacity(self.penalties.len());
        for p in &self.penalties {
            let value = p
                .regularizer
                .penalty(self.sde, self.model, &batch.x_t, &batch.t, rng)?;
            if value.elem_count() != 1 {
                return Err(Error::Shape(format!(
                    "a penalty must be a scalar, got shape {:?}",
                    value.dims()
                )));
            }
            let value = value.reshape(())?.to_dtype(dsm.dtype())?;
            total = (total + (&value * p.weight)?)?;
            penalties.push(value);
        }
        Ok(Evaluation {
            total,
            dsm,
            penalties,
            batch,
        })
    }

    /// The objective on `batch` as per-sample coefficients, for
    /// [`ScoreModel::objective_gradients`]: `None` unless it has that form (at most one
    /// penalty, and that one with [`Regularizer::penalty_terms`]). Draws from `rng` what
    /// the penalty would (collocation points).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use scoresde::autodiff::Divergence;
    /// use scoresde::regularizer::{PenaltyTerms, ScoreFpe, TimeDerivative};
    /// use scoresde::{sde::VpSde, train::Objective};
    /// let sde = VpSde::default();
    /// let model = |x: &Tensor, _t: &Tensor| Ok(x.neg()?);
    /// let fpe = ScoreFpe::new().with_divergence(Divergence::Exact)?.with_time_derivative(TimeDerivative::Autodiff)?;
    /// let objective = Objective::new(&sde, &model).with_penalty(1e-3, fpe)?;
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let x0 = Tensor::new(&[[0.5f64, -0.5], [1.0, 0.0]], &Device::Cpu)?;
    /// let batch = objective.loss().draw(&sde, &x0, &mut rng)?;
    /// let terms = objective.terms(&batch, &mut rng)?.expect("DSM plus a squared score-FPE penalty");
    /// assert_eq!(terms.penalty_weight, 1e-3);
    /// assert!(matches!(terms.penalty, Some(PenaltyTerms::ScoreFpe(_))));
    /// // The paper's default (Hutchinson probes, finite differences in t) is graph-only.
    /// let paper = Objective::new(&sde, &model).with_penalty(1e-3, ScoreFpe::new())?;
    /// assert!(paper.terms(&batch, &mut rng)?.is_none());
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn terms<'b>(
        &self,
        batch: &'b DsmBatch,
        rng: &mut dyn RngCore,
    ) -> Result<Option<ObjectiveTerms<'b>>> {
        let (penalty_weight, penalty) = match self.penalties.as_slice() {
            [] => (0.0, None),
            [p] => match p.regularizer.penalty_terms(self.sde, &batch.x_t, &batch.t, rng)? {
                Some(terms) => (p.weight, Some(terms)),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        let (dsm_sigma, dsm_weight) = self.loss.coefficients(self.sde, &batch.t)?;
        Ok(Some(ObjectiveTerms {
            batch,
            dsm_sigma,
            dsm_weight,
            penalty_weight,
            penalty,
        }))
    }

    /// The objective on a fresh batch from `x0` and its gradient: the model's hand-written
    /// one when it has it, otherwise candle's autodiff.
    fn gradients(&self, x0: &Tensor, rng: &mut StdRng) -> Result<(StepValues, StepGradients)> {
        let batch = self.loss.draw(self.sde, x0, rng)?;
        if self.hand_written {
            // If the model declines, the graph path must draw what the penalty draws from
            // where the terms started drawing.
            let snapshot = rng.clone();
            if let Some(terms) = self.terms(&batch, rng)? {
                if let Some(out) = self.model.objective_gradients(&terms)? {
                    let loss = out.dsm + out.penalty.map_or(0.0, |p| p * terms.penalty_weight);
                    let values = StepValues {
                        loss,
                        dsm: out.dsm,
                        penalties: out.penalty.into_iter().collect(),
                    };
                    let grads = out.gradients.into_iter().map(|(v, g)| (v.id(), g)).collect();
                    return Ok((values, StepGradients::HandWritten(grads)));
                }
            }
            *rng = snapshot;
        }
        let value = self.evaluate_drawn(batch, rng)?;
        let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        let values = StepValues {
            loss: scalar(&value.total)?,
            dsm: scalar(&value.dsm)?,
            penalties: value.penalties.iter().map(scalar).collect::<Result<_>>()?,
        };
        if !values.loss.is_finite() {
            // No backward pass through a graph that is already NaN: the trainer stops.
            return Ok((values, StepGradients::NotComputed));
        }
        Ok((values, StepGradients::Graph(value.total.backward()?)))
    }
}

/// The scalar terms of one step.
struct StepValues {
    loss: f64,
    dsm: f64,
    penalties: Vec<f64>,
}

/// A step's gradients, keyed by variable.
enum StepGradients {
    Graph(candle_core::backprop::GradStore),
    HandWritten(HashMap<candle_core::TensorId, Tensor>),
    NotComputed,
}

impl StepGradients {
    fn get(&self, var: &Tensor) -> Option<&Tensor> {
        match self {
            Self::Graph(store) => store.get(var),
            Self::HandWritten(map) => map.get(&var.id()),
            Self::NotComputed => None,
        }
    }
}

/// An [`Objective`] on one perturbed batch as per-sample coefficients: what a model with
/// a hand-written training pass ([`ScoreModel::objective_gradients`]) computes.
///
/// With `s_b = s(x_b, t_b)` and the batch's noise `z_b`, the objective is
///
/// ```text
/// Σ_b dsm_weight_b ‖dsm_sigma_b·s_b + z_b‖²  +  λ·penalty
/// ```
///
/// with the penalty, if any, given by [`PenaltyTerms`].
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::score::{MlpConfig, MlpScore};
/// use scoresde::{sde::VpSde, train::Objective, ScoreModel};
///
/// let sde = VpSde::default();
/// let vars = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vars, DType::F64, &Device::Cpu);
/// let model = MlpScore::new(vb, sde, MlpConfig { width: 16, ..Default::default() })?;
/// let objective = Objective::new(&sde, &model);
/// let x0 = Tensor::new(&[[0.5f64, -0.5], [1.0, 0.0], [0.0, 2.0]], &Device::Cpu)?;
/// let mut rng = StdRng::seed_from_u64(0);
/// let batch = objective.loss().draw(&sde, &x0, &mut rng)?;
/// let terms = objective.terms(&batch, &mut rng)?.expect("plain DSM has this form");
///
/// let out = model.objective_gradients(&terms)?.expect("MlpScore has a hand-written pass");
/// let dsm = objective.loss().loss(&sde, &model, &batch)?.to_scalar::<f64>()?;
/// assert!((out.dsm - dsm).abs() < 1e-12 * dsm);
/// assert_eq!(out.gradients.len(), 8); // 4 weights, 4 biases (not the fixed frequencies)
///
/// // A closure has no such pass: the trainer builds the graph.
/// let closure = |x: &Tensor, _t: &Tensor| Ok(x.neg()?);
/// assert!(closure.objective_gradients(&terms)?.is_none());
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ObjectiveTerms<'a> {
    /// The perturbed batch: `x_t`, `t`, and the noise `z`.
    pub batch: &'a DsmBatch,
    /// The DSM loss's `σ(t)`, shape `[B]`.
    pub dsm_sigma: Tensor,
    /// The DSM loss's per-sample weight (its time weighting and batch reduction), `[B]`.
    pub dsm_weight: Tensor,
    /// The penalty's weight `λ` in the objective (0 without one).
    pub penalty_weight: f64,
    /// The penalty, if the objective has one.
    pub penalty: Option<PenaltyTerms>,
}

/// What [`ScoreModel::objective_gradients`] returns.
#[derive(Debug, Clone)]
pub struct ObjectiveGradients {
    /// The DSM term.
    pub dsm: f64,
    /// The unweighted penalty, when the terms have one.
    pub penalty: Option<f64>,
    /// `(variable, gradient of DSM + λ·penalty)` for every variable the objective depends
    /// on: the variable as its tensor (`Var::as_tensor`), so that it is found by id.
    pub gradients: Vec<(Tensor, Tensor)>,
}

/// How the learning rate falls after the warmup. A falling rate lets the last iterate
/// settle: with a constant rate it keeps fluctuating at a level set by the rate and the
/// gradient noise, which small batches make large (as do DSM's heavy-tailed small-time
/// terms).
///
/// ```
/// use scoresde::train::LrDecay;
/// assert_eq!(LrDecay::default(), LrDecay::Constant);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub enum LrDecay {
    /// The peak rate throughout.
    #[default]
    Constant,
    /// Half a cosine from the peak down to `floor`·peak over `steps` steps after the
    /// warmup, then `floor`·peak (SGDR's schedule without restarts).
    Cosine {
        /// Steps from the peak to the floor.
        steps: usize,
        /// The final rate as a fraction of the peak, in `[0, 1]`.
        floor: f64,
    },
    /// The peak rate times `gamma^k` from the `k`-th milestone on (PyTorch's
    /// `MultiStepLR`). Deveney et al.'s released networks were trained at 1e-3 for 25,000
    /// steps, 1e-4 for 65,000 and 1e-5 for 10,000: milestones `[25_000, 90_000]`, `gamma`
    /// 0.1, `restart_adam: true` (their `OUPINN_loop.py` makes a new Adam for each rate).
    MultiStep {
        /// Steps at which the rate drops, increasing.
        milestones: Vec<usize>,
        /// The factor of each drop, in `(0, 1]`.
        gamma: f64,
        /// Restart AdamW at each milestone, as a new optimizer would: its moments are
        /// zeroed and its bias correction counts steps from the milestone, so the first
        /// step after a drop moves every weight by about the new rate.
        restart_adam: bool,
    },
}

/// The trainer's settings. Defaults are the peers' benchmark workload (AdamW with
/// candle-nn's and PyTorch's defaults, learning rate 1e-3, batch 512, no warmup, no
/// clipping) plus an EMA of rate 0.999 for sampling.
///
/// ```
/// use scoresde::train::TrainConfig;
/// let config = TrainConfig { warmup_steps: 100, grad_clip: Some(1.0), ..Default::default() };
/// assert_eq!(config.batch_size, 512);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Samples drawn from the dataset per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Linear warmup: the learning rate is `lr·min(1, (k + 1)/warmup_steps)` at step `k`.
    pub warmup_steps: usize,
    /// How the learning rate falls after the warmup (constant by default).
    pub decay: LrDecay,
    /// Decoupled weight decay `λ` of AdamW (`θ ← θ(1 − lr·λ) − …`).
    pub weight_decay: f64,
    /// AdamW's `(β₁, β₂)`.
    pub betas: (f64, f64),
    /// AdamW's `ε`.
    pub adam_eps: f64,
    /// Rescales the gradients so that their global L2 norm is at most this (PyTorch's
    /// `clip_grad_norm_`); `None` for no clipping.
    pub grad_clip: Option<f64>,
    /// EMA rate `d`: after step `k` the EMA weights become `e ← d_k e + (1 − d_k) θ` with
    /// `d_k = min(d, (1 + k)/(10 + k))`, so early averages are not dominated by the
    /// initialization. `0` makes the EMA weights a copy of the model's.
    pub ema_decay: f64,
    /// Seed of every random draw (see the [module docs](self)).
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 512,
            learning_rate: 1e-3,
            warmup_steps: 0,
            decay: LrDecay::Constant,
            weight_decay: 0.01,
            betas: (0.9, 0.999),
            adam_eps: 1e-8,
            grad_clip: None,
            ema_decay: 0.999,
            seed: 0,
        }
    }
}

impl TrainConfig {
    fn validate(&self) -> Result<()> {
        ensure(self.batch_size > 0, || "batch_size must be > 0".into())?;
        ensure_positive("learning_rate", self.learning_rate)?;
        ensure_positive("adam_eps", self.adam_eps)?;
        ensure(self.weight_decay.is_finite() && self.weight_decay >= 0.0, || {
            format!("weight_decay must be finite and >= 0, got {}", self.weight_decay)
        })?;
        let (b1, b2) = self.betas;
        ensure((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2), || {
            format!("betas must lie in [0, 1), got ({b1}, {b2})")
        })?;
        if let Some(c) = self.grad_clip {
            ensure_positive("grad_clip", c)?;
        }
        match &self.decay {
            LrDecay::Constant => {}
            &LrDecay::Cosine { steps, floor } => ensure(steps > 0 && (0.0..=1.0).contains(&floor), || {
                format!("a cosine decay needs steps > 0 and a floor in [0, 1], got {steps} and {floor}")
            })?,
            LrDecay::MultiStep {
                milestones, gamma, ..
            } => {
                ensure(milestones.windows(2).all(|w| w[0] < w[1]), || {
                    format!("milestones must increase, got {milestones:?}")
                })?;
                ensure(*gamma > 0.0 && *gamma <= 1.0, || {
                    format!("gamma must lie in (0, 1], got {gamma}")
                })?;
            }
        }
        ensure((0.0..1.0).contains(&self.ema_decay), || {
            format!("ema_decay must lie in [0, 1), got {}", self.ema_decay)
        })
    }

    /// Every setting as `(field, value)`, values in `Debug` form (exact for floats): what
    /// a checkpoint records.
    fn fields(&self) -> Vec<(&'static str, String)> {
        let Self {
            batch_size,
            learning_rate,
            warmup_steps,
            decay,
            weight_decay,
            betas,
            adam_eps,
            grad_clip,
            ema_decay,
            seed,
        } = self; // destructured, so a new field cannot be forgotten here
        vec![
            ("batch_size", format!("{batch_size:?}")),
            ("learning_rate", format!("{learning_rate:?}")),
            ("warmup_steps", format!("{warmup_steps:?}")),
            ("decay", format!("{decay:?}")),
            ("weight_decay", format!("{weight_decay:?}")),
            ("betas", format!("{betas:?}")),
            ("adam_eps", format!("{adam_eps:?}")),
            ("grad_clip", format!("{grad_clip:?}")),
            ("ema_decay", format!("{ema_decay:?}")),
            ("seed", format!("{seed:?}")),
        ]
    }

    /// AdamW's step count (1-based) at training step `step`: counted from the last
    /// milestone passed when the decay restarts the optimizer, else from the start.
    fn adam_step(&self, step: usize) -> usize {
        let start = match &self.decay {
            LrDecay::MultiStep {
                milestones,
                restart_adam: true,
                ..
            } => milestones.iter().rev().copied().find(|&m| m <= step).unwrap_or(0),
            _ => 0,
        };
        step - start + 1
    }

    /// The learning rate at step `k` (warmup and decay included).
    ///
    /// ```
    /// use scoresde::train::{LrDecay, TrainConfig};
    /// let c = TrainConfig { learning_rate: 1e-3, warmup_steps: 10, ..Default::default() };
    /// assert!((c.learning_rate_at(4) - 5e-4).abs() < 1e-15);
    /// assert_eq!(c.learning_rate_at(100), 1e-3);
    /// let cosine = TrainConfig { decay: LrDecay::Cosine { steps: 100, floor: 0.1 }, ..c.clone() };
    /// assert!((cosine.learning_rate_at(60) - 5.5e-4).abs() < 1e-15); // halfway down
    /// assert!((cosine.learning_rate_at(110) - 1e-4).abs() < 1e-15); // the floor from here on
    /// let deveney = TrainConfig {
    ///     decay: LrDecay::MultiStep { milestones: vec![25_000, 90_000], gamma: 0.1, restart_adam: true },
    ///     ..Default::default()
    /// };
    /// let rates = [24_999, 25_000, 89_999, 90_000].map(|k| deveney.learning_rate_at(k));
    /// assert!((rates[0] - 1e-3).abs() < 1e-15 && (rates[1] - 1e-4).abs() < 1e-15);
    /// assert!((rates[2] - 1e-4).abs() < 1e-15 && (rates[3] - 1e-5).abs() < 1e-15);
    /// ```
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        let warmup = if self.warmup_steps == 0 {
            1.0
        } else {
            ((step + 1) as f64 / self.warmup_steps as f64).min(1.0)
        };
        let decay = match &self.decay {
            LrDecay::Constant => 1.0,
            LrDecay::MultiStep {
                milestones, gamma, ..
            } => gamma.powi(milestones.iter().filter(|&&m| step >= m).count() as i32),
            &LrDecay::Cosine { steps, floor } => {
                // From the end of the warmup; the step count `k` of `steps` is capped there.
                let k = step.saturating_sub(self.warmup_steps).min(steps) as f64;
                floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * k / steps as f64).cos())
            }
        };
        self.learning_rate * warmup * decay
    }
}

/// What one training step did, passed to the progress callback.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// The step's index (0-based, counted over the trainer's whole life, resumes included).
    pub step: usize,
    /// The total loss `DSM + Σ λᵢ·penaltyᵢ`.
    pub loss: f64,
    /// The DSM term.
    pub dsm: f64,
    /// Each penalty, unweighted.
    pub penalties: Vec<f64>,
    /// The global L2 norm of the gradient, before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub learning_rate: f64,
    /// Whether the model's hand-written pass computed the gradients
    /// ([`ScoreModel::objective_gradients`]); `false`: candle's autodiff graph, because
    /// the model has no such pass or the objective is not of a form it takes.
    pub hand_written: bool,
}

/// What [`Trainer::fit`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// The total loss at each step of this call.
    pub losses: Vec<f64>,
    /// The DSM term at each step of this call.
    pub dsm: Vec<f64>,
    /// The trainer's step count when the call ended.
    pub end_step: usize,
}

/// One trained variable and its optimizer state.
struct Parameter {
    name: String,
    var: Var,
    ema: Var,
    first_moment: Tensor,
    second_moment: Tensor,
}

/// The training loop: AdamW, warmup, clipping, EMA, seeding, checkpoints.
///
/// See the [module docs](self) for an example. The optimizer is AdamW with exactly
/// candle-nn's update (`candle_nn::AdamW`, checked bit for bit in the tests); it is
/// implemented here so that its moments can be checkpointed and resumed.
///
/// Variables that receive no gradient (such as [`FourierFeatures`]'s fixed frequencies)
/// are left alone, as candle's optimizers do; unlike them, the trainer says which ones:
/// [`Trainer::untrained_variables`].
///
/// [`FourierFeatures`]: crate::score::FourierFeatures
pub struct Trainer {
    config: TrainConfig,
    params: Vec<Parameter>,
    ema: VarMap,
    step: usize,
    untrained: Option<Vec<String>>,
    /// The last step's gradients (before clipping), by variable name.
    last_gradients: Vec<(String, Tensor)>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field(
                "variables",
                &self.params.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .field("step", &self.step)
            .finish()
    }
}

/// The random generator of training step `step` under `seed`: every random draw of that
/// step (data, times, noise, penalties) comes from it.
///
/// ```
/// use rand::Rng;
/// use scoresde::train::step_rng;
/// let a: u64 = step_rng(7, 3).random();
/// assert_eq!(a, step_rng(7, 3).random::<u64>());
/// assert_ne!(a, step_rng(7, 4).random::<u64>());
/// ```
pub fn step_rng(seed: u64, step: usize) -> StdRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(step as u64).to_le_bytes());
    key[16..24].copy_from_slice(b"scoresde");
    StdRng::from_seed(key)
}

fn lock_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::InvalidParameter("the VarMap's lock is poisoned".into()))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    // HashMap order varies between runs; a fixed order keeps the gradient norm's sum exact.
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

impl Trainer {
    /// A trainer for every variable of `varmap` (build the model first). The EMA starts as
    /// a copy of the current weights.
    ///
    /// Errors on invalid settings, an empty map, or variables of different dtypes or
    /// devices (or not floating point).
    pub fn new(varmap: &VarMap, config: TrainConfig) -> Result<Self> {
        config.validate()?;
        let vars = lock_vars(varmap)?;
        let Some((_, first)) = vars.first() else {
            return Err(Error::InvalidParameter(
                "the VarMap has no variables: build the model from it before creating the trainer".into(),
            ));
        };
        let (dtype, device) = (first.dtype(), first.device().clone());
        let ema = VarMap::new();
        let mut params = Vec::with_capacity(vars.len());
        {
            let mut ema_data = ema
                .data()
                .lock()
                .map_err(|_| Error::InvalidParameter("the EMA VarMap's lock is poisoned".into()))?;
            for (name, var) in vars {
                if var.dtype() != dtype || !var.device().same_device(&device) || !dtype.is_float() {
                    return Err(Error::InvalidParameter(format!(
                        "all variables must share one floating-point dtype and device; {name} is {:?} on {:?}, others {dtype:?} on {device:?}",
                        var.dtype(),
                        var.device()
                    )));
                }
                let ema_var = Var::from_tensor(&var.as_tensor().copy()?)?;
                ema_data.insert(name.clone(), ema_var.clone());
                params.push(Parameter {
                    first_moment: var.as_tensor().zeros_like()?,
                    second_moment: var.as_tensor().zeros_like()?,
                    name,
                    var,
                    ema: ema_var,
                });
            }
        }
        Ok(Self {
            config,
            params,
            ema,
            step: 0,
            untrained: None,
            last_gradients: Vec::new(),
            dtype,
            device,
        })
    }

    /// The settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Steps taken so far (restored by [`Trainer::load_checkpoint`]).
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The EMA weights, under the same names as the model's: build a model from
    /// `VarBuilder::from_varmap(trainer.ema(), …)` to sample with them. The variables are
    /// updated in place, so such a model always sees the current average.
    pub fn ema(&self) -> &VarMap {
        &self.ema
    }

    /// The names of the variables that received no gradient in the first step of this
    /// trainer (and are therefore never updated), or `None` before the first step.
    pub fn untrained_variables(&self) -> Option<&[String]> {
        self.untrained.as_deref()
    }

    /// The gradients of the last step, before clipping, by variable name (sorted; the
    /// variables that got none are absent): what the optimizer was given. Empty before
    /// the first step. Their global norm is the step's
    /// [`grad_norm`](StepReport::grad_norm).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use scoresde::prelude::*;
    /// let vars = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    /// let sde = VpSde::default();
    /// let model = MlpScore::new(vb, sde, MlpConfig { width: 16, depth: 1, ..Default::default() })?;
    /// let mut trainer = Trainer::new(&vars, TrainConfig { batch_size: 32, ..Default::default() })?;
    /// let report = trainer.step(&Objective::new(&sde, &model), &Checkerboard::default())?;
    /// let mut squares = 0.0;
    /// for (_name, g) in trainer.last_gradients() {
    ///     squares += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    /// }
    /// assert!((squares.sqrt() - report.grad_norm).abs() < 1e-4 * report.grad_norm);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn last_gradients(&self) -> &[(String, Tensor)] {
        &self.last_gradients
    }

    /// Runs `steps` training steps on batches from `data`, calling `progress` after each.
    ///
    /// Errors: [`Error::NonFiniteLoss`] naming the step when the loss becomes NaN or
    /// infinite (the weights are left as they were before that step);
    /// [`Error::NonFinite`] for non-finite data or gradients; [`Error::Shape`] for an
    /// empty batch or a batch whose shape does not fit the model;
    /// [`Error::InvalidParameter`] when no variable of the trainer received a gradient (the
    /// model was built on another `VarMap`).
    pub fn fit<S, M, D>(
        &mut self,
        objective: &Objective<'_, S, M>,
        data: &D,
        steps: usize,
        mut progress: impl FnMut(&StepReport),
    ) -> Result<FitReport>
    where
        S: Sde,
        M: ScoreModel,
        D: Dataset + ?Sized,
    {
        let mut losses = Vec::with_capacity(steps);
        let mut dsm = Vec::with_capacity(steps);
        for _ in 0..steps {
            let report = self.step(objective, data)?;
            losses.push(report.loss);
            dsm.push(report.dsm);
            progress(&report);
        }
        Ok(FitReport {
            losses,
            dsm,
            end_step: self.step,
        })
    }

    /// One training step (see [`Trainer::fit`]).
    pub fn step<S, M, D>(&mut self, objective: &Objective<'_, S, M>, data: &D) -> Result<StepReport>
    where
        S: Sde,
        M: ScoreModel,
        D: Dataset + ?Sized,
    {
        let step = self.step;
        let at_step = |e: Error| match e {
            Error::NonFinite(msg) => Error::NonFinite(format!("{msg} (training step {step})")),
            Error::Shape(msg) => Error::Shape(format!("{msg} (training step {step})")),
            other => other,
        };
        let mut rng = step_rng(self.config.seed, step);
        let x0 = data.sample(self.config.batch_size, &mut rng)?;
        if x0.rank() == 0 || x0.dim(0)? == 0 {
            return Err(Error::Shape(format!(
                "the dataset returned an empty batch of shape {:?} (training step {step})",
                x0.dims()
            )));
        }
        let x0 = x0.to_device(&self.device)?.to_dtype(self.dtype)?;
        let (values, grads) = objective.gradients(&x0, &mut rng).map_err(at_step)?;
        let StepValues { loss, dsm, penalties } = values;
        let hand_written = matches!(grads, StepGradients::HandWritten(_));
        if !loss.is_finite() {
            return Err(Error::NonFiniteLoss { step, loss });
        }
        let mut norm_sq = 0.0;
        let mut untrained = Vec::new();
        let mut gradients = Vec::with_capacity(self.params.len());
        for p in &self.params {
            match grads.get(p.var.as_tensor()) {
                Some(g) => {
                    // With second-order gradients on (CANDLE_GRAD_DO_NOT_DETACH), a gradient
                    // carries its backward graph; the optimizer's moments must not keep it
                    // alive from step to step.
                    let g = g.detach();
                    norm_sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
                    gradients.push(Some(g));
                }
                None => {
                    untrained.push(p.name.clone());
                    gradients.push(None);
                }
            }
        }
        if untrained.len() == self.params.len() {
            // Nothing would move: the model does not read this trainer's variables.
            return Err(Error::InvalidParameter(format!(
                "no variable received a gradient at training step {step}: build the model from the \
                 VarMap given to Trainer::new (a model on another VarMap trains nothing)"
            )));
        }
        let grad_norm = norm_sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite(format!(
                "the gradient norm is {grad_norm} at training step {step} (loss {loss})"
            )));
        }
        let clip = match self.config.grad_clip {
            // PyTorch's clip_grad_norm_: scale by max_norm / (norm + 1e-6) when below 1.
            Some(max_norm) => Some(max_norm / (grad_norm + 1e-6)).filter(|&c| c < 1.0),
            None => None,
        };
        let learning_rate = self.config.learning_rate_at(step);
        let ema_rate = self
            .config
            .ema_decay
            .min((1.0 + step as f64) / (10.0 + step as f64));
        let adam_step = self.config.adam_step(step);
        self.last_gradients.clear();
        for (p, g) in self.params.iter_mut().zip(gradients) {
            let Some(g) = g else { continue };
            if adam_step == 1 {
                // A (re)started optimizer: no memory of earlier gradients.
                p.first_moment = p.first_moment.zeros_like()?;
                p.second_moment = p.second_moment.zeros_like()?;
            }
            self.last_gradients.push((p.name.clone(), g.clone()));
            let g = match clip {
                Some(c) => (g * c)?,
                None => g,
            };
            adamw_update(p, &g, learning_rate, adam_step, &self.config)?;
            let average = ((p.ema.as_tensor() * ema_rate)? + (p.var.as_tensor() * (1.0 - ema_rate))?)?;
            p.ema.set(&average)?;
        }
        if self.untrained.is_none() {
            self.untrained = Some(untrained);
        }
        self.step += 1;
        Ok(StepReport {
            step,
            loss,
            dsm,
            penalties,
            grad_norm,
            learning_rate,
            hand_written,
        })
    }

    /// Writes a safetensors checkpoint: the weights (`model/<name>`), the EMA weights
    /// (`ema/<name>`), AdamW's moments (`adam_m/<name>`, `adam_v/<name>`), the step
    /// count (`trainer/step`) and, in the file's metadata, the [`TrainConfig`]
    /// (`train_config.<field>`), so that [`Trainer::load_checkpoint`] can refuse to resume
    /// it under other settings.
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for p in &self.params {
            tensors.insert(format!("model/{}", p.name), p.var.as_tensor().clone());
            tensors.insert(format!("ema/{}", p.name), p.ema.as_tensor().clone());
            tensors.insert(format!("adam_m/{}", p.name), p.first_moment.clone());
            tensors.insert(format!("adam_v/{}", p.name), p.second_moment.clone());
        }
        tensors.insert(
            "trainer/step".into(),
            Tensor::new(&[self.step as i64], &Device::Cpu)?,
        );
        let metadata = self
            .config
            .fields()
            .into_iter()
            .map(|(field, value)| (format!("{CONFIG_PREFIX}{field}"), value))
            .collect();
        safetensors::serialize_to_file(&tensors, Some(metadata), path.as_ref())
            .map_err(|e| Error::Checkpoint(format!("cannot write {}: {e}", path.as_ref().display())))
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`] for the same model
    /// and settings: weights, EMA weights, optimizer moments and step count. Training then
    /// continues exactly as the run that wrote it would have.
    ///
    /// Errors with [`Error::Checkpoint`], changing nothing, if the file cannot be read,
    /// does not match this trainer's variables (a missing or extra variable, a different
    /// shape or dtype), holds a NaN or infinite value, or was written under another
    /// [`TrainConfig`] (the message lists the fields that differ; checkpoints written
    /// before the settings were recorded are not checked). To go on from a checkpoint
    /// under new settings on purpose, use [`Trainer::load_checkpoint_with_new_config`].
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use scoresde::train::{TrainConfig, Trainer};
    /// let vars = VarMap::new();
    /// VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu).get(3, "w")?;
    /// let path = std::env::temp_dir().join("scoresde_doc_checkpoint.safetensors");
    /// Trainer::new(&vars, TrainConfig { batch_size: 64, ..Default::default() })?.save_checkpoint(&path)?;
    ///
    /// let mut same = Trainer::new(&vars, TrainConfig { batch_size: 64, ..Default::default() })?;
    /// same.load_checkpoint(&path)?; // resumes exactly
    /// let mut other = Trainer::new(&vars, TrainConfig { batch_size: 128, ..Default::default() })?;
    /// let refused = other.load_checkpoint(&path).unwrap_err().to_string();
    /// assert!(refused.contains("batch_size: 64 in the checkpoint, 128 here"), "{refused}");
    /// other.load_checkpoint_with_new_config(&path)?; // on purpose: continue with batches of 128
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.restore(path.as_ref(), true)
    }

    /// Restores a checkpoint as [`Trainer::load_checkpoint`] does, but under this
    /// trainer's [`TrainConfig`] even if the checkpoint was written under another: to
    /// change the schedule, batch size or seed of a run part-way. The result is then not
    /// the run that wrote the checkpoint continued, but a new one started from its state.
    /// The example of [`Trainer::load_checkpoint`] shows both.
    pub fn load_checkpoint_with_new_config(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.restore(path.as_ref(), false)
    }

    fn restore(&mut self, path: &Path, same_config: bool) -> Result<()> {
        let (mut tensors, metadata) = read_checkpoint_with_metadata(path, &self.device)?;
        if same_config {
            self.check_config(path, &metadata)?;
        }
        let step_tensor = tensors.remove("trainer/step").ok_or_else(|| {
            Error::Checkpoint(format!(
                "{} has no 'trainer/step': not a trainer checkpoint",
                path.display()
            ))
        })?;
        let step = step_tensor
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::I64))
            .and_then(|t| t.to_vec1::<i64>())
            .ok()
            .and_then(|v| v.first().copied())
            .filter(|&s| s >= 0)
            .ok_or_else(|| {
                Error::Checkpoint(format!("{}: 'trainer/step' is not a step count", path.display()))
            })?;

        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let mut take = |group: &str| -> Result<Tensor> {
                take_matching(
                    &mut tensors,
                    &format!("{group}/{}", p.name),
                    p.var.as_tensor(),
                    path,
                )
            };
            restored.push([take("model")?, take("ema")?, take("adam_m")?, take("adam_v")?]);
        }
        if !tensors.is_empty() {
            let mut extra: Vec<&String> = tensors.keys().collect();
            extra.sort();
            return Err(Error::Checkpoint(format!(
                "{} holds tensors this model does not have: {extra:?}",
                path.display()
            )));
        }
        for (p, [model, ema, m, v]) in self.params.iter_mut().zip(restored) {
            p.var.set(&model)?;
            p.ema.set(&ema)?;
            p.first_moment = m;
            p.second_moment = v;
        }
        self.step = step as usize;
        Ok(())
    }

    /// Refuses a checkpoint whose recorded settings differ from this trainer's.
    fn check_config(&self, path: &Path, metadata: &HashMap<String, String>) -> Result<()> {
        let differences: Vec<String> = self
            .config
            .fields()
            .into_iter()
            .filter_map(|(field, here)| {
                let saved = metadata.get(&format!("{CONFIG_PREFIX}{field}"))?;
                (*saved != here).then(|| format!("{field}: {saved} in the checkpoint, {here} here"))
            })
            .collect();
        if differences.is_empty() {
            return Ok(());
        }
        Err(Error::Checkpoint(format!(
            "{} was written under other training settings ({}): resuming it would not continue that run. \
             Build the trainer with the checkpoint's settings, write the new run to another path, \
             or call load_checkpoint_with_new_config to go on under the new settings on purpose",
            path.display(),
            differences.join("; ")
        )))
    }
}

/// The metadata keys of a checkpoint's recorded [`TrainConfig`] start with this.
const CONFIG_PREFIX: &str = "train_config.";

/// The gradient of one scalar term (the total, the DSM term or one penalty of an
/// [`Evaluation`]) with respect to every variable of `varmap` it depends on, by variable
/// name, detached. Variables the term does not reach are absent.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{linear, VarBuilder, VarMap};
/// let vars = VarMap::new();
/// let layer = linear(2, 1, VarBuilder::from_varmap(&vars, DType::F64, &Device::Cpu).pp("layer"))?;
/// let x = Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu)?;
/// let term = layer.forward(&x)?.sum_all()?; // w·x + b
/// let g = scoresde::train::gradients(&term, &vars)?;
/// assert_eq!(g["layer.weight"].to_vec2::<f64>()?, [[1.0, 2.0]]);
/// assert_eq!(g["layer.bias"].to_vec1::<f64>()?, [1.0]);
/// # Ok::<(), scoresde::Error>(())
/// ```
///
/// [`Objective::evaluate_batch`] shows it on a penalty.
pub fn gradients(term: &Tensor, varmap: &VarMap) -> Result<BTreeMap<String, Tensor>> {
    ensure(term.elem_count() == 1, || {
        format!("gradients needs a scalar term, got shape {:?}", term.dims())
    })?;
    let grads = term.backward()?;
    Ok(lock_vars(varmap)?
        .into_iter()
        .filter_map(|(name, var)| grads.get(var.as_tensor()).map(|g| (name, g.detach())))
        .collect())
}

/// Which weights of a checkpoint [`load_weights`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// The trained weights.
    Model,
    /// The exponential moving average (usually better for sampling).
    Ema,
}

/// Fills every variable of `varmap` from a [`Trainer`] checkpoint (the model or EMA
/// weights): the way to build a sampling model from a checkpoint without a trainer.
///
/// Errors with [`Error::Checkpoint`], changing nothing, if the file cannot be read or its
/// weights do not match the variables (missing, extra, different shape or dtype) or are
/// not finite.
///
/// ```no_run
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use scoresde::score::{MlpConfig, MlpScore};
/// use scoresde::{sde::VpSde, train::{load_weights, Weights}};
/// let vars = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
/// let model = MlpScore::new(vb, VpSde::default(), MlpConfig::default())?;
/// load_weights("out/checkpoint.safetensors", &vars, Weights::Ema)?;
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn load_weights(path: impl AsRef<Path>, varmap: &VarMap, which: Weights) -> Result<()> {
    let path = path.as_ref();
    let vars = lock_vars(varmap)?;
    let device = match vars.first() {
        Some((_, v)) => v.device().clone(),
        None => {
            return Err(Error::InvalidParameter(
                "the VarMap has no variables: build the model first".into(),
            ))
        }
    };
    let group = match which {
        Weights::Model => "model",
        Weights::Ema => "ema",
    };
    let mut tensors: HashMap<String, Tensor> = read_checkpoint(path, &device)?
        .into_iter()
        .filter(|(k, _)| k.starts_with(&format!("{group}/")))
        .collect();
    let mut values = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        values.push(take_matching(
            &mut tensors,
            &format!("{group}/{name}"),
            var.as_tensor(),
            path,
        )?);
    }
    if !tensors.is_empty() {
        let mut extra: Vec<&String> = tensors.keys().collect();
        extra.sort();
        return Err(Error::Checkpoint(format!(
            "{} holds weights this model does not have: {extra:?}",
            path.display()
        )));
    }
    for ((_, var), value) in vars.iter().zip(values) {
        var.set(&value)?;
    }
    Ok(())
}

/// The name map between the reference networks ([`MlpScore`](crate::score::MlpScore),
/// [`MlpPotential`](crate::score::MlpPotential)) with `depth` hidden layers and a PyTorch
/// `nn.Sequential` of `nn.Linear` layers with activations in between, for
/// [`load_foreign_weights`]: `(ours, theirs)` pairs.
///
/// Ours are `{ours}.hidden.{i}.weight|bias` and `{ours}.output.weight|bias` (`ours` is the
/// `VarBuilder` prefix, empty for none); theirs `{theirs}.{2i}.weight|bias` (activations
/// hold no weights, so linear layers sit at the even indices) and
/// `{theirs}.{2·depth}.weight|bias`. `nn.Linear` stores its weight as `[out, in]`, as
/// candle does: nothing is transposed. Add `MlpScore`'s Fourier frequencies yourself
/// (`time.frequencies`, e.g. score_sde's `GaussianFourierProjection.W`).
///
/// ```
/// let names = scoresde::train::torch_sequential_names(1, "", "net");
/// assert_eq!(names[0], ("hidden.0.weight".to_string(), "net.0.weight".to_string()));
/// assert_eq!(names[3], ("output.bias".to_string(), "net.2.bias".to_string()));
/// ```
pub fn torch_sequential_names(depth: usize, ours: &str, theirs: &str) -> Vec<(String, String)> {
    let join = |prefix: &str, name: &str| {
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    };
    let mut names = Vec::with_capacity(2 * depth + 2);
    for layer in 0..=depth {
        let our_layer = if layer < depth {
            format!("hidden.{layer}")
        } else {
            "output".into()
        };
        for part in ["weight", "bias"] {
            names.push((
                join(ours, &format!("{our_layer}.{part}")),
                join(theirs, &format!("{}.{part}", 2 * layer)),
            ));
        }
    }
    names
}

/// The name map between [`MlpPotential`](crate::score::MlpPotential) with 3 hidden layers
/// and the network of Deveney et al. (2025) (`models.Net` in teojd/ODESDEGap):
/// `input|hidden1|hidden2|output.{weight,bias}`, `nn.Linear` weights `[out, in]`, input
/// `[t, x]`, as this crate's. For [`load_foreign_weights`] and [`save_foreign_weights`];
/// `scripts/deveney_reference.py convert` writes the released checkpoints in this layout.
///
/// ```
/// let names = scoresde::train::deveney_names();
/// assert_eq!(names[0], ("hidden.0.weight".to_string(), "input.weight".to_string()));
/// assert_eq!(names[7], ("output.bias".to_string(), "output.bias".to_string()));
/// ```
pub fn deveney_names() -> Vec<(String, String)> {
    ["input", "hidden1", "hidden2", "output"]
        .iter()
        .enumerate()
        .flat_map(|(layer, theirs)| {
            let ours = if layer < 3 {
                format!("hidden.{layer}")
            } else {
                "output".into()
            };
            ["weight", "bias"].map(|part| (format!("{ours}.{part}"), format!("{theirs}.{part}")))
        })
        .collect()
}

/// Writes the variables of `varmap` to a safetensors file under other names, for another
/// framework: each variable `ours` as tensor `theirs` for every `(ours, theirs)` in
/// `names` (every variable must have exactly one entry). The inverse of
/// [`load_foreign_weights`]; values keep their dtype and must be finite.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use scoresde::score::{MlpPotential, PotentialConfig};
/// use scoresde::train::{deveney_names, load_foreign_weights, save_foreign_weights};
///
/// let vars = VarMap::new();
/// MlpPotential::new(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), PotentialConfig::default())?;
/// let path = std::env::temp_dir().join("scoresde-save-foreign-doc.safetensors");
/// save_foreign_weights(&path, &vars, &deveney_names())?; // input.weight: [80, 3], …
/// let file = candle_core::safetensors::load(&path, &Device::Cpu)?;
/// assert_eq!(file["input.weight"].dims(), [80, 3]);
/// // And back, into a network with other initial weights.
/// let copy = VarMap::new();
/// let config = PotentialConfig { seed: 1, ..Default::default() };
/// MlpPotential::new(VarBuilder::from_varmap(&copy, DType::F32, &Device::Cpu), config)?;
/// load_foreign_weights(&path, &copy, &deveney_names())?;
/// let w = |v: &VarMap| v.data().lock().unwrap()["output.weight"].as_tensor().to_vec2::<f32>();
/// assert_eq!(w(&vars)?, w(&copy)?);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn save_foreign_weights(
    path: impl AsRef<Path>,
    varmap: &VarMap,
    names: &[(String, String)],
) -> Result<()> {
    let path = path.as_ref();
    let vars = lock_vars(varmap)?;
    let ours: HashMap<&str, &str> = names.iter().map(|(o, t)| (o.as_str(), t.as_str())).collect();
    if ours.len() != names.len() || vars.len() != names.len() {
        return Err(Error::Checkpoint(format!(
            "the name map needs exactly one (ours, theirs) pair per variable: {} variables, {} pairs",
            vars.len(),
            names.len()
        )));
    }
    let mut tensors = HashMap::with_capacity(vars.len());
    for (name, var) in &vars {
        let Some(theirs) = ours.get(name.as_str()) else {
            return Err(Error::Checkpoint(format!(
                "the name map has no entry for the variable '{name}'"
            )));
        };
        let value = var.as_tensor().detach();
        let host = value.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if host.iter().any(|v| !v.is_finite()) {
            return Err(Error::Checkpoint(format!(
                "'{name}' holds a non-finite value: not written to {}",
                path.display()
            )));
        }
        if tensors.insert(theirs.to_string(), value).is_some() {
            return Err(Error::Checkpoint(format!("two variables map to '{theirs}'")));
        }
    }
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

/// Loads weights written by another framework (a PyTorch `state_dict` saved with
/// `safetensors.torch.save_file`) into the variables of `varmap`, taking each variable
/// `ours` from the file's tensor `theirs` for every `(ours, theirs)` in `names`.
///
/// Every variable of `varmap` must have an entry, and every entry a variable and a tensor
/// of the same shape; the file may hold more (optimizer state, buffers). Values are
/// converted to the variables' dtype and must be finite. On any mismatch nothing is
/// changed and [`Error::Checkpoint`] names the variable, the tensor and the shapes. The
/// layout of the reference networks, for writing the conversion on the PyTorch side:
/// `MlpScore`'s first layer reads `[x (d), sin(2πtw) (F/2), cos(2πtw) (F/2)]` and its
/// output is divided by `σ(t)`; `MlpPotential`'s reads `[t, x]` and outputs one value.
/// [`torch_sequential_names`] builds the map for an `nn.Sequential`.
///
/// ```
/// use std::collections::HashMap;
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use scoresde::score::{LogDensityModel, MlpPotential, PotentialConfig};
/// use scoresde::train::{load_foreign_weights, torch_sequential_names};
///
/// // A "PyTorch" file: nn.Sequential(Linear(3, 4), Softplus, Linear(4, 1)) under "net".
/// let dev = Device::Cpu;
/// let file: HashMap<String, Tensor> = [
///     ("net.0.weight", Tensor::ones((4, 3), DType::F32, &dev)?),
///     ("net.0.bias", Tensor::zeros(4, DType::F32, &dev)?),
///     ("net.2.weight", Tensor::ones((1, 4), DType::F32, &dev)?),
///     ("net.2.bias", Tensor::new(&[0.5f32], &dev)?),
/// ]
/// .into_iter()
/// .map(|(k, v)| (k.to_string(), v))
/// .collect();
/// let path = std::env::temp_dir().join("scoresde-foreign-doc.safetensors");
/// candle_core::safetensors::save(&file, &path)?;
///
/// let vars = VarMap::new();
/// let config = PotentialConfig { width: 4, depth: 1, ..Default::default() };
/// let u = MlpPotential::new(VarBuilder::from_varmap(&vars, DType::F64, &dev), config)?;
/// load_foreign_weights(&path, &vars, &torch_sequential_names(1, "", "net"))?;
/// // u(0, 0) = 4·softplus(0) + 0.5 with softplus_β(0) = ln 2 / β.
/// let zero = u.log_density(&Tensor::zeros((1, 2), DType::F64, &dev)?, &Tensor::zeros(1, DType::F64, &dev)?)?;
/// assert!((zero.to_vec1::<f64>()?[0] - (0.5 + 4.0 * 2f64.ln() / 100.0)).abs() < 1e-6);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn load_foreign_weights(
    path: impl AsRef<Path>,
    varmap: &VarMap,
    names: &[(String, String)],
) -> Result<()> {
    let path = path.as_ref();
    let vars = lock_vars(varmap)?;
    let device = match vars.first() {
        Some((_, v)) => v.device().clone(),
        None => {
            return Err(Error::InvalidParameter(
                "the VarMap has no variables: build the model first".into(),
            ))
        }
    };
    let ours: HashMap<&str, &str> = names.iter().map(|(o, t)| (o.as_str(), t.as_str())).collect();
    let unmapped: Vec<&str> = vars
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|n| !ours.contains_key(n))
        .collect();
    if !unmapped.is_empty() {
        return Err(Error::Checkpoint(format!(
            "the name map has no entry for the variables {unmapped:?}; add (ours, theirs) pairs for them"
        )));
    }
    let known: Vec<&str> = vars.iter().map(|(name, _)| name.as_str()).collect();
    if let Some((extra, _)) = names.iter().find(|(o, _)| !known.contains(&o.as_str())) {
        return Err(Error::Checkpoint(format!(
            "the name map names '{extra}', which the VarMap does not have (it has {known:?})"
        )));
    }
    let tensors = read_checkpoint(path, &device)?;
    let mut values = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        let theirs = ours[name.as_str()];
        let Some(value) = tensors.get(theirs) else {
            let mut available: Vec<&String> = tensors.keys().collect();
            available.sort();
            available.truncate(30);
            return Err(Error::Checkpoint(format!(
                "{} has no tensor '{theirs}' (for '{name}'); it has {available:?}",
                path.display()
            )));
        };
        let want = var.as_tensor().dims();
        if value.dims() != want {
            let transposed = value.rank() == 2 && value.dims().iter().rev().eq(want.iter());
            return Err(Error::Checkpoint(format!(
                "'{theirs}' in {} has shape {:?}, but '{name}' needs {want:?}{}",
                path.display(),
                value.dims(),
                if transposed {
                    " (it is transposed: weights are [out, in], as in nn.Linear)"
                } else {
                    ""
                }
            )));
        }
        let value = value.to_dtype(var.dtype())?;
        let host = value.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if let Some(v) = host.iter().find(|v| !v.is_finite()) {
            return Err(Error::Checkpoint(format!(
                "'{theirs}' in {} holds {v}",
                path.display()
            )));
        }
        values.push(value);
    }
    for ((_, var), value) in vars.iter().zip(values) {
        var.set(&value)?;
    }
    Ok(())
}

fn read_checkpoint(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    Ok(read_checkpoint_with_metadata(path, device)?.0)
}

/// The tensors of a safetensors file and its metadata (empty if it has none).
fn read_checkpoint_with_metadata(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let unreadable = |e: &dyn std::fmt::Display| {
        Error::Checkpoint(format!("cannot read {} as safetensors: {e}", path.display()))
    };
    let bytes = std::fs::read(path).map_err(|e| unreadable(&e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| unreadable(&e))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| unreadable(&e))?;
    Ok((tensors, header.metadata().clone().unwrap_or_default()))
}

/// Removes `key` from `tensors`, checking it has `like`'s shape and dtype.
fn take_matching(
    tensors: &mut HashMap<String, Tensor>,
    key: &str,
    like: &Tensor,
    path: &Path,
) -> Result<Tensor> {
    let value = tensors.remove(key).ok_or_else(|| {
        Error::Checkpoint(format!(
            "{} has no tensor '{key}': it was written for a different model",
            path.display()
        ))
    })?;
    if value.dims() != like.dims() || value.dtype() != like.dtype() {
        return Err(Error::Checkpoint(format!(
            "'{key}' in {} has shape {:?} and dtype {:?}, the model expects {:?} and {:?}",
            path.display(),
            value.dims(),
            value.dtype(),
            like.dims(),
            like.dtype()
        )));
    }
    // A NaN weight would load silently and turn every later score into NaN.
    if value.dtype().is_float() {
        let bad = value.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if let Some(v) = bad.iter().find(|v| !v.is_finite()) {
            return Err(Error::Checkpoint(format!(
                "'{key}' in {} holds {v}: the run that wrote it had diverged; load an earlier checkpoint",
                path.display()
            )));
        }
    }
    Ok(value)
}

/// candle-nn's AdamW update for one variable, op for op (so results agree bit for bit).
fn adamw_update(p: &mut Parameter, g: &Tensor, lr: f64, t: usize, config: &TrainConfig) -> Result<()> {
    let (beta1, beta2) = config.betas;
    let scale_m = 1f64 / (1f64 - beta1.powi(t as i32));
    let scale_v = 1f64 / (1f64 - beta2.powi(t as i32));
    let next_m = ((&p.first_moment * beta1)? + (g * (1.0 - beta1))?)?;
    let next_v = ((&p.second_moment * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
    let m_hat = (&next_m * scale_m)?;
    let v_hat = (&next_v * scale_v)?;
    let next_theta = (p.var.as_tensor() * (1f64 - lr * config.weight_decay))?;
    let adjusted_grad = (m_hat / (v_hat.sqrt()? + config.adam_eps)?)?;
    let next_theta = (next_theta - (adjusted_grad * lr)?)?;
    p.first_moment = next_m;
    p.second_moment = next_v;
    p.var.set(&next_theta)?;
    Ok(())
}
