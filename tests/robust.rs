//! Hostile inputs against the public API (issue 17): each class of bad input comes back
//! as an `Error` that says what to do, never a panic, a hang or a non-finite `Ok`.

use scoresde::Error;

/// `fn main() -> scoresde::Result<()>` prints the error's Debug form: it must carry the
/// Display text (the instructions), not only the variant's name.
#[test]
fn debug_carries_the_display_text() {
    let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such checkpoint");
    let errors = [
        Error::InvalidParameter("beta_min must be >= 0".into()),
        Error::Shape("x has shape [3]".into()),
        Error::NonFinite("score at t = 0.5".into()),
        Error::StepSizeUnderflow { t: 0.25, step: 1e-18 },
        Error::HigherOrderGradientsUnavailable,
        Error::Checkpoint("missing variable".into()),
        Error::NonFiniteLoss {
            step: 3,
            loss: f64::NAN,
        },
        Error::Candle(candle_core::Error::Msg("candle says no".into())),
        Error::Io(io),
    ];
    for err in errors {
        let (debug, display) = (format!("{err:?}"), err.to_string());
        assert!(debug.contains(&display), "{debug:?} lacks {display:?}");
    }
    let debug = format!("{:?}", Error::HigherOrderGradientsUnavailable);
    assert!(debug.starts_with("HigherOrderGradientsUnavailable: "));
    assert!(debug.contains("CANDLE_GRAD_DO_NOT_DETACH=1"));
}
