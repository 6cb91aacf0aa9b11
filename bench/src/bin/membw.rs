//! `membw`: the memory read bandwidth that bounds token generation on this
//! machine. Each of `--threads` threads sums its own slice of one buffer
//! (`--mib` in all, larger than the caches the weights would otherwise sit
//! in) front to back, all at once, as a decode step streams the weights;
//! the best of `--runs` is printed in GB/s (10^9 bytes), one line of JSON.

use std::time::Instant;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Read bandwidth of several threads streaming one buffer")]
struct Args {
    /// Threads reading at once.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Buffer size in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Timed passes; the best is reported.
    #[arg(long, default_value_t = 7)]
    runs: usize,
}

/// Sum a slice in 8 independent lanes, which the compiler vectorizes: the
/// loop is bound by the loads, not the adds.
fn sum(words: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    for chunk in words.chunks_exact(8) {
        for (l, w) in lanes.iter_mut().zip(chunk) {
            *l = l.wrapping_add(*w);
        }
    }
    lanes.iter().fold(0, |a, &b| a.wrapping_add(b))
}

fn main() {
    let args = Args::parse();
    let threads = args.threads.max(1);
    let words = args.mib * (1 << 20) / 8;
    // Written once so every page is resident before timing.
    let buffer: Vec<u64> = (0..words as u64).collect();
    let part = words.div_ceil(threads);
    let mut best = 0f64;
    let mut check = 0u64;
    for _ in 0..args.runs.max(1) {
        let started = Instant::now();
        let sums: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = buffer
                .chunks(part)
                .map(|slice| s.spawn(move || sum(slice)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
        });
        let seconds = started.elapsed().as_secs_f64();
        check = sums.iter().fold(check, |a, &b| a.wrapping_add(b));
        best = best.max((words * 8) as f64 / seconds / 1e9);
    }
    println!(
        "{{\"threads\":{threads},\"mib\":{},\"gb_per_s\":{best:.2},\"checksum\":{check}}}",
        args.mib
    );
}
