//! Few-step samplers: exponential integrators in the log-SNR (DPM-Solver, DPM-Solver++,
//! UniPC) and EDM's Heun sampler in `σ̃ = σ/α`.
//!
//! Written after k-diffusion's `sampling.py`: each method is one function with the same
//! signature (context, start, grid, rng), sharing the data/noise-prediction helpers of
//! [`Ctx`]. The formulas and their sources are in `docs/theory.md` ("Few-step samplers").

use candle_core::Tensor;
use rand::Rng;

use super::{
    check_start, check_state, ensure_finite, Counted, Sampler, Samples, SolverStats, Spacing, TimeGrid,
};
use crate::error::{ensure, ensure_positive};
use crate::random::standard_normal;
use crate::sde::Sde;
use crate::{Result, ScoreModel};

/// Which few-step method a [`FewStep`] sampler runs. Costs are in score evaluations
/// (NFE) for `N` steps, without the optional final denoising step.
///
/// ```
/// use scoresde::solver::Method;
/// assert_eq!(Method::DpmSolver3.nfe(10), 30);
/// assert_eq!(Method::DpmPp2M.nfe(10), 10);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// DPM-Solver++(2M), multistep in the data prediction (Lu et al. 2022b); `N` NFE.
    DpmPp2M,
    /// DPM-Solver++(3M); `N` NFE.
    DpmPp3M,
    /// SDE-DPM-Solver++(2M), a discretization of the reverse SDE (diffusers'
    /// `sde-dpmsolver++`, midpoint); `N` NFE.
    SdeDpmPp2M,
    /// DPM-Solver-2, single-step in the noise prediction (Lu et al. 2022a, `r₁ = ½`); `2N` NFE.
    DpmSolver2,
    /// DPM-Solver-3, single-step (`r₁ = ⅓, r₂ = ⅔`); `3N` NFE.
    DpmSolver3,
    /// UniPC (Zhao et al. 2023), variant bh2 in the data prediction, with its corrector,
    /// which reuses the next step's evaluation; `order` 1 to 3; `N` NFE.
    UniPc {
        /// Order of the predictor (the corrector is one order higher).
        order: usize,
    },
    /// Karras et al.'s (2022) Algorithm 2: Heun in `σ̃ = σ/α` with optional churn; `2N` NFE
    /// (every step ends at `σ̃ > 0`, so none is the Euler-only last step of EDM).
    EdmHeun(Churn),
}

impl Method {
    /// Score evaluations for `steps` steps.
    pub fn nfe(&self, steps: usize) -> usize {
        match self {
            Self::DpmSolver2 | Self::EdmHeun(_) => 2 * steps,
            Self::DpmSolver3 => 3 * steps,
            _ => steps,
        }
    }

    /// The name used by the `few_step` example (`dpmpp_2m`, `unipc`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Self::DpmPp2M => "dpmpp_2m",
            Self::DpmPp3M => "dpmpp_3m",
            Self::SdeDpmPp2M => "sde_dpmpp_2m",
            Self::DpmSolver2 => "dpm_solver_2",
            Self::DpmSolver3 => "dpm_solver_3",
            Self::UniPc { .. } => "unipc",
            Self::EdmHeun(_) => "edm_heun",
        }
    }
}

/// The stochasticity ("churn") of EDM's sampler (Karras et al. 2022, Alg. 2): at each
/// step with `S_min ≤ σ̃ ≤ S_max`, noise raises `σ̃` to `σ̃(1 + γ)`,
/// `γ = min(S_churn/N, √2 − 1)`, scaled by `S_noise`. `Churn::default()` is
/// deterministic (`S_churn = 0`).
///
/// ```
/// use scoresde::solver::Churn;
/// let imagenet = Churn::new(40.0, 0.05, 50.0, 1.003)?; // EDM's ImageNet-64 setting
/// assert!(Churn::new(-1.0, 0.0, 1.0, 1.0).is_err());
/// # let _ = imagenet;
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Churn {
    s_churn: f64,
    s_min: f64,
    s_max: f64,
    s_noise: f64,
}

impl Churn {
    /// Churn `S_churn ≥ 0` on `S_min ≤ σ̃ ≤ S_max` (`0 ≤ S_min ≤ S_max`, `S_max` may be
    /// infinite) with noise scale `S_noise > 0`.
    pub fn new(s_churn: f64, s_min: f64, s_max: f64, s_noise: f64) -> Result<Self> {
        ensure(s_churn.is_finite() && s_churn >= 0.0, || {
            format!("S_churn must be finite and >= 0, got {s_churn}")
        })?;
        ensure(s_min.is_finite() && s_min >= 0.0 && s_max >= s_min, || {
            format!("need 0 <= S_min <= S_max, got S_min = {s_min}, S_max = {s_max}")
        })?;
        ensure_positive("S_noise", s_noise)?;
        Ok(Self {
            s_churn,
            s_min,
            s_max,
            s_noise,
        })
    }
}

impl Default for Churn {
    fn default() -> Self {
        Self {
            s_churn: 0.0,
            s_min: 0.0,
            s_max: f64::INFINITY,
            s_noise: 1.0,
        }
    }
}

/// A few-step sampler: a [`Method`] on a grid of `N` steps from `T` to `ε`, spaced by a
/// [`Spacing`] (log-SNR by default; EDM's Karras ρ = 7 for [`Method::EdmHeun`]) or given
/// as a [`TimeGrid`]. Optionally ends with the denoising step `x̂₀ = (x + σ²s)/α`
/// (score_sde's `noise_removal`; one more evaluation).
///
/// Multistep methods start at first order and, below 10 steps, lower their order on the
/// last steps, as DPM-Solver's reference code does (UniPC always does, as its code does).
///
/// ```
/// use candle_core::{DType, Device};
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::score::{Covariance, GaussianMixture};
/// use scoresde::sde::{Sde, VpSde};
/// use scoresde::solver::{FewStep, Sampler};
///
/// let sde = VpSde::default();
/// let data = GaussianMixture::new(vec![1.0], vec![vec![2.0, -1.0]], vec![Covariance::Isotropic(0.25)])?;
/// let exact = data.diffused(sde);
/// let mut rng = StdRng::seed_from_u64(0);
/// let x_t = sde.sample_prior((2000, 2), DType::F64, &Device::Cpu, &mut rng)?;
/// let out = FewStep::dpmpp_2m(10)?.sample(&sde, &exact, &x_t, &mut rng)?;
/// assert_eq!(out.stats.nfe, 10);
/// let mean = out.x.mean(0)?.to_vec1::<f64>()?;
/// assert!((mean[0] - 2.0).abs() < 0.05 && (mean[1] + 1.0).abs() < 0.05);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FewStep {
    method: Method,
    steps: usize,
    spacing: Spacing,
    grid: Option<TimeGrid>,
    eps: f64,
    denoise: bool,
}

impl FewStep {
    /// `method` with `steps ≥ 1` steps from `T` to `ε = 1e-3`, log-SNR spacing (Karras
    /// ρ = 7 for EDM), no final denoising.
    pub fn new(method: Method, steps: usize) -> Result<Self> {
        ensure((1..=super::grid::MAX_GRID_STEPS).contains(&steps), || {
            format!(
                "a few-step sampler needs between 1 and {} steps, got {steps}",
                super::grid::MAX_GRID_STEPS
            )
        })?;
        if let Method::UniPc { order } = method {
            ensure((1..=3).contains(&order), || {
                format!("UniPC's order must be 1, 2 or 3, got {order}")
            })?;
        }
        let spacing = match method {
            Method::EdmHeun(_) => Spacing::Karras(7.0),
            _ => Spacing::LogSnr,
        };
        Ok(Self {
            method,
            steps,
            spacing,
            grid: None,
            eps: super::reverse::DEFAULT_SAMPLING_EPS,
            denoise: false,
        })
    }

    /// DPM-Solver++(2M) with `steps` steps.
    ///
    /// ```
    /// assert!(scoresde::solver::FewStep::dpmpp_2m(0).is_err());
    /// ```
    pub fn dpmpp_2m(steps: usize) -> Result<Self> {
        Self::new(Method::DpmPp2M, steps)
    }

    /// UniPC-bh2 of order 2 with `steps` steps.
    ///
    /// ```
    /// assert_eq!(scoresde::solver::FewStep::unipc(20)?.nfe(), 20);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn unipc(steps: usize) -> Result<Self> {
        Self::new(Method::UniPc { order: 2 }, steps)
    }

    /// EDM's Heun sampler with `churn` and `steps` steps (Karras ρ = 7 spacing).
    ///
    /// ```
    /// use scoresde::solver::{Churn, FewStep};
    /// assert_eq!(FewStep::edm_heun(18, Churn::default())?.nfe(), 36);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn edm_heun(steps: usize, churn: Churn) -> Result<Self> {
        Self::new(Method::EdmHeun(churn), steps)
    }

    /// The same sampler with another step spacing.
    ///
    /// ```
    /// use scoresde::solver::{FewStep, Spacing};
    /// let s = FewStep::dpmpp_2m(10)?.with_spacing(Spacing::Quadratic);
    /// # let _ = s;
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_spacing(mut self, spacing: Spacing) -> Self {
        self.spacing = spacing;
        self
    }

    /// The same sampler on an explicit decreasing grid (which replaces the step count,
    /// spacing and `ε`); its times must lie in `(0, T]` when sampling.
    ///
    /// ```
    /// use scoresde::solver::{FewStep, TimeGrid};
    /// let s = FewStep::dpmpp_2m(1)?.with_grid(TimeGrid::new(vec![1.0, 0.5, 0.1, 1e-3])?)?;
    /// assert_eq!(s.nfe(), 3);
    /// assert!(FewStep::dpmpp_2m(1)?.with_grid(TimeGrid::new(vec![0.1, 1.0])?).is_err());
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_grid(mut self, grid: TimeGrid) -> Result<Self> {
        grid.check_reverse()?;
        self.steps = grid.steps();
        self.grid = Some(grid);
        Ok(self)
    }

    /// The same sampler ending at `ε > 0`.
    ///
    /// ```
    /// assert!(scoresde::solver::FewStep::dpmpp_2m(10)?.with_eps(0.0).is_err());
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_eps(mut self, eps: f64) -> Result<Self> {
        ensure_positive("eps", eps)?;
        self.eps = eps;
        Ok(self)
    }

    /// The same sampler, returning the denoised `x̂₀ = (x + σ(ε)²s)/α(ε)` at the end.
    ///
    /// ```
    /// assert_eq!(scoresde::solver::FewStep::dpmpp_2m(10)?.with_denoise(true).nfe(), 11);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_denoise(mut self, denoise: bool) -> Self {
        self.denoise = denoise;
        self
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// Score evaluations one call to `sample` uses.
    pub fn nfe(&self) -> usize {
        self.method.nfe(self.steps) + usize::from(self.denoise)
    }
}

impl<S: Sde> Sampler<S> for FewStep {
    fn sample<M: ScoreModel, R: Rng + ?Sized>(
        &self,
        sde: &S,
        model: &M,
        x_end: &Tensor,
        rng: &mut R,
    ) -> Result<Samples> {
        check_start(x_end)?;
        let grid = match &self.grid {
            Some(grid) => {
                grid.check_sampling(sde.end_time())?;
                grid.clone()
            }
            None => {
                ensure(self.eps < sde.end_time(), || {
                    format!(
                        "eps ({}) must be below the SDE's end time ({})",
                        self.eps,
                        sde.end_time()
                    )
                })?;
                self.spacing.grid(sde, sde.end_time(), self.eps, self.steps)?
            }
        };
        let _inference = crate::kernels::InferenceScope::enter();
        let c = Ctx {
            sde,
            model: Counted::new(model),
        };
        let ts = grid.times();
        let x = x_end.detach();
        let x = match self.method {
            Method::DpmPp2M => dpmpp_multistep(&c, x, ts, rng, 2, false)?,
            Method::DpmPp3M => dpmpp_multistep(&c, x, ts, rng, 3, false)?,
            Method::SdeDpmPp2M => dpmpp_multistep(&c, x, ts, rng, 2, true)?,
            Method::DpmSolver2 => dpm_solver_singlestep(&c, x, ts, rng, 2)?,
            Method::DpmSolver3 => dpm_solver_singlestep(&c, x, ts, rng, 3)?,
            Method::UniPc { order } => unipc_bh2(&c, x, ts, rng, order)?,
            Method::EdmHeun(churn) => edm_heun(&c, x, ts, rng, &churn)?,
        };
        let x = if self.denoise { c.data(&x, grid.end())? } else { x };
        Ok(Samples {
            x,
            stats: SolverStats {
                nfe: c.model.calls(),
                accepted_steps: grid.steps(),
                rejected_steps: 0,
            },
        })
    }
}

/// What every method shares: the SDE's `α, σ, λ` and the counted model as predictions.
struct Ctx<'a, S, M> {
    sde: &'a S,
    model: Counted<'a, M>,
}

impl<S: Sde, M: ScoreModel> Ctx<'_, S, M> {
    fn alpha(&self, t: f64) -> f64 {
        self.sde.mean_coeff(t)
    }
    fn sigma(&self, t: f64) -> f64 {
        self.sde.std(t)
    }
    fn lambda(&self, t: f64) -> f64 {
        self.sde.log_snr(t)
    }
    fn score(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        let s = self.model.score(x, &super::time_like(t, x)?)?.detach();
        ensure_finite(&s, || format!("the score is not finite at t = {t}"))?;
        Ok(s)
    }
    /// `x̂₀ = (x + σ²s)/α`.
    fn data(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        self.sde.data_prediction(x, &self.score(x, t)?, t)
    }
    /// `ε̂ = −σ s`.
    fn noise(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        self.sde.noise_prediction(&self.score(x, t)?, t)
    }
}

/// `Σ c_i·x_i`, skipping zero coefficients.
fn lin(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for &(c, x) in terms {
        if c == 0.0 {
            continue;
        }
        let term = (x * c)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    match acc {
        Some(a) => Ok(a),
        None => Ok(terms[0].1.zeros_like()?),
    }
}

/// The order of multistep step `i` of `n`: warm up from first order, and (for `n < 10`
/// or when `always_lower_final`) lower it on the last steps.
fn multistep_order(order: usize, i: usize, n: usize, always_lower_final: bool) -> usize {
    let warm = order.min(i + 1);
    if always_lower_final || n < 10 {
        warm.min(n - i)
    } else {
        warm
    }
}

/// DPM-Solver++(2M)/(3M) (`dpm_solver_pytorch.py`, `multistep_dpm_solver_*_update`,
/// "dpmsolver++"), and with `sde` the SDE-DPM-Solver++(2M) of diffusers.
fn dpmpp_multistep<S: Sde, M: ScoreModel, R: Rng + ?Sized>(
    c: &Ctx<S, M>,
    mut x: Tensor,
    ts: &[f64],
    rng: &mut R,
    order: usize,
    sde: bool,
) -> Result<Tensor> {
    let n = ts.len() - 1;
    // Most recent last: (λ, D) at the previous grid times.
    let mut hist: Vec<(f64, Tensor)> = vec![(c.lambda(ts[0]), c.data(&x, ts[0])?)];
    for i in 0..n {
        let (s, t) = (ts[i], ts[i + 1]);
        let (lam_t, a_t, sig_t, sig_s) = (c.lambda(t), c.alpha(t), c.sigma(t), c.sigma(s));
        let k = hist.len();
        let (lam_s, d0) = (&hist[k - 1].0, &hist[k - 1].1);
        let h = lam_t - lam_s;
        let p = multistep_order(order, i, n, false).min(k);
        // D1 (first divided difference, scaled by h) and D2 (second) per the reference.
        let (d1, d2) = match p {
            1 => (None, None),
            2 => {
                let r0 = (lam_s - hist[k - 2].0) / h;
                (Some(((d0 - &hist[k - 2].1)? / r0)?), None)
            }
            _ => {
                let r0 = (lam_s - hist[k - 2].0) / h;
                let r1 = (hist[k - 2].0 - hist[k - 3].0) / h;
                let d1_0 = ((d0 - &hist[k - 2].1)? / r0)?;
                let d1_1 = ((&hist[k - 2].1 - &hist[k - 3].1)? / r1)?;
                let diff = (&d1_0 - &d1_1)?;
                let d1 = lin(&[(1.0, &d1_0), (r0 / (r0 + r1), &diff)])?;
                (Some(d1), Some((diff / (r0 + r1))?))
            }
        };
        x = if sde {
            // x_t = (σ_t/σ_s)e^{−h} x + α_t(1−e^{−2h})(D₀ + ½D₁) + σ_t√(1−e^{−2h}) z
            let one_m = -(-2.0 * h).exp_m1();
            let z = standard_normal(x.shape(), x.dtype(), x.device(), rng)?;
            let mut terms = vec![
                (sig_t / sig_s * (-h).exp(), &x),
                (a_t * one_m, d0),
                (sig_t * one_m.sqrt(), &z),
            ];
            if let Some(d1) = &d1 {
                terms.push((0.5 * a_t * one_m, d1));
            }
            lin(&terms)?
        } else {
            let phi1 = (-h).exp_m1();
            let mut terms = vec![(sig_t / sig_s, &x), (-a_t * phi1, d0)];
            match (&d1, &d2) {
                (Some(d1), None) => terms.push((-0.5 * a_t * phi1, d1)),
                (Some(d1), Some(d2)) => {
                    let phi2 = phi1 / h + 1.0;
                    let phi3 = phi2 / h - 0.5;
                    terms.push((a_t * phi2, d1));
                    terms.push((-a_t * phi3, d2));
                }
                _ => {}
            }
            lin(&terms)?
        }
        .detach();
        check_state(&x, t, i)?;
        if i + 1 < n {
            hist.push((lam_t, c.data(&x, t)?));
            if hist.len() > order {
                hist.remove(0);
            }
        }
    }
    Ok(x)
}

/// DPM-Solver-2/-3 single-step in the noise prediction (`singlestep_dpm_solver_second_update`
/// and `_third_update`, solver type "dpmsolver").
fn dpm_solver_singlestep<S: Sde, M: ScoreModel, R: Rng + ?Sized>(
    c: &Ctx<S, M>,
    mut x: Tensor,
    ts: &[f64],
    _rng: &mut R,
    order: usize,
) -> Result<Tensor> {
    for (i, w) in ts.windows(2).enumerate() {
        let (s, t) = (w[0], w[1]);
        let (lam_s, lam_t) = (c.lambda(s), c.lambda(t));
        let h = lam_t - lam_s;
        let (a_s, a_t, sig_t) = (c.alpha(s), c.alpha(t), c.sigma(t));
        let eps_s = c.noise(&x, s)?;
        // An intermediate time at λ_s + r·h and its (α, σ).
        let mid = |r: f64| -> Result<(f64, f64, f64)> {
            let u = c.sde.time_at_log_snr(lam_s + r * h)?;
            Ok((u, c.alpha(u), c.sigma(u)))
        };
        let phi1 = h.exp_m1();
        x = if order == 2 {
            let r1 = 0.5;
            let (s1, a_1, sig_1) = mid(r1)?;
            let u = lin(&[(a_1 / a_s, &x), (-sig_1 * (r1 * h).exp_m1(), &eps_s)])?;
            let diff = (c.noise(&u, s1)? - &eps_s)?;
            lin(&[
                (a_t / a_s, &x),
                (-sig_t * phi1, &eps_s),
                (-sig_t / (2.0 * r1) * phi1, &diff),
            ])?
        } else {
            let (r1, r2) = (1.0 / 3.0, 2.0 / 3.0);
            let (s1, a_1, sig_1) = mid(r1)?;
            let (s2, a_2, sig_2) = mid(r2)?;
            let u1 = lin(&[(a_1 / a_s, &x), (-sig_1 * (r1 * h).exp_m1(), &eps_s)])?;
            let diff1 = (c.noise(&u1, s1)? - &eps_s)?;
            let phi22 = (r2 * h).exp_m1() / (r2 * h) - 1.0;
            let u2 = lin(&[
                (a_2 / a_s, &x),
                (-sig_2 * (r2 * h).exp_m1(), &eps_s),
                (-r2 / r1 * sig_2 * phi22, &diff1),
            ])?;
            let diff2 = (c.noise(&u2, s2)? - &eps_s)?;
            let phi2 = phi1 / h - 1.0;
            lin(&[
                (a_t / a_s, &x),
                (-sig_t * phi1, &eps_s),
                (-sig_t / r2 * phi2, &diff2),
            ])?
        }
        .detach();
        check_state(&x, t, i)?;
    }
    Ok(x)
}

/// Solves the small dense system `a·x = b` (`k ≤ 3`) by Gaussian elimination with
/// partial pivoting; the UniPC matrices are Vandermonde in distinct ratios, so regular.
fn solve_small(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Result<Vec<f64>> {
    let k = b.len();
    for col in 0..k {
        let pivot = (col..k)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        ensure(a[col][col].abs() > 1e-300, || {
            "UniPC's coefficient system is singular: the grid has repeated log-SNR values".into()
        })?;
        let pivot_row = a[col].clone();
        for row in col + 1..k {
            let f = a[row][col] / pivot_row[col];
            for (v, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; k];
    for row in (0..k).rev() {
        let tail: f64 = (row + 1..k).map(|j| a[row][j] * x[j]).sum();
        x[row] = (b[row] - tail) / a[row][row];
    }
    Ok(x)
}

/// UniPC, bh2, data prediction (`uni_pc.py`, `multistep_uni_pc_bh_update`): predictor
/// UniP, then corrector UniC with the model value at the predicted point, which the next
/// step reuses; no corrector on the last step.
fn unipc_bh2<S: Sde, M: ScoreModel, R: Rng + ?Sized>(
    c: &Ctx<S, M>,
    mut x: Tensor,
    ts: &[f64],
    _rng: &mut R,
    order: usize,
) -> Result<Tensor> {
    let n = ts.len() - 1;
    let mut hist: Vec<(f64, Tensor)> = vec![(c.lambda(ts[0]), c.data(&x, ts[0])?)];
    for i in 0..n {
        let (s, t) = (ts[i], ts[i + 1]);
        let (lam_t, a_t, sig_t, sig_s) = (c.lambda(t), c.alpha(t), c.sigma(t), c.sigma(s));
        let k = hist.len();
        let p = multistep_order(order, i, n, true).min(k);
        let (lam_s, m0) = (hist[k - 1].0, &hist[k - 1].1);
        let h = lam_t - lam_s;
        let mut rks = Vec::with_capacity(p);
        let mut d1s = Vec::with_capacity(p);
        for j in 1..p {
            let (lam_j, m_j) = (&hist[k - 1 - j].0, &hist[k - 1 - j].1);
            let rk = (lam_j - lam_s) / h;
            rks.push(rk);
            d1s.push(((m_j - m0)? / rk)?);
        }
        rks.push(1.0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = hh.exp_m1(); // bh2
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let mut r_mat = Vec::with_capacity(p);
        let mut b = Vec::with_capacity(p);
        for q in 1..=p {
            r_mat.push(rks.iter().map(|r| r.powi(q as i32 - 1)).collect::<Vec<f64>>());
            b.push(h_phi_k * factorial / b_h);
            factorial *= (q + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        let base = lin(&[(sig_t / sig_s, &x), (-a_t * h_phi_1, m0)])?;
        // Predictor.
        let rhos_p = match p {
            1 => vec![],
            2 => vec![0.5],
            _ => solve_small(
                r_mat[..p - 1].iter().map(|row| row[..p - 1].to_vec()).collect(),
                b[..p - 1].to_vec(),
            )?,
        };
        let mut terms: Vec<(f64, &Tensor)> = vec![(1.0, &base)];
        terms.extend(rhos_p.iter().zip(&d1s).map(|(r, d)| (-a_t * b_h * r, d)));
        let x_pred = lin(&terms)?.detach();
        check_state(&x_pred, t, i)?;
        if i + 1 == n {
            x = x_pred;
            break;
        }
        // Corrector, with the evaluation the next step needs anyway.
        let m_t = c.data(&x_pred, t)?;
        let rhos_c = if p == 1 { vec![0.5] } else { solve_small(r_mat, b)? };
        let d1_t = (&m_t - m0)?;
        let mut terms: Vec<(f64, &Tensor)> = vec![(1.0, &base)];
        terms.extend(rhos_c.iter().zip(&d1s).map(|(r, d)| (-a_t * b_h * r, d)));
        terms.push((-a_t * b_h * rhos_c[p - 1], &d1_t));
        x = lin(&terms)?.detach();
        check_state(&x, t, i)?;
        hist.push((lam_t, m_t));
        if hist.len() > order {
            hist.remove(0);
        }
    }
    Ok(x)
}

/// EDM's Algorithm 2 (`generate.py::edm_sampler`) in `x̃ = x/α`, `σ̃ = σ/α`, with
/// `D(x̃; σ̃) = x̂₀(αx̃, t)`. Churned `σ̂` is capped at `σ̃(T)`, the SDE's largest.
fn edm_heun<S: Sde, M: ScoreModel, R: Rng + ?Sized>(
    c: &Ctx<S, M>,
    x: Tensor,
    ts: &[f64],
    rng: &mut R,
    churn: &Churn,
) -> Result<Tensor> {
    let n = ts.len() - 1;
    let sig = |t: f64| c.sigma(t) / c.alpha(t);
    // dx̃/dσ̃ = (x̃ − D)/σ̃ at time t.
    let slope = |x: &Tensor, t: f64| -> Result<Tensor> {
        let d = c.data(&(x * c.alpha(t))?, t)?;
        Ok(((x - d)? / sig(t))?)
    };
    let sigma_top = sig(c.sde.end_time());
    let gamma_max = (churn.s_churn / n as f64).min(std::f64::consts::SQRT_2 - 1.0);
    let mut x = (x / c.alpha(ts[0]))?;
    for (i, w) in ts.windows(2).enumerate() {
        let (t_cur, t_next) = (w[0], w[1]);
        let (s_cur, s_next) = (sig(t_cur), sig(t_next));
        let gamma = if (churn.s_min..=churn.s_max).contains(&s_cur) {
            gamma_max
        } else {
            0.0
        };
        let s_hat = (s_cur * (1.0 + gamma)).min(sigma_top);
        let t_hat = if s_hat > s_cur {
            let z = standard_normal(x.shape(), x.dtype(), x.device(), rng)?;
            x = lin(&[
                (1.0, &x),
                ((s_hat * s_hat - s_cur * s_cur).sqrt() * churn.s_noise, &z),
            ])?;
            c.sde.time_at_log_snr(-s_hat.ln())?
        } else {
            t_cur
        };
        let s_hat = if s_hat > s_cur { s_hat } else { s_cur };
        let d = slope(&x, t_hat)?;
        let euler = lin(&[(1.0, &x), (s_next - s_hat, &d)])?;
        let d_next = slope(&euler, t_next)?;
        x = lin(&[
            (1.0, &x),
            (0.5 * (s_next - s_hat), &d),
            (0.5 * (s_next - s_hat), &d_next),
        ])?
        .detach();
        check_state(&x, t_next, i)?;
    }
    Ok((x * c.alpha(ts[n]))?)
}
