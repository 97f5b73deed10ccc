//! # scoresde
//!
//! Score-based diffusion models on [candle](https://github.com/huggingface/candle), with the
//! mathematics done carefully: forward SDEs, score models, denoising score matching,
//! reverse-SDE and probability-flow ODE samplers, Fokker–Planck regularizers, likelihoods
//! and the tools to measure the gap between ODE and SDE samples.
//!
//! ## The idea in one paragraph
//!
//! A forward SDE `dx = f(x,t)dt + g(t)dw` ([`sde`]) turns data into noise. A network
//! learns the score `s(x,t) ≈ ∇ log p_t(x)` of the noisy data ([`score`]). Running time
//! backwards, either the reverse SDE `dx = [f − g²s]dt + g dw̄` or the probability-flow
//! ODE `dx/dt = f − ½g²s` turns noise back into data ([`solver`]). With the true score
//! both give the same distribution; with a learned one the ODE is usually worse, which
//! the Fokker–Planck regularizers ([`regularizer`]) address.
//!
//! ## A first run, with an exact score
//!
//! A Gaussian mixture diffused by any SDE has a closed-form score, so every sampler can be
//! checked against truth:
//!
//! ```
//! use candle_core::{DType, Device};
//! use rand::{rngs::StdRng, SeedableRng};
//! use scoresde::prelude::*;
//!
//! // Data: two Gaussian blobs in 2-D.
//! let data = GaussianMixture::new(
//!     vec![0.5, 0.5],
//!     vec![vec![-2.0, 0.0], vec![2.0, 0.0]],
//!     vec![Covariance::Isotropic(0.1), Covariance::Isotropic(0.1)],
//! )?;
//! let sde = VpSde::default();
//! let score = data.diffused(sde); // exact ∇ log p_t
//!
//! let mut rng = StdRng::seed_from_u64(42);
//! let noise = sde.sample_prior((1000, 2), DType::F32, &Device::Cpu, &mut rng)?;
//!
//! // Reverse SDE with 500 Euler–Maruyama steps, and the probability-flow ODE with RK45.
//! let sde_samples = PredictorCorrector::euler_maruyama(500).sample(&sde, &score, &noise, &mut rng)?;
//! let ode_samples = OdeSampler::new(Rk45::new(1e-5, 1e-5)?).sample(&sde, &score, &noise, &mut rng)?;
//!
//! // Both put about half of the samples in each blob.
//! for x in [&sde_samples.x, &ode_samples.x] {
//!     let right = x.narrow(1, 0, 1)?.gt(0.0)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
//!     assert!((right - 0.5).abs() < 0.06);
//! }
//! println!("RK45 used {} score evaluations", ode_samples.stats.nfe);
//! # Ok::<(), scoresde::Error>(())
//! ```
//!
//! ## Your own network
//!
//! Anything that maps `(x, t)` to a score is a [`ScoreModel`]: implement its one method
//! for your candle network, or pass a closure.
//!
//! ```
//! use candle_core::{Module, Tensor};
//! use candle_nn::{linear, Linear, VarBuilder, VarMap};
//! use scoresde::{Result, ScoreModel};
//!
//! struct Tiny {
//!     layer: Linear,
//! }
//!
//! impl ScoreModel for Tiny {
//!     fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
//!         let input = Tensor::cat(&[x, &t.unsqueeze(1)?], 1)?; // [x, t]
//!         Ok(self.layer.forward(&input)?)
//!     }
//! }
//!
//! let vars = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vars, candle_core::DType::F32, &candle_core::Device::Cpu);
//! let model = Tiny { layer: linear(3, 2, vb.pp("layer"))? };
//! let x = Tensor::zeros((4, 2), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let t = Tensor::ones(4, candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! assert_eq!(model.score(&x, &t)?.dims(), [4, 2]);
//! # Ok::<(), scoresde::Error>(())
//! ```
//!
//! ## Where things live
//!
//! | module | concept |
//! |---|---|
//! | [`sde`] | forward SDEs: VP, sub-VP, VE, Ornstein–Uhlenbeck |
//! | [`score`] | [`ScoreModel`], [`LogDensityModel`], reference MLPs, exact Gaussian mixtures |
//! | [`data`] | toy 2-D datasets, your own samples ([`data::Empirical`]) |
//! | [`loss`] | denoising score matching: weightings, time sampling, reductions |
//! | [`train`] | [`train::Objective`] (what to minimize) and [`train::Trainer`] (AdamW, EMA, checkpoints) |
//! | [`solver`] | Euler–Maruyama, predictor–corrector, Euler/Heun/RK45 probability-flow ODE |
//! | [`autodiff`] | input derivatives: gradients, divergences, `∂/∂t`, the second-order guard |
//! | [`likelihood`] | log-density and bits/dim through the probability-flow ODE |
//! | [`regularizer`] | penalties added to the training loss |
//! | [`random`] | seeded noise (candle's own RNG cannot be seeded) |
//! | [`speed`] | the fast CPU configuration for your own program |
//!
//! A guided tour from `cargo add` to samples of your own data is in `docs/guide.md` (its
//! code runs as doctests); the mathematics, with references to the papers and the
//! reproduced results, in `docs/theory.md`; the design in `docs/design.md`; measured speed
//! in `docs/benchmarks.md`. The `examples/` directory has runnable programs for each part.
#![warn(missing_docs)]

pub mod autodiff;
pub mod data;
mod error;
mod kernels;
pub mod likelihood;
mod linalg;
pub mod loss;
pub mod metrics;
pub mod random;
pub mod regularizer;
pub mod score;
pub mod sde;
pub mod solver;
pub mod speed;
pub mod train;

pub use error::{Error, Result};
pub use score::{GradientScore, LogDensityModel, ScoreModel};

/// The types most programs use, in one import.
///
/// ```
/// use scoresde::prelude::*;
/// let sde = VpSde::default();
/// assert_eq!(sde.end_time(), 1.0);
/// ```
pub mod prelude {
    pub use crate::data::{Checkerboard, Dataset, Empirical, ImageDataset};
    pub use crate::loss::{Dsm, Weighting};
    pub use crate::score::{
        Activation, Covariance, GaussianMixture, GradientScore, LogDensityModel, MlpConfig, MlpPotential,
        MlpScore, PotentialConfig, ScoreModel, UNetConfig, UNetScore,
    };
    pub use crate::sde::{OuSde, Sde, SubVpSde, VeSde, VpSde};
    pub use crate::solver::{
        AdaptiveSde, Ancestral, Churn, Euler, EulerMaruyama, FewStep, Heun, Langevin, Method, OdeSampler,
        OdeSolver, PredictorCorrector, ReverseDiffusion, Rk45, Sampler, Spacing, TimeGrid,
    };
    pub use crate::train::{Objective, TrainConfig, Trainer};
    pub use crate::Error;
}

// The README's code is compiled and run as a doctest, so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

// So is the guide's.
#[cfg(doctest)]
#[doc = include_str!("../docs/guide.md")]
struct GuideDoctests;
