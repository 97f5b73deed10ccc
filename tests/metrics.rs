//! Distances between sample sets against closed forms and brute force.

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use scoresde::metrics::{energy_distance, mmd2_unbiased, sliced_w2, w2_exact, w2_squared_exact};
use scoresde::Error;

fn gaussian(n: usize, mean: [f64; 2], std: f64, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let z = scoresde::random::standard_normal((n, 2), DType::F64, &Device::Cpu, &mut rng).unwrap();
    (z * std)
        .unwrap()
        .broadcast_add(&Tensor::new(&mean, &Device::Cpu).unwrap())
        .unwrap()
}

fn permuted(x: &Tensor, seed: u64) -> Tensor {
    let mut idx: Vec<u32> = (0..x.dim(0).unwrap() as u32).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    x.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap()
}

/// W2(N(m1, s1²I), N(m2, s2²I)) = √(|m1 − m2|² + d(s1 − s2)²) = √(9 + 2·0.25) ≈ 3.082.
/// Between two empirical sets of n = 1000 the estimate is biased upward by the sampling
/// error of each set, W2(μ_n, μ) ≈ 0.1–0.2 in 2-D; most of it cancels against the large
/// translation, so we allow 3%.
#[test]
fn w2_of_large_gaussian_samples_matches_the_closed_form() {
    let x = gaussian(1000, [0.0, 0.0], 1.0, 1);
    let y = gaussian(1000, [3.0, 0.0], 0.5, 2);
    let want = (9.0f64 + 2.0 * 0.25).sqrt();
    let got = w2_exact(&x, &y).unwrap();
    assert!((got - want).abs() < 0.03 * want, "{got} vs {want}");
    // Sliced: each direction θ gives the 1-D W2² (Δm·θ)² + (s1 − s2)², whose mean over
    // the circle is |Δm|²/2 + (s1 − s2)² = 4.75. 200 random directions: allow 5%.
    let sliced = sliced_w2(&x, &y, 200, &mut StdRng::seed_from_u64(3)).unwrap();
    let want = 4.75f64.sqrt();
    assert!((sliced - want).abs() < 0.05 * want, "sliced {sliced} vs {want}");
}

fn brute_force_w2_squared(x: &[[f64; 2]], y: &[[f64; 2]]) -> f64 {
    fn permutations(k: usize, items: &mut Vec<usize>, visit: &mut dyn FnMut(&[usize])) {
        if k == items.len() {
            visit(items);
            return;
        }
        for i in k..items.len() {
            items.swap(k, i);
            permutations(k + 1, items, visit);
            items.swap(k, i);
        }
    }
    let n = x.len();
    let mut best = f64::INFINITY;
    permutations(0, &mut (0..n).collect(), &mut |p| {
        let c: f64 = (0..n)
            .map(|i| (x[i][0] - y[p[i]][0]).powi(2) + (x[i][1] - y[p[i]][1]).powi(2))
            .sum();
        best = best.min(c / n as f64);
    });
    best
}

#[test]
fn assignment_w2_equals_brute_force_on_small_sets() {
    for seed in 0..20u64 {
        let n = 2 + (seed as usize % 6); // 2..=7
        let x = gaussian(n, [0.0, 0.0], 1.0, 100 + seed);
        let y = gaussian(n, [0.5, -0.5], 1.5, 200 + seed);
        let to_rows = |t: &Tensor| {
            t.to_vec2::<f64>()
                .unwrap()
                .into_iter()
                .map(|r| [r[0], r[1]])
                .collect::<Vec<_>>()
        };
        let want = brute_force_w2_squared(&to_rows(&x), &to_rows(&y));
        let got = w2_squared_exact(&x, &y).unwrap();
        assert!(
            (got - want).abs() < 1e-12 * want.max(1.0),
            "n={n} seed={seed}: {got} vs {want}"
        );
    }
}

#[test]
fn identical_sets_are_at_distance_zero() {
    let x = gaussian(300, [1.0, 2.0], 1.0, 4);
    assert_eq!(w2_exact(&x, &permuted(&x, 1)).unwrap(), 0.0);
    assert_eq!(
        sliced_w2(&x, &permuted(&x, 2), 20, &mut StdRng::seed_from_u64(0)).unwrap(),
        0.0
    );
    // With x = y, the cross mean includes the n zero-distance diagonal pairs while the
    // within means exclude them: energy = −(2/n)·mean_{i≠j}‖x_i − x_j‖ exactly, and
    // MMD² = (2/n)·(mean_{i≠j} k − 1).
    let n = 300.0;
    let rows = x.to_vec2::<f64>().unwrap();
    let (mut dist, mut kern, mut pairs) = (0.0, 0.0, 0.0);
    for i in 0..rows.len() {
        for j in 0..rows.len() {
            if i != j {
                let d2 = (rows[i][0] - rows[j][0]).powi(2) + (rows[i][1] - rows[j][1]).powi(2);
                dist += d2.sqrt();
                kern += (-d2 / 2.0).exp();
                pairs += 1.0;
            }
        }
    }
    let energy = energy_distance(&x, &x).unwrap();
    assert!((energy + 2.0 / n * dist / pairs).abs() < 1e-12, "{energy}");
    let mmd = mmd2_unbiased(&x, &x, Some(1.0)).unwrap();
    assert!((mmd - 2.0 / n * (kern / pairs - 1.0)).abs() < 1e-12, "{mmd}");
}

#[test]
fn every_distance_is_symmetric_and_permutation_invariant() {
    let x = gaussian(200, [0.0, 0.0], 1.0, 5);
    let y = gaussian(200, [1.0, 0.0], 0.7, 6);
    let (xp, yp) = (permuted(&x, 3), permuted(&y, 4));
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(1.0);
    let w = w2_exact(&x, &y).unwrap();
    assert!(close(w, w2_exact(&y, &x).unwrap()) && close(w, w2_exact(&xp, &yp).unwrap()));
    let sliced = |a: &Tensor, b: &Tensor| sliced_w2(a, b, 30, &mut StdRng::seed_from_u64(9)).unwrap();
    let s = sliced(&x, &y);
    assert!(close(s, sliced(&y, &x)) && close(s, sliced(&xp, &yp)));
    let m = mmd2_unbiased(&x, &y, None).unwrap();
    assert!(
        close(m, mmd2_unbiased(&y, &x, None).unwrap()) && close(m, mmd2_unbiased(&xp, &yp, None).unwrap())
    );
    let e = energy_distance(&x, &y).unwrap();
    assert!(close(e, energy_distance(&y, &x).unwrap()) && close(e, energy_distance(&xp, &yp).unwrap()));
}

/// For two samples of one distribution the unbiased MMD² is centered at 0 with standard
/// deviation O(1/n) (≈ 3e-3 here); a shift of one standard deviation gives ≈ 0.2.
#[test]
fn mmd_separates_different_distributions() {
    let a = gaussian(500, [0.0, 0.0], 1.0, 7);
    let b = gaussian(500, [0.0, 0.0], 1.0, 8);
    let c = gaussian(500, [1.0, 0.0], 1.0, 9);
    let same = mmd2_unbiased(&a, &b, None).unwrap();
    let different = mmd2_unbiased(&a, &c, None).unwrap();
    assert!(same.abs() < 0.01, "{same}");
    assert!(different > 0.1, "{different}");
    assert!(energy_distance(&a, &b).unwrap().abs() < 0.05);
    assert!(energy_distance(&a, &c).unwrap() > 0.3);
}

#[test]
fn bad_point_sets_are_errors() {
    let x = gaussian(10, [0.0, 0.0], 1.0, 10);
    let y = gaussian(12, [0.0, 0.0], 1.0, 11);
    assert!(matches!(w2_exact(&x, &y), Err(Error::Shape(_))));
    assert!(matches!(
        sliced_w2(&x, &y, 5, &mut StdRng::seed_from_u64(0)),
        Err(Error::Shape(_))
    ));
    assert!(mmd2_unbiased(&x, &y, None).is_ok()); // unequal sizes are fine here
    let empty = Tensor::zeros((0, 2), DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(w2_exact(&empty, &empty), Err(Error::Shape(_))));
    assert!(matches!(energy_distance(&empty, &x), Err(Error::Shape(_))));
    let nan = Tensor::new(&[[f64::NAN, 0.0], [0.0, 0.0]], &Device::Cpu).unwrap();
    assert!(matches!(mmd2_unbiased(&nan, &x, None), Err(Error::NonFinite(_))));
    assert!(matches!(
        w2_exact(&nan, &x.narrow(0, 0, 2).unwrap()),
        Err(Error::NonFinite(_))
    ));
    let wrong_rank = Tensor::zeros(5, DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(w2_exact(&wrong_rank, &wrong_rank), Err(Error::Shape(_))));
    let three_d = Tensor::zeros((10, 3), DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(energy_distance(&x, &three_d), Err(Error::Shape(_))));
    assert!(matches!(
        mmd2_unbiased(&x, &y, Some(-1.0)),
        Err(Error::InvalidParameter(_))
    ));
    assert!(matches!(
        sliced_w2(&x, &x, 0, &mut StdRng::seed_from_u64(0)),
        Err(Error::InvalidParameter(_))
    ));
    let single = x.narrow(0, 0, 1).unwrap();
    assert!(matches!(
        mmd2_unbiased(&single, &x, None),
        Err(Error::InvalidParameter(_))
    ));
}

mod gap {
    use super::*;
    use scoresde::autodiff::Divergence;
    use scoresde::metrics::GapReport;
    use scoresde::regularizer::{ScoreFpe, TimeDerivative};
    use scoresde::score::{Covariance, GaussianMixture};
    use scoresde::sde::VpSde;
    use scoresde::solver::{OdeSampler, PredictorCorrector, Rk45};
    use scoresde::{Result, ScoreModel};

    fn data() -> GaussianMixture {
        GaussianMixture::new(
            vec![0.5, 0.5],
            vec![vec![-1.5, 0.0], vec![1.5, 0.0]],
            vec![Covariance::Isotropic(0.1), Covariance::Isotropic(0.1)],
        )
        .unwrap()
    }

    /// The exact score sharpened by 30%: the ODE and the SDE now disagree, because the
    /// SDE's noise partially corrects score errors that the ODE transports unchanged.
    struct Sharpened<M>(M);
    impl<M: ScoreModel> ScoreModel for Sharpened<M> {
        fn score(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
            Ok((self.0.score(x, t)? * 1.3)?)
        }
    }

    /// n = 300, 500 EM steps: with the exact score every W2 is ≈ 0.12–0.18 (sampling noise
    /// of 300 points plus EM discretization), so "small" is 0.25. The sharpened score
    /// pulls the ODE samples into the modes (measured: gap ≈ 0.35, W2(ODE, data) ≈ 0.49)
    /// while the SDE's noise partly repairs it (W2(SDE, data) ≈ 0.35): we assert the gap
    /// grows by half and that the ODE ends further from the data than the SDE.
    #[test]
    fn the_gap_is_small_for_the_exact_score_and_not_for_a_wrong_one() {
        let sde = VpSde::default();
        let exact = data().diffused(sde);
        let mut rng = StdRng::seed_from_u64(0);
        let points = data().sample(300, DType::F64, &Device::Cpu, &mut rng).unwrap();
        let report = GapReport::new(
            OdeSampler::new(Rk45::default()),
            PredictorCorrector::euler_maruyama(500),
        );
        let fpe = ScoreFpe::new()
            .with_divergence(Divergence::Exact)
            .unwrap()
            .with_time_derivative(TimeDerivative::Autodiff)
            .unwrap();
        let good = report
            .measure_with_residual(&sde, &exact, &fpe, 1e-2, &points, &mut rng)
            .unwrap();
        assert!(
            good.w2_ode_sde < 0.25 && good.w2_ode_data < 0.25 && good.w2_sde_data < 0.25,
            "{good:?}"
        );
        assert!(good.fp_residual.unwrap() < 1e-10, "{good:?}");

        let wrong = Sharpened(exact);
        let bad = report
            .measure_with_residual(&sde, &wrong, &fpe, 1e-2, &points, &mut rng)
            .unwrap();
        assert!(
            bad.w2_ode_sde > 0.3 && bad.w2_ode_sde > 1.5 * good.w2_ode_sde,
            "{bad:?} vs {good:?}"
        );
        assert!(bad.w2_ode_data > bad.w2_sde_data + 0.05, "{bad:?}");
        assert!(bad.fp_residual.unwrap() > 1e-3, "{bad:?}");
    }

    #[test]
    fn bad_data_is_an_error() {
        let sde = VpSde::default();
        let exact = data().diffused(sde);
        let report = GapReport::new(
            OdeSampler::new(Rk45::default()),
            PredictorCorrector::euler_maruyama(10),
        );
        let mut rng = StdRng::seed_from_u64(0);
        let nan = Tensor::new(&[[f64::NAN, 0.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        assert!(matches!(
            report.measure(&sde, &exact, &nan, &mut rng),
            Err(Error::NonFinite(_))
        ));
        let empty = Tensor::zeros((0, 2), DType::F64, &Device::Cpu).unwrap();
        assert!(matches!(
            report.measure(&sde, &exact, &empty, &mut rng),
            Err(Error::Shape(_))
        ));
    }
}

mod histogram {
    use super::*;
    use rand::Rng;
    use scoresde::metrics::{histogram_w2, Grid, Histogram};

    /// `n` points at random cell centres of `grid` (2-D), many of them sharing a cell.
    fn at_centres(grid: &Grid, n: usize, spread: usize, seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let v: Vec<f64> = (0..2 * n)
            .map(|_| grid.centre(rng.random_range(0..spread)))
            .collect();
        Tensor::from_vec(v, (n, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn identical_sets_are_at_distance_zero() {
        let x = gaussian(500, [0.0, 0.0], 1.0, 20);
        assert_eq!(histogram_w2(&x, &x, &Grid::deveney()).unwrap(), 0.0);
        // Same histogram, different points: still zero.
        assert_eq!(histogram_w2(&x, &permuted(&x, 3), &Grid::deveney()).unwrap(), 0.0);
    }

    #[test]
    fn a_shifted_point_mass_moves_by_the_shift() {
        let grid = Grid::new(-2.0, 2.0, 16).unwrap(); // h = 0.25
        let h = grid.cell_width();
        for k in 0..6 {
            let x = Tensor::new(&[[grid.centre(3), grid.centre(5)]], &Device::Cpu).unwrap();
            let y = Tensor::new(&[[grid.centre(3 + k), grid.centre(5)]], &Device::Cpu).unwrap();
            let w2 = histogram_w2(&x, &y, &grid).unwrap();
            assert!((w2 - k as f64 * h).abs() < 1e-12, "k = {k}: {w2}");
        }
    }

    /// With every point at a cell centre binning changes nothing, so the histogram W2 must
    /// equal the exact assignment W2 of the point sets, whatever the multiplicities (the
    /// heavily degenerate case for the network simplex).
    #[test]
    fn points_at_cell_centres_give_the_assignment_w2() {
        let grid = Grid::new(-3.0, 3.0, 24).unwrap();
        for seed in 0..8 {
            let spread = [3, 6, 24][seed as usize % 3];
            let x = at_centres(&grid, 60, spread, 100 + seed);
            let y = at_centres(&grid, 60, spread, 200 + seed);
            let hist = histogram_w2(&x, &y, &grid).unwrap().powi(2);
            let exact = w2_squared_exact(&x, &y).unwrap();
            assert!(
                (hist - exact).abs() < 1e-9 * exact.max(1.0),
                "seed {seed}: {hist} vs {exact}"
            );
        }
    }

    #[test]
    fn it_is_symmetric_and_permutation_invariant_and_takes_unequal_sizes() {
        let grid = Grid::new(-4.0, 4.0, 32).unwrap();
        let x = gaussian(700, [0.0, 0.0], 1.0, 30);
        let y = gaussian(400, [1.0, -0.5], 0.7, 31);
        let xy = histogram_w2(&x, &y, &grid).unwrap();
        assert_eq!(xy, histogram_w2(&y, &x, &grid).unwrap());
        assert_eq!(
            xy,
            histogram_w2(&permuted(&x, 1), &permuted(&y, 2), &grid).unwrap()
        );
        // Close to the assignment W2 between equal-size subsets of the same laws: binning
        // moves each point by at most √2·h/2 ≈ 0.18, and both are ~1.1 (closed form
        // √(1.25 + 2·0.09) ≈ 1.20, less the finite-sample bias).
        let exact = w2_exact(&x.narrow(0, 0, 400).unwrap(), &y).unwrap();
        assert!((xy - exact).abs() < 0.18, "{xy} vs {exact}");
    }

    /// W2(N(0, I), N((1, 0), I)) = 1 in closed form. 20,000 samples each on a 64 × 64 grid:
    /// the sampling error of the two histograms (~0.1 in W2 for 2-D sets of this size,
    /// mostly cancelling against the unit shift) and the binning (h = 0.125) allow 0.05.
    #[test]
    fn histogram_w2_of_shifted_gaussians_matches_the_closed_form() {
        let x = gaussian(20_000, [0.0, 0.0], 1.0, 40);
        let y = gaussian(20_000, [1.0, 0.0], 1.0, 41);
        let w2 = histogram_w2(&x, &y, &Grid::deveney()).unwrap();
        assert!((w2 - 1.0).abs() < 0.05, "{w2}");
    }

    #[test]
    fn bad_input_is_an_error() {
        let grid = Grid::deveney();
        let x = gaussian(10, [0.0, 0.0], 1.0, 50);
        let empty = Tensor::zeros((0, 2), DType::F64, &Device::Cpu).unwrap();
        assert!(matches!(histogram_w2(&empty, &x, &grid), Err(Error::Shape(_))));
        let nan = Tensor::new(&[[f64::NAN, 0.0]], &Device::Cpu).unwrap();
        assert!(matches!(histogram_w2(&x, &nan, &grid), Err(Error::NonFinite(_))));
        let three_d = Tensor::zeros((10, 3), DType::F64, &Device::Cpu).unwrap();
        assert!(matches!(histogram_w2(&x, &three_d, &grid), Err(Error::Shape(_))));
        for (lo, hi, bins) in [(1.0, -1.0, 8), (0.0, 0.0, 8), (f64::NAN, 1.0, 8), (0.0, 1.0, 0)] {
            assert!(matches!(Grid::new(lo, hi, bins), Err(Error::InvalidParameter(_))));
        }
        let a = Histogram::new(&x, grid).unwrap();
        let b = Histogram::new(&x, Grid::new(-4.0, 4.0, 32).unwrap()).unwrap();
        assert!(matches!(a.w2_squared(&b), Err(Error::InvalidParameter(_))));
        let wide = Tensor::zeros((2, 20), DType::F64, &Device::Cpu).unwrap();
        assert!(matches!(
            Histogram::new(&wide, grid),
            Err(Error::InvalidParameter(_))
        ));
    }
}
