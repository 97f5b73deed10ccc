//! scoresde (crate docs written with the foundation)
#![warn(missing_docs)]

mod error;
pub mod score;

pub use error::{Error, Result};
pub use score::{LogDensityModel, ScoreModel};
pub mod random;
pub mod sde;
pub mod solver;
pub mod regularizer;
