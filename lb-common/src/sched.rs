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
