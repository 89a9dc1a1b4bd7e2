//! Building the per-service scheduling ring.
//!
//! The data plane picks a backend by reading one slot of the service's ring:
//! weighted round robin walks the ring with a per-CPU cursor; a hash-based
//! scheduler (Maglev) will index it by flow hash. The controller fills the
//! ring; this module computes its contents.

use alloc::vec::Vec;

const fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

/// Weights as they will be realised in a ring of `cap` slots: reduced by
/// their GCD and, when their sum still exceeds `cap`, scaled down
/// proportionally (every positive weight keeps at least one slot, trimming
/// the largest ones if the minimums overflow the ring).
pub fn effective_weights(weights: &[u32], cap: usize) -> Vec<u64> {
    let g = weights.iter().filter(|w| **w > 0).fold(0u64, |g, &w| gcd(g, w as u64));
    if g == 0 || cap == 0 {
        return alloc::vec![0; weights.len()];
    }
    let total: u64 = weights.iter().map(|&w| w as u64 / g).sum();
    let cap = cap as u64;
    let mut eff: Vec<u64> = weights
        .iter()
        .map(|&w| {
            let w = w as u64 / g;
            if w == 0 || total <= cap { w } else { (w * cap / total).max(1) }
        })
        .collect();
    let mut sum: u64 = eff.iter().sum();
    while sum > cap {
        let Some((imax, _)) = eff.iter().enumerate().max_by_key(|(_, w)| **w) else { break };
        if eff[imax] <= 1 {
            // More backends than slots: the ring cannot hold them all.
            break;
        }
        eff[imax] -= 1;
        sum -= 1;
    }
    eff
}

/// Smooth weighted round robin (the nginx algorithm: each backend's picks are
/// spread evenly through the sequence, not in bursts) over `(id, weight)`.
/// Returns at most `cap` backend ids; backends of weight 0 get none.
pub fn build_wrr_ring(backends: &[(u32, u32)], cap: usize) -> Vec<u32> {
    let weights: Vec<u32> = backends.iter().map(|b| b.1).collect();
    let eff = effective_weights(&weights, cap);
    let total: u64 = eff.iter().sum();
    let len = total.min(cap as u64) as usize;
    let mut current = alloc::vec![0i64; backends.len()];
    let mut ring = Vec::with_capacity(len);
    for _ in 0..len {
        let mut best: Option<usize> = None;
        for (i, w) in eff.iter().enumerate() {
            if *w == 0 {
                continue;
            }
            current[i] += *w as i64;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let Some(b) = best else { break };
        current[b] -= total as i64;
        ring.push(backends[b].0);
    }
    ring
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(ring: &[u32], id: u32) -> usize {
        ring.iter().filter(|&&x| x == id).count()
    }

    #[test]
    fn equal_weights_interleave() {
        let ring = build_wrr_ring(&[(7, 10), (8, 10), (9, 10)], 4093);
        assert_eq!(ring, [7, 8, 9]);
    }

    #[test]
    fn weights_are_honoured_exactly_and_smoothly() {
        let ring = build_wrr_ring(&[(1, 5), (2, 1), (3, 1)], 4093);
        assert_eq!(ring.len(), 7);
        assert_eq!(count(&ring, 1), 5);
        assert_eq!(count(&ring, 2), 1);
        // Smooth: the heavy backend never takes more than 3 picks in a row.
        assert_eq!(ring, [1, 1, 2, 1, 3, 1, 1]);
    }

    #[test]
    fn zero_weight_and_empty_give_no_slots() {
        assert!(build_wrr_ring(&[], 16).is_empty());
        assert!(build_wrr_ring(&[(1, 0)], 16).is_empty());
        let ring = build_wrr_ring(&[(1, 0), (2, 3)], 16);
        assert_eq!(ring, [2]);
    }

    #[test]
    fn large_weights_are_scaled_into_the_ring() {
        let ring = build_wrr_ring(&[(1, 100_000), (2, 50_000), (3, 1)], 101);
        assert!(ring.len() <= 101);
        let (a, b, c) = (count(&ring, 1), count(&ring, 2), count(&ring, 3));
        assert!(c >= 1, "every positive weight keeps a slot");
        let ratio = a as f64 / b as f64;
        assert!((ratio - 2.0).abs() < 0.1, "ratio {ratio}");
    }

    #[test]
    fn more_backends_than_slots_is_bounded() {
        let backends: Vec<(u32, u32)> = (0..20).map(|i| (i, 1)).collect();
        // The controller refuses more backends than slots; the builder
        // still never writes past the ring.
        let ring = build_wrr_ring(&backends, 8);
        assert_eq!(ring.len(), 8);
    }
}

/// Default Maglev table size (a prime, as Maglev requires).
pub const MAGLEV_DEFAULT_SIZE: usize = 65537;

/// Whether `n` is prime (table sizes are small: trial division is enough).
pub fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// 64-bit mix (splitmix64 finaliser).
const fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A backend in a Maglev table: its id (what the slots hold), weight, and a
/// stable identity (its address and port) that fixes its permutation, so
/// every balancer and every restart builds the same table.
#[derive(Clone, Copy, Debug)]
pub struct MaglevBackend {
    pub id: u32,
    pub weight: u32,
    pub identity: u64,
}

/// Builds a weighted Maglev lookup table of `size` slots (`size` prime).
///
/// Each backend walks its own permutation of the slots (offset and skip
/// from its identity) and takes the next free slot when it has a turn.
/// Weights: in round `r` a backend of weight `w` has a turn when
/// `floor((r+1)·w/wmax) > floor(r·w/wmax)`, so its share of the slots is
/// `w / Σw` (to within a slot per round), and the heaviest backends take a
/// turn every round, as in unweighted Maglev. Backends of weight 0 get none.
pub fn build_maglev(backends: &[MaglevBackend], size: usize) -> Vec<u32> {
    let live: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() || size == 0 {
        return Vec::new();
    }
    let m = size as u64;
    let perms: Vec<(u64, u64)> = live
        .iter()
        .map(|b| {
            let offset = mix64(b.identity ^ 0x5851_f42d_4c95_7f2d) % m;
            let skip = mix64(b.identity ^ 0x1405_7b7e_f767_814f) % (m - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let wmax = live.iter().map(|b| b.weight as u64).max().unwrap_or(1);
    const EMPTY: u32 = u32::MAX;
    let mut table = alloc::vec![EMPTY; size];
    let mut next = alloc::vec![0u64; live.len()];
    let mut filled = 0usize;
    let mut round = 0u64;
    while filled < size {
        for (i, b) in live.iter().enumerate() {
            let w = b.weight as u64;
            if (round + 1) * w / wmax == round * w / wmax {
                continue;
            }
            let (offset, skip) = perms[i];
            let mut slot = ((offset + next[i] % m * skip) % m) as usize;
            while table[slot] != EMPTY {
                next[i] += 1;
                slot = ((offset + next[i] % m * skip) % m) as usize;
            }
            table[slot] = b.id;
            next[i] += 1;
            filled += 1;
            if filled == size {
                break;
            }
        }
        round += 1;
    }
    table
}

#[cfg(test)]
mod maglev_tests {
    use super::*;
    use alloc::vec::Vec;

    fn backends(weights: &[u32]) -> Vec<MaglevBackend> {
        weights.iter().enumerate().map(|(i, &w)| MaglevBackend { id: i as u32, weight: w, identity: 0x0a01_0002_1f90 + ((i as u64) << 24) }).collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<f64> {
        let mut c = alloc::vec![0usize; n];
        for &id in table {
            c[id as usize] += 1;
        }
        c.iter().map(|&x| x as f64 / table.len() as f64).collect()
    }

    #[test]
    fn every_slot_is_filled_and_shares_follow_weights_within_one_percent() {
        for weights in [&[1u32, 1, 1, 1][..], &[1, 2, 3, 4], &[10, 1], &[5, 5, 5, 1, 1, 100]] {
            let t = build_maglev(&backends(weights), MAGLEV_DEFAULT_SIZE);
            assert_eq!(t.len(), MAGLEV_DEFAULT_SIZE);
            let total: u32 = weights.iter().sum();
            for (i, s) in shares(&t, weights.len()).iter().enumerate() {
                let want = weights[i] as f64 / total as f64;
                assert!((s - want).abs() <= 0.01 * want.max(0.01), "weights {weights:?}: backend {i} share {s:.4}, want {want:.4}");
            }
        }
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth_of_the_slots() {
        for n in [3usize, 4, 5, 10] {
            let all = backends(&alloc::vec![1; n]);
            let before = build_maglev(&all, MAGLEV_DEFAULT_SIZE);
            let without: Vec<MaglevBackend> = all.iter().copied().filter(|b| b.id != 1).collect();
            let after = build_maglev(&without, MAGLEV_DEFAULT_SIZE);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / MAGLEV_DEFAULT_SIZE as f64;
            // The removed backend's own slots (1/n) must move; others barely.
            let others_moved = before.iter().zip(&after).filter(|(a, b)| **a != 1 && a != b).count() as f64 / MAGLEV_DEFAULT_SIZE as f64;
            assert!(moved <= 1.0 / n as f64 + 0.03, "n={n}: {moved:.4} of the slots moved");
            assert!(others_moved <= 0.03, "n={n}: {others_moved:.4} of other backends' slots moved");
        }
    }

    #[test]
    fn the_table_depends_on_identities_not_on_order() {
        let a = backends(&[1, 2, 3]);
        let mut b = a.clone();
        b.reverse();
        // Same backends in another order: the same table up to tie order in
        // a round, so almost every slot is the same.
        let (ta, tb) = (build_maglev(&a, 65537), build_maglev(&b, 65537));
        let same = ta.iter().zip(&tb).filter(|(x, y)| x == y).count() as f64 / 65537.0;
        assert!(same > 0.95, "{same}");
    }

    #[test]
    fn small_prime_sizes_and_edge_cases() {
        assert!(is_prime(65537) && is_prime(4093) && !is_prime(65536) && !is_prime(1));
        assert!(build_maglev(&[], 7).is_empty());
        assert!(build_maglev(&backends(&[0, 0]), 7).is_empty());
        let t = build_maglev(&backends(&[1]), 7);
        assert_eq!(t, [0; 7]);
    }
}
