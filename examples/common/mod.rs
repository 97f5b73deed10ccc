//! What the examples share: a progress bar around training, `--key value` options, and
//! scatter plots of 2-D samples.
//!
//! Each example uses only part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::str::FromStr;

use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use plotters::style::FontStyle;
use scoresde::data::Dataset;
use scoresde::sde::Sde;
use scoresde::train::{FitReport, Objective, StepReport, Trainer};
use scoresde::ScoreModel;

pub type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Runs `steps` training steps with a progress bar showing the DSM loss and penalties.
pub fn fit_with_progress<S: Sde, M: ScoreModel, D: Dataset + ?Sized>(
    label: &str,
    trainer: &mut Trainer,
    objective: &Objective<'_, S, M>,
    data: &D,
    steps: usize,
) -> BoxResult<FitReport> {
    let bar = training_bar(label, steps)?;
    let report = trainer.fit(objective, data, steps, |step| show_step(&bar, step))?;
    bar.finish_and_clear();
    Ok(report)
}

/// A progress bar for `total` training steps: position, steps/s and the latest losses.
fn training_bar(label: &str, total: usize) -> BoxResult<ProgressBar> {
    let bar = ProgressBar::new(total as u64).with_style(ProgressStyle::with_template(
        "{prefix:9} {elapsed_precise} [{bar:40}] {pos}/{len} steps, {per_sec} {msg}",
    )?);
    bar.set_prefix(label.to_string());
    Ok(bar)
}

/// Advances `bar` by one step, showing the DSM loss and penalties every 10 steps.
fn show_step(bar: &ProgressBar, step: &StepReport) {
    bar.inc(1);
    if step.step % 10 == 0 {
        let penalties: String = step
            .penalties
            .iter()
            .map(|p| format!(" penalty {p:.3e}"))
            .collect();
        bar.set_message(format!("dsm {:.4}{penalties}", step.dsm));
    }
}

/// Trains until the trainer has taken `total` steps (it may start part-way, from a
/// checkpoint), with one progress bar (loss, steps/s), saving a checkpoint to `path` every
/// `every` steps and at the end, so an interrupted run resumes exactly.
pub fn fit_with_checkpoints<S: Sde, M: ScoreModel, D: Dataset + ?Sized>(
    label: &str,
    trainer: &mut Trainer,
    objective: &Objective<'_, S, M>,
    data: &D,
    total: usize,
    every: usize,
    path: &std::path::Path,
) -> BoxResult<()> {
    let bar = training_bar(label, total)?;
    bar.set_position(trainer.step_count().min(total) as u64);
    bar.reset_eta();
    while trainer.step_count() < total {
        let chunk = every.max(1).min(total - trainer.step_count());
        trainer.fit(objective, data, chunk, |step| show_step(&bar, step))?;
        trainer.save_checkpoint(path)?;
    }
    bar.finish_and_clear();
    if total == 0 || !path.exists() {
        trainer.save_checkpoint(path)?;
    }
    Ok(())
}

/// Deveney et al.'s penalty: the log-density FP residual (exact Laplacian) at `points`
/// points uniform in `[−half_width, half_width]² × [eps, T]`, plus the boundary term on
/// `per_face` points per face (none for 0).
pub fn deveney_penalty(
    half_width: f64,
    points: usize,
    per_face: usize,
    eps: f64,
) -> BoxResult<scoresde::regularizer::LogDensityFp> {
    use scoresde::regularizer::{Boundary, Collocation, LogDensityFp};
    let boundary = match per_face {
        0 => None,
        n => Some(Boundary::new(1.0, n)?),
    };
    Ok(LogDensityFp::new()
        .with_collocation(Collocation::UniformBox {
            low: -half_width,
            high: half_width,
            points,
            eps,
        })?
        .with_boundary(boundary))
}

/// `--key value` pairs and `--flag`s from the command line.
pub struct Options {
    values: HashMap<String, String>,
    flags: Vec<String>,
}

impl Options {
    /// Reads the command line; every option must be one of `known` and have a value.
    pub fn parse(known: &[&str]) -> BoxResult<Self> {
        Self::parse_with_flags(known, &[])
    }

    /// Reads the command line: options in `known` take a value, those in `flags` do not.
    pub fn parse_with_flags(known: &[&str], flags: &[&str]) -> BoxResult<Self> {
        let mut args = std::env::args().skip(1);
        let (mut values, mut set) = (HashMap::new(), Vec::new());
        while let Some(arg) = args.next() {
            let key = arg.trim_start_matches("--");
            if arg.starts_with("--") && flags.contains(&key) {
                set.push(key.to_string());
            } else if arg.starts_with("--") && known.contains(&key) {
                let value = args.next().ok_or_else(|| format!("option {arg} needs a value"))?;
                values.insert(key.to_string(), value);
            } else {
                let all: Vec<&str> = known.iter().chain(flags).copied().collect();
                return Err(format!("unknown option {arg}; known: --{}", all.join(", --")).into());
            }
        }
        Ok(Self { values, flags: set })
    }

    /// Whether the flag `--key` was given.
    pub fn flag(&self, key: &str) -> bool {
        self.flags.iter().any(|f| f == key)
    }

    /// The option's value, or `default` when it was not given.
    pub fn get<T: FromStr>(&self, key: &str, default: T) -> BoxResult<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.values.get(key) {
            Some(v) => v.parse().map_err(|e| format!("--{key} {v}: {e}").into()),
            None => Ok(default),
        }
    }

    /// The option's value, if given.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }
}

/// Scatter plots of 2-D point sets, `columns` panels per row, each over
/// `[-extent, extent]²`, written as a PNG.
pub fn plot_panels(path: &str, columns: usize, extent: f64, panels: &[(String, &Tensor)]) -> BoxResult<()> {
    // The bitmap backend draws text with ab_glyph from a font shipped in the repository.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        include_bytes!("../../assets/DejaVuSansMono.ttf"),
    )
    .map_err(|_| "cannot read the bundled font")?;
    let columns = columns.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(columns);
    let size = (480 * columns as u32, 510 * rows as u32);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    for (area, (title, points)) in root.split_evenly((rows, columns)).iter().zip(panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(24)
            .y_label_area_size(32)
            .build_cartesian_2d(-extent..extent, -extent..extent)?;
        chart.configure_mesh().disable_mesh().draw()?;
        let xy = points.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        chart.draw_series(
            xy.iter()
                .map(|p| Circle::new((p[0], p[1]), 1, RGBColor(30, 80, 160).mix(0.5).filled())),
        )?;
    }
    root.present()?;
    Ok(())
}
