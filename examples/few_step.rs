//! Few-step samplers against the 1000-step baseline (issue 15): for a 2-D and a 10-D
//! anisotropic Gaussian mixture (condition numbers 50 and 100) under VP and VE with the
//! exact score, every sampler at NFE ∈ {5, 10, 20, 50, 100, 1000} (the adaptive ones at a
//! range of tolerances), one line per run:
//!
//!     sampler=NAME sde=VP|VE dim=D nfe=N frechet=F sliced_w2=W floor=F0
//!
//! `frechet` and `sliced_w2` compare the samples with fresh exact samples of `p_ε`; the
//! floor `F0` is the Fréchet distance between two exact sets of the same size (each
//! config also prints a `# floor` line with the sliced-W2 floor). Every number is a mean
//! over 5 independent repeats (prior draws, exact samples, noise). Fixed-step solvers
//! whose steps cost 2 or 3 evaluations take NFE/2 or NFE/3 steps. A `# reach` line per
//! config gives the fewest evaluations at which each sampler's distance is within the
//! floor of the 1000-step Euler–Maruyama result.
//!
//! Run: `cargo run --release --example few_step` (4,000 samples; `FEW_STEP_N` overrides).

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use scoresde::metrics::{frechet_distance, sliced_w2};
use scoresde::prelude::*;
use scoresde::score::DiffusedMixture;
use scoresde::solver::{AdaptiveSde, Churn, FewStep, Method, Samples};

const NFES: [usize; 6] = [5, 10, 20, 50, 100, 1000];
const EPS: f64 = 1e-3;
const PROJECTIONS: usize = 200;

/// 3 components in 2-D; the first two have condition number 50.
fn mixture_2d() -> scoresde::Result<GaussianMixture> {
    let (c, s) = (0.6f64, 0.8f64);
    let (a, b) = (0.5, 0.01);
    let rotated = vec![
        vec![c * c * a + s * s * b, c * s * (a - b)],
        vec![c * s * (a - b), s * s * a + c * c * b],
    ];
    GaussianMixture::new(
        vec![0.3, 0.3, 0.4],
        vec![vec![-2.0, 0.0], vec![2.0, 1.0], vec![0.0, -2.0]],
        vec![
            Covariance::Full(rotated),
            Covariance::Diagonal(vec![0.02, 1.0]),
            Covariance::Isotropic(0.1),
        ],
    )
}

/// 4 components in 10-D with variances from 1 down to 0.01 (condition number 100),
/// permuted per component, means spread over a few units.
fn mixture_10d() -> scoresde::Result<GaussianMixture> {
    let d = 10;
    let variances: Vec<f64> = (0..d).map(|i| 0.01f64.powf(i as f64 / (d - 1) as f64)).collect();
    let mut means = Vec::new();
    let mut covs = Vec::new();
    for k in 0..4 {
        means.push(
            (0..d)
                .map(|i| 2.0 * (((i * 7 + k * 3) % 5) as f64 - 2.0) / 2.0)
                .collect(),
        );
        covs.push(Covariance::Diagonal(
            (0..d).map(|i| variances[(i + 3 * k) % d]).collect(),
        ));
    }
    GaussianMixture::new(vec![0.25; 4], means, covs)
}

/// One configuration: an SDE, the exact score, and `REPEATS` independent sets of prior
/// draws and exact samples; every row is a mean over the repeats.
struct Config<'a, S> {
    sde: S,
    name: &'a str,
    exact: DiffusedMixture<S>,
    /// Per repeat: prior draws and fresh exact samples of `p_ε`.
    sets: Vec<(Tensor, Tensor)>,
    dim: usize,
    floor: f64,
    rows: RefCell<Vec<(String, usize, f64)>>,
}

const REPEATS: u64 = 5;

fn run<S: Sde + Copy>(sde: S, name: &str, data: &GaussianMixture, n: usize) -> scoresde::Result<()> {
    let exact = data.diffused(sde);
    let dim = data.dim();
    let (mut sets, mut floor, mut floor_w) = (Vec::new(), 0.0, 0.0);
    for r in 0..REPEATS {
        let mut rng = StdRng::seed_from_u64(100 + r);
        let x_t = sde.sample_prior((n, dim), DType::F64, &Device::Cpu, &mut rng)?;
        let truth = exact.sample(n, EPS, DType::F64, &Device::Cpu, &mut rng)?;
        let other = exact.sample(n, EPS, DType::F64, &Device::Cpu, &mut rng)?;
        floor += frechet_distance(&truth, &other)? / REPEATS as f64;
        floor_w += sliced_w2(&truth, &other, PROJECTIONS, &mut rng)? / REPEATS as f64;
        sets.push((x_t, truth));
    }
    println!(
        "# floor sde={name} dim={dim} frechet={floor:.3e} sliced_w2={floor_w:.3e} n={n} repeats={REPEATS}"
    );
    let c = Config {
        sde,
        name,
        exact,
        sets,
        dim,
        floor,
        rows: RefCell::new(Vec::new()),
    };

    for nfe in NFES {
        c.report("euler_maruyama", &PredictorCorrector::euler_maruyama(nfe))?;
    }
    for tol in [1e-2, 1e-3, 1e-4, 1e-5] {
        c.report("rk45", &OdeSampler::new(Rk45::new(tol, tol)?))?;
    }
    let methods = [
        Method::DpmPp2M,
        Method::DpmPp3M,
        Method::SdeDpmPp2M,
        Method::DpmSolver2,
        Method::DpmSolver3,
        Method::UniPc { order: 2 },
        Method::EdmHeun(Churn::default()),
    ];
    for method in methods {
        let per_step = method.nfe(1);
        for nfe in NFES {
            let steps = (nfe / per_step).max(1);
            c.report(method.name(), &FewStep::new(method, steps)?)?;
        }
    }
    for tol in [0.05, 0.02, 0.01, 0.005, 0.002] {
        c.report("adaptive_sde", &AdaptiveSde::new(tol, tol)?)?;
    }
    c.summary();
    Ok(())
}

impl<S: Sde + Copy> Config<'_, S> {
    fn report<Sm: Sampler<S>>(&self, sampler: &str, s: &Sm) -> scoresde::Result<()> {
        let (mut f, mut w, mut nfe) = (0.0, 0.0, 0);
        for (r, (x_t, truth)) in self.sets.iter().enumerate() {
            let mut rng = StdRng::seed_from_u64(1 + r as u64);
            let out: Samples = s.sample(&self.sde, &self.exact, x_t, &mut rng)?;
            f += frechet_distance(&out.x, truth)? / REPEATS as f64;
            w += sliced_w2(&out.x, truth, PROJECTIONS, &mut rng)? / REPEATS as f64;
            nfe = nfe.max(out.stats.nfe);
        }
        println!(
            "sampler={sampler} sde={} dim={} nfe={nfe} frechet={f:.3e} sliced_w2={w:.3e} floor={:.3e}",
            self.name, self.dim, self.floor
        );
        self.rows.borrow_mut().push((sampler.to_string(), nfe, f));
        Ok(())
    }

    /// The fewest evaluations at which each sampler comes within the floor of the
    /// 1000-step Euler–Maruyama result.
    fn summary(&self) {
        let rows = self.rows.borrow();
        let Some(em) = rows.iter().find(|r| r.0 == "euler_maruyama" && r.1 == 1000) else {
            return;
        };
        let target = em.2 + self.floor;
        let mut line = format!("# reach sde={} dim={} target={target:.3e}:", self.name, self.dim);
        let mut names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        names.dedup();
        for name in names {
            let best = rows
                .iter()
                .filter(|r| r.0 == name && r.2 <= target)
                .map(|r| r.1)
                .min();
            match best {
                Some(nfe) => line += &format!(" {name}={nfe}"),
                None => line += &format!(" {name}=none"),
            }
        }
        println!("{line}");
    }
}

fn main() -> scoresde::Result<()> {
    let n = std::env::var("FEW_STEP_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    for (data, sigma_max) in [(mixture_2d()?, 10.0), (mixture_10d()?, 20.0)] {
        run(VpSde::default(), "VP", &data, n)?;
        run(VeSde::new(0.01, sigma_max)?, "VE", &data, n)?;
    }
    Ok(())
}
