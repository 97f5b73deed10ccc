//! Exact optimal transport between two discrete measures with integer masses: the network
//! simplex on the complete bipartite graph (supplies → demands), after LEMON's
//! `NetworkSimplex` (Kovács 2015), the solver behind POT's `ot.emd`.
//!
//! Integer masses and integer costs keep every comparison exact, and the strongly feasible
//! spanning-tree rule for the leaving arc rules out cycling on the (very) degenerate
//! transportation problems that histograms give, so the solver always terminates at an
//! optimum.

use crate::{Error, Result};

/// An optimal transport plan: the total cost `Σ flow · cost` and the nonzero flows
/// `(supply index, demand index, mass)`.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) cost: i128,
    pub(crate) flows: Vec<(usize, usize, i64)>,
}

/// Sentinel for "no node".
const NONE: usize = usize::MAX;

/// Moves the masses `supply` onto the masses `demand` (equal totals, every mass > 0) at the
/// least total cost, where moving one unit from supply `i` to demand `j` costs
/// `cost(i, j) ≥ 0`.
///
/// Nodes `0..m` are the supplies, `m..m+n` the demands and `m+n` an artificial root joined
/// to every node by an artificial arc; those arcs form the initial spanning tree and their
/// cost is high enough that none carries flow at the optimum.
pub(crate) fn solve(supply: &[i64], demand: &[i64], cost: impl Fn(usize, usize) -> i64) -> Result<Plan> {
    let (m, n) = (supply.len(), demand.len());
    let internal = |what: &str| Error::InvalidParameter(format!("optimal transport: {what}"));
    if m == 0 || n == 0 {
        return Err(internal("both measures need at least one point"));
    }
    if supply.iter().chain(demand).any(|&v| v <= 0) {
        return Err(internal("every mass must be positive"));
    }
    let total: i128 = supply.iter().map(|&v| v as i128).sum();
    if total != demand.iter().map(|&v| v as i128).sum::<i128>() {
        return Err(internal("the two measures have different total masses"));
    }

    let root = m + n;
    let real_arcs = m * n;
    // Larger than any path of real arcs: a node's potential never exceeds (m+n)·max cost.
    let mut max_cost = 0i64;
    for i in 0..m {
        for j in 0..n {
            max_cost = max_cost.max(cost(i, j));
        }
    }
    let art_cost = (max_cost + 1)
        .checked_mul(root as i64 + 1)
        .ok_or_else(|| internal("costs too large"))?;
    // Arc `e < m·n` runs from supply `e / n` to demand `e % n`; arc `m·n + u` is the
    // artificial arc of node `u` (u → root for supplies, root → u for demands).
    let arc_cost = |e: usize| -> i64 {
        if e < real_arcs {
            cost(e / n, e % n)
        } else if e - real_arcs < m {
            0
        } else {
            art_cost
        }
    };

    // The spanning tree, rooted at `root`: each node's parent, the arc to it, whether that
    // arc points up (node → parent), its flow, the node's depth and potential.
    let nodes = m + n + 1;
    let mut parent = vec![root; nodes];
    let mut pred_arc: Vec<usize> = (0..nodes).map(|u| real_arcs + u).collect();
    let mut pred_up: Vec<bool> = (0..nodes).map(|u| u < m).collect();
    let mut flow: Vec<i64> = (0..nodes)
        .map(|u| match u {
            u if u < m => supply[u],
            u if u < root => demand[u - m],
            _ => 0,
        })
        .collect();
    let mut depth = vec![1usize; nodes];
    let mut pi: Vec<i64> = (0..nodes)
        .map(|u| if u < m || u == root { 0 } else { art_cost })
        .collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); nodes];
    children[root] = (0..root).collect();
    parent[root] = NONE;
    depth[root] = 0;

    // Block search pricing (LEMON's default): scan blocks of ~√(m·n) arcs, enter the most
    // negative reduced cost of the first block that has one.
    let block = ((real_arcs as f64).sqrt() as usize).clamp(10.min(real_arcs), real_arcs);
    let mut next = 0usize;
    let mut stack = Vec::new();
    loop {
        let mut best = NONE;
        let mut best_cost = 0i64;
        let mut left = block;
        let (mut i, mut j) = (next / n, next % n);
        for _ in 0..real_arcs {
            let reduced = cost(i, j) + pi[i] - pi[m + j];
            if reduced < best_cost {
                best_cost = reduced;
                best = i * n + j;
            }
            j += 1;
            if j == n {
                j = 0;
                i += 1;
                if i == m {
                    i = 0;
                }
            }
            left -= 1;
            if left == 0 {
                if best != NONE {
                    break;
                }
                left = block;
            }
        }
        next = i * n + j;
        if best == NONE {
            break; // no arc with negative reduced cost: optimal
        }

        // The cycle: the entering arc first → second plus the tree path back to the join.
        let (first, second) = (best / n, m + best % n);
        let (mut a, mut b) = (first, second);
        while a != b {
            match depth[a].cmp(&depth[b]) {
                std::cmp::Ordering::Greater => a = parent[a],
                std::cmp::Ordering::Less => b = parent[b],
                std::cmp::Ordering::Equal => (a, b) = (parent[a], parent[b]),
            }
        }
        let join = a;

        // Leaving arc: the last blocking arc met when walking the cycle in its direction
        // from the join (keeps the tree strongly feasible: no cycling).
        let mut delta = i64::MAX;
        let mut leaving = NONE;
        let mut on_first_side = true;
        let mut u = first;
        while u != join {
            if pred_up[u] && flow[u] < delta {
                delta = flow[u];
                leaving = u;
            }
            u = parent[u];
        }
        let mut u = second;
        while u != join {
            if !pred_up[u] && flow[u] <= delta {
                delta = flow[u];
                leaving = u;
                on_first_side = false;
            }
            u = parent[u];
        }
        if leaving == NONE {
            return Err(internal("unbounded problem (negative cost cycle); this is a bug"));
        }
        if delta > 0 {
            let mut u = first;
            while u != join {
                flow[u] += if pred_up[u] { -delta } else { delta };
                u = parent[u];
            }
            let mut u = second;
            while u != join {
                flow[u] += if pred_up[u] { delta } else { -delta };
                u = parent[u];
            }
        }

        // Re-hang the subtree cut off by the leaving arc from the entering arc: the path
        // from its end inside that subtree up to `leaving` reverses direction.
        let (u_in, v_in) = if on_first_side {
            (first, second)
        } else {
            (second, first)
        };
        let (mut u, mut new_parent, mut new_arc, mut new_flow, mut new_up) =
            (u_in, v_in, best, delta, u_in == first);
        loop {
            let (old_parent, old_arc, old_flow, old_up) = (parent[u], pred_arc[u], flow[u], pred_up[u]);
            let siblings = &mut children[old_parent];
            if let Some(k) = siblings.iter().position(|&c| c == u) {
                siblings.swap_remove(k);
            }
            parent[u] = new_parent;
            children[new_parent].push(u);
            pred_arc[u] = new_arc;
            flow[u] = new_flow;
            pred_up[u] = new_up;
            if u == leaving {
                break;
            }
            (new_parent, new_arc, new_flow, new_up) = (u, old_arc, old_flow, !old_up);
            u = old_parent;
        }
        // Depths and potentials (reduced cost 0 on tree arcs) of the moved subtree.
        stack.push(u_in);
        while let Some(u) = stack.pop() {
            let p = parent[u];
            depth[u] = depth[p] + 1;
            let c = arc_cost(pred_arc[u]);
            pi[u] = if pred_up[u] { pi[p] - c } else { pi[p] + c };
            stack.extend_from_slice(&children[u]);
        }
    }

    let mut plan = Plan {
        cost: 0,
        flows: Vec::new(),
    };
    for u in 0..root {
        let (e, f) = (pred_arc[u], flow[u]);
        if e >= real_arcs {
            if f != 0 {
                return Err(internal(
                    "an artificial arc kept flow at the optimum; this is a bug",
                ));
            }
        } else if f > 0 {
            plan.cost += f as i128 * cost(e / n, e % n) as i128;
            plan.flows.push((e / n, e % n, f));
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Every assignment of `n` unit masses, by brute force.
    fn brute_force_assignment(cost: &[i64], n: usize) -> i64 {
        fn go(row: usize, n: usize, used: &mut Vec<bool>, cost: &[i64], acc: i64, best: &mut i64) {
            if row == n {
                *best = (*best).min(acc);
                return;
            }
            for col in 0..n {
                if !used[col] {
                    used[col] = true;
                    go(row + 1, n, used, cost, acc + cost[row * n + col], best);
                    used[col] = false;
                }
            }
        }
        let mut best = i64::MAX;
        go(0, n, &mut vec![false; n], cost, 0, &mut best);
        best
    }

    #[test]
    fn unit_masses_match_brute_force_assignment() {
        let mut rng = StdRng::seed_from_u64(1);
        for n in 1..=7 {
            for _ in 0..20 {
                let cost: Vec<i64> = (0..n * n).map(|_| rng.random_range(0..30)).collect();
                let plan = solve(&vec![1; n], &vec![1; n], |i, j| cost[i * n + j]).unwrap();
                assert_eq!(plan.cost, brute_force_assignment(&cost, n) as i128);
            }
        }
    }

    #[test]
    fn integer_masses_match_their_expansion_into_unit_masses() {
        // A transportation problem with multiplicities equals the assignment problem on
        // repeated points: heavy degeneracy, exact answer by brute force.
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..30 {
            let (m, n) = (rng.random_range(1..4), rng.random_range(1..4));
            let mut supply: Vec<i64> = (0..m).map(|_| rng.random_range(1..3)).collect();
            let mut demand: Vec<i64> = (0..n).map(|_| rng.random_range(1..3)).collect();
            let (ts, td) = (supply.iter().sum::<i64>(), demand.iter().sum::<i64>());
            // Balance the totals.
            if ts > td {
                demand[0] += ts - td;
            } else {
                supply[0] += td - ts;
            }
            let base: Vec<i64> = (0..m * n).map(|_| rng.random_range(0..20)).collect();
            let plan = solve(&supply, &demand, |i, j| base[i * n + j]).unwrap();
            let owner = |masses: &[i64]| -> Vec<usize> {
                masses
                    .iter()
                    .enumerate()
                    .flat_map(|(k, &c)| std::iter::repeat(k).take(c as usize))
                    .collect()
            };
            let (rows, cols) = (owner(&supply), owner(&demand));
            let size = rows.len();
            let expanded: Vec<i64> = rows
                .iter()
                .flat_map(|&i| cols.iter().map(move |&j| (i, j)))
                .map(|(i, j)| base[i * n + j])
                .collect();
            assert_eq!(plan.cost, brute_force_assignment(&expanded, size) as i128);
            // The plan moves exactly the given masses.
            for (i, &s) in supply.iter().enumerate() {
                assert_eq!(
                    plan.flows.iter().filter(|f| f.0 == i).map(|f| f.2).sum::<i64>(),
                    s
                );
            }
            for (j, &d) in demand.iter().enumerate() {
                assert_eq!(
                    plan.flows.iter().filter(|f| f.1 == j).map(|f| f.2).sum::<i64>(),
                    d
                );
            }
        }
    }

    #[test]
    fn malformed_problems_are_errors() {
        assert!(solve(&[], &[1], |_, _| 0).is_err());
        assert!(solve(&[1, 0], &[1], |_, _| 0).is_err());
        assert!(solve(&[2], &[1], |_, _| 0).is_err());
    }
}
