//! Benchmark tools for the queen's overhead (see `docs/performance.md`):
//!
//! - `fake-worker`: a **test double** of `llm-worker-rbee`. It speaks the
//!   worker's API (SSE `started`/`token`/`end`/`[DONE]`, 503
//!   `ALL_SLOTS_BUSY`, the ready callback and heartbeats to its hive) and
//!   emits tokens at a fixed rate with as many slots as asked, so a real
//!   hive can spawn it and a queen can route to it without a model's cost
//!   hiding the orchestrator's.
//! - `rbee-loadgen`: keeps N streams open against a URL and reports
//!   time to first token, inter-token latency and requests per second.

/// The `p`-th percentile (0..=100) of sorted `values` (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 50.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
