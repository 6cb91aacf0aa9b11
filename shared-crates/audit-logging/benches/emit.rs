//! Cost of `AuditSink::emit` on the caller's side.
//!
//! - `emit/disabled`: audit off; `emit_with` does not even build the event.
//! - `emit/disabled_prebuilt`: audit off, the caller built the event anyway.
//! - `emit/local_enqueue`: audit on; the time to build the event and hand it
//!   to the writer's buffer (the writer thread does the hashing and I/O).
//!   Measured in chunks smaller than the buffer, waiting untimed for the
//!   writer between chunks, so every timed call is a real enqueue, never a drop.
//! - `writer/append_batched`: for reference, what the writer thread spends per
//!   record (canonical JSON, SHA-256, write), from the drain time of a chunk.
//!
//! Run with `cargo bench -p audit-logging --bench emit`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use audit_logging::{AuditConfig, AuditEvent, AuditLogger, AuthFailureReason};
use auth_min::Fingerprint;
use criterion::Criterion;

fn event(fp: &Fingerprint) -> AuditEvent {
    AuditEvent::AuthFailure {
        token_fp: Some(fp.clone()),
        method: "POST".to_owned(),
        path: "/v1/inference".to_owned(),
        peer_ip: Some(std::net::IpAddr::from([127, 0, 0, 1])),
        reason: AuthFailureReason::Invalid,
    }
}

const CHUNK: u64 = 1024;

fn bench(c: &mut Criterion) {
    let fp = Fingerprint::of("bench-token-0123456789");
    let mut group = c.benchmark_group("emit");

    let disabled = AuditLogger::open(&AuditConfig::disabled("bench")).expect("disabled logger");
    let off = disabled.sink();
    group.bench_function("disabled", |b| {
        b.iter(|| off.emit_with(black_box(Some("req-1")), || event(&fp)))
    });
    group.bench_function("disabled_prebuilt", |b| {
        b.iter(|| off.emit(black_box(Some("req-1")), event(&fp)))
    });

    let dir = tempfile::tempdir().expect("temp dir");
    let config = AuditConfig {
        min_free_bytes: 0,
        capacity: 4096,
        ..AuditConfig::local(dir.path(), "bench")
    };
    let logger = AuditLogger::open(&config).expect("local logger");
    let on = logger.sink();
    let mut drain_total = Duration::ZERO;
    let mut drained = 0u64;
    group.bench_function("local_enqueue", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(CHUNK);
                let start = Instant::now();
                for _ in 0..n {
                    on.emit(black_box(Some("req-1")), event(&fp));
                }
                timed += start.elapsed();
                let drain = Instant::now();
                assert!(on.flush(), "writer answers");
                drain_total += drain.elapsed();
                drained += n;
                left -= n;
            }
            timed
        })
    });
    group.finish();
    assert_eq!(on.dropped(), 0, "every timed emit was an enqueue");
    logger.shutdown();
    if drained > 0 {
        println!(
            "writer/append_batched: {:.2} us per record over {drained} records (drain time incl. batched fsync)",
            drain_total.as_secs_f64() * 1e6 / drained as f64
        );
    }
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
}
