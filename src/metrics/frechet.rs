//! The Fréchet distance between moment-matched Gaussians (the quantity FID computes in a
//! feature space), with a Jacobi eigen-solver for the matrix square roots.

// Dense linear algebra on small matrices reads best with explicit indices.
#![allow(clippy::needless_range_loop)]

use candle_core::Tensor;

use super::{read_pair, times_pow2, Points};
use crate::error::ensure;
use crate::linalg::symmetric_eigen;
use crate::{Error, Result};

/// The largest dimension accepted: Jacobi costs `O(d³)` per sweep.
const MAX_DIM: usize = 1024;

/// The squared Fréchet (2-Wasserstein) distance between the Gaussians matched to the
/// means and covariances of two sample sets, as FID computes it (Heusel et al. 2017):
/// `‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁^{½} Σ₂ Σ₁^{½})^{½})`, with unbiased (`n − 1`)
/// covariances, in `f64`.
///
/// Unlike a mean shift, it sees wrong spreads and correlations. Each set needs at least 2
/// points; sizes may differ; dimension at most 1,024. Like FID it is biased upward for
/// finite sets: compare against the value between two sets of true samples of the same
/// size (the noise floor).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::metrics::frechet_distance;
/// let x = Tensor::new(&[[0.0f64], [2.0]], &Device::Cpu)?; // mean 1, variance 2
/// let y = Tensor::new(&[[3.0f64], [5.0]], &Device::Cpu)?; // mean 4, variance 2
/// assert!((frechet_distance(&x, &y)? - 9.0).abs() < 1e-12); // only the means differ
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn frechet_distance(x: &Tensor, y: &Tensor) -> Result<f64> {
    // Scaled by a power of two (no overflow on finite input); a squared distance scales
    // back by its square.
    let (x, y, exponent) = read_pair(x, y, false)?;
    ensure(x.n >= 2 && y.n >= 2, || {
        "the Fréchet distance needs at least 2 points in each set".into()
    })?;
    let (mx, cx) = moments(&x);
    let (my, cy) = moments(&y);
    Ok(times_pow2(frechet_gaussians(&mx, &cx, &my, &cy)?, 2 * exponent))
}

/// The squared Fréchet distance `‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁^{½} Σ₂ Σ₁^{½})^{½})`
/// between `N(μ₁, Σ₁)` and `N(μ₂, Σ₂)`; covariances are `d×d` rows, symmetric positive
/// semi-definite (tiny negative eigenvalues from rounding are clipped to 0).
///
/// ```
/// use scoresde::metrics::frechet_gaussians;
/// // Isotropic: d·(√a − √b)².
/// let (a, b) = (vec![vec![4.0, 0.0], vec![0.0, 4.0]], vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
/// let f = frechet_gaussians(&[0.0, 0.0], &a, &[0.0, 0.0], &b)?;
/// assert!((f - 2.0).abs() < 1e-12);
/// assert!(frechet_gaussians(&[0.0], &[vec![-1.0]], &[0.0], &[vec![1.0]]).is_err());
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn frechet_gaussians(mu1: &[f64], cov1: &[Vec<f64>], mu2: &[f64], cov2: &[Vec<f64>]) -> Result<f64> {
    let d = mu1.len();
    ensure((1..=MAX_DIM).contains(&d), || {
        format!("the Fréchet distance needs a dimension between 1 and {MAX_DIM}, got {d}")
    })?;
    let square = |c: &[Vec<f64>]| c.len() == d && c.iter().all(|r| r.len() == d);
    if mu2.len() != d || !square(cov1) || !square(cov2) {
        return Err(Error::Shape(format!(
            "means of length {d} need {d}x{d} covariances and a second mean of the same length (got {})",
            mu2.len()
        )));
    }
    let finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
    if !finite(mu1) || !finite(mu2) || !cov1.iter().chain(cov2).all(|r| finite(r)) {
        return Err(Error::NonFinite(
            "a mean or covariance contains NaN or infinity".into(),
        ));
    }
    let (c1, c2) = (flatten(cov1, "first")?, flatten(cov2, "second")?);
    // Σ₁^{½} = V diag(√λ) Vᵀ, then the eigenvalues of Σ₁^{½} Σ₂ Σ₁^{½}.
    let (l1, v1) = symmetric_eigen(&c1, d);
    check_psd(&l1, "first")?;
    let root = reassemble(&l1.iter().map(|l| l.max(0.0).sqrt()).collect::<Vec<_>>(), &v1, d);
    let m = matmul(&matmul(&root, &c2, d), &root, d);
    let (lm, _) = symmetric_eigen(&symmetrize(&m, d), d);
    check_psd(&lm, "second")?;
    let trace_root: f64 = lm.iter().map(|l| l.max(0.0).sqrt()).sum();
    let mean_term: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b) * (a - b)).sum();
    let trace = |c: &[f64]| (0..d).map(|i| c[i * d + i]).sum::<f64>();
    // Clipped at 0: rounding can leave a tiny negative for identical inputs.
    Ok((mean_term + trace(&c1) + trace(&c2) - 2.0 * trace_root).max(0.0))
}

fn flatten(c: &[Vec<f64>], which: &str) -> Result<Vec<f64>> {
    let d = c.len();
    let scale = c
        .iter()
        .flatten()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    for i in 0..d {
        for j in 0..i {
            ensure((c[i][j] - c[j][i]).abs() <= 1e-9 * scale, || {
                format!("the {which} covariance is not symmetric at ({i}, {j})")
            })?;
        }
    }
    Ok(c.iter().flatten().copied().collect())
}

/// Rejects clearly negative eigenvalues (beyond rounding).
fn check_psd(eigenvalues: &[f64], which: &str) -> Result<()> {
    let scale = eigenvalues.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let tol = 1e-9 * scale.max(f64::MIN_POSITIVE);
    ensure(eigenvalues.iter().all(|&l| l >= -tol), || {
        format!(
            "the {which} covariance (or product) is not positive semi-definite: eigenvalues {eigenvalues:?}"
        )
    })
}

/// Mean and unbiased covariance (row-major `d×d`) of a point set with `n ≥ 2`.
fn moments(p: &Points) -> (Vec<f64>, Vec<Vec<f64>>) {
    let (n, d) = (p.n, p.d);
    let mut mean = vec![0.0; d];
    for i in 0..n {
        for (m, v) in mean.iter_mut().zip(p.row(i)) {
            *m += v / n as f64;
        }
    }
    let mut cov = vec![vec![0.0; d]; d];
    let mut centred = vec![0.0; d];
    for i in 0..n {
        for ((c, v), m) in centred.iter_mut().zip(p.row(i)).zip(&mean) {
            *c = v - m;
        }
        for (a, row) in cov.iter_mut().enumerate() {
            for (b, entry) in row.iter_mut().enumerate().skip(a) {
                *entry += centred[a] * centred[b] / (n - 1) as f64;
            }
        }
    }
    for a in 0..d {
        for b in 0..a {
            cov[a][b] = cov[b][a];
        }
    }
    (mean, cov)
}

/// `V diag(l) Vᵀ`.
fn reassemble(l: &[f64], v: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            out[i * d + j] = (0..d).map(|k| v[i * d + k] * l[k] * v[j * d + k]).sum();
        }
    }
    out
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        for k in 0..d {
            let aik = a[i * d + k];
            for j in 0..d {
                out[i * d + j] += aik * b[k * d + j];
            }
        }
    }
    out
}

fn symmetrize(m: &[f64], d: usize) -> Vec<f64> {
    let mut out = m.to_vec();
    for i in 0..d {
        for j in 0..i {
            let avg = 0.5 * (m[i * d + j] + m[j * d + i]);
            out[i * d + j] = avg;
            out[j * d + i] = avg;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_reconstructs_a_symmetric_matrix() {
        let d = 4;
        let a = vec![
            4.0, 1.0, -2.0, 0.5, 1.0, 3.0, 0.0, 1.0, -2.0, 0.0, 5.0, -1.0, 0.5, 1.0, -1.0, 2.0,
        ];
        let (l, v) = symmetric_eigen(&a, d);
        let back = reassemble(&l, &v, d);
        for (x, y) in a.iter().zip(&back) {
            assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
        // V is orthogonal.
        let vtv = matmul(
            &(0..d * d).map(|k| v[(k % d) * d + k / d]).collect::<Vec<_>>(),
            &v,
            d,
        );
        for i in 0..d {
            for j in 0..d {
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((vtv[i * d + j] - expected).abs() < 1e-12);
            }
        }
        // Trace and determinant-free check: eigenvalue sum is the trace (14).
        assert!((l.iter().sum::<f64>() - 14.0).abs() < 1e-12);
    }
}
