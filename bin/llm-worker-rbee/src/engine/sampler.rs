//! Choosing the next token from the logits.
//!
//! Order: repetition penalty, then greedy (temperature 0) or temperature
//! scaling, min-p, top-k, top-p, and a draw from what is left. A fixed seed
//! makes the draws reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How many recent tokens the repetition penalty looks at (as llama.cpp).
pub const PENALTY_WINDOW: usize = 64;

/// Sampling settings of one request (validated at the HTTP edge).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: u32,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables.
    pub repetition_penalty: f32,
    /// Reproducible draws.
    pub seed: Option<u64>,
}

/// Draws tokens for one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    scratch: Vec<(u32, f32)>,
    /// Tokens already penalized this step (the window is short: a linear
    /// search over a reused buffer beats a set built per token).
    penalized: Vec<u32>,
}

impl Sampler {
    /// A sampler seeded from `params.seed`, or from the OS when there is none.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            scratch: Vec::new(),
            penalized: Vec::with_capacity(PENALTY_WINDOW),
        }
    }

    /// Pick the next token. `logits` is modified in place; `recent` are the
    /// sequence's tokens so far (prompt and generated).
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> u32 {
        let p = self.params;
        if p.repetition_penalty != 1.0 {
            let window = &recent[recent.len().saturating_sub(PENALTY_WINDOW)..];
            self.penalized.clear();
            for &t in window {
                if !self.penalized.contains(&t) {
                    self.penalized.push(t);
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        // Softmax of logits / temperature, as (id, probability).
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.scratch.clear();
        let mut sum = 0.0f32;
        for (i, &l) in logits.iter().enumerate() {
            let e = ((l - max) / p.temperature).exp();
            sum += e;
            self.scratch.push((i as u32, e));
        }
        for c in &mut self.scratch {
            c.1 /= sum;
        }
        if p.min_p > 0.0 {
            let top = self.scratch.iter().map(|c| c.1).fold(0.0, f32::max);
            let floor = p.min_p * top;
            self.scratch.retain(|c| c.1 >= floor);
        }
        let by_prob_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && (p.top_k as usize) < self.scratch.len() {
            let k = p.top_k as usize;
            self.scratch.select_nth_unstable_by(k - 1, by_prob_desc);
            self.scratch.truncate(k);
        }
        if p.top_p < 1.0 {
            self.scratch.sort_unstable_by(by_prob_desc);
            let total: f32 = self.scratch.iter().map(|c| c.1).sum();
            let mut cumulative = 0.0;
            let mut keep = self.scratch.len();
            for (i, c) in self.scratch.iter().enumerate() {
                cumulative += c.1 / total;
                if cumulative >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.scratch.truncate(keep.max(1));
        }
        let total: f32 = self.scratch.iter().map(|c| c.1).sum();
        let mut target = self.rng.random::<f32>() * total;
        for &(id, prob) in &self.scratch {
            target -= prob;
            if target <= 0.0 {
                return id;
            }
        }
        self.scratch.last().map_or_else(|| argmax(logits), |c| c.0)
    }
}

/// The log-probability of `chosen` under the distribution `logits` give
/// (log-softmax, the normalizer summed in f64), and the `k` most likely
/// tokens with theirs in `top`, most likely first (the lowest id wins ties).
pub fn log_softmax_top(logits: &[f32], chosen: u32, k: usize, top: &mut Vec<(u32, f32)>) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    let lp = |l: f32| (f64::from(l) - log_z) as f32;
    top.clear();
    if k > 0 {
        // The k largest in one pass: `top` stays sorted, a logit enters
        // only when it beats the smallest kept.
        for (i, &l) in logits.iter().enumerate() {
            if top.len() == k && top.last().is_some_and(|&(_, least)| l <= least) {
                continue;
            }
            let at = top.partition_point(|&(_, kept)| kept >= l);
            top.insert(at, (i as u32, l));
            top.truncate(k);
        }
        for entry in top.iter_mut() {
            entry.1 = lp(entry.1);
        }
    }
    logits
        .get(chosen as usize)
        .map_or(f32::NEG_INFINITY, |&l| lp(l))
}

/// Index of the largest logit; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: Some(7),
        }
    }

    #[test]
    fn temperature_zero_is_argmax() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..params()
        });
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, -1.0], &[]), 1);
        assert_eq!(
            s.sample(&mut [5.0, 5.0, 1.0], &[]),
            0,
            "ties go to the lowest id"
        );
    }

    #[test]
    fn same_seed_same_draws() {
        let logits = [1.0, 1.1, 0.9, 1.05, 0.95];
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params()
            });
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..params()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 0.5, 2.0, 1.9], &[]), 2);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.5 keeps only the first.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..params()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [5.0f32, 4.9, -5.0, -6.0];
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.5,
            ..params()
        });
        for _ in 0..100 {
            assert!(s.sample(&mut logits.clone(), &[]) < 2);
        }
    }

    #[test]
    fn repetition_penalty_discourages_recent_tokens() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            ..params()
        });
        // Token 0 would win, but it was just produced; 3.0/2 < 2.0.
        assert_eq!(s.sample(&mut [3.0, 2.0, 0.0], &[0]), 1);
        // Negative logits get more negative.
        assert_eq!(s.sample(&mut [-1.0, -1.5, -3.0], &[0]), 1);
    }

    proptest::proptest! {
        #[test]
        fn log_softmax_top_matches_the_direct_formula(
            logits in proptest::collection::vec(-30.0f32..30.0, 1..300),
            k in 0usize..25,
            pick in 0usize..300,
        ) {
            let chosen = (pick % logits.len()) as u32;
            let mut top = Vec::new();
            let got = log_softmax_top(&logits, chosen, k, &mut top);
            // Direct: log(exp(l_i) / sum_j exp(l_j)), in f64.
            let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
            let direct = |l: f32| (f64::from(l).exp() / z).ln();
            proptest::prop_assert!((f64::from(got) - direct(logits[chosen as usize])).abs() < 1e-4);
            // The k largest, by a full sort (stable: ties keep the lower id first).
            let mut order: Vec<u32> = (0..logits.len() as u32).collect();
            order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
            order.truncate(k);
            proptest::prop_assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), order);
            for &(id, lp) in &top {
                proptest::prop_assert!((f64::from(lp) - direct(logits[id as usize])).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut s = Sampler::new(params());
        let logits = [0.0f32, (3.0f32).ln()];
        let ones = (0..4000)
            .filter(|_| s.sample(&mut logits.clone(), &[]) == 1)
            .count();
        // Expected 3000 (p = 0.75); allow 4 standard deviations (~110).
        assert!((2890..=3110).contains(&ones), "{ones}");
    }
}
