//! The whole forward pass on the real default model: one decode step at a
//! 512-token context, and a 256-token prompt chunk, on the threads given by
//! `RBEE_WORKER_THREADS` (default 2, the CI machines' count). Run by hand:
//! `cargo bench -p llm-worker-rbee --bench forward`.

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use criterion::{Criterion, Throughput};
use llm_worker_rbee::model::llama::{BlockTables, Row};
use llm_worker_rbee::model::{load_gguf, LoadOptions};

/// Sequences of the batched decode step.
const BATCH: usize = 8;

fn forward(c: &mut Criterion) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-model.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("fetch-model.sh");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let threads = std::env::var("RBEE_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut model = load_gguf(
        Path::new(&path),
        &Device::Cpu,
        LoadOptions {
            threads,
            context: 1024,
            cache_positions: BATCH * 1024,
            ..LoadOptions::default()
        },
    )
    .expect("load");
    // Sequence i in blocks 8i..8i+8; sequence 0 for the single-row runs.
    let tables = BlockTables::contiguous(BATCH, 8);
    let f = model.model.as_mut();
    let prompt: Vec<Row> = (0..512)
        .map(|pos| Row {
            token: (pos * 7 % 40_000) as u32 + 100,
            seq: 0,
            pos,
            logits: pos == 511,
        })
        .collect();
    for chunk in prompt.chunks(256) {
        f.forward(chunk, &tables).expect("prefill");
    }
    for seq in 1..BATCH {
        let rows: Vec<Row> = prompt.iter().map(|r| Row { seq, ..*r }).collect();
        for chunk in rows.chunks(256) {
            f.forward(chunk, &tables).expect("prefill");
        }
    }
    let batch: Vec<Row> = (0..BATCH)
        .map(|seq| Row {
            token: 1234,
            seq,
            pos: 512,
            logits: true,
        })
        .collect();
    let mut group = c.benchmark_group("forward");
    group.sample_size(30);
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_at_512", |b| {
        let row = [Row {
            token: 1234,
            seq: 0,
            pos: 512,
            logits: true,
        }];
        b.iter(|| f.forward(&row, &tables).expect("decode").row(0)[0]);
    });
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("decode_8_sequences_at_512", |b| {
        b.iter(|| f.forward(&batch, &tables).expect("decode").row(0)[0]);
    });
    group.sample_size(10);
    group.throughput(Throughput::Elements(256));
    group.bench_function("prefill_256_at_256", |b| {
        b.iter(|| f.forward(&prompt[256..], &tables).expect("prefill").row(0)[0]);
    });
    group.finish();
    // With RBEE_WORKER_PROFILE=1: where the time of each kind of pass goes.
    let split =
        |f: &mut dyn llm_worker_rbee::model::llama::Forward, what: &str, rows: &[Row], n: u32| {
            let before = f.timings();
            for _ in 0..n {
                f.forward(rows, &tables).expect("forward");
            }
            let after = f.timings();
            let total: f64 = after
                .iter()
                .zip(&before)
                .map(|(a, b)| (a.1 - b.1).as_secs_f64())
                .sum();
            let parts: Vec<String> = after
                .iter()
                .zip(&before)
                .map(|(a, b)| {
                    let t = (a.1 - b.1).as_secs_f64();
                    format!(
                        "{} {:.3} ms ({:.0}%)",
                        a.0,
                        t * 1e3 / f64::from(n),
                        100.0 * t / total
                    )
                })
                .collect();
            if total > 0.0 {
                println!(
                    "{what}: {:.3} ms per pass: {}",
                    total * 1e3 / f64::from(n),
                    parts.join(", ")
                );
            }
        };
    let row = [Row {
        token: 1234,
        seq: 0,
        pos: 512,
        logits: true,
    }];
    split(f, "decode at 512", &row, 200);
    split(f, "decode 8 sequences at 512", &batch, 100);
    split(f, "prefill 256 at 256", &prompt[256..], 10);
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    forward(&mut criterion);
    criterion.final_summary();
}
