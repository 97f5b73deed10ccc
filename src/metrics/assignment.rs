//! The linear assignment problem, solved exactly.

/// The permutation `π` minimizing `Σ_i cost[i·n + π(i)]` for a dense `n × n` cost matrix,
/// by shortest augmenting paths with dual potentials (the Hungarian method in the form of
/// Jonker & Volgenant / e-maxx): `n` augmentations of `O(n²)` each.
pub(crate) fn solve(cost: &[f64], n: usize) -> Vec<usize> {
    // 1-based potentials and matching, with index 0 as the virtual start column.
    let mut u = vec![0.0; n + 1];
    let mut v = vec![0.0; n + 1];
    let mut row_of_col = vec![0usize; n + 1];
    let mut way = vec![0usize; n + 1];
    let mut min_slack = vec![f64::INFINITY; n + 1];
    let mut used = vec![false; n + 1];
    for row in 1..=n {
        row_of_col[0] = row;
        let mut col = 0;
        min_slack.fill(f64::INFINITY);
        used.fill(false);
        loop {
            used[col] = true;
            let i = row_of_col[col];
            let mut delta = f64::INFINITY;
            let mut next = 0;
            let costs = &cost[(i - 1) * n..i * n];
            for j in 1..=n {
                if !used[j] {
                    let slack = costs[j - 1] - u[i] - v[j];
                    if slack < min_slack[j] {
                        min_slack[j] = slack;
                        way[j] = col;
                    }
                    if min_slack[j] < delta {
                        delta = min_slack[j];
                        next = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[row_of_col[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_slack[j] -= delta;
                }
            }
            col = next;
            if row_of_col[col] == 0 {
                break;
            }
        }
        // Flip the augmenting path.
        loop {
            let prev = way[col];
            row_of_col[col] = row_of_col[prev];
            col = prev;
            if col == 0 {
                break;
            }
        }
    }
    let mut col_of_row = vec![0; n];
    for j in 1..=n {
        col_of_row[row_of_col[j] - 1] = j - 1;
    }
    col_of_row
}
