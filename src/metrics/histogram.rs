//! W2 between histograms on a regular grid, as Deveney et al. (2025) measure the ODE–SDE
//! gap: bin millions of samples, then transport one histogram onto the other exactly.

use std::collections::HashMap;

use candle_core::Tensor;

use super::{transport, Points};
use crate::error::ensure;
use crate::{Error, Result};

/// A regular grid over the box `[lo, hi]^d`: `bins` equal cells per axis, of width
/// `h = (hi − lo) / bins`, centred at `lo + (k + ½)·h`.
///
/// Points are binned to the nearest cell centre; points outside the box go to the nearest
/// edge cell (counted by [`Histogram::outside`]).
///
/// ```
/// use scoresde::metrics::Grid;
/// let grid = Grid::new(-4.0, 4.0, 64)?;
/// assert_eq!(grid.cell_width(), 0.125);
/// assert_eq!(grid.centre(0), -3.9375);
/// assert!(Grid::new(1.0, -1.0, 64).is_err());
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    lo: f64,
    hi: f64,
    bins: usize,
}

impl Grid {
    /// The grid of `bins` cells per axis over `[lo, hi]`. Errors unless `lo < hi` are
    /// finite and `1 ≤ bins ≤ 65,536`.
    pub fn new(lo: f64, hi: f64, bins: usize) -> Result<Self> {
        ensure(
            lo.is_finite() && hi.is_finite() && lo < hi && (hi - lo).is_finite(),
            || format!("a grid needs finite bounds lo < hi with a finite width hi - lo, got [{lo}, {hi}]"),
        )?;
        ensure((1..=65_536).contains(&bins), || {
            format!("a grid needs 1 to 65,536 bins per axis, got {bins}")
        })?;
        Ok(Self { lo, hi, bins })
    }

    /// The 64 × 64 grid over `[−4, 4]²` on which Deveney et al. (2025) compute their W2
    /// figures (their samples were binned over `[−3.5, 3.5]²`; see `MATH.md` §8).
    ///
    /// ```
    /// assert_eq!(scoresde::metrics::Grid::deveney().bins(), 64);
    /// ```
    pub fn deveney() -> Self {
        Self {
            lo: -4.0,
            hi: 4.0,
            bins: 64,
        }
    }

    /// The grid whose cell centres are the `nodes` evenly spaced points from `lo` to `hi`
    /// inclusive (NumPy's `linspace(lo, hi, nodes)`), so that binning a point to its cell
    /// is binning it to its nearest node: the box is `[lo − h/2, hi + h/2]` with
    /// `h = (hi − lo)/(nodes − 1)`. Deveney et al. (2025) bin on `Grid::nodes(−3.5, 3.5, 64)`
    /// and take transport costs on `Grid::nodes(−4, 4, 64)` (see [`Histogram::with_grid`]).
    /// Errors unless `lo < hi` are finite and `2 ≤ nodes ≤ 65,536`.
    ///
    /// ```
    /// use scoresde::metrics::Grid;
    /// let grid = Grid::nodes(-3.5, 3.5, 64)?;
    /// assert!((grid.centre(0) + 3.5).abs() < 1e-12 && (grid.centre(63) - 3.5).abs() < 1e-12);
    /// assert!((grid.cell_width() - 1.0 / 9.0).abs() < 1e-12);
    /// assert!(Grid::nodes(0.0, 1.0, 1).is_err());
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn nodes(lo: f64, hi: f64, nodes: usize) -> Result<Self> {
        ensure(nodes >= 2, || {
            format!("a grid of nodes needs at least 2 nodes, got {nodes}")
        })?;
        Grid::new(lo, hi, nodes)?;
        let half = (hi - lo) / (nodes - 1) as f64 / 2.0;
        Grid::new(lo - half, hi + half, nodes)
    }

    /// Cells per axis.
    pub fn bins(&self) -> usize {
        self.bins
    }

    /// The width `h` of a cell.
    pub fn cell_width(&self) -> f64 {
        (self.hi - self.lo) / self.bins as f64
    }

    /// The centre of cell `k` along any axis.
    pub fn centre(&self, k: usize) -> f64 {
        self.lo + (k as f64 + 0.5) * self.cell_width()
    }

    /// The cell of coordinate `v` (nearest centre, clamped to the grid), and whether `v`
    /// lay outside `[lo, hi]`.
    fn cell(&self, v: f64) -> (u32, bool) {
        let k = ((v - self.lo) / self.cell_width()).floor();
        let outside = v < self.lo || v > self.hi;
        (k.clamp(0.0, (self.bins - 1) as f64) as u32, outside)
    }
}

/// The counts of a point set on a [`Grid`]: only occupied cells are stored, so fine grids
/// in a few dimensions stay cheap.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::metrics::{Grid, Histogram};
/// let x = Tensor::new(&[[0.1f64, 0.1], [0.2, 0.3], [-0.9, 5.0]], &Device::Cpu)?;
/// let h = Histogram::new(&x, Grid::new(-1.0, 1.0, 4)?)?;
/// assert_eq!((h.total(), h.occupied(), h.outside()), (3, 2, 1));
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Histogram {
    grid: Grid,
    dim: usize,
    /// Cell coordinates of the occupied cells, `dim` per cell, in a fixed (sorted) order.
    cells: Vec<u32>,
    counts: Vec<u64>,
    outside: usize,
}

impl Histogram {
    /// Bins the points `x` (shape `[N, d]`) on `grid`. Errors on an empty or non-finite set
    /// and on a grid with more than 2⁶⁴ cells in `d` dimensions.
    pub fn new(x: &Tensor, grid: Grid) -> Result<Self> {
        let points = Points::read(x, "x")?;
        let dim = points.d;
        let bins = grid.bins as u64;
        ensure(bins.checked_pow(dim as u32).is_some(), || {
            format!("a grid of {bins} bins per axis has too many cells in {dim} dimensions")
        })?;
        let mut counts: HashMap<u64, u64> = HashMap::new();
        let mut outside = 0;
        for i in 0..points.n {
            let mut key = 0u64;
            let mut out = false;
            for &v in points.row(i) {
                let (k, o) = grid.cell(v);
                key = key * bins + k as u64;
                out |= o;
            }
            outside += out as usize;
            *counts.entry(key).or_insert(0) += 1;
        }
        let mut occupied: Vec<(u64, u64)> = counts.into_iter().collect();
        occupied.sort_unstable();
        let mut cells = vec![0u32; occupied.len() * dim];
        for (c, &(mut key, _)) in occupied.iter().enumerate() {
            for axis in (0..dim).rev() {
                cells[c * dim + axis] = (key % bins) as u32;
                key /= bins;
            }
        }
        Ok(Self {
            grid,
            dim,
            cells,
            counts: occupied.into_iter().map(|(_, count)| count).collect(),
            outside,
        })
    }

    /// A histogram from counts on every cell of `grid` in `dim` dimensions, in C order of an
    /// array indexed `[k₀, k₁, …]` (the first coordinate's cell slowest); `counts` has
    /// `bins^dim` entries and a positive total. Use it for histograms binned elsewhere,
    /// such as Deveney et al.'s released ones (NumPy's `meshgrid` order is `[k₁, k₀]`
    /// in two dimensions: transpose first).
    ///
    /// ```
    /// use scoresde::metrics::{Grid, Histogram};
    /// let grid = Grid::new(0.0, 2.0, 2)?;
    /// // Cells (0, 0), (0, 1), (1, 0), (1, 1): three points at (0.5, 1.5), one at (1.5, 0.5).
    /// let h = Histogram::from_counts(grid, 2, &[0, 3, 1, 0])?;
    /// assert_eq!(h.cells(), vec![(vec![0.5, 1.5], 0.75), (vec![1.5, 0.5], 0.25)]);
    /// assert!(Histogram::from_counts(grid, 2, &[1, 2, 3]).is_err());
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn from_counts(grid: Grid, dim: usize, counts: &[u64]) -> Result<Self> {
        ensure(dim >= 1, || "a histogram needs at least one dimension".into())?;
        let expected = (grid.bins as u64)
            .checked_pow(dim as u32)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                Error::InvalidParameter(format!(
                    "a grid of {} bins per axis has too many cells in {dim} dimensions",
                    grid.bins
                ))
            })?;
        ensure(counts.len() == expected, || {
            format!(
                "{dim}-D counts on {} bins per axis need {expected} entries, got {}",
                grid.bins,
                counts.len()
            )
        })?;
        let total = counts.iter().try_fold(0u64, |sum, &c| sum.checked_add(c));
        ensure(matches!(total, Some(t) if t > 0), || {
            "the counts must have a positive total that fits in 64 bits".into()
        })?;
        let mut cells = Vec::new();
        let mut kept = Vec::new();
        for (index, &count) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
            let mut rest = index;
            let start = cells.len();
            cells.resize(start + dim, 0);
            for axis in (0..dim).rev() {
                cells[start + axis] = (rest % grid.bins) as u32;
                rest /= grid.bins;
            }
            kept.push(count);
        }
        Ok(Self {
            grid,
            dim,
            cells,
            counts: kept,
            outside: 0,
        })
    }

    /// The same counts with cell `k` of its grid placed at cell `k` of `grid` (which must
    /// have as many bins): transport costs are then taken in `grid`'s geometry. Deveney et
    /// al. (2025) bin on `Grid::nodes(−3.5, 3.5, 64)` but compute costs on
    /// `Grid::nodes(−4, 4, 64)`, which scales every W2² by `(8/7)²`.
    ///
    /// ```
    /// use scoresde::metrics::{Grid, Histogram};
    /// let (binned, costs) = (Grid::nodes(-3.5, 3.5, 64)?, Grid::nodes(-4.0, 4.0, 64)?);
    /// let x = Histogram::from_counts(binned, 1, &[1; 64])?;
    /// let mut one = vec![0; 64];
    /// one[0] = 64;
    /// let y = Histogram::from_counts(binned, 1, &one)?;
    /// let ratio = x.with_grid(costs)?.w2_squared(&y.with_grid(costs)?)? / x.w2_squared(&y)?;
    /// assert!((ratio - (8.0f64 / 7.0).powi(2)).abs() < 1e-12);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn with_grid(&self, grid: Grid) -> Result<Self> {
        ensure(grid.bins == self.grid.bins, || {
            format!(
                "with_grid needs a grid of the same {} bins per axis, got {}",
                self.grid.bins, grid.bins
            )
        })?;
        Ok(Self { grid, ..self.clone() })
    }

    /// The grid it was binned on.
    pub fn grid(&self) -> Grid {
        self.grid
    }

    /// The number of points binned.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The number of non-empty cells.
    pub fn occupied(&self) -> usize {
        self.counts.len()
    }

    /// The number of points that lay outside the grid's box (binned to an edge cell).
    pub fn outside(&self) -> usize {
        self.outside
    }

    /// The occupied cells: each cell's centre and the fraction of the points in it.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use scoresde::metrics::{Grid, Histogram};
    /// let x = Tensor::new(&[[0.1f64], [0.2], [0.9]], &Device::Cpu)?;
    /// let cells = Histogram::new(&x, Grid::new(0.0, 1.0, 2)?)?.cells();
    /// assert_eq!(cells, vec![(vec![0.25], 2.0 / 3.0), (vec![0.75], 1.0 / 3.0)]);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn cells(&self) -> Vec<(Vec<f64>, f64)> {
        let total = self.total() as f64;
        self.counts
            .iter()
            .enumerate()
            .map(|(c, &count)| {
                let centre = self.cells[c * self.dim..(c + 1) * self.dim]
                    .iter()
                    .map(|&k| self.grid.centre(k as usize))
                    .collect();
                (centre, count as f64 / total)
            })
            .collect()
    }

    /// The squared 2-Wasserstein distance between the two histograms as distributions
    /// (each normalized to mass 1, all mass at the cell centres), by exact optimal
    /// transport between the occupied cells. Errors if the histograms were binned on
    /// different grids or in different dimensions.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use scoresde::metrics::{Grid, Histogram};
    /// let grid = Grid::new(0.0, 4.0, 4)?; // cells of width 1
    /// let x = Histogram::new(&Tensor::new(&[[0.5f64], [0.5], [1.5]], &Device::Cpu)?, grid)?;
    /// let y = Histogram::new(&Tensor::new(&[[1.5f64], [3.5]], &Device::Cpu)?, grid)?;
    /// // Mass 2/3 at 0.5 and 1/3 at 1.5 onto 1/2 at 1.5 and 1/2 at 3.5, in quantile order:
    /// // 1/2 moves 0.5 → 1.5, 1/6 moves 0.5 → 3.5 and 1/3 moves 1.5 → 3.5.
    /// let expected = 0.5 * 1.0 + 9.0 / 6.0 + 4.0 / 3.0;
    /// assert!((x.w2_squared(&y)? - expected).abs() < 1e-12);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn w2_squared(&self, other: &Histogram) -> Result<f64> {
        let h = self.grid.cell_width();
        let w2 = self.w2_squared_in_cells(other)? * h * h;
        if w2.is_finite() {
            Ok(w2)
        } else {
            Err(Error::NonFinite(format!(
                "W2² = {w2} overflows f64 with cells of width {h:e}; use histogram_w2 (its square root)"
            )))
        }
    }

    /// [`Self::w2_squared`] in squared cell widths, so that no intermediate overflows.
    fn w2_squared_in_cells(&self, other: &Histogram) -> Result<f64> {
        if self.grid != other.grid {
            return Err(Error::InvalidParameter(format!(
                "histograms on different grids: {:?} and {:?}",
                self.grid, other.grid
            )));
        }
        if self.dim != other.dim {
            return Err(Error::Shape(format!(
                "histograms of {}-D and {}-D points",
                self.dim, other.dim
            )));
        }
        // Integer masses with equal totals: cross-multiply by the other set's size.
        let (nx, ny) = (self.total(), other.total());
        let g = gcd(nx, ny);
        let scale = |counts: &[u64], by: u64| -> Result<Vec<i64>> {
            counts
                .iter()
                .map(|&c| {
                    c.checked_mul(by)
                        .and_then(|v| i64::try_from(v).ok())
                        .ok_or_else(|| {
                            Error::InvalidParameter("too many points for exact histogram transport".into())
                        })
                })
                .collect()
        };
        let supply = scale(&self.counts, ny / g)?;
        let demand = scale(&other.counts, nx / g)?;
        let d = self.dim;
        // Cost in squared cell units: integers, so the transport is solved exactly.
        let cost = |i: usize, j: usize| -> i64 {
            let (a, b) = (&self.cells[i * d..(i + 1) * d], &other.cells[j * d..(j + 1) * d]);
            a.iter()
                .zip(b)
                .map(|(&u, &v)| {
                    let diff = u as i64 - v as i64;
                    diff * diff
                })
                .sum()
        };
        let plan = transport::solve(&supply, &demand, cost)?;
        let mass = (nx / g) as f64 * ny as f64;
        Ok(plan.cost as f64 / mass)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The 2-Wasserstein distance between the histograms of `x` and `y` on `grid` (shapes
/// `[N, d]` and `[M, d]`; sizes may differ): `√` of [`Histogram::w2_squared`].
///
/// This is how Deveney et al. (2025) compare millions of samples, where the exact
/// point-set [`w2_exact`](super::w2_exact) is out of reach; binning moves each point by at
/// most half a cell diagonal, so the result is within `√d·h/2` of the W2 between the
/// point sets themselves.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoresde::metrics::{histogram_w2, Grid};
/// let x = Tensor::new(&[[0.0f64, 0.0], [1.0, 1.0]], &Device::Cpu)?;
/// let y = (&x + 0.5)?; // every point moves by (0.5, 0.5)
/// let w2 = histogram_w2(&x, &y, &Grid::new(-4.0, 4.0, 64)?)?;
/// assert!((w2 - 0.5f64.hypot(0.5)).abs() < 1e-12);
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn histogram_w2(x: &Tensor, y: &Tensor, grid: &Grid) -> Result<f64> {
    let cells = Histogram::new(x, *grid)?.w2_squared_in_cells(&Histogram::new(y, *grid)?)?;
    Ok(cells.sqrt() * grid.cell_width())
}
