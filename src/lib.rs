//! scoresde (crate docs written with the foundation)
#![warn(missing_docs)]

pub mod autodiff;
mod error;
pub mod score;

pub use error::{Error, Result};
pub use score::{GradientScore, LogDensityModel, ScoreModel};
